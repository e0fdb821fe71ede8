"""The peer server's limits, in-process over memory streams with trio's fake
clock: handshake and idle timeouts, connection caps, a peer that stops
reading, and a bug inside one connection that must not reach the others."""

from __future__ import annotations

import logging
import os
import time

import pytest
import trio
import trio.testing
from conftest import serve_on_loopback

from cachefs import metrics
from cachefs.errors import PeerError
from cachefs.objects import ObjectId
from cachefs.peer.client import PeerClient
from cachefs.logsafe import LogLimiter, loggable
from cachefs.peer import protocol
from cachefs.peer.protocol import Auth, ChunkData, ChunkError, GetChunk, Hello, Ready
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


async def _no_chunk_before_the_cut(frames) -> None:
    """What was sent before the server cut the connection, then its end: never a whole chunk."""
    with pytest.raises((protocol.ProtocolError, trio.BrokenResourceError)):
        while True:
            frame = await frames.receive()
            assert frame is None or frame[0]["t"] != ChunkData.t
            if frame is None:
                raise trio.BrokenResourceError


@pytest.mark.trio
async def test_a_peer_that_stops_reading_loses_its_connection_at_the_send_timeout(autojump_clock):
    limits = ServerLimits(send_timeout=60.0)
    async with trio.open_nursery() as nursery:
        frames = await _connect(_server(limits), nursery, pair=trio.testing.lockstep_stream_pair)
        assert (await _authenticate(frames))["t"] == Ready.t
        await frames.send(_request())
        await trio.sleep(100)  # not reading: the 64 KiB answer cannot go out
        await _no_chunk_before_the_cut(frames)
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


# -- protocol v4: byte ranges of a chunk ---------------------------------------------


class PatternReader:
    """Chunks whose bytes all differ (byte i of the object is i * 7 mod 251), the last one short."""

    chunk_size = CHUNK

    def __init__(self, size: int):
        self.data = bytes(i * 7 % 251 for i in range(size))
        self.fetches = 0

    async def chunk(self, obj, index):
        self.fetches += 1
        return self.data[index * CHUNK : (index + 1) * CHUNK], "mem"


async def _range_rig(reader: PatternReader, nursery: trio.Nursery) -> tuple[str, PeerClient, ObjectId]:
    """A worker serving `reader` on loopback, a mount's client of it, and the object read."""
    server = PeerServer("worker-1", SECRET, {SOURCE: reader}, max_payload=CHUNK)
    peer = await serve_on_loopback(server, nursery)
    client = PeerClient("mount", SECRET, nursery, max_payload=CHUNK)
    return peer, client, ObjectId(SOURCE, "f.bin", "v1", len(reader.data))


@pytest.mark.trio
async def test_a_range_is_those_bytes_of_the_chunk_at_every_edge():
    size = 2 * CHUNK + 1000  # the last chunk is 1000 bytes
    reader = PatternReader(size)
    async with trio.open_nursery() as nursery:
        peer, client, obj = await _range_rig(reader, nursery)
        for index, start, end in [(0, 0, 1), (0, CHUNK - 1, CHUNK), (0, 0, CHUNK), (1, 4096, 8192),
                                  (1, 1, CHUNK - 1), (2, 0, 1000), (2, 999, 1000), (2, 500, 501)]:
            got = await client.get_chunk(peer, obj, CHUNK, index, start, end)
            base = index * CHUNK
            assert bytes(got) == reader.data[base + start : base + end], (index, start, end)
        assert client._conns[peer].version >= protocol.RANGE_VERSION
        # Past the end of the chunk (the short last one, or a whole one): refused, the connection kept.
        for index, start, end in [(2, 0, 1001), (0, 0, CHUNK + 1)]:
            with pytest.raises(PeerError) as e:
                await client.get_chunk(peer, obj, CHUNK, index, start, end)
            assert e.value.code == "bad-request"
        assert bytes(await client.get_chunk(peer, obj, CHUNK, 2)) == reader.data[2 * CHUNK :]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_range_from_a_v3_server_falls_back_to_the_whole_chunk(monkeypatch):
    """A server of the previous release closes on a v4 Hello; the client speaks v3, sends no
    range (a v3 server would ignore it and send the whole chunk), and the peer tier says
    "no range" without marking the peer failed, so the reader loads the whole chunk."""
    from cachefs.objects import chunk_key
    from cachefs.peer.client import PeerTier
    from cachefs.peer.ring import Ring

    size = 2 * CHUNK
    reader = PatternReader(size)
    async with trio.open_nursery() as nursery:
        # The server of the previous release: up to v3 (the client connects at its first request).
        monkeypatch.setattr(protocol, "SUPPORTED_VERSIONS", frozenset({1, 2, 3}))
        peer, client, obj = await _range_rig(reader, nursery)
        with pytest.raises(PeerError) as e:
            await client.get_chunk(peer, obj, CHUNK, 1, 10, 20)
        assert e.value.code == "version" and client._conns[peer].version == 3
        tier = PeerTier(client, lambda: Ring({peer: 1}), timeout=5.0)
        key = chunk_key(obj, CHUNK, 1)
        assert await tier.get_range(key, 10, 20) is None
        assert client.available(peer)  # not a failure
        assert bytes(await tier.get(key)) == reader.data[CHUNK:]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_range_on_a_v3_connection_or_in_a_load_closes_the_connection():
    """Ranges are v4 reads only: an old client never sends one, so one is a broken peer."""
    for version, header in [
        (3, GetChunk(1, SOURCE, "f.bin", "v1", 4 * CHUNK, CHUNK, 0, 0, 10).to_header()),
        (4, {**protocol.LoadChunk(1, SOURCE, "f.bin", "v1", 4 * CHUNK, CHUNK, 0).to_header(), "start": 0, "end": 10}),
    ]:
        async with trio.open_nursery() as nursery:
            frames = await _connect(_server(), nursery)
            nonce = os.urandom(16)
            await frames.send(Hello(version, "client", nonce).to_header())
            hello = protocol.parse_message((await frames.receive())[0])
            assert hello.version == version
            await frames.send(Auth(protocol.hello_mac(SECRET, "client", nonce, hello.nonce)).to_header())
            assert (await frames.receive())[0]["t"] == Ready.t
            await frames.send(header)
            assert await _closed_at(frames) is not None
            nursery.cancel_scope.cancel()


