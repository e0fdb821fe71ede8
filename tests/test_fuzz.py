"""A short coverage-guided fuzz run of the peer wire format (tests/fuzz_peer.py).

The long run (≥ 1,000,000 inputs) is one documented command in docs/reliability.md.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

atheris = pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[test]')")

RUNS = 30_000


def test_a_short_atheris_run_finds_no_crash(tmp_path):
    """Every input is decoded, parsed and validated the way a worker does it; any
    exception other than ProtocolError, or a broken invariant, stops the run."""
    corpus = tmp_path / "corpus"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_peer", f"-atheris_runs={RUNS}", "-print_final_stats=1", str(corpus)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.splitlines()[-40:])
    assert proc.returncode == 0, f"the fuzzer found a crash (exit {proc.returncode}):\n{tail}"
    assert f"Done {RUNS} " in out, tail
    assert "Uncaught Python exception" not in out, tail
    # Coverage-guided: it instrumented cachefs and found new paths beyond the seeds.
    cov = [int(c) for c in re.findall(r"cov: (\d+)", out)]
    assert cov and max(cov) > 100, tail
    assert len(list(corpus.iterdir())) > _seeds(), "the corpus did not grow past the seeds"


def test_the_target_reports_what_is_not_a_protocol_error():
    """The harness lets a bug through: a validation that raises anything but
    ProtocolError makes one_input raise (atheris then stops with a crash).
    In a subprocess, so that atheris instruments no module of this test run."""
    check = """
import tests.fuzz_peer as f
seed = next(s for s in f.seeds() if b"\\xa3get" in s)
f.one_input(seed)
real = f.parse_message
def broken(header):
    raise KeyError("a bug")
f.parse_message = broken
try:
    f.one_input(seed)
except KeyError:
    print("raised")
f.parse_message = real
f.one_input(seed)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["raised", "ok"], proc.stdout + proc.stderr[-3000:]


def _seeds() -> int:
    """How many seeds fuzz_peer writes into a fresh corpus."""
    proc = subprocess.run([sys.executable, "-c", "import tests.fuzz_peer as f; print(len(f.seeds()))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])
