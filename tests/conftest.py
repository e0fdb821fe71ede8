"""Shared fixtures: a real S3 server on loopback, test sources, and real cachefs mounts.

Sources (one test body runs against both through ``source``):
    ``local_source``  a directory; ``url`` is its absolute path.
    ``s3_source``     a fresh prefix ``s3://BUCKET/t-<uuid>`` on the session's
                      ``juicefs gateway`` (see scripts/juicefs_backend.py).

Both have ``kind``, ``url``, ``write(relpath, data)``, ``read(relpath)``,
``delete(relpath)``, ``mount_args`` and ``env``.

Mounts: ``cachefs_mount(source, *extra_args, cache_dir=None, env=None)`` runs
``python -m cachefs mount`` in the foreground in a subprocess and returns a
``CachefsMount`` once the mount point is in the mount table. Every mount is
torn down after the test (``fusermount3 -u -z``, then SIGTERM, then SIGKILL),
and a failing test prints the log tail.

Nothing here imports cachefs: the mount runs in a subprocess.
The hypothesis profile (below) is set here, before any test module is imported.
"""

from __future__ import annotations

import contextlib
import socket
import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# Property tests draw the same examples on every run (a seed from each test's source),
# and no deadline: a random draw once failed CI on a flaw of a test's generator, not of
# cachefs, and a CPU shared with mounts makes any per-example deadline flaky.
# HYPOTHESIS_PROFILE=explore draws afresh, for finding new failures on purpose.
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
MOUNT_TIMEOUT = 30.0
POLL_INTERVAL = 0.05


def _load_juicefs_backend():
    """Import scripts/juicefs_backend.py as module ``juicefs_backend``.

    scripts/ is not a package; registering the module lets test files
    ``import juicefs_backend``.
    """
    name = "juicefs_backend"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "juicefs_backend.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


juicefs_backend = _load_juicefs_backend()
free_port = juicefs_backend.free_port


