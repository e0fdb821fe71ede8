"""The MEM tier: whole chunks in process memory, within the chunk budget (--mem-size)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import ClassVar

from cachefs import metrics
from cachefs.budget import MemoryBudget
from cachefs.objects import SOURCE_TAG_SIZE, Buffer, ChunkKey, Medium


class MemTier:
    """An LRU of chunks bounded by bytes: a `ChunkTier`. No I/O, so no method
    checkpoints, async ones included (they are async to match the other tiers).

    Capacity 0 turns the tier off: `put` is then a no-op and every `get` misses.

    Its chunks are claimed in `budget` (by default one of its own, of `capacity`),
    which it shares with the chunks readers hold and fetch: it gives up its least
    recently used chunks whenever the budget needs room.
    """

    name: ClassVar[str] = "mem"
    medium: ClassVar[Medium] = "memory"

    def __init__(self, capacity: int, budget: MemoryBudget | None = None):
        self.capacity = capacity
        self.budget = budget if budget is not None else MemoryBudget(capacity)
        # Asked first: its chunks are the ones the budget can spare.
        self.budget.add_reclaimer(self._make_room, cache=True)
        self.used = 0
        self.by_source: Counter[bytes] = Counter()  # source tag -> bytes
        self.evicted_by_source: Counter[bytes] = Counter()  # source tag -> chunks evicted
        self._chunks: OrderedDict[bytes, Buffer] = OrderedDict()
        metrics.CACHE_CAPACITY.labels(self.name).set(capacity)
        # Bound once: labels() costs as much as the rest of a MEM hit.
        self._hits = metrics.CACHE_HITS.labels(self.name)
        self._misses = metrics.CACHE_MISSES.labels(self.name)
        self._publish()

    def _publish(self) -> None:
        metrics.CACHE_USED.labels(self.name).set(self.used)
        metrics.CACHE_CHUNKS.labels(self.name).set(len(self._chunks))

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._chunks

    async def get(self, key: ChunkKey) -> Buffer | None:
        digest = key.digest
        data = self._chunks.get(digest)
        if data is None:
            self._misses.inc()
            return None
        self._chunks.move_to_end(digest)
        self._hits.inc()
        return data

    async def get_range(self, key: ChunkKey, start: int, end: int) -> Buffer | None:
        data = await self.get(key)
        return None if data is None else memoryview(data)[start:end]

    async def will_need(self, key: ChunkKey) -> None:
        pass  # in memory already, or not here at all

    async def put(self, key: ChunkKey, data: Buffer) -> bool:
        digest = key.digest
        size = len(data)
        if size > self.capacity:
            return False
        self._forget(digest)
        while self.used + size > self.capacity:
            self._evict_oldest()
        if not self.budget.try_claim(digest, size):
            self._publish()
            return False  # the rest is fetches in flight and unread chunks
        self._chunks[digest] = data
        self.used += size
        self.by_source[digest[:SOURCE_TAG_SIZE]] += size
        self._publish()
        return True

    def _evict_oldest(self) -> None:
        digest = next(iter(self._chunks))
        self._forget(digest)
        self.evicted_by_source[digest[:SOURCE_TAG_SIZE]] += 1
        metrics.CACHE_EVICTIONS.labels(self.name).inc()

    def _make_room(self, budget: MemoryBudget, room: int) -> None:
        """A reclaimer: evict until `room` bytes fit in the budget or MEM is empty."""
        while self._chunks and not budget.fits(room):
            self._evict_oldest()
        self._publish()

    def _forget(self, digest: bytes) -> None:
        old = self._chunks.pop(digest, None)
        if old is not None:
            self.used -= len(old)
            self.by_source[digest[:SOURCE_TAG_SIZE]] -= len(old)
            self.budget.release(digest)

    def remove(self, digest: bytes) -> None:
        self._forget(digest)
        self._publish()

    def rename(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Keep each chunk `old` as chunk `new`, the same bytes under another key (the chunks
        of an object renamed in the backend), unless `new` is held already."""
        for old, new in pairs:
            data = self._chunks.get(old)
            if data is None or new in self._chunks:
                continue
            self._forget(old)
            if self.budget.try_claim(new, len(data)):
                self._chunks[new] = data
                self.used += len(data)
                self.by_source[new[:SOURCE_TAG_SIZE]] += len(data)
        self._publish()

    def usage(self) -> tuple[int, int]:
        """Returns (bytes used, chunks held)."""
        return self.used, len(self._chunks)
