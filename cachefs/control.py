"""The control socket: how `cachefs dataset ...` and `cachefs status MOUNTPOINT` talk to a node.

Each mount (and worker) listens on a unix stream socket, mode 0600 in a run
directory of mode 0700 (default CACHE_DIR/run, or --run-dir), so only root (the
node's owner) can use it. The protocol is newline-delimited JSON, one request and
one reply per line, several requests per connection, answered in order::

    → {"v": 1, "op": "dataset.list", "args": {}}
    ← {"v": 1, "ok": true, "result": [...]}
    ← {"v": 1, "ok": false, "error": "one line that says what is wrong"}

Ops (see OPS and docs/operations.md): `hello`, `dataset.add` {spec},
`dataset.remove` {name, force}, `dataset.list`, `status`, `warmup.start`
{paths, recursive, concurrency} → the job's progress (its id in "job"),
`warmup.progress` {job}, `warmup.cancel` {job} (see cachefs/warmup.py).

Versioning: `v` must equal PROTOCOL_VERSION; unknown fields (top level or in
`args`) are ignored, so a later version can add optional ones. A request that is
not valid JSON, is longer than MAX_LINE or arrives unterminated gets an error
reply and the connection is closed; any other bad request (unknown op, wrong
type, missing argument, wrong version) gets an error reply and the connection
stays open. Nothing a client sends ends the server.

A mount tells where its socket is through the xattr XATTR of its mountpoint, so
the CLI takes a MOUNTPOINT. The client side (`request`, `socket_for`, the
protocol's framing) is in cachefs/control_client.py, which the CLI imports
without this module and its event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import socket
import stat
from typing import Any, Callable, Protocol

import trio

from cachefs import __version__
from cachefs.config import DatasetConfig, url_scheme
from cachefs.control_client import PROTOCOL_VERSION, addressable, encode, one_line, request
from cachefs.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10  # bytes of one request, newline included
MAX_CALL = 600.0  # seconds an abandoned `call` may keep its thread


class NodeControl(Protocol):
    """What the control socket needs of a node (mount or worker); `Node` satisfies it."""

    async def add_dataset(self, dataset: DatasetConfig) -> None:
        """Open and serve `dataset`. Raises ConfigError (one line): name taken, cannot be opened."""

    async def remove_dataset(self, name: str, force: bool) -> None:
        """Stop serving dataset `name`. Raises ConfigError: unknown, or busy (open files) and not force."""

    def list_datasets(self) -> list[dict]:
        """JSON-able, one dict per dataset: name, url, read_only, subdir, quota, open_files, ..."""

    def status(self) -> dict:
        """JSON-able node status: version, hot_path, tiers, datasets, peers (docs/operations.md)."""

    async def refresh(self, path: str, recursive: bool) -> dict:
        """Revalidate what is cached of mount path `path` now: {"changed": n, "gone": n}.
        Raises ConfigError (no such dataset) or BackendError."""

    async def pin(self, paths: list[str], ttl: float, owner: str) -> dict:
        """Pin the chunks of mount paths for `ttl` seconds: the lease. Raises ConfigError (quota, no SSD)."""

    async def unpin(self, *, paths: list[str], owner: str | None, ids: list[str]) -> list[dict]:
        """End the matching leases; returns them."""

    def list_pins(self) -> list[dict]:
        """The leases in force."""

    async def subtree_residency(self, path: str) -> dict:
        """What this node caches of every file below mount path `path`: files, bytes, cached_bytes, ratio, chunks."""
    # warmups: cachefs.warmup.Warmups, the node's warm-up jobs (start, progress, cancel)


@dataclasses.dataclass(frozen=True)
class ControlLimits:
    max_connections: int = 8  # at once; the next one gets a "busy" reply and is closed
    request_timeout: float = 30.0  # seconds a connection may take to send (the rest of) a request


# -- messages ---------------------------------------------------------------------------------


class RequestError(Exception):
    """A bad request: reply with its message; `close` ends the connection too."""

    def __init__(self, msg: str, close: bool = False):
        super().__init__(msg)
        self.close = close


def _arg(args: dict, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in args:
        if default is ...:
            raise RequestError(f"args.{key}: missing")
        return default
    value = args[key]
    # bool is an int in Python; JSON keeps them apart, and so do we.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        expected = "/".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise RequestError(f"args.{key}: expected {expected}, not {type(value).__name__}")
    return value


def decode_request(line: bytes) -> tuple[str, dict]:
    """(op, args) of one request line, strictly checked.

    Raises:
        RequestError: not JSON (close), not an object, wrong `v`, unknown `op`, `args` not an object.
    """
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise RequestError("request is not valid JSON", close=True) from None
    if not isinstance(message, dict):
        raise RequestError(f"request is a JSON {type(message).__name__}, not an object")
    v = message.get("v")
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError('request has no integer "v" (protocol version)')
    if v != PROTOCOL_VERSION:
        raise RequestError(f"protocol version {v} is not supported (this node speaks {PROTOCOL_VERSION})")
    op = message.get("op")
    if not isinstance(op, str):
        raise RequestError('request has no string "op"')
    if op not in OPS:
        raise RequestError(f"unknown op {op[:40]!r} (known: {', '.join(OPS)})")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise RequestError('"args" must be an object')
    return op, args


def error_reply(msg: str) -> dict:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": one_line(msg)}


# -- ops ----------------------------------------------------------------------------------------


def _absolute_paths(spec: str) -> None:
    """The daemon's working directory means nothing to the user: refuse relative paths.

    Raises:
        RequestError: the URL or a key file of `spec` is a relative path.
    """
    _, _, rest = spec.partition("=")
    url, *options = rest.split(",")
    if url and not url_scheme(url) and not url.startswith("file://") and not os.path.isabs(url):
        raise RequestError(f"dataset spec: URL {url!r} must be absolute over the control socket")
    for option in options:
        key, _, value = option.partition("=")
        if key.strip().replace("-", "_") in ("access_key_file", "secret_key_file") and value and not os.path.isabs(value):
            raise RequestError(f"dataset spec: {key.strip()} {value!r} must be an absolute path")


async def _dataset_add(node: NodeControl, args: dict) -> None:
    from cachefs.loader import read_credentials, parse_dataset_spec

    spec = _arg(args, "spec", str)
    _absolute_paths(spec)
    dataset = parse_dataset_spec(spec)  # NAME is required: nothing is added at the mount root
    # Reads the key files the spec names (a little blocking I/O, off the event loop);
    # check() wants the keys read, as NodeConfig.check does.
    dataset = await trio.to_thread.run_sync(read_credentials, dataset)
    dataset.check()
    await node.add_dataset(dataset)
    return None


async def _dataset_remove(node: NodeControl, args: dict) -> None:
    await node.remove_dataset(_arg(args, "name", str), _arg(args, "force", bool, False))
    return None


async def _dataset_list(node: NodeControl, args: dict) -> list[dict]:
    return node.list_datasets()


async def _status(node: NodeControl, args: dict) -> dict:
    return node.status()


async def _refresh(node: NodeControl, args: dict) -> dict:
    try:
        return await node.refresh(_arg(args, "path", str), _arg(args, "recursive", bool, False))
    except BackendError as e:
        raise RequestError(f"refresh: the backend could not be asked ({e})") from None


def _strings(args: dict, key: str) -> list[str]:
    value = _arg(args, key, list, [])
    if not all(isinstance(v, str) for v in value):
        raise RequestError(f"argument {key!r} must be a list of strings")
    return value


async def _pin_add(node: NodeControl, args: dict) -> dict:
    ttl = _arg(args, "ttl", (int, float))
    try:
        return await node.pin(_strings(args, "paths"), float(ttl), _arg(args, "owner", str, "cli"))
    except BackendError as e:
        raise RequestError(f"pin: the backend could not be asked ({e})") from None


async def _pin_remove(node: NodeControl, args: dict) -> list[dict]:
    owner = _arg(args, "owner", str, None) if args.get("owner") is not None else None
    return await node.unpin(paths=_strings(args, "paths"), owner=owner, ids=_strings(args, "ids"))


async def _pin_list(node: NodeControl, args: dict) -> list[dict]:
    return node.list_pins()


async def _residency(node: NodeControl, args: dict) -> dict:
    try:
        return await node.subtree_residency(_arg(args, "path", str))
    except BackendError as e:
        raise RequestError(f"residency: the backend could not be asked ({e})") from None
async def _warmup_start(node: NodeControl, args: dict) -> dict:
    from cachefs.warmup import DEFAULT_CONCURRENCY

    paths = _arg(args, "paths", list)
    if not all(isinstance(p, str) for p in paths):
        raise RequestError("args.paths: expected a list of str")
    recursive = _arg(args, "recursive", bool, False)
    concurrency = _arg(args, "concurrency", int, DEFAULT_CONCURRENCY)
    return await node.warmups.start(paths, recursive, concurrency)


async def _warmup_progress(node: NodeControl, args: dict) -> dict:
    return await node.warmups.progress(_arg(args, "job", str), _arg(args, "wait", (int, float), 0.0))


async def _warmup_cancel(node: NodeControl, args: dict) -> dict:
    return node.warmups.cancel(_arg(args, "job", str))


async def _hello(node: NodeControl, args: dict) -> dict:
    return {"protocol": PROTOCOL_VERSION, "version": __version__, "ops": list(OPS)}


OPS: dict[str, Callable[[NodeControl, dict], Any]] = {
    "hello": _hello,
    "dataset.add": _dataset_add,
    "dataset.remove": _dataset_remove,
    "dataset.list": _dataset_list,
    "status": _status,
    "refresh": _refresh,
    "pin.add": _pin_add,
    "pin.remove": _pin_remove,
    "pin.list": _pin_list,
    "residency": _residency,
    "warmup.start": _warmup_start,
    "warmup.progress": _warmup_progress,
    "warmup.cancel": _warmup_cancel,
}


# -- server ---------------------------------------------------------------------------------------


class ControlServer:
    """Serves the control protocol for one node over already-accepted streams."""

    def __init__(self, node: NodeControl, limits: ControlLimits = ControlLimits()):
        self.node = node
        self.limits = limits
        self.connections = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it ends. Never raises, except to cancel (shutdown)."""
        self.connections += 1
        try:
            if self.connections > self.limits.max_connections:
                await stream.send_all(encode(error_reply("busy: too many control connections; try again")))
                await _linger(stream)
                return
            await self._serve(stream)
        except trio.BrokenResourceError:
            pass  # the client went away before its reply
        except Exception as exc:  # noqa: BLE001 - the per-connection boundary (ExceptionGroups included)
            log.error("control connection failed: %s", one_line(repr(exc)), exc_info=exc)
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve(self, stream: trio.abc.Stream) -> None:
        buffer = bytearray()
        while True:
            with trio.move_on_after(self.limits.request_timeout) as scope:
                line = await _read_line(stream, buffer, MAX_LINE)
            if scope.cancelled_caught or line is None:  # a slow client, or EOF between requests
                return
            reply, close = await self._answer(line)
            await stream.send_all(reply)
            if close:
                await _linger(stream)
                return

    async def _answer(self, line: bytes | RequestError) -> tuple[bytes, bool]:
        """The reply to one request line, and whether to close the connection after it."""
        op = "?"
        try:
            if isinstance(line, RequestError):
                raise line
            op, args = decode_request(line)
            result = await OPS[op](self.node, args)
            return encode({"v": PROTOCOL_VERSION, "ok": True, "result": result}), False
        except RequestError as e:
            return encode(error_reply(str(e))), e.close
        except ConfigError as e:
            return encode(error_reply(str(e))), False
        except Exception as e:  # noqa: BLE001 - a bug (ours or the node's) fails this request, not the server
            # The op only: a request's arguments may name key files and keys.
            log.exception("control request %r failed", op)
            return encode(error_reply(f"internal error: {type(e).__name__}: {e}")), True


