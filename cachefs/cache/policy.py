"""Admission and eviction order for a tier: a segmented LRU (SLRU), and
`--admission scan-resistant` (the default) on top of it.

With plain LRU one large read-once scan (a backtest over a cold year of data)
flushes the hot dataset every other job re-reads. SLRU puts new chunks on
probation and moves a chunk to the protected segment when it is hit again;
eviction takes probation first, so a scan churns the probation segment and the
re-read data stays.

SLRU alone does not help cyclic reads larger than the cache (epochs of a
training set that does not fit): there every chunk is evicted before its second
read, so each epoch after the first hits nothing and rewrites the whole cache.
`ScanResistant` adds admission control for that case. When the tier is full, a
new chunk gets in only if

- it was referenced within the last `capacity` bytes of distinct references
  (its reuse distance fits the cache: LRU would hit it; a hot set that moves in
  is kept this way, evicting from probation's LRU end), or
- its rank, a fixed hash of its key, is below the highest rank on probation,
  which it then evicts. Over one pass of a scan the tier keeps the chunks of
  lowest rank (a bottom-k sample): the same ones every epoch and after a
  restart, about capacity/dataset of the data, and later epochs rewrite
  nothing. The threshold is never configured: it is the rank of the highest
  sampled chunk held, so it follows the working set's size.

A chunk admitted because it was recent evicts the least recently used entry of
either segment, as LRU would: a new working set that fits the cache replaces
an old one, even one whose sample was promoted to the protected segment.

Known limit: nothing ages the sample. After a switch to another dataset larger
than the cache, the old sample's chunks that rank lower than the new dataset's
stay until chunks admitted as recent push them out, so the new dataset gets
fewer hits than capacity/dataset for a while (in tests/test_policy.py's
simulation of a switch between two datasets of 2 x capacity: 0.21 after five
epochs of the new one, where 0.5 is the aim).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import ClassVar

import xxhash

# `--admission` values, the first the default: bench/epochs.py measured it (epochs
# of a dataset 2 x the cache hit about 0.5 after the first, LRU 0), and it keeps
# a hot set as SLRU does (tests/test_policy.py).
ADMISSIONS = ("scan-resistant", "lru")

# Share of the capacity the protected segment may hold; the rest is left for
# new chunks to prove themselves in.
PROTECTED_SHARE = 0.8


class SegmentedLRU:
    """Keys with sizes in eviction order, admitting every new key
    (`--admission lru`). No I/O; the caller owns the bytes.

    Args:
        capacity: the tier's capacity in bytes, to size the protected segment.
    """

    admission: ClassVar[str] = "lru"

    def __init__(self, capacity: int):
        self.protected_limit = int(capacity * PROTECTED_SHARE)
        self._probation: OrderedDict[bytes, int] = OrderedDict()
        self._protected: OrderedDict[bytes, int] = OrderedDict()
        self._protected_bytes = 0
        # Pinned entries are held outside both segments: never a victim, never scanned.
        self._pinned: dict[bytes, int] = {}
        self.pinned_bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._probation or key in self._protected or key in self._pinned

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected) + len(self._pinned)

    def pin(self, key: bytes) -> bool:
        """Keep an entry from eviction until `unpin`. Returns False if it is not held."""
        if key in self._pinned:
            return True
        size = self.pop(key)
        if size is None:
            return False
        self._pinned[key] = size
        self.pinned_bytes += size
        return True

    def unpin(self, key: bytes) -> None:
        """Let a pinned entry be evicted again: it rejoins as most recently used."""
        size = self._pinned.pop(key, None)
        if size is not None:
            self.pinned_bytes -= size
            self._to_probation(key, size)

    def _to_probation(self, key: bytes, size: int) -> None:
        self._probation[key] = size  # most recently used end

    def admit(self, key: bytes, size: int, full: bool) -> str | None:
        """Whether to store a new entry, called before making room for it.

        Args:
            full: storing it means evicting something first.
        Returns:
            Why it is admitted ("room", "recent" or "sample": then pass
            `sample=key` to `pop_victim`), or None: do not store it.
        """
        return "room" if not full else "recent"

    def add(self, key: bytes, size: int) -> None:
        """A new entry, on probation (most recently used end)."""
        self.pop(key)
        self._to_probation(key, size)

    def touch(self, key: bytes) -> None:
        """A hit: protect the entry (or refresh it there), demoting the protected LRU if full."""
        size = self._probation.pop(key, None)
        if size is None:
            if key in self._protected:
                self._protected.move_to_end(key)
            return
        self._protected[key] = size
        self._protected_bytes += size
        while self._protected_bytes > self.protected_limit and len(self._protected) > 1:
            old, old_size = self._protected.popitem(last=False)
            self._protected_bytes -= old_size
            self._to_probation(old, old_size)  # most recently used end of probation: a second chance

    def pop(self, key: bytes) -> int | None:
        """Remove an entry, pinned or not; returns its size, or None if absent."""
        size = self._pinned.pop(key, None)
        if size is not None:
            self.pinned_bytes -= size
            return size
        size = self._probation.pop(key, None)
        if size is None:
            size = self._protected.pop(key, None)
            if size is not None:
                self._protected_bytes -= size
        return size

    def pop_victim_with_prefix(self, prefix: bytes) -> tuple[bytes, int] | None:
        """The next entry to evict among keys starting with `prefix` (one source's
        chunks, for its quota), in the same order as `pop_victim`; None if there is none.
        Walks the segments from their cold ends, so it costs more the hotter the source is."""
        for segment in (self._probation, self._protected):
            for key in segment:
                if key.startswith(prefix):
                    size = self.pop(key)
                    assert size is not None
                    return key, size
        return None

    def pop_victim(self, sample: bytes | None = None) -> tuple[bytes, int]:
        """The entry to evict next: probation's LRU, else protected's; never a pinned one.
        `sample` matters to `ScanResistant` only.

        Raises:
            KeyError: nothing but pinned entries (or nothing) left.
        """
        if self._probation:
            return self._probation.popitem(last=False)
        key, size = self._protected.popitem(last=False)
        self._protected_bytes -= size
        return key, size


def rank(key: bytes) -> int:
    """A key's place in the sample: a hash fixed across epochs, processes and machines."""
    return xxhash.xxh3_64_intdigest(key)


