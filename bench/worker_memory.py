"""Worker memory: RSS and page cache of a worker that serves 4 GiB from its SSD tier.

    .venv/bin/python -m bench.worker_memory [--size 960M] [--passes 4] [--quick]

As root (it drops the page cache and mounts). A local directory of --size random
bytes (16 MiB files) is the source. For each worker setting, in one run:

- a fresh `cachefs worker` (--mem-size 64M, --cache-size 1G: the SSD holds the
  dataset, MEM almost none of it), warmed with `cachefs warmup` through a mount
  on its ring; then the page cache is dropped;
- --passes fresh mounts (--mem-size 0 --cache-size 0 --peers: every read is a
  chunk the worker serves from its SSD, and a fresh mount has no FUSE page cache)
  each read the whole dataset: passes x --size bytes served from disk;
- after each pass: the worker's VmRSS (and VmHWM), and the page cache its chunk
  files hold (fincore over the cache directory).

Settings: "drop" (the default: a worker drops the pages of every chunk file it
read, posix_fadvise DONTNEED) and "keep" (--keep-page-cache, the behaviour before).
A container's memory limit counts the worker's RSS plus the page cache it brought in.

Writes bench/results/<UTC time>-<host>-worker-memory.md and .json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import host, report
from bench.host import GiB, MiB, log
from bench.systems import spawn, wait_listening, wait_mounted, write_secret
from cachefs.status import scrape
from bench.systems import metric

RESULTS = host.REPO / "bench" / "results"
FILE_SIZE = 16 * MiB
WORKER_MEM = "64M"
WORKER_CACHE = "1G"
SETTINGS = {"drop": [], "keep": ["--keep-page-cache"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = host.argument_parser("python -m bench.worker_memory", __doc__)
    p.add_argument("--size", default="960M", help="dataset size; must fit --cache-size 1G with headers (default %(default)s)")
    p.add_argument("--passes", type=int, default=4, help="full reads through fresh mounts (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: 128M, 2 passes")
    p.add_argument("--workdir", default="/var/tmp", help="parent of the work directory, on disk (default %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .json go (default %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.passes = "128M", 2
    args.size_bytes = host.parse_size(args.size)
    return args


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def _page_cache_bytes(root: Path) -> int:
    """Bytes of the files under `root` that are in the page cache (util-linux fincore)."""
    files = [str(p) for p in root.rglob("*") if p.is_file()]
    total = 0
    for i in range(0, len(files), 500):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files[i:i + 500]],
                             capture_output=True, text=True, check=True).stdout
        total += sum(int(x) for x in out.split())
    return total


def _write_source(root: Path, size: int) -> None:
    root.mkdir(parents=True)
    for i in range(-(-size // FILE_SIZE)):
        (root / f"f{i:03d}.bin").write_bytes(os.urandom(min(FILE_SIZE, size - i * FILE_SIZE)))


def _read_all(root: Path) -> int:
    n = 0
    for path in sorted(root.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(4 * MiB):
                n += len(chunk)
    return n


def cell(args, work: Path, setting: str, source: Path, secret: Path, env: dict, stack) -> dict:
    logs = work / "logs"
    port = host.free_port()
    addr = f"127.0.0.1:{port}"
    wmetrics = f"127.0.0.1:{host.free_port()}"
    cache_dir = work / f"worker-{setting}"
    wlog = logs / f"worker-{setting}.log"
    worker = spawn([sys.executable, "-m", "cachefs", "worker", "--listen", addr, "--source", f"ds={source}",
                    "--secret-file", secret, "--cache-dir", cache_dir, "--mem-size", WORKER_MEM,
                    "--cache-size", WORKER_CACHE, "--metrics", wmetrics, *SETTINGS[setting]], wlog, env, work)
    stack.callback(host.stop_session, worker)
    wait_listening(worker, port, wlog)
    peers = ["--peers", addr, "--secret-file", secret]

    def mount(name: str) -> tuple[Path, subprocess.Popen]:
        mnt = work / "mnt" / f"{setting}-{name}"
        mnt.mkdir(parents=True)
        mlog = logs / f"mount-{setting}-{name}.log"
        proc = spawn([sys.executable, "-m", "cachefs", "mount", source, mnt, "--cache-dir", work / f"m-{setting}-{name}",
                      "--mem-size", "0", "--cache-size", "0", *peers], mlog, env, work)
        wait_mounted(proc, mnt, name, mlog)
        return mnt, proc

    def unmount(mnt: Path, proc) -> None:
        host.unmount(mnt)
        host.stop_session(proc)

    mnt, proc = mount("warm")
    res = subprocess.run([sys.executable, "-m", "cachefs", "warmup", mnt, "-r", "--json"], capture_output=True,
                         text=True, env=env, timeout=900)
    unmount(mnt, proc)
    if res.returncode != 0:
        raise RuntimeError(f"warmup failed: {res.stderr[-500:]}{res.stdout[-500:]}")
    host.drop_page_cache()
    time.sleep(1)
    rows = [{"pass": 0, "served": 0, **_status_kib(worker.pid), "page_cache": _page_cache_bytes(cache_dir)}]
    log(f"  {setting}: warmed; {rows[0]}")
    for n in range(1, args.passes + 1):
        mnt, proc = mount(f"p{n}")
        t = time.monotonic()
        read = _read_all(mnt)
        seconds = time.monotonic() - t
        unmount(mnt, proc)
        if read != args.size_bytes:
            raise RuntimeError(f"pass {n}: read {read} bytes of {args.size_bytes}")
        samples = scrape(wmetrics)
        rows.append({"pass": n, "served": metric(samples, "cachefs_peer_served_bytes_total"),
                     "mib_s": read / MiB / seconds, **_status_kib(worker.pid),
                     "page_cache": _page_cache_bytes(cache_dir),
                     "backend_gets": metric(samples, "cachefs_backend_requests_total", op="get")})
        log(f"  {setting}: pass {n}: {rows[-1]}")
    host.stop_session(worker)
    return {"setting": setting, "rows": rows}


def run(args, data: dict, work: Path, shm: Path, stack) -> None:
    data["machine"] = m = host.machine(work)
    m["loadavg_at_start"] = os.getloadavg()
    m["cachefs_digest"] = host.cachefs_digest()
    (work / "logs").mkdir()
    source = work / "source"
    _write_source(source, args.size_bytes)
    secret = work / "secret"
    write_secret(secret)
    env = host.hermetic_env()
    for setting in SETTINGS:
        data["cells"].append(cell(args, work, setting, source, secret, env, stack))


def render(data: dict) -> str:
    lines = [
        f"# Worker memory while serving from its SSD tier ({data['started']} on {data['machine']['hostname']})",
        "",
        f"A `cachefs worker` (--mem-size {WORKER_MEM} --cache-size {WORKER_CACHE}) over a local source of "
        f"{data['size'] / MiB:,.0f} MiB, warmed with `cachefs warmup` through a mount, page cache dropped; then "
        f"{data['passes']} fresh mounts (--mem-size 0 --cache-size 0 --peers) each read all of it, so the worker "
        f"serves {data['passes'] * data['size'] / GiB:.2f} GiB from its SSD. After each pass: the worker's VmRSS "
        "and the page cache held by its chunk files (fincore over the cache directory); the two are what a "
        "container's memory limit counts for it.",
        "",
        "- **drop**: the default (`posix_fadvise(DONTNEED)` after each chunk file read). **keep**: `--keep-page-cache` "
        "(the behaviour before).",
        "",
        *report.experiment_lines(data),
        "",
        "| worker | pass | GiB served | read MiB/s | VmRSS MiB | VmHWM MiB | chunk files in page cache MiB | RSS + page cache MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in data["cells"]:
        for r in c["rows"]:
            lines.append(
                f"| {c['setting']} | {r['pass']} | {r['served'] / GiB:.2f} | {report.fmt(r.get('mib_s'), '')} "
                f"| {r['VmRSS'] / 1024:,.0f} | {r['VmHWM'] / 1024:,.0f} | {r['page_cache'] / MiB:,.0f} "
                f"| {r['VmRSS'] / 1024 + r['page_cache'] / MiB:,.0f} |"
            )
    lines += report.error_lines(data["errors"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = {"size": args.size_bytes, "passes": args.passes, "cells": []}
    finished = host.run_experiment("worker-memory", args, data, run, render, lambda d: bool(d["cells"]))
    return host.exit_code(finished)


if __name__ == "__main__":
    sys.exit(main())
