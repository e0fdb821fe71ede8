"""The workloads: fio jobs over the big file, many small files, time to first byte.

Each ``run(root, bench)`` reads the dataset under ``root`` (a mounted system) and
returns ``{"value": ..., "bytes": ...}`` plus details; ``value`` is in the
workload's ``unit``. Cache states are the caller's business (bench/__main__.py
drops the page cache or remounts before calling).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.dataset import BIG
from bench.host import GiB, MiB
from bench.systems import COLD, DROPPED, WARM

JOBS = Path(__file__).resolve().parent / "jobs"
# A cold cell times a cache being filled: 20 s of random reads over the 1 GiB file would
# cache most of it and time warm reads, so cold random jobs run this long, with no ramp.
COLD_RUNTIME = 3.0


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unit: str  # "MiB/s", "IOPS", "files/s" or "ms"
    states: tuple[str, ...]
    job: str | None = None  # fio job file in bench/jobs (None: Python reader)
    direct: bool = False
    needs_small_files: bool = False

    @property
    def higher_is_better(self) -> bool:
        return self.unit != "ms"

    @property
    def sequential(self) -> bool:
        return self.key.startswith("seq")

    @property
    def time_based(self) -> bool:
        """A random fio job: runs for ``--ramp`` + ``--runtime`` seconds, timed after the ramp."""
        return self.job is not None and not self.sequential

    def files(self, dataset) -> list[str]:
        """The dataset files the workload reads."""
        if self.job:
            return [BIG]
        return dataset.small_paths if self.key == "small-files" else dataset.ttfb_paths

    def page_cache_bytes(self, dataset) -> int:
        """About how much new page cache the workload fills when the page cache starts empty."""
        if self.job:
            return 0 if self.direct else dataset.big_size
        if self.key == "small-files":
            return dataset.small_count * dataset.small_size
        return dataset.ttfb_count * 4 * MiB  # kernel read-ahead behind the 1-byte read

    def run(self, root: Path, bench, state: str, at_ramp_end=None) -> dict:
        """Read; ``at_ramp_end(fio_session_id)`` is called once a time-based job's ramp is over."""
        if self.job:
            return run_fio(self, root / BIG, bench, looped=state == WARM, cold=state == COLD, at_ramp_end=at_ramp_end)
        if self.key == "small-files":
            return read_small_files(root, bench.dataset.small_paths, threads=4)
        if self.key == "ttfb":
            return time_to_first_byte(root, bench.dataset.ttfb_paths)
        raise ValueError(self.key)


# Cold: buffered and direct random reads both wait for the backend, so only
# direct runs there; warm (page cache kept): direct reads would bypass the page
# cache and repeat the warm-dropped number, so only buffered runs there.
WORKLOADS = [
    Workload("seq-1m-1j", "seq 1M ×1", "MiB/s", (COLD, WARM, DROPPED), job="seq-1m-1j.fio"),
    Workload("seq-1m-4j", "seq 1M ×4", "MiB/s", (COLD, WARM, DROPPED), job="seq-1m-4j.fio"),
    Workload("rand-4k", "rand 4k ×4", "IOPS", (WARM, DROPPED), job="rand-4k.fio"),
    Workload("rand-128k", "rand 128k ×4", "IOPS", (WARM, DROPPED), job="rand-128k.fio"),
    Workload("rand-4k-direct", "rand 4k ×4 direct", "IOPS", (COLD, DROPPED), job="rand-4k.fio", direct=True),
    Workload("rand-128k-direct", "rand 128k ×4 direct", "IOPS", (COLD, DROPPED), job="rand-128k.fio", direct=True),
    Workload("small-files", "small files 64K ×4", "files/s", (COLD, WARM, DROPPED), needs_small_files=True),
    Workload("ttfb", "TTFB open+read 1 B", "ms", (COLD, WARM, DROPPED), needs_small_files=True),
]
BY_KEY = {w.key: w for w in WORKLOADS}

# --quick leaves these out; every workload, state and system still runs somewhere.
QUICK_SKIPS = frozenset({(COLD, "seq-1m-4j"), (COLD, "rand-4k-direct"), (WARM, "rand-4k"), (WARM, "rand-128k")})


# -- fio -------------------------------------------------------------------------------