def test_a_range_must_be_both_fields_and_not_empty():
    fields = GetChunk(1, SOURCE, "f.bin", "v1", 4 * CHUNK, CHUNK, 0).to_header()
    assert protocol.parse_message({**fields, "start": 5, "end": 6}) == GetChunk(
        1, SOURCE, "f.bin", "v1", 4 * CHUNK, CHUNK, 0, 5, 6)
    assert "start" not in fields  # a whole chunk is asked as in v1..v3
    for bad in ({"start": 5}, {"end": 6}, {"start": 6, "end": 6}, {"start": 7, "end": 6}, {"start": -1, "end": 6},
                {"start": "0", "end": 6}):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_message({**fields, **bad})


class SlowChunkReader(PatternReader):
    """Whole chunks of index 0 wait for `release`; everything else answers at once."""

    def __init__(self, size: int):
        super().__init__(size)
        self.release = trio.Event()

    async def chunk(self, obj, index):
        if index == 0:
            await self.release.wait()
        return await super().chunk(obj, index)


@pytest.mark.trio
async def test_ranges_and_whole_chunks_take_separate_connections():
    """Whole chunks go over their own connection (the bulk lane): a 4 KiB range must
    not wait behind 4 MiB answers on the wire. A failed peer loses both."""
    size = 2 * CHUNK
    reader = PatternReader(size)
    async with trio.open_nursery() as nursery:
        peer, client, obj = await _range_rig(reader, nursery)
        assert bytes(await client.get_chunk(peer, obj, CHUNK, 1, 5, 9)) == reader.data[CHUNK + 5 : CHUNK + 9]
        assert peer not in client._bulk
        assert bytes(await client.get_chunk(peer, obj, CHUNK, 1)) == reader.data[CHUNK:]
        small, bulk = client._conns[peer], client._bulk[peer]
        assert small is not bulk and not small.closed and not bulk.closed
        assert bytes(await client.get_chunk(peer, obj, CHUNK, 0, 0, 3)) == reader.data[:3]
        assert client._conns[peer] is small and client._bulk[peer] is bulk
        client.mark_failed(peer, "test")
        assert small.closed and bulk.closed and peer not in client._conns and peer not in client._bulk
        nursery.cancel_scope.cancel()


def test_requests_in_flight_when_a_peer_fails_count_as_one_failure():
    """Eight requests out when a peer dies all fail: its back-off is that of one
    failure (0.5 s), not of eight (30 s); a failure after the back-off doubles it."""
    import cachefs.peer.client as client_module

    now = [100.0]
    client = client_module.PeerClient("me", b"s" * 32, None, 1 << 20, clock=lambda: now[0])
    for _ in range(8):
        client.mark_failed("p:1", "timed out")
    assert not client.available("p:1")
    now[0] += 0.5
    assert client.available("p:1")
    client.mark_failed("p:1", "timed out again")  # a new request, after the back-off
    now[0] += 0.5
    assert not client.available("p:1")
    now[0] += 0.5
    assert client.available("p:1")
    client.mark_ok("p:1")
    client.mark_failed("p:1", "once more")
    now[0] += 0.5
    assert client.available("p:1")  # back at one failure's back-off after a success


