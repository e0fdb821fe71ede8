"""Data moves one way (STYLE.md §1): no layer imports a layer above it, only
fuse_ops imports pyfuse3 and only backend imports fsspec.

Each check imports one module in a fresh interpreter and looks at what came
along in sys.modules, so a function-level import counts only if it runs at import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Top to bottom. A module may import modules of its own layer and of the layers below.
LAYERS = [
    ["cachefs.fuse_ops", "cachefs.peer.server"],  # the front ends: the kernel's and the peers'
    ["cachefs.reader", "cachefs.namespace"],
    ["cachefs.cache.mem"],
    ["cachefs.cache.disk"],
    ["cachefs.peer.client"],
    ["cachefs.backend"],
    ["cachefs.objects", "cachefs.errors", "cachefs.metrics", "cachefs.hotpath", "cachefs.logsafe"],  # shared by all
]


def imported_by(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("depth, module", [(d, m) for d, layer in enumerate(LAYERS) for m in layer])
def test_no_layer_imports_a_layer_above_it(depth, module):
    above = {m for layer in LAYERS[:depth] for m in layer}
    assert not above & imported_by(module)


def test_reader_imports_neither_pyfuse3_nor_fsspec():
    subprocess.run(
        [sys.executable, "-c",
         'import cachefs.reader, sys; assert "pyfuse3" not in sys.modules and "fsspec" not in sys.modules'],
        check=True, cwd=REPO,
    )


@pytest.mark.parametrize("module", [m for layer in LAYERS for m in layer if m != "cachefs.fuse_ops"])
def test_only_fuse_ops_imports_pyfuse3(module):
    assert "pyfuse3" not in imported_by(module)


def test_vocabulary_imports_no_other_cachefs_module():
    assert {m for m in imported_by("cachefs.objects") if m.startswith("cachefs.")} == {"cachefs.objects"}


def test_warmup_runs_without_the_node_modules(tmp_path):
    """`cachefs warmup` only talks to a running node: it must not import the node's
    configuration (0.06 s of every warm-up, which `juicefs warmup` comparisons see).
    Here it fails (no mount at the path) after doing all it does before the node answers."""
    code = (
        "import json, sys; from cachefs import cli; "
        f"rc = cli.main(['warmup', {str(tmp_path)!r}, '-r']); "
        "print(json.dumps([rc, sorted(sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    rc, modules = json.loads(out.stdout.splitlines()[-1])
    assert rc != 0 and "not" in out.stderr  # the path is in no mount
    assert not {"cachefs.config", "cachefs.loader", "cachefs.cache.policy"} & set(modules)
