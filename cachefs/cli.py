"""Command line: `cachefs mount`, `cachefs fluid-mount`, `cachefs worker`, `cachefs dataset`, `cachefs status`, `cachefs warmup`,
`cachefs umount`, `cachefs --version`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import TYPE_CHECKING

from cachefs import __version__
from cachefs.errors import ConfigError

if TYPE_CHECKING:
    import subprocess

    from cachefs.config import CacheConfig, NodeConfig, WorkerConfig

# logging, subprocess, signal and tempfile are imported where they are used: the
# control commands (warmup, status, pin...) need none of them, and a scheduler runs
# those often (they were a third of `cachefs warmup`'s 45 ms of imports).

_READY_FD = "CACHEFS_READY_FD"
_BACKGROUND_FLAGS = ("-d", "--background")


def _version() -> str:
    from cachefs import hotpath

    return f"cachefs {__version__} (hot path: {hotpath.IMPLEMENTATION}, python {sys.version.split()[0]})"


def _add_cache_args(p: argparse.ArgumentParser, d: CacheConfig) -> None:
    from cachefs.cache.policy import ADMISSIONS
    from cachefs.config import format_size

    # No argparse defaults: a flag not given must not override the --config file.
    # The defaults shown are the dataclass's, which apply when neither sets a value.
    g = p.add_argument_group("cache")
    g.add_argument("--cache-dir", help=f"directory of the SSD tier (default {d.cache_dir})")
    g.add_argument("--cache-size", help=f"SSD tier capacity, e.g. 100G; 0 turns it off (default {format_size(d.cache_size)})")
    g.add_argument("--mem-size", help=f"memory for chunks: the MEM tier, read-ahead and fetches in flight, e.g. 2G; "
                   f"0 turns the MEM tier off (default {format_size(d.mem_size)})")
    g.add_argument("--chunk-size", help=f"cache chunk size, a power of two from 64K to 64M; the same on every node of a ring (default {format_size(d.chunk_size)})")
    g.add_argument("--free-space-ratio", type=float, help=f"keep at least this share of the cache disk free (default {d.free_space_ratio})")
    g.add_argument("--read-ahead", type=int, help=f"chunks to fetch ahead of a sequential reader (default {d.read_ahead})")
    g.add_argument(
        "--admission", choices=ADMISSIONS,
        help="which new chunks the SSD tier stores once full: scan-resistant (keeps a fixed sample of a "
        "dataset larger than the cache, so every epoch hits about cache/dataset; see docs/configuration.md) "
        f"or lru (all, evicting the least recently used) (default {d.admission})",
    )
    g.add_argument("--pin-quota", help="the most SSD space pinned chunks may hold, e.g. 50G (default: half of --cache-size)")
    g = p.add_argument_group("backend")
    g.add_argument("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:9000")
    g.add_argument("--access-key", help="S3 access key (default: AWS_ACCESS_KEY_ID or the AWS config files)")
    g.add_argument("--access-key-file", metavar="PATH", help="file holding the S3 access key, instead of --access-key")
    g.add_argument(
        "--secret-key-file",
        metavar="PATH",
        help="file holding the S3 secret key (default: AWS_SECRET_ACCESS_KEY or the AWS config files); "
        "a file, not a flag, so the secret does not show in ps",
    )
    g.add_argument("--backend-concurrency", type=int, help=f"parallel backend requests (default {d.backend_concurrency})")
    g.add_argument("--backend-timeout", type=float, help=f"seconds one backend request may take, retries included (default {d.backend_timeout})")
    g.add_argument("--backend-retries", type=int, help=f"retries after a failed attempt (default {d.backend_retries})")
    g = p.add_argument_group("peers")
    g.add_argument(
        "--peers",
        metavar="SPEC",
        help="the cache ring: HOST:PORT[@WEIGHT],... or dns+NAME:PORT (re-resolved every 30s) "
        "or file:PATH (re-read on change)",
    )
    g.add_argument("--secret-file", dest="peer_secret_file", metavar="PATH", help="shared secret that peers authenticate each other with (HMAC)")
    g.add_argument("--peer-timeout", type=float, help=f"seconds to wait for a peer before trying the next one (default {d.peer_timeout})")
    g = p.add_argument_group("operation")
    g.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help=f"(default {d.log_level.lower()})")
    g.add_argument("--log-file", help="log here instead of stderr (with -d: default /var/log/cachefs/MOUNTPOINT.log as root, "
                   "~/.local/state/cachefs/ otherwise, or $XDG_STATE_HOME/cachefs/)")


# Commands that only talk to a running node: their parser is built without the
# node commands', which import the node's configuration modules (0.06 s of a
# `cachefs warmup` that JuiceFS's Go binary does not pay).
_CONTROL_COMMANDS = {"dataset", "status", "refresh", "pin", "unpin", "warmup", "umount"}


def _parser(node_commands: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cachefs",
        description="A FUSE caching filesystem: mount an object-store prefix or a directory "
        "and read it through a MEM/SSD chunk cache shared by a ring of cache workers.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if node_commands:
        _add_node_commands(sub)
    _add_control_commands(sub)
    if node_commands:
        _add_fluid_mount(sub)
    u = sub.add_parser("umount", help="unmount a cachefs mount", description="Unmount MOUNTPOINT; the daemon then exits.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now even if busy")
    return p


def _add_node_commands(sub) -> None:
    from cachefs.config import NodeConfig, WorkerConfig, format_size

    d = NodeConfig(mountpoint="")
    m = sub.add_parser(
        "mount",
        help="mount SOURCE at MOUNTPOINT, or datasets at MOUNTPOINT/NAME (foreground unless -d)",
        usage="cachefs mount [options] SOURCE MOUNTPOINT\n"
        "       cachefs mount [options] [MOUNTPOINT] (--dataset NAME=URL[,opt...] ... | --config FILE)",
        description="Mount SOURCE read-only at MOUNTPOINT, or each --dataset (and each dataset of "
        "--config FILE) at MOUNTPOINT/NAME, serving reads through the chunk cache. "
        "Runs in the foreground until unmounted (fusermount3 -u, `cachefs umount`) or sent "
        "SIGTERM/SIGINT. S3 credentials come from the standard AWS environment variables or config files, "
        "or per dataset from a profile or a secret key file. Flags override the --config file.",
    )
    m.add_argument("source", metavar="SOURCE", nargs="?", help="s3://bucket/prefix, any fsspec URL, a local path or file://PATH")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="an existing, empty, unmounted directory")
    m.add_argument("-d", "--background", action="store_true", help="return once the mount is ready (or exit non-zero with the reason)")
    g = m.add_argument_group("node")
    g.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=URL[,OPT...]",
        help="serve URL at MOUNTPOINT/NAME (repeatable); options: ro (the default), rw, subdir=PATH, quota=SIZE, "
        "endpoint=URL, profile=NAME, access_key_file=PATH, secret_key_file=PATH; see docs/configuration.md",
    )
    g.add_argument("--config", metavar="FILE", help="the node's configuration as TOML (see docs/configuration.md); flags override it")
    g.add_argument("--print-config", action="store_true", help="print the effective configuration, secrets masked, and exit without mounting")
    g.add_argument("--run-dir", help="directory of the control socket (default CACHE_DIR/run)")
    _add_cache_args(m, d)
    g = m.add_argument_group("metadata")
    g.add_argument("--attr-ttl", type=float, help=f"seconds to trust file attributes (default {d.attr_ttl})")
    g.add_argument("--entry-ttl", type=float, help=f"seconds the kernel may cache name lookups (default {d.entry_ttl})")
    g.add_argument("--dir-ttl", type=float, help=f"seconds to trust a directory listing (default {d.dir_ttl})")
    g.add_argument(
        "--meta-cache-entries", type=int,
        help="attributes and directory listings to keep, counted as one per object and one per listed "
        f"child; least recently used go first (default {d.meta_cache_entries})",
    )
    g.add_argument(
        "--meta-refresh", type=float, metavar="SECONDS",
        help="ask the backend again for all cached attributes and listings every SECONDS, dropping the "
        "kernel's and our caches of what changed (default 0: off; see also `cachefs refresh`)",
    )
    g = m.add_argument_group("writes (rw datasets; docs/semantics.md)")
    g.add_argument("--read-write", action="store_true", help="serve SOURCE read-write (for --dataset: the rw option)")
    g.add_argument("--writeback", action="store_true", default=None,
                   help="close() returns before the upload: files are journaled on the SSD and uploaded in the background")
    g.add_argument("--stage-size", help="the most bytes of written files staged at once; writers wait beyond it "
                   "(default: half of --cache-size)")
    g.add_argument("--upload-concurrency", type=int, help=f"uploads (PUTs, parts) at once per dataset (default {d.upload_concurrency})")
    g.add_argument("--unsigned-payload", action="store_true", default=None,
                   help="S3: send write bodies unsigned (UNSIGNED-PAYLOAD), not hashed into their signature: about a "
                   "quarter less CPU per GiB written, here and in the S3 server; over plain http:// the bodies are then "
                   "unprotected against tampering on the way (docs/semantics.md)")
    g.add_argument("--part-size", help=f"files up to this size go in one PUT, larger ones in parts of it (default {format_size(d.part_size)})")
    g.add_argument("--uid", type=int, help="owner of every file and directory (default: the mount's user)")
    g.add_argument("--gid", type=int, help="group of every file and directory (default: the mount's group)")
    g.add_argument("--umask", help="permission bits to take off rw datasets' entries, in octal (default 022)")
    g = m.add_argument_group("sharing")
    g.add_argument("--serve", metavar="HOST:PORT", help="also serve this mount's cache to the ring (list HOST:PORT in every node's --peers)")

    w = sub.add_parser(
        "worker",
        help="run a cache worker that serves chunks to mounts and other workers",
        description="A long-lived cache node: holds MEM/SSD tiers and serves chunks of its sources to "
        "authenticated peers, fetching each from the backend at most once. Requests for any other "
        "source are refused.",
    )
    dw = WorkerConfig(listen=("", 0), sources={})
    w.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve peers on")
    w.add_argument("--advertise", metavar="HOST:PORT", help="the address other nodes list in --peers (default: --listen)")
    w.add_argument("--source", action="append", required=True, metavar="NAME=URL", help="a source to serve (repeatable), e.g. md=s3://bucket/market")
    w.add_argument(
        "--drain-timeout", type=float, default=dw.drain_timeout, metavar="SECONDS",
        help="on SIGTERM, stop taking chunk requests and wait this long at most for those in flight "
        "(default %(default)gs; keep the pod's termination grace period longer)",
    )
    w.add_argument(
        "--keep-page-cache", action="store_true",
        help="leave the chunk files a worker served in the page cache (default: drop their pages after "
        "each read, so they do not count against a container's memory limit)",
    )
    _add_cache_args(w, dw)


def _add_control_commands(sub) -> None:
    ds = sub.add_parser(
        "dataset",
        help="add, remove or list the datasets of a running mount",
        description="Change what a running mount serves at MOUNTPOINT/NAME, through its control socket "
        "(root only). MOUNTPOINT may also be the control socket itself.",
    )
    dsub = ds.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = dsub.add_parser("add", help="serve a dataset at MOUNTPOINT/NAME", description="Serve URL at MOUNTPOINT/NAME from now on.")
    a.add_argument("mountpoint", metavar="MOUNTPOINT")
    a.add_argument(
        "spec", metavar="NAME=URL[,OPT...]",
        help="as for `cachefs mount --dataset`: options ro, subdir=PATH, quota=SIZE, endpoint=URL, profile=NAME, "
        "access_key_file=PATH, secret_key_file=PATH",
    )
    r = dsub.add_parser(
        "remove", help="stop serving a dataset",
        description="Stop serving MOUNTPOINT/NAME. Refused while files of it are open, unless --force.",
    )
    r.add_argument("mountpoint", metavar="MOUNTPOINT")
    r.add_argument("name", metavar="NAME")
    r.add_argument("--force", action="store_true", help="remove it even while files of it are open")
    ls = dsub.add_parser("list", help="list the datasets a mount serves", description="List the datasets MOUNTPOINT serves.")
    ls.add_argument("mountpoint", metavar="MOUNTPOINT")
    ls.add_argument("--json", action="store_true", help="print them as JSON")

    st = sub.add_parser(
        "status",
        help="show what nodes hold and serve",
        description="For a MOUNTPOINT (or a control socket), asks the node through its control socket: its "
        "tiers, datasets, peers and version. For HOST:PORT, reads the node's --metrics endpoint and shows its "
        "tiers, how much of each source it holds, its cache ratio, what it served to peers and which peers are down.",
    )
    st.add_argument("nodes", nargs="+", metavar="MOUNTPOINT|HOST:PORT", help="a mountpoint, or a node's --metrics address")
    st.add_argument("--json", action="store_true", help="print a MOUNTPOINT's status as JSON (one MOUNTPOINT)")
    st.add_argument("--deep", action="store_true", help="also walk every dataset and report its total bytes, what is cached "
                    "of it, and how many bytes of it each node holds")

    rf = sub.add_parser(
        "refresh",
        help="ask the backend again now for what a mount knows of PATH",
        description="Revalidates the cached attributes and listing of PATH (a file or directory inside a "
        "cachefs mount; with --recursive, everything cached below it) against the backend now. What changed or "
        "went away leaves every cache: the mount's, the kernel's (names, attributes, pages) and the chunks of "
        "its old version.",
    )
    rf.add_argument("paths", nargs="+", metavar="PATH")
    rf.add_argument("-r", "--recursive", action="store_true", help="everything cached below PATH too")

    pn = sub.add_parser(
        "pin",
        help="keep PATHs' chunks from eviction for a while",
        description="Pins the chunks of each PATH (a file, or every file below a directory, inside a cachefs mount) "
        "on the mount's SSD tier (with --peers: on each chunk's owner on the ring) until the lease ends (--ttl) "
        "or `cachefs unpin`. Pinned bytes count against --pin-quota (each owner's own); a pin that would exceed "
        "one is refused and nothing is pinned. Leases survive a restart of the mount and of the owners.",
    )
    pn.add_argument("paths", nargs="+", metavar="PATH")
    pn.add_argument("--ttl", required=True, metavar="DURATION", help="how long the lease lasts, e.g. 90m, 6h, 2d")
    pn.add_argument("--owner", default="cli", help="who holds the lease (a job id), to unpin all of its leases at once")
    pn.add_argument("--json", action="store_true", help="print the lease as JSON")
    up = sub.add_parser(
        "unpin",
        help="end pin leases",
        description="Ends the leases pinning any PATH; with --owner, every lease of that owner on the mount "
        "PATH is in; with --lease, that lease.",
    )
    up.add_argument("paths", nargs="+", metavar="PATH")
    up.add_argument("--owner", help="end every lease of this owner")
    up.add_argument("--lease", action="append", default=[], metavar="ID", help="end this lease (repeatable)")
    wu = sub.add_parser(
        "warmup",
        help="load files of a mount into the cache before they are read",
        description="Have the mount's node load PATHs (files, or directories: their files; with --recursive "
        "their trees) into the cache that will serve them: with --peers each chunk's owner on the ring, else "
        "the mount's own tiers. The bytes do not pass through FUSE. Chunks already cached are skipped, so a "
        "rerun after Ctrl-C resumes. Shows a progress bar on a terminal, a line every few seconds otherwise.",
    )
    wu.add_argument("paths", nargs="+", metavar="PATH", help="a file or directory inside a cachefs mount (MOUNTPOINT/NAME/...)")
    wu.add_argument("-r", "--recursive", action="store_true", help="warm up directories' whole trees, not only their own files")
    wu.add_argument("--concurrency", type=int, default=8, metavar="N", help="chunks loaded at once (default 8)")
    wu.add_argument(
        "--wait-ratio", type=float, metavar="R",
        help="exit 0 as soon as this share (0..1] of the bytes is cached; the node goes on loading the rest",
    )
    wu.add_argument("--json", action="store_true", help="print one JSON object per line, the last one the summary")
    wu.add_argument("--pin", action="store_true", help="also pin the PATHs (see `cachefs pin`); needs --ttl")
    wu.add_argument("--ttl", metavar="DURATION", help="with --pin: how long the lease lasts, e.g. 6h")
    wu.add_argument("--owner", default="cli", help="with --pin: who holds the lease")


def _add_fluid_mount(sub) -> None:
    fl = sub.add_parser(
        "fluid-mount",
        help="the FUSE container command of a Fluid ThinRuntime",
        description="Read Fluid's config.json (its mounts, targetPath, runtimeOptions), MOUNT_OPTIONS and the "
        "secret files the mounts' options name; mount the datasets at targetPath in the foreground (type "
        "fuse.cachefs), follow changes of config.json, and unmount on SIGTERM or umount. See docs/kubernetes.md.",
    )
    fl.add_argument("--fluid-config", metavar="PATH", default="/etc/fluid/config/config.json",
                    help="Fluid's config file (default /etc/fluid/config/config.json)")
    fl.add_argument("--log-file", help="log here instead of stderr")


# Flags that name files or directories: made absolute here, against the cwd.
_PATH_FLAGS = ("cache_dir", "run_dir", "peer_secret_file", "access_key_file", "secret_key_file")


def _flags(a: argparse.Namespace) -> dict:
    """The settings flags given, by config field (see loader.SETTINGS)."""
    from cachefs.loader import CREDENTIAL_FLAGS, SETTINGS

    known = {s.field for s in SETTINGS} | set(CREDENTIAL_FLAGS)
    flags = {k: v for k, v in vars(a).items() if k in known and v is not None}
    for k in _PATH_FLAGS:
        if k in flags:
            flags[k] = os.path.abspath(flags[k])
    return flags


def _node_config(a: argparse.Namespace, extra: list[str]) -> NodeConfig:
    """SOURCE MOUNTPOINT, or [MOUNTPOINT] with --dataset/--config, into one checked NodeConfig."""
    positionals = [x for x in (a.source, a.mountpoint) if x is not None] + extra
    if len(positionals) > 2:
        raise ConfigError(f"unexpected argument {positionals[2]!r}: give SOURCE MOUNTPOINT, or MOUNTPOINT with --dataset/--config")
    source = positionals[0] if len(positionals) == 2 else None
    flags = _flags(a)
    if positionals:
        flags["mountpoint"] = os.path.abspath(positionals[-1])
    if source is None and not a.dataset and not a.config:
        raise ConfigError("nothing to mount: give SOURCE MOUNTPOINT, --dataset NAME=URL or --config FILE")
    if a.read_write and source is None:
        raise ConfigError("--read-write is for SOURCE MOUNTPOINT; give a --dataset the rw option instead")
    from cachefs.loader import load_node

    return load_node(
        flags=flags, config_file=a.config, source=source, datasets=a.dataset, environment=not a.print_config,
        read_write=a.read_write,
    )


def _worker_config(a: argparse.Namespace) -> WorkerConfig:
    from cachefs.config import WorkerConfig, parse_addr
    from cachefs.loader import cache_settings

    sources = {}
    for item in a.source:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"--source {item!r}: expected NAME=URL")
        if name in sources:
            raise ConfigError(f"--source {name}: given twice")
        sources[name] = url
    listen = parse_addr(a.listen, "--listen")
    if a.advertise:
        parse_addr(a.advertise, "--advertise")
    c = WorkerConfig(listen=listen, sources=sources, advertise=a.advertise, drain_timeout=a.drain_timeout,
        drop_page_cache=not a.keep_page_cache, **cache_settings(_flags(a)))
    c.check()
    return c


def _setup_logging(level: str, log_file: str | None) -> None:
    import logging

    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    # botocore and friends are chatty at DEBUG, and their warnings are ours to report.
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.INFO))


def _mount(a: argparse.Namespace, argv: list[str], extra: list[str]) -> int:
    node = _node_config(a, extra)
    if a.print_config:
        from cachefs.loader import render

        sys.stdout.write(render(node))
        return 0
    config = node
    if a.background:
        return _spawn_background(a, argv, config)
    _setup_logging(config.log_level, a.log_file)
    from cachefs.mount import run_mount

    ready_fd = int(os.environ.pop(_READY_FD, "-1"))

    def on_ready() -> None:
        if ready_fd >= 0:
            os.write(ready_fd, b"ready")
            os.close(ready_fd)

    _run_trio(run_mount, config, on_ready)
    return 0


def _fluid_mount(a: argparse.Namespace) -> int:
    from cachefs import fluid

    config = fluid.load_fluid(a.fluid_config)
    fluid.prepare_target(config.mountpoint, f"{a.fluid_config}: targetPath")
    config.check()  # now with the machine: the cache dir, the target path
    _setup_logging(config.log_level, a.log_file)
    from cachefs.mount import run_mount

    _run_trio(run_mount, config, lambda: None, fluid.start(a.fluid_config))
    return 0


def _worker(a: argparse.Namespace) -> int:
    config = _worker_config(a)
    _setup_logging(config.log_level, a.log_file)
    from cachefs.worker import run_worker

    _run_trio(run_worker, config)
    return 0


def _run_trio(fn, *args) -> None:
    import trio

    from cachefs import heap

    heap.tune()  # before any thread makes an arena
    try:
        trio.run(fn, *args)
    except BaseExceptionGroup as group:
        # A ConfigError raised inside a nursery arrives wrapped; unwrap it so the
        # user gets its one sentence, not a traceback. So does the KeyboardInterrupt
        # of a second ^C during shutdown (the first one unmounts): exit 130, quietly.
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, (ConfigError, KeyboardInterrupt)):
            raise leaf from None
        raise


def _spawn_background(a: argparse.Namespace, argv: list[str], config: NodeConfig) -> int:
    """Start the mount as a detached child and wait until it says it is ready or dies."""
    log_file = a.log_file or default_log_file(config.mountpoint)
    child_argv = [arg for arg in argv if arg not in _BACKGROUND_FLAGS]
    if not a.log_file:
        child_argv += ["--log-file", log_file]
    try:
        child = start_mount(child_argv, log_file)
    except ConfigError as e:
        print(f"cachefs: mount failed: {e} (log {log_file})", file=sys.stderr)
        return e.exitcode
    what = config.root_dataset.source if config.root_dataset else ", ".join(d.name for d in config.datasets)
    print(f"cachefs: mounted {what} at {config.mountpoint} (pid {child.pid}, log {log_file})")
    return 0


def default_log_file(mountpoint: str) -> str:
    """Where a background mount logs unless told: `log_dir()`/MOUNTPOINT.log."""
    return os.path.join(log_dir(), re.sub(r"[^A-Za-z0-9]+", "-", mountpoint).strip("-") + ".log")


def log_dir() -> str:
    """cachefs's own directory for background mounts' logs, made if missing:
    $XDG_STATE_HOME/cachefs, else /var/log/cachefs for root and ~/.local/state/cachefs
    for others. Not the shared temp directory: anyone can put a symlink there under the
    name a log would take, and root would then append to the file it points at."""
    if os.environ.get("XDG_STATE_HOME"):
        path = os.path.join(os.environ["XDG_STATE_HOME"], "cachefs")
    elif os.geteuid() == 0:
        path = "/var/log/cachefs"
    else:
        path = os.path.join(os.path.expanduser("~"), ".local", "state", "cachefs")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def start_mount(argv: list[str], log_file: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run `cachefs ARGV` (a foreground mount) as a detached child logging to `log_file`,
    and return once it says the mount answers.

    Raises:
        ConfigError: the child exited first; the message is its last error line, and
            `exitcode` its exit code.
    """
    import signal
    import subprocess

    read_end, write_end = os.pipe()
    with open(os.devnull, "rb") as devnull, open(log_file, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "cachefs", *argv],
            stdin=devnull,
            stdout=out,
            stderr=out,
            env={**(os.environ if env is None else env), _READY_FD: str(write_end)},
            pass_fds=(write_end,),
            start_new_session=True,
        )
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as ready:
            status = ready.read()
    except BaseException:
        # Interrupted while it starts: it must not stay mounted with no one to unmount it.
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()
        raise
    if status == b"ready":
        return child
    code = child.wait()
    raise ConfigError(_last_error(log_file), exitcode=code or 1)


