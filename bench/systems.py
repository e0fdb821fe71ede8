"""The systems measured, one class each, all reading the same dataset.

Each has ``mount()``/``unmount()`` (unmount is idempotent and never raises for
a mount that is already gone), ``root`` (the dataset's directory while
mounted), ``pid`` (the session id of its daemon, for CPU and RSS; None for
tmpfs), ``wipe_cache()`` for cold runs, ``settle()`` to wait for cache writes
that happen after a read returns, and ``backend_counters()`` (bytes the
volume's object storage served, GETs where the system reports them).

``Bench`` (bench/__main__.py) holds what they share: the work directory, the
JuiceFS S3 gateway, the dataset and the tmpfs copy of it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar, Iterator

from bench import host
from cachefs.status import scrape  # {(sample name, frozenset(labels)): value}
from bench.dataset import BIG, PREFIX

COLD, WARM, DROPPED = "cold", "warm", "warm-dropped"
ALL_STATES = (COLD, WARM, DROPPED)

MOUNT_TIMEOUT = 60.0
CACHE_SIZE = "8G"  # every cache gets the same capacity, larger than the dataset


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, l), v in samples.items() if n == name and wanted <= l)


def object_get_bytes(addr: str | None) -> float:
    """Bytes a juicefs process (gateway or mount) read from the volume's object storage."""
    if not addr:
        return 0.0
    samples = scrape(addr)
    # The series is a counter without the _total suffix; accept either spelling.
    return sum(metric(samples, name, method="GET")
               for name in ("juicefs_object_request_data_bytes", "juicefs_object_request_data_bytes_total"))


def settle(probe, timeout: float = 60.0, quiet: float = 1.0) -> None:
    """Wait until ``probe()`` has not changed for ``quiet`` seconds (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    last, since = probe(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = probe()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


class System:
    """Base class. Subclasses set the class attributes and implement _start()/_stop()."""

    key: ClassVar[str]
    label: ClassVar[str]
    states: ClassVar[tuple[str, ...]] = ALL_STATES
    has_small_files: ClassVar[bool] = True  # False: serves big.bin only (the ceiling)
    skip_reason: ClassVar[str | None] = None
    note: ClassVar[str] = ""
    # Warm states: unmount and mount again after the warm-up pass, so only the
    # system's persistent cache (not its process memory) carries over.
    remount_after_warm_up: ClassVar[bool] = False
    runs_cachefs: ClassVar[bool] = False  # the report notes when cachefs's code changed mid-run

    def __init__(self, bench) -> None:
        self.bench = bench
        self.mountpoint = bench.work / "mnt" / self.key
        self.proc: subprocess.Popen | None = None
        self.log_path = bench.work / "logs" / f"{self.key}.log"

    # -- lifecycle -------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.mountpoint

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.unmount()
            raise

    def unmount(self) -> None:
        self._stop()
        host.unmount(self.mountpoint)
        if self.proc is not None:
            host.stop_session(self.proc)
            self.proc = None

    @contextlib.contextmanager
    def mounted(self, *, fresh: bool = False) -> Iterator["System"]:
        """Mounted for the ``with`` body; ``fresh`` wipes the cache first (cold)."""
        if fresh:
            self.wipe_cache()
        self.mount()
        try:
            yield self
        finally:
            self.unmount()

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        """Anything before the generic unmount + stop of the process group."""

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = spawn(cmd, self.log_path, env, self.bench.work)

    def _wait_mounted(self, read_ahead_kb: int | None = None) -> None:
        wait_mounted(self.proc, self.mountpoint, self.key, self.log_path, read_ahead_kb)

    # -- caches and counters ---------------------------------------------------------

    def before_cell(self, state: str) -> None:
        """Called before each timed cell, before the page cache is dropped."""

    def wipe_cache(self) -> None:
        """Empty the system's own cache (not the page cache); only while unmounted."""

    def settle(self) -> None:
        """Return once cache writes started by earlier reads are done."""

    def backend_counters(self) -> dict[str, float]:
        return {}

    def details(self) -> dict:
        """Settings worth keeping with the results (e.g. cachefs's --mem-size)."""
        return {}

    def read_ahead_kb(self) -> int | None:
        return host.read_ahead_kb(self.mountpoint)


# -- cachefs -----------------------------------------------------------------------


