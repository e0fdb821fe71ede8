"""Frames over a trio stream: the I/O half of `protocol`, shared by client and server."""

from __future__ import annotations

import socket

import trio

from cachefs.peer.protocol import MAX_HEADER, FrameDecoder, ProtocolError, encode_frame

RECEIVE_SIZE = 256 << 10
# Payloads at least this big are sent by a worker thread when the stream has a
# send limiter (see FrameStream).
THREAD_SEND_MIN = 1 << 20
# How often a sending thread looks up from the socket to see if it was cancelled.
_POLL_SECONDS = 0.1


def _push(fd: int, view: memoryview) -> None:
    """Send all of `view` on the socket `fd`; runs in a worker thread and stops
    (trio.Cancelled) within _POLL_SECONDS when its task is cancelled."""
    # A socket object over the same fd, never closing it (detach): its send with a
    # timeout waits for room in C with the GIL released, one call per wait.
    sock = socket.socket(fileno=fd)
    try:
        sock.settimeout(_POLL_SECONDS)
        sent = 0
        while sent < len(view):
            trio.from_thread.check_cancelled()
            try:
                sent += sock.send(view[sent:])
            except TimeoutError:
                pass
    finally:
        sock.detach()


class FrameStream:
    """Sends and receives whole frames; sends are serialised so frames never interleave.

    Big payloads (chunks) are received straight from the socket into their final
    buffer, in the trio thread: each `recv_into` takes what the socket holds, so
    FUSE requests are served between them. A worker thread per chunk did this
    before; on a mount pinned to one core (bench.peer_hits) it overlaps nothing,
    and without it the mount's CPU per GiB was the same in an A/B run (2.32
    against 2.34 s/GiB, bench/results/20261128T063157Z-vm-peer-hits.md).

    Sending is the other way round. A worker sends a chunk faster than a mount
    takes it, so `send_all` waits for room ~25 times per 4 MiB, each wait a trip
    through trio's I/O loop; with `send_limiter` set (a worker serving peers), big
    payloads are sent by a worker thread that waits in the kernel instead, one
    hand-off per chunk. Cancel the sending task to stop it.
    """

    def __init__(
        self, stream: trio.abc.Stream, max_payload: int, max_header: int = MAX_HEADER
    ):
        self.stream = stream
        self.send_limiter: trio.CapacityLimiter | None = None
        self.decoder = FrameDecoder(max_payload=max_payload, max_header=max_header)
        self._send_lock = trio.Lock()
        self._send_broken = False
        # Small frames (requests, 4 KiB ranges) are received into this one buffer and
        # copied out by the decoder. `receive_some(RECEIVE_SIZE)` would allocate
        # RECEIVE_SIZE bytes per call, each a fresh mmap of 256 KiB (past malloc's
        # mmap threshold) to fault in and give back: more than the frame costs.
        self._small = bytearray(RECEIVE_SIZE) if isinstance(stream, trio.SocketStream) else None

    async def send(self, header: dict, payload: bytes | memoryview = b"") -> None:
        prefix, body = encode_frame(header, payload)
        async with self._send_lock:
            if self._send_broken:
                raise trio.ClosedResourceError("an earlier frame was cut short; the stream is out of sync")
            try:
                await self.stream.send_all(prefix)
                if (
                    len(body) >= THREAD_SEND_MIN
                    and self.send_limiter is not None
                    and isinstance(self.stream, trio.SocketStream)
                ):
                    with memoryview(body) as view:
                        await trio.to_thread.run_sync(
                            _push, self.stream.socket.fileno(), view, limiter=self.send_limiter
                        )
                elif len(body):
                    await self.stream.send_all(body)
            except BaseException:
                # Cancelled or failed part-way: part of a frame may be out, so no
                # later frame on this stream could be parsed.
                self._send_broken = True
                raise

    async def receive(self) -> tuple[dict, bytes | bytearray] | None:
        """The next frame, or None at a clean end of stream.

        Raises:
            ProtocolError: malformed or oversized frame, or the stream ended mid-frame.
        """
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            target = self.decoder.receive_buffer()
            if target is not None and isinstance(self.stream, trio.SocketStream):
                # A chunk: straight from the socket into its final buffer.
                n = await self.stream.socket.recv_into(target)
                if not n:
                    raise ProtocolError("connection closed in the middle of a frame")
                self.decoder.received_into(n)
                continue
            if self._small is not None:
                n = await self.stream.socket.recv_into(self._small)
                data = memoryview(self._small)[:n]
            else:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                if self.decoder.buffered():
                    raise ProtocolError("connection closed in the middle of a frame")
                return None
            self.decoder.feed(data)
