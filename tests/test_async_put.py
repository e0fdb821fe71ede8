"""cachefs.async_put: small PUTs from the trio thread, against a scripted HTTP server
on loopback: bodies arrive whole, connections are kept and replaced, and every answer
it does not read is handed to the thread path (`NotHandled`)."""

from __future__ import annotations

import contextlib
import errno
import functools

import pytest
import trio
import trio.testing

from cachefs.async_put import AsyncPutter, NotHandled

OK = b"HTTP/1.1 200 OK\r\nETag: \"abc\"\r\nContent-Length: 0\r\n\r\n"


class Server:
    """Answers each request with the next of `answers` (bytes, or None: close the
    connection without answering); records the requests' bodies and connections."""

    def __init__(self, answers: list[bytes | None], close_after: bool = False):
        self.answers = list(answers)
        self.close_after = close_after  # close each connection after its answer, saying nothing
        self.bodies: list[bytes] = []
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                self.bodies.append(buf[:length])
                buf = buf[length:]
                answer = self.answers.pop(0)
                if answer is None:
                    return
                await stream.send_all(answer)
                if self.close_after:
                    return
        finally:
            await stream.aclose()

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        return "127.0.0.1:%d" % listeners[0].socket.getsockname()[1]


async def put(putter: AsyncPutter, netloc: str, body: bytes) -> dict[str, str]:
    return await putter.put(netloc, "/bucket/key?x=1", {"x-amz-date": "20260101T000000Z"}, body)


@contextlib.asynccontextmanager
async def serving(server: Server):
    """(a putter, the server's host:port) while `server` serves."""
    async with trio.open_nursery() as nursery:
        netloc = await server.start(nursery)
        putter = AsyncPutter(timeout=10, keep=2)
        try:
            yield putter, netloc
        finally:
            putter.close()
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_puts_land_whole_on_one_kept_connection():
    server = Server([OK] * 3)
    bodies = [b"", b"a" * 70_000, bytes(range(256)) * 10]
    async with serving(server) as (putter, netloc):
        for body in bodies:
            assert (await put(putter, netloc, body))["etag"] == '"abc"'
    assert server.bodies == bodies and server.connections == 1


@pytest.mark.trio
async def test_a_kept_connection_the_server_let_go_is_replaced_once():
    """The server closes each connection after its answer: the next PUT finds its kept
    connection closed, sends on a new one, and the server gets each body once."""
    server = Server([OK] * 3, close_after=True)
    async with serving(server) as (putter, netloc):
        for n in range(3):
            await trio.testing.wait_all_tasks_blocked()  # the server's close has happened
            await put(putter, netloc, b"%d" % n)
    assert server.bodies == [b"0", b"1", b"2"] and server.connections == 3


def test_close_after_the_run_ended_closes_the_kept_connections():
    """The daemon may close its stores after trio.run returned: the connections kept
    are closed all the same (a trio socket refuses `close` outside a run)."""
    putter = AsyncPutter(timeout=10, keep=2)

    async def main():
        async with trio.open_nursery() as nursery:
            netloc = await Server([OK]).start(nursery)
            await put(putter, netloc, b"x")
            nursery.cancel_scope.cancel()

    trio.run(main)
    kept = [conn.stream.socket for conns in putter._idle.values() for conn in conns]
    assert len(kept) == 1
    putter.close()
    assert kept[0].fileno() == -1 and not putter._idle


@pytest.mark.trio
async def test_no_server_is_a_connection_error():
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))  # a port nobody listens on
        netloc = "127.0.0.1:%d" % sock.getsockname()[1]
        with pytest.raises(ConnectionError):
            await put(AsyncPutter(timeout=10, keep=2), netloc, b"x")


@pytest.mark.trio
async def test_a_new_connection_closed_without_an_answer_is_an_error():
    async with serving(Server([None])) as (putter, netloc):
        with pytest.raises(ConnectionResetError):
            await put(putter, netloc, b"x")


@pytest.mark.trio
@pytest.mark.parametrize("answer, error, code", [
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nNoBucket!", FileNotFoundError, errno.ENOENT),
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nDenied", PermissionError, errno.EACCES),
    (b"HTTP/1.1 503 Slow Down\r\nContent-Length: 8\r\n\r\nSlowDown", OSError, errno.EIO),
    (b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nOops\r\n0\r\n\r\n", OSError, errno.EIO),
])
async def test_error_answers_are_named_as_the_thread_path_names_them(answer, error, code):
    server = Server([answer, OK])
    async with serving(server) as (putter, netloc):
        with pytest.raises(error) as raised:
            await put(putter, netloc, b"x")
        assert raised.value.errno == code
        await put(putter, netloc, b"y")  # the connection was kept only if the answer was read whole
    assert server.bodies == [b"x", b"y"]


@pytest.mark.trio
@pytest.mark.parametrize("answer, for_good", [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nBad", False),
    (b"HTTP/1.1 301 Moved\r\nLocation: elsewhere\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\n\r\n", True),
    (b"SSH-2.0-OpenSSH\r\n\r\n", False),
])
async def test_answers_only_the_thread_path_reads_are_handed_to_it(answer, for_good):
    async with serving(Server([answer])) as (putter, netloc):
        with pytest.raises(NotHandled) as raised:
            await put(putter, netloc, b"x")
        assert raised.value.for_good == for_good


@pytest.mark.trio
async def test_no_answer_times_out_and_a_cancel_waits_for_it(autojump_clock):
    """A PUT is not cancellable (one half sent could land after a later one): a cancel
    takes effect once its own timeout ends it."""
    never = trio.Event()

    async def silent(stream):
        await stream.receive_some(65536)
        await never.wait()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        netloc = "127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
        putter = AsyncPutter(timeout=30, keep=2)
        start = trio.current_time()
        with pytest.raises(TimeoutError):
            await put(putter, netloc, b"x")
        assert trio.current_time() - start == pytest.approx(30, abs=1)
        start = trio.current_time()
        with trio.move_on_after(5):
            with pytest.raises(TimeoutError):
                await put(putter, netloc, b"x")
        assert trio.current_time() - start == pytest.approx(30, abs=1)
        nursery.cancel_scope.cancel()