class Cachefs(System):
    """`python -m cachefs mount s3://BUCKET/bench` through the gateway; MEM + SSD tiers."""

    key = "cachefs"
    label = "cachefs MEM"
    mem_size = "2G"
    cache_size = CACHE_SIZE
    runs_cachefs = True
    extra_env: ClassVar[dict[str, str]] = {}

    def __init__(self, bench) -> None:
        super().__init__(bench)
        # Each variant has its own: they are mounted at the same time.
        self.cache_dir = bench.work / f"{self.key}-cache"
        self.metrics_addr: str | None = None

    def details(self) -> dict:
        return {"mem_size_bytes": host.parse_size(self.mem_size), "cache_size_bytes": host.parse_size(self.cache_size)}

    def _start(self) -> None:
        s3 = self.bench.s3
        self.metrics_addr = f"127.0.0.1:{host.free_port()}"
        self._spawn(
            [sys.executable, "-m", "cachefs", "mount", f"s3://{s3.bucket}/{PREFIX}", self.mountpoint,
             "--endpoint-url", s3.endpoint_url,
             "--cache-dir", self.cache_dir,
             "--mem-size", self.mem_size,
             "--cache-size", self.cache_size,
             "--metrics", self.metrics_addr,
             *self._extra_args()],
            env=host.hermetic_env(s3.env(), self.extra_env),
        )
        self._wait_mounted(read_ahead_kb=4096)

    def _extra_args(self) -> list:
        return []

    def wipe_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def metrics(self) -> dict:
        return scrape(self.metrics_addr)

    def settle(self) -> None:
        # SSD writes are write-behind: wait until the disk tier stops growing.
        settle(lambda: metric(self.metrics(), "cachefs_cache_used_bytes", tier="disk"))

    def backend_counters(self) -> dict[str, float]:
        m = self.metrics()
        return {
            "gets": metric(m, "cachefs_backend_requests_total", op="get"),
            "backend_requests": metric(m, "cachefs_backend_requests_total"),
            "cachefs_backend_bytes": metric(m, "cachefs_backend_read_bytes_total"),
            "served_bytes": metric(m, "cachefs_read_bytes_total"),
            "object_bytes": object_get_bytes(self.bench.s3.metrics_addr),
        }


class CachefsSsd(Cachefs):
    """cachefs with the MEM tier off, remounted over the cache directory its warm-up pass filled."""

    key = "cachefs-ssd"
    label = "cachefs SSD"
    mem_size = "0"
    states = (WARM, DROPPED)
    remount_after_warm_up = True


class CachefsPurePython(Cachefs):
    """cachefs MEM on its pure-Python hot path (CACHEFS_PUREPYTHON=1): native vs fallback."""

    key = "cachefs-purepy"
    label = "cachefs MEM purepy"
    states = (DROPPED,)
    extra_env = {"CACHEFS_PUREPYTHON": "1"}


class CachefsPeer(Cachefs):
    """A fresh cachefs mount (empty MEM, no SSD tier) whose chunks come from a warm `cachefs worker`.

    The worker (MEM 2G + SSD 8G, its own cache directory) starts with the first
    mount and stops with unmount(). The warm-up pass reads the dataset through the
    mount, so the worker fetches every chunk from the backend once. Before each
    timed cell the mount is restarted over a new empty cache directory: its MEM
    is empty, so every chunk comes from the worker (the mount's GETs stay 0).
    """

    key = "cachefs-peer"
    label = "cachefs peer hit"
    mem_size = "2G"
    cache_size = "0"  # no SSD tier: a hit can only be the worker's
    states = (DROPPED,)
    note = ("a fresh mount (empty MEM, --cache-size 0) per cell, served by a warm `cachefs worker` "
            "on 127.0.0.1 (--mem-size 2G --cache-size 8G)")

    def __init__(self, bench) -> None:
        super().__init__(bench)
        self.worker: subprocess.Popen | None = None
        self.worker_addr: str | None = None
        self.worker_metrics_addr: str | None = None
        self.worker_cache_dir = bench.work / f"{self.key}-worker-cache"
        self.worker_log_path = bench.work / "logs" / f"{self.key}-worker.log"
        self.secret_file = bench.work / f"{self.key}.secret"
        self.cells = 0

    def details(self) -> dict:
        return {**super().details(), "worker_mem_size_bytes": host.parse_size("2G"),
                "worker_cache_size_bytes": host.parse_size(CACHE_SIZE)}

    def _source(self) -> str:
        # Spelled exactly as the mount spells it: the worker refuses any other source.
        return f"s3://{self.bench.s3.bucket}/{PREFIX}"

    def _extra_args(self) -> list:
        return ["--peers", self.worker_addr, "--secret-file", self.secret_file]

    def _start(self) -> None:
        if self.worker is None or self.worker.poll() is not None:
            self._start_worker()
        super()._start()

    def _start_worker(self) -> None:
        self._stop_worker()
        write_secret(self.secret_file)
        s3 = self.bench.s3
        port = host.free_port()
        self.worker_addr = f"127.0.0.1:{port}"
        self.worker_metrics_addr = f"127.0.0.1:{host.free_port()}"
        cmd = [sys.executable, "-m", "cachefs", "worker",
               "--listen", self.worker_addr,
               "--source", f"bench={self._source()}",
               "--endpoint-url", s3.endpoint_url,
               "--secret-file", self.secret_file,
               "--cache-dir", self.worker_cache_dir,
               "--mem-size", "2G",
               "--cache-size", CACHE_SIZE,
               "--metrics", self.worker_metrics_addr]
        self.worker = spawn(cmd, self.worker_log_path, host.hermetic_env(s3.env()), self.bench.work)
        wait_listening(self.worker, port, self.worker_log_path)

    def _stop_worker(self) -> None:
        if self.worker is not None:
            host.stop_session(self.worker)  # SIGTERM, SIGKILL after 10 s, reap
            self.worker = None

    def unmount(self) -> None:
        try:
            super().unmount()
        finally:
            self._stop_worker()

    def before_cell(self, state: str) -> None:
        # A fresh mount: nothing in its MEM, so the cell's reads go to the worker.
        super().unmount()  # the mount only; the worker keeps its cache
        self.wipe_cache()
        self.mount()
        self.cells += 1

    def wipe_cache(self) -> None:
        super().wipe_cache()
        if self.worker is None:
            shutil.rmtree(self.worker_cache_dir, ignore_errors=True)

    def settle(self) -> None:
        # The worker writes its SSD tier behind the reads.
        settle(lambda: metric(scrape(self.worker_metrics_addr), "cachefs_cache_used_bytes", tier="disk"))

    def backend_counters(self) -> dict[str, float]:
        counters = super().backend_counters()  # the mount's: its GETs should stay 0
        m = self.metrics()
        w = scrape(self.worker_metrics_addr)
        counters.update(
            peer_bytes=metric(m, "cachefs_read_bytes_total", source="peer"),
            peer_requests=metric(m, "cachefs_peer_requests_total"),
            worker_gets=metric(w, "cachefs_backend_requests_total", op="get"),
            worker_served_bytes=metric(w, "cachefs_peer_served_bytes_total"),
        )
        return counters


