"""One loader: command-line flags and a TOML file (`--config`) become one NodeConfig.

Precedence: dataclass defaults, then the file, then flags. A flag names one
setting; `--dataset NAME=...` replaces the file's dataset of that NAME whole.
Every problem is one ConfigError naming where it is: `node.toml: cache.size`
for the file, `--cache-size` or `--dataset feats: quota` for flags.

Secrets are read here from the files the user names (never taken as values), so
they show in neither `ps`, nor a log, nor `--print-config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
import tomllib
from typing import Any, Callable

from cachefs.config import (
    CacheConfig,
    Credentials,
    DatasetConfig,
    NodeConfig,
    S3_SCHEMES,
    check_dataset_name,
    flag_name,
    format_size,
    parse_addr,
    parse_size,
    url_scheme,
)
from cachefs.errors import ConfigError

Parse = Callable[[Any, str], Any]

# -- values ------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _wrong_type(value: Any, what: str, expected: str) -> ConfigError:
    shown = "a table" if isinstance(value, dict) else f"{_type_name(value)} {value!r}"
    return ConfigError(f"{what}: expected {expected}, not {shown}")


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _wrong_type(value, what, "a string")
    if not value:
        raise ConfigError(f"{what}: must not be empty")
    return value


def _path(value: Any, what: str) -> str:
    value = _string(value, what)
    if not os.path.isabs(value):
        raise ConfigError(f"{what}: {value!r} must be an absolute path")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(value, what, "true or false")
    return value


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(value, what, "an integer")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(value, what, "a number")
    return float(value)


def _size(value: Any, what: str) -> int:
    """A size: bytes as an integer, or a string such as "100G"."""
    if isinstance(value, str):
        return parse_size(value, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(value, what, 'a size such as "100G" or a number of bytes')
    if value < 0:
        raise ConfigError(f"{what}: {value} is not a size (must not be negative)")
    return value


_DURATION_RE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any, what: str) -> float:
    """Seconds as a number, or a string such as "500ms", "30s", "5m", "1h", "2d".

    Raises:
        ConfigError: not a duration (a negative number is left for check() to refuse).
    """
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ConfigError(f"{what}: {value!r} is not a duration (use e.g. 30, 30s, 500ms, 5m)")
        return float(match.group(1)) * _SECONDS[match.group(2)]
    seconds = _number(value, what)
    if not math.isfinite(seconds):
        raise ConfigError(f"{what}: {value!r} is not a duration")
    return seconds


def _addr(value: Any, what: str) -> tuple[str, int]:
    return parse_addr(_string(value, what), what)


def _log_level(value: Any, what: str) -> str:
    level = _string(value, what).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{what}: {value!r} is not one of debug, info, warning, error")
    return level.upper()


def _peer_ring(value: Any, what: str) -> str:
    """The --peers spec, or in a file an array of "HOST:PORT[@WEIGHT]" strings."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{what}: the array is empty")
        for item in value:
            if not isinstance(item, str) or not item or "," in item:
                raise ConfigError(f'{what}: {item!r} is not a "HOST:PORT[@WEIGHT]" string')
        return ",".join(value)
    return _string(value, what)


def read_secret(path: str, what: str, others_may_read: bool = False) -> str:
    """The stripped content of a secret file, which only its owner may read (like ssh's private keys).

    Args:
        others_may_read: accept a file group or others may read (never one they may
            write: then someone else could swap the keys), for files whose mode the
            user cannot choose (Fluid's secret volumes).

    Raises:
        ConfigError: unreadable, empty, or readable or writable by group or others; the
            message names the file, never its content.
    """
    try:
        with open(path) as f:
            mode = os.fstat(f.fileno()).st_mode
            if others_may_read and mode & 0o022:
                raise ConfigError(f"{what} {path}: permissions {stat.S_IMODE(mode):04o}: writable by group or others")
            if not others_may_read and mode & 0o077:
                raise ConfigError(
                    f"{what} {path}: permissions {stat.S_IMODE(mode):04o} are too open; "
                    f"the secret must be readable by its owner only (chmod 600 {path})"
                )
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file") from None
    if not secret:
        raise ConfigError(f"{what} {path}: the file is empty")
    return secret


