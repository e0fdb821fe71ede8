"""The peer server's limits, in-process over memory streams with trio's fake
clock: handshake and idle timeouts, connection caps, a peer that stops
reading, and a bug inside one connection that must not reach the others."""

from __future__ import annotations

import logging
import os

import pytest
import trio
import trio.testing

from cachefs import metrics
from cachefs.logsafe import LogLimiter, loggable
from cachefs.peer import protocol
from cachefs.peer.protocol import Auth, ChunkData, GetChunk, Hello, Ready
from cachefs.peer.server import PeerServer, ServerLimits
from cachefs.peer.stream import FrameStream

# The hot path's users: run again with CACHEFS_PUREPYTHON=1 (scripts/test.sh).
pytestmark = pytest.mark.fallback

SECRET = b"test secret"
CHUNK = 64 << 10
SOURCE = "mem://src"


class MemoryReader:
    """What the server needs of a Reader: chunk_size and chunk(); each chunk is filled with its index."""

    chunk_size = CHUNK

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay = delay
        self.fail = fail

    async def chunk(self, obj, index):
        await trio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("a bug in a tier")
        return bytes([index]) * CHUNK, "mem"


def _server(limits: ServerLimits = ServerLimits(), reader: MemoryReader | None = None) -> PeerServer:
    return PeerServer("worker-1", SECRET, {SOURCE: reader or MemoryReader()}, max_payload=CHUNK, limits=limits)


def _request(index: int = 0, request_id: int = 1) -> dict:
    return GetChunk(request_id, SOURCE, "f.bin", "v1", 4 * CHUNK, CHUNK, index).to_header()


async def _connect(server: PeerServer, nursery: trio.Nursery, pair=trio.testing.memory_stream_pair):
    client, server_end = pair()
    nursery.start_soon(server.handle, server_end)
    return FrameStream(client, max_payload=CHUNK)


async def _authenticate(frames: FrameStream, secret: bytes = SECRET) -> dict | None:
    """The client's half of the handshake; the server's last frame (Ready), or None if it closed."""
    nonce = os.urandom(16)
    await frames.send(Hello(protocol.PROTOCOL_VERSION, "client", nonce).to_header())
    hello = protocol.parse_message((await frames.receive())[0])
    await frames.send(Auth(protocol.hello_mac(secret, "client", nonce, hello.nonce)).to_header())
    frame = await frames.receive()
    return frame[0] if frame else None


async def _closed_at(frames: FrameStream) -> float:
    """Read until the server closes; the fake time it did."""
    try:
        while await frames.receive() is not None:
            pass
    except (protocol.ProtocolError, trio.BrokenResourceError):
        pass
    return trio.current_time()


@pytest.mark.trio
async def test_a_silent_client_is_closed_at_the_handshake_timeout(autojump_clock):
    limits = ServerLimits(handshake_timeout=5.0)
    async with trio.open_nursery() as nursery:
        frames = await _connect(_server(limits), nursery)
        assert await _closed_at(frames) == pytest.approx(5.0)


@pytest.mark.trio
async def test_an_idle_authenticated_connection_is_closed_only_when_idle(autojump_clock):
    limits = ServerLimits(idle_timeout=300.0)
    async with trio.open_nursery() as nursery:
        frames = await _connect(_server(limits, MemoryReader(delay=1000.0)), nursery)
        assert (await _authenticate(frames))["t"] == Ready.t
        start = trio.current_time()
        # A request that takes longer than the idle timeout: the peer waits, it is not idle.
        await frames.send(_request(index=2))
        header, payload = await frames.receive()
        assert header["t"] == ChunkData.t and payload == bytes([2]) * CHUNK
        assert trio.current_time() - start == pytest.approx(1000.0)
        answered = trio.current_time()
        assert await _closed_at(frames) - answered == pytest.approx(300.0, abs=1.0)


