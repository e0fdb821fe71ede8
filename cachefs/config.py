"""Mount configuration: one dataclass, checked once, before anything starts."""

from __future__ import annotations

import dataclasses
import errno
import fractions
import math
import os
import re
import stat

from cachefs.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
# Attributes and listings a mount keeps: about 35 MiB (docs/configuration.md).
DEFAULT_META_CACHE_ENTRIES = 100_000
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str, what: str) -> int:
    """Parse '4M', '100G', '4MiB' or plain bytes into bytes (binary units, like JuiceFS).

    Raises:
        ConfigError: the text is not a size.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"{what}: {text!r} is not a size (use e.g. 4M, 512M, 100G)")
    number, unit = match.group(1), match.group(2).upper()
    size = fractions.Fraction(number) * _UNITS[unit]  # exact: no float rounding of big sizes
    if size.denominator != 1:
        raise ConfigError(f"{what}: {text!r} is not a whole number of bytes")
    if size >= 1 << 63:
        raise ConfigError(f"{what}: {text!r} is too large")
    return int(size)


def parse_addr(text: str, what: str) -> tuple[str, int]:
    """Parse HOST:PORT.

    Raises:
        ConfigError: no port, or a port outside 1..65535.
    """
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def format_size(n: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


@dataclasses.dataclass(kw_only=True)
class CacheConfig:
    """What mounts and workers share: the cache tiers, the backend, the peers.
    `check()` rejects bad values; nothing is clamped quietly."""

    cache_dir: str = "/var/cache/cachefs"
    cache_size: int = 10 << 30
    mem_size: int = 512 << 20
    chunk_size: int = 4 << 20
    free_space_ratio: float = 0.1
    read_ahead: int = 8
    backend_concurrency: int = 16
    backend_timeout: float = 30.0
    backend_retries: int = 3
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    peers: str | None = None  # --peers spec: static list, dns+NAME:PORT or file:PATH
    peer_secret: bytes | None = dataclasses.field(default=None, repr=False)
    peer_timeout: float = 5.0
    metrics: tuple[str, int] | None = None
    log_level: str = "INFO"

    def check(self) -> None:
        """Validate every field.

        Raises:
            ConfigError: with one sentence naming the bad value.
        """
        if self.chunk_size < 64 << 10 or self.chunk_size > 64 << 20 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"--chunk-size {format_size(self.chunk_size)}: must be a power of two from 64K to 64M")
        if self.mem_size < 0:
            raise ConfigError("--mem-size must not be negative")
        if self.mem_size and self.mem_size < 2 * self.chunk_size:
            raise ConfigError(
                f"--mem-size {format_size(self.mem_size)}: must be 0 (off) or at least two chunks "
                f"({format_size(2 * self.chunk_size)})"
            )
        if self.cache_size < 0:
            raise ConfigError("--cache-size must not be negative")
        if self.cache_size and self.cache_size < 2 * self.chunk_size:
            raise ConfigError(
                f"--cache-size {format_size(self.cache_size)}: must be 0 (no SSD tier) or at least two chunks"
            )
        if not 0.0 <= self.free_space_ratio < 1.0:
            raise ConfigError(f"--free-space-ratio {self.free_space_ratio}: must be in [0, 1)")
        self._check_durations("backend_timeout", "peer_timeout")
        if self.read_ahead < 0:
            raise ConfigError("--read-ahead must not be negative")
        if self.backend_concurrency < 1:
            raise ConfigError("--backend-concurrency must be at least 1")
        for name in ("backend_timeout", "peer_timeout"):
            if getattr(self, name) == 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.backend_retries < 0:
            raise ConfigError("--backend-retries must not be negative")
        if (self.access_key is None) != (self.secret_key is None):
            raise ConfigError("--access-key and --secret-key-file go together")
        if self.cache_size:
            self._check_cache_dir()

    def _check_cache_dir(self) -> None:
        try:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
            probe = os.path.join(self.cache_dir, f".probe-{os.getpid()}")
            with open(probe, "wb") as f:
                f.write(b"x")
            os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"--cache-dir {self.cache_dir}: not writable ({e.strerror})") from None

    def _check_durations(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number")
            if value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")


@dataclasses.dataclass(kw_only=True)
class MountConfig(CacheConfig):
    """Everything a mount needs."""

    source: str
    mountpoint: str
    attr_ttl: float = 1.0
    entry_ttl: float = 1.0
    dir_ttl: float = 1.0
    meta_cache_entries: int = DEFAULT_META_CACHE_ENTRIES
    serve: tuple[str, int] | None = None  # share this mount's cache with the ring
    fuse_tasks: int = 64
    # The bdi read_ahead_kb of the mount: big enough that buffered sequential reads
    # reach the daemon as 1 MiB requests instead of 128 KiB ones.
    kernel_read_ahead_kb: int = 4096

    def check(self) -> None:
        self._check_durations("attr_ttl", "entry_ttl", "dir_ttl")
        if self.meta_cache_entries < 1:
            raise ConfigError(f"--meta-cache-entries {self.meta_cache_entries}: must be at least 1")
        super().check()
        if (self.peers or self.serve) and not self.peer_secret:
            raise ConfigError("--peers and --serve need --secret-file: peers authenticate each other")
        try:
            is_dir = stat.S_ISDIR(os.stat(self.mountpoint).st_mode)
        except OSError as e:
            hint = ""
            if e.errno == errno.ENOTCONN:  # a FUSE daemon died there and left its mount behind
                hint = f"; run fusermount3 -u {self.mountpoint}"
            raise ConfigError(f"mountpoint {self.mountpoint}: {e.strerror}{hint}") from None
        if not is_dir:
            raise ConfigError(f"mountpoint {self.mountpoint}: not a directory")
        if os.path.ismount(self.mountpoint):
            raise ConfigError(f"mountpoint {self.mountpoint}: already mounted (busy)")


@dataclasses.dataclass(kw_only=True)
class WorkerConfig(CacheConfig):
    """A cache worker: serves chunks of its sources to mounts and other workers."""

    listen: tuple[str, int]
    sources: dict[str, str]  # name -> source URL
    advertise: str | None = None  # HOST:PORT others know this worker by (default: --listen)

    def check(self) -> None:
        super().check()
        if not self.sources:
            raise ConfigError("a worker needs at least one --source NAME=URL")
        if not self.peer_secret:
            raise ConfigError("a worker needs --secret-file: without it anyone could read its sources")

    @property
    def node(self) -> str:
        return self.advertise or f"{self.listen[0]}:{self.listen[1]}"
