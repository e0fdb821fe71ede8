"""The MEM tier: whole chunks in process memory, bounded by --mem-size."""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

from cachefs import metrics

Buffer = bytes | memoryview


class MemTier:
    """An LRU of chunks bounded by bytes. No I/O, so no method checkpoints.

    Capacity 0 turns the tier off: `put` is then a no-op and every `get` misses.
    """

    name: ClassVar[str] = "mem"

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._chunks: OrderedDict[bytes, Buffer] = OrderedDict()
        metrics.CACHE_CAPACITY.labels(self.name).set(capacity)
        self._publish()

    def _publish(self) -> None:
        metrics.CACHE_USED.labels(self.name).set(self.used)
        metrics.CACHE_CHUNKS.labels(self.name).set(len(self._chunks))

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._chunks

    def get(self, digest: bytes) -> Buffer | None:
        data = self._chunks.get(digest)
        if data is None:
            metrics.CACHE_MISSES.labels(self.name).inc()
            return None
        self._chunks.move_to_end(digest)
        metrics.CACHE_HITS.labels(self.name).inc()
        return data

    def put(self, digest: bytes, data: Buffer) -> None:
        size = len(data)
        if size > self.capacity:
            return
        old = self._chunks.pop(digest, None)
        if old is not None:
            self.used -= len(old)
        while self.used + size > self.capacity:
            _, evicted = self._chunks.popitem(last=False)
            self.used -= len(evicted)
            metrics.CACHE_EVICTIONS.labels(self.name).inc()
        self._chunks[digest] = data
        self.used += size
        self._publish()

    def remove(self, digest: bytes) -> None:
        old = self._chunks.pop(digest, None)
        if old is not None:
            self.used -= len(old)
            self._publish()

    def usage(self) -> tuple[int, int]:
        """Returns (bytes used, chunks held)."""
        return self.used, len(self._chunks)
