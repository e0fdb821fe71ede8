"""Frames over a trio stream: the I/O half of `protocol`, shared by client and server."""

from __future__ import annotations

import trio

from cachefs.peer.protocol import MAX_HEADER, FrameDecoder, ProtocolError, encode_frame

RECEIVE_SIZE = 256 << 10


class FrameStream:
    """Sends and receives whole frames; sends are serialised so frames never interleave.

    Big payloads (chunks) are received straight from the socket into their final
    buffer, in the trio thread: each `recv_into` takes what the socket holds
    (a few hundred KiB at most), so FUSE requests are served between them. A
    worker thread per chunk was tried: on a mount pinned to one core (bench.peer_hits)
    its hand-offs and GIL switches cost 0.3 s/GiB of the mount's 2.2, for no overlap.
    """

    def __init__(
        self, stream: trio.abc.Stream, max_payload: int, max_header: int = MAX_HEADER
    ):
        self.stream = stream
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
                if len(body):
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
