"""Ask peers for chunks: the client side of the peer protocol, and the peer tier.

`PeerClient` keeps up to two authenticated connections per peer and multiplexes
requests over them by id: whole chunks go over one (the bulk lane), everything
else (ranges, loads, questions) over the other, so a 4 KiB range never waits
behind 4 MiB answers on the wire. Each peer has a circuit breaker: after a failure it is
skipped for a back-off that doubles up to PEER_MAX_BACKOFF, then tried again.
`PeerTier` is what the reader sees: ask the chunk's owner on the ring, then the
next node, and give up (the reader goes to the backend) on any failure. A peer
that answers "busy" (a worker draining on SIGTERM) is skipped for a few seconds
and the next node is asked at once, without counting as an attempt.
Warm-up asks an owner to load a chunk into its own tiers (`load_chunk`, protocol
v2; a v1 peer is reported as unable to, and the caller loads the chunk itself).
A pin asks each owner to keep its chunks (`pin_chunks`, `unpin_leases`: protocol v5).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Callable, ClassVar

import trio

from cachefs import hotpath, metrics
from cachefs.objects import Buffer, ChunkKey, Medium, ObjectId
from cachefs.errors import PeerError
from cachefs.logsafe import loggable
from cachefs.peer import protocol
from cachefs.peer.protocol import (
    AskSpace,
    Auth,
    ChunkData,
    ChunkError,
    GetChunk,
    HasChunk,
    Held,
    Hello,
    LoadChunk,
    Loaded,
    PinChunks,
    Pinned,
    ProtocolError,
    Ready,
    Space,
    UnpinLeases,
    Unpinned,
)
from cachefs.peer.ring import Ring
from cachefs.peer.stream import FrameStream

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
PEER_MAX_BACKOFF = 30.0
# The owner plus this many fallbacks are asked before the backend.
PEER_ATTEMPTS = 2
# A peer that answered "busy" (it is draining: leaving the ring) is skipped this
# long, without counting as a failure: the membership drops it meanwhile.
BUSY_BACKOFF = 5.0


class _Pending:
    __slots__ = ("done", "reply", "payload")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: ChunkData | Loaded | Held | Pinned | Unpinned | ChunkError | None = None  # None: the connection was lost
        self.payload = b""


class PeerConnection:
    """One authenticated connection; `receive_loop` runs in the client's nursery."""

    def __init__(self, peer: str, frames: FrameStream, version: int = protocol.PROTOCOL_VERSION):
        self.peer = peer
        self.frames = frames
        self.version = version  # what the server's Hello said: the connection's protocol version
        self.closed = False
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._receiving = trio.CancelScope()

    def close(self) -> None:
        """Stop receiving; `receive_loop` fails what is pending and closes the stream."""
        self.closed = True
        self._receiving.cancel()

    async def receive_loop(self) -> None:
        """Runs in the client's nursery: nothing a peer sends may end it with an error."""
        try:
            with self._receiving:
                await self._receive_frames()
        except Exception:  # noqa: BLE001 - the per-connection boundary: a bug here must not end the mount
            metrics.PEER_PROTOCOL_ERRORS.labels("client").inc()
            log.exception("peer %s: receiving failed; dropping the connection", self.peer)
        finally:
            self.closed = True
            for pending in self._pending.values():
                pending.done.set()  # reply stays None: connection lost
            self._pending.clear()
            with trio.CancelScope(shield=True):
                await self.frames.stream.aclose()

    async def _receive_frames(self) -> None:
        try:
            while (frame := await self.frames.receive()) is not None:
                header, payload = frame
                message = protocol.parse_message(header)
                if not isinstance(message, (ChunkData, Loaded, Held, Pinned, Unpinned, Space, ChunkError)):
                    raise ProtocolError(f"unexpected {header.get('t')!r} from a server")
                pending = self._pending.pop(message.id, None)
                if pending is not None:  # else: the requester timed out and left
                    pending.reply, pending.payload = message, payload
                    pending.done.set()
        except ProtocolError as e:
            metrics.PEER_PROTOCOL_ERRORS.labels("client").inc()
            log.warning("peer %s: %s; dropping the connection", self.peer, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def request(
        self, req_fields: dict, kind: type[GetChunk | PinChunks | UnpinLeases | AskSpace] = GetChunk
    ) -> tuple[ChunkData | Loaded | Held | Pinned | Unpinned | Space | ChunkError, bytes]:
        """Send one GetChunk (or LoadChunk, HasChunk, PinChunks, UnpinLeases, AskSpace) and wait
        for its answer. Checkpoints; cancel to time out.

        Raises:
            PeerError: the connection is or becomes unusable.
        """
        if self.closed:
            raise PeerError(f"peer {self.peer}: connection closed")
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending()
        try:
            await self.frames.send(kind(id=request_id, **req_fields).to_header())
            await pending.done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.close()
            raise PeerError(f"peer {self.peer}: {e}") from None
        finally:
            self._pending.pop(request_id, None)
        if pending.reply is None:
            raise PeerError(f"peer {self.peer}: connection lost")
        return pending.reply, pending.payload


class _HelloRefused(Exception):
    """The server closed the connection on our Hello: maybe a server of an older version."""


class PeerClient:
    """Connections to peers, made on first use and remade after failures."""

    def __init__(
        self,
        node: str,
        secret: bytes,
        nursery: trio.Nursery,
        max_payload: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.node = node
        self.secret = secret
        self.max_payload = max_payload
        self._nursery = nursery
        self._clock = clock
        self._conns: dict[str, PeerConnection] = {}  # ranges, loads, questions
        self._bulk: dict[str, PeerConnection] = {}  # whole chunks
        self._connecting: dict[tuple[str, bool], trio.Event] = {}
        self._failures: dict[str, int] = {}
        self._down_until: dict[str, float] = {}
        self._up: set[str] = set()  # peers whose last request succeeded (their PEER_UP is 1)

    def available(self, peer: str) -> bool:
        return self._clock() >= self._down_until.get(peer, 0.0)

    def mark_failed(self, peer: str, why: object) -> None:
        if not self.available(peer):
            # A request sent before it was marked down: the same failure, not a new
            # one. Counted, the requests in flight when a peer dies (read-ahead, a
            # walk's loads) would take its back-off to the maximum at once, and a
            # peer back a second later would be skipped for PEER_MAX_BACKOFF.
            return
        failures = self._failures[peer] = self._failures.get(peer, 0) + 1
        backoff = min(0.5 * 2 ** (failures - 1), PEER_MAX_BACKOFF)
        self._down_until[peer] = self._clock() + backoff
        self._up.discard(peer)
        metrics.PEER_UP.labels(peer).set(0)
        log.warning("peer %s failed (%s); skipping it for %.1fs", peer, why, backoff)
        for conns in (self._conns, self._bulk):
            conn = conns.pop(peer, None)
            if conn is not None:
                conn.close()

    def mark_busy(self, peer: str) -> None:
        """`peer` said "busy" (draining): skip it for BUSY_BACKOFF, without growing its back-off."""
        self._down_until[peer] = max(self._down_until.get(peer, 0.0), self._clock() + BUSY_BACKOFF)
        self._up.discard(peer)
        metrics.PEER_UP.labels(peer).set(0)
        log.info("peer %s is draining; skipping it for %gs", peer, BUSY_BACKOFF)

    def mark_ok(self, peer: str) -> None:
        if peer in self._up:
            return  # nothing to change: labels() would cost as much as a 4 KiB range
        self._up.add(peer)
        if self._failures.pop(peer, None) is not None:
            log.info("peer %s is back", peer)
        self._down_until.pop(peer, None)
        metrics.PEER_UP.labels(peer).set(1)

    async def _connection(self, peer: str, bulk: bool = False) -> PeerConnection:
        """The connection to `peer` for whole chunks (`bulk`) or for the rest, made if needed."""
        conns = self._bulk if bulk else self._conns
        while True:
            conn = conns.get(peer)
            if conn is not None and not conn.closed:
                return conn
            connecting = self._connecting.get((peer, bulk))
            if connecting is None:
                break
            await connecting.wait()  # one connect per peer and lane at a time
            if peer not in conns:
                raise PeerError(f"peer {peer}: cannot connect")
        self._connecting[peer, bulk] = trio.Event()
        try:
            version = protocol.PROTOCOL_VERSION
            while True:
                try:
                    conn = await self._connect(peer, version)
                    break
                except _HelloRefused:
                    # A server one version older (a rolling upgrade) closes on our hello: speak its version.
                    version -= 1
            conns[peer] = conn
            self._nursery.start_soon(conn.receive_loop)
            return conn
        finally:
            self._connecting.pop((peer, bulk)).set()

    async def _connect(self, peer: str, version: int) -> PeerConnection:
        host, _, port = peer.rpartition(":")
        stream = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
                frames = FrameStream(stream, self.max_payload)
                nonce = os.urandom(16)
                await frames.send(Hello(version, self.node, nonce).to_header())
                try:
                    frame = await frames.receive()
                except (OSError, trio.BrokenResourceError):
                    frame = None
                if frame is None and version > 1:
                    raise _HelloRefused
                hello = protocol.parse_message(frame[0]) if frame else None
                if not isinstance(hello, Hello) or hello.mac is None:
                    raise PeerError(f"peer {peer}: no hello from the server")
                expected = protocol.hello_mac(self.secret, "server", hello.nonce, nonce)
                if not protocol.verify_mac(expected, hello.mac):
                    raise PeerError(f"peer {peer}: the server does not know our secret")
                await frames.send(Auth(protocol.hello_mac(self.secret, "client", nonce, hello.nonce)).to_header())
                frame = await frames.receive()
                if frame is None or not isinstance(protocol.parse_message(frame[0]), Ready):
                    raise PeerError(f"peer {peer}: refused our authentication (wrong secret?)")
                return PeerConnection(peer, frames, hello.version)
        except BaseException as e:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            if isinstance(e, trio.TooSlowError):
                raise PeerError(f"peer {peer}: no connection within {CONNECT_TIMEOUT:g}s") from None
            if isinstance(e, (OSError, ProtocolError, trio.BrokenResourceError)):
                raise PeerError(f"peer {peer}: {e}") from None
            raise

    async def get_chunk(
        self, peer: str, obj: ObjectId, chunk_size: int, index: int, start: int | None = None, end: int | None = None
    ) -> bytes:
        """One chunk from `peer`, or with `start` and `end` bytes start .. end - 1 of
        it (protocol v4), checksum verified.

        Raises:
            PeerError: connection failure, refusal, or a bad checksum; code
                "version" for a range from a peer older than protocol v4 (ask for
                the whole chunk instead).
        """
        conn = await self._connection(peer, bulk=start is None)
        fields = _fields(obj, chunk_size, index)
        if start is not None:
            if conn.version < protocol.RANGE_VERSION:
                raise PeerError(f"peer {peer}: speaks protocol v{conn.version}, no ranges", code="version")
            fields["start"], fields["end"] = start, end
        reply, payload = await conn.request(fields)
        if isinstance(reply, (Loaded, Held)):
            raise PeerError(f"peer {peer}: answered a get with {reply.t!r}")
        if isinstance(reply, ChunkError):
            raise PeerError(f"peer {peer}: {reply.code}: {loggable(reply.message)}", code=reply.code)
        if hotpath.checksum(payload) != reply.checksum:
            metrics.CACHE_ERRORS.labels("peer", "corrupt").inc()
            raise PeerError(f"peer {peer}: checksum mismatch on {obj.path} chunk {index}", code="corrupt")
        return payload

    async def load_chunk(self, peer: str, obj: ObjectId, chunk_size: int, index: int) -> bool:
        """Have `peer` load one chunk into its own tiers (warm-up); the chunk is not sent back.

        Returns:
            Whether the peer held the chunk already.
        Raises:
            PeerError: connection failure, a refusal or backend error at the peer
                (`code` as in ChunkError), or code "version": the peer speaks
                protocol v1 and cannot load.
        """
        reply = await self._ask_v2(peer, obj, chunk_size, index, LoadChunk, Loaded)
        return reply.cached

    async def load_chunks(self, peer: str, obj: ObjectId, chunk_size: int, index: int, count: int) -> list[bool]:
        """Have `peer` load chunks index .. index + count - 1 into its own tiers, with
        one backend request on protocol v3 (a v2 peer is asked chunk by chunk).

        Returns:
            For each chunk, whether the peer held it already.
        Raises:
            PeerError: as `load_chunk`.
        """
        conn = await self._connection(peer)
        if count == 1 or conn.version < protocol.RUN_VERSION:
            # One load per chunk, all at once: the run takes as long as one load.
            cached = [False] * count
            errors: list[PeerError] = []

            async def load(i: int) -> None:
                try:
                    cached[i] = await self.load_chunk(peer, obj, chunk_size, index + i)
                except PeerError as e:
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(load, i)
            if errors:
                raise errors[0]
            return cached
        fields = {**_fields(obj, chunk_size, index), "count": count}
        reply, _ = await conn.request(fields, LoadChunk)
        if isinstance(reply, ChunkError):
            raise PeerError(f"peer {peer}: {reply.code}: {loggable(reply.message)}", code=reply.code)
        if not isinstance(reply, Loaded) or reply.cached_mask is None:
            raise PeerError(f"peer {peer}: answered a run of {count} loads with {reply!r}")
        return [bool(reply.cached_mask >> i & 1) for i in range(count)]

    async def has_chunk(self, peer: str, obj: ObjectId, chunk_size: int, index: int) -> bool:
        """Whether `peer`'s own tiers hold one chunk (nothing is fetched or sent).

        Raises:
            PeerError: as `load_chunk`.
        """
        reply = await self._ask_v2(peer, obj, chunk_size, index, HasChunk, Held)
        return reply.held

    async def pin_chunks(
        self, peer: str, lease: str, owner: str, ttl: float, digests: list[bytes], size: int, paths: list[str]
    ) -> Pinned:
        """Have `peer` keep these chunks (at most MAX_PIN_DIGESTS) under `lease` for
        `ttl` seconds (protocol v5). `size`: their bytes, against its pin quota.

        Returns:
            The answer: pinned, or refused over the peer's quota (nothing pinned then).
        Raises:
            PeerError: connection failure, a refusal (`code` as in ChunkError), or
                code "version": the peer speaks an older protocol and keeps no pins.
        """
        conn = await self._connection(peer)
        if conn.version < protocol.PIN_VERSION:
            raise PeerError(f"peer {peer}: speaks protocol v{conn.version}, keeps no pins", code="version")
        fields = dict(
            lease=lease, owner=owner, origin=self.node, ttl_ms=max(1, round(ttl * 1000)), bytes=size,
            digests=b"".join(digests), paths=tuple(p[: protocol.MAX_PIN_PATH] for p in paths[: protocol.MAX_PIN_PATHS]),
        )
        reply, _ = await conn.request(fields, PinChunks)
        return self._answer(peer, reply, Pinned, "pin")

    async def unpin_leases(self, peer: str, leases: list[str]) -> Unpinned:
        """Have `peer` end these leases (at most MAX_UNPIN_LEASES; protocol v5).

        Raises:
            PeerError: as `pin_chunks`.
        """
        conn = await self._connection(peer)
        if conn.version < protocol.PIN_VERSION:
            raise PeerError(f"peer {peer}: speaks protocol v{conn.version}, keeps no pins", code="version")
        reply, _ = await conn.request(dict(leases=tuple(leases)), UnpinLeases)
        return self._answer(peer, reply, Unpinned, "unpin")

    async def capacity(self, peer: str) -> int:
        """The bytes the cache a warm-up fills on `peer` holds at most (protocol v6).

        Raises:
            PeerError: connection failure, a refusal, or code "version": the peer
                speaks an older protocol.
        """
        conn = await self._connection(peer)
        if conn.version < protocol.SPACE_VERSION:
            raise PeerError(f"peer {peer}: speaks protocol v{conn.version}, does not say its capacity", code="version")
        reply, _ = await conn.request({}, AskSpace)
        return self._answer(peer, reply, Space, "space?").capacity

    @staticmethod
    def _answer(peer: str, reply, answer: type, asked: str):
        if isinstance(reply, ChunkError):
            raise PeerError(f"peer {peer}: {reply.code}: {loggable(reply.message)}", code=reply.code)
        if not isinstance(reply, answer):
            raise PeerError(f"peer {peer}: answered a {asked!r} with {reply.t!r}")
        return reply

    async def _ask_v2(self, peer: str, obj: ObjectId, chunk_size: int, index: int, kind: type[GetChunk], answer: type):
        """Send a protocol-v2 request about one chunk; its reply, of type `answer`."""
        conn = await self._connection(peer)
        if conn.version < protocol.LOAD_VERSION:
            raise PeerError(f"peer {peer}: speaks protocol v{conn.version}, not {kind.t!r}", code="version")
        reply, _ = await conn.request(_fields(obj, chunk_size, index), kind)
        if isinstance(reply, ChunkError):
            raise PeerError(f"peer {peer}: {reply.code}: {loggable(reply.message)}", code=reply.code)
        if not isinstance(reply, answer):
            raise PeerError(f"peer {peer}: answered a {kind.t!r} with {reply.t!r}")
        return reply


def _fields(obj: ObjectId, chunk_size: int, index: int) -> dict:
    return dict(source=obj.source, path=obj.path, version=obj.version, size=obj.size, chunk_size=chunk_size, index=index)


class PeerTier:
    """The peer tier of the reader: the chunk's owner on the ring, then the next node.

    Any failure is a miss (the reader then fetches from the backend); a node that
    fails is skipped by its circuit breaker, so a dead worker costs at most one
    timeout, never a failed read.
    """

    name: ClassVar[str] = "peer"
    medium: ClassVar[Medium] = "network"

    def __init__(self, client: PeerClient, ring: Callable[[], Ring], timeout: float):
        self.client = client
        self.ring = ring
        self.timeout = timeout
        self._ok: dict[str, tuple] = {}  # peer -> its "ok" request counter and latency histogram

    def describe(self) -> list[dict]:
        """Each node on the ring and whether its circuit breaker lets it be asked (for status)."""
        return [
            {"node": node, "up": self.client.available(node), "self": node == self.client.node}
            for node in sorted(self.ring().nodes)
        ]

    def __contains__(self, digest: bytes) -> bool:
        return False  # only asking tells

    def owner(self, digest: bytes) -> str | None:
        """The ring's owner of a chunk if it is another node and its circuit breaker
        lets it be asked; None if we own it, the ring is empty, or the owner is down."""
        owner = self.ring().owner(digest)
        if owner is None or owner == self.client.node or not self.client.available(owner):
            return None
        return owner

    async def get_range(self, key: ChunkKey, start: int, end: int) -> bytes | None:
        """Bytes start .. end - 1 of a chunk from its owner (protocol v4): a random
        reader takes what it reads, not 4 MiB. None, as `get`, on any failure, and
        for an owner older than v4 (ask for the whole chunk then)."""
        return await self._ask(key, start, end)

    async def put(self, key: ChunkKey, data: Buffer) -> bool:
        return False  # never pushed: the owner fetches its chunks itself

    async def will_need(self, key: ChunkKey) -> None:
        pass

    async def get(self, key: ChunkKey) -> bytes | None:
        return await self._ask(key, None, None)

    async def _ask(self, key: ChunkKey, start: int | None, end: int | None) -> bytes | None:
        obj, chunk_size, index, digest = key.obj, key.chunk_size, key.index, key.digest
        length = key.length if start is None else end - start
        tried = 0
        for peer in self.ring().owners(digest, PEER_ATTEMPTS + 2):
            if peer == self.client.node:
                return None  # we own this chunk: the backend is our next tier
            if tried == PEER_ATTEMPTS:
                break
            if not self.client.available(peer):
                continue
            tried += 1
            t0 = time.monotonic()
            outcome = "error"
            with trio.move_on_after(self.timeout) as scope:
                try:
                    data = await self.client.get_chunk(peer, obj, chunk_size, index, start, end)
                except Exception as e:  # noqa: BLE001 - whatever a peer does is a miss, never a failed read
                    if not isinstance(e, PeerError):
                        log.exception("peer %s: unexpected error", peer)
                        e = PeerError(f"peer {peer}: {type(e).__name__}")
                    outcome = e.code or "error"
                    if outcome == "version":
                        return None  # an owner older than ranges: the reader asks for the whole chunk
                    if outcome == "busy":
                        # Draining: leaving the ring. Ask the next node now, as if this one were not there.
                        metrics.PEER_REQUESTS.labels(peer, outcome).inc()
                        self.client.mark_busy(peer)
                        tried -= 1
                        continue
                    if outcome in ("notfound", "changed"):
                        # The peer reached the backend and it said so: ask it ourselves, not the next peer.
                        metrics.PEER_REQUESTS.labels(peer, outcome).inc()
                        self.client.mark_ok(peer)
                        return None
                    if outcome != "unavailable":
                        self.client.mark_failed(peer, e)
                else:
                    if len(data) == length:
                        ok = self._ok.get(peer)
                        if ok is None:  # bound once per peer: labels() costs as much as a 4 KiB range
                            ok = self._ok[peer] = (metrics.PEER_REQUESTS.labels(peer, "ok"), metrics.PEER_SECONDS.labels(peer))
                        ok[0].inc()
                        ok[1].observe(time.monotonic() - t0)
                        self.client.mark_ok(peer)
                        return data
                    outcome = "corrupt"
                    self.client.mark_failed(peer, f"chunk of {len(data)} bytes, expected {length}")
            if scope.cancelled_caught:
                outcome = "timeout"
                self.client.mark_failed(peer, f"no answer within {self.timeout:g}s")
            metrics.PEER_REQUESTS.labels(peer, outcome).inc()
            metrics.CACHE_MISSES.labels(self.name).inc()
        return None
