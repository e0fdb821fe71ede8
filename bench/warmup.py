"""Warm-up speed: `cachefs warmup` into a worker against `juicefs warmup` into JuiceFS's cache.

    .venv/bin/python -m bench.warmup [--size 1G] [--files N] [--repeat 3] [--quick]

As root. Starts a JuiceFS volume served over S3 by `juicefs gateway` on
127.0.0.1 and writes a dataset through it: one large file (half of --size),
--files medium files of 8 MiB and a few hundred small ones of 64 KiB
(bench/dataset.py). Then, per repeat, with the page cache dropped before each
cell and the systems in turn (the order reversed every other repeat, so other
load on the machine falls on all alike):

- cachefs-peer: a fresh `cachefs worker` (empty cache directory, --source the
  dataset's prefix on the gateway) and a fresh mount with `--peers` to it;
  `cachefs warmup MNT -r --json` makes the worker load every chunk from S3.
- juicefs-s3: `juicefs warmup` of the same bytes held in a second JuiceFS
  volume whose object storage is the same gateway (`--storage minio`), over a
  fresh, empty cache directory on the same disk: every block JuiceFS warms
  comes through the same S3 server as cachefs's GETs (the target's baseline:
  the issue asks for a warm-up "from the S3 gateway").
- juicefs: `juicefs mount` of the gateway's own volume, whose blocks JuiceFS
  reads straight from local files (`--storage file`): no HTTP, no SigV4, no
  gateway in its path (a reference: what JuiceFS does without an S3 server).
- cachefs-local: a fresh mount without peers (--mem-size 0: straight into its
  SSD tier); `cachefs warmup MNT -r --json`.
- s3-raw, a reference: the large file read through the gateway with ranged
  GETs from 8 threads (bench.dataset.raw_s3_read), nothing stored.
- s3-fast and s3-fast-4M, the ceiling: every byte of the dataset read through
  the gateway by cachefs's own S3 client (bench.dataset.raw_fast_read), 8
  threads, in ranges of 16 MiB (a warm-up's runs) or 4 MiB (one chunk each),
  nothing stored: what any cachefs warm-up through this gateway can reach here.

Each time is the warm-up command's wall clock, from its start to its exit.
Both cachefs (warm-up writes only) and JuiceFS leave cache writes in the page
cache for the kernel to write back; the `sync` right after each warm-up is
timed apart and shown beside it.

Writes bench/results/<UTC time>-<host>-warmup.md and .json. Everything started
is unmounted and stopped on the way out, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import host, report
from bench.dataset import PREFIX, Dataset, raw_fast_read, raw_s3_read
from bench.host import GiB, MiB, log
from bench.systems import (CACHE_SIZE, GatewayCells, metric, object_get_bytes, settle, spawn, wait_listening,
                           wait_mounted)
from cachefs.status import scrape

RESULTS = host.REPO / "bench" / "results"
CHUNK_SIZE = "4M"  # cachefs's default, spelled out for the report
WORKER_MEM = "2G"
SMALL_FILES = 256  # of 64 KiB: per-file costs
TARGET = 1.0  # issue: cachefs warm-up MiB/s >= 1.0 x juicefs warmup
WARMUP_TIMEOUT = 900.0
SYSTEMS = ("cachefs-peer", "juicefs-s3", "juicefs", "cachefs-local", "s3-fast", "s3-fast-4M", "s3-raw")
BASELINE = "juicefs-s3"  # the target's: JuiceFS warming the same bytes through the same gateway
JFS_VOLUME = "jfswarm"  # the second JuiceFS volume's name: its blocks are objects under this prefix
CEILING = "s3-fast"  # the warm-up's own requests, without a cache: what it can reach through the gateway
LABELS = {
    "cachefs-peer": "cachefs → worker (`--peers`)",
    "juicefs-s3": "juicefs warmup, its blocks through the same S3 gateway",
    "juicefs": "reference: juicefs warmup, its blocks from local files (no S3 gateway)",
    "cachefs-local": "cachefs → mount's own SSD tier",
    "s3-raw": "reference: raw S3 GETs of the large file (s3fs), no cache",
    "s3-fast": "ceiling: the same bytes, cachefs's S3 client, 16 MiB GETs, no cache",
    "s3-fast-4M": "ceiling: the same bytes, cachefs's S3 client, 4 MiB GETs, no cache",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = host.argument_parser("python -m bench.warmup", __doc__)
    p.add_argument("--size", default="1G", help="total size of the dataset (default %(default)s)")
    p.add_argument("--files", type=int, help="medium files of 8 MiB (default: half of --size)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of each system (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: 256M, 1 repeat")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which of %(default)s")
    p.add_argument("--concurrency", type=int, help="cachefs warmup --concurrency (default: its own, 8)")
    p.add_argument("--threads", type=int, help="juicefs warmup --threads (default: its own, 50)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the read through a fresh mount after the first cachefs-peer cell")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="parent of the temporary work directory: the volume and every cache (default %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .json go (default %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.repeat = "256M", 1
    args.systems = [s for s in args.systems.split(",") if s]
    if not set(args.systems) <= set(SYSTEMS) or args.repeat < 1:
        p.error(f"--systems must be among {','.join(SYSTEMS)} and --repeat >= 1")
    total = host.parse_size(args.size)
    medium = Dataset(0, 0, 0).ttfb_size
    if args.files is None:
        args.files = total // 2 // medium
    big = total - args.files * medium - SMALL_FILES * Dataset(0, 0, 0).small_size
    if big < MiB:
        p.error("--files leaves less than 1 MiB for the large file")
    args.dataset = Dataset(big, small_count=SMALL_FILES, ttfb_count=args.files)
    return args


# -- one cell each --------------------------------------------------------------------


class Bench(GatewayCells):
    """What every cell shares: the gateway, the secret, the logs, the dataset's size."""

    def __init__(self, args: argparse.Namespace, work: Path, gateway):
        super().__init__(work, gateway)
        self.args = args
        self.total = args.dataset.total_bytes

    def cell(self, system: str, n: int, verify: bool) -> dict:
        cell_dir = self.work / "cells" / f"{system}-{n}"
        cell_dir.mkdir(parents=True)
        try:
            with contextlib.ExitStack() as stack:
                if system.startswith("juicefs"):
                    return self._juicefs(system, cell_dir, stack)
                if system == "s3-raw":
                    return self._raw_s3()
                if system.startswith("s3-fast"):
                    return self._raw_fast(4 * MiB if system == "s3-fast-4M" else 16 * MiB)
                return self._cachefs(system, cell_dir, stack, verify)
        finally:
            shutil.rmtree(cell_dir, ignore_errors=True)

    def _mount(self, name: str, cell_dir: Path, stack, extra: list) -> dict:
        m = {"mountpoint": self.work / "mnt" / name, "metrics": f"127.0.0.1:{host.free_port()}",
             "log": self.logs / f"{cell_dir.name}-{name}.log"}
        m["mountpoint"].mkdir(parents=True, exist_ok=True)
        m["proc"] = spawn([sys.executable, "-m", "cachefs", "mount", self.source, m["mountpoint"],
                           "--endpoint-url", self.gateway.endpoint_url, "--cache-dir", cell_dir / name,
                           "--metrics", m["metrics"], *extra],
                          m["log"], self.env, self.work)
        stack.callback(host.stop_session, m["proc"])
        stack.callback(host.unmount, m["mountpoint"])
        wait_mounted(m["proc"], m["mountpoint"], name, m["log"])
        return m

    def _cachefs(self, system: str, cell_dir: Path, stack, verify: bool) -> dict:
        if system == "cachefs-peer":
            port = host.free_port()
            w = {"addr": f"127.0.0.1:{port}", "metrics": f"127.0.0.1:{host.free_port()}",
                 "log": self.logs / f"{cell_dir.name}-worker.log"}
            w["proc"] = spawn([sys.executable, "-m", "cachefs", "worker", "--listen", w["addr"],
                               "--source", f"bench={self.source}", "--endpoint-url", self.gateway.endpoint_url,
                               "--secret-file", self.secret_file, "--cache-dir", cell_dir / "worker",
                               "--mem-size", WORKER_MEM, "--cache-size", CACHE_SIZE, "--metrics", w["metrics"]],
                              w["log"], self.env, self.work)
            stack.callback(host.stop_session, w["proc"])
            wait_listening(w["proc"], port, w["log"])
            peers = ["--peers", w["addr"], "--secret-file", self.secret_file]
            mount = self._mount("mount", cell_dir, stack, ["--mem-size", "256M", "--cache-size", "0", *peers])
            loader, loader_metrics = w["proc"], w["metrics"]
        else:
            mount = self._mount("mount", cell_dir, stack, ["--mem-size", "0", "--cache-size", CACHE_SIZE])
            loader, loader_metrics = mount["proc"], mount["metrics"]
        cmd = [sys.executable, "-m", "cachefs", "warmup", mount["mountpoint"], "-r", "--json"]
        if self.args.concurrency:
            cmd += ["--concurrency", str(self.args.concurrency)]
        gets_before = metric(scrape(loader_metrics), "cachefs_backend_requests_total", op="get")
        cpu = {"loader": loader.pid, "gateway": self.gateway.proc.pid}
        if loader is not mount["proc"]:
            cpu["mount"] = mount["proc"].pid
        r = self._timed(cmd, cpu)
        summary = json.loads(r.pop("stdout").splitlines()[-1])
        if summary.get("type") != "summary" or summary["exit"] != 0 or summary["bytes_done"] != self.total:
            raise RuntimeError(f"{system}: cachefs warmup did not load the whole dataset: {summary}")
        t = time.monotonic()
        disk = lambda: metric(scrape(loader_metrics), "cachefs_cache_used_bytes", tier="disk")  # noqa: E731
        settle(disk)  # the SSD tier is written behind the loads
        settle_s = max(0.0, time.monotonic() - t - 1.0)
        after = scrape(loader_metrics)
        r.update(
            bytes=summary["bytes_loaded"], node_seconds=summary["elapsed"], settle_s=settle_s, sync_s=_sync_seconds(),
            bytes_by_peers=summary["bytes_by_peers"], concurrency=summary["concurrency"],
            loader_gets=metric(after, "cachefs_backend_requests_total", op="get") - gets_before,
            cached_bytes={tier: metric(after, "cachefs_source_cached_bytes", tier=tier) for tier in ("mem", "disk")},
            disk_used=metric(after, "cachefs_cache_used_bytes", tier="disk"),
        )
        if r["cached_bytes"]["disk"] < self.total:
            raise RuntimeError(f"{system}: the SSD tier holds {r['cached_bytes']['disk']:.0f} bytes of the dataset "
                               f"after the warm-up, not {self.total}")
        if system == "cachefs-peer" and summary["bytes_by_peers"] != self.total:
            raise RuntimeError(f"cachefs-peer: only {summary['bytes_by_peers']} of {self.total} bytes went to the worker")
        if verify:
            r["verify"] = self._verify(cell_dir, stack, peers, loader_metrics)
        return r

    def _verify(self, cell_dir: Path, stack, peers: list, worker_metrics: str) -> dict:
        """Read every file through a fresh mount on the warm worker: the backend should see ~0 GETs."""
        mount = self._mount("verify", cell_dir, stack, ["--mem-size", "256M", "--cache-size", "0", *peers])
        before = scrape(worker_metrics)
        host.drop_page_cache()
        t = time.monotonic()
        read = 0
        for dirpath, _, names in os.walk(mount["mountpoint"]):
            for name in names:
                with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                    while chunk := f.read(4 * MiB):
                        read += len(chunk)
        seconds = time.monotonic() - t
        after_w, after_m = scrape(worker_metrics), scrape(mount["metrics"])
        out = {"bytes": read, "seconds": seconds,
               "mount_gets": metric(after_m, "cachefs_backend_requests_total", op="get"),
               "worker_gets": metric(after_w, "cachefs_backend_requests_total", op="get")
               - metric(before, "cachefs_backend_requests_total", op="get")}
        log(f"    verify: read {read / MiB:,.0f} MiB through a fresh mount in {seconds:.1f} s; backend GETs: "
            f"mount {out['mount_gets']:.0f}, worker {out['worker_gets']:.0f}")
        if read != self.total:
            raise RuntimeError(f"verify: read {read} bytes, the dataset has {self.total}")
        return out

    def _juicefs(self, system: str, cell_dir: Path, stack) -> dict:
        jb = host.juicefs_backend()
        volume = self.work / "jfs-volume" if system == "juicefs-s3" else self.gateway.workdir
        mnt = jb.JuicefsMount(volume, self.work / "mnt" / system, cache_dir=cell_dir / "juicefs",
                              cache_size=host.parse_size(CACHE_SIZE) >> 20, extra_args=["--read-only"])
        mnt.log_path = self.logs / f"{cell_dir.name}.log"
        stack.callback(mnt.stop)
        mnt.start()
        cmd = [jb.find_juicefs(), "warmup", mnt.mountpoint / PREFIX]
        if self.args.threads:
            cmd += ["--threads", str(self.args.threads)]
        object_before = object_get_bytes(mnt.metrics_addr)
        cpu = {"loader": mnt.proc.pid}
        if system == "juicefs-s3":
            cpu["gateway"] = self.gateway.proc.pid
        r = self._timed(cmd, cpu)
        r.pop("stdout")
        t = time.monotonic()
        blocks = lambda: metric(scrape(mnt.metrics_addr), "juicefs_blockcache_bytes")  # noqa: E731
        settle(blocks)  # cache writes may trail the warm-up's return
        r.update(bytes=self.total, settle_s=max(0.0, time.monotonic() - t - 1.0), sync_s=_sync_seconds(),
                 disk_used=blocks(),
                 threads=self.args.threads or 50, object_bytes=object_get_bytes(mnt.metrics_addr) - object_before)
        if r["disk_used"] < self.total:
            raise RuntimeError(f"juicefs: the block cache holds {r['disk_used']:.0f} bytes after the warm-up, "
                               f"the dataset {self.total}")
        return r

    def _raw_s3(self) -> dict:
        """The gateway's own pace: the large file read by s3fs with ranged GETs, nothing stored."""
        host.drop_page_cache()
        gateway_before, own_before = host.cpu_seconds(self.gateway.proc.pid), host.own_cpu_seconds()
        busy_before = host.busy_cpu_seconds()[0]
        r = raw_s3_read(self.gateway, self.args.dataset.big_size)
        return {"seconds": r["seconds"], "bytes": r["bytes"], "gets": r["gets"], "settle_s": 0.0, "sync_s": 0.0,
                "machine_busy_cores": (host.busy_cpu_seconds()[0] - busy_before) / r["seconds"],
                "cpu": {"loader": host.own_cpu_seconds() - own_before,
                        "gateway": host.cpu_seconds(self.gateway.proc.pid) - gateway_before}}

    def _raw_fast(self, range_size: int) -> dict:
        """The same bytes as a warm-up, through the gateway, by cachefs's own S3 client; nothing stored."""
        host.drop_page_cache()
        gateway_before, own_before = host.cpu_seconds(self.gateway.proc.pid), host.own_cpu_seconds()
        busy_before = host.busy_cpu_seconds()[0]
        r = raw_fast_read(self.gateway, self.args.dataset, range_size=range_size)
        return {"seconds": r["seconds"], "bytes": r["bytes"], "gets": r["gets"], "settle_s": 0.0, "sync_s": 0.0,
                "machine_busy_cores": (host.busy_cpu_seconds()[0] - busy_before) / r["seconds"],
                "cpu": {"loader": host.own_cpu_seconds() - own_before,
                        "gateway": host.cpu_seconds(self.gateway.proc.pid) - gateway_before}}

    def _timed(self, cmd: list, cpu_sessions: dict[str, int]) -> dict:
        """Drop the page cache, run ``cmd``, return its wall clock and the CPU seconds of the sessions."""
        host.drop_page_cache()
        cpu_before = {k: host.cpu_seconds(sid) for k, sid in cpu_sessions.items()}
        busy_before = host.busy_cpu_seconds()[0]
        t = time.monotonic()
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=self.env,
                             timeout=WARMUP_TIMEOUT)
        seconds = time.monotonic() - t
        busy = host.busy_cpu_seconds()[0] - busy_before
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited {res.returncode}: {res.stderr[-1000:]}{res.stdout[-500:]}")
        cpu = {k: host.cpu_seconds(sid) - cpu_before[k] for k, sid in cpu_sessions.items()}
        return {"seconds": seconds, "cpu": cpu, "machine_busy_cores": busy / seconds, "stdout": res.stdout}


