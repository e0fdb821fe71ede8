"""`cachefs fluid-mount`: the FUSE container command of a Fluid ThinRuntime.

Fluid hands the container a config.json (default /etc/fluid/config/config.json):

    {"mounts": [{"mountPoint": "s3://bucket/prefix", "name": "train",
                 "options": {"endpoint": "...", "access-key": "/etc/fluid/secrets/cred/ak",
                             "secret-key": "/etc/fluid/secrets/cred/sk"}}],
     "targetPath": "/runtime-mnt/thin/NS/NAME/thin-fuse",
     "runtimeOptions": {"cache-size": "20G"}, "accessModes": ["ReadOnlyMany"]}

plus MOUNT_OPTIONS=k=v,k,... in the environment. Each mount becomes a dataset at
targetPath/NAME (one mount: at targetPath itself); node settings come from
MOUNT_OPTIONS, then runtimeOptions, by their `cachefs mount` flag name without the
dashes. `access-key` and `secret-key` name files (Fluid mounts the Dataset's
encryptOptions secrets there, mode 0644: see `read_mount_secret`).

While mounted, the file is polled (mtime, size, inode) every second; when Fluid
rewrites it, datasets are added and removed to match without a remount. statfs
reports the datasets' total bytes and files (see `Usage`), which is what Fluid
reads with `df` and `ls -lR | grep ^- | wc -l`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
from typing import Any

from cachefs.config import Credentials, DatasetConfig, NodeConfig, S3_SCHEMES, check_dataset_name, flag_name
from cachefs.errors import ConfigError
from cachefs.loader import SETTINGS, read_secret

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/fluid/config/config.json"
POLL_SECONDS = 1.0
USAGE_TTL = 60.0  # seconds a statfs answer may be old before a new walk starts
USAGE_FIRST_WAIT = 10.0  # seconds the first statfs waits for the first walk

# Per-mount options (mounts[].options: the Dataset's sharedOptions, options and encryptOptions).
MOUNT_KEYS = ("endpoint", "access-key", "secret-key", "subdir", "quota", "pin-quota")
_READ_ONLY_MODES = ("ReadOnlyMany", "ReadOnlyOnce")  # Kubernetes accessModes cachefs can serve

# Node settings by flag name without the dashes: cache-size, peers, secret-file, ...
_NODE_SETTINGS = {flag_name(s.field)[2:]: s for s in SETTINGS if s.field != "mountpoint"}
_CREDENTIAL_OPTIONS = {"endpoint-url": "endpoint_url", "endpoint": "endpoint_url"}


# -- parsing ------------------------------------------------------------------------------


def read_config_json(path: str) -> dict[str, Any]:
    """The parsed config.json.

    Raises:
        ConfigError: missing, unreadable, not JSON or not an object; the message starts with the path.
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object, not {type(doc).__name__}")
    return doc


def parse_mount_options(text: str | None) -> dict[str, str]:
    """MOUNT_OPTIONS `k1=v1,k2,...` as a dict; a bare key maps to ""."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if item:
            key, _, value = item.partition("=")
            out[key.strip()] = value.strip()
    return out


def _convert(setting, value: str, what: str) -> Any:
    """A string option as the type the setting takes (the file's parsers want numbers as numbers)."""
    kind = setting.parse.__name__
    if kind == "_bool":
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"{what}: expected true or false, not {value!r}")
        return value.lower() == "true"
    try:
        if kind == "_integer":
            return int(value)
        if kind == "_number":
            return float(value)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not a number") from None
    return value


def _node_settings(options: list[tuple[dict[str, Any], str]]) -> tuple[dict[str, Any], dict[str, str]]:
    """NodeConfig keyword arguments and their labels from option dicts, later ones winning."""
    kwargs: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for values, origin in options:
        for key, value in values.items():
            what = f"{origin}{key}"
            if key in ("ro", "rw") and value == "":
                continue  # Fluid adds these from the access modes; each mount's readOnly decides
            if not isinstance(value, str):
                value = str(value).lower() if isinstance(value, bool) else str(value)
            if key in _CREDENTIAL_OPTIONS:
                kwargs["endpoint_url"] = value
                labels["endpoint_url"] = what
                continue
            setting = _NODE_SETTINGS.get(key)
            if setting is None:
                known = sorted([*_NODE_SETTINGS, *_CREDENTIAL_OPTIONS, "ro"])
                raise ConfigError(f"{what}: unknown option (known: {', '.join(known)})")
            if value == "" and setting.parse.__name__ == "_bool":
                value = "true"  # a flag named alone (`writeback`, `unsigned-payload`) is on
            if value == "":
                raise ConfigError(f"{what}: needs a value ({key}=...)")
            kwargs[setting.field] = setting.parse(_convert(setting, value, what), what)
            labels[setting.field] = what
    if "peer_secret_file" in kwargs:
        kwargs["peer_secret"] = read_secret(kwargs["peer_secret_file"], labels["peer_secret_file"]).encode()
        labels["peer_secret"] = labels["peer_secret_file"]
    return kwargs, labels


