"""Frames over a trio stream: the I/O half of `protocol`, shared by client and server."""

from __future__ import annotations

import os
import select

import trio

from cachefs.peer.protocol import MAX_HEADER, FrameDecoder, ProtocolError, encode_frame

RECEIVE_SIZE = 256 << 10
# Payloads at least this big are received by a worker thread (see FrameStream).
THREAD_RECEIVE_MIN = 1 << 20
# How often a receiving thread looks up from the socket to see if it was cancelled.
_POLL_MS = 100


def _fill(fd: int, view: memoryview) -> int:
    """Receive into `view` from a non-blocking socket until it is full or the peer
    closes; runs in a worker thread and ends early when its task is cancelled."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    got = 0
    while got < len(view):
        trio.from_thread.check_cancelled()
        if not poller.poll(_POLL_MS):
            continue
        try:
            n = os.readv(fd, [view[got:]])
        except BlockingIOError:
            continue
        if not n:
            break
        got += n
    return got


class FrameStream:
    """Sends and receives whole frames; sends are serialised so frames never interleave.

    With `thread_receive`, big payloads (chunks) are received by a worker thread
    straight into their final buffer: the copy out of the socket and the first
    touch of fresh memory (slow on VMs) then run beside the trio thread, which
    keeps serving FUSE requests, instead of inside it. Cancel the receiving
    task to stop it; never close the stream under it.
    """

    def __init__(
        self, stream: trio.abc.Stream, max_payload: int, thread_receive: bool = False, max_header: int = MAX_HEADER
    ):
        self.stream = stream
        self.decoder = FrameDecoder(max_payload=max_payload, max_header=max_header)
        self._send_lock = trio.Lock()
        self._send_broken = False
        self._thread_receive = thread_receive and isinstance(stream, trio.SocketStream)
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
                if self._thread_receive and len(target) >= THREAD_RECEIVE_MIN:
                    n = await trio.to_thread.run_sync(_fill, self.stream.socket.fileno(), target)
                else:
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
