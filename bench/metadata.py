"""Bounded metadata: walk a dataset of many small files, then let the kernel forget it.

    .venv/bin/python -m bench.metadata [--files 200000] [--dirs 2000] [--mem-size 512M]

As root. Writes --files small files into --dirs directories of a local directory
(the source; on /dev/shm, where 200,000 files take seconds instead of minutes
on a virtual disk, unless --dataset-on-disk), mounts it with `cachefs mount` (--cache-size 0, --mem-size as
given, --meta-cache-entries as given or cachefs's default), and runs
`find MNT -type f -print0 | xargs -0 stat > /dev/null` over all of it, sampling
the daemon's resident set meanwhile (VmHWM, reset before the walk, is the
peak). Then `echo 2 > /proc/sys/vm/drop_caches` (dentries and inodes): the
kernel sends FORGETs, and the daemon should let go of the inodes.

Targets (issue "bounded metadata"): peak RSS during the walk <= --mem-size +
250 MiB; after the drop, `cachefs_inodes` below 5 % of its peak.

Also measures, in this process with tracemalloc, what one inode of the table and
one entry of the metadata cache cost, for the memory formula in
docs/configuration.md.

Writes bench/results/<UTC time>-<host>-metadata.md and .json. The mount is
unmounted and stopped and the dataset removed on the way out, also after a
failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import trio

from bench import host, report
from bench.host import MiB, log
from bench.systems import metric, spawn, wait_mounted
from cachefs.backend import Backend, LocalStore
from cachefs.config import DEFAULT_META_CACHE_ENTRIES
from cachefs.inodes import InodeTable
from cachefs.namespace import Namespace
from cachefs.status import scrape

RESULTS = host.REPO / "bench" / "results"
RSS_HEADROOM = 250 * MiB  # target: peak RSS <= --mem-size + this
INODES_LEFT = 0.05  # target: after the drop, fewer than this share of the peak inodes
SETTLE_S = 3.0  # the inode count is final once unchanged for this long after the drop
SETTLE_TIMEOUT_S = 120.0
SAMPLE_S = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = host.argument_parser("python -m bench.metadata", __doc__)
    p.add_argument("--files", type=int, default=200_000, help="files in the dataset (default %(default)s)")
    p.add_argument("--dirs", type=int, default=2_000, help="directories they are spread over (default %(default)s)")
    p.add_argument("--mem-size", default="512M", help="the mount's --mem-size (default %(default)s)")
    p.add_argument("--meta-cache-entries", type=int, default=DEFAULT_META_CACHE_ENTRIES,
                   help="the mount's --meta-cache-entries (default: cachefs's, %(default)s)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="parent of the temporary work directory (default %(default)s)")
    p.add_argument("--dataset-on-disk", action="store_true",
                   help="write the dataset in the work directory, not on /dev/shm")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .json go (default %(default)s)")
    args = p.parse_args(argv)
    if args.files < 1 or not 1 <= args.dirs <= args.files:
        p.error("--files must be >= 1 and --dirs in 1..--files")
    args.mem_size_bytes = host.parse_size(args.mem_size)
    return args


# -- the dataset ---------------------------------------------------------------------


def file_path(i: int, dirs: int) -> str:
    return f"d{i % dirs:05d}/f{i:07d}"


def write_dataset(root: Path, files: int, dirs: int) -> None:
    """``files`` files of 1-64 bytes, round-robin over ``dirs`` directories: plain syscalls, no buffering."""
    for d in range(dirs):
        os.mkdir(root / f"d{d:05d}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(files):
        fd = os.open(root / file_path(i, dirs), flags, 0o644)
        try:
            os.write(fd, b"x" * (1 + i % 64))
        finally:
            os.close(fd)


# -- per-entry costs, in this process -------------------------------------------------


def _traced(build) -> tuple[int, object]:
    """Bytes ``build()``'s result holds according to tracemalloc, and the result."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def entry_costs(root: Path, files: int, dirs: int) -> dict:
    """Bytes per inode of an InodeTable holding every path, and per entry of a
    Namespace cache holding every listing (as the mount builds them, from a LocalStore)."""

    def inode_table() -> InodeTable:
        table = InodeTable()
        for d in range(dirs):
            table.lookup(f"d{d:05d}")
        for i in range(files):
            table.lookup(file_path(i, dirs))
        return table

    inode_bytes, table = _traced(inode_table)
    inodes = len(table) - 1
    del table

    async def listings() -> Namespace:
        ns = Namespace(Backend(LocalStore(str(root)), concurrency=4, timeout=60.0, retries=0),
                       attr_ttl=3600.0, dir_ttl=3600.0, max_entries=files + 2 * dirs)
        for d in range(dirs):
            await ns.list_dir(f"d{d:05d}")
        return ns

    meta_bytes, ns = _traced(lambda: trio.run(listings))
    entries = ns._cache.entries
    return {"inodes": inodes, "inode_bytes": inode_bytes, "bytes_per_inode": inode_bytes / inodes,
            "meta_entries": entries, "meta_bytes": meta_bytes, "bytes_per_meta_entry": meta_bytes / entries}