@pytest.mark.trio
async def test_a_range_is_answered_while_a_whole_chunk_is_outstanding():
    size = 2 * CHUNK
    reader = SlowChunkReader(size)
    async with trio.open_nursery() as nursery:
        peer, client, obj = await _range_rig(reader, nursery)
        whole: list[bytes] = []

        async def fetch_whole() -> None:
            whole.append(bytes(await client.get_chunk(peer, obj, CHUNK, 0)))

        nursery.start_soon(fetch_whole)
        with trio.fail_after(5):
            assert bytes(await client.get_chunk(peer, obj, CHUNK, 1, 0, 4)) == reader.data[CHUNK : CHUNK + 4]
        assert not whole
        reader.release.set()
        with trio.fail_after(5):
            while not whole:
                await trio.sleep(0.01)
        assert whole == [reader.data[:CHUNK]]
        nursery.cancel_scope.cancel()


BIG = 1 << 20


class BigPatternReader(PatternReader):
    """PatternReader with chunks bigger than one receive (RECEIVE_SIZE): received
    straight into their own buffer, as a real chunk is."""

    chunk_size = BIG

    async def chunk(self, obj, index):
        self.fetches += 1
        return self.data[index * BIG : (index + 1) * BIG], "mem"


def test_a_checked_object_version_is_remembered_and_a_bad_path_still_refused():
    """A range per 4 KiB read must not re-check the path and re-hash the key: the second
    request for an object version gets the same ObjectId (the reader's key cache hits);
    any other path is checked as before."""

    server = PeerServer("worker-1", SECRET, {SOURCE: PatternReader(2 * CHUNK)}, max_payload=CHUNK)

    def get(path: str, index: int = 0) -> GetChunk:
        return GetChunk(id=1, source=SOURCE, path=path, version="v1", size=2 * CHUNK, chunk_size=CHUNK, index=index)

    _, first = server._resolve(get("d/f.bin"))
    _, again = server._resolve(get("d/f.bin", 1))
    assert again is first
    for bad in ("../f.bin", "/etc/passwd", "d/../../x", ""):
        refused = server._resolve(get(bad))
        assert isinstance(refused, ChunkError) and refused.code == "bad-request", bad
    refused = server._resolve(get("d/f.bin", 2))  # past the end: the chunk fields are still checked
    assert isinstance(refused, ChunkError) and refused.code == "bad-request"


@pytest.mark.trio
async def test_a_whole_chunk_is_hashed_once_and_a_changed_one_is_caught_by_the_client(monkeypatch):
    """The worker remembers each whole chunk's checksum (a chunk's bytes never change:
    its key names the object version). Were they to change anyway, the client's check
    fails: a miss, never other bytes served as the chunk. Ranges are hashed each time."""
    from cachefs import hotpath
    from cachefs.peer import server as server_module

    hashed: list[int] = []

    def counting_checksum(data) -> int:
        hashed.append(len(data))
        return hotpath.checksum(data)

    reader = PatternReader(2 * CHUNK)
    async with trio.open_nursery() as nursery:
        peer, client, obj = await _range_rig(reader, nursery)
        monkeypatch.setattr(server_module, "hotpath", type("H", (), {"checksum": staticmethod(counting_checksum)}))
        for _ in range(3):
            assert bytes(await client.get_chunk(peer, obj, CHUNK, 1)) == reader.data[CHUNK:]
        assert hashed == [CHUNK]  # once, not per send
        for _ in range(2):
            assert bytes(await client.get_chunk(peer, obj, CHUNK, 1, 10, 20)) == reader.data[CHUNK + 10 : CHUNK + 20]
        assert hashed == [CHUNK, 10, 10]
        reader.data = bytes(len(reader.data))  # (cannot happen: the same version with other bytes)
        with pytest.raises(PeerError) as e:
            await client.get_chunk(peer, obj, CHUNK, 1)
        assert e.value.code == "corrupt"
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_big_chunks_are_sent_by_threads_whole_and_in_order_beside_ranges(monkeypatch):
    """Chunks of THREAD_SEND_MIN or more leave a worker through a thread (one hand-off
    per chunk, not a trip through trio's loop per wait for room); several at once on
    one connection, with ranges on the other, each arrives whole and intact."""
    from cachefs.peer import stream as stream_module

    assert BIG >= stream_module.THREAD_SEND_MIN
    pushed: list[int] = []
    push = stream_module._push
    monkeypatch.setattr(stream_module, "_push", lambda fd, view: (pushed.append(len(view)), push(fd, view))[1])
    size = 3 * BIG + 1000
    reader = BigPatternReader(size)
    async with trio.open_nursery() as nursery:
        server = PeerServer("worker-1", SECRET, {SOURCE: reader}, max_payload=BIG)
        peer = await serve_on_loopback(server, nursery)
        client = PeerClient("mount", SECRET, nursery, max_payload=BIG)
        obj = ObjectId(SOURCE, "f.bin", "v1", size)
        got: dict = {}

        async def fetch(index: int, start: int | None = None, end: int | None = None) -> None:
            got[index, start] = bytes(await client.get_chunk(peer, obj, BIG, index, start, end))

        with trio.fail_after(20):
            async with trio.open_nursery() as fetches:
                for _ in range(2):
                    for index in range(4):
                        fetches.start_soon(fetch, index)
                        fetches.start_soon(fetch, index, 100, 900)
        for index in range(4):
            base = index * BIG
            assert got[index, None] == reader.data[base : base + BIG]
            assert got[index, 100] == reader.data[base + 100 : base + 900]
        assert sorted(pushed) == [BIG] * 6  # the three whole chunks, twice; the last (1000 bytes) and ranges not
        nursery.cancel_scope.cancel()


