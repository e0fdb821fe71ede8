"""Epochs larger than the cache: three full reads of a dataset twice the SSD tier.

    .venv/bin/python -m bench.epochs [--size 512M] [--cache-size 256M] [--epochs 3]

As root. Starts a JuiceFS volume served over S3 by `juicefs gateway` on
127.0.0.1 and writes a dataset of mixed file sizes through it (a quarter in one
large file, a quarter in files of 8 MiB, the rest in files of 0.25-4 MiB and of
64 KiB). Then, for each admission policy (`--admission lru`, `scan-resistant`):
a fresh `cachefs mount` over an empty cache directory (--mem-size 0
--cache-size 256M), and --epochs times: the page cache dropped, then
`tar cf - -C MNT . | wc -c`. Per epoch it records, from the mount's metrics:
the hit ratio (bytes returned from the SSD tier / bytes read), the bytes
fetched from the backend and the bytes written to the SSD tier.

Targets (issue 14): epochs after the first hit >= 0.4 with scan-resistant (LRU
about 0); SSD bytes written per epoch after the first <= 0.5 x the cache;
backend bytes per epoch <= 1.0 x the dataset (plus one chunk).

Writes bench/results/<UTC time>-<host>-epochs.md and .json. Everything started
is unmounted and stopped on the way out, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import host, report
from bench.dataset import PREFIX
from bench.host import MiB, log
from bench.systems import GatewayCells, metric, settle, spawn, wait_mounted
from cachefs.status import scrape

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("lru", "scan-resistant")
CHUNK = 4 * MiB  # cachefs's default chunk size
TARGET_HITS, TARGET_WRITTEN, TARGET_BACKEND = 0.4, 0.5, 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = host.argument_parser("python -m bench.epochs", __doc__)
    p.add_argument("--size", default="512M", help="dataset size (default %(default)s)")
    p.add_argument("--cache-size", default="256M", help="the SSD tier's --cache-size (default %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="full reads per policy (default %(default)s)")
    p.add_argument("--policies", default=",".join(POLICIES), help="which of %(default)s")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="parent of the temporary work directory: the volume and the caches (default %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .json go (default %(default)s)")
    args = p.parse_args(argv)
    args.policies = [s for s in args.policies.split(",") if s]
    if not set(args.policies) <= set(POLICIES) or args.epochs < 2:
        p.error(f"--policies must be among {','.join(POLICIES)} and --epochs >= 2")
    return args


def dataset_files(total: int) -> dict[str, int]:
    """Path -> size: mixed sizes adding up to `total`."""
    rng = random.Random(14)
    files = {"big/large.bin": total // 4}
    for i in range(total // 4 // (8 * MiB)):
        files[f"medium/m{i:03d}.bin"] = 8 * MiB
    small = 64 << 10
    for i in range(total // 16 // small):
        files[f"small/d{i // 100:02d}/s{i:04d}.bin"] = small
    left = total - sum(files.values())
    i = 0
    while left > 0:
        n = min(left, rng.randint(256 << 10, 4 * MiB))
        files[f"mixed/x{i:04d}.bin"] = n
        left -= n
        i += 1
    return files


def write_dataset(gateway, files: dict[str, int]) -> float:
    t0 = time.monotonic()
    fs = gateway.s3fs()
    batch: dict[str, bytes] = {}
    for path, size in files.items():
        batch[f"{gateway.bucket}/{PREFIX}/{path}"] = os.urandom(size)
        if sum(map(len, batch.values())) >= 64 * MiB:
            fs.pipe(batch)
            batch = {}
    if batch:
        fs.pipe(batch)
    return time.monotonic() - t0


class Bench(GatewayCells):
    def policy(self, args: argparse.Namespace, policy: str, total: int) -> list[dict]:
        cell = self.work / "cells" / policy
        cell.mkdir(parents=True)
        mnt = self.work / "mnt" / policy
        mnt.mkdir(parents=True)
        addr = f"127.0.0.1:{host.free_port()}"
        log_path = self.logs / f"{policy}.log"
        with contextlib.ExitStack() as stack:
            proc = spawn([sys.executable, "-m", "cachefs", "mount", self.source, mnt,
                          "--endpoint-url", self.gateway.endpoint_url, "--cache-dir", cell, "--metrics", addr,
                          "--mem-size", "0", "--cache-size", args.cache_size, "--admission", policy],
                         log_path, self.env, self.work)
            stack.callback(host.stop_session, proc)
            stack.callback(host.unmount, mnt)
            wait_mounted(proc, mnt, policy, log_path)
            epochs = []
            for n in range(args.epochs):
                host.drop_page_cache()
                before = scrape(addr)
                cpu = host.cpu_seconds(proc.pid)
                t = time.monotonic()
                res = subprocess.run(f"tar cf - -C {mnt} . | wc -c", shell=True, capture_output=True, text=True,
                                     check=True)
                seconds = time.monotonic() - t
                settle(lambda: metric(scrape(addr), "cachefs_cache_written_bytes_total", tier="disk"))
                after = scrape(addr)
                d = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
                read = sum(d("cachefs_read_bytes_total", source=s) for s in ("disk", "backend"))
                e = {"policy": policy, "epoch": n + 1, "seconds": seconds, "tar_bytes": int(res.stdout.split()[0]),
                     "read_bytes": read, "disk_bytes": d("cachefs_read_bytes_total", source="disk"),
                     "backend_bytes": d("cachefs_backend_read_bytes_total"),
                     "backend_gets": d("cachefs_backend_requests_total", op="get"),
                     "written_bytes": d("cachefs_cache_written_bytes_total", tier="disk"),
                     "rejected_chunks": d("cachefs_cache_rejected_total", tier="disk"),
                     "evicted_chunks": d("cachefs_cache_evictions_total", tier="disk"),
                     "mount_cpu_s": host.cpu_seconds(proc.pid) - cpu}
                e["hit_ratio"] = e["disk_bytes"] / read if read else 0.0
                epochs.append(e)
                log(f"  {policy:14s} epoch {n + 1}: {seconds:5.1f} s, hits {e['hit_ratio']:.2f}, backend "
                    f"{e['backend_bytes'] / total:.3f} x dataset, SSD written {e['written_bytes'] / MiB:,.0f} MiB")
                if read < total:
                    raise RuntimeError(f"{policy}: epoch {n + 1} read {read} bytes through cachefs, the dataset has {total}")
        return epochs


def run(args: argparse.Namespace, data: dict, work: Path, shm: Path, stack: contextlib.ExitStack) -> None:
    data["machine"] = m = host.machine(work)
    m["loadavg_at_start"] = os.getloadavg()
    m["cachefs_digest"] = host.cachefs_digest()
    files = dataset_files(host.parse_size(args.size))
    total = data["dataset"]["total"] = sum(files.values())
    data["dataset"]["files"] = len(files)
    gateway = host.juicefs_backend().JuicefsS3(work / "backend")
    stack.callback(gateway.stop)
    gateway.start()
    log(f"epochs: {m['hostname']}; writing {total / MiB:,.0f} MiB in {len(files)} files through {gateway.endpoint_url}")
    data["write_s"] = write_dataset(gateway, files)
    bench = Bench(work, gateway)
    for policy in args.policies:
        data["epochs"] += bench.policy(args, policy, total)
    if host.cachefs_digest() != m["cachefs_digest"]:
        data["cachefs_digest_end"] = host.cachefs_digest()


def render(data: dict) -> str:
    ds, cache = data["dataset"], data["cache_size"]
    lines = [
        f"# Epochs larger than the cache ({data['started']} on {data['machine']['hostname']})",
        "",
        f"{ds['total'] / MiB:,.0f} MiB in {ds['files']} files of mixed sizes on a local JuiceFS volume served over S3 "
        f"by `juicefs gateway`; per admission policy a fresh `cachefs mount --mem-size 0 --cache-size "
        f"{cache / MiB:,.0f}M --admission POLICY` (chunks of 4 MiB, read-ahead 8), then per epoch the page cache "
        "dropped and `tar cf - -C MNT . | wc -c`. Hit ratio: bytes returned from the SSD tier / bytes read; backend: "
        "`cachefs_backend_read_bytes_total`; SSD written: `cachefs_cache_written_bytes_total` (chunk files with "
        "their headers).",
        "",
        *report.experiment_lines(data),
        "",
        "| policy | epoch | s | hit ratio | backend MiB | ÷ dataset | GETs | SSD written MiB | ÷ cache | chunks not admitted | mount CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in data["epochs"]:
        lines.append(
            f"| {e['policy']} | {e['epoch']} | {e['seconds']:.1f} | {e['hit_ratio']:.2f} | {e['backend_bytes'] / MiB:,.0f} "
            f"| {e['backend_bytes'] / ds['total']:.3f} | {e['backend_gets']:.0f} | {e['written_bytes'] / MiB:,.0f} "
            f"| {e['written_bytes'] / cache:.2f} | {e['rejected_chunks']:.0f} | {e['mount_cpu_s']:.1f} |")
    later = [e for e in data["epochs"] if e["epoch"] > 1]
    sr = [e for e in later if e["policy"] == "scan-resistant"]
    lru = [e for e in later if e["policy"] == "lru"]

    def verdict(ok: bool) -> str:
        return "**pass**" if ok else "**MISS**"

    lines += ["", "Targets (issue 14):", ""]
    if sr:
        lo = min(e["hit_ratio"] for e in sr)
        lines.append(f"- epochs 2.. hit ≥ {TARGET_HITS} with scan-resistant: lowest {lo:.2f} — {verdict(lo >= TARGET_HITS)}"
                     + (f" (LRU: highest {max(e['hit_ratio'] for e in lru):.2f})" if lru else ""))
        hi = max(e["written_bytes"] for e in sr) / cache
        lines.append(f"- SSD bytes written per epoch after the first ≤ {TARGET_WRITTEN} × the cache with scan-resistant: "
                     f"highest {hi:.2f}× — {verdict(hi <= TARGET_WRITTEN)}"
                     + (f" (LRU: {max(e['written_bytes'] for e in lru) / cache:.2f}×)" if lru else ""))
    worst = max(e["backend_bytes"] for e in data["epochs"])
    bound = ds["total"] + CHUNK
    lines.append(f"- backend bytes per epoch ≤ 1.0 × the dataset (+ one chunk), every policy and epoch: highest "
                 f"{worst / ds['total']:.3f}× — {verdict(worst <= bound)}")
    lines += report.error_lines(data["errors"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = {"dataset": {}, "cache_size": host.parse_size(args.cache_size), "policies": args.policies,
            "epochs": []}
    finished = host.run_experiment("epochs", args, data, run, render, lambda d: bool(d["epochs"]))
    return host.exit_code(finished)


if __name__ == "__main__":
    sys.exit(main())
