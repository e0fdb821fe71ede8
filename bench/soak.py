"""Soak: 3 mounts on a ring of cache workers, 100 concurrent readers, a worker
restarted and the backend frozen for 10 s in the middle.

    .venv/bin/python -m bench.soak [--duration 600] [--mem-size 64M] [--report FILE]

Starts the JuiceFS S3 gateway on 127.0.0.1 (scripts/juicefs_backend.py), writes a
dataset of 2 x --mem-size (three quarters in big files, one quarter in 128 KiB
files) with an xxh3 checksum of every 64 KiB block, then starts --workers
`cachefs worker`s on a ring and --mounts mounts on that ring (MEM --mem-size,
a small SSD tier on the mounts, --backend-timeout 5), all bound to 127.0.0.1.
--readers threads read through the mounts, each mount a third of them: sequential
readers (whole big files, 1 MiB reads), random readers (4..256 KiB at random
64 KiB-aligned offsets) and small-file readers (open, read whole, close); the page
cache is dropped for each range first, so every read reaches the daemons. Every
byte read is checked against the checksums.

After a short warm-up and a settle (trio's idle worker threads exit after 10 s),
the fds and threads of each daemon are counted; then the soak runs --duration
seconds: at 30 % worker 0 is stopped (SIGTERM) and started again on the same port
and cache dir; at 50 % the gateway is SIGSTOPped for --pause seconds. After the
readers stop and the same settle, fds and threads are counted again.

Expectations (exit 1 if any fails): no read error except EIO in reads that overlap
the pause (plus --grace seconds after it: the backend timeout and the breaker's
cool-down); every byte read verified; each daemon's peak RSS under --mem-size +
150 MiB; each daemon's fds and threads at the end equal to the start (for the
restarted worker: its new process at the end against the old one at the start).

Everything started is unmounted and stopped on the way out, also on failure or ^C.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from bench import host
from bench.host import MiB
from bench.systems import spawn, wait_listening, wait_mounted, write_secret

BLOCK = 64 << 10
BIG_FILE = 8 * MiB
SMALL_FILE = 128 << 10
CHUNK_SIZE = "256K"
BACKEND_TIMEOUT = 5.0
RSS_HEADROOM = 150 * MiB
FDS_KEPT = 256  # cachefs/cache/disk.py _FDS_KEPT: chunk files the SSD tier keeps open


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = host.argument_parser("python -m bench.soak", __doc__)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of soak (default %(default)g)")
    p.add_argument("--mem-size", default="64M", help="MEM tier of every daemon (default %(default)s)")
    p.add_argument("--dataset-size", help="bytes of data (default: 2 x --mem-size)")
    p.add_argument("--mounts", type=int, default=3, help="cachefs mounts (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="cachefs workers on the ring (default %(default)s)")
    p.add_argument("--readers", type=int, default=100, help="concurrent reader threads (default %(default)s)")
    p.add_argument("--pause", type=float, default=10.0, help="seconds the backend is frozen (default %(default)g)")
    p.add_argument("--grace", type=float, default=BACKEND_TIMEOUT + 5.0,
                   help="seconds after the pause in which EIO is still expected (default %(default)g)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of reading before the first count")
    p.add_argument("--settle", type=float, default=11.0, help="idle seconds before each count of fds and threads")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="parent of the work directory")
    p.add_argument("--report", help="also write the report (markdown) to this file")
    args = p.parse_args(argv)
    args.mem_bytes = host.parse_size(args.mem_size)
    args.dataset_bytes = host.parse_size(args.dataset_size) if args.dataset_size else 2 * args.mem_bytes
    if args.duration < 30 or args.pause >= args.duration / 2 - 5:
        p.error("--duration must be at least 30 s and leave room for the pause")
    return args


# -- the dataset ------------------------------------------------------------------


@dataclass
class Dataset:
    big: list[str]
    small: list[str]
    sizes: dict[str, int]
    blocks: dict[str, list[int]]  # xxh3_64 of each BLOCK of each file


def make_dataset(gateway, prefix: str, total: int) -> Dataset:
    big_n = max(1, (total * 3 // 4) // BIG_FILE)
    small_n = max(1, (total - big_n * BIG_FILE) // SMALL_FILE)
    fs = gateway.s3fs()
    ds = Dataset([f"big/{i:03d}.bin" for i in range(big_n)], [f"small/{i // 64:02d}/{i:04d}.bin" for i in range(small_n)], {}, {})
    for name in ds.big + ds.small:
        data = os.urandom(BIG_FILE if name.startswith("big/") else SMALL_FILE)
        fs.pipe_file(f"{gateway.bucket}/{prefix}/{name}", data)
        ds.sizes[name] = len(data)
        ds.blocks[name] = [xxhash.xxh3_64_intdigest(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK)]
    return ds


# -- the readers --------------------------------------------------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    reads: int = 0
    bytes_read: int = 0
    bytes_verified: int = 0
    errors: list[tuple[float, float, str, str]] = field(default_factory=list)  # (start, end, kind, what)
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int, verified: int) -> None:
        with self.lock:
            self.reads += 1
            self.bytes_read += n
            self.bytes_verified += verified
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def error(self, start: float, kind: str, what: str) -> None:
        with self.lock:
            self.errors.append((start, time.monotonic(), kind, what))


def _read_range(fd: int, ds: Dataset, name: str, offset: int, length: int) -> int:
    """Read [offset, offset+length) (BLOCK-aligned) from fd and check every block; returns bytes verified."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)  # reach the daemon, not the page cache
    # A short read is legal (the kernel returns what it has when a later part fails, and
    # the next read gets the error): read on, as any reader does.
    data = b""
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise ValueError(f"end of file after {len(data)} of {length} bytes at {offset}")
        data += more
    for i in range(0, length, BLOCK):
        if xxhash.xxh3_64_intdigest(data[i : i + BLOCK]) != ds.blocks[name][(offset + i) // BLOCK]:
            raise ValueError(f"wrong bytes in block {(offset + i) // BLOCK}")
    return length


def reader(kind: str, root: Path, ds: Dataset, tally: Tally, stop: threading.Event, seed: int) -> None:
    rnd = random.Random(seed)
    while not stop.is_set():
        name = rnd.choice(ds.small if kind == "small" else ds.big)
        size = ds.sizes[name]
        start = time.monotonic()
        try:
            fd = os.open(root / name, os.O_RDONLY)
        except OSError as e:
            tally.error(start, errno.errorcode.get(e.errno, str(e.errno)), f"open {name}")
            stop.wait(0.2)
            continue
        try:
            if kind == "small":
                ranges = [(0, size)]
            elif kind == "sequential":
                ranges = [(off, min(MiB, size - off)) for off in range(0, size, MiB)]
            else:
                ranges = []
                for _ in range(8):
                    blocks = rnd.randint(1, 4) * rnd.choice((1, 1, 4))
                    first = rnd.randrange(size // BLOCK - blocks + 1)
                    ranges.append((first * BLOCK, blocks * BLOCK))
            for offset, length in ranges:
                if stop.is_set():
                    break
                start = time.monotonic()
                try:
                    verified = _read_range(fd, ds, name, offset, length)
                except OSError as e:
                    tally.error(start, errno.errorcode.get(e.errno, str(e.errno)), f"{kind} {name}@{offset}")
                    stop.wait(0.2)  # a failing backend: don't spin
                    break
                except ValueError as e:
                    tally.error(start, "WRONG", f"{kind} {name}@{offset}: {e}")
                    break
                tally.add(kind, length, verified)
        finally:
            os.close(fd)


def run_readers(args, mounts: list[dict], ds: Dataset, tally: Tally, seconds: float, events=()) -> None:
    """Start the readers, run `events` ((at seconds, callable)) on time, stop the readers after `seconds`."""
    stop = threading.Event()
    kinds = ["sequential", "random", "random", "sequential", "small"]  # 40 % / 40 % / 20 %
    threads = [
        threading.Thread(target=reader, name=f"reader{i}", daemon=True,
                         args=(kinds[i % len(kinds)], mounts[i % len(mounts)]["mountpoint"], ds, tally, stop, i))
        for i in range(args.readers)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        for at, action in sorted(events, key=lambda e: e[0]):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            action()
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        raise RuntimeError(f"{len(stuck)} readers did not finish within 120 s of the stop: {stuck[:5]}")


# -- the daemons -----------------------------------------------------------------------


def _close_wait_inodes() -> set[str]:
    """Inodes of the TCP sockets in CLOSE_WAIT: the peer closed, the owner never did (a leak)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "08":
                    found.add(fields[9])
    return found


def proc_counts(pid: int) -> dict:
    """Threads and open fds by kind: sockets (pooled connections; those in CLOSE_WAIT
    apart), chunk files the SSD tier keeps open (up to _FDS_KEPT), and the rest."""
    close_wait = _close_wait_inodes()
    counts: dict = {"threads": host._status_kib(pid, "Threads"), "other fds": 0, "sockets": 0,
                    "close-wait": 0, "kept chunk files": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                counts["sockets"] += 1
                counts["close-wait"] += target[8:-1] in close_wait
            elif "/chunks/" in target:
                counts["kept chunk files"] += 1
            else:
                counts["other fds"] += 1
    return counts


class RssSampler:
    """Samples VmRSS of the daemons every second, to say when each peak was."""

    def __init__(self, daemons: list[dict]):
        self.daemons = daemons
        self.peak: dict[str, tuple[int, float]] = {}
        self.samples: dict[str, list[int]] = {d["name"]: [] for d in daemons}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            for d in self.daemons:
                rss = host._status_kib(d["proc"].pid, "VmRSS") * 1024
                self.samples[d["name"]].append(rss)
                if rss > self.peak.get(d["name"], (0, 0.0))[0]:
                    self.peak[d["name"]] = (rss, now)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_worker(w: dict, cluster: dict, stack: contextlib.ExitStack) -> None:
    w["proc"] = spawn(
        [sys.executable, "-m", "cachefs", "worker", "--listen", w["addr"], "--source", f"soak={cluster['source']}",
         "--endpoint-url", cluster["gateway"].endpoint_url, "--secret-file", cluster["secret"],
         "--cache-dir", w["cache"], "--chunk-size", CHUNK_SIZE, "--mem-size", cluster["mem"], "--cache-size", "0",
         "--backend-timeout", str(BACKEND_TIMEOUT), "--drain-timeout", "5", "--metrics", w["metrics"]],
        w["log"], cluster["env"], cluster["work"])
    proc = w["proc"]
    stack.callback(host.stop_session, proc)
    wait_listening(proc, w["port"], w["log"])


def _stop_mount(m: dict) -> None:
    host.lazy_unmount(m["mountpoint"])
    host.stop_session(m["proc"])


def _thaw(proc) -> None:
    if proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)


def run(args, work: Path, stack: contextlib.ExitStack, lines: list[str]) -> bool:
    ok = True

    def say(text: str) -> None:
        lines.append(text)
        host.log(text)

    def expect(cond: bool, text: str) -> None:
        nonlocal ok
        ok &= cond
        say(f"{'ok  ' if cond else 'FAIL'} {text}")

    jb = host.juicefs_backend()
    gateway = jb.JuicefsS3(work / "gateway")
    gateway.start()
    stack.callback(gateway.stop)
    # A frozen gateway cannot be stopped with SIGTERM: always thaw it first.
    stack.callback(lambda: _thaw(gateway.proc))
    t = time.monotonic()
    ds = make_dataset(gateway, "soak", args.dataset_bytes)
    total = sum(ds.sizes.values())
    say(f"dataset: {len(ds.big)} files of {BIG_FILE // MiB} MiB + {len(ds.small)} of {SMALL_FILE >> 10} KiB "
        f"= {total / MiB:.0f} MiB ({total / args.mem_bytes:.1f} x --mem-size {args.mem_size}), "
        f"written in {time.monotonic() - t:.1f} s")

    cluster = {"source": f"s3://{gateway.bucket}/soak", "gateway": gateway, "secret": work / "secret",
               "env": host.hermetic_env(gateway.env()), "work": work, "mem": args.mem_size}
    write_secret(cluster["secret"])
    (work / "logs").mkdir()
    workers = []
    for i in range(args.workers):
        port = host.free_port()
        w = {"name": f"worker{i}", "addr": f"127.0.0.1:{port}", "port": port, "cache": work / f"wcache{i}",
             "metrics": f"127.0.0.1:{host.free_port()}", "log": work / "logs" / f"worker{i}.log"}
        start_worker(w, cluster, stack)
        workers.append(w)
    mounts = []
    for j in range(args.mounts):
        m = {"name": f"mount{j}", "mountpoint": work / "mnt" / f"m{j}", "log": work / "logs" / f"mount{j}.log"}
        m["mountpoint"].mkdir(parents=True)
        m["proc"] = spawn(
            [sys.executable, "-m", "cachefs", "mount", cluster["source"], m["mountpoint"],
             "--endpoint-url", gateway.endpoint_url, "--cache-dir", work / f"mcache{j}",
             "--chunk-size", CHUNK_SIZE, "--mem-size", args.mem_size, "--cache-size", "32M",
             "--backend-timeout", str(BACKEND_TIMEOUT), "--metrics", f"127.0.0.1:{host.free_port()}",
             "--peers", ",".join(w["addr"] for w in workers), "--secret-file", cluster["secret"]],
            m["log"], cluster["env"], work)
        stack.callback(_stop_mount, m)
        wait_mounted(m["proc"], m["mountpoint"], m["name"], m["log"])
        mounts.append(m)
    daemons = workers + mounts
    say(f"started: gateway, {len(workers)} workers, {len(mounts)} mounts (chunk {CHUNK_SIZE}, "
        f"--mem-size {args.mem_size}, mounts --cache-size 32M, workers MEM only, --backend-timeout {BACKEND_TIMEOUT:g})")

    warm = Tally()
    run_readers(args, mounts, ds, warm, args.warmup)
    time.sleep(args.settle)
    start_counts = {d["name"]: proc_counts(d["proc"].pid) for d in daemons}
    for d in daemons:
        host.reset_peak_rss(d["proc"].pid)

    tally = Tally()
    timeline: dict[str, float] = {}
    peaks: dict[str, int] = {}

    def restart_worker() -> None:
        w = workers[0]
        timeline["restart"] = time.monotonic()
        peaks[f"{w['name']} (before restart)"] = host._status_kib(w["proc"].pid, "VmHWM") * 1024
        host.stop_session(w["proc"], timeout=15)
        start_worker(w, cluster, stack)
        timeline["restarted"] = time.monotonic()

    def pause_backend() -> None:
        os.killpg(gateway.proc.pid, signal.SIGSTOP)
        timeline["pause"] = time.monotonic()
        time.sleep(args.pause)
        os.killpg(gateway.proc.pid, signal.SIGCONT)
        timeline["resume"] = time.monotonic()

    t0 = time.monotonic()
    with RssSampler(daemons) as sampler:
        run_readers(args, mounts, ds, tally, args.duration,
                    events=[(0.3 * args.duration, restart_worker), (0.5 * args.duration, pause_backend)])
    elapsed = time.monotonic() - t0
    for d in daemons:
        peaks[d["name"]] = host._status_kib(d["proc"].pid, "VmHWM") * 1024
    time.sleep(args.settle)
    end_counts = {d["name"]: proc_counts(d["proc"].pid) for d in daemons}
    dead = [d["name"] for d in daemons if d["proc"].poll() is not None]

    rel = lambda key: f"{timeline[key] - t0:.1f} s" if key in timeline else "never"  # noqa: E731
    say(f"soak: {elapsed:.0f} s, {args.readers} readers over {len(mounts)} mounts; worker0 restarted at "
        f"{rel('restart')} (serving again at {rel('restarted')}); backend paused {rel('pause')} .. {rel('resume')}")
    say(f"reads done: {tally.reads} ({', '.join(f'{k} {v}' for k, v in sorted(tally.by_kind.items()))}); "
        f"{tally.bytes_read / MiB:.0f} MiB read, {tally.bytes_read / MiB / elapsed:.1f} MiB/s")
    window = (timeline.get("pause", float("inf")), timeline.get("resume", float("inf")) + args.grace)
    inside = [e for e in tally.errors if e[0] < window[1] and e[1] >= window[0]]
    outside = [e for e in tally.errors if e not in inside]
    kinds_inside = sorted({e[2] for e in inside})
    say(f"errors: {len(tally.errors)} ({len(inside)} in reads overlapping the pause + {args.grace:g} s: "
        f"{', '.join(f'{k} x{sum(e[2] == k for e in inside)}' for k in kinds_inside) or 'none'}; "
        f"{len(outside)} outside)")
    for e in outside[:10]:
        say(f"    outside the pause at {e[0] - t0:.1f} s: {e[2]} {e[3]}")
    for e in [e for e in inside if e[2] != "EIO"][:10]:
        say(f"    inside the pause at {e[0] - t0:.1f} s: {e[2]} {e[3]}")
    expect(not outside, "no read error outside the backend pause")
    expect(set(kinds_inside) <= {"EIO"}, f"only EIO inside the pause (got {kinds_inside or 'none'})")
    expect(tally.bytes_verified == tally.bytes_read and tally.reads > 0,
           f"bytes verified against checksums: {tally.bytes_verified} of {tally.bytes_read}")
    expect(not dead, f"every daemon alive at the end{': dead ' + ', '.join(dead) if dead else ''}")
    limit = args.mem_bytes + RSS_HEADROOM
    for name, peak in peaks.items():
        sampled = sampler.peak.get(name)
        when = f" (sampled peak {sampled[0] / MiB:.0f} MiB at {sampled[1] - t0:.0f} s)" if sampled else ""
        expect(peak <= limit, f"peak RSS {name}: {peak / MiB:.0f} MiB <= {limit / MiB:.0f} MiB{when}")
    for name, samples in sampler.samples.items():
        if samples:
            marks = [samples[min(len(samples) - 1, len(samples) * q // 4)] for q in range(5)]
            say(f"RSS of {name} at 0/25/50/75/100 % of the soak: {' / '.join(f'{m / MiB:.0f}' for m in marks)} MiB")
    # Connection pools and the SSD tier's kept descriptors follow the load, so those are
    # checked for leaks (CLOSE_WAIT, the cap) rather than for equal counts.
    for d in daemons:
        a, b = start_counts[d["name"]], end_counts[d["name"]]
        note = " (a new process since the restart)" if d is workers[0] else ""
        say(f"{d['name']}{note}: " + ", ".join(f"{k} {a[k]} -> {b[k]}" for k in a))
        expect(a["threads"] == b["threads"] and a["other fds"] == b["other fds"],
               f"{d['name']}: threads and fds other than sockets and kept chunk files equal at start and end")
        expect(b["close-wait"] == 0, f"{d['name']}: no socket left in CLOSE_WAIT ({b['close-wait']})")
        expect(b["kept chunk files"] <= FDS_KEPT, f"{d['name']}: kept chunk files within the cap of {FDS_KEPT}")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host.unwind_on_signals()
    work = Path(tempfile.mkdtemp(prefix="cachefs-soak-", dir=args.workdir))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ok, lines = False, []
    try:
        with contextlib.ExitStack() as stack:
            ok = run(args, work, stack, lines)
    except Exception as exc:  # noqa: BLE001 - reported as a failed soak, with what was measured so far
        lines.append(f"FAIL the soak could not finish: {type(exc).__name__}: {exc}")
    finally:
        for mp in host.mounts_under(work):
            host.lazy_unmount(mp)
    verdict = "PASS" if ok else "FAIL"
    cmd = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([f"# soak {started}: {verdict}", "", f"`{cmd}` on {os.uname().nodename}, "
                        f"{os.cpu_count()} cores", "", "```", *lines, "```", ""])
    print(report)
    if args.report:
        Path(args.report).write_text(report)
    if ok:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work / 'logs'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
