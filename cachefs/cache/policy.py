"""Eviction order for a tier: a segmented LRU (SLRU).

With plain LRU one large read-once scan (a backtest over a cold year of data)
flushes the hot dataset every other job re-reads. SLRU puts new chunks on
probation and moves a chunk to the protected segment when it is hit again;
eviction takes probation first, so a scan churns the probation segment and the
re-read data stays.

It does not fix cyclic reads larger than the cache (epochs of a training set
that does not fit): there every chunk is evicted before its second read, under
LRU and SLRU alike. That needs admission control (e.g. TinyLFU), not yet here.
"""

from __future__ import annotations

from collections import OrderedDict

# Share of the capacity the protected segment may hold; the rest is left for
# new chunks to prove themselves in.
PROTECTED_SHARE = 0.8


class SegmentedLRU:
    """Keys with sizes in eviction order. No I/O; the caller owns the bytes.

    Args:
        capacity: the tier's capacity in bytes, to size the protected segment.
    """

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
            self._probation[key] = size

    def add(self, key: bytes, size: int) -> None:
        """A new entry, on probation (most recently used end)."""
        self.pop(key)
        self._probation[key] = size

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
            self._probation[old] = old_size  # most recently used end of probation: a second chance

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

    def pop_victim(self) -> tuple[bytes, int]:
        """The entry to evict next: probation's LRU, else protected's; never a pinned one.

        Raises:
            KeyError: nothing but pinned entries (or nothing) left.
        """
        if self._probation:
            return self._probation.popitem(last=False)
        key, size = self._protected.popitem(last=False)
        self._protected_bytes -= size
        return key, size
