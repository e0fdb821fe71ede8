"""The client side of the control socket (cachefs/control.py): one request, one reply.

Blocking sockets and the standard library only: every `cachefs status`,
`warmup`, `pin` ... is a short-lived process, and an event loop would cost it
more start-up time (importing trio) than the request itself takes.

A mount tells where its socket is through the xattr XATTR of its mountpoint, so
the CLI takes a MOUNTPOINT, or any path in a mount (`socket_for`, `socket_above`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

from cachefs.errors import ConfigError

T = TypeVar("T")

PROTOCOL_VERSION = 1
XATTR = "user.cachefs.control"
XATTR_PATH = "user.cachefs.path"
NOT_IN_A_MOUNT = "not in a cachefs mount"  # one wording for every command
MAX_REPLY = 16 << 20  # bytes of one reply the client accepts
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included


def encode(message: dict) -> bytes:
    """One message as a JSON line (ASCII: no encoding questions)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


@contextlib.contextmanager
def addressable(path: str) -> Iterator[str]:
    """A name for the socket at `path` that fits sun_path (107 bytes): `path` itself
    if short enough, else the same file reached through an open descriptor of its
    directory (/proc/self/fd/N/NAME), so a deep --cache-dir or --run-dir still works."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def connect_error(e: OSError, path: str, label: str) -> ConfigError:
    if isinstance(e, FileNotFoundError):
        return ConfigError(f"{label}: no cachefs control socket (is it a cachefs mount?)")
    if isinstance(e, ConnectionRefusedError):
        return ConfigError(f"{label}: control socket {path} is stale: no cachefs listens there (did the daemon die?)")
    if isinstance(e, PermissionError):
        return ConfigError(f"{label}: permission denied: only root can use the control socket {path}")
    return ConfigError(f"{label}: cannot reach the control socket {path} ({e.strerror or e})")


def request(path: str, op: str, args: dict | None = None, timeout: float = 10, *, label: str | None = None) -> Any:
    """Send one request to the control socket at `path` and return its result,
    within `timeout` seconds. `label` names the target in errors (default `path`).

    Raises:
        ConfigError: one line. exitcode 1 for an error reply of the node; 2 when it
            cannot be reached, answers garbage or does not answer within `timeout`.
    """
    label = label or path
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.settimeout(left())
            with addressable(path) as address:
                sock.connect(address)
        except TimeoutError:
            raise ConfigError(f"{label}: no reply from the node within {timeout:g} s") from None
        except OSError as e:
            raise connect_error(e, path, label) from None
        reply = bytearray()
        try:
            sock.sendall(encode({"v": PROTOCOL_VERSION, "op": op, "args": args or {}}))
            while b"\n" not in reply and len(reply) <= MAX_REPLY:
                sock.settimeout(left())
                data = sock.recv(1 << 16)
                if not data:
                    break
                reply += data
        except TimeoutError:
            raise ConfigError(f"{label}: no reply from the node within {timeout:g} s") from None
        except OSError as e:
            raise ConfigError(f"{label}: the control connection broke ({e})") from None
    finally:
        sock.close()
    line, newline, _ = reply.partition(b"\n")
    if not newline or len(line) > MAX_REPLY:
        raise ConfigError(f"{label}: the node closed the control connection without a reply")
    try:
        answer = json.loads(line)
        ok = answer["ok"]
        if answer.get("v") != PROTOCOL_VERSION or not isinstance(ok, bool):
            raise ValueError
    except (ValueError, TypeError, KeyError):
        raise ConfigError(f"{label}: the node's reply is not control protocol v{PROTOCOL_VERSION}") from None
    if not ok:
        raise ConfigError(one_line(answer.get("error")), exitcode=1)
    return answer.get("result")


def _locate(target: str) -> str:
    """Blocking part of socket_for: may hang on a hung FUSE mount, so it runs in a thread."""
    try:
        st = os.stat(target)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise ConfigError(f"{target}: the mount's daemon is gone (run fusermount3 -u {target})") from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"{target}: permission denied: only root can use cachefs control sockets") from None
        raise ConfigError(f"{target}: {e.strerror}") from None
    if stat.S_ISSOCK(st.st_mode):
        return target
    return socket_above(target)[0]


def socket_above(target: str) -> tuple[str, str]:
    """(control socket, `target` relative to the mount root) of a path in a cachefs
    mount. The path need not exist (the node says what is wrong with it): the
    nearest of it and its parents that names a control socket is the mount root.
    Blocking: a hung mount hangs it, so callers run it in a thread (`ask_mount`).

    Raises:
        ConfigError: not in a cachefs mount, or the mount's daemon is gone.
    """
    path = os.path.realpath(target)
    inside: list[str] = []
    while True:
        try:
            value = os.getxattr(path, XATTR)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise ConfigError(f"{target}: the mount's daemon is gone (run fusermount3 -u {path})") from None
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP,
                               errno.EPERM, errno.EACCES):
                raise ConfigError(f"{target}: cannot ask for its control socket ({e.strerror})") from None
        else:
            sock = os.fsdecode(value)
            if not os.path.isabs(sock):
                raise ConfigError(f"{target}: the mount names a control socket that is not an absolute path")
            return sock, "/".join(reversed(inside))
        parent = os.path.dirname(path)
        if parent == path:
            raise ConfigError(f"{target}: {NOT_IN_A_MOUNT}")
        inside.append(os.path.basename(path))
        path = parent


def socket_for(target: str, timeout: float = 5) -> str:
    """The control socket of `target`: a socket file itself, or a cachefs mountpoint (or a path in one).

    Raises:
        ConfigError: one line: no such path, not a cachefs mount, the daemon is
            gone, or the mount does not answer within `timeout` seconds.
    """
    return ask_mount(_locate, os.path.abspath(target), timeout)


def mount_path(target: str, timeout: float = 5) -> str:
    """Where `target` (a path inside a cachefs mount) is, as the mount names it: "" for
    its root, "NAME/..." inside dataset NAME.

    Raises:
        ConfigError: one line: no such path, not in a cachefs mount, or no answer.
    """
    return ask_mount(_mount_path, os.path.abspath(target), timeout)


def _mount_path(target: str) -> str:
    try:
        return os.fsdecode(os.getxattr(target, XATTR_PATH))
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise ConfigError(f"{target}: {NOT_IN_A_MOUNT}") from None
        if e.errno == errno.ENOTCONN:
            raise ConfigError(f"{target}: the mount's daemon is gone") from None
        raise ConfigError(f"{target}: {e.strerror}") from None


def ask_mount(ask: Callable[[str], T], target: str, timeout: float) -> T:
    """`ask(target)` in a thread, given up after `timeout` seconds: anything that
    touches a FUSE mount may hang with its daemon, and the CLI must not."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, ask(target)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller as it is
            outcome.append((False, e))

    # A daemon thread, left behind on timeout: stat and getxattr change nothing,
    # and a hung mount never returns.
    thread = threading.Thread(target=run, name="cachefs-ask-mount", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise ConfigError(f"{target}: no answer within {timeout:g} s (a hung mount?)")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