def read_mount_secret(path: str, what: str) -> str:
    """The stripped content of a secret file Fluid mounted for a Dataset's encryptOptions.

    Unlike `read_secret`, a file others may read is accepted: Fluid mounts these secret
    volumes itself (pkg/ddc/thin/transform_config.go, transformEncryptOptionsWithSecretVolumes)
    with no defaultMode, so the kubelet writes them 0644, and a ThinRuntimeProfile volume
    of the same name is overridden by Fluid's. Writable by group or others is still refused:
    then someone else could swap the keys.

    Raises:
        ConfigError: missing, unreadable, empty, or writable by others; never shows the content.
    """
    return read_secret(path, what, others_may_read=True)


def _scheme_ok(url: str) -> bool:
    scheme = url.partition("://")[0].lower()
    if scheme in (*S3_SCHEMES, "file", "local"):
        return True
    import fsspec

    return scheme in fsspec.available_protocols()


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: expected a non-empty string, not {value!r}")
    return value


def _mount_dataset(mount: Any, index: int, at_root: bool, read_only_modes: bool, path: str) -> DatasetConfig:
    """One of mounts[] as a DatasetConfig, its secret files read."""
    where = f"{path}: mounts[{index}]"
    if not isinstance(mount, dict):
        raise ConfigError(f"{where}: expected an object")
    url = _string(mount.get("mountPoint"), f"{where}.mountPoint")
    name = mount.get("name")
    if not at_root:
        name = _string(name, f"{where}.name")
        check_dataset_name(name, f"{where}.name")
    origin = f"{path}: mounts[{index}] ({name or url})."
    if "://" not in url:
        raise ConfigError(f"{origin}mountPoint: {url!r} is not a URL (s3://bucket/prefix, local:///path)")
    if not _scheme_ok(url):
        raise ConfigError(f"{origin}mountPoint: unknown scheme {url.partition('://')[0]!r} in {url!r} "
                          "(cachefs reads s3://, local:// and the fsspec protocols)")
    scheme = url.partition("://")[0].lower()
    if scheme in ("local", "file"):
        url = "/" + url.partition("://")[2].lstrip("/")
    options = mount.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{origin}options: expected an object")
    for key in options:
        if key not in MOUNT_KEYS:
            raise ConfigError(f"{origin}options.{key}: unknown mount option (known: {', '.join(MOUNT_KEYS)})")
    opt = {k: _string(v, f"{origin}options.{k}") if not isinstance(v, (int, float)) else str(v)
           for k, v in options.items()}
    access_key = secret_key = None
    if "access-key" in opt:
        access_key = read_mount_secret(opt["access-key"], f"{origin}options.access-key")
    if "secret-key" in opt:
        secret_key = read_mount_secret(opt["secret-key"], f"{origin}options.secret-key")
    if (access_key is None) != (secret_key is None):
        missing = "secret-key" if secret_key is None else "access-key"
        raise ConfigError(f"{origin}options.{missing}: access-key and secret-key go together")
    read_only = mount.get("readOnly", False) is True or read_only_modes
    from cachefs.loader import _size  # the TOML parser's sizes: "100G" or bytes

    return DatasetConfig(
        name="" if at_root else name,
        url=url,
        read_only=read_only,
        subdir=opt.get("subdir", "").strip("/"),
        quota=_size(opt["quota"], f"{origin}options.quota") if "quota" in opt else None,
        pin_quota=_size(opt["pin-quota"], f"{origin}options.pin-quota") if "pin-quota" in opt else None,
        endpoint_url=opt.get("endpoint"),
        credentials=Credentials(
            access_key=access_key, access_key_file=opt.get("access-key"),
            secret_key_file=opt.get("secret-key"), secret_key=secret_key,
        ),
        origin=origin,
    )