# -- the mount ------------------------------------------------------------------------


def _vm_rss(pid: int) -> int:
    return host._status_kib(pid, "VmRSS") * 1024


class Sampler(threading.Thread):
    """The daemon's RSS every SAMPLE_S seconds, and its inode gauge every few samples."""

    def __init__(self, pid: int, metrics_addr: str):
        super().__init__(daemon=True)
        self.pid = pid
        self.metrics_addr = metrics_addr
        self.samples: list[dict] = []
        self._done = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        n = 0
        while not self._done.wait(SAMPLE_S):
            sample = {"t": time.monotonic() - self.t0, "rss": _vm_rss(self.pid)}
            if n % 4 == 0:
                try:
                    sample["inodes"] = metric(scrape(self.metrics_addr), "cachefs_inodes")
                except Exception:  # noqa: BLE001 - a missed sample is fine
                    pass
            self.samples.append(sample)
            n += 1

    def stop(self) -> list[dict]:
        self._done.set()
        self.join()
        return self.samples


def inodes_after_drop(metrics_addr: str) -> tuple[float, float]:
    """`echo 2 > drop_caches`, then the inode gauge once it stopped changing, and the seconds that took."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    t0 = time.monotonic()
    last, since = None, time.monotonic()
    while time.monotonic() - t0 < SETTLE_TIMEOUT_S:
        now = metric(scrape(metrics_addr), "cachefs_inodes")
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE_S:
            break
        time.sleep(0.25)
    return last, since - t0


def walk_and_drop(proc: subprocess.Popen, mnt: Path, metrics_addr: str, n: int) -> dict:
    """One `find | xargs stat` over the mount with the daemon's RSS sampled, then a drop of the dentries."""
    out: dict = {}
    host.reset_peak_rss(proc.pid)
    sampler = Sampler(proc.pid, metrics_addr)
    sampler.start()
    before = scrape(metrics_addr)
    t = time.monotonic()
    walk = subprocess.run(["bash", "-o", "pipefail", "-c", 'find "$1" -type f -print0 | xargs -0 stat > /dev/null',
                           "walk", str(mnt)], capture_output=True, text=True)
    out["walk_s"] = time.monotonic() - t
    after = scrape(metrics_addr)
    out["samples"] = sampler.stop()
    if walk.returncode != 0:
        raise RuntimeError(f"find | xargs stat failed ({walk.returncode}): {walk.stderr[-500:]}")
    out["rss_peak"] = host.peak_rss_bytes(proc.pid)
    out["inodes_after_walk"] = metric(after, "cachefs_inodes")
    out["inodes_peak"] = max([out["inodes_after_walk"], *(s.get("inodes", 0) for s in out["samples"])])
    out["meta_entries_after_walk"] = metric(after, "cachefs_meta_cache_entries")
    out["backend_requests"] = {op: metric(after, "cachefs_backend_requests_total", op=op)
                               - metric(before, "cachefs_backend_requests_total", op=op) for op in ("stat", "list")}
    log(f"  walk {n}: {out['walk_s']:.0f} s, peak RSS {out['rss_peak'] / MiB:.0f} MiB, "
        f"{out['inodes_peak']:,.0f} inodes, {out['meta_entries_after_walk']:,.0f} metadata cache entries")
    out["inodes_after_drop"], out["drop_settle_s"] = inodes_after_drop(metrics_addr)
    out["rss_after_drop"] = _vm_rss(proc.pid)
    log(f"  after drop_caches: {out['inodes_after_drop']:,.0f} inodes (settled in {out['drop_settle_s']:.1f} s), "
        f"RSS {out['rss_after_drop'] / MiB:.0f} MiB")
    return out


def run(args: argparse.Namespace, data: dict, work: Path, shm: Path, stack) -> None:
    data["machine"] = m = host.machine(work)
    m["loadavg_at_start"] = os.getloadavg()
    m["cachefs_digest"] = host.cachefs_digest()
    source = (work if args.dataset_on_disk else shm) / "source"
    mnt, logs = work / "mnt", work / "logs"
    for d in (source, mnt, logs):
        d.mkdir()
    log(f"metadata: {m['hostname']}, {m['cores']} cores, {m['cachefs']}; writing {args.files:,} files "
        f"in {args.dirs:,} directories under {source}")
    t = time.monotonic()
    write_dataset(source, args.files, args.dirs)
    data["write_s"] = time.monotonic() - t
    log(f"  written in {data['write_s']:.0f} s; measuring per-entry costs in-process")
    data["costs"] = c = entry_costs(source, args.files, args.dirs)
    log(f"  {c['bytes_per_inode']:.0f} B per inode, {c['bytes_per_meta_entry']:.0f} B per metadata cache entry")

    metrics_addr = f"127.0.0.1:{host.free_port()}"
    log_path = logs / "mount.log"
    proc = spawn([sys.executable, "-m", "cachefs", "mount", source, mnt,
                  "--cache-dir", work / "cache", "--cache-size", "0", "--mem-size", args.mem_size,
                  "--meta-cache-entries", str(args.meta_cache_entries), "--metrics", metrics_addr],
                 log_path, host.hermetic_env(), host.REPO)
    stack.callback(host.stop_session, proc)
    stack.callback(host.unmount, mnt)
    wait_mounted(proc, mnt, "cachefs", log_path)
    data["rss_mounted"] = _vm_rss(proc.pid)
    log(f"mounted at {mnt} (RSS {data['rss_mounted'] / MiB:.0f} MiB)")
    data["passes"] = [walk_and_drop(proc, mnt, metrics_addr, i) for i in range(1, 3)]
    first = data["passes"][0]
    data["rss_peak"], data["inodes_peak"] = first["rss_peak"], first["inodes_peak"]
    data["inodes_after_drop"] = first["inodes_after_drop"]
    data["targets"] = {
        "peak_rss": data["rss_peak"] <= args.mem_size_bytes + RSS_HEADROOM,
        "inodes_after_drop": data["inodes_after_drop"] < INODES_LEFT * data["inodes_peak"],
    }
    if host.cachefs_digest() != m["cachefs_digest"]:
        data["cachefs_digest_end"] = host.cachefs_digest()


