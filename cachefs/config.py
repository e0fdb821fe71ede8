"""Mount configuration: one dataclass, checked once, before anything starts."""

from __future__ import annotations

import dataclasses
import errno
import fractions
import math
import os
import re
import stat

from cachefs.cache.policy import ADMISSIONS
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


# Fields whose flag is not their name with dashes.
_FLAGS = {"peer_secret": "--secret-file", "peer_secret_file": "--secret-file", "secret_key": "--secret-key-file"}


def flag_name(field: str) -> str:
    """The command-line flag that sets config field `field`."""
    return _FLAGS.get(field) or "--" + field.replace("_", "-")


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
    pin_quota: int | None = None  # bytes pins may hold on the SSD tier; None: half of cache_size
    read_ahead: int = 8
    admission: str = ADMISSIONS[0]  # which new chunks the SSD tier stores: ADMISSIONS (cachefs.cache.policy)
    backend_concurrency: int = 16
    backend_timeout: float = 30.0
    backend_retries: int = 3
    endpoint_url: str | None = None
    access_key: str | None = dataclasses.field(default=None, repr=False)
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    peers: str | None = None  # --peers spec: static list, dns+NAME:PORT or file:PATH
    peer_secret: bytes | None = dataclasses.field(default=None, repr=False)
    peer_timeout: float = 5.0
    metrics: tuple[str, int] | None = None
    log_level: str = "INFO"
    # Where a field's value came from ("node.toml: cache.size"), so that check()
    # names the key the user wrote; a field not listed is named by its flag.
    labels: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def label(self, name: str) -> str:
        """How to name field `name` in an error: its file key, else its flag."""
        return self.labels.get(name) or flag_name(name)

    def check(self, *, environment: bool = True) -> None:
        """Validate every field.

        Args:
            environment: also check the machine (the cache dir is writable); off for
                `--print-config`, which must not touch the disk.

        Raises:
            ConfigError: with one sentence naming the bad value.
        """
        L = self.label
        if self.chunk_size < 64 << 10 or self.chunk_size > 64 << 20 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"{L('chunk_size')} {format_size(self.chunk_size)}: must be a power of two from 64K to 64M")
        if self.mem_size < 0:
            raise ConfigError(f"{L('mem_size')} must not be negative")
        if self.mem_size and self.mem_size < 2 * self.chunk_size:
            raise ConfigError(
                f"{L('mem_size')} {format_size(self.mem_size)}: must be 0 (off) or at least two chunks "
                f"({format_size(2 * self.chunk_size)})"
            )
        if self.cache_size < 0:
            raise ConfigError(f"{L('cache_size')} must not be negative")
        if self.cache_size and self.cache_size < 2 * self.chunk_size:
            raise ConfigError(
                f"{L('cache_size')} {format_size(self.cache_size)}: must be 0 (no SSD tier) or at least two chunks"
            )
        if self.pin_quota is not None and not 0 <= self.pin_quota <= self.cache_size:
            raise ConfigError(
                f"{self.label('pin_quota')} {format_size(self.pin_quota)}: must be at most the SSD tier's "
                f"size ({format_size(self.cache_size)})"
            )
        if not 0.0 <= self.free_space_ratio < 1.0:
            raise ConfigError(f"{L('free_space_ratio')} {self.free_space_ratio}: must be in [0, 1)")
        self._check_durations("backend_timeout", "peer_timeout")
        if self.read_ahead < 0:
            raise ConfigError(f"{L('read_ahead')} must not be negative")
        if self.admission not in ADMISSIONS:
            raise ConfigError(f"{L('admission')} {self.admission!r}: must be one of {', '.join(ADMISSIONS)}")
        if self.backend_concurrency < 1:
            raise ConfigError(f"{L('backend_concurrency')} must be at least 1")
        for name in ("backend_timeout", "peer_timeout"):
            if getattr(self, name) == 0:
                raise ConfigError(f"{L(name)} must be positive")
        if self.backend_retries < 0:
            raise ConfigError(f"{L('backend_retries')} must not be negative")
        if (self.access_key is None) != (self.secret_key is None):
            raise ConfigError("--access-key and --secret-key-file go together")
        if self.cache_size and environment:
            self._check_cache_dir()

    def _check_cache_dir(self) -> None:
        try:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
            probe = os.path.join(self.cache_dir, f".probe-{os.getpid()}")
            with open(probe, "wb") as f:
                f.write(b"x")
            os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"{self.label('cache_dir')} {self.cache_dir}: not writable ({e.strerror})") from None

    @property
    def pin_limit(self) -> int:
        """Bytes pins may hold: --pin-quota, or half the SSD tier."""
        return self.cache_size // 2 if self.pin_quota is None else self.pin_quota

    def _check_durations(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"{self.label(name)} must be a finite number")
            if value < 0:
                raise ConfigError(f"{self.label(name)} must not be negative")