# -- the run ------------------------------------------------------------------------------


def run(args: argparse.Namespace, data: dict, work: Path, shm: Path, stack: contextlib.ExitStack) -> None:
    data["machine"] = m = host.machine(work)
    m["loadavg_at_start"] = os.getloadavg()
    m["cachefs_digest"] = host.cachefs_digest()
    ds = args.dataset
    log(f"warmup: {m['hostname']}, {m['cores']} cores, {m['cachefs']}; work dir {work}")
    gateway = host.juicefs_backend().JuicefsS3(work / "backend")
    stack.callback(gateway.stop)
    gateway.start()
    log(f"S3 gateway {gateway.endpoint_url}; writing {ds.total_bytes / MiB:,.0f} MiB through it: 1 file of "
        f"{ds.big_size / MiB:,.0f} MiB, {ds.ttfb_count} of 8 MiB, {ds.small_count} of 64 KiB")
    data["write_s"] = ds.write(gateway, shm / "copy")
    if "juicefs-s3" in args.systems:
        log("copying the dataset into a JuiceFS volume stored on the same gateway")
        data["jfs_write_s"] = write_juicefs_on_gateway(gateway, work, shm / "copy")
    shutil.rmtree(shm / "copy")  # the local copy Dataset.write keeps is not needed here
    bench = Bench(args, work, gateway)
    for n in range(args.repeat):
        order = args.systems if n % 2 == 0 else args.systems[::-1]
        for system in order:
            r = bench.cell(system, n, verify=(system == "cachefs-peer" and n == 0 and not args.no_verify))
            r.update(system=system, repeat=n, mib_s=r["bytes"] / MiB / r["seconds"])
            data["runs"].append(r)
            log(f"  {n + 1}/{args.repeat} {system:13s} {r['seconds']:6.1f} s  {r['mib_s']:6.0f} MiB/s  "
                f"CPU {', '.join(f'{k} {v:.1f} s' for k, v in r['cpu'].items())}; settled +{r['settle_s']:.1f} s")
    if host.cachefs_digest() != m["cachefs_digest"]:
        data["cachefs_digest_end"] = host.cachefs_digest()


