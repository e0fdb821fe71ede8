"""The Python API: what the `cachefs` commands do, for notebooks and job scripts.

    import cachefs

    with cachefs.mount("/mnt/data", datasets={"md": "s3://bucket/market"},
                       options=["--endpoint-url", "http://127.0.0.1:9000"]) as m:
        df = pandas.read_parquet(f"{m.mountpoint}/md/2026/ticks.parquet")
        print(m.status().datasets)

A mount runs as its own process (the same `cachefs mount` the shell starts), so a
crash or Ctrl-C in the notebook never leaves its kernel holding a FUSE session:
leaving the `with` block unmounts, whatever ends it. Everything else goes through
the mount's control socket, like `cachefs dataset`, `status` and `refresh`.
Errors are `cachefs.errors.ConfigError`, with the same one-line messages as the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
from typing import Any, Callable

from cachefs import control_client
from cachefs.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TierStatus:
    name: str  # "mem" or "disk"
    used_bytes: int
    capacity_bytes: int
    chunks: int


@dataclasses.dataclass(frozen=True)
class DatasetStatus:
    name: str
    url: str
    subdir: str
    read_only: bool
    quota: int | None
    open_files: int
    cached_bytes: dict[str, int]  # tier name -> bytes of this dataset it holds
    chunk_reads: dict[str, int]  # since start, by where they came from: each tier, "peer", "backend"
    hit_ratio: dict[str, float | None]  # the share of chunk_reads each of those served (None: no reads yet)
    evictions: dict[str, int]  # tier name -> chunks of this dataset it evicted since start


@dataclasses.dataclass(frozen=True)
class PeerStatus:
    node: str
    up: bool


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    node: str
    version: str
    hot_path: str  # "native" or "purepy"
    pid: int
    tiers: list[TierStatus]
    datasets: list[DatasetStatus]
    peers: list[PeerStatus]
    pins: list[dict]  # the leases in force: id, owner, paths, bytes, expires


@dataclasses.dataclass(frozen=True)
class Residency:
    """What is cached of a file, or of the files right in a directory, where the mount
    reads it: in its own tiers, or at each chunk's owner on the ring."""

    files: int
    bytes: int
    cached_bytes: int
    ratio: float
    chunks: int
    cached_chunks: int
    nodes: dict[str, int]  # node -> bytes of these files it holds (this mount and its peers)
    unanswered: list[str]  # peers that did not answer (counted as holding none)


def _pick(cls: type, row: dict) -> Any:
    """`cls` from a JSON row, ignoring fields a newer node adds."""
    return cls(**{f.name: row.get(f.name) for f in dataclasses.fields(cls)})


