"""K readers of one hot file on K mounts, with N cache workers, behind a throttled backend.

    .venv/bin/python -m bench.scale [--size 1G] [--readers 4,8] [--workers 0,1,2,3] [--rate 100M]

As root. Starts a JuiceFS volume served over S3 by `juicefs gateway` on
127.0.0.1, writes one file of --size random bytes through it, and puts a
throttling, counting proxy (scripts/s3_proxy.py, --rate bytes/s for all
connections together) in front of it: the slow shared backend of a research
platform. Then for each K and N: N fresh `cachefs worker`s and K fresh mounts
(each its own process, MEM only, no SSD tier; with N > 0 all on the workers'
ring), the page cache dropped, and K reader processes started at once, each
reading the file sequentially to EOF in 1 MiB reads. The backend's side of the
story comes from the proxy: with workers, each chunk crosses it once, whatever K.

Writes bench/results/<UTC time>-<host>-scale.md and .json. Everything started is
unmounted and stopped on the way out, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from bench import host, report
from bench.dataset import BIG, Dataset
from bench.host import GiB, MiB, log
from bench.systems import GatewayCells, metric, object_get_bytes, spawn, wait_listening, wait_mounted
from cachefs.status import scrape

RESULTS = host.REPO / "bench" / "results"
CHUNK_SIZE = "4M"  # cachefs's default, spelled out for the report
WORKER_MEM = "2G"
MOUNT_MEM = "256M"
READ_SIZE = MiB
READ_TIMEOUT = 900.0  # seconds the readers of one cell may take before the cell fails


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = host.argument_parser("python -m bench.scale", __doc__)
    p.add_argument("--size", default="1G", help="size of the hot file (default %(default)s)")
    p.add_argument("--readers", default="4,8", help="K: reader processes, one mount each (default %(default)s)")
    p.add_argument("--workers", default="0,1,2,3", help="N: cache workers on the ring (default %(default)s)")
    p.add_argument("--rate", default="100M", help="the backend's bandwidth in bytes/s (default %(default)s)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="parent of the temporary work directory (default %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .json go (default %(default)s)")
    p.add_argument("--read", help=argparse.SUPPRESS)  # a reader process: see read_file()
    args = p.parse_args(argv)
    if args.read:
        return args
    try:
        args.size, args.rate = host.parse_size(args.size), host.parse_size(args.rate)
        args.readers = [int(k) for k in args.readers.split(",")]
        args.workers = [int(n) for n in args.workers.split(",")]
    except ValueError as exc:
        p.error(str(exc))
    if args.size < MiB or args.rate <= 0 or min(args.readers) < 1 or min(args.workers) < 0:
        p.error("--size must be >= 1M, --rate > 0, --readers >= 1 and --workers >= 0")
    # N = 0 first: every other row's speed-up is against it.
    args.workers = sorted(set(args.workers))
    return args


# -- one reader process --------------------------------------------------------------


def read_file(path: str) -> None:
    """Open ``path``, say "ready", wait for a byte on stdin, read to EOF, print one JSON line.

    The open (lookup, getattr) happens before the go, so the timed part is the reads.
    The CRC-32 of everything read (5 GB/s here, so it barely loads the 2 cores)
    catches any wrong byte.
    """
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    total = crc = 0
    with open(path, "rb", buffering=0) as f:
        print("ready", flush=True)
        sys.stdin.buffer.read(1)
        start = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            total += n
        end = time.monotonic()
    print(json.dumps({"bytes": total, "crc32": crc, "start": start, "end": end}), flush=True)


def start_readers(paths: list[Path], stack: contextlib.ExitStack) -> list[subprocess.Popen]:
    """One reader process per path, each with the file open and waiting for the go."""
    procs = []
    for path in paths:
        proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "--read", str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=host.REPO,
                                start_new_session=True)
        stack.callback(host.stop_session, proc, 2)
        procs.append(proc)
    for proc, path in zip(procs, paths):
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"reader of {path} did not get ready (exit {proc.poll()}): {line!r}")
    return procs


def finish_readers(procs: list[subprocess.Popen]) -> list[dict]:
    """Send every reader the go at once, wait for all, return their reports."""
    for proc in procs:
        proc.stdin.write(b"g")
        proc.stdin.flush()
    deadline = time.monotonic() + READ_TIMEOUT
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the readers did not finish within {READ_TIMEOUT:g} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"a reader exited with {proc.returncode}: {out[-500:]!r}")
        results.append(json.loads(out.splitlines()[-1]))
    return results


# -- the daemons -----------------------------------------------------------------------


class Cluster(GatewayCells):
    """What every cell shares: the gateway, the throttled proxy in front of it, the secret."""

    def __init__(self, work: Path, gateway, proxy, size: int, crc32: int):
        super().__init__(work, gateway)
        self.proxy = proxy
        self.size = size
        self.crc32 = crc32

    def start_workers(self, n: int, cell_dir: Path, stack: contextlib.ExitStack) -> list[dict]:
        """``n`` empty workers fetching through the proxy, listening on 127.0.0.1."""
        workers = []
        for i in range(n):
            port = host.free_port()
            w = {"addr": f"127.0.0.1:{port}", "port": port, "metrics": f"127.0.0.1:{host.free_port()}",
                 "log": self.logs / f"{cell_dir.name}-worker{i}.log"}
            w["proc"] = spawn(
                [sys.executable, "-m", "cachefs", "worker",
                 "--listen", w["addr"],
                 "--source", f"scale={self.source}",
                 "--endpoint-url", self.proxy.endpoint_url,
                 "--secret-file", self.secret_file,
                 "--cache-dir", cell_dir / f"worker{i}",
                 "--mem-size", WORKER_MEM,
                 "--cache-size", "0",  # MEM holds the whole file: no SSD writes in the way
                 "--metrics", w["metrics"]],
                w["log"], self.env, self.work)
            stack.callback(host.stop_session, w["proc"])
            workers.append(w)
        for w in workers:  # started all at once, then waited for: they load in parallel
            wait_listening(w["proc"], w["port"], w["log"])
        return workers

    def start_mounts(self, k: int, workers: list[dict], cell_dir: Path, stack: contextlib.ExitStack) -> list[dict]:
        """``k`` fresh mounts (MEM only), on the workers' ring if there are workers."""
        peers = ["--peers", ",".join(w["addr"] for w in workers), "--secret-file", self.secret_file] if workers else []
        mounts = []
        for j in range(k):
            m = {"mountpoint": self.work / "mnt" / f"r{j}", "metrics": f"127.0.0.1:{host.free_port()}",
                 "log": self.logs / f"{cell_dir.name}-mount{j}.log"}
            m["mountpoint"].mkdir(parents=True, exist_ok=True)
            m["proc"] = spawn(
                [sys.executable, "-m", "cachefs", "mount", self.source, m["mountpoint"],
                 "--endpoint-url", self.proxy.endpoint_url,
                 "--cache-dir", cell_dir / f"mount{j}",
                 "--mem-size", MOUNT_MEM,
                 "--cache-size", "0",
                 "--metrics", m["metrics"],
                 *peers],
                m["log"], self.env, self.work)
            stack.callback(_stop_mount, m)
            mounts.append(m)
        for j, m in enumerate(mounts):
            wait_mounted(m["proc"], m["mountpoint"], f"r{j}", m["log"], read_ahead_kb=4096)
        return mounts

    def run_cell(self, n: int, k: int) -> dict:
        """N workers, K mounts and K readers started at once; torn down before returning."""
        cell_dir = self.work / "cells" / f"n{n}-k{k}"
        cell_dir.mkdir(parents=True)
        try:
            with contextlib.ExitStack() as stack:
                workers = self.start_workers(n, cell_dir, stack)
                mounts = self.start_mounts(k, workers, cell_dir, stack)
                readers = start_readers([m["mountpoint"] / BIG for m in mounts], stack)
                worker_before = [scrape(w["metrics"]) for w in workers]
                mount_before = [scrape(m["metrics"]) for m in mounts]
                object_before = object_get_bytes(self.gateway.metrics_addr)
                self.proxy.reset()
                host.drop_page_cache()
                results = finish_readers(readers)
                gets = sum(count for (path, _), count in self.proxy.gets.items() if path.endswith(f"/{BIG}"))
                backend = {"bytes": self.proxy.response_bytes, "requests": dict(self.proxy.requests), "gets": gets,
                           "gateway_object_bytes": object_get_bytes(self.gateway.metrics_addr) - object_before}
                worker_deltas = [_delta(b, scrape(w["metrics"])) for b, w in zip(worker_before, workers)]
                mount_deltas = [_delta(b, scrape(m["metrics"])) for b, m in zip(mount_before, mounts)]
        finally:
            shutil.rmtree(cell_dir, ignore_errors=True)
        for j, r in enumerate(results):
            if r["bytes"] != self.size or r["crc32"] != self.crc32:
                raise RuntimeError(f"N={n} K={k}: reader {j} read {r['bytes']} bytes with CRC-32 {r['crc32']:08x}; "
                                   f"the file has {self.size} bytes with CRC-32 {self.crc32:08x}")
        seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
        return {
            "workers": n, "readers": k, "seconds": seconds, "mib_s": k * self.size / MiB / seconds,
            "reader_seconds": [r["end"] - r["start"] for r in results],
            "backend_bytes": backend["bytes"], "backend_gets": backend["gets"],
            "backend_requests": backend["requests"], "gateway_object_bytes": backend["gateway_object_bytes"],
            "worker_served_bytes": [metric(d, "cachefs_peer_served_bytes_total") for d in worker_deltas],
            "worker_backend_bytes": [metric(d, "cachefs_backend_read_bytes_total") for d in worker_deltas],
            "worker_gets": [metric(d, "cachefs_backend_requests_total", op="get") for d in worker_deltas],
            "mount_read_bytes": {s: sum(metric(d, "cachefs_read_bytes_total", source=s) for d in mount_deltas)
                                 for s in ("mem", "peer", "backend")},
            "mount_backend_bytes": sum(metric(d, "cachefs_backend_read_bytes_total") for d in mount_deltas),
            "mount_peer_requests": _by_label(mount_deltas, "cachefs_peer_requests_total", "outcome"),
        }


