"""Frames over a trio stream: the I/O half of `protocol`, shared by client and server."""

from __future__ import annotations

import trio

from cachefs.peer.protocol import FrameDecoder, ProtocolError, encode_frame

RECEIVE_SIZE = 1 << 20


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

    async def receive(self) -> tuple[dict, bytes] | None:
        """The next frame, or None at a clean end of stream.

        Raises:
            ProtocolError: malformed or oversized frame, or the stream ended mid-frame.
        """
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                if self.decoder.buffered():
                    raise ProtocolError("connection closed in the middle of a frame")
                return None
            self.decoder.feed(data)