# -- JuiceFS -----------------------------------------------------------------------


class Juicefs(System):
    """`juicefs mount` of the volume the gateway serves, with its block cache on /dev/shm."""

    key = "juicefs"
    label = "JuiceFS shm"
    note = "juicefs mount of the same volume: reads its object storage directly, not through S3"

    def __init__(self, bench) -> None:
        super().__init__(bench)
        self.cache_dir = self._cache_dir()
        self._mount = None

    def _cache_dir(self) -> Path:
        return self.bench.shm / "juicefs-cache"

    @property
    def root(self) -> Path:
        return self.mountpoint / PREFIX

    def _start(self) -> None:
        jb = self.bench.juicefs_backend
        self._mount = jb.JuicefsMount(
            self.bench.s3.workdir, self.mountpoint, cache_dir=self.cache_dir,
            cache_size=host.parse_size(CACHE_SIZE) >> 20, extra_args=["--read-only"],
        )
        self._mount.log_path = self.log_path
        try:
            self._mount.start()
        except jb.JuicefsError as exc:
            raise RuntimeError(str(exc)) from None
        self.proc = self._mount.proc

    def _stop(self) -> None:
        if self._mount is not None:
            self._mount.stop()  # umount (lazily if busy), stop and reap
            self._mount = None
            self.proc = None

    def wipe_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def settle(self) -> None:
        # JuiceFS writes blocks to its cache after the read returns.
        settle(lambda: metric(scrape(self._mount.metrics_addr), "juicefs_blockcache_bytes"))

    def backend_counters(self) -> dict[str, float]:
        return {"object_bytes": object_get_bytes(self._mount.metrics_addr if self._mount else None)}


class JuicefsDisk(Juicefs):
    key = "juicefs-disk"
    label = "JuiceFS disk"
    states = (WARM, DROPPED)

    def _cache_dir(self) -> Path:
        return self.bench.work / "juicefs-disk-cache"


# -- rclone ---------------------------------------------------------------------------


class Rclone(System):
    """`rclone mount --vfs-cache-mode full` over the same S3 gateway; its cache on disk."""

    key = "rclone"
    label = "rclone"

    def __init__(self, bench) -> None:
        super().__init__(bench)
        self.cache_dir = bench.work / "rclone-cache"

    def _start(self) -> None:
        if shutil.which("rclone") is None:
            raise RuntimeError("rclone is not installed (apt-get install rclone)")
        s3 = self.bench.s3
        config = self.bench.work / "rclone.conf"
        config.touch()  # empty: the remote comes from the environment, nothing from ~/.config
        remote = {
            "TYPE": "s3", "PROVIDER": "Minio", "ENDPOINT": s3.endpoint_url, "REGION": "us-east-1",
            "ACCESS_KEY_ID": s3.access_key, "SECRET_ACCESS_KEY": s3.secret_key, "ENV_AUTH": "false",
        }
        # hermetic_env drops AWS_CA_BUNDLE: rclone 1.60 fails with LoadCustomCABundleError when it is set.
        env = host.hermetic_env({"RCLONE_CONFIG": str(config)},
                                {f"RCLONE_CONFIG_BENCHS3_{k}": v for k, v in remote.items()})
        cmd = ["rclone", "mount", f"benchs3:{s3.bucket}/{PREFIX}", self.mountpoint,
               "--vfs-cache-mode", "full",
               "--vfs-cache-max-size", CACHE_SIZE,
               "--cache-dir", self.cache_dir,
               "--read-only",
               "--log-level", "NOTICE"]
        if os.getuid() == 0:
            cmd.append("--allow-other")
        self._spawn(cmd, env=env)
        self._wait_mounted()

    def wipe_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def settle(self) -> None:
        settle(lambda: _du(self.cache_dir))

    def backend_counters(self) -> dict[str, float]:
        return {"object_bytes": object_get_bytes(self.bench.s3.metrics_addr)}