async def _linger(stream: trio.abc.Stream) -> None:
    """Close politely after a reply the client may still be sending into.

    Closing a unix socket with unread input resets it, and the client would see
    ECONNRESET instead of our error reply; so say EOF, then read and drop what
    follows for a little while (bounded in bytes and time).
    """
    with trio.move_on_after(1):
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        dropped = 0
        while dropped < 1 << 20 and (data := await stream.receive_some(64 << 10)):
            dropped += len(data)


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray, cap: int) -> bytes | RequestError | None:
    """The next line (without its newline) from `stream`, buffering what follows it.

    Returns:
        The line; a RequestError (close) if it is longer than `cap` or cut off by
        EOF; None at EOF between lines.
    """
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            if end + 1 > cap:
                return RequestError(f"request longer than {cap} bytes", close=True)
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            return line
        if len(buffer) >= cap:
            return RequestError(f"request longer than {cap} bytes", close=True)
        data = await stream.receive_some(cap - len(buffer) + 1)
        if not data:
            if buffer:
                return RequestError("request not terminated by a newline", close=True)
            return None
        buffer += data


def socket_path(run_dir: str, name: str) -> str:
    """Where a node named `name` (its mountpoint, or a worker's listen address) puts its socket.

    Readable and short: sun_path holds 107 bytes, so a long name is cut and told
    apart by a hash.
    """
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:40] or "node"
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return os.path.join(run_dir, f"{slug}-{digest}.sock")