# -- node settings: one table for the file keys and the flags ------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str  # dotted key in the TOML file
    field: str  # NodeConfig field, and the argparse dest of its flag
    parse: Parse


def _umask(value: Any, what: str) -> int:
    """An octal mask: "027" (a string, as umask(1) prints it) or 0o27 (a TOML integer)."""
    if isinstance(value, str) and re.fullmatch(r"[0-7]{1,4}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _wrong_type(value, what, 'an octal mask like "022"')


SETTINGS = (
    Setting("mountpoint", "mountpoint", _path),
    Setting("run_dir", "run_dir", _path),
    Setting("log_level", "log_level", _log_level),
    Setting("cache.dir", "cache_dir", _path),
    Setting("cache.size", "cache_size", _size),
    Setting("cache.mem_size", "mem_size", _size),
    Setting("cache.chunk_size", "chunk_size", _size),
    Setting("cache.free_space_ratio", "free_space_ratio", _number),
    Setting("cache.pin_quota", "pin_quota", _size),
    Setting("cache.read_ahead", "read_ahead", _integer),
    Setting("cache.admission", "admission", _string),
    Setting("metadata.attr_ttl", "attr_ttl", parse_duration),
    Setting("metadata.entry_ttl", "entry_ttl", parse_duration),
    Setting("metadata.dir_ttl", "dir_ttl", parse_duration),
    Setting("metadata.cache_entries", "meta_cache_entries", _integer),
    Setting("metadata.refresh", "meta_refresh", parse_duration),
    Setting("backend.concurrency", "backend_concurrency", _integer),
    Setting("backend.timeout", "backend_timeout", parse_duration),
    Setting("backend.retries", "backend_retries", _integer),
    Setting("peers.ring", "peers", _peer_ring),
    Setting("peers.secret_file", "peer_secret_file", _path),
    Setting("peers.timeout", "peer_timeout", parse_duration),
    Setting("peers.serve", "serve", _addr),
    Setting("metrics.listen", "metrics", _addr),
    Setting("writes.writeback", "writeback", _bool),
    Setting("writes.stage_size", "stage_size", _size),
    Setting("writes.upload_concurrency", "upload_concurrency", _integer),
    Setting("writes.part_size", "part_size", _size),
    Setting("writes.unsigned_payload", "unsigned_payload", _bool),
    Setting("access.uid", "uid", _integer),
    Setting("access.gid", "gid", _integer),
    Setting("access.umask", "umask", _umask),
)
_BY_KEY = {s.key: s for s in SETTINGS}
_TABLES = {s.key.partition(".")[0] for s in SETTINGS if "." in s.key} | {"datasets"}

# Node-wide credential flags: the defaults of S3 datasets that name none of their own.
CREDENTIAL_FLAGS = ("endpoint_url", "access_key", "access_key_file", "secret_key_file")


# -- datasets: one parser for `--dataset` options and [datasets.NAME] keys --------------------

DATASET_KEYS: dict[str, Parse] = {
    "url": _string,
    "read_only": _bool,
    "subdir": _string,
    "quota": _size,
    "pin_quota": _size,
    "endpoint": _string,
    "profile": _string,
    "access_key": _string,
    "access_key_file": _path,
    "secret_key_file": _path,
}
_SPEC_OPTIONS = [k for k in DATASET_KEYS if k not in ("url", "read_only")]
_SECRET_KEYS = ("secret_key", "secret", "secret_access_key", "aws_secret_access_key", "password")


def _secret_refused(what: str) -> ConfigError:
    # Never echo the value: it is the secret.
    return ConfigError(f"{what}: secrets are read from files only (so they never show in ps or logs): use secret_key_file")


def _dataset(name: str, values: dict[str, Any], origin: str) -> DatasetConfig:
    """A DatasetConfig from `values` keyed as in DATASET_KEYS, each type-checked.

    Raises:
        ConfigError: an unknown key, a wrong type or a bad value, named by `origin` + key.
    """
    fields: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SECRET_KEYS:
            raise _secret_refused(origin + key)
        if key not in DATASET_KEYS:
            raise ConfigError(f"{origin}{key}: unknown key (known: {', '.join(DATASET_KEYS)})")
        fields[key] = DATASET_KEYS[key](value, origin + key)
    if "url" not in fields:
        raise ConfigError(f"{origin}url: a dataset needs a URL")
    credentials = Credentials(
        profile=fields.pop("profile", None),
        access_key=fields.pop("access_key", None),
        access_key_file=fields.pop("access_key_file", None),
        secret_key_file=fields.pop("secret_key_file", None),
    )
    return DatasetConfig(
        name=name,
        url=fields["url"],
        read_only=fields.get("read_only", True),
        subdir=fields.get("subdir", ""),
        quota=fields.get("quota"),
        pin_quota=fields.get("pin_quota"),
        endpoint_url=fields.get("endpoint"),
        credentials=credentials,
        origin=origin,
    )


def parse_dataset_spec(spec: str) -> DatasetConfig:
    """Parse `--dataset NAME=URL[,ro|,rw][,KEY=VALUE]...`.

    The name ends at the first '='; the URL ends at the first ','; every later
    comma-separated part must be an option: `ro`, `rw` or one of subdir, quota,
    endpoint, profile, access_key, access_key_file, secret_key_file (`-` may stand
    for `_`). Relative paths are taken from the current directory. So a URL may hold '=' but not ',', and values cannot hold ','; such
    datasets go in the config file. Nothing is guessed: an unknown option is an error.

    Raises:
        ConfigError: naming the dataset and the option.
    """
    name, sep, rest = spec.partition("=")
    if not sep:
        raise ConfigError(f"--dataset {spec!r}: expected NAME=URL[,option...]")
    origin = f"--dataset {name}: "
    check_dataset_name(name, f"--dataset {name!r}")
    url, *options = rest.split(",")
    values: dict[str, Any] = {"url": url}
    for option in options:
        key, has_value, value = option.partition("=")
        key = key.strip().replace("-", "_")
        if key in ("ro", "rw") and not has_value:
            key, value = "read_only", key == "ro"
        elif key in _SECRET_KEYS:
            raise _secret_refused(origin + key)
        elif not option:
            raise ConfigError(f"{origin}empty option (a URL with ',' must go in the config file)")
        elif key not in _SPEC_OPTIONS or not has_value:
            raise ConfigError(
                f"{origin}unknown option {option.partition('=')[0]!r} (known: ro, rw, "
                f"{', '.join(k + '=' for k in _SPEC_OPTIONS)}; a URL with ',' must go in the config file)"
            )
        if key in values:
            raise ConfigError(f"{origin}{'ro/rw' if key == 'read_only' else key} given twice")
        values[key] = value
    # On the command line, paths are taken from the current directory.
    for key in ("access_key_file", "secret_key_file"):
        if values.get(key):
            values[key] = os.path.abspath(values[key])
    if url and not url_scheme(url) and not url.startswith("file://"):
        values["url"] = os.path.abspath(url)
    return _dataset(name, values, origin)


def format_dataset_spec(dataset: DatasetConfig) -> str:
    """The `--dataset` spec that parse_dataset_spec turns back into `dataset`."""
    parts = [f"{dataset.name}={dataset.url}", "ro" if dataset.read_only else "rw"]
    c = dataset.credentials
    for key, value in (
        ("subdir", dataset.subdir),
        ("quota", dataset.quota),
        ("pin_quota", dataset.pin_quota),
        ("endpoint", dataset.endpoint_url),
        ("profile", c.profile),
        ("access_key", c.access_key),
        ("access_key_file", c.access_key_file),
        ("secret_key_file", c.secret_key_file),
    ):
        if value:
            parts.append(f"{key}={value}")
    return ",".join(parts)


# -- the TOML file ----------------------------------------------------------------------------


def read_config_file(path: str) -> dict[str, Any]:
    """Parse a TOML file.

    Raises:
        ConfigError: unreadable or not TOML; the message starts with the path.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        twice = re.match(r"Cannot declare \('datasets', '([^']*)'\) twice", str(e))
        if twice:  # tomllib refuses a second [datasets.NAME] itself; say it our way
            raise ConfigError(f"{path}: datasets.{twice.group(1)}: dataset {twice.group(1)!r} is given twice") from None
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _file_values(doc: dict[str, Any], path: str) -> tuple[dict[str, tuple[Any, str]], list[DatasetConfig]]:
    """Split a parsed file into node settings ({field: (value, label)}) and datasets."""
    settings: dict[str, tuple[Any, str]] = {}
    datasets: list[DatasetConfig] = []
    for top, value in doc.items():
        if top == "datasets":
            if not isinstance(value, dict):
                raise _wrong_type(value, f"{path}: datasets", "a table of [datasets.NAME] tables")
            for name, table in value.items():
                origin = f"{path}: datasets.{name}."
                check_dataset_name(name, f"{path}: datasets.{name}")
                if not isinstance(table, dict):
                    raise _wrong_type(table, f"{path}: datasets.{name}", "a table")
                datasets.append(_dataset(name, table, origin))
            continue
        if top in _TABLES:
            if not isinstance(value, dict):
                raise _wrong_type(value, f"{path}: {top}", "a table")
            items = [(f"{top}.{key}", v) for key, v in value.items()]
        else:
            items = [(top, value)]
        for key, v in items:
            setting = _BY_KEY.get(key)
            if setting is None:
                known = sorted({s.key.rpartition(".")[0] or s.key for s in SETTINGS} | {"datasets"})
                hint = f" (known: {', '.join(known)})" if "." not in key else ""
                raise ConfigError(f"{path}: {key}: unknown key{hint}")
            label = f"{path}: {key}"
            settings[setting.field] = (setting.parse(v, label), label)
    return settings, datasets


# -- flags --------------------------------------------------------------------------------------


def _flag_values(flags: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """{field: (value, label)} for the settings flags that were given."""
    out = {}
    for setting in SETTINGS:
        if setting.field in flags and flags[setting.field] is not None:
            label = flag_name(setting.field)
            out[setting.field] = (setting.parse(flags[setting.field], label), label)
    return out


def _node_credentials(flags: dict[str, Any]) -> tuple[str | None, Credentials]:
    """--endpoint-url and --access-key[-file]/--secret-key-file: defaults for S3 datasets."""
    endpoint = flags.get("endpoint_url")
    access_key = flags.get("access_key")
    if flags.get("access_key_file"):
        if access_key:
            raise ConfigError("--access-key and --access-key-file: give one")
        access_key = read_secret(flags["access_key_file"], "--access-key-file")
    secret_file = flags.get("secret_key_file")
    secret = read_secret(secret_file, "--secret-key-file") if secret_file else None
    if (access_key is None) != (secret is None):
        raise ConfigError("--access-key and --secret-key-file go together")
    return endpoint, Credentials(
        access_key=access_key,
        access_key_file=flags.get("access_key_file"),
        secret_key_file=secret_file,
        secret_key=secret,
    )


def read_credentials(dataset: DatasetConfig) -> DatasetConfig:
    c = dataset.credentials
    if c.access_key and c.access_key_file:
        raise ConfigError(f"{dataset.label('access_key_file')}: give access_key or access_key_file, not both")
    access_key = c.access_key
    if c.access_key_file:
        access_key = read_secret(c.access_key_file, dataset.label("access_key_file"))
    secret = read_secret(c.secret_key_file, dataset.label("secret_key_file")) if c.secret_key_file else None
    return dataclasses.replace(dataset, credentials=dataclasses.replace(c, access_key=access_key, secret_key=secret))


def cache_settings(flags: dict[str, Any]) -> dict[str, Any]:
    """CacheConfig keyword arguments from the flags given (a worker has no file)."""
    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    values = {field: value for field, (value, _) in _flag_values(flags).items() if field in fields}
    if "peer_secret_file" in flags and flags["peer_secret_file"]:
        values["peer_secret"] = read_secret(flags["peer_secret_file"], "--secret-file").encode()
    endpoint, credentials = _node_credentials(flags)
    values.update(endpoint_url=endpoint, access_key=credentials.access_key, secret_key=credentials.secret_key)
    return values


def load_node(
    *,
    flags: dict[str, Any],
    config_file: str | None = None,
    source: str | None = None,
    datasets: list[str] = (),
    environment: bool = True,
    read_write: bool = False,
) -> NodeConfig:
    """The node's configuration, checked.

    Args:
        flags: NodeConfig field → value for each flag given (argparse dests), plus
            CREDENTIAL_FLAGS; a flag not given must be absent or None.
        config_file: a TOML file; its values come before the flags'.
        source: SOURCE of `cachefs mount SOURCE MOUNTPOINT`: one dataset at the mount root.
        datasets: `--dataset` specs; each replaces the file's dataset of its name.
        environment: check the machine too (mountpoint, cache dir); off for --print-config.
        read_write: serve `source` read-write (--read-write).

    Raises:
        ConfigError: the first problem, in one line naming the file and key or the flag.
    """
    values: dict[str, tuple[Any, str]] = {}
    by_name: dict[str, DatasetConfig] = {}
    if config_file:
        file_settings, file_datasets = _file_values(read_config_file(config_file), config_file)
        values.update(file_settings)
        by_name.update((d.name, d) for d in file_datasets)
    values.update(_flag_values(flags))
    given: set[str] = set()
    for spec in datasets:
        dataset = parse_dataset_spec(spec)
        if dataset.name in given:
            raise ConfigError(f"--dataset {dataset.name}: given twice")
        given.add(dataset.name)
        by_name[dataset.name] = dataset
    chosen = list(by_name.values())
    if source is not None:
        chosen.append(DatasetConfig(name="", url=source, read_only=not read_write, origin="SOURCE: "))

    endpoint, credentials = _node_credentials(flags)
    for i, dataset in enumerate(chosen):
        dataset = read_credentials(dataset)
        if url_scheme(dataset.url) in S3_SCHEMES:
            if dataset.endpoint_url is None:
                dataset.endpoint_url = endpoint
            if dataset.credentials.source == "environment":
                dataset.credentials = credentials
        chosen[i] = dataset

    kwargs = {field: value for field, (value, _) in values.items()}
    if "peer_secret_file" in kwargs:
        kwargs["peer_secret"] = read_secret(kwargs["peer_secret_file"], values["peer_secret_file"][1]).encode()
    labels = {field: label for field, (_, label) in values.items() if not label.startswith("--")}
    if "peer_secret_file" in labels:
        labels["peer_secret"] = labels["peer_secret_file"]
    kwargs.setdefault("mountpoint", "")  # check() asks for it
    node = NodeConfig(
        **kwargs,
        endpoint_url=endpoint,
        access_key=credentials.access_key,
        secret_key=credentials.secret_key,
        datasets=chosen,
        labels=labels,
    )
    node.check(environment=environment)
    return node


# -- --print-config -----------------------------------------------------------------------------

MASK = "***"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def render(node: NodeConfig) -> str:
    """The effective configuration as TOML in the --config format, secrets masked.

    Secret values never appear: a secret shows as the file it is read from, and
    an access key as "***". A dataset served at the mount root (SOURCE) shows as
    [source], which the file format does not take.
    """

    def addr(a: tuple[str, int] | None) -> str | None:
        return f"{a[0]}:{a[1]}" if a else None

    tables: list[tuple[str, list[tuple[str, Any, str]]]] = [
        ("", [("mountpoint", node.mountpoint, ""), ("run_dir", node.run_dir, ""), ("log_level", node.log_level.lower(), "")]),
        ("cache", [
            ("dir", node.cache_dir, ""),
            ("size", format_size(node.cache_size), ""),
            ("mem_size", format_size(node.mem_size), ""),
            ("chunk_size", format_size(node.chunk_size), ""),
            ("free_space_ratio", node.free_space_ratio, ""),
            ("pin_quota", format_size(node.pin_limit), ""),
            ("read_ahead", node.read_ahead, ""),
            ("admission", node.admission, ""),
        ]),
        ("metadata", [("attr_ttl", node.attr_ttl, ""), ("entry_ttl", node.entry_ttl, ""), ("dir_ttl", node.dir_ttl, ""),
                      ("cache_entries", node.meta_cache_entries, ""), ("refresh", node.meta_refresh, "")]),
        ("backend", [
            ("concurrency", node.backend_concurrency, ""),
            ("timeout", node.backend_timeout, ""),
            ("retries", node.backend_retries, ""),
        ]),
        ("peers", [
            ("ring", node.peers, ""),
            ("secret_file", node.peer_secret_file, f"the shared secret: {MASK}"),
            ("timeout", node.peer_timeout, ""),
            ("serve", addr(node.serve), ""),
        ]),
        ("metrics", [("listen", addr(node.metrics), "")]),
        ("writes", [
            ("writeback", node.writeback, ""),
            ("stage_size", format_size(node.stage_limit), ""),
            ("upload_concurrency", node.upload_concurrency, ""),
            ("part_size", format_size(node.part_size), ""),
            ("unsigned_payload", node.unsigned_payload, ""),
        ]),
        ("access", [("uid", node.uid, ""), ("gid", node.gid, ""), ("umask", f"{node.umask:03o}", "")]),
    ]
    for d in node.datasets:
        c = d.credentials
        source = {
            "profile": f"credentials: AWS profile {c.profile}",
            "keys": "credentials: access key and secret key file",
            "environment": "credentials: the environment (AWS_* variables, AWS config files)",
        }[c.source] if d.is_s3 else ""
        rows = [
            ("url", d.url, "served at the mount root" if d.at_root else ""),
            ("read_only", d.read_only, ""),
            ("subdir", d.subdir or None, ""),
            ("quota", format_size(d.quota) if d.quota else None, ""),
            ("pin_quota", format_size(d.pin_quota) if d.pin_quota else None, ""),
            ("endpoint", d.endpoint_url, ""),
            ("profile", c.profile, source if c.source == "profile" else ""),
            ("access_key", MASK if c.access_key and not c.access_key_file else None, source if c.source == "keys" else ""),
            ("access_key_file", c.access_key_file, source if c.source == "keys" else ""),
            ("secret_key_file", c.secret_key_file, f"the secret key: {MASK}"),
        ]
        if c.source == "environment" and source:
            rows.insert(1, ("#", None, source))
        tables.append(("source" if d.at_root else f"datasets.{_key(d.name)}", rows))

    lines = ["# cachefs node configuration: defaults, then --config, then flags; secrets masked"]
    for table, rows in tables:
        body = []
        for key, value, comment in rows:
            if key == "#":
                body.append(f"# {comment}")
            elif value is not None:
                body.append(f"{key} = {_toml(value)}" + (f"  # {comment}" if comment else ""))
        if table and body:
            lines += ["", f"[{table}]"]
        lines += body
    return "\n".join(lines) + "\n"