async def serve_on_loopback(server, nursery) -> str:
    """Serve a PeerServer (in-process) on a free loopback port in `nursery`; its HOST:PORT."""
    import functools

    import trio

    listeners = await nursery.start(functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    return "127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
stop_process = juicefs_backend.stop_process
is_mounted = juicefs_backend._mounted
hermetic_env = juicefs_backend.hermetic_env  # the same environment as bench/ starts daemons in


def _tail(path: Path, lines: int = 60) -> str:
    return juicefs_backend.tail(path, lines)


# -- test outcome for finalizers -----------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures see whether the test failed (pytest docs, "Making test
    # result information available in fixtures").
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _test_failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call"))


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory):
    """Background mounts that are not given --log-file log under $XDG_STATE_HOME/cachefs:
    the session's temp tree, not the machine's /var/log (the daemons inherit it)."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


# -- the S3 backend --------------------------------------------------------------


@contextlib.contextmanager
def _gateway(workdir, **kwargs):
    gateway = juicefs_backend.JuicefsS3(workdir, **kwargs)
    try:
        gateway.start()
    except juicefs_backend.JuicefsError as exc:
        pytest.fail(f"cannot start the JuiceFS S3 gateway: {exc}", pytrace=False)
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="session")
def juicefs_s3(tmp_path_factory):
    """A ``JuicefsS3`` gateway (real ETags) for the whole session. Fails if it cannot start."""
    with _gateway(tmp_path_factory.mktemp("juicefs-s3")) as gateway:
        yield gateway


@pytest.fixture(scope="session")
def juicefs_s3_noetag(tmp_path_factory):
    """A second gateway that serves every object with an empty ETag (no ``--keep-etag``)."""
    with _gateway(tmp_path_factory.mktemp("juicefs-s3-noetag"), keep_etag=False) as gateway:
        yield gateway


# -- sources -----------------------------------------------------------------------


@dataclass
class LocalSource:
    """A directory source. ``url`` is its absolute path."""

    root: Path
    kind: str = "local"
    mount_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return str(self.root)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def write(self, relpath: str, data: bytes) -> None:
        target = self.path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def read(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()

    def delete(self, relpath: str) -> None:
        self.path(relpath).unlink()


@dataclass
class S3Source:
    """A unique prefix in the gateway's bucket. ``url`` is ``s3://BUCKET/t-<uuid>``.

    S3 has no directories: writing ``a/b/c`` makes ``a`` and ``a/b`` appear.
    """

    backend: Any  # juicefs_backend.JuicefsS3
    fs: Any  # s3fs.S3FileSystem
    prefix: str  # "BUCKET/t-<uuid>"
    kind: str = "s3"

    @property
    def url(self) -> str:
        return f"s3://{self.prefix}"

    @property
    def mount_args(self) -> list[str]:
        return ["--endpoint-url", self.backend.endpoint_url]

    @property
    def env(self) -> dict[str, str]:
        return self.backend.env()

    def key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}"

    def write(self, relpath: str, data: bytes) -> None:
        self.fs.pipe_file(self.key(relpath), data)

    def read(self, relpath: str) -> bytes:
        return self.fs.cat_file(self.key(relpath))

    def delete(self, relpath: str) -> None:
        # rm_file, not rm: the gateway rejects botocore's DeleteObjects (no Content-MD5).
        self.fs.rm_file(self.key(relpath))

    def info(self, relpath: str) -> dict:
        return self.fs.info(self.key(relpath))

    def clear(self) -> None:
        """Delete every object under the prefix (best effort)."""
        try:
            keys = self.fs.find(self.prefix)
        except FileNotFoundError:
            return
        for key in keys:
            try:
                self.fs.rm_file(key)
            except FileNotFoundError:
                pass


def _make_s3_source(backend) -> S3Source:
    return S3Source(backend=backend, fs=backend.s3fs(), prefix=f"{backend.bucket}/t-{uuid.uuid4().hex}")


@pytest.fixture
def local_source(tmp_path) -> LocalSource:
    root = tmp_path / "source"
    root.mkdir()
    return LocalSource(root=root)


@pytest.fixture
def s3_source(juicefs_s3):
    src = _make_s3_source(juicefs_s3)
    yield src
    src.clear()


@pytest.fixture
def s3_source_noetag(juicefs_s3_noetag):
    """Like ``s3_source``, on the gateway whose ETags are all empty."""
    src = _make_s3_source(juicefs_s3_noetag)
    yield src
    src.clear()


@pytest.fixture(params=["local", "s3"])
def source(request):
    """Runs the test once with ``local_source`` and once with ``s3_source``."""
    return request.getfixturevalue(f"{request.param}_source")


# -- cachefs mounts ------------------------------------------------------------------


@dataclass
class CachefsMount:
    """A running ``python -m cachefs mount`` (foreground) and its mount point."""

    mountpoint: str
    cache_dir: str
    metrics_addr: str
    proc: subprocess.Popen
    log_path: Path
    cmd: list[str]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_addr}/metrics"

    def is_mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Scrape the mount: ``{(sample_name, frozenset(labels.items())): value}``."""
        from prometheus_client.parser import text_string_to_metric_families

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0.0 if none).

        With all labels given this is the one series; e.g.
        ``metric("cachefs_read_bytes_total", source="backend")``.
        """
        wanted = set(labels.items())
        return sum(
            (value for (sample, sample_labels), value in self.metrics().items()
             if sample == name and wanted <= sample_labels),
            0.0,
        )

    def umount(self, timeout: float = 30.0) -> int:
        """``fusermount3 -u`` and wait for the daemon to exit.

        Returns:
            The daemon's exit code.
        """
        res = subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.fail(f"fusermount3 -u {self.mountpoint} failed: {res.stderr.strip()}\n{self.log_tail()}")
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cachefs did not exit {timeout:g}s after fusermount3 -u; log:\n{self.log_tail()}")

    def stop(self) -> None:
        """Tear down whatever is left: lazy unmount, SIGTERM, SIGKILL, reap."""
        if self.is_mounted():
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        stop_process(self.proc, timeout=10)


@pytest.fixture
def cachefs_mount(tmp_path, request) -> Callable[..., CachefsMount]:
    """Factory: ``cachefs_mount(source, *extra_args, cache_dir=None, env=None)``.

    ``source`` None mounts no SOURCE: the datasets come from ``extra_args``
    (``--dataset NAME=URL``, ``--config FILE``).

    Each call gets a new mount point, metrics port and log file under
    ``tmp_path``; ``cache_dir`` defaults to a new directory, and passing an
    earlier mount's ``cache_dir`` tests a warm restart. ``env`` is added to
    ``os.environ`` (minus AWS_*) and ``source.env``.
    """
    mounts: list[CachefsMount] = []

    def start(source, *extra_args: str, cache_dir: str | os.PathLike | None = None,
              env: dict[str, str] | None = None) -> CachefsMount:
        n = len(mounts)
        mountpoint = tmp_path / f"mnt{n}"
        mountpoint.mkdir()
        if cache_dir is None:
            cache_dir = tmp_path / f"cache{n}"
        metrics_addr = f"127.0.0.1:{free_port()}"
        log_path = tmp_path / f"mount{n}.log"
        cmd = [
            sys.executable, "-m", "cachefs", "mount", *([source.url] if source else []), str(mountpoint),
            "--cache-dir", str(cache_dir),
            "--metrics", metrics_addr,
            "--log-level", "debug",
            *(source.mount_args if source else []),
            *extra_args,
        ]
        with open(log_path, "ab") as log:
            log.write(f"=== {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=hermetic_env(source.env if source else None, env), cwd=REPO, start_new_session=True,
            )
        mount = CachefsMount(str(mountpoint), str(cache_dir), metrics_addr, proc, log_path, cmd)
        mounts.append(mount)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not mount.is_mounted():
            if proc.poll() is not None:
                pytest.fail(f"cachefs mount exited with {proc.returncode} before mounting; "
                            f"log {log_path}:\n{mount.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"cachefs did not mount {mountpoint} within {MOUNT_TIMEOUT:g}s; "
                            f"log {log_path}:\n{mount.log_tail()}")
            time.sleep(POLL_INTERVAL)
        return mount

    yield start

    failed = _test_failed(request)
    for mount in reversed(mounts):
        mount.stop()
        if failed:
            print(f"\n--- {mount.log_path} (exit {mount.proc.returncode}) ---\n{mount.log_tail()}")


@pytest.fixture
def run_cachefs() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cachefs(*args, env=None, timeout=60)`` runs ``python -m cachefs ARGS`` to completion.

    Returns the ``CompletedProcess`` with text ``stdout``/``stderr``.
    """

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cachefs", *map(str, args)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env=hermetic_env(env), cwd=REPO, timeout=timeout,
        )

    return run


