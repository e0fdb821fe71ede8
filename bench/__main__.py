"""cachefs side by side with JuiceFS, rclone, a minimal pyfuse3 filesystem and tmpfs.

    .venv/bin/python -m bench [--quick] [--repeat N] [--systems a,b] [--workloads a,b] [--size 1G]

(or `bash scripts/bench.sh ...`, which sets up the machine first). As root: it
starts a JuiceFS volume served over S3 by `juicefs gateway` on 127.0.0.1,
writes the dataset through it, mounts each system in turn, runs the workloads
in each cache state, and writes bench/results/<UTC time>-<host>.md and .json.
Whatever it started is unmounted and stopped on the way out, also after a
failure or Ctrl-C.

Cache states:
    cold          the system's cache wiped, a fresh mount, the page cache dropped
                  (one mount per workload)
    warm          after an untimed pass over the dataset; the page cache is kept,
                  as an application sees a re-read
    warm-dropped  as warm, but `sync; echo 3 > /proc/sys/vm/drop_caches` before each
                  workload: the hit is served by the daemon itself
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import host, report
from bench.dataset import Dataset, raw_s3_read
from bench.host import GiB, MiB, log
from bench.systems import ALL_STATES, COLD, DEFAULT_SYSTEMS, DROPPED, SYSTEMS, WARM, System
from bench.workloads import BY_KEY, QUICK_SKIPS, WORKLOADS, Workload, read_files, warm_up

RESULTS = host.REPO / "bench" / "results"
WATCHDOG = 600.0  # seconds one measurement may take before its daemon is killed


@dataclasses.dataclass
class Bench:
    """What systems and workloads share during one run."""

    work: Path  # on disk: the volume, SSD caches, mount points, logs
    shm: Path  # on tmpfs: the dataset copy, JuiceFS's MEM cache
    dataset: Dataset
    runtime: float  # seconds per time-based fio job, timed
    repeat: int
    ramp: float = 0.0  # seconds before that, not timed
    random_repeat: int = 1  # repeats of warm time-based cells (each already runs ramp + runtime s)
    prefault: bool = True
    skip: frozenset = frozenset()  # (state, workload key) cells not to run
    juicefs_backend: object = None
    s3: object = None  # JuicefsS3, once started

    @property
    def local_root(self) -> Path:
        return self.shm / "data"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = host.argument_parser("python -m bench", __doc__)
    p.add_argument("--quick", action="store_true",
                   help="smoke run in under 3 minutes: 256M, 500 small files, 1 repeat, 1 s random jobs, "
                        "fewer cells (every system, state and workload still runs)")
    p.add_argument("--repeat", type=int, help="repeats per cell; the table shows medians (default 3; quick 1)")
    p.add_argument("--size", help="size of the big file (default 1G; quick 256M)")
    p.add_argument("--small-files", type=int, help="number of 64 KiB files (default 2000; quick 500)")
    p.add_argument("--runtime", type=float,
                   help="seconds each random-read job is timed, after its ramp (default 20; quick 1)")
    p.add_argument("--ramp", type=float,
                   help="seconds each random-read job runs before it is timed (fio ramp_time; default 5; quick 0)")
    p.add_argument("--random-repeat", type=int,
                   help="repeats of warm random-read cells, at most --repeat (default 1: one 20 s steady-state "
                        "run each keeps the full run under ~40 min; cold ones, 3 s long, repeat --repeat times)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, from {', '.join(SYSTEMS)} (default %(default)s)")
    p.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS),
                   help="comma-separated (default %(default)s)")
    p.add_argument("--states", default=",".join(ALL_STATES), help="comma-separated (default %(default)s)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="parent of the temporary work directory; must be on the disk the SSD tiers "
                        "should use (default %(default)s)")
    p.add_argument("--prefault", action=argparse.BooleanOptionalAction,
                   help="touch fresh memory before each timed workload that fills the page cache "
                        "(see bench/README.md; default on, quick off)")
    p.add_argument("--keep-workdir", action="store_true", help="leave the work directory (volume, caches, logs)")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .json go (default %(default)s)")
    args = p.parse_args(argv)

    def pick(text: str, known, what: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
        return names

    args.systems = pick(args.systems, SYSTEMS, "systems")
    args.workloads = pick(args.workloads, BY_KEY, "workloads")
    args.states = pick(args.states, ALL_STATES, "states")
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.size = host.parse_size(args.size or ("256M" if args.quick else "1G"))
    args.small_files = args.small_files if args.small_files is not None else (500 if args.quick else 2000)
    args.runtime = args.runtime or (1.0 if args.quick else 20.0)
    args.ramp = args.ramp if args.ramp is not None else (0.0 if args.quick else 5.0)
    args.random_repeat = min(args.repeat, args.random_repeat or 1)
    args.prefault = (not args.quick) if args.prefault is None else args.prefault
    if args.repeat < 1 or args.random_repeat < 1 or args.size < 16 * MiB or args.runtime <= 0 or args.ramp < 0:
        p.error("--repeat and --random-repeat must be >= 1, --size >= 16M, --runtime > 0 and --ramp >= 0")
    return args


# -- one measurement -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Counters:
    """CPU seconds and the clock at one moment of a cell."""

    time: float
    daemon: float  # the daemon's processes
    own: float  # this process, its reaped children, and fio's live processes
    busy: float  # the whole machine
    steal: float

    @classmethod
    def now(cls, pid: int | None, fio_sid: int | None = None) -> "Counters":
        busy, steal = host.busy_cpu_seconds()
        # fio still runs at the end of a ramp; once reaped its CPU is in own_cpu_seconds().
        fio = host.cpu_seconds(fio_sid) if fio_sid else 0.0
        return cls(time=time.monotonic(), daemon=host.cpu_seconds(pid) if pid else 0.0,
                   own=host.own_cpu_seconds() + fio, busy=busy, steal=steal)


class Recorder:
    """Runs workloads with the daemon's CPU, peak RSS and backend counters around them."""

    def __init__(self, bench: Bench, data: dict):
        self.bench = bench
        self.data = data

    def measure(self, system: System, workload: Workload, state: str, repeat: int) -> dict:
        system.before_cell(state)  # cachefs-peer: a fresh mount, so the worker serves the cell
        if state == WARM:
            # "Warm" means the page cache holds the files. This VM pages out file pages
            # that sat idle for a few seconds (a DAMON pageout scheme), so read them
            # again, untimed, right before: the cell then times an application's re-read.
            read_files(system.root, workload.files(self.bench.dataset))
        else:
            host.drop_page_cache()
            if self.bench.prefault:
                # This VM hands freed memory back to its host within seconds, and the
                # next first touch of a page costs ~5x: touch what the workload is
                # about to fill (page cache, and in a cold run the system's cache too)
                # so that no system pays for it inside the timed part.
                need = workload.page_cache_bytes(self.bench.dataset) * (2 if state == COLD else 1)
                host.prefault_memory((need + 64 * MiB) / GiB)
        pid = system.pid
        before = system.backend_counters()
        if pid:
            host.reset_peak_rss(pid)
        # The counters start where fio's figures do: after the ramp of a time-based job.
        start = Counters.now(pid)

        def ramp_over(fio_sid: int) -> None:
            nonlocal start
            start = Counters.now(pid, fio_sid)

        # A hung daemon would block a read forever: kill it, and the read fails with ENOTCONN.
        watchdog = threading.Timer(WATCHDOG, lambda: system.proc and host.stop_session(system.proc, 2))
        watchdog.start()
        try:
            result = workload.run(system.root, self.bench, state, at_ramp_end=ramp_over)
        finally:
            watchdog.cancel()
        end = Counters.now(pid)
        wall = end.time - start.time
        daemon = end.daemon - start.daemon
        rec = {"system": system.key, "state": state, "workload": workload.key, "repeat": repeat,
               "unit": workload.unit, **result, "wall_s": wall,
               # Cores busy with anything but this reader and this daemon: other work on
               # the machine (and kernel threads); steal: time the hypervisor took.
               "other_cpu_cores": max(0.0, (end.busy - start.busy) - (end.own - start.own) - daemon) / wall,
               "steal_cores": (end.steal - start.steal) / wall}
        if pid:
            cpu = daemon
            rec["daemon_cpu_s"] = cpu
            rec["daemon_cpu_cores"] = cpu / wall
            rec["peak_rss_bytes"] = host.peak_rss_bytes(pid)
            if workload.unit != "ms" and result["bytes"]:
                rec["cpu_s_per_gib"] = cpu / (result["bytes"] / GiB)
        after = system.backend_counters()
        rec.update({f"delta_{k}": after.get(k, 0) - v for k, v in before.items()})
        self.data["runs"].append(rec)
        extra = ""
        if "cpu_s_per_gib" in rec:
            extra += f"  cpu {rec['cpu_s_per_gib']:.2f} s/GiB, {rec['daemon_cpu_cores']:.2f} cores"
        if "peak_rss_bytes" in rec:
            extra += f"  rss {rec['peak_rss_bytes'] / MiB:.0f} MiB"
        if "delta_gets" in rec:
            extra += f"  {rec['delta_gets']:.0f} GETs"
        if "delta_worker_gets" in rec:
            extra += f" (worker {rec['delta_worker_gets']:.0f}, {rec['delta_worker_served_bytes'] / MiB:.0f} MiB served by it)"
        if rec["other_cpu_cores"] >= 0.2:
            extra += f"  (other work: {rec['other_cpu_cores']:.1f} cores)"
        log(f"  {system.key:<14} {state:<12} {workload.key:<17} #{repeat + 1}  "
            f"{result['value']:>10.1f} {workload.unit}{extra}")
        return rec

    def error(self, system: System, workload: Workload | None, state: str, exc: BaseException) -> None:
        what = workload.key if workload else "setup"
        self.data["errors"].append({"system": system.key, "state": state, "workload": what,
                                    "error": f"{type(exc).__name__}: {exc}"[:2000]})
        log(f"  {system.key:<14} {state:<12} {what:<17} FAILED: {type(exc).__name__}: {str(exc)[:300]}")


