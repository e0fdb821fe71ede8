"""Serve chunks to peers: the worker side of the peer protocol.

One task per connection: a mutual HMAC handshake, then requests handled
concurrently (bounded per connection) and answered in any order by id.
Requests are GetChunk (answered with the chunk, or on protocol v4 with the byte
range of it that was asked for) and, on connections of protocol version 2 or
later, LoadChunk (warm-up: load it into our tiers, answer Loaded). On protocol
v5, PinChunks and UnpinLeases hand pins of the chunks we own to the node's
`PinHolder`.

Each connection is a boundary: whatever happens inside it (a reset, a
malformed frame, a bug) is logged and closes that connection only; the
server and every other connection go on. Before a peer has proven it knows
the secret it can make the server hold very little: frames without payload,
small headers, a handshake deadline, and a cap on such connections.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

import trio

from cachefs import hotpath, metrics
from cachefs.objects import Buffer, ObjectId, check_relative_path, chunk_key
from cachefs.errors import BackendError, ObjectChanged, ObjectNotFound
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
from cachefs.peer.stream import FrameStream
from cachefs.logsafe import LogLimiter, loggable

if TYPE_CHECKING:
    from cachefs.reader import Reader

log = logging.getLogger(__name__)

# Before authentication only Hello and Auth arrive; both fit in this.
HANDSHAKE_MAX_HEADER = 8 << 10
# Longest path component a request may name (NAME_MAX on Linux).
NAME_MAX = 255
# Object versions whose request fields were checked, remembered (see `_resolve`).
OBJECTS_KEPT = 4096
# Checksums of whole chunks sent, remembered (see `_fetch`): ~100 bytes each.
CHECKSUMS_KEPT = 16384
# Chunks being sent at once, each by a worker thread (see FrameStream); more wait their turn.
SEND_THREADS = 16


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one peer can make a server hold. Defaults are documented in docs/operations.md."""

    handshake_timeout: float = 5.0  # seconds from accept to Ready
    idle_timeout: float = 300.0  # an authenticated connection with nothing in flight is closed after this
    max_unauthenticated: int = 64  # connections still in their handshake, all peers together
    max_connections_per_host: int = 128  # authenticated connections from one address (a mount opens 2 per worker)
    max_requests_per_connection: int = 64  # requests in flight on one connection
    send_timeout: float = 60.0  # an answer the peer does not take within this closes the connection


class PinHolder(Protocol):
    """What keeps the pins peers ask for: the node, with its SSD tier and leases."""

    async def hold_pins(self, req: PinChunks) -> Pinned | str:
        """Pin under `req.lease`; the answer to `req.id`, or why not (one line: no SSD tier, a lease id in use)."""

    async def release_pins(self, leases: tuple[str, ...]) -> tuple[int, int]:
        """End these leases; (how many there were, the bytes they pinned)."""


