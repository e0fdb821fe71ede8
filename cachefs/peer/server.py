"""Serve chunks to peers: the worker side of the peer protocol.

One task per connection: a mutual HMAC handshake, then requests handled
concurrently (bounded per connection) and answered in any order by id. A
malformed, oversized or unauthenticated frame closes that connection with a
log line; nothing a peer sends can take the server down.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Mapping

import trio

from cachefs import hotpath, metrics
from cachefs.objects import ObjectId, check_relative_path
from cachefs.errors import BackendError, ObjectChanged, ObjectNotFound
from cachefs.peer import protocol
from cachefs.peer.protocol import Auth, ChunkData, ChunkError, GetChunk, Hello, ProtocolError, Ready
from cachefs.peer.stream import FrameStream

if TYPE_CHECKING:
    from cachefs.reader import Reader

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0
MAX_REQUESTS_PER_CONNECTION = 64


class PeerServer:
    """Serves the chunks of `sources` (source URL → its Reader) to authenticated peers."""

    def __init__(self, node: str, secret: bytes, sources: Mapping[str, "Reader"], max_payload: int):
        self.node = node
        self.secret = secret
        self.sources = dict(sources)
        self.max_payload = max_payload

    async def handle(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        frames = FrameStream(stream, self.max_payload)
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                ok = await self._handshake(frames, peer)
            if scope.cancelled_caught:
                log.warning("peer %s: handshake timed out", peer)
                return
            if ok:
                await self._serve(frames, peer)
        except ProtocolError as e:
            metrics.PEER_PROTOCOL_ERRORS.labels("server").inc()
            log.warning("peer %s: %s; closing the connection", peer, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _handshake(self, frames: FrameStream, peer: str) -> bool:
        frame = await frames.receive()
        if frame is None:
            return False
        hello = protocol.parse_message(frame[0])
        if not isinstance(hello, Hello) or hello.version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"expected hello v{protocol.PROTOCOL_VERSION}, got {frame[0].get('t')!r}")
        nonce = os.urandom(16)
        mac = protocol.hello_mac(self.secret, "server", nonce, hello.nonce)
        await frames.send(Hello(protocol.PROTOCOL_VERSION, self.node, nonce, mac).to_header())
        frame = await frames.receive()
        auth = protocol.parse_message(frame[0]) if frame else None
        expected = protocol.hello_mac(self.secret, "client", hello.nonce, nonce)
        if not isinstance(auth, Auth) or not protocol.verify_mac(expected, auth.mac):
            metrics.PEER_AUTH_FAILURES.inc()
            log.warning("peer %s (%s): authentication failed; closing", peer, hello.node)
            return False
        await frames.send(Ready().to_header())
        return True

    async def _serve(self, frames: FrameStream, peer: str) -> None:
        slots = trio.Semaphore(MAX_REQUESTS_PER_CONNECTION)
        async with trio.open_nursery() as nursery:
            try:
                while (frame := await frames.receive()) is not None:
                    request = protocol.parse_message(frame[0])
                    if not isinstance(request, GetChunk):
                        raise ProtocolError(f"unexpected {frame[0].get('t')!r} after the handshake")
                    await slots.acquire()
                    nursery.start_soon(self._answer, frames, request, slots)
            finally:
                # The connection is finished; requests still running have no one to answer.
                nursery.cancel_scope.cancel()

    async def _answer(self, frames: FrameStream, req: GetChunk, slots: trio.Semaphore) -> None:
        try:
            reply = await self._chunk(req)
            if isinstance(reply, ChunkError):
                await frames.send(reply.to_header())
            else:
                await frames.send(ChunkData(req.id, hotpath.checksum(reply)).to_header(), reply)
                metrics.PEER_SERVED_BYTES.inc(len(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            slots.release()

    async def _chunk(self, req: GetChunk) -> bytes | memoryview | ChunkError:
        reader = self.sources.get(req.source)
        if reader is None:
            # A worker serves its own sources only; it never becomes a proxy to arbitrary URLs.
            metrics.PEER_SERVED.labels("refused").inc()
            return ChunkError(req.id, "refused", f"source {req.source!r} is not served here")
        if req.chunk_size != reader.chunk_size:
            metrics.PEER_SERVED.labels("bad-request").inc()
            return ChunkError(req.id, "bad-request", f"chunk size {req.chunk_size} != {reader.chunk_size}")
        try:
            check_relative_path(req.path)
        except ValueError as e:
            metrics.PEER_SERVED.labels("bad-request").inc()
            return ChunkError(req.id, "bad-request", str(e))
        if req.size < 0 or req.index * req.chunk_size >= max(req.size, 1):
            metrics.PEER_SERVED.labels("bad-request").inc()
            return ChunkError(req.id, "bad-request", "chunk index past the end of the object")
        obj = ObjectId(req.source, req.path, req.version, req.size)
        try:
            data, _ = await reader.chunk(obj, req.index)
        except ObjectNotFound as e:
            code, message = "notfound", str(e)
        except ObjectChanged as e:
            code, message = "changed", str(e)
        except BackendError as e:
            code, message = "unavailable", str(e)
        else:
            metrics.PEER_SERVED.labels("ok").inc()
            return data
        metrics.PEER_SERVED.labels(code).inc()
        return ChunkError(req.id, code, message)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
