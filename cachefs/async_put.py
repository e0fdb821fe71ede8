"""Small PUTs sent from the trio thread, over kept-alive HTTP/1.1 connections.

A 64 KiB PUT sent through a thread (`S3FastPath.put`: http.client in one of the
backend's threads) took 7.3 ms at one in flight against the JuiceFS gateway here.
Sent from the trio thread it took 6.5 ms, with 0.5 ms less CPU. What is saved is the
hop to the thread and back (each hop wakes an idle vCPU) and http.client's header
parsing (email.parser). For a close-to-open writer of small files, the close waits
for that PUT.

Only answers with a status line, headers, and a body of Content-Length bytes are
read here. 200 is the PUT done; 403, 404 and 5xx are mapped as `S3FastPath` maps
them. Any other answer (a redirect, a 400 that botocore handles, a body of unknown
length) raises `NotHandled`, and the caller sends that PUT again through the thread
path, which handles every answer. Plain HTTP only: an https endpoint keeps the
thread path.

h11 would parse the answers too, but it cost 0.35 ms of CPU more per PUT than this,
most of the CPU the trio-thread path saves.
"""

from __future__ import annotations

import errno
import os

import trio

# The largest answer head read (an S3 PUT's is under 1 KiB).
MAX_HEAD = 16 << 10
# The largest answer body read, to keep the connection (a 200 to a PUT has none).
MAX_BODY = 64 << 10


class NotHandled(Exception):
    """An answer or endpoint this path does not read: send the PUT through the thread path.
    `for_good`: every PUT would get the same (the store's 200 has no body length)."""

    def __init__(self, message: str, for_good: bool = False):
        super().__init__(message)
        self.for_good = for_good


class _Connection:
    """One kept-alive connection and what was received past the last answer."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buffer = bytearray()
        self.keep = False  # the last answer left it ready for the next request


class AsyncPutter:
    """PUTs of bodies already signed (`_Presigner.sign`), from the trio thread.

    Args:
        timeout: seconds to connect, and seconds from the request sent to its answer.
        keep: idle connections kept per endpoint (as many as PUTs run at once).
    """

    def __init__(self, timeout: float, keep: int):
        self.timeout = timeout
        self.keep = keep
        self._idle: dict[str, list[_Connection]] = {}

    async def put(self, netloc: str, target: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        """PUT `body` at `target` ("/path?query") of http://`netloc`; the answer's headers,
        names in lower case. Not cancellable, as a PUT in a thread is not: one left half
        sent could still land after a later one. Each step is bounded by the timeout.

        Raises:
            FileNotFoundError (404: no such bucket), PermissionError (403), OSError (5xx),
            ConnectionError (no connection, or it broke), TimeoutError: as the thread
                path raises them, for `_translate`.
            NotHandled: any other answer.
        """
        head = "".join([
            f"PUT {target} HTTP/1.1\r\nHost: {netloc}\r\nContent-Length: {len(body)}\r\n",
            *(f"{name}: {value}\r\n" for name, value in headers.items()),
            "\r\n",
        ]).encode("latin-1")
        with trio.CancelScope(shield=True):
            for attempt in (1, 2):
                conn, reused = await self._connection(netloc, fresh=attempt == 2)
                try:
                    with trio.fail_after(self.timeout):
                        try:
                            await conn.stream.send_all(head + body)
                        except trio.BrokenResourceError as e:
                            if reused:
                                raise _Stale() from None
                            raise ConnectionResetError(f"{netloc}: {e.__cause__ or e}") from e
                        status, headers_in, text = await self._answer(conn, first=reused)
                except trio.TooSlowError:
                    _close(conn)
                    raise TimeoutError(f"{netloc}: no answer within {self.timeout:g}s") from None
                except _Stale:
                    _close(conn)
                    for other in self._idle.pop(netloc, []):  # let go of at the same time, likely
                        _close(other)
                    if attempt == 1:
                        continue  # a kept-alive connection the server had closed: once more, on a new one
                    raise ConnectionResetError("the connection closed before the answer") from None
                except BaseException:
                    _close(conn)
                    raise
                if conn.keep:
                    self._keep(netloc, conn)
                else:
                    _close(conn)
                if status == 200:
                    return headers_in
                what = target.partition("?")[0]
                if status == 404:
                    raise FileNotFoundError(errno.ENOENT, what)
                if status == 403:
                    raise PermissionError(errno.EACCES, f"{what}: {text[:200]!r}")
                if status >= 500:
                    raise OSError(errno.EIO, f"{what}: HTTP {status} {text[:200]!r}")
                raise NotHandled(f"HTTP {status}")
        raise AssertionError("unreachable")

    async def _connection(self, netloc: str, fresh: bool) -> tuple[_Connection, bool]:
        """A connection to `netloc` and whether it was kept from an earlier PUT."""
        idle = self._idle.get(netloc)
        if idle and not fresh:
            return idle.pop(), True
        if netloc.startswith("["):  # [IPv6]:port
            host, _, port = netloc[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = netloc.partition(":")
        if not port.isdigit():
            if port:
                raise NotHandled(f"no port in {netloc!r}")
            port = "80"
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_tcp_stream(host, int(port))
        except trio.TooSlowError:
            raise TimeoutError(f"{netloc}: no connection within {self.timeout:g}s") from None
        except OSError as e:
            raise ConnectionError(f"{netloc}: {e}") from e
        return _Connection(stream), False

    def _keep(self, netloc: str, conn: _Connection) -> None:
        idle = self._idle.setdefault(netloc, [])
        if len(idle) < self.keep:
            idle.append(conn)
        else:
            _close(conn)

    async def _answer(self, conn: _Connection, first: bool) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of the answer on `conn`; sets `conn.keep`. `first`: the
        first request on a kept-alive connection (nothing back: `_Stale`)."""
        buf = conn.buffer
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise NotHandled("an answer head of more than 16 KiB")
            data = await _receive(conn)
            if not data:
                if first and not buf:
                    raise _Stale()
                raise ConnectionResetError("the connection closed before the answer")
            buf += data
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or not code.isdigit():
            raise NotHandled(f"not an HTTP answer: {lines[0][:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise NotHandled(f"a malformed header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        if status < 200 or "transfer-encoding" in headers or not headers.get("content-length", "").isdigit():
            conn.keep = False
            if status == 200:
                raise NotHandled("a 200 without a body of known length", for_good=True)
            return status, headers, b""  # an error: its text is not needed to name it
        length = int(headers["content-length"])
        if length > MAX_BODY:
            raise NotHandled(f"HTTP {status} with a body of {length} bytes")
        while len(buf) < length:
            data = await _receive(conn)
            if not data:
                raise ConnectionResetError("the connection closed inside the answer")
            buf += data
        text = bytes(buf[:length])
        del buf[:length]
        conn.keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close" and not buf
        return status, headers, text

    def close(self) -> None:
        """Close the idle connections, in the trio run or after it ended."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                _close(conn)


class _Stale(Exception):
    """A kept-alive connection closed with nothing received: the server had let it go."""


async def _receive(conn: _Connection) -> bytes:
    try:
        return await conn.stream.receive_some(65536)
    except trio.BrokenResourceError as e:  # reset by the peer
        raise ConnectionResetError(str(e.__cause__ or e)) from e


def _close(conn: _Connection) -> None:
    """Close `conn` at once, in the trio run or after it ended."""
    sock = conn.stream.socket
    try:
        sock.close()  # tells the trio run's I/O manager first
    except RuntimeError:  # the run has ended: nothing to tell
        os.close(sock.detach())