def write_juicefs_on_gateway(gateway, work: Path, copy: Path) -> float:
    """Make `work`/jfs-volume a JuiceFS volume whose blocks are objects on `gateway`, and
    copy the dataset (its local copy at `copy`) into it under PREFIX. Returns seconds."""
    jb = host.juicefs_backend()
    t0 = time.monotonic()
    volume = work / "jfs-volume"
    volume.mkdir()
    cmd = [jb.find_juicefs(), "format", "--no-agent", jb.meta_url(volume), JFS_VOLUME,
           "--storage", "minio", "--bucket", f"{gateway.endpoint_url}/{gateway.bucket}",
           "--access-key", gateway.access_key, "--secret-key", gateway.secret_key, "--trash-days", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise RuntimeError(f"juicefs format failed: {res.stdout}{res.stderr}")
    mnt = jb.JuicefsMount(volume, work / "mnt" / "jfs-fill", cache_dir=work / "jfs-fill-cache", cache_size=0)
    with mnt:
        shutil.copytree(copy, mnt.mountpoint / PREFIX)
    shutil.rmtree(work / "jfs-fill-cache", ignore_errors=True)
    return time.monotonic() - t0


def _sync_seconds() -> float:
    """How long `sync` takes right after a warm-up: the writes it left to the kernel
    (page cache not on disk yet), which the MiB/s above do not include."""
    t = time.monotonic()
    os.sync()
    return time.monotonic() - t


# -- the report ----------------------------------------------------------------------------


def medians(data: dict) -> dict[str, dict]:
    out = {}
    for system in data["systems"]:
        runs = [r for r in data["runs"] if r["system"] == system]
        if not runs:
            continue
        gib = runs[0]["bytes"] / GiB
        out[system] = {
            "n": len(runs),
            "mib_s": statistics.median(r["mib_s"] for r in runs),
            "all": [r["mib_s"] for r in runs],
            "seconds": statistics.median(r["seconds"] for r in runs),
            "settle_s": statistics.median(r["settle_s"] for r in runs),
            "sync_s": statistics.median(r.get("sync_s", 0.0) for r in runs),
            "cpu": {k: statistics.median(r["cpu"][k] for r in runs) / gib for k in runs[0]["cpu"]},
            "busy": statistics.median(r["machine_busy_cores"] for r in runs),
        }
    return out


def _landed(data: dict) -> dict[str, dict]:
    """Per warm-up system, the medians of its command's seconds and of the settling after, and its bytes."""
    out = {}
    for system in ("cachefs-peer", "cachefs-local", BASELINE, "juicefs"):
        runs = [r for r in data["runs"] if r["system"] == system]
        if runs:
            out[system] = {"bytes": runs[0]["bytes"], "seconds": statistics.median(r["seconds"] for r in runs),
                           "settle_s": statistics.median(r["settle_s"] for r in runs)}
    return out


def render(data: dict) -> str:
    ds = data["dataset"]
    med = medians(data)
    lines = [
        f"# Warm-up speed: `cachefs warmup` into a worker vs `juicefs warmup` "
        f"({data['started']} on {data['machine']['hostname']})",
        "",
        f"A local JuiceFS volume served over S3 by `juicefs gateway` on 127.0.0.1 (no gateway cache), holding "
        f"{ds['total'] / MiB:,.0f} MiB of random bytes: 1 file of {ds['big'] / MiB:,.0f} MiB, {ds['medium']} of "
        f"8 MiB, {ds['small']} of 64 KiB. Per repeat, each system in turn (order reversed every other repeat), "
        f"fresh processes over empty cache directories on the same disk, page cache dropped before each "
        f"warm-up. Time: the warm-up command's wall clock, start to exit.",
        "",
        f"- **cachefs-peer**: a `cachefs worker` (--mem-size {WORKER_MEM} --cache-size {CACHE_SIZE}, "
        f"--source the dataset's prefix on the gateway) and a mount with `--peers` to it (chunk size "
        f"{CHUNK_SIZE}, the default); `cachefs warmup MNT -r --json` (--concurrency "
        f"{data.get('concurrency') or 8}): the worker GETs every chunk from the gateway itself.",
        f"- **juicefs-s3** (the target's baseline): `juicefs mount --read-only --cache-size {CACHE_SIZE}` of a "
        "second JuiceFS volume holding the same bytes, **whose object storage is the same gateway** "
        "(`--storage minio`): every block it warms comes through the same S3 server, with HTTP and SigV4, "
        f"as cachefs's GETs do; `juicefs warmup MNT/bench` (--threads {data.get('threads') or 50}).",
        "- **juicefs** (reference): the same over the gateway's own volume, whose blocks JuiceFS reads "
        "**directly from local files** (`--storage file`): no HTTP, no SigV4, no gateway in its path. Not "
        "what the issue compares (a warm-up from the S3 gateway), shown for what JuiceFS does without one.",
        "- **cachefs-local**: a mount without peers (--mem-size 0 --cache-size "
        f"{CACHE_SIZE}: straight into its SSD tier); `cachefs warmup MNT -r --json`.",
        "- **s3-fast** (the ceiling, not a warm-up): every byte of the dataset read through the gateway by "
        "cachefs's own S3 client (`S3FastPath`: presigned URLs, kept-alive connections, bodies received into "
        "one buffer) from 8 threads in ranges of 16 MiB, as a warm-up's runs of 4 chunks make them, nothing "
        "stored; **s3-fast-4M** the same in 4 MiB ranges (one chunk each). What any warm-up through this gateway "
        "can reach here.",
        f"- **s3-raw** (reference, not a warm-up): the large file ({ds['big'] / MiB:,.0f} MiB) read through the "
        "gateway by s3fs in this process, 8 threads of ranged 4 MiB GETs, nothing stored: what the gateway "
        "gives a plain S3 client on this machine.",
        "",
        *report.experiment_lines(data),
    ]
    if med:
        lines += [
            "",
            f"| system | MiB/s (median) | each repeat | s | ÷ {BASELINE} | ÷ s3-fast | +s until the disk cache settled "
            "| +s for `sync` after | CPU s/GiB: loader | mount | gateway | busy cores (machine) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        jfs = med.get(BASELINE, {}).get("mib_s")
        ceiling = med.get(CEILING, {}).get("mib_s")
        for system, s in med.items():
            ratio = f"{s['mib_s'] / jfs:.2f}×" if jfs else "—"
            of_ceiling = f"{s['mib_s'] / ceiling:.2f}×" if ceiling else "—"
            cpu = s["cpu"]
            lines.append(
                f"| {LABELS[system]} | {s['mib_s']:,.0f} | {' / '.join(f'{v:,.0f}' for v in s['all'])} "
                f"| {s['seconds']:.1f} | {ratio} | {of_ceiling} | {s['settle_s']:.1f} | {s['sync_s']:.1f} | {cpu['loader']:.1f} "
                f"| {report.fmt(cpu.get('mount'), '')} | {report.fmt(cpu.get('gateway'), '')} | {s['busy']:.2f} |"
            )
        lines += [
            "",
            "CPU: utime + stime from /proc of the process doing the loads (the worker; `juicefs mount`; the "
            "local mount; for s3-raw the bench process), of the cachefs mount that runs the job, and of the S3 gateway "
            "(juicefs-s3's blocks come through it too; the reference juicefs row has none in its path), per GiB warmed. Busy cores: the whole machine "
            "during the warm-up (2 cores).",
        ]
        node = {system: statistics.median(r["bytes"] / MiB / r["node_seconds"] for r in data["runs"]
                                          if r["system"] == system) for system in med if system.startswith("cachefs")}
        if node:
            lines += ["", "The node's own count (the job's `elapsed` in the summary: no CLI start-up): "
                      + ", ".join(f"{LABELS[k]} {v:,.0f} MiB/s" for k, v in node.items()) + "."]
        if "cachefs-peer" in med and jfs:
            ratio = med["cachefs-peer"]["mib_s"] / jfs
            verdict = "**pass**" if ratio >= TARGET else "**MISS**"
            lines += ["", f"**Target**: cachefs warm-up into a worker ≥ {TARGET:.1f} × juicefs warmup through "
                      f"the same gateway: {ratio:.2f}× — {verdict}."]
            landed = {k: s["bytes"] / MiB / (s["seconds"] + s["settle_s"]) for k, s in _landed(data).items()}
            if "cachefs-peer" in landed and BASELINE in landed:
                lines += ["", "Until the bytes are in the cache (the command's time plus the time until the cache's "
                          "byte count stopped growing, in steps of 0.2 s: JuiceFS writes its cache blocks behind the "
                          "command's return): " + ", ".join(f"{LABELS[k]} {v:,.0f} MiB/s" for k, v in landed.items())
                          + f"; {landed['cachefs-peer'] / landed[BASELINE]:.2f}× (not the target's measure)."]
            if ceiling:
                lines += ["", f"**Against the gateway's ceiling** (cachefs's S3 client alone, the same bytes and "
                          f"request sizes, nothing stored: {ceiling / jfs:.2f}× {BASELINE}): the warm-up into a worker "
                          f"reaches {med['cachefs-peer']['mib_s'] / ceiling:.2f}× of it."]
    verify = [r["verify"] for r in data["runs"] if "verify" in r]
    if verify:
        v = verify[0]
        lines += ["", f"Check after the first cachefs-peer warm-up: the worker's cache held the data, and a full "
                  f"read of the {v['bytes'] / MiB:,.0f} MiB through a fresh mount on its ring took {v['seconds']:.1f} s "
                  f"with {v['mount_gets']:.0f} backend GETs by the mount and {v['worker_gets']:.0f} by the worker."]
    lines += report.error_lines(data["errors"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ds = args.dataset
    data = {"dataset": {"total": ds.total_bytes, "big": ds.big_size, "medium": ds.ttfb_count, "small": ds.small_count},
            "systems": args.systems, "repeat": args.repeat, "concurrency": args.concurrency,
            "threads": args.threads, "chunk_size": CHUNK_SIZE, "runs": []}
    finished = host.run_experiment("warmup", args, data, run, render, lambda d: bool(d["runs"]))
    return host.exit_code(finished)


if __name__ == "__main__":
    sys.exit(main())
