"""Chunk buffers the MEM tier lets go of, received into again.

A chunk from a peer is received straight into the buffer MEM then keeps (see
`FrameDecoder.receive_buffer`). A fresh buffer costs a page fault per 4 KiB
page on its first touch, the kernel zeroing it, and on a VM the host handing
the page over: about 3.5 ms of a 4 MiB chunk here, against 0.5 ms to copy it
(a third of a mount's CPU on a peer hit). Once MEM is full every chunk it takes
evicts one; that buffer, faulted in already, is where the next chunk goes.
"""

from __future__ import annotations

import sys

from cachefs import metrics

# Buffers kept: chunks received while MEM is full come one per eviction, so a few
# are enough; each is a chunk of memory outside the MEM tier's budget.
POOL_BUFFERS = 8


class BufferPool:
    """Free buffers of one size (the chunk size). No I/O; trio thread only.

    Args:
        size: the only buffer size kept (a last, short chunk is not).
        max_buffers: the most kept; more are let go.
    """

    def __init__(self, size: int, max_buffers: int = POOL_BUFFERS):
        self.size = size
        self.max_buffers = max_buffers
        self._free: list[bytearray] = []
        self._reused = metrics.BUFFERS_REUSED

    def __len__(self) -> int:
        return len(self._free)

    def take(self, size: int) -> bytearray | None:
        """A buffer of `size` bytes, contents undefined, or None (allocate one)."""
        if size != self.size or not self._free:
            return None
        self._reused.inc()
        return self._free.pop()

    def give(self, buf: object) -> None:
        """Keep `buf` for a later `take`, if nothing else refers to it.

        A buffer still referred to (a memoryview of it being answered to FUSE or
        a peer, a chunk a reader holds) is left alone: writing into it would
        change bytes someone is about to read. A memoryview holds a reference to
        the buffer it views, so the reference count tells: the caller's, this
        call's argument and getrefcount's own are all there may be.
        """
        if type(buf) is not bytearray or len(buf) != self.size or len(self._free) >= self.max_buffers:
            return
        if sys.getrefcount(buf) > 3:
            return
        self._free.append(buf)