# -- the schedule ------------------------------------------------------------------------------


def applies(system: System, workload: Workload, state: str, bench: Bench, repeat: int = 0) -> bool:
    return (state in system.states and state in workload.states and (state, workload.key) not in bench.skip
            and (system.has_small_files or not workload.needs_small_files)
            and (repeat < bench.random_repeat or not workload.time_based or state == COLD))


def run_schedule(bench: Bench, rec: Recorder, systems: list[System], workloads: list[Workload],
                 states: list[str]) -> None:
    """Every cell, interleaved: for each repeat and workload, every system in turn.

    Other work on the machine then falls on all systems alike instead of on whichever
    system happened to be measured at the time. Warm states keep every system mounted
    at once (their mount points, caches and processes are independent).
    """
    live = []
    for system in systems:
        if system.skip_reason:
            log(f"{system.label}: skipped ({system.skip_reason})")
        else:
            live.append(system)
    broken: set[str] = set()

    def cell(system: System, workload: Workload, state: str, repeat: int) -> None:
        try:
            rec.measure(system, workload, state, repeat)
        except Exception as exc:  # noqa: BLE001 - recorded; the other cells still run
            rec.error(system, workload, state, exc)
            if system.proc is not None and system.proc.poll() is not None:
                broken.add(system.key)
                rec.error(system, None, state, RuntimeError(
                    f"{system.key} daemon exited ({system.proc.returncode}); its remaining cells are skipped; "
                    f"log {system.log_path}:\n{host.tail(system.log_path)}"))

    if COLD in states:
        log("cold: for each workload, every system with its cache wiped, a fresh mount, the page cache dropped")
        for r in range(bench.repeat):
            for w in workloads:
                for system in live:
                    if system.key in broken or not applies(system, w, COLD, bench, r):
                        continue
                    try:
                        with system.mounted(fresh=True):
                            rec.data["systems"][system.key].setdefault("read_ahead_kb", system.read_ahead_kb())
                            cell(system, w, COLD, r)
                    except Exception as exc:  # noqa: BLE001 - a mount that fails once fails again
                        rec.error(system, w, COLD, exc)
                        broken.add(system.key)

    warm_states = [s for s in (WARM, DROPPED) if s in states]
    ready = []
    for system in live:
        if system.key in broken or not any(s in system.states for s in warm_states):
            continue
        try:
            prepare_warm(system, bench, rec.data["systems"][system.key])
            ready.append(system)
        except Exception as exc:  # noqa: BLE001
            rec.error(system, None, "warm-up", exc)
            system.unmount()
    try:
        for state in warm_states:
            log(f"{state}: for each workload, every system in turn"
                + (" (page cache dropped before each)" if state == DROPPED else " (page cache kept)"))
            for r in range(bench.repeat):
                for w in workloads:
                    for system in ready:
                        if system.key not in broken and applies(system, w, state, bench, r):
                            cell(system, w, state, r)  # drops the page cache first unless WARM
    finally:
        for system in ready:
            system.unmount()


