"""bench/: random jobs timed after a ramp, the daemon's cores per cell, and the issue 14 targets."""

from __future__ import annotations

import shutil
import time
import types

import pytest

from bench import host, report
from bench.__main__ import Bench, applies, parse_args
from bench.systems import COLD, DROPPED
from bench.workloads import BY_KEY, COLD_RUNTIME, run_fio

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")


def fio_bench(tmp_path, size: int, runtime: float, ramp: float):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * size)
    return big, types.SimpleNamespace(dataset=types.SimpleNamespace(big_size=size), runtime=runtime, ramp=ramp)


@needs_fio
def test_a_random_job_is_timed_after_its_ramp(tmp_path):
    big, bench = fio_bench(tmp_path, 8 << 20, runtime=1, ramp=2)
    seen = []

    def at_ramp_end(sid):
        # fio's job processes are still running: their CPU so far is counted here.
        seen.append((time.monotonic() - t0, host.session_pids(sid), host.cpu_seconds(sid)))

    t0 = time.monotonic()
    result = run_fio(BY_KEY["rand-4k"], big, bench, at_ramp_end=at_ramp_end)
    wall = time.monotonic() - t0
    assert len(seen) == 1
    at, pids, _cpu = seen[0]
    assert at >= 2.0 and pids
    assert wall >= 3.0  # ramp + runtime
    assert result["seconds"] < 1.5  # fio's figures leave the ramp out
    assert result["bytes"] > 0


@needs_fio
def test_a_sequential_job_has_no_ramp(tmp_path):
    big, bench = fio_bench(tmp_path, 4 << 20, runtime=1, ramp=5)
    called = []
    t0 = time.monotonic()
    result = run_fio(BY_KEY["seq-1m-1j"], big, bench, at_ramp_end=called.append)
    assert not called
    assert time.monotonic() - t0 < 5
    assert result["bytes"] == 4 << 20


@needs_fio
def test_a_cold_random_job_is_short_and_has_no_ramp(tmp_path):
    big, bench = fio_bench(tmp_path, 4 << 20, runtime=20, ramp=5)
    called = []
    t0 = time.monotonic()
    result = run_fio(BY_KEY["rand-4k"], big, bench, cold=True, at_ramp_end=called.append)
    assert not called
    assert (result["runtime_s"], result["ramp_s"]) == (COLD_RUNTIME, 0)
    assert time.monotonic() - t0 < COLD_RUNTIME + 3


def test_defaults_run_random_jobs_20_s_after_a_5_s_ramp_once():
    args = parse_args([])
    assert (args.runtime, args.ramp, args.repeat, args.random_repeat) == (20.0, 5.0, 3, 1)
    quick = parse_args(["--quick"])
    assert (quick.runtime, quick.ramp, quick.random_repeat) == (1.0, 0.0, 1)
    assert parse_args(["--random-repeat", "5", "--repeat", "2"]).random_repeat == 2


def test_random_cells_run_only_random_repeat_times(tmp_path):
    bench = Bench(work=tmp_path, shm=tmp_path, dataset=None, runtime=20, repeat=3, random_repeat=1)
    system = types.SimpleNamespace(states=(DROPPED,), has_small_files=True)
    assert [applies(system, BY_KEY["rand-4k-direct"], DROPPED, bench, r) for r in range(3)] == [True, False, False]
    assert [applies(system, BY_KEY["seq-1m-1j"], DROPPED, bench, r) for r in range(3)] == [True, True, True]
    # Cold random cells are short (COLD_RUNTIME): they keep every repeat.
    system = types.SimpleNamespace(states=(COLD,), has_small_files=True)
    assert [applies(system, BY_KEY["rand-4k-direct"], COLD, bench, r) for r in range(3)] == [True, True, True]