@dataclasses.dataclass(kw_only=True)
class MountOptions(CacheConfig):
    """What every mount needs besides its sources: where, the kernel's caches, sharing."""

    mountpoint: str
    attr_ttl: float = 1.0
    entry_ttl: float = 1.0
    dir_ttl: float = 1.0
    meta_cache_entries: int = DEFAULT_META_CACHE_ENTRIES
    meta_refresh: float = 0.0  # seconds between background refreshes of cached metadata; 0: off
    serve: tuple[str, int] | None = None  # share this mount's cache with the ring
    fuse_tasks: int = 64
    # The bdi read_ahead_kb of the mount: big enough that buffered sequential reads
    # reach the daemon as 1 MiB requests instead of 128 KiB ones.
    kernel_read_ahead_kb: int = 4096
    # Read-write datasets (docs/semantics.md, "Writes").
    writeback: bool = False  # close() returns before the upload; journaled, uploaded in the background
    stage_size: int | None = None  # bytes of written files staged at once; None: half of --cache-size (or 1G)
    upload_concurrency: int = 4  # requests (PUTs, parts) uploading at once, per dataset
    part_size: int = 8 << 20  # files up to this size go in one PUT; larger ones in parts of this size
    # S3 PUT bodies sent as UNSIGNED-PAYLOAD, not hashed into their SigV4 signature: less CPU
    # (the client's and the server's), and over plain HTTP nothing shields the body from
    # whoever can change the traffic (docs/semantics.md)
    unsigned_payload: bool = False
    uid: int | None = None  # owner of every entry; None: the mount process's
    gid: int | None = None
    umask: int = 0o022  # permission bits taken off rw datasets' entries (ro ones show no write bits)

    @property
    def stage_limit(self) -> int:
        """Bytes the staging area may hold: --stage-size, or half the SSD tier (1G without one)."""
        if self.stage_size is not None:
            return self.stage_size
        return self.cache_size // 2 if self.cache_size else 1 << 30

    def check(self, *, environment: bool = True) -> None:
        self._check_durations("attr_ttl", "entry_ttl", "dir_ttl", "meta_refresh")
        if self.stage_size is not None and self.stage_size < 1 << 20:
            raise ConfigError(f"{self.label('stage_size')} {format_size(self.stage_size)}: must be at least 1M")
        if self.cache_size and self.stage_limit > self.cache_size:
            raise ConfigError(
                f"{self.label('stage_size')} {format_size(self.stage_limit)}: staged files count against "
                f"--cache-size ({format_size(self.cache_size)}); give at most that"
            )
        if self.upload_concurrency < 1:
            raise ConfigError(f"{self.label('upload_concurrency')} must be at least 1")
        if not 5 << 20 <= self.part_size <= 5 << 30:
            raise ConfigError(f"{self.label('part_size')} {format_size(self.part_size)}: S3 takes parts of 5M to 5G")
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1 << 32:
                raise ConfigError(f"{self.label(name)} {value}: not a user or group id")
        if not 0 <= self.umask <= 0o777:
            raise ConfigError(f"{self.label('umask')} {self.umask:o}: give an octal mask like 022")
        if self.meta_cache_entries < 1:
            raise ConfigError(f"{self.label('meta_cache_entries')} {self.meta_cache_entries}: must be at least 1")
        super().check(environment=environment)
        if (self.peers or self.serve) and not self.peer_secret:
            raise ConfigError(
                f"{self.label('peers') if self.peers else self.label('serve')} needs "
                f"{self.label('peer_secret')}: peers authenticate each other"
            )
        if not self.mountpoint:
            raise ConfigError("no MOUNTPOINT: give it on the command line or as mountpoint in the config file")
        if environment:
            self._check_mountpoint()

    def _check_mountpoint(self) -> None:
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
    drain_timeout: float = 30.0  # on SIGTERM, wait this long at most for requests in flight
    # Drop the pages of chunk files once served (they count against a container's memory limit).
    drop_page_cache: bool = True

    def check(self, *, environment: bool = True) -> None:
        super().check(environment=environment)
        if not (math.isfinite(self.drain_timeout) and self.drain_timeout >= 0):
            raise ConfigError(f"--drain-timeout {self.drain_timeout:g}: give a number of seconds, 0 or more")
        if not self.sources:
            raise ConfigError("a worker needs at least one --source NAME=URL")
        if not self.peer_secret:
            raise ConfigError("a worker needs --secret-file: without it anyone could read its sources")

    @property
    def node(self) -> str:
        return self.advertise or f"{self.listen[0]}:{self.listen[1]}"

    def datasets(self) -> list[DatasetConfig]:
        """The --source NAME=URLs as datasets, with the node-wide endpoint and keys."""
        keys = Credentials(access_key=self.access_key, secret_key=self.secret_key) if self.access_key else Credentials()
        out = []
        for name, url in self.sources.items():
            s3 = url_scheme(url) in S3_SCHEMES
            out.append(DatasetConfig(
                name=name,
                url=url if "://" in url else os.path.abspath(url),
                endpoint_url=self.endpoint_url if s3 else None,
                credentials=keys if s3 else Credentials(),
                origin=f"--source {name}: ",
            ))
        return out