# -- cache workers -------------------------------------------------------------------

# The peer secret of the workers and mounts tests start (see `secret_file`).
SECRET = "correct horse battery staple"


def _load_proxy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("s3_proxy", REPO / "scripts" / "s3_proxy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S3Proxy = _load_proxy().S3Proxy


@dataclass
class Worker:
    addr: str
    proc: subprocess.Popen
    log_path: Path
    metrics_addr: str

    def metric(self, name: str, **labels: str) -> float:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{self.metrics_addr}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        wanted = set(labels.items())
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and wanted <= set(s.labels.items())
        )


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET)
    path.chmod(0o600)  # cachefs refuses a secret others can read
    return path


@pytest.fixture
def s3_behind_proxy(s3_source):
    """The test's S3 prefix, reached through a counting proxy."""
    with S3Proxy(s3_source.backend.endpoint_url) as proxy:

        class Source:
            url = s3_source.url
            mount_args = ["--endpoint-url", proxy.endpoint_url]
            env = s3_source.env
            write = s3_source.write
            read = s3_source.read
            info = s3_source.info
            prefix = s3_source.prefix

        Source.proxy = proxy
        yield Source


@pytest.fixture
def cachefs_worker(tmp_path, request):
    workers: list[Worker] = []

    def start(source, *extra: str, secret=None, port=None) -> Worker:
        n = len(workers)
        addr = f"127.0.0.1:{port or free_port()}"
        metrics_addr = f"127.0.0.1:{free_port()}"
        log_path = tmp_path / f"worker{n}.log"
        secret_path = secret or tmp_path / "secret"
        cmd = [
            sys.executable, "-m", "cachefs", "worker", "--listen", addr, "--source", f"src={source.url}",
            "--secret-file", str(secret_path), "--cache-dir", str(tmp_path / f"wcache{n}"),
            "--chunk-size", "256K", "--mem-size", "64M", "--cache-size", "256M",
            "--metrics", metrics_addr, "--log-level", "debug", *source.mount_args, *extra,
        ]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=hermetic_env(source.env), cwd=REPO, start_new_session=True)
        worker = Worker(addr, proc, log_path, metrics_addr)
        workers.append(worker)
        host, port_ = addr.rsplit(":", 1)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"worker exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                socket.create_connection((host, int(port_)), timeout=1).close()
                return worker
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"worker did not listen within 30s:\n{_tail(log_path)}")
                time.sleep(0.05)

    yield start
    for w in workers:
        stop_process(w.proc, timeout=10)
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(f"\n--- {w.log_path} ---\n{_tail(w.log_path)}")