def _make_run_dir(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        st = os.stat(run_dir)
    except OSError as e:
        raise ConfigError(f"run dir {run_dir}: cannot create it ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"run dir {run_dir}: not a directory")


async def _claim(path: str) -> None:
    """Make `path` free for a new socket: remove a stale one, refuse a live one or any other file.

    Raises:
        ConfigError: another process listens there, or the path is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"control socket {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"control socket {path}: exists and is not a socket; remove it or choose another --run-dir")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # A live node accepts at once; a hung one may not, and is as good as live.
        with trio.move_on_after(2):
            with addressable(path) as address:
                await probe.connect(address)
        raise ConfigError(f"control socket {path} is in use by another cachefs (unmount it or choose another --run-dir)")
    except ConnectionRefusedError:
        pass  # stale: its node died without cleaning up
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"control socket {path}: cannot tell whether it is in use ({e.strerror})") from None
    finally:
        probe.close()
    log.info("removing the stale control socket %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _bind(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from birth (umask), checked after bind."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # no await between: nothing else runs with this umask but threads' creates, made stricter
        try:
            with addressable(path) as address:
                sock.bind(address)
        finally:
            os.umask(old)
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        if mode != 0o600:
            os.unlink(path)
            raise ConfigError(f"control socket {path}: has mode {mode:04o} after bind, not 0600")
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise ConfigError(f"control socket {path}: cannot listen ({e.strerror})") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_control(
    node: NodeControl,
    path: str,
    *,
    limits: ControlLimits = ControlLimits(),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at `path` for `node` until cancelled; start with `nursery.start`.

    Creates the run dir (0700) if missing, removes a stale socket, binds with mode
    0600 and reports started once listening. The socket file is removed on every
    way out (cancellation and errors too), unless another process has replaced it.

    Raises:
        ConfigError: before started: the path is too long, the run dir cannot be
            made, or another live cachefs owns the socket.
    """
    path = os.path.abspath(path)
    _make_run_dir(os.path.dirname(path))
    await _claim(path)
    sock = _bind(path)
    st = os.lstat(path)
    try:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        server = ControlServer(node, limits)
        log.info("control socket at %s", path)
        await trio.serve_listeners(server.handle, [listener], task_status=task_status)
    finally:
        sock.close()
        try:
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
        except FileNotFoundError:
            pass


async def call(path: str, op: str, args: dict | None = None, *, label: str | None = None) -> Any:
    """`request` from async code, in a thread (the node may run in this very event
    loop); the caller sets the timeout.

    Raises:
        ConfigError: as `request`.
    """
    ask = functools.partial(request, path, op, args, timeout=MAX_CALL, label=label)
    return await trio.to_thread.run_sync(ask, abandon_on_cancel=True)