@pytest.mark.trio
async def test_connections_still_in_their_handshake_are_capped(autojump_clock):
    server = _server(ServerLimits(max_unauthenticated=2))
    async with trio.open_nursery() as nursery:
        silent = [await _connect(server, nursery) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        third = await _connect(server, nursery)
        assert await _closed_at(third) == 0.0  # refused at once, not at the handshake timeout
        for frames in silent:
            await _closed_at(frames)
        # Their slots are free again.
        late = await _connect(server, nursery)
        assert (await _authenticate(late))["t"] == Ready.t
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_authenticated_connections_per_host_are_capped(autojump_clock):
    server = _server(ServerLimits(max_connections_per_host=2))
    async with trio.open_nursery() as nursery:
        admitted = [await _connect(server, nursery) for _ in range(2)]
        for frames in admitted:
            assert (await _authenticate(frames))["t"] == Ready.t
        refused = await _connect(server, nursery)
        assert await _authenticate(refused) is None  # no Ready: closed right after the handshake
        await admitted[0].stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        again = await _connect(server, nursery)
        assert (await _authenticate(again))["t"] == Ready.t
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_peer_that_stops_reading_loses_its_connection_at_the_send_timeout(autojump_clock):
    limits = ServerLimits(send_timeout=60.0)
    async with trio.open_nursery() as nursery:
        frames = await _connect(_server(limits), nursery, pair=trio.testing.lockstep_stream_pair)
        assert (await _authenticate(frames))["t"] == Ready.t
        await frames.send(_request())
        await trio.sleep(100)  # not reading: the 64 KiB answer cannot go out
        with pytest.raises((protocol.ProtocolError, trio.BrokenResourceError)):
            # What was sent before the cut, then the end: never a whole frame.
            while True:
                frame = await frames.receive()
                assert frame is None or frame[0]["t"] != ChunkData.t
                if frame is None:
                    raise trio.BrokenResourceError
        assert metrics.PEER_CONNECTIONS_CLOSED.labels("send-timeout")._value.get() >= 1


@pytest.mark.trio
async def test_a_bug_inside_one_connection_closes_only_that_connection(autojump_clock, caplog):
    reader = MemoryReader(fail=True)
    server = _server(reader=reader)
    async with trio.open_nursery() as nursery:
        first = await _connect(server, nursery)
        await _authenticate(first)
        with caplog.at_level(logging.ERROR, logger="cachefs.peer.server"):
            await first.send(_request())
            await _closed_at(first)
        assert "connection failed" in caplog.text and "a bug in a tier" in caplog.text
        reader.fail = False
        second = await _connect(server, nursery)
        await _authenticate(second)
        await second.send(_request(index=1))
        header, payload = await second.receive()
        assert header["t"] == ChunkData.t and payload == bytes([1]) * CHUNK
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_the_server_survives_any_bytes_before_or_after_authentication(autojump_clock):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    server = _server()
    blobs = []

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.booleans(), st.binary(min_size=1, max_size=400))
    def collect(authenticate, blob):
        blobs.append((authenticate, blob))

    collect()
    async with trio.open_nursery() as nursery:
        for authenticate, blob in blobs:
            frames = await _connect(server, nursery)
            if authenticate:
                await _authenticate(frames)
            await frames.stream.send_all(blob)
            await frames.stream.send_eof()
            await _closed_at(frames)
        frames = await _connect(server, nursery)
        await _authenticate(frames)
        await frames.send(_request(index=3))
        header, payload = await frames.receive()
        assert header["t"] == ChunkData.t and payload == bytes([3]) * CHUNK
        nursery.cancel_scope.cancel()


def test_log_limiter_logs_once_per_interval_and_counts_the_rest(caplog):
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("t"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        assert limiter.warning("auth", "failed %s", 1)
        for i in range(5):
            now[0] += 1
            assert not limiter.warning("auth", "failed %s", i)
        assert limiter.warning("other", "another kind")
        now[0] = 10.0
        assert limiter.warning("auth", "failed %s", "again")
    assert [r.getMessage() for r in caplog.records] == [
        "failed 1", "another kind", "failed again (and 5 more like it in the last 10s)",
    ]


def test_loggable_quotes_newlines_and_cuts_long_strings():
    assert loggable("a\nb") == "'a\\nb'"
    assert "\n" not in loggable("x" * 1000 + "\n")
    assert loggable("x" * 1000).endswith("...") and len(loggable("x" * 1000)) < 200