def _last_error(log_file: str) -> str:
    try:
        with open(log_file, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "unknown reason"
    for line in reversed(lines):
        if "error" in line.lower():
            return line.split("error: ", 1)[-1]
    return lines[-1] if lines else "unknown reason"


def _is_mounted(mountpoint: str) -> bool:
    # Not os.path.ismount: its stat() blocks forever on a hung daemon, the very
    # case where a user needs umount most.
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mountpoint for line in f)


def _control(target: str, op: str, args: dict | None = None):
    """The result of `op` on the node of `target` (a mountpoint or its control socket)."""
    from cachefs import control_client

    return control_client.request(control_client.socket_for(target), op, args, label=target)


def _dataset(a: argparse.Namespace) -> int:
    from cachefs import status
    from cachefs.loader import format_dataset_spec, parse_dataset_spec

    if a.action == "add":
        # Checked here too, so a typo is caught before the node is asked, and relative
        # paths are taken from the user's directory, not the daemon's.
        spec = format_dataset_spec(parse_dataset_spec(a.spec))
        _control(a.mountpoint, "dataset.add", {"spec": spec})
        print(f"cachefs: {a.mountpoint}: added dataset {spec.partition('=')[0]}")
    elif a.action == "remove":
        _control(a.mountpoint, "dataset.remove", {"name": a.name, "force": a.force})
        print(f"cachefs: {a.mountpoint}: removed dataset {a.name}")
    else:
        rows = _control(a.mountpoint, "dataset.list")
        print(json.dumps(rows, indent=2) if a.json else status.render_datasets(rows))
    return 0