def run_data(cells: dict) -> dict:
    """A saved run: ``cells`` maps (system, state, workload) to (value, cores, cpu s/GiB)."""
    workloads = {k: {"label": w.label, "unit": w.unit, "states": list(w.states)} for k, w in BY_KEY.items()}
    systems = sorted({s for s, _, _ in cells})
    runs = []
    for (system, state, workload), (value, cores, per_gib) in cells.items():
        rec = {"system": system, "state": state, "workload": workload, "value": value, "other_cpu_cores": 0.1}
        if cores is not None:
            rec.update(daemon_cpu_cores=cores, cpu_s_per_gib=per_gib)
        runs.append(rec)
    machine = {"hostname": "h", "cores": 2, "cpu": "c", "memory_bytes": 1 << 30, "kernel": "k", "python": "3",
               "workdir_disk": "d", "cachefs": "x", "cachefs_git": "g", "pyfuse3": "p", "libfuse": "l",
               "fuse_max_pages_limit": 256, "juicefs": "j", "rclone": "r", "fio": "f"}
    return {"started": "now", "machine": machine, "dataset": {"big_size": 1 << 30, "small_count": 1,
            "ttfb_count": 1}, "repeat": 3, "random_repeat": 1, "runtime_s": 20, "ramp_s": 5,
            "raw_s3": {"mib_s": 300.0}, "workloads": workloads, "runs": runs, "errors": [],
            "systems": {s: {"label": s} for s in systems}}


def issue14(data: dict) -> dict[str, tuple[str, str]]:
    return {target.split(" ")[0] + " " + target.split(" ")[1]: (verdict, nums)
            for target, verdict, nums in report.issue14_targets(data, report.Table(data))}


def test_report_gives_cores_beside_each_cell_and_says_which_figure_stands():
    data = run_data({("cachefs", DROPPED, "rand-4k-direct"): (36_000, 0.97, 8.0),
                     ("tmpfs", DROPPED, "rand-4k-direct"): (1_000_000, None, None)})
    text = report.render(data)
    assert "| 36,000 · 0.97c | 1,000,000 |" in text
    assert "timed for 20 s after a 5 s ramp" in text and "stand over the 3 s ones" in text
    assert "| rand 4k ×4 direct | warm-dropped | 8.0 · 0.97c |" in text
    assert "## Targets (issue 14)" in text and "## Targets (issue 5)" in text
    data["runtime_s"] = 3
    assert "the 20 s figures stand" in report.render(data)


def test_issue14_verdicts():
    data = run_data({
        ("cachefs", DROPPED, "rand-4k-direct"): (36_000, 1.0, 8.0),
        ("ceiling", DROPPED, "rand-4k-direct"): (40_000, 1.0, 6.0),
        ("juicefs", DROPPED, "rand-4k-direct"): (30_000, 1.0, 9.0),
        # The ceiling itself is below JuiceFS here: cachefs is not held to 1.0 × JuiceFS.
        ("cachefs", DROPPED, "rand-128k-direct"): (10_000, 1.0, 0.5),
        ("ceiling", DROPPED, "rand-128k-direct"): (12_000, 1.0, 0.4),
        ("juicefs", DROPPED, "rand-128k-direct"): (13_000, 1.0, 0.8),
        ("cachefs-ssd", DROPPED, "seq-1m-1j"): (900, 1.0, 1.0),
        ("juicefs-disk", DROPPED, "seq-1m-1j"): (1000, 1.0, 1.0),
        ("cachefs-ssd", DROPPED, "rand-4k-direct"): (8_000, 1.0, 20.0),
        ("juicefs-disk", DROPPED, "rand-4k-direct"): (10_000, 1.0, 20.0),
        ("cachefs", "cold", "seq-1m-1j"): (280, 0.5, 0.9),
        ("cachefs", "cold", "small-files"): (500, 0.5, 10.0),
        ("rclone", "cold", "small-files"): (450, 0.5, 10.0),
        ("cachefs", "cold", "ttfb"): (8.0, None, None),
        ("rclone", "cold", "ttfb"): (6.7, None, None),
    })
    got = issue14(data)
    assert got["MEM, small"][0] == "met" and "0.90×" in got["MEM, small"][1]
    assert got["MEM ≥"][0] == "met" and "out of reach" in got["MEM ≥"][1]
    assert got["SSD hits"][0] == "**MISSED**" and "rand 4k ×4 direct 0.80× (20.00 s/GiB)" in got["SSD hits"][1]
    assert got["cold seq"][0] == "met"
    assert got["small files,"][0] == "met"
    assert got["TTFB, cold"][0] == "**MISSED**"
    data["runs"] = [r for r in data["runs"] if r["system"] != "ceiling"]
    assert issue14(data)["MEM, small"][0] == "not measured"