def datasets_of(doc: dict[str, Any], path: str) -> list[DatasetConfig]:
    """mounts[] of a parsed config.json as datasets: one mount at the root, several at NAME."""
    mounts = doc.get("mounts")
    if not isinstance(mounts, list) or not mounts:
        raise ConfigError(f"{path}: mounts: expected a non-empty array of mounts")
    modes = doc.get("accessModes") or ["ReadOnlyMany"]
    if not isinstance(modes, list):
        raise ConfigError(f"{path}: accessModes: expected an array")
    read_only_modes = all(m in _READ_ONLY_MODES for m in modes)
    datasets = [_mount_dataset(m, i, len(mounts) == 1, read_only_modes, path) for i, m in enumerate(mounts)]
    seen: set[str] = set()
    for d in datasets:
        if d.name in seen:
            raise ConfigError(f"{d.origin}name: {d.name!r} is given twice")
        seen.add(d.name)
    return datasets


def load_fluid(path: str, environ: dict[str, str] | None = None) -> NodeConfig:
    """The node configuration of config.json at `path` and MOUNT_OPTIONS, checked
    without the machine (prepare_target, then check() once more with it).

    Raises:
        ConfigError: one line naming the file and field, or MOUNT_OPTIONS and the option.
    """
    environ = os.environ if environ is None else environ
    doc = read_config_json(path)
    target = _string(doc.get("targetPath"), f"{path}: targetPath")
    if not os.path.isabs(target):
        raise ConfigError(f"{path}: targetPath: {target!r} must be an absolute path")
    runtime = doc.get("runtimeOptions") or {}
    if not isinstance(runtime, dict):
        raise ConfigError(f"{path}: runtimeOptions: expected an object")
    kwargs, labels = _node_settings([
        (parse_mount_options(environ.get("MOUNT_OPTIONS")), "MOUNT_OPTIONS: "),
        (runtime, f"{path}: runtimeOptions."),
    ])
    datasets = datasets_of(doc, path)
    labels["mountpoint"] = f"{path}: targetPath"
    node = NodeConfig(mountpoint=target, datasets=datasets, labels=labels, **kwargs)
    node.check(environment=False)
    return node


def prepare_target(target: str, label: str) -> None:
    """`mkdir -p` the target path and lazily unmount a dead FUSE mount left there.

    Raises:
        ConfigError: it cannot be made, or a live filesystem is mounted there (busy).
    """
    if _mounted(target):
        problem = _probe(target)
        if problem is None:
            raise ConfigError(f"{label} {target}: busy: a filesystem is mounted there already")
        if problem != errno.ENOTCONN:
            raise ConfigError(f"{label} {target}: busy: a filesystem is mounted there and does not answer")
        # ENOTCONN: a FUSE daemon died (an earlier fuse pod) and left its mount behind.
        log.warning("%s: cleaning a stale mount (fusermount3 -uz)", target)
        result = subprocess.run(["fusermount3", "-uz", target], capture_output=True, text=True)
        if result.returncode:
            raise ConfigError(f"{label} {target}: stale mount, and fusermount3 -uz failed: {result.stderr.strip()}")
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{label} {target}: {e.strerror}") from None


def _probe(path: str, timeout: float = 5.0) -> int | None:
    """None if the filesystem at `path` answers statfs (which the kernel never answers from a
    cache, unlike stat), else the errno; ETIMEDOUT if it does not answer within `timeout`."""
    import threading

    result: list[int | None] = []

    def run() -> None:
        try:
            os.statvfs(path)
            result.append(None)
        except OSError as e:
            result.append(e.errno)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else errno.ETIMEDOUT


def _mounted(path: str) -> bool:
    # mountinfo, not os.path.ismount: a stat() of a hung FUSE mount blocks.
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


# -- while mounted ----------------------------------------------------------------------------


class Usage:
    """What statfs reports: the datasets' total bytes and files, from a walk of their
    listings (the namespace's cached ones while fresh). Lazy: a walk starts only when
    statfs asks and the last one is older than USAGE_TTL; statfs answers with the last
    result meanwhile (the very first statfs waits up to USAGE_FIRST_WAIT for it)."""

    def __init__(self, node, nursery, ttl: float = USAGE_TTL):
        import trio

        self.node = node
        self.nursery = nursery
        self.ttl = ttl
        self.value: tuple[int, int] | None = None  # (bytes, files)
        self.at = -float("inf")
        self._walking = False
        self._done = trio.Event()

    def stale(self) -> None:
        """The datasets changed: the next statfs starts a new walk."""
        self.at = -float("inf")

    async def get(self) -> tuple[int, int] | None:
        import trio

        if time.monotonic() - self.at > self.ttl and not self._walking:
            self._walking = True
            self.nursery.start_soon(self._walk)
        if self.value is None:
            with trio.move_on_after(USAGE_FIRST_WAIT):
                await self._done.wait()
        return self.value

    async def _walk(self) -> None:
        import trio

        from cachefs.errors import BackendError

        total = files = 0
        try:
            for dataset in list(self.node.datasets.values()):
                for f in await self.node._files(dataset, ""):
                    total += f.size
                    files += 1
            self.value, self.at = (total, files), time.monotonic()
            log.debug("usage: %d bytes in %d files", total, files)
        except (BackendError, ConfigError) as e:
            log.warning("usage walk failed: %s", e)
            self.at = time.monotonic()  # not again at once
        except Exception:  # a bug here must not take the mount down with it
            log.exception("usage walk failed")
            self.at = time.monotonic()
        finally:
            self._walking = False
            self._done.set()
            self._done = trio.Event()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows the ConfigMap's ..data symlink swap
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