def _status(a: argparse.Namespace) -> int:
    from cachefs import status

    targets = [(t, status.is_metrics_addr(t)) for t in a.nodes]
    if a.json and (len(targets) != 1 or targets[0][1]):
        raise ConfigError("--json takes one MOUNTPOINT (HOST:PORT shows metrics as text only)")
    for target, metrics in targets:
        if metrics:
            print(status.render(target, status.scrape(target)))
            continue
        result = _control(target, "status")
        if not _is_mountpoint(target):
            # A path inside a mount: what is cached of its whole subtree, and where, from one walk.
            from cachefs import control_client

            inner = control_client.mount_path(target)
            result["path"] = {"path": inner, **_control(target, "residency", {"path": inner})}
        elif a.deep:
            # Each dataset walked: its total bytes, what is cached of it, and where.
            for d in result.get("datasets") or []:
                d["residency"] = _control(target, "residency", {"path": d.get("name") or ""})
        print(json.dumps(result, indent=2) if a.json else status.render_node(target, result))
    return 0


def _is_mountpoint(target: str) -> bool:
    """Whether `target` is a mountpoint itself (or a control socket), not a path inside a mount."""
    path = os.path.abspath(target)
    return _is_mounted(path) or not os.path.isdir(path)


def _refresh(a: argparse.Namespace) -> int:
    from cachefs import control_client

    for path in a.paths:
        inner = control_client.mount_path(path)
        result = _control(path, "refresh", {"path": inner, "recursive": a.recursive})
        print(f"cachefs: {path}: {result['changed']} changed, {result['gone']} gone")
    return 0