# -- the limits ------------------------------------------------------------------------


class Ceiling(System):
    """bench/minimal_fs.py: pyfuse3 serving big.bin from one in-memory bytes object."""

    key = "ceiling"
    label = "pyfuse3 ceiling"
    states = (WARM, DROPPED)
    has_small_files = False

    def _start(self) -> None:
        self._spawn([sys.executable, "-m", "bench.minimal_fs", self.bench.local_root / BIG, self.mountpoint],
                    env=host.hermetic_env({"PYTHONPATH": str(host.REPO)}))
        self._wait_mounted(read_ahead_kb=4096)


class Tmpfs(System):
    """The tmpfs copy of the dataset: the physical limit (no FUSE, no daemon)."""

    key = "tmpfs"
    label = "tmpfs"
    states = (WARM, DROPPED)
    note = "drop_caches does not evict tmpfs pages: warm and warm-dropped are the same state"

    @property
    def root(self) -> Path:
        return self.bench.local_root

    def mount(self) -> None:
        pass

    def unmount(self) -> None:
        pass

    def read_ahead_kb(self) -> int | None:
        return None


SYSTEMS: dict[str, type[System]] = {
    cls.key: cls
    for cls in (Cachefs, CachefsSsd, CachefsPeer, CachefsPurePython, Juicefs, JuicefsDisk, Rclone, Ceiling, Tmpfs)
}
DEFAULT_SYSTEMS = ["cachefs", "cachefs-ssd", "cachefs-purepy", "cachefs-peer", "juicefs", "juicefs-disk", "rclone", "ceiling", "tmpfs"]


# -- starting daemons (also used by bench/scale.py and bench/warmup.py) -----------------


class GatewayCells:
    """What the cells of an experiment on the S3 gateway share: the dataset's source URL,
    a peer secret, the environment cachefs processes start in, and the log directory."""

    def __init__(self, work: Path, gateway) -> None:
        self.work = work
        self.gateway = gateway
        self.source = f"s3://{gateway.bucket}/{PREFIX}"  # workers refuse any other spelling
        self.secret_file = work / "secret"
        write_secret(self.secret_file)
        self.env = host.hermetic_env(gateway.env())
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)



def spawn(cmd: list, log_path: Path, env: dict[str, str] | None, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session (host.stop_session then stops all of it), output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        log.write(f"\n=== {' '.join(map(str, cmd))}\n".encode())
        log.flush()
        return subprocess.Popen(
            [str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True,
        )


def wait_mounted(proc: subprocess.Popen | None, mountpoint: Path, what: str, log_path: Path,
                 read_ahead_kb: int | None = None) -> None:
    """Until ``mountpoint`` is in the mount table (and, if given, its bdi read-ahead is set).

    Raises:
        RuntimeError: ``proc`` exited first or it took too long; the message holds the log's tail.
    """
    alive = lambda: proc is None or proc.poll() is None  # noqa: E731
    try:
        host.wait_for(lambda: host.is_mounted(mountpoint), MOUNT_TIMEOUT, f"mount {what}", alive)
        if read_ahead_kb is not None:
            host.wait_for(lambda: host.read_ahead_kb(mountpoint) == read_ahead_kb, 10.0,
                          f"{what}: read_ahead_kb={read_ahead_kb}", alive)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; log {log_path}:\n{host.tail(log_path)}") from None


def wait_listening(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    """Until a `cachefs worker` accepts connections on 127.0.0.1:``port``; RuntimeError with its log's tail if not."""
    try:
        host.wait_for(lambda: _accepts(port), MOUNT_TIMEOUT, "cachefs worker: listening",
                      lambda: proc.poll() is None, interval=0.1)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; log {log_path}:\n{host.tail(log_path)}") from None


def write_secret(path: Path) -> None:
    """A new random peer secret, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _accepts(port: int) -> bool:
    """True once something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks
            except OSError:
                pass
    return total