class PeerServer:
    """Serves the chunks of `sources` (source URL → its Reader, kept up to date by the
    node) to authenticated peers, keeps the pins they ask for in `pins` (None:
    refused), and tells them what `capacity()` says its warm-up cache holds (None:
    refused)."""

    def __init__(
        self,
        node: str,
        secret: bytes,
        sources: Mapping[str, "Reader"],
        max_payload: int,
        limits: ServerLimits = ServerLimits(),
        pins: PinHolder | None = None,
        capacity: Callable[[], int] | None = None,
    ):
        self.node = node
        self.pins = pins
        self.capacity = capacity
        self.secret = secret
        self.sources = sources  # not copied: a node adds and removes datasets while serving
        self.max_payload = max_payload
        self.limits = limits
        self._unauthenticated = 0
        self._per_host: dict[str, int] = {}
        self._warnings = LogLimiter(log)
        self.draining = False
        self._in_flight = 0  # requests being answered (not "busy" refusals)
        self._idle = trio.Event()  # set while nothing is in flight
        self._idle.set()
        self._accepting: trio.CancelScope | None = None
        # (source, path, version, size) -> its ObjectId, once the path was checked:
        # a random reader asks for 4 KiB ranges, and checking the path and hashing
        # the chunk key again (a fresh ObjectId misses the reader's key cache) cost
        # as much as serving one.
        self._objects: dict[tuple[str, str, str, int], ObjectId] = {}
        # (object, chunk index) -> xxh3 of the whole chunk. A chunk's bytes never
        # change (its key names the object version), and hashing 4 MiB on every
        # send was 8% of a worker's CPU on peer hits. Were the bytes ever
        # different, the client's check would catch it: never served silently.
        self._checksums: dict[tuple[ObjectId, int], int] = {}
        # Threads sending chunks (see FrameStream), all connections together.
        self._send_threads = trio.CapacityLimiter(SEND_THREADS)

    async def serve(self, listeners: list[trio.SocketListener], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections on `listeners` until cancelled; `drain` stops accepting
        (and closes the listeners) while the connections go on."""
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as self._accepting:
                if self.draining:
                    self._accepting.cancel()
                task_status.started()
                await trio.serve_listeners(self.handle, listeners, handler_nursery=connections)
            for listener in listeners:
                await listener.aclose()
            # Draining: the connections run until the node closes.
            await trio.sleep_forever()

    async def drain(self, timeout: float) -> tuple[int, bool]:
        """Stop accepting connections and requests, and wait for those in flight. Checkpoints.

        Returns:
            (the requests that were in flight, whether all of them finished within `timeout`).
        """
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        in_flight = self._in_flight
        with trio.move_on_after(timeout):
            await self._idle.wait()
        return in_flight, self._in_flight == 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it ends. Never raises, except to cancel (shutdown)."""
        host, peer = _peer_address(stream)
        try:
            await self._handle(stream, host, peer)
        except Exception as exc:  # noqa: BLE001 - the per-connection boundary (ExceptionGroups included)
            self._connection_failed(peer, exc)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _handle(self, stream: trio.abc.Stream, host: str, peer: str) -> None:
        if self._unauthenticated >= self.limits.max_unauthenticated:
            metrics.PEER_CONNECTIONS_CLOSED.labels("unauthenticated-cap").inc()
            self._warnings.warning(
                "unauthenticated", "peer %s: %d connections are in their handshake already; refusing",
                peer, self._unauthenticated,
            )
            return
        # No client message has a payload: a peer cannot make us allocate one.
        frames = FrameStream(stream, max_payload=0, max_header=HANDSHAKE_MAX_HEADER)
        self._unauthenticated += 1
        try:
            with trio.move_on_after(self.limits.handshake_timeout) as scope:
                version = await self._handshake(frames, peer)
                ok = version is not None and await self._admit(frames, host, peer)
        finally:
            self._unauthenticated -= 1
        if scope.cancelled_caught:
            metrics.PEER_CONNECTIONS_CLOSED.labels("handshake-timeout").inc()
            self._warnings.warning("handshake-timeout", "peer %s: handshake timed out", peer)
            return
        if not ok:
            return
        frames.decoder.max_header = protocol.MAX_HEADER
        frames.send_limiter = self._send_threads
        try:
            await self._serve(frames, version)
        finally:
            self._release(host)

    def _connection_failed(self, peer: str, exc: Exception) -> None:
        """Log why a connection ended abnormally: quietly for what peers do, loudly for our bugs."""
        rest: BaseException | None = exc
        if isinstance(exc, BaseExceptionGroup):
            # Protocol errors and transport errors are a peer's doing; anything else is ours.
            protocol_errors, rest = exc.split(ProtocolError)
            _, rest = rest.split(_TRANSPORT_ERRORS) if rest is not None else (None, None)
            first = _first_leaf(protocol_errors) if protocol_errors is not None else None
        else:
            first = exc if isinstance(exc, ProtocolError) else None
            if isinstance(exc, (ProtocolError, *_TRANSPORT_ERRORS)):
                rest = None
        if first is not None:
            metrics.PEER_PROTOCOL_ERRORS.labels("server").inc()
            self._warnings.warning("protocol", "peer %s: %s; closing the connection", peer, first)
        if rest is not None:
            metrics.PEER_CONNECTIONS_CLOSED.labels("internal-error").inc()
            if self._warnings.log(logging.ERROR, "internal", "peer %s: connection failed; closing it", peer):
                log.error("the error was:", exc_info=rest)

    async def _handshake(self, frames: FrameStream, peer: str) -> int | None:
        """The connection's protocol version once the peer has authenticated; None if it did not."""
        frame = await frames.receive()
        if frame is None:
            return None
        hello = protocol.parse_message(frame[0])
        if not isinstance(hello, Hello) or hello.version not in protocol.SUPPORTED_VERSIONS:
            versions = "/".join(f"v{v}" for v in sorted(protocol.SUPPORTED_VERSIONS))
            raise ProtocolError(f"expected hello {versions}, got {frame[0].get('t')!r} {frame[0].get('version')!r}")
        # A v1 client (a rolling upgrade) gets v1: it never sends what v1 lacks.
        version = min(hello.version, protocol.PROTOCOL_VERSION)
        nonce = os.urandom(16)
        mac = protocol.hello_mac(self.secret, "server", nonce, hello.nonce)
        await frames.send(Hello(version, self.node, nonce, mac).to_header())
        frame = await frames.receive()
        auth = protocol.parse_message(frame[0]) if frame else None
        expected = protocol.hello_mac(self.secret, "client", hello.nonce, nonce)
        if not isinstance(auth, Auth) or not protocol.verify_mac(expected, auth.mac):
            metrics.PEER_AUTH_FAILURES.inc()
            self._warnings.warning(
                "auth", "peer %s (calls itself %s): authentication failed; closing", peer, loggable(hello.node)
            )
            return None
        return version

    async def _admit(self, frames: FrameStream, host: str, peer: str) -> bool:
        """Tell an authenticated peer it may send requests, unless its host is at its cap."""
        if self._per_host.get(host, 0) >= self.limits.max_connections_per_host:
            metrics.PEER_CONNECTIONS_CLOSED.labels("per-host-cap").inc()
            self._warnings.warning(
                f"per-host:{host}", "peer %s: %d connections from %s already; refusing",
                peer, self._per_host[host], host,
            )
            return False
        # Counted from here, before the Ready goes out: the cap holds however the sends interleave.
        self._per_host[host] = self._per_host.get(host, 0) + 1
        try:
            await frames.send(Ready().to_header())
        except BaseException:
            self._release(host)
            raise
        return True

    def _release(self, host: str) -> None:
        if self._per_host[host] == 1:
            del self._per_host[host]
        else:
            self._per_host[host] -= 1

    async def _serve(self, frames: FrameStream, version: int) -> None:
        async with trio.open_nursery() as nursery:
            session = _Session(frames, self.limits.max_requests_per_connection, nursery.cancel_scope)
            try:
                while True:
                    # While answers are being worked on, look again an idle timeout from now.
                    since = trio.current_time() if session.busy else session.last_active
                    with trio.move_on_at(since + self.limits.idle_timeout) as idle:
                        frame = await frames.receive()
                    if idle.cancelled_caught:
                        if session.busy or trio.current_time() < session.last_active + self.limits.idle_timeout:
                            continue  # a request is being answered, or one was answered since: not idle
                        metrics.PEER_CONNECTIONS_CLOSED.labels("idle").inc()
                        log.debug("closing a connection idle for %gs", self.limits.idle_timeout)
                        return
                    if frame is None:
                        return
                    session.last_active = trio.current_time()
                    request = protocol.parse_message(frame[0])
                    if isinstance(request, (PinChunks, UnpinLeases, AskSpace)):
                        if version < (protocol.SPACE_VERSION if isinstance(request, AskSpace) else protocol.PIN_VERSION):
                            raise ProtocolError(f"unexpected {frame[0].get('t')!r} after a v{version} handshake")
                    elif not isinstance(request, GetChunk) or (
                        isinstance(request, (LoadChunk, HasChunk)) and version < protocol.LOAD_VERSION
                    ) or (isinstance(request, LoadChunk) and request.count > 1 and version < protocol.RUN_VERSION) or (
                        # A range is a v4 read; loads and questions are about whole chunks.
                        request.start is not None and (version < protocol.RANGE_VERSION or type(request) is not GetChunk)
                    ):
                        raise ProtocolError(f"unexpected {frame[0].get('t')!r} after a v{version} handshake")
                    await session.slots.acquire()
                    if self.draining:
                        nursery.start_soon(self._refuse, session, request)
                    else:
                        if self._in_flight == 0:
                            self._idle = trio.Event()
                        self._in_flight += 1
                        nursery.start_soon(self._answer, session, request)
            finally:
                # The connection is finished; requests still running have no one to answer.
                nursery.cancel_scope.cancel()

    async def _answer(self, session: _Session, req: GetChunk | PinChunks | UnpinLeases | AskSpace) -> None:
        try:
            if isinstance(req, AskSpace):
                reply = self._space(req)
            elif isinstance(req, (PinChunks, UnpinLeases)):
                reply = await self._pins(req)
            elif isinstance(req, HasChunk):
                reply = self._has(req)
            else:
                reply = await (self._load(req) if isinstance(req, LoadChunk) else self._chunk(req))
            with trio.move_on_after(self.limits.send_timeout) as sending:
                if isinstance(reply, (ChunkError, Loaded, Held, Pinned, Unpinned, Space)):
                    await session.frames.send(reply.to_header())
                else:
                    payload, checksum = reply
                    await session.frames.send(ChunkData(req.id, checksum).to_header(), payload)
                    metrics.PEER_SERVED_BYTES.inc(len(payload))
            if sending.cancelled_caught:
                # Half a frame may be out: the stream is unusable. A peer that stops reading loses it.
                metrics.PEER_CONNECTIONS_CLOSED.labels("send-timeout").inc()
                log.debug("an answer was not taken within %gs; closing the connection", self.limits.send_timeout)
                session.scope.cancel()
        except _TRANSPORT_ERRORS:
            pass  # the peer left; the receive loop sees it too and ends the connection
        finally:
            session.last_active = trio.current_time()
            session.slots.release()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _refuse(self, session: _Session, req: GetChunk | PinChunks | UnpinLeases | AskSpace) -> None:
        """Draining: tell the peer to ask the next node on the ring."""
        metrics.PEER_SERVED.labels("busy").inc()
        try:
            with trio.move_on_after(self.limits.send_timeout) as sending:
                await session.frames.send(ChunkError(req.id, "busy", f"{self.node} is draining").to_header())
            if sending.cancelled_caught:
                metrics.PEER_CONNECTIONS_CLOSED.labels("send-timeout").inc()
                session.scope.cancel()
        except _TRANSPORT_ERRORS:
            pass
        finally:
            session.last_active = trio.current_time()
            session.slots.release()

    async def _pins(self, req: PinChunks | UnpinLeases) -> Pinned | Unpinned | ChunkError:
        """Hand a pin or unpin to the node; pins are refused where no one keeps them."""
        if self.pins is None:
            metrics.PEER_SERVED.labels("refused").inc()
            return ChunkError(req.id, "refused", f"{self.node} keeps no pins")
        if isinstance(req, UnpinLeases):
            count, size = await self.pins.release_pins(req.leases)
            return Unpinned(req.id, count, size)
        answer = await self.pins.hold_pins(req)
        if isinstance(answer, str):
            metrics.PEER_SERVED.labels("refused").inc()
            return ChunkError(req.id, "refused", answer)
        return answer

    def _space(self, req: AskSpace) -> Space | ChunkError:
        if self.capacity is None:
            metrics.PEER_SERVED.labels("refused").inc()
            return ChunkError(req.id, "refused", f"{self.node} does not say its capacity")
        return Space(req.id, self.capacity())

    def _resolve(self, req: GetChunk) -> tuple[Reader, ObjectId] | ChunkError:
        """The reader and object `req` asks for, or the error to answer with."""
        reader = self.sources.get(req.source)
        if reader is None:
            # A worker serves its own sources only; it never becomes a proxy to arbitrary URLs.
            metrics.PEER_SERVED.labels("refused").inc()
            return ChunkError(req.id, "refused", f"source {loggable(req.source)} is not served here")
        ident = (req.source, req.path, req.version, req.size)
        obj = self._objects.get(ident)
        problem = _check_request(req, reader.chunk_size, path_checked=obj is not None)
        if problem is not None:
            metrics.PEER_SERVED.labels("bad-request").inc()
            return ChunkError(req.id, "bad-request", problem)
        if obj is None:
            if len(self._objects) >= OBJECTS_KEPT:
                self._objects.clear()
            obj = self._objects[ident] = ObjectId(req.source, req.path, req.version, req.size)
        return reader, obj

    def _has(self, req: HasChunk) -> Held | ChunkError:
        """Whether our own tiers hold the chunk (where a file's chunks are, for status)."""
        resolved = self._resolve(req)
        if isinstance(resolved, ChunkError):
            return resolved
        reader, obj = resolved
        digest = chunk_key(obj, reader.chunk_size, req.index).digest
        return Held(req.id, any(digest in tier for tier in reader.tiers if tier.medium != "network"))

    async def _load(self, req: LoadChunk) -> Loaded | ChunkError:
        """Warm-up: have the chunk in our tiers (one backend fetch at most, shared with
        readers by the reader's single-flight; into the SSD tier only, see
        `Reader.warm`) and say whether it was there before."""
        resolved = self._resolve(req)
        if isinstance(resolved, ChunkError):
            return resolved
        reader, obj = resolved
        try:
            if req.count == 1:
                cached = [await reader.warm(obj, req.index)]
            else:
                cached = await reader.warm_run(obj, req.index, req.count)
        except BackendError as e:
            return self._backend_error(req, e)
        metrics.PEER_SERVED.labels("loaded").inc(len(cached))
        mask = sum(1 << i for i, held in enumerate(cached) if held) if req.count > 1 else None
        return Loaded(req.id, cached=all(cached), cached_mask=mask)

    async def _chunk(self, req: GetChunk) -> tuple[Buffer, int] | ChunkError:
        resolved = self._resolve(req)
        if isinstance(resolved, ChunkError):
            return resolved
        reply = await self._fetch(req, *resolved)
        if not isinstance(reply, ChunkError):
            metrics.PEER_SERVED.labels("ok").inc()
        return reply

    async def _fetch(self, req: GetChunk, reader: Reader, obj: ObjectId) -> tuple[Buffer, int] | ChunkError:
        """The bytes asked for and their checksum."""
        try:
            data, _ = await reader.chunk(obj, req.index)
        except BackendError as e:
            return self._backend_error(req, e)
        if req.start is not None:
            # The whole chunk is loaded (and kept) all the same: the owner fetches each chunk once for the ring.
            part = memoryview(data)[req.start : req.end]
            return part, hotpath.checksum(part)
        checksums = self._checksums
        checksum = checksums.get((obj, req.index))
        if checksum is None:
            if len(checksums) >= CHECKSUMS_KEPT:
                checksums.clear()
            checksum = checksums[obj, req.index] = hotpath.checksum(data)
        return data, checksum

    @staticmethod
    def _backend_error(req: GetChunk, e: BackendError) -> ChunkError:
        if isinstance(e, ObjectNotFound):
            code = "notfound"
        elif isinstance(e, ObjectChanged):
            code = "changed"
        else:
            code = "unavailable"
        metrics.PEER_SERVED.labels(code).inc()
        return ChunkError(req.id, code, str(e))


class _Session:
    """One authenticated connection's state, shared by its receive loop and its answers."""

    def __init__(self, frames: FrameStream, max_requests: int, scope: trio.CancelScope):
        self.frames = frames
        self.max_requests = max_requests
        self.slots = trio.Semaphore(max_requests)
        self.scope = scope  # cancel to close the connection
        self.last_active = trio.current_time()  # the last request received or answer sent

    @property
    def busy(self) -> bool:
        return self.slots.value < self.max_requests


# What a peer that goes away mid-conversation raises; not an error of ours.
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _check_request(req: GetChunk, chunk_size: int, path_checked: bool = False) -> str | None:
    """Why `req` cannot be served, or None: checked before any tier or backend is asked.

    Args:
        path_checked: an earlier request named the same object version and its
            path and version passed; only the chunk fields are checked.
    """
    if req.chunk_size != chunk_size:
        return f"chunk size {req.chunk_size} != {chunk_size}"
    if not path_checked:
        if not req.path or any(len(part.encode()) > NAME_MAX for part in req.path.split("/")):
            return f"bad path {loggable(req.path)}"
        try:
            check_relative_path(req.path)
        except ValueError:
            return f"bad path {loggable(req.path)}"
        if not req.version:
            return "empty version"
    # An empty object has no chunks: nothing a peer can ask for.
    last = req.index + (req.count - 1 if isinstance(req, LoadChunk) else 0)
    if last * req.chunk_size >= req.size:
        return f"chunk {last} is past the end of an object of {req.size} bytes"
    if req.end is not None and req.end > min(req.chunk_size, req.size - req.index * req.chunk_size):
        return f"range {req.start}..{req.end} is past the end of chunk {req.index}"
    return None


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _peer_address(stream: trio.abc.Stream) -> tuple[str, str]:
    """(the peer's host, "host:port") for limits and logs; ("?", "?") for a stream without a socket."""
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
        return host, f"{host}:{port}"
    except (AttributeError, OSError):
        return "?", "?"
