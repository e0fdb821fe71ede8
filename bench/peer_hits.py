"""Peer hits against local MEM hits, pinned, in one run; and one worker serving 1, 2 and 4 mounts.

    .venv/bin/python -m bench.peer_hits [--size 1G] [--repeat 2] [--runtime 3] [--mounts 1,2,4]
    .venv/bin/python -m bench.peer_hits --size 256M --repeat 1 --runtime 2    # smoke run, < 1 min

As root, on 2 cores. One file of --size random bytes in a local directory on
/dev/shm is the source (no S3 gateway: its CPU would hide the mount's). One
`cachefs worker` (--mem-size 2G, no SSD tier) pinned to core 1 (taskset -c 1)
holds every chunk in MEM after an untimed pass; mounts and fio run on core 0
(taskset -c 0). Two systems, measured interleaved in each repeat:

- **mem**: a mount without peers (--mem-size 2G, no SSD tier) that read the
  file once, untimed: every read is a local MEM hit;
- **peer**: a fresh mount with `--peers` to the worker (--mem-size 2G, no SSD
  tier), started before each cell over an empty MEM: every chunk is a peer hit
  the first time it is read.

Workloads: `seq-1m` (fio, one job, 1 MiB reads of the whole file, the page
cache dropped first) and `rand-4k-direct` (fio, 4 jobs, 4 KiB O_DIRECT random
reads for --runtime seconds). Each cell records MiB/s or IOPS, and CPU seconds
per GiB read of the mount and of the worker (utime + stime from /proc/PID/stat,
all threads), and where the mount says the bytes came from. Memory is
prefaulted before each cell (this VM charges ~5x for the first write to a page
it handed back to its host; see bench/README.md).

A/B: with --baseline-tree (a checkout of another cachefs revision, native
module built), a third system **peer-base** runs a worker and fresh peer mounts
from that tree (PYTHONPATH), measured interleaved with the other two in the
same run; its worker has its own port and is warmed the same way.

Scale: for K in --mounts, K fresh peer mounts (all on core 0) read the file at
once, one fio job each (seq 1 MiB, page cache dropped first): MiB/s in total and
the worker's CPU seconds per GiB served, which must not grow with K.

Writes bench/results/<UTC time>-<host>-peer-hits.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import host, report
from bench.host import GiB, MiB, log
from bench.systems import metric, spawn, wait_listening, wait_mounted, write_secret
from cachefs.status import scrape

RESULTS = host.REPO / "bench" / "results"
MOUNT_CORE, WORKER_CORE = "0", "1"
MEM_SIZE = "2G"
FILE = "big.bin"
WORKLOADS = ("seq-1m", "rand-4k-direct")
SYSTEMS = ("mem", "peer")
# Targets of issue 14 ("Peer hits"): peer / mem.
TARGET_SEQ = 0.7
TARGET_CPU = 1.75  # mount CPU per GiB, peer / mem: at most
TARGET_RAND = 0.8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = host.argument_parser("python -m bench.peer_hits", __doc__)
    p.add_argument("--size", default="1G", help="size of the file (default %(default)s)")
    p.add_argument("--repeat", type=int, default=2, help="repeats of every cell (default %(default)s)")
    p.add_argument("--runtime", type=int, default=3, help="seconds of each random cell (default %(default)s)")
    p.add_argument("--mounts", default="1,2,4", help="K: mounts one worker serves at once (default %(default)s)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="(default %(default)s)")
    p.add_argument("--baseline-tree", help="a checkout of another cachefs revision (native module built): adds "
                   "peer-base, a worker and peer mounts run from it, beside the others (an A/B run)")
    p.add_argument("--baseline-label", help="what the baseline tree is, for the report (default: its git HEAD)")
    p.add_argument("--peer-mem-size", default=MEM_SIZE,
                   help="--mem-size of the peer mounts (default %(default)s); below --size, MEM is full and "
                   "evicts during the cell, as in a mount's steady state")
    p.add_argument("--profile", help="a directory: py-spy (raw, 200 Hz, --nonblocking) records the mount and the "
                   "worker during each peer cell there, <system>-<workload>-<r>-mount.txt and -worker.txt")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="parent of the temporary work directory (default %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .json go (default %(default)s)")
    args = p.parse_args(argv)
    args.size = host.parse_size(args.size)
    args.mounts = [int(k) for k in args.mounts.split(",") if k]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.systems = SYSTEMS + (("peer-base",) if args.baseline_tree else ())
    if os.cpu_count() < 2:
        p.error("needs 2 cores: the worker on one, the mounts and fio on the other")
    return args


def pinned(core: str, cmd: list) -> list:
    return ["taskset", "-c", core, *cmd]


class Rig:
    """The source directory, the worker, and mounts started and stopped on demand."""

    def __init__(self, work: Path, shm: Path, stack: contextlib.ExitStack):
        self.work, self.stack = work, stack
        self.source = shm / "data"
        self.logs = work / "logs"
        self.logs.mkdir()
        self.secret_file = work / "secret"
        write_secret(self.secret_file)
        self.env = host.hermetic_env()
        self.n = 0
        self.workers: dict[str | None, tuple] = {}  # tree -> (process, address)
        self.peer_mem_size = MEM_SIZE

    def write_file(self, size: int) -> None:
        self.source.mkdir()
        with open(self.source / FILE, "wb") as f:
            left = size
            while left:
                n = min(left, 64 * MiB)
                f.write(os.urandom(n))
                left -= n

    def _env(self, tree: str | None) -> dict:
        return host.hermetic_env(None, {"PYTHONPATH": tree}) if tree else self.env

    def start_worker(self, tree: str | None = None) -> None:
        """A worker on core 1, run from `tree` (another checkout) or from this one."""
        port = host.free_port()
        addr = f"127.0.0.1:{port}"
        name = "worker-base" if tree else "worker"
        log_path = self.logs / f"{name}.log"
        proc = spawn(pinned(WORKER_CORE, [
            sys.executable, "-m", "cachefs", "worker", "--listen", addr,
            "--source", f"bench={self.source}", "--secret-file", self.secret_file,
            "--cache-dir", self.work / f"{name}-cache", "--mem-size", MEM_SIZE, "--cache-size", "0",
            "--metrics", f"127.0.0.1:{host.free_port()}"]), log_path, self._env(tree), self.work)
        self.stack.callback(host.stop_session, proc)
        wait_listening(proc, port, log_path)
        self.workers[tree] = proc, addr

    def mount(self, peers: bool, tree: str | None = None) -> dict:
        """A fresh mount on core 0, MEM only; with `peers`, on the ring of the worker
        run from the same `tree` (None: this checkout)."""
        self.n += 1
        name = f"{'peer' if peers else 'mem'}{'-base' if tree else ''}{self.n}"
        m = {"name": name, "mountpoint": self.work / "mnt" / name, "metrics": f"127.0.0.1:{host.free_port()}",
             "log": self.logs / f"{name}.log"}
        m["mountpoint"].mkdir(parents=True)
        m["worker"] = self.workers[tree][0] if peers else None
        mem_size = self.peer_mem_size if peers else MEM_SIZE
        extra = ["--peers", self.workers[tree][1], "--secret-file", self.secret_file] if peers else []
        m["proc"] = spawn(pinned(MOUNT_CORE, [
            sys.executable, "-m", "cachefs", "mount", self.source, m["mountpoint"],
            "--cache-dir", self.work / f"{name}-cache", "--mem-size", mem_size, "--cache-size", "0",
            "--metrics", m["metrics"], *extra]), m["log"], self._env(tree), self.work)
        self.stack.callback(self.unmount, m)
        wait_mounted(m["proc"], m["mountpoint"], name, m["log"], read_ahead_kb=4096)
        return m

    def unmount(self, m: dict) -> None:
        if m.get("proc") is not None:
            host.unmount(m["mountpoint"])
            host.stop_session(m["proc"])
            m["proc"] = None


def read_through(m: dict) -> None:
    with open(m["mountpoint"] / FILE, "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass


def fio(files: list[Path], workload: str, size: int, runtime: int) -> list[dict]:
    """fio on core 0: one job per file for seq-1m, 4 jobs on the one file for rand-4k-direct."""
    common = ["--ioengine=psync", "--invalidate=0", "--readonly", "--output-format=json"]
    if workload == "seq-1m":
        jobs = [a for i, f in enumerate(files)
                for a in (f"--name=m{i}", f"--filename={f}", "--rw=read", "--bs=1M", f"--size={size}")]
    else:
        jobs = ["--name=rand", f"--filename={files[0]}", "--rw=randread", "--bs=4k", "--direct=1",
                f"--size={size}", "--norandommap", "--time_based", f"--runtime={runtime}", "--numjobs=4",
                "--group_reporting"]
    res = subprocess.run(pinned(MOUNT_CORE, ["fio", *common, *jobs]), capture_output=True, text=True,
                         timeout=runtime + 120 + len(files) * size / (20 * MiB))
    if res.returncode != 0:
        raise RuntimeError(f"fio {workload} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    out = json.loads(res.stdout[res.stdout.index("{"):])
    return [{"bytes": j["read"]["io_bytes"], "seconds": j["read"]["runtime"] / 1000, "iops": j["read"]["iops"],
             "mib_s": j["read"]["bw_bytes"] / MiB} for j in out["jobs"]]


def sources(m: dict) -> dict[str, float]:
    """Bytes read by where they came from."""
    s = scrape(m["metrics"])
    return {src: metric(s, "cachefs_read_bytes_total", source=src) for src in ("mem", "peer", "backend")}


def measure(rig: Rig, mounts: list[dict], workload: str, args) -> dict:
    """One timed cell: prefault, drop the page cache, fio; CPU of the mounts and the worker."""
    # Twice what the cell receives: a fresh peer mount faults in every chunk it gets, and on this VM
    # a page handed back to the host costs ~5x on its first write (a cell after a big unmount collapsed).
    host.prefault_memory(2 * args.size * len(mounts) / GiB)
    host.drop_page_cache()
    before = [sources(m) for m in mounts]
    worker = mounts[0]["worker"] or rig.workers[None][0]  # a mem cell: this tree's worker (idle)
    cpu0 = [host.cpu_seconds(m["proc"].pid) for m in mounts], host.cpu_seconds(worker.pid)
    spies = []
    if args.profile and mounts[0]["worker"] is not None and len(mounts) == 1:
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        for role, pid in (("mount", mounts[0]["proc"].pid), ("worker", worker.pid)):
            spies.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-r", "200", "-f", "raw",
                 "--nonblocking", "-o", str(out / f"{mounts[0]['name']}-{workload}-{role}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)  # py-spy attaches
    try:
        jobs = fio([m["mountpoint"] / FILE for m in mounts], workload, args.size, args.runtime)
    finally:
        for spy in spies:
            spy.send_signal(2)
        for spy in spies:
            spy.wait(timeout=30)
    cpu1 = [host.cpu_seconds(m["proc"].pid) for m in mounts], host.cpu_seconds(worker.pid)
    after = [sources(m) for m in mounts]
    total = sum(j["bytes"] for j in jobs)
    seconds = max(j["seconds"] for j in jobs)
    mount_cpu = sum(b - a for a, b in zip(cpu0[0], cpu1[0]))
    by_source = {src: sum(a[src] - b[src] for a, b in zip(after, before)) for src in ("mem", "peer", "backend")}
    return {"bytes": total, "seconds": seconds, "mib_s": total / MiB / seconds,
            "iops": sum(j["iops"] for j in jobs), "mount_cpu_s": mount_cpu, "worker_cpu_s": cpu1[1] - cpu0[1],
            "mount_cpu_s_per_gib": mount_cpu / (total / GiB), "worker_cpu_s_per_gib": (cpu1[1] - cpu0[1]) / (total / GiB),
            "bytes_by_source": by_source}


def run(args: argparse.Namespace, data: dict, work: Path, shm: Path, stack: contextlib.ExitStack) -> None:
    data["machine"] = m = host.machine(work)
    m["loadavg_at_start"] = os.getloadavg()
    m["cachefs_digest"] = host.cachefs_digest()
    rig = Rig(work, shm, stack)
    rig.peer_mem_size = args.peer_mem_size
    log(f"peer-hits: writing {args.size / MiB:.0f} MiB to {rig.source}")
    rig.write_file(args.size)
    trees = {"peer": None, "peer-base": args.baseline_tree}
    for system in args.systems[1:]:
        rig.start_worker(trees[system])
    mem = rig.mount(peers=False)
    read_through(mem)  # every chunk in the mem mount's MEM
    for system in args.systems[1:]:
        warm = rig.mount(peers=True, tree=trees[system])
        read_through(warm)  # every chunk in the worker's MEM
        rig.unmount(warm)
    for r in range(args.repeat):
        for workload in args.workloads:
            order = args.systems if r % 2 == 0 else args.systems[::-1]
            for system in order:
                target = mem if system == "mem" else rig.mount(peers=True, tree=trees[system])
                try:
                    cell = measure(rig, [target], workload, args)
                finally:
                    if system != "mem":
                        rig.unmount(target)
                cell.update(system=system, workload=workload, repeat=r)
                data["cells"].append(cell)
                log(f"  {workload:15s} {system:4s}: {cell['mib_s']:7.0f} MiB/s {cell['iops']:8.0f} IOPS, "
                    f"mount {cell['mount_cpu_s_per_gib']:.2f} s/GiB, worker {cell['worker_cpu_s_per_gib']:.2f} s/GiB, "
                    f"from {', '.join(f'{k} {v / MiB:.0f}M' for k, v in cell['bytes_by_source'].items() if v)}")
    rig.unmount(mem)
    for r in range(args.repeat):
        for k in args.mounts:
            mounts = [rig.mount(peers=True) for _ in range(k)]
            try:
                cell = measure(rig, mounts, "seq-1m", args)
            finally:
                for mt in mounts:
                    rig.unmount(mt)
            cell.update(mounts=k, repeat=r)
            data["scale"].append(cell)
            log(f"  scale K={k}: {cell['mib_s']:7.0f} MiB/s total, worker {cell['worker_cpu_s_per_gib']:.2f} s/GiB, "
                f"mounts {cell['mount_cpu_s_per_gib']:.2f} s/GiB")
    if host.cachefs_digest() != m["cachefs_digest"]:
        data["cachefs_digest_end"] = host.cachefs_digest()


def _median(cells: list[dict], field: str, **match) -> float | None:
    values = [c[field] for c in cells if all(c.get(k) == v for k, v in match.items())]
    return statistics.median(values) if values else None


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def render(data: dict) -> str:
    cells, scale = data["cells"], data["scale"]
    lines = [
        f"# cachefs peer hits vs local MEM hits, pinned ({data['started']} on {data['machine']['hostname']})",
        "",
        f"One {data['size'] / MiB:,.0f} MiB file on /dev/shm as a local source. Worker (`cachefs worker`, "
        f"--mem-size {MEM_SIZE}, no SSD) on core {WORKER_CORE}, warm; mounts (--mem-size {MEM_SIZE}, peer mounts "
        f"{data.get('peer_mem_size', MEM_SIZE)}, no SSD) and "
        f"fio on core {MOUNT_CORE}. **mem**: a mount without peers that read the file once. **peer**: a fresh "
        f"mount per cell with `--peers` to the worker. seq-1m: one fio job, 1 MiB reads of the whole file, "
        f"page cache dropped first. rand-4k-direct: 4 fio jobs, 4 KiB O_DIRECT random reads for "
        f"{data['runtime']} s. CPU: utime+stime per GiB read, from /proc. Medians of {data['repeat']}.",
        "",
        *report.experiment_lines(data),
        *([f"- **A/B**: peer-base runs its worker and mounts from cachefs {data['baseline_git']} "
           f"({data['baseline_tree']}), interleaved with the others in the same run"] if data.get("baseline_tree") else []),
        "",
        "| workload | system | MiB/s | IOPS | mount CPU s/GiB | worker CPU s/GiB | bytes from peer |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in data["workloads"]:
        for s in data.get("systems", SYSTEMS):
            sel = [c for c in cells if c["workload"] == w and c["system"] == s]
            if not sel:
                continue
            peer_share = statistics.median(c["bytes_by_source"]["peer"] / c["bytes"] for c in sel)
            lines.append(
                f"| {w} | {s} | {_fmt(_median(sel, 'mib_s'), ',.0f')} | {_fmt(_median(sel, 'iops'), ',.0f')} "
                f"| {_fmt(_median(sel, 'mount_cpu_s_per_gib'), '.2f')} "
                f"| {_fmt(_median(sel, 'worker_cpu_s_per_gib'), '.2f')} | {peer_share:.0%} |")

    def ratio(w: str, field: str) -> float | None:
        p, m = _median(cells, field, workload=w, system="peer"), _median(cells, field, workload=w, system="mem")
        return p / m if p is not None and m else None

    def verdict(r: float | None, target: float, at_most: bool = False) -> str:
        if r is None:
            return "—"
        ok = r <= target if at_most else r >= target
        return f"{r:.2f}× ({'met' if ok else 'missed'}; target {'≤' if at_most else '≥'} {target}×)"

    lines += [
        "",
        "Targets (issue 14, peer / mem, same run):",
        "",
        f"- seq 1M MiB/s: {verdict(ratio('seq-1m', 'mib_s'), TARGET_SEQ)}",
        f"- seq 1M mount CPU per GiB: {verdict(ratio('seq-1m', 'mount_cpu_s_per_gib'), TARGET_CPU, at_most=True)}",
        f"- rand 4k direct IOPS: {verdict(ratio('rand-4k-direct', 'iops'), TARGET_RAND)}",
    ]
    if "peer-base" in data.get("systems", ()):
        def ab(w: str, field: str) -> str:
            p, b = _median(cells, field, workload=w, system="peer"), _median(cells, field, workload=w, system="peer-base")
            return f"{p / b:.2f}×" if p is not None and b else "—"

        lines += ["", f"A/B, peer ÷ peer-base ({data['baseline_git']}), same run:", "",
                  "| workload | MiB/s | mount CPU s/GiB | worker CPU s/GiB |", "|---|---:|---:|---:|"]
        for w in data["workloads"]:
            lines.append(f"| {w} | {ab(w, 'mib_s')} | {ab(w, 'mount_cpu_s_per_gib')} | {ab(w, 'worker_cpu_s_per_gib')} |")
    if scale:
        lines += ["", "One worker serving K fresh peer mounts at once (seq 1M, one fio job per mount, all on core "
                  f"{MOUNT_CORE}; medians):", "",
                  "| K mounts | MiB/s total | worker CPU s/GiB | mounts CPU s/GiB |", "|---:|---:|---:|---:|"]
        for k in data["mounts"]:
            lines.append(f"| {k} | {_fmt(_median(scale, 'mib_s', mounts=k), ',.0f')} "
                         f"| {_fmt(_median(scale, 'worker_cpu_s_per_gib', mounts=k), '.2f')} "
                         f"| {_fmt(_median(scale, 'mount_cpu_s_per_gib', mounts=k), '.2f')} |")
    lines += report.error_lines(data["errors"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = {"peer_mem_size": args.peer_mem_size, "size": args.size, "repeat": args.repeat, "runtime": args.runtime, "mounts": args.mounts,
            "workloads": args.workloads, "systems": list(args.systems), "baseline_tree": args.baseline_tree,
            "baseline_git": args.baseline_label or (host.git_head(args.baseline_tree) if args.baseline_tree else None),
            "cells": [], "scale": []}
    return host.exit_code(host.run_experiment("peer-hits", args, data, run, render,
                                              lambda d: bool(d["cells"] or d["scale"])))


if __name__ == "__main__":
    sys.exit(main())