def _pin(a: argparse.Namespace) -> int:
    from cachefs import control_client
    from cachefs.config import format_size
    from cachefs.loader import parse_duration

    ttl = parse_duration(a.ttl, "--ttl")
    inner = [control_client.mount_path(p) for p in a.paths]
    lease = _control(a.paths[0], "pin.add", {"paths": inner, "ttl": ttl, "owner": a.owner})
    if a.json:
        print(json.dumps(lease, indent=2))
    else:
        owners = f", at {len(lease['peers'])} owners on the ring" if lease.get("peers") else ""
        print(f"cachefs: pinned {format_size(lease['bytes'])} of {', '.join(a.paths)} "
              f"for {a.ttl} (lease {lease['id']}, owner {lease['owner']}{owners})")
    return 0


def _unpin(a: argparse.Namespace) -> int:
    from cachefs import control_client
    from cachefs.config import format_size

    by_path = not a.owner and not a.lease
    inner = [control_client.mount_path(p) for p in a.paths] if by_path else []
    gone = _control(a.paths[0], "pin.remove", {"paths": inner, "owner": a.owner, "ids": a.lease})
    print(f"cachefs: ended {len(gone)} lease(s), {format_size(sum(g['bytes'] for g in gone))} unpinned")
    unreached = sorted({node for g in gone for node in g.get("unreached", [])})
    if unreached:
        print(f"cachefs: owners {', '.join(unreached)} could not be told; their part ends at the lease's TTL",
              file=sys.stderr)
    return 0