def prepare_warm(system: System, bench: Bench, info: dict) -> None:
    """Mount ``system`` and read the whole dataset once (untimed), so its cache holds it.

    Systems with ``remount_after_warm_up`` are then mounted afresh over the cache the
    pass left behind, and read once more (untimed: it faults in the memory the timed
    passes use).
    """
    system.mount()
    info["read_ahead_kb"] = system.read_ahead_kb()
    passes = [warm_up(system.root, bench, system.has_small_files)]
    system.settle()
    if system.remount_after_warm_up:
        system.unmount()
        system.mount()
        passes.append(warm_up(system.root, bench, system.has_small_files))
    info["warm_up"] = passes
    log(f"{system.label}: mounted and warmed up, " + ", ".join(f"{p['mib_s']:.0f} MiB/s" for p in passes)
        + " (untimed; also checks samples against what was written)")


# -- the run ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host.require_root()
    host.unwind_on_signals()
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    data = {
        "started": started.isoformat(timespec="seconds"),
        "args": dict(vars(args)),
        "workloads": {w.key: {"label": w.label, "unit": w.unit, "states": list(w.states)}
                      for w in WORKLOADS if w.key in args.workloads},
        "systems": {}, "runs": [], "errors": [], "raw_s3": {},
    }
    finished = False
    try:
        with host.scratch_dirs(args.workdir, "cachefs-bench.", args.keep_workdir,
                               lambda: Path(args.results) / "tmp" / f"{stamp}-logs" if data["errors"] else None
                               ) as (work, shm, stack):
            run(args, data, work, shm, stack)
        finished = True
    except KeyboardInterrupt:
        log("interrupted; everything started has been unmounted and stopped")
        return 130
    finally:
        data["duration_s"] = time.monotonic() - t0
        if data["runs"]:
            # An unfinished run goes to results/tmp (ignored by git), never for a "latest results" link.
            directory = Path(args.results) / ("tmp" if not finished else "")
            paths = report.write(data, directory, f"{stamp}-{data['machine']['hostname']}", partial=not finished)
            print()
            print(paths["markdown"].read_text())
            log(f"wrote {paths['markdown']} and {paths['json']}")
    return 0 if data["runs"] else 1