def _stop_mount(m: dict) -> None:
    host.unmount(m["mountpoint"])
    host.stop_session(m["proc"])


def _delta(before: dict, after: dict) -> dict:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _by_label(deltas: list[dict], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in deltas:
        for (n, labels), value in d.items():
            if n == name and value:
                key = dict(labels).get(label, "")
                out[key] = out.get(key, 0.0) + value
    return out


# -- the report ------------------------------------------------------------------------


def render(data: dict) -> str:
    size, rate = data["size"], data["rate"]
    lines = [
        f"# cachefs scale-out: K readers of one hot file, N cache workers, throttled backend "
        f"({data['started']} on {data['machine']['hostname']})",
        "",
        f"One {size / MiB:,.0f} MiB file of random bytes on a local JuiceFS volume served over S3 by "
        f"`juicefs gateway`, behind a proxy that throttles all responses together to "
        f"{rate / MiB:g} MiB/s and counts them (scripts/s3_proxy.py): the backend. For each cell, N fresh "
        f"`cachefs worker`s (--mem-size {WORKER_MEM}, no SSD tier, empty) on a consistent-hash ring and K "
        f"fresh `cachefs mount`s, one per reader (--mem-size {MOUNT_MEM}, no SSD tier, chunk size "
        f"{CHUNK_SIZE} (the default), read-ahead 8 chunks; with N > 0 `--peers` to the workers, "
        f"so each chunk is fetched by its owner and only by it); the page cache dropped; then K reader "
        f"processes started at once, each reading the whole file sequentially in 1 MiB reads and checking "
        f"its size and CRC-32. Total: first reader's start to last reader's end. Backend bytes: response "
        f"bytes that crossed the proxy during the reads (the file is {size / GiB:.2f} GiB). Without "
        f"workers every mount fetches the whole file itself, so the backend serves K times it; with "
        f"workers, once.",
        "",
        *report.machine_lines(data["machine"]),
        f"- **Run**: took {data.get('duration_s', 0) / 60:.1f} min; load average at start "
        f"{data['machine'].get('loadavg_at_start', [0.0])[0]:.2f}",
    ]
    if data.get("cachefs_digest_end"):
        lines += ["", f"**cachefs's code changed during the run** (digest {data['machine']['cachefs_digest']} at the "
                  f"start, {data['cachefs_digest_end']} at the end): its cells may mix two versions."]
    if data.get("partial"):
        lines += ["", "**This run did not finish: the numbers are partial.**"]
    lines += [
        "",
        "| N workers | K readers | total s | aggregate MiB/s | backend GiB | × dataset | backend GETs "
        "| speed-up vs N=0 | reader s (min–max) | served by workers GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = {c["readers"]: c["seconds"] for c in data["cells"] if c["workers"] == 0}
    for c in sorted(data["cells"], key=lambda c: (c["readers"], c["workers"])):
        base = baseline.get(c["readers"])
        speedup = f"{base / c['seconds']:.1f}×" if base else "—"
        lines.append(
            f"| {c['workers']} | {c['readers']} | {c['seconds']:.1f} | {c['mib_s']:,.0f} "
            f"| {c['backend_bytes'] / GiB:.2f} | {c['backend_bytes'] / size:.2f} | {c['backend_gets']:,} "
            f"| {speedup} | {min(c['reader_seconds']):.1f}–{max(c['reader_seconds']):.1f} "
            f"| {sum(c['worker_served_bytes']) / GiB:.2f} |"
        )
    fallbacks = [c for c in data["cells"] if c["workers"] and c["mount_backend_bytes"]]
    if fallbacks:
        lines += ["", "Mounts that fetched from the backend themselves although workers were up "
                  "(a peer request failed or timed out, so the reader went to the backend):", ""]
        lines += [f"- N={c['workers']} K={c['readers']}: {c['mount_backend_bytes'] / MiB:,.0f} MiB; peer requests "
                  + ", ".join(f"{o} {v:.0f}" for o, v in sorted(c["mount_peer_requests"].items()))
                  for c in fallbacks]
    lines += report.error_lines(data["errors"])
    return "\n".join(lines) + "\n"


# -- the run ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.read:
        read_file(args.read)
        return 0
    data = {"size": args.size, "rate": args.rate, "readers": args.readers, "workers": args.workers,
            "chunk_size": CHUNK_SIZE, "worker_mem_size": WORKER_MEM, "mount_mem_size": MOUNT_MEM, "cells": []}
    finished = host.run_experiment("scale", args, data, run, render, lambda d: bool(d["cells"]))
    return 130 if finished is None else 0


def run(args: argparse.Namespace, data: dict, work: Path, shm: Path, stack: contextlib.ExitStack) -> None:
    """Backend, dataset, proxy, then every cell; ``stack`` tears down what is started."""
    data["machine"] = m = host.machine(work)
    m["loadavg_at_start"] = os.getloadavg()
    m["cachefs_digest"] = host.cachefs_digest()
    log(f"scale: {m['hostname']}, {m['cores']} cores, {m['cachefs']}; work dir {work}")
    gateway = host.juicefs_backend().JuicefsS3(work / "backend")
    stack.callback(gateway.stop)
    gateway.start()
    log(f"S3 gateway {gateway.endpoint_url}; writing {args.size / MiB:.0f} MiB of random bytes through it")
    Dataset(args.size, small_count=0, ttfb_count=0).write(gateway, shm)
    with open(shm / BIG, "rb") as f:  # the copy Dataset.write keeps: the reference for the readers
        crc = 0
        while data_block := f.read(64 * MiB):
            crc = zlib.crc32(data_block, crc)
    (shm / BIG).unlink()
    proxy = host.script_module("s3_proxy").S3Proxy(gateway.endpoint_url, rate=args.rate).start()
    stack.callback(proxy.stop)
    log(f"throttling proxy {proxy.endpoint_url}: {args.rate / MiB:g} MiB/s")
    cluster = Cluster(work, gateway, proxy, args.size, crc)
    for k in args.readers:
        for n in args.workers:
            cell = cluster.run_cell(n, k)
            data["cells"].append(cell)
            log(f"  N={n} K={k}: {cell['seconds']:6.1f} s, {cell['mib_s']:6.0f} MiB/s aggregate, backend "
                f"{cell['backend_bytes'] / GiB:.2f} GiB ({cell['backend_bytes'] / args.size:.2f}× the file), "
                f"{cell['backend_gets']} GETs, workers served {sum(cell['worker_served_bytes']) / GiB:.2f} GiB")
    if host.cachefs_digest() != m["cachefs_digest"]:
        data["cachefs_digest_end"] = host.cachefs_digest()


if __name__ == "__main__":
    sys.exit(main())