_NAME_MAX = 255  # bytes: a dataset is a directory entry of the mount
_BAD_NAME_CHARS = re.compile(r"[/,=\s\x00-\x1f\x7f]")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
S3_SCHEMES = ("s3", "s3a")


def check_dataset_name(name: str, what: str) -> None:
    """A dataset name is a directory of the mount and a word of `--dataset NAME=...`.

    Raises:
        ConfigError: empty, too long, starts with '.', or holds '/', ',', '=',
            white space or a control character.
    """
    if not name:
        raise ConfigError(f"{what}: a dataset needs a name")
    if len(name.encode()) > _NAME_MAX:
        raise ConfigError(f"{what}: dataset name {name[:20]!r}... is longer than {_NAME_MAX} bytes")
    if name.startswith("."):
        raise ConfigError(f"{what}: dataset name {name!r} must not start with '.'")
    bad = _BAD_NAME_CHARS.search(name)
    if bad:
        raise ConfigError(f"{what}: dataset name {name!r} must not contain {bad.group()!r}")


def url_scheme(url: str) -> str:
    """'s3' for s3://bucket/prefix; '' for a local path (file:// included)."""
    if not _SCHEME_RE.match(url):
        return ""
    scheme = url.partition("://")[0].lower()
    return "" if scheme == "file" else scheme


@dataclasses.dataclass(frozen=True, kw_only=True)
class Credentials:
    """How a dataset's backend gets its keys: an access key and a secret key file,
    an AWS profile, or (neither given) the environment: AWS_* variables and the AWS
    config files. Secrets are only ever read from files, never passed as arguments,
    so they cannot show in `ps`; repr() shows where they come from, not what they are."""

    profile: str | None = None
    access_key: str | None = dataclasses.field(default=None, repr=False)
    access_key_file: str | None = None
    secret_key_file: str | None = None
    secret_key: str | None = dataclasses.field(default=None, repr=False)  # read from secret_key_file

    @property
    def source(self) -> str:
        """'profile', 'keys' or 'environment'."""
        if self.profile:
            return "profile"
        if self.access_key or self.secret_key_file:
            return "keys"
        return "environment"

    def key_pair(self) -> tuple[str, str] | None:
        """(access key, secret key) for the backend; None: use the profile or the environment."""
        if self.access_key and self.secret_key:
            return self.access_key, self.secret_key
        return None

    def check(self, label) -> None:
        if self.profile and (self.access_key or self.access_key_file or self.secret_key_file):
            raise ConfigError(f"{label('profile')}: give a profile or access_key + secret_key_file, not both")
        if (self.access_key is None) != (self.secret_key is None):
            raise ConfigError(f"{label('secret_key_file')}: access_key (or access_key_file) and secret_key_file go together")