class ZeroReader:
    """Chunks of zeros, as big as asked."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    async def chunk(self, obj, index):
        return bytes(self.chunk_size), "mem"


@pytest.mark.trio
async def test_a_peer_that_stops_reading_a_big_chunk_loses_its_connection_at_the_send_timeout(autojump_clock):
    """The thread sending a chunk stops when the send times out: the connection is
    closed and what was sent is never a whole frame."""
    chunk = 32 << 20  # more than loopback's socket buffers hold
    server = PeerServer("worker-1", SECRET, {SOURCE: ZeroReader(chunk)}, max_payload=chunk,
                        limits=ServerLimits(send_timeout=60.0))
    closed = metrics.PEER_CONNECTIONS_CLOSED.labels("send-timeout")._value.get()
    async with trio.open_nursery() as nursery:
        peer = await serve_on_loopback(server, nursery)
        host, _, port = peer.rpartition(":")
        frames = FrameStream(await trio.open_tcp_stream(host, int(port)), max_payload=chunk)
        assert (await _authenticate(frames))["t"] == Ready.t
        await frames.send(GetChunk(1, SOURCE, "f.bin", "v1", 2 * chunk, chunk, 0).to_header())
        await trio.sleep(100)  # not reading
        # The sending thread notices within _POLL_SECONDS of real time (the fake clock jumps meanwhile).
        for _ in range(500):
            if metrics.PEER_CONNECTIONS_CLOSED.labels("send-timeout")._value.get() > closed:
                break
            await trio.to_thread.run_sync(time.sleep, 0.01)
        assert metrics.PEER_CONNECTIONS_CLOSED.labels("send-timeout")._value.get() == closed + 1
        assert trio.current_time() >= 60
        await _no_chunk_before_the_cut(frames)
        await frames.stream.aclose()
        nursery.cancel_scope.cancel()


# -- capacity (protocol v6) ---------------------------------------------------------


@pytest.mark.trio
async def test_a_server_tells_its_warmup_capacity_and_older_or_silent_ones_say_why_not(monkeypatch):
    """What a mount asks each owner before a warm-up: its capacity; a server that
    does not say refuses on a connection that goes on; a v5 server is never asked."""
    async with trio.open_nursery() as nursery:
        telling = await serve_on_loopback(PeerServer("w1", SECRET, {}, max_payload=1 << 16, capacity=lambda: 5 << 30), nursery)
        silent = await serve_on_loopback(PeerServer("w2", SECRET, {}, max_payload=1 << 16), nursery)
        client = PeerClient("mount-1", SECRET, nursery, max_payload=1 << 16)
        assert await client.capacity(telling) == 5 << 30
        with pytest.raises(PeerError) as e:
            await client.capacity(silent)
        assert e.value.code == "refused"
        assert await client.capacity(telling) == 5 << 30 and not client._conns[silent].closed
        monkeypatch.setattr(protocol, "SUPPORTED_VERSIONS", frozenset({1, 2, 3, 4, 5}))
        older = await serve_on_loopback(PeerServer("w3", SECRET, {}, max_payload=1 << 16, capacity=lambda: 1), nursery)
        with pytest.raises(PeerError) as e:
            await client.capacity(older)
        assert e.value.code == "version" and client._conns[older].version == 5
        nursery.cancel_scope.cancel()