ADD_RETRY_SECONDS = 30.0  # a dataset that could not be added (its backend down?) is tried again this often


async def watch_config(node, path: str, usage: Usage | None = None, poll: float = POLL_SECONDS) -> None:
    """Poll config.json; when it changes, add and remove datasets to match its mounts[].

    A dataset with open files is not removed: that is logged once and retried every
    poll. A dataset that cannot be added is logged and retried every ADD_RETRY_SECONDS.
    A change that cannot apply without a remount (one mount at the root to several at
    NAME, or back; runtimeOptions) is logged and left for the next restart.
    """
    import trio

    stamp = _stamp(path)
    retry_at: float | None = None
    warned: set[str] = set()
    try:
        runtime = read_config_json(path).get("runtimeOptions")
    except ConfigError:
        runtime = None
    while True:
        await trio.sleep(poll)
        now = _stamp(path)
        if now == stamp and (retry_at is None or time.monotonic() < retry_at):
            continue
        changed_file, stamp = now != stamp, now
        try:
            doc = read_config_json(path)
            wanted = {d.name: d for d in datasets_of(doc, path)}
        except ConfigError as e:
            log.error("config change not applied: %s", e)
            retry_at = None
            continue
        if changed_file and doc.get("runtimeOptions") != runtime:
            log.warning("config change: runtimeOptions changed; they apply when the fuse pod restarts")
            runtime = doc.get("runtimeOptions")
        try:
            changed, delay = await _apply(node, wanted, warned)
        except Exception:  # a bug here must not take the mount down with it
            log.exception("config change not applied")
            changed, delay = True, ADD_RETRY_SECONDS
        retry_at = None if delay is None else time.monotonic() + delay
        if changed and usage is not None:
            usage.stale()


async def _apply(node, wanted: dict[str, DatasetConfig], warned: set[str]) -> tuple[bool, float | None]:
    """Make node's datasets `wanted`: whether any changed, and in how many seconds to
    try again (None: all done). `warned` holds the datasets whose busy removal was logged."""
    have = node.datasets
    if ("" in wanted) != ("" in have):
        log.error("config change not applied: going between one mount at the root and several at their names "
                  "needs a restart of the fuse pod")
        return False, None
    changed = False
    delay: float | None = None
    for name, dataset in list(have.items()):
        new = wanted.get(name)
        if new is not None and _same(dataset.config, new):
            continue
        try:
            await node.remove_dataset(name, force=False)
            log.info("config change: dataset %s removed", name or "/")
            warned.discard(name)
            changed = True
        except ConfigError as e:
            if name not in warned:
                log.warning("config change: %s; removing it once they are closed", e)
                warned.add(name)
            delay = POLL_SECONDS
    warned &= set(node.datasets)
    for name, dataset in wanted.items():
        if name in node.datasets:
            continue
        try:
            await node.add_dataset(dataset)
            log.info("config change: dataset %s added", name or "/")
            changed = True
        except ConfigError as e:
            log.error("config change: dataset %s not added (trying again in %gs): %s", name or "/",
                      ADD_RETRY_SECONDS, e)
            delay = min(delay, ADD_RETRY_SECONDS) if delay is not None else ADD_RETRY_SECONDS
    return changed, delay


def _same(running: DatasetConfig, new: DatasetConfig) -> bool:
    # The node fills in its defaults (endpoint, keys) when it adds a dataset: compare what config.json sets.
    fields = ("url", "read_only", "subdir", "quota", "pin_quota")
    if any(getattr(running, f) != getattr(new, f) for f in fields):
        return False
    if new.endpoint_url is not None and new.endpoint_url != running.endpoint_url:
        return False
    return new.credentials.source == "environment" or new.credentials == running.credentials


def start(config_path: str, usage_ttl: float = USAGE_TTL):
    """The `extra` hook of run_mount: statfs usage and the config watch."""

    def hook(node, ops, nursery) -> None:
        usage = Usage(node, nursery, usage_ttl)
        ops.usage = usage.get
        nursery.start_soon(watch_config, node, config_path, usage)

    return hook
