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
    assert len(list(corpus.iterdir())) > len(_seeds()), "the corpus did not grow past the seeds"


def test_the_target_reports_what_is_not_a_protocol_error(monkeypatch):
    """The harness lets a bug through: a validation that raises anything but
    ProtocolError makes one_input raise (atheris then stops with a crash)."""
    import cachefs.peer.protocol

    fuzz_peer = _fuzz_module()
    seed = next(s for s in fuzz_peer.seeds() if b"\xa3get" in s)
    fuzz_peer.one_input(seed)  # a valid request: no error

    def broken(header):
        raise KeyError("a bug")

    monkeypatch.setattr(fuzz_peer, "parse_message", broken)
    with pytest.raises(KeyError):
        fuzz_peer.one_input(seed)
    monkeypatch.setattr(fuzz_peer, "parse_message", cachefs.peer.protocol.parse_message)
    fuzz_peer.one_input(seed)


def _fuzz_module():
    sys.path.insert(0, str(REPO))
    try:
        import tests.fuzz_peer as module
    finally:
        sys.path.remove(str(REPO))
    return module


def _seeds() -> list[bytes]:
    return _fuzz_module().seeds()