class Mount:
    """A running cachefs mount. Use `cachefs.mount(...)`; leaving its `with` block unmounts."""

    def __init__(self, mountpoint: str, process: subprocess.Popen, log_file: str):
        self.mountpoint = mountpoint
        self.process = process
        self.log_file = log_file

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc_info) -> None:
        self.unmount()

    def _call(self, op: str, **args: Any) -> Any:
        return control_client.request(control_client.socket_for(self.mountpoint), op, args, label=self.mountpoint)

    def add_dataset(self, name: str, url: str, **options: Any) -> None:
        """Serve `url` at MOUNTPOINT/`name` from now on, without a remount.

        Args:
            options: the `--dataset` options: subdir="v2", quota="20G", endpoint="http://...",
                profile="research", access_key_file=..., secret_key_file=... (True for flags).
        """
        parts = [f"{name}={url}"]
        for key, value in options.items():
            parts.append(key if value is True else f"{key}={value}")
        self._call("dataset.add", spec=",".join(parts))

    def remove_dataset(self, name: str, force: bool = False) -> None:
        """Stop serving dataset `name`; refused while files of it are open, unless `force`."""
        self._call("dataset.remove", name=name, force=force)

    def datasets(self) -> list[DatasetStatus]:
        return [_pick(DatasetStatus, row) for row in self._call("dataset.list")]

    def status(self) -> NodeStatus:
        s = self._call("status")
        return NodeStatus(
            node=s["node"], version=s["version"], hot_path=s["hot_path"], pid=s["pid"],
            tiers=[_pick(TierStatus, t) for t in s["tiers"]],
            datasets=[_pick(DatasetStatus, d) for d in s["datasets"]],
            peers=[_pick(PeerStatus, p) for p in s["peers"]],
            pins=s.get("pins", []),
        )

    def refresh(self, path: str = "", recursive: bool = False) -> dict[str, int]:
        """Ask the backend again now for what the mount knows of `path` (relative to the
        mountpoint, or absolute inside it). Returns {"changed": n, "gone": n}."""
        return self._call("refresh", path=self._inner(path), recursive=recursive)

    def pin(self, *paths: str, ttl: float, owner: str = "python") -> dict:
        """Keep the chunks of `paths` on the SSD tier (with peers: at each chunk's owner on
        the ring) for `ttl` seconds (or until `unpin`). Returns the lease: id, owner,
        paths, bytes, expires, and with peers the bytes kept at each owner ("peers")."""
        return self._call("pin.add", paths=[self._inner(p) for p in paths], ttl=float(ttl), owner=owner)

    def unpin(self, *paths: str, owner: str | None = None) -> list[dict]:
        """End the leases pinning any of `paths`, or all of `owner`'s. Returns them."""
        return self._call("pin.remove", paths=[self._inner(p) for p in paths], owner=owner, ids=[])

    def warmup(
        self, *paths: str, recursive: bool = True, concurrency: int | None = None, wait_ratio: float | None = None,
        on_progress: Callable[[dict], Any] | None = None,
    ) -> dict:
        """Load `paths` (relative to the mountpoint, or absolute inside it) into the cache
        that will serve them, as `cachefs warmup` does: with peers, each chunk at its
        owner on the ring. `on_progress(p)` gets the job's counters as it goes (at least
        twice a second): bytes_done, bytes_total, ratio (None while listing),
        files_done, files_total, state, ... With `wait_ratio`, returns as soon as that
        share of the bytes is cached; the node goes on loading the rest.

        Returns:
            The last counters; "failed_count" and "failures" name files that failed.
        Raises:
            ConfigError: a path outside the mount or in no dataset, or the job failed
                (it cannot fit, a listing failed); one line. Interrupted
                (KeyboardInterrupt), the job is cancelled first.
        """
        from cachefs import warmup_client

        sock = control_client.socket_for(self.mountpoint)
        args: dict[str, Any] = {"paths": [self._inner(p) for p in paths], "recursive": recursive}
        if concurrency is not None:
            args["concurrency"] = concurrency  # else the node's default (8, as the CLI's)
        # Interrupted (a KeyboardInterrupt), `follow` cancels the job first.
        p, _ = warmup_client.follow(sock, self.mountpoint, args, wait_ratio, on_progress or (lambda p: None))
        if p["state"] in ("failed", "cancelled"):
            raise ConfigError(f"warmup {p['job']} {p['state']}: {p['error'] or 'cancelled'}")
        return p

    def residency(self, path: str) -> Residency:
        """What this node caches of a file, or of the files right in a directory."""
        return _pick(Residency, json.loads(os.getxattr(self._outer(path), "user.cachefs.cached")))

    def _outer(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.mountpoint, path)

    def _inner(self, path: str) -> str:
        return control_client.mount_path(self._outer(path))

    def unmount(self, timeout: float = 30.0) -> None:
        """Unmount and wait for the daemon to exit; lazily if files are still open."""
        if self.process.poll() is not None:
            return
        result = subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def mount(
    mountpoint: str,
    source: str | None = None,
    *,
    datasets: dict[str, str] | None = None,
    config: str | None = None,
    cache_dir: str | None = None,
    cache_size: str | int | None = None,
    mem_size: str | int | None = None,
    options: list[str] = (),
    log_file: str | None = None,
) -> Mount:
    """Mount `source` at `mountpoint`, or `datasets` (name -> URL, or NAME=URL,OPTS
    specs as values) at MOUNTPOINT/NAME, and return once the mount answers.

    Args:
        options: more `cachefs mount` flags, e.g. ["--peers", "dns+workers:7070", "--secret-file", "/etc/cachefs/secret"].
        log_file: where the mount logs (default: `cachefs.cli.default_log_file`, in cachefs's own
            log directory, named after the mountpoint).

    Raises:
        ConfigError: the mount could not start; nothing is left mounted. The message
            names the problem, as the CLI's does.
    """
    mountpoint = os.path.abspath(mountpoint)
    argv = ["mount", *([source] if source else []), mountpoint]
    for name, url in (datasets or {}).items():
        argv += ["--dataset", url if url.startswith(f"{name}=") else f"{name}={url}"]
    for flag, value in (("--config", config), ("--cache-dir", cache_dir), ("--cache-size", cache_size),
                        ("--mem-size", mem_size)):
        if value is not None:
            argv += [flag, os.path.abspath(value) if flag in ("--config", "--cache-dir") else str(value)]
    argv += list(options)
    from cachefs.cli import default_log_file, start_mount

    log_file = log_file or default_log_file(mountpoint)

    argv += ["--log-file", log_file]
    try:
        process = start_mount(argv, log_file)
    except ConfigError as e:
        raise ConfigError(f"mount {mountpoint}: {e}", exitcode=e.exitcode) from None
    return Mount(mountpoint, process, log_file)