def run(args: argparse.Namespace, data: dict, work: Path, shm: Path, stack: contextlib.ExitStack) -> None:
    """Backend, dataset, raw S3, then every system in turn; ``stack`` tears down what is started."""
    bench = Bench(
        work=work, shm=shm,
        dataset=Dataset(args.size, args.small_files, ttfb_count=8 if args.quick else 20),
        runtime=args.runtime, repeat=args.repeat, ramp=args.ramp, random_repeat=args.random_repeat,
        prefault=args.prefault,
        skip=QUICK_SKIPS if args.quick else frozenset(),
        juicefs_backend=host.juicefs_backend(),
    )
    data["machine"] = m = host.machine(work)
    m["cachefs_digest"] = host.cachefs_digest()
    m["loadavg_at_start"] = os.getloadavg()
    data.update(dataset={**dataclasses.asdict(bench.dataset), "total_bytes": bench.dataset.total_bytes},
                runtime_s=bench.runtime, ramp_s=bench.ramp, repeat=bench.repeat, random_repeat=bench.random_repeat,
                prefault=bench.prefault)
    log(f"bench: {m['hostname']}, {m['cores']} cores, {m['memory_bytes'] / GiB:.1f} GiB, kernel {m['kernel']}, "
        f"{m['cachefs']}; work dir {work}")

    gateway = bench.juicefs_backend.JuicefsS3(work / "backend")
    stack.callback(gateway.stop)
    gateway.start()
    bench.s3 = gateway
    log(f"S3 gateway {gateway.endpoint_url} (juicefs gateway, ETags on)")
    systems = [SYSTEMS[key](bench) for key in args.systems]
    for system in systems:
        stack.callback(system.unmount)  # idempotent: a safety net under each system's own teardown
        data["systems"][system.key] = {"label": system.label, "states": list(system.states),
                                       "skip_reason": system.skip_reason, "note": system.note,
                                       **system.details()}

    log(f"writing the dataset: {bench.dataset.big_size / MiB:.0f} MiB big.bin, "
        f"{bench.dataset.small_count} x 64 KiB, {bench.dataset.ttfb_count} x 8 MiB")
    data["dataset"]["write_seconds"] = bench.dataset.write(gateway, bench.local_root)

    runs = []
    for _ in range(bench.repeat):
        host.drop_page_cache()
        runs.append(raw_s3_read(gateway, bench.dataset.big_size))
    data["raw_s3"] = {"streams": 8, "range_bytes": 4 * MiB, "runs": runs,
                      "mib_s": statistics.median(r["mib_s"] for r in runs)}
    log(f"raw S3: ranged 4 MiB GETs, 8 streams (s3fs, page cache dropped): {data['raw_s3']['mib_s']:.0f} MiB/s")

    workloads = [w for w in WORKLOADS if w.key in args.workloads]
    for system in systems:
        if system.runs_cachefs:
            data["systems"][system.key]["cachefs_digest"] = host.cachefs_digest()
    run_schedule(bench, Recorder(bench, data), systems, workloads, args.states)
    for system in systems:
        if system.runs_cachefs and host.cachefs_digest() != data["systems"][system.key]["cachefs_digest"]:
            data["systems"][system.key]["cachefs_digest_end"] = host.cachefs_digest()


if __name__ == "__main__":
    sys.exit(main())