def run_fio(workload: Workload, path: Path, bench, looped: bool = False, cold: bool = False,
            at_ramp_end=None) -> dict:
    """Run the workload's job file on ``path``.

    ``looped``: sequential jobs read the file again and again (reopening it each time)
    until 2 GiB were read, instead of once: only right when the page cache holds the file.
    ``cold``: a time-based job runs at most COLD_RUNTIME seconds, with no ramp.
    ``at_ramp_end(sid)``: for a time-based job with a ramp, called when the ramp is over
    with the session id of fio's processes (one per job), so that the caller can start
    its own counters where fio starts its figures.
    """
    size = bench.dataset.big_size
    runtime = min(bench.runtime, COLD_RUNTIME) if cold else bench.runtime
    ramp = bench.ramp if workload.time_based and not cold else 0
    env = {
        **os.environ,
        "FILE": str(path),
        "SIZE": str(size),
        "PART": str(size // 4),
        "RUNTIME": str(runtime),
        "RAMP": str(ramp),
        "DIRECT": "1" if workload.direct else "0",
        "LOOPS": str(-(-2 * GiB // size) if looped else 1),
    }
    cmd = ["fio", "--readonly", "--output-format=json", str(JOBS / workload.job)]
    # A sequential pass at 50 MiB/s or a hung mount must not stall the run forever.
    timeout = runtime + ramp + 60 + int(env["LOOPS"]) * size / (20 * MiB)
    # Its own session: the caller counts the CPU of all of fio's job processes by session id.
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            if at_ramp_end is not None and ramp > 0:
                try:
                    proc.wait(timeout=ramp)
                except subprocess.TimeoutExpired:
                    at_ramp_end(proc.pid)
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise RuntimeError(f"fio {workload.job} took more than {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"fio {workload.job} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    # fio may print notes before the JSON document.
    report = json.loads(stdout[stdout.index("{"):])
    job = report["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {workload.job}: error {job['error']}")
    read = job["read"]
    clat = read.get("clat_ns", {})
    pct = clat.get("percentile", {})
    out = {
        "bytes": read["io_bytes"],
        "seconds": read["runtime"] / 1000,
        "mib_s": read["bw_bytes"] / MiB,
        "iops": read["iops"],
        "clat_mean_us": clat.get("mean", 0) / 1000,
        "clat_p99_us": pct.get("99.000000", 0) / 1000,
    }
    if workload.time_based:
        out.update(runtime_s=runtime, ramp_s=ramp)
    out["value"] = out["mib_s"] if workload.unit == "MiB/s" else out["iops"]
    if out["bytes"] == 0:
        raise RuntimeError(f"fio {workload.job} read nothing")
    return out


# -- Python readers ---------------------------------------------------------------------


def _read_whole(path: Path, buf_size: int = MiB) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while chunk := os.read(fd, buf_size):
            n += len(chunk)
        return n
    finally:
        os.close(fd)


def read_small_files(root: Path, paths: list[str], threads: int) -> dict:
    """Open, read to EOF and close every file once, ``threads`` readers in parallel.

    Returns files/s as ``value``.
    """
    t0 = time.perf_counter()
    nbytes = read_files(root, paths, threads)
    seconds = time.perf_counter() - t0
    return {"value": len(paths) / seconds, "bytes": nbytes, "seconds": seconds, "files": len(paths),
            "mib_s": nbytes / MiB / seconds}


def time_to_first_byte(root: Path, paths: list[str]) -> dict:
    """For each file in turn: open, read 1 byte, close. The median in ms is ``value``.

    In reverse listing order: each open is then a lone one, which no directory
    read-ahead (cachefs's walks, cachefs/walk.py, go forward) has seen coming.
    """
    samples = []
    for path in reversed(paths):
        t0 = time.perf_counter()
        fd = os.open(root / path, os.O_RDONLY)
        try:
            if len(os.read(fd, 1)) != 1:
                raise RuntimeError(f"{path}: empty read")
            samples.append((time.perf_counter() - t0) * 1000)
        finally:
            os.close(fd)
    return {"value": statistics.median(samples), "bytes": len(samples), "max_ms": max(samples),
            "first_ms": samples[0], "samples_ms": [round(s, 3) for s in samples]}


def read_files(root: Path, paths: list[str], threads: int = 4) -> int:
    """Read every file to EOF, ``threads`` readers in parallel; returns the bytes read."""
    shares = [paths[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda share: sum(_read_whole(root / p) for p in share), shares))


def warm_up(root: Path, bench, small_files: bool) -> dict:
    """Untimed pass that reads everything once, and checks samples against the tmpfs copy.

    Fills the system's cache, and faults in the page-cache memory the timed passes
    use (first touch of a page is ~2x slower on this VM).

    Raises:
        RuntimeError: the system returned different bytes than were written.
    """
    t0 = time.perf_counter()
    nbytes = _read_whole(root / BIG)
    if small_files:
        nbytes += read_files(root, bench.dataset.small_paths + bench.dataset.ttfb_paths)
    seconds = time.perf_counter() - t0
    verify_samples(root, bench, small_files)
    return {"bytes": nbytes, "seconds": seconds, "mib_s": nbytes / MiB / seconds}


def verify_samples(root: Path, bench, small_files: bool, samples: int = 16) -> None:
    rng = random.Random(7)
    size = bench.dataset.big_size
    checks = [(BIG, rng.randrange(0, size - 4096), 4096) for _ in range(samples)]
    checks.append((BIG, size - 1000, 1000))
    if small_files:
        checks.append((bench.dataset.small_paths[-1], 0, bench.dataset.small_size))
        checks.append((bench.dataset.ttfb_paths[0], bench.dataset.ttfb_size - 5000, 5000))
    for path, offset, length in checks:
        with open(root / path, "rb") as got, open(bench.local_root / path, "rb") as want:
            got.seek(offset)
            want.seek(offset)
            if got.read(length) != want.read(length):
                raise RuntimeError(f"{path} bytes {offset}..{offset + length} differ from what was written")