# -- the report ------------------------------------------------------------------------


def render(data: dict, args: argparse.Namespace) -> str:
    c = data.get("costs", {})
    ok = lambda passed: "**pass**" if passed else "**MISS**"  # noqa: E731
    lines = [
        f"# cachefs bounded metadata: walk {data['files']:,} files, then drop the kernel's dentries; twice "
        f"({data['started']} on {data['machine']['hostname']})",
        "",
        f"A local directory ({'on disk' if data['dataset_on_disk'] else 'on /dev/shm'}) of {data['files']:,} "
        f"files of 1–64 bytes in {data['dirs']:,} directories, "
        f"mounted with `cachefs mount SRC MNT --cache-size 0 --mem-size {data['mem_size']} "
        f"--meta-cache-entries {data['meta_cache_entries']}` (TTLs at their defaults of 1 s); "
        f"`find MNT -type f -print0 | xargs -0 stat > /dev/null`; then `echo 2 > /proc/sys/vm/drop_caches` "
        f"and the `cachefs_inodes` gauge once unchanged for {SETTLE_S:g} s; then both once more, on the same mount. RSS is the daemon's "
        f"(VmHWM reset before the walk for the peak; VmRSS otherwise).",
        "",
        *report.experiment_lines(data),
    ]
    if "targets" in data:
        t = data["targets"]
        lines += [
            "",
            "| measure | value | target | |",
            "|---|---:|---|---|",
            f"| RSS once mounted | {data['rss_mounted'] / MiB:,.0f} MiB | | |",
        ]
        for n, p in enumerate(data["passes"], 1):
            first = n == 1
            lines += [
                f"| walk {n} ({p['walk_s']:.0f} s): peak RSS | {p['rss_peak'] / MiB:,.0f} MiB "
                + (f"| ≤ --mem-size + 250 MiB = {(args.mem_size_bytes + RSS_HEADROOM) / MiB:,.0f} MiB "
                   f"| {ok(t['peak_rss'])} |" if first else "| | |"),
                f"| walk {n}: `cachefs_inodes`, peak | {p['inodes_peak']:,.0f} | | |",
                f"| walk {n}: `cachefs_meta_cache_entries` after it | {p['meta_entries_after_walk']:,.0f} "
                f"| ≤ {data['meta_cache_entries']:,} | |",
                f"| walk {n}: backend requests | {p['backend_requests']['list']:,.0f} LIST, "
                f"{p['backend_requests']['stat']:,.0f} stat | | |",
                f"| after drop {n} ({p['drop_settle_s']:.1f} s to settle): `cachefs_inodes` "
                f"| {p['inodes_after_drop']:,.0f} ({100 * p['inodes_after_drop'] / max(1, p['inodes_peak']):.2f} %) "
                + (f"| < 5 % of the peak | {ok(t['inodes_after_drop'])} |" if first else "| | |"),
                f"| after drop {n}: RSS | {p['rss_after_drop'] / MiB:,.0f} MiB | | |",
            ]
    if c:
        lines += [
            "",
            "Per-entry cost, measured in the bench process with tracemalloc over the same dataset: "
            f"an inode of the table {c['bytes_per_inode']:.0f} B ({c['inodes']:,} paths), an entry of the "
            f"metadata cache {c['bytes_per_meta_entry']:.0f} B ({c['meta_entries']:,} entries: every listing). "
            "Python's allocator keeps freed memory in its arenas, so RSS after a drop stays near "
            "the peak although the inodes are gone; the second walk shows whether it is reused.",
        ]
    lines += report.error_lines(data["errors"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = {"files": args.files, "dirs": args.dirs, "mem_size": args.mem_size,
            "meta_cache_entries": args.meta_cache_entries, "dataset_on_disk": args.dataset_on_disk}
    finished = host.run_experiment("metadata", args, data, run, lambda d: render(d, args), lambda d: "machine" in d)
    return host.exit_code(finished and all(data.get("targets", {}).values()))


if __name__ == "__main__":
    sys.exit(main())
