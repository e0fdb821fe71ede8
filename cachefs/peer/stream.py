"""Frames over a trio stream: the I/O half of `protocol`, shared by client and server."""

from __future__ import annotations

import trio

from cachefs.peer.protocol import FrameDecoder, ProtocolError, encode_frame

RECEIVE_SIZE = 256 << 10


class FrameStream:
    """Sends and receives whole frames; sends are serialised so frames never interleave."""

    def __init__(self, stream: trio.abc.Stream, max_payload: int):
        self.stream = stream
        self.decoder = FrameDecoder(max_payload=max_payload)
        self._send_lock = trio.Lock()

    async def send(self, header: dict, payload: bytes | memoryview = b"") -> None:
        prefix, body = encode_frame(header, payload)
        async with self._send_lock:
            await self.stream.send_all(prefix)
            if len(body):
                await self.stream.send_all(body)

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
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                if self.decoder.buffered():
                    raise ProtocolError("connection closed in the middle of a frame")
                return None
            self.decoder.feed(data)