def _warmup(a: argparse.Namespace) -> int:
    from cachefs import warmup_client

    if a.pin != (a.ttl is not None):
        raise ConfigError("--pin and --ttl go together: a pin needs a lease time")
    pin = None
    if a.pin:
        from cachefs.loader import parse_duration

        pin = (parse_duration(a.ttl, "--ttl"), a.owner)
    return warmup_client.run(
        a.paths, recursive=a.recursive, concurrency=a.concurrency, wait_ratio=a.wait_ratio, as_json=a.json, pin=pin
    )


def _umount(a: argparse.Namespace) -> int:
    import subprocess

    mountpoint = os.path.abspath(a.mountpoint)
    if not _is_mounted(mountpoint):
        raise ConfigError(f"{mountpoint}: not mounted")
    cmd = ["fusermount3", "-u", *(["-z"] if a.lazy else []), mountpoint]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise ConfigError(f"{mountpoint}: cannot unmount: {result.stderr.strip()}", exitcode=1)
    return 0


# `cachefs COMMAND`: the handler of each command but mount (it takes the raw arguments too).
_COMMANDS = {
    "worker": _worker,
    "fluid-mount": _fluid_mount,
    "dataset": _dataset,
    "status": _status,
    "refresh": _refresh,
    "pin": _pin,
    "unpin": _unpin,
    "warmup": _warmup,
    "umount": _umount,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(node_commands=not (argv and argv[0] in _CONTROL_COMMANDS))
    # parse_known_args: SOURCE and MOUNTPOINT are optional (nargs="?"), so argparse
    # leaves a MOUNTPOINT written after an option over; _node_config takes it back.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "mount" or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "mount":
            return _mount(args, argv, extra)
        return _COMMANDS[args.command](args)
    except ConfigError as e:
        logging = sys.modules.get("logging")  # imported by the commands that log
        if logging is not None and logging.getLogger().handlers:  # else its last resort repeats the line on stderr
            logging.getLogger("cachefs").error("%s", e)
        print(f"cachefs: error: {e}", file=sys.stderr)
        return e.exitcode
    except KeyboardInterrupt:
        return 130