@dataclasses.dataclass(kw_only=True)
class DatasetConfig:
    """One dataset of a node: `url` (and `subdir` below it) served read-only at
    MOUNTPOINT/NAME, or at the mount root for the one-source form
    `cachefs mount SOURCE MOUNTPOINT` (name "")."""

    name: str
    url: str
    read_only: bool = True
    subdir: str = ""  # relative, no '.' or '..' parts; the mount enforces it stays below
    quota: int | None = None  # bytes of cache this dataset may hold; None: no own limit
    pin_quota: int | None = None  # bytes of this dataset pins may hold; None: only the node's --pin-quota
    endpoint_url: str | None = None
    credentials: Credentials = dataclasses.field(default_factory=Credentials)
    # How errors name this dataset's keys: "node.toml: datasets.feats." or "--dataset feats: ".
    origin: str = dataclasses.field(default="", repr=False, compare=False)

    @property
    def at_root(self) -> bool:
        """Served at the mount root: the one-source form."""
        return not self.name

    @property
    def is_s3(self) -> bool:
        return url_scheme(self.url) in S3_SCHEMES

    @property
    def source(self) -> str:
        """The URL the backend opens: `url` with `subdir` below it."""
        return f"{self.url.rstrip('/')}/{self.subdir}" if self.subdir else self.url

    def label(self, key: str) -> str:
        return f"{self.origin or f'dataset {self.name}: '}{key}"

    def check(self) -> None:
        """Validate this dataset on its own (NodeConfig.check looks across datasets).

        Raises:
            ConfigError: one sentence naming the dataset and the key.
        """
        L = self.label
        if not self.at_root:
            check_dataset_name(self.name, L("name"))
        if not self.url:
            raise ConfigError(f"{L('url')}: a dataset needs a URL")
        if re.search(r"[\x00-\x1f\x7f]", self.url):
            raise ConfigError(f"{L('url')}: {self.url!r} holds a control character")
        if not self.at_root and not _SCHEME_RE.match(self.url) and not os.path.isabs(self.url):
            raise ConfigError(f"{L('url')}: {self.url!r} is neither a URL (s3://...) nor an absolute path")
        self._check_subdir()
        if self.quota is not None and self.quota <= 0:
            raise ConfigError(f"{L('quota')}: {self.quota} must be positive (leave it out for no quota)")
        if self.pin_quota is not None and self.pin_quota < 0:
            raise ConfigError(f"{L('pin_quota')}: {self.pin_quota} must not be negative")
        if not self.is_s3:
            for key, value in (("endpoint", self.endpoint_url), ("credentials", self.credentials.source != "environment")):
                if value:
                    raise ConfigError(f"{L(key)}: only S3 datasets take an {key}; {self.url} is not s3://")
        if self.endpoint_url and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise ConfigError(f"{L('endpoint')}: {self.endpoint_url!r} is not an http:// or https:// URL")
        self.credentials.check(L)

    def _check_subdir(self) -> None:
        if not self.subdir:
            return
        what = self.label("subdir")
        if self.subdir.startswith("/"):
            raise ConfigError(f"{what}: {self.subdir!r} must be relative to the dataset's URL")
        if re.search(r"[\x00-\x1f\x7f]", self.subdir):
            raise ConfigError(f"{what}: {self.subdir!r} holds a control character")
        parts = self.subdir.split("/")
        if parts[-1] == "":
            parts.pop()  # one trailing slash is harmless
        for part in parts:
            if part in ("", ".", ".."):
                raise ConfigError(f"{what}: {self.subdir!r} must not have empty, '.' or '..' parts")


@dataclasses.dataclass(kw_only=True)
class NodeConfig(MountOptions):
    """A cachefs node: its tiers, peers and metrics, and the datasets it serves,
    each at MOUNTPOINT/NAME, or one dataset named "" at the mount root.

    Built by `cachefs.loader.load_node` from flags and a TOML file; `check()` once.
    """

    datasets: list[DatasetConfig] = dataclasses.field(default_factory=list)
    run_dir: str = ""  # the control socket's directory; "" means CACHE_DIR/run
    peer_secret_file: str | None = None  # where peer_secret was read from, for --print-config

    def __post_init__(self) -> None:
        if not self.run_dir:
            self.run_dir = os.path.join(self.cache_dir, "run")

    @property
    def root_dataset(self) -> DatasetConfig | None:
        """The dataset served at the mount root (the one-source form), if that is what this node is."""
        if len(self.datasets) == 1 and self.datasets[0].at_root:
            return self.datasets[0]
        return None

    def check(self, *, environment: bool = True) -> None:
        super().check(environment=environment)
        if not os.path.isabs(self.run_dir):
            raise ConfigError(f"{self.label('run_dir')} {self.run_dir}: must be an absolute path")
        if not self.datasets:
            raise ConfigError("nothing to mount: give SOURCE MOUNTPOINT, --dataset NAME=URL or [datasets.NAME] in --config")
        seen: set[str] = set()
        for dataset in self.datasets:
            if dataset.at_root and len(self.datasets) > 1:
                raise ConfigError("SOURCE serves one source at the mount root; it cannot be combined with datasets")
            if dataset.name in seen:
                raise ConfigError(f"{dataset.label('name')}: dataset {dataset.name!r} is given twice")
            seen.add(dataset.name)
            dataset.check()
        if environment and any(not d.read_only for d in self.datasets) and not self.cache_size:
            self._check_cache_dir()  # the staging area lives there even without an SSD tier


