"""One byte budget (--mem-size) for every chunk buffer a daemon holds.

Chunks sit in memory in several places: the MEM tier, chunks a reader loaded and
has not read yet (read ahead, or fetched for a read of part of them), fetches and
peer receives in flight, and chunks waiting to be written to the SSD. Each place
takes a *claim* on the chunk's digest; the bytes of a chunk count once however
many claims it has (the places share one buffer), and are given back when its
last claim goes.

Room is made by asking *reclaimers* (the MEM tier, then the readers' held chunks)
to let chunks go, least recently used first. Fetches a read is waiting for (demand)
may use the whole budget and wait when it is taken by other fetches in flight;
read-ahead only takes room while `reserve` bytes stay free, and never waits, so
it cannot starve a demand read, and a demand read always gets its room once the
fetches in flight end.
"""

from __future__ import annotations

from typing import Callable

import trio

from cachefs import metrics

# Frees held chunks, least recently used first, until `budget.fits(room)` or it has none left.
Reclaimer = Callable[["MemoryBudget", int], None]

# Bytes read-ahead leaves free for demand reads: this many chunks (at most half the budget).
DEMAND_CHUNKS = 4


def chunk_budget(mem_size: int, chunk_size: int, read_ahead: int, backend_concurrency: int) -> MemoryBudget:
    """The budget of a daemon: --mem-size. With the MEM tier off (0) there is no
    MEM to shrink, and chunks in flight are bounded as before the budget was one:
    a fetch per backend slot plus what read-ahead may hold."""
    capacity = mem_size or (backend_concurrency + 4 * read_ahead + DEMAND_CHUNKS) * chunk_size
    return MemoryBudget(capacity, reserve=min(DEMAND_CHUNKS * chunk_size, capacity // 2))


class MemoryBudget:
    """A ledger of chunk bytes held in memory, bounded by `capacity`.

    Args:
        capacity: the most bytes of chunks held at once.
        reserve: bytes read-ahead leaves free for demand reads (a few chunks).
    """

    def __init__(self, capacity: int, reserve: int = 0):
        self.capacity = capacity
        self.reserve = reserve
        self.used = 0
        self.peak = 0
        self._claims: dict[bytes, list[int]] = {}  # digest -> [bytes, claims]
        self._caches: list[Reclaimer] = []  # asked by every claim (the MEM tier)
        self._holders: list[Reclaimer] = []  # asked by demand claims only (readers' unread chunks)
        self._freed = trio.lowlevel.ParkingLot()
        metrics.BUDGET_BYTES.labels("capacity").set(capacity)
        self._used_gauge = metrics.BUDGET_BYTES.labels("used")  # bound once: set on every claim
        self._used_gauge.set(0)

    def add_reclaimer(self, reclaimer: Reclaimer, cache: bool) -> None:
        """Args:
            cache: its chunks are a cache (MEM), asked first and by read-ahead too;
                otherwise chunks loaded for a reader, given up for demand reads only.
        """
        (self._caches if cache else self._holders).append(reclaimer)

    def remove_reclaimer(self, reclaimer: Reclaimer) -> None:
        for reclaimers in (self._caches, self._holders):
            if reclaimer in reclaimers:
                reclaimers.remove(reclaimer)

    def fits(self, room: int) -> bool:
        return self.used + room <= self.capacity

    def claimed(self, digest: bytes) -> bool:
        return digest in self._claims

    def try_claim(self, digest: bytes, size: int, ahead: bool = False) -> bool:
        """Claim a chunk if it is claimed already or there is (or can be made) room
        for it. Never checkpoints.

        Args:
            ahead: for read-ahead: leave `reserve` bytes free, and take room from
                the caches only, never from chunks loaded for readers.
        Returns:
            Whether the claim was taken; release it with `release`.
        """
        entry = self._claims.get(digest)
        if entry is not None:
            entry[1] += 1
            return True
        room = size + self.reserve if ahead else size
        if not self.fits(room):
            for reclaimer in self._caches if ahead else self._caches + self._holders:
                reclaimer(self, room)
                if self.fits(room):
                    break
            else:
                return False
        self._claims[digest] = [size, 1]
        self.used += size
        self._used_gauge.set(self.used)
        if self.used > self.peak:
            self.peak = self.used
            metrics.BUDGET_BYTES.labels("peak").set(self.peak)
        return True

    async def claim(self, digest: bytes, size: int, ahead: bool = False) -> None:
        """Claim a chunk for a read waiting on it: wait while chunks in flight take
        the room nothing can be reclaimed from. Checkpoints only when it waits.

        Args:
            ahead: as `try_claim`'s, for loads no read waits on (warm-up), which
                may wait for their room but must not take a demand read's.
        """
        # A chunk bigger than the budget gets all of it (all read-ahead may take).
        size = min(size, self.capacity - (self.reserve if ahead else 0))
        while not self.try_claim(digest, size, ahead):
            await self._freed.park()

    def release(self, digest: bytes) -> None:
        """Drop one claim; the chunk's bytes come back with its last. Never checkpoints."""
        entry = self._claims[digest]
        entry[1] -= 1
        if not entry[1]:
            del self._claims[digest]
            self.used -= entry[0]
            self._used_gauge.set(self.used)
        if self._freed:
            # Also when bytes stay claimed: a fetch that ended leaves its chunk in
            # MEM or held for a reader, which a waiting claim may now reclaim.
            self._freed.unpark_all()