class ScanResistant(SegmentedLRU):
    """SLRU with admission control for scans larger than the tier (`--admission
    scan-resistant`, the default; see the module docstring). Holds about 100 bytes per chunk
    referenced within the last `capacity` bytes, cached or not.
    """

    admission: ClassVar[str] = "scan-resistant"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.capacity = capacity
        # Distinct keys referenced most recently, with their sizes: at most `capacity` bytes.
        self._recent: OrderedDict[bytes, int] = OrderedDict()
        self._recent_bytes = 0
        # (-rank, key) of entries put on probation: a max-heap, pruned lazily
        # (a key no longer on probation is skipped when it surfaces).
        self._heap: list[tuple[int, bytes]] = []
        self._clock = 0  # references so far
        self._last: dict[bytes, int] = {}  # held key -> `_clock` at its last reference
        self.rejected = 0

    def _reference(self, key: bytes, size: int) -> None:
        recent = self._recent
        if recent and next(reversed(recent)) == key:
            return  # the next range of the chunk just read: one reference, not several
        self._clock += 1
        old = recent.pop(key, None)
        if old is not None:
            self._recent_bytes -= old
        recent[key] = size
        self._recent_bytes += size
        while self._recent_bytes > self.capacity and len(recent) > 1:
            self._recent_bytes -= recent.popitem(last=False)[1]

    def _to_probation(self, key: bytes, size: int) -> None:
        self._probation[key] = size
        heapq.heappush(self._heap, (-rank(key), key))
        if len(self._heap) > 2 * len(self._probation) + 64:
            self._heap = [(-rank(k), k) for k in self._probation]
            heapq.heapify(self._heap)

    def _top(self) -> tuple[int, bytes] | None:
        """(rank, key) of the highest-ranked entry on probation, or None."""
        heap = self._heap
        while heap:
            neg, key = heap[0]
            if key in self._probation:
                return -neg, key
            heapq.heappop(heap)
        return None

    def admit(self, key: bytes, size: int, full: bool) -> str | None:
        recent = key in self._recent
        self._reference(key, size)
        if not full:
            return "room"
        if recent:
            return "recent"
        top = self._top()
        if top is not None and rank(key) < top[0]:
            return "sample"
        self.rejected += 1
        return None

    def add(self, key: bytes, size: int) -> None:
        super().add(key, size)
        self._last[key] = self._clock

    def touch(self, key: bytes) -> None:
        last = self._last.get(key)
        if last is None:
            return  # not held (or pinned: never evicted, so never sampled)
        size = self._probation.get(key) or self._protected.get(key) or 0
        self._reference(key, size)
        self._last[key] = self._clock
        super().touch(key)

    def pin(self, key: bytes) -> bool:
        held = super().pin(key)
        self._last.pop(key, None)
        return held

    def unpin(self, key: bytes) -> None:
        if key in self._pinned:
            self._last[key] = self._clock
        super().unpin(key)

    def pop(self, key: bytes) -> int | None:
        self._last.pop(key, None)
        return super().pop(key)

    def pop_victim(self, sample: bytes | None = None) -> tuple[bytes, int]:
        """Making room for `sample`, a key admitted as a sample: the highest-ranked
        entry on probation, if it ranks above `sample` (a large chunk must not push
        out smaller ones of lower rank: they would come back next epoch). Else the
        least recently used of both segments' LRU ends (a recent entry displaces
        the oldest, protected or not). Never a pinned one.

        Raises:
            KeyError: nothing left to evict (for `sample`: nothing ranked above it).
        """
        victim = None
        if sample is not None:
            top = self._top()
            if top is None or top[0] <= rank(sample):
                raise KeyError(sample)
            victim = top[1]
        elif self._probation and self._protected:
            first = next(iter(self._probation))
            oldest = next(iter(self._protected))
            victim = oldest if self._last.get(oldest, 0) < self._last.get(first, 0) else first
        if victim is not None:
            size = self.pop(victim)
            assert size is not None
            return victim, size
        key, size = super().pop_victim()
        self._last.pop(key, None)
        return key, size


def make_index(admission: str, capacity: int) -> SegmentedLRU:
    """The eviction index of a tier under `--admission`."""
    if admission == "scan-resistant":
        return ScanResistant(capacity)
    if admission == "lru":
        return SegmentedLRU(capacity)
    raise ValueError(f"unknown admission policy {admission!r}")
