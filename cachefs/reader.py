"""The reader: turns (object, offset, size) into chunks and walks the tiers.

The tiers are a list, fastest first (MEM → SSD → peer: the chunk's owner on the
ring), all asked through one interface (`cachefs.objects.ChunkTier`), then the
backend. One fetch per chunk at a time (single-flight), sequential-read
detection that fetches the next chunks ahead in the nursery, and a bound on how
much read-ahead may be in flight at once. Every chunk it fetches, holds for a
reader or writes behind is claimed in the daemon's chunk budget (--mem-size,
`cachefs.budget`): read-ahead only where there is room, demand reads always.

What the reader optimises depends on each tier's `medium`, worked out once in
`Reader.__init__`:
- "memory" on top: asked before single-flight (a hit has no I/O to share), and
  the tier every other hit and fetch is copied into.
- "disk": serves random reads (and all reads with no memory tier above it) by
  range, reading only the blocks they need; with nothing above it, read-ahead
  of chunks it holds is the kernel's (`will_need`), not ours.
- "network": its hits are kept in memory only, and with it misses never take
  ranges from the backend: the chunk's owner fetches each chunk once for the ring.
  A random reader takes a range from the owner (`get_range`, kept nowhere) the
  first time it reads a chunk, and the whole chunk into MEM the second time
  (see `_touched`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict
from typing import Sequence

import trio

from cachefs import hotpath, metrics
from cachefs.backend import Backend
from cachefs.budget import MemoryBudget
from cachefs.errors import BackendError
from cachefs.objects import Buffer, ChunkKey, ChunkTier, ObjectId, chunk_key

log = logging.getLogger(__name__)


# A reader counts as random (its misses fetch just the blocks they need) after
# this many non-sequential reads in a row.
RANDOM_AFTER_JUMPS = 3
_HEAD = b"/head"  # a kept head's claim in the budget: the digest and this

# A file's first read, of at most this share of a chunk and starting in its
# first block, from a chunk larger than FIRST_READ_WHOLE that no tier holds,
# takes just the pages up to its end from the backend (time to first byte);
# they are kept (HEADS_KEPT at most, in the budget) and the chunk, when read
# again, is completed with a GET of the rest: no byte is fetched twice. A chunk
# up to FIRST_READ_WHOLE costs about one round trip whole, and is fetched whole.
FIRST_READ_SHARE = 1 / 8
FIRST_READ_WHOLE = 1 << 20
HEADS_KEPT = 16

# At most this many fetched chunks wait to be written to the SSD.
WRITE_BEHIND_CHUNKS = 8

# Chunks a random reader took a range of from a peer, remembered (see
# `Reader._touched`); past this, all are forgotten at once (16 bytes a digest).
TOUCHED_KEPT = 16384

# Chunk keys remembered, so that reads of a chunk read before do not hash its
# key again: the digest is ~1 us of a ~5 us MEM hit.
KEYS_KEPT = 4096

# Chunks remembered that were loaded for this reader and not yet read in full
# (see `Reader._origins`); past this, the oldest is forgotten.
ORIGINS_KEPT = 4096
# What has been read of such a chunk is kept page by page: the kernel reads
# whole pages, but in requests of any number of them, so a coarser part can be
# read in two requests, and the chunk taken for read in full after the first.
ORIGIN_PAGE = 4096

# Chunks loaded for readers are held until read in full (see `Reader._held`):
# at most 4 x --read-ahead of them (twice what may be in flight ahead: the
# read-ahead of several streams, some of it abandoned) plus this many, for the
# readers' own fetches.
HELD_SPARE = 4
# A held chunk no read has touched for this long is taken for abandoned (a reader
# that stopped or jumped) and let go.
HELD_SECONDS = 30.0


class _Flight:
    """One chunk fetch in progress; followers wait on `done` and share the outcome."""

    __slots__ = ("done", "data", "source", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: Buffer | None = None
        self.source = ""
        self.error: BaseException | None = None


@dataclasses.dataclass
class ReadStream:
    """Per open file: where the last read ended, to recognise sequential reads."""

    next_offset: int = 0
    reads: int = 0
    sequential_reads: int = 0
    jumps: int = 0  # non-sequential reads in a row
    ahead_until: int = 0  # first chunk index not yet scheduled for read-ahead (never lowered)


class Reader:
    """Serves byte ranges of object versions from the chunk tiers.

    Args:
        tiers: the tiers to ask, fastest first; only tiers that are on (a MEM
            tier of capacity 0 is left out, not passed).
        nursery: where read-ahead and SSD write-behind tasks run.
        dataset: the dataset's name, for the `dataset` label of its metrics.
        budget: the daemon's chunk budget (--mem-size), which every chunk this
            reader fetches, holds or writes behind is claimed in; by default the
            memory tier's, or none (unbounded) without one.
    """

    def __init__(
        self,
        tiers: Sequence[ChunkTier],
        backend: Backend,
        chunk_size: int,
        read_ahead: int,
        nursery: trio.Nursery,
        dataset: str = "",
        budget: MemoryBudget | None = None,
    ):
        self.tiers = list(tiers)
        self.dataset = dataset
        self.backend = backend
        self.chunk_size = chunk_size
        top = self.tiers[0] if self.tiers else None
        self._memory = top if top is not None and top.medium == "memory" else None
        # Asked inside a flight, in order: all but the memory tier, asked before it.
        self._io_tiers = self.tiers[1:] if self._memory is not None else self.tiers
        self._ranged = [t for t in self.tiers if t.medium == "disk"]
        self._peers = any(t.medium == "network" for t in self.tiers)
        if budget is None:
            budget = getattr(self._memory, "budget", None) or MemoryBudget(1 << 62)
        self.budget = budget
        # Read-ahead hands chunks to the reader through a local tier; with none there
        # is nowhere to keep them, and reading ahead would only fetch everything twice.
        self.read_ahead = read_ahead if any(t.medium != "network" for t in self.tiers) else 0
        self._nursery = nursery
        self._flights: dict[bytes, _Flight] = {}
        # (id(obj), index) -> key. Each entry holds its ObjectId, so its id cannot
        # be reused for another object while the entry is here.
        self._keys: dict[tuple[int, int], ChunkKey] = {}
        # Read-ahead that cannot start at once is skipped, not queued: it must never
        # pile up memory or backend slots ahead of real reads.
        self._ahead_slots = trio.Semaphore(max(2 * read_ahead, 1))
        # Chunks waiting for the SSD hold memory outside the MEM tier's budget:
        # when the disk falls behind, readers wait for a slot instead.
        self._write_slots = trio.Semaphore(WRITE_BEHIND_CHUNKS)
        # Chunks a random reader read once, by a range from a peer. The second read
        # of one loads it whole, into MEM: a chunk read twice is likely read
        # again, and one 4 MiB answer costs both ends less than ~30 ranges (the
        # bench: the whole chunk beats range-per-read as soon as a file's chunks
        # are read a few times each). A chunk read once, the rule over a data set
        # much bigger than MEM, costs 4 KiB, not 4 MiB.
        self._touched: set[bytes] = set()
        # digest -> (the chunk's first blocks, as a file's first read fetched them;
        # that read's start and end): see FIRST_READ_SHARE.
        self._heads: OrderedDict[bytes, tuple[Buffer, int, int]] = OrderedDict()
        # Where each chunk this reader had loaded came from, and which of its
        # pages no read has returned yet: digest -> [source, bitmask of unread
        # pages, the chunk's length]. Hit ratios count what a cache held before
        # anyone asked: a chunk read ahead from the backend (or brought whole for
        # a read of part of it) is found in MEM by the reads that follow, but
        # their bytes came from the backend the first time they are read. And a
        # chunk is held (`_held`) until its last page is read.
        self._origins: dict[bytes, list] = {}
        # Chunks loaded from the backend (or a peer) for this reader, held until
        # read in full: digest -> [data, source, when last read, read ahead]. A tier may not
        # keep a chunk (the SSD's admission policy did not admit it, or evicted
        # it before its reader came): the reader must still get it, not fetch it
        # again. Read-ahead stops where this is full (`_room_to_hold`), so it
        # never runs further ahead than can be held. The last item: read ahead.
        self._held: OrderedDict[bytes, list] = OrderedDict()
        self._held_max = 4 * self.read_ahead + HELD_SPARE
        # Demand reads take room from held chunks when MEM has none left to give.
        budget.add_reclaimer(self._give_up_held, cache=False)
        # Per-dataset counters, plain ints (a prometheus inc costs a lock):
        # `metrics.ReaderStats` reads them at scrape time.
        # source -> [bytes returned, chunk reads served], by where they truly came from.
        self.reads = {source: [0, 0] for source in [t.name for t in self.tiers] + ["backend"]}
        # READ_BYTES children, bound once: this runs on every read.
        self._read_bytes = {source: metrics.read_bytes(source) for source in self.reads}
        # Fetches waiting on a tier below MEM or on the backend.
        self.in_flight = dict.fromkeys([t.name for t in self._io_tiers] + ["backend"], 0)
        metrics.track_reader(self)

    def _key(self, obj: ObjectId, index: int) -> ChunkKey:
        key = self._keys.get((id(obj), index))
        if key is None:
            if len(self._keys) >= KEYS_KEPT:
                self._keys.clear()
            key = self._keys[(id(obj), index)] = chunk_key(obj, self.chunk_size, index)
        return key

    def _ranged_holder(self, digest: bytes) -> ChunkTier | None:
        for tier in self._ranged:
            if digest in tier:
                return tier
        return None

    async def read(self, obj: ObjectId, offset: int, size: int, stream: ReadStream | None = None) -> Buffer:
        """Bytes [offset, offset+size) of `obj`, short at EOF.

        Raises:
            BackendError: a chunk could not be fetched after retries.
        """
        spans = hotpath.chunk_spans(offset, size, obj.size, self.chunk_size)
        if not spans:
            return b""
        # A file's first read (an open to read a header, a byte): see FIRST_READ_SHARE.
        # Off with read-ahead, and with peers (the owner answers a range).
        opening = (
            stream is not None and not stream.reads and self.read_ahead > 0 and not self._peers
            and size <= FIRST_READ_SHARE * self.chunk_size
        )
        if stream is not None:
            stream.reads += 1
            self._note_access(obj, stream, offset, offset + size, spans[-1][0])
        # Random readers (and every reader without a memory tier above the SSD)
        # take just the blocks they need from the SSD; sequential readers promote whole chunks.
        randomly = stream is not None and stream.sequential_reads < 2
        partial = bool(self._ranged) and (self._memory is None or randomly)
        # A reader that keeps jumping: misses take only the blocks they need from
        # the backend. One jump is not enough: several sequential readers of one
        # file share the page cache, so each one's requests skip ahead now and
        # then, and must not cost extra GETs. With peers, they take them from the
        # chunk's owner (protocol v4), never from the backend: the owner fetches
        # each chunk once for the whole cluster.
        jumped = stream is not None and stream.jumps >= RANDOM_AFTER_JUMPS
        if not partial:
            for index, _, _ in spans[1:]:
                # A read across chunks: fetch the later ones while we wait for the first.
                self._start_prefetch(self._key(obj, index))
        memory = self._memory
        origins = self._origins
        parts = []
        held = self._held
        for index, start, end in spans:
            key = self._key(obj, index)
            part = None
            if held and (entry := held.get(key.digest)) is not None:
                part = memoryview(entry[0])[start:end]
                source = entry[1]
                entry[2] = trio.current_time()
            elif partial or jumped or (opening and key.length > FIRST_READ_WHOLE):
                digest = key.digest
                # Only a chunk that no tier holds whole and no fetch is bringing can be read in part.
                if not ((memory is not None and digest in memory) or digest in self._flights):
                    holder = self._ranged_holder(digest) if partial else None
                    if holder is not None:
                        part = await holder.get_range(key, start, end)
                        source = holder.name
                    if part is None and (jumped or opening) and self._ranged_holder(digest) is None:
                        if self._peers:
                            if digest not in self._touched or self._memory is None:
                                part, source = await self._peer_range(key, start, end)
                        elif jumped:
                            part = await self._backend_range(key, start, end)
                            source = "backend"
                        elif start < hotpath.BLOCK_SIZE and digest not in self._heads:
                            part = await self._backend_head(key, start, end)
                            source = "backend"
            if part is None:
                chunk, source = await self._chunk(key, for_reader=True)
                part = memoryview(chunk)[start:end]
            parts.append(part)
            if origins and key.digest in origins:  # `_count` inlined below: most reads are MEM hits
                self._count_first_read(key.digest, start, end, source)
            else:
                self._read_bytes[source].inc(end - start)
                counts = self.reads[source]
                counts[0] += end - start
                counts[1] += 1
        return hotpath.assemble(parts)

    def _count(self, source: str, n: int, reads: int = 1) -> None:
        self._read_bytes[source].inc(n)
        counts = self.reads[source]
        counts[0] += n
        counts[1] += reads

    def _count_first_read(self, digest: bytes, start: int, end: int, source: str) -> None:
        """Count a read of a chunk loaded for this reader: the pages no read has
        returned yet count under the chunk's origin, the rest under `source`.

        Only the pages the read returns in full are marked read (and the chunk's
        short last page, by a read to its end): the chunk must not be let go
        while a byte of it is still to be read. Exact for the kernel's reads,
        which are page-aligned; a read that is not counts its bytes in pages it
        returns only part of under `source`."""
        origin = self._origins[digest][0]
        new, hi = self._mark_read(digest, start, end)
        if not new:
            self._count(source, end - start)
            return
        page = ORIGIN_PAGE
        first = new.bit_count() * page
        if hi * page > end and new >> (hi - 1):
            first -= hi * page - end  # the chunk's short last page
        self._count(origin, first)
        if end - start - first:
            self._count(source, end - start - first, reads=0)

    def _mark_read(self, digest: bytes, start: int, end: int) -> tuple[int, int]:
        """Mark the pages a read of [start, end) returns in full as read (see
        `_count_first_read`); the chunk is let go once all are.

        Returns:
            (those of them no read had returned before, as a bitmask; the page after the last).
        """
        entry = self._origins[digest]
        page = ORIGIN_PAGE
        lo = -(-start // page)
        hi = -(-end // page) if end >= entry[2] else end // page
        new = entry[1] & (((1 << (hi - lo)) - 1) << lo) if hi > lo else 0
        entry[1] ^= new
        if new and not entry[1]:
            del self._origins[digest]
            self._let_go(digest)  # read in full: the tiers have it, or it was read once
        return new, hi

    async def _backend_range(self, key: ChunkKey, start: int, end: int) -> memoryview | None:
        """A random read of an uncached chunk: GET just the blocks it needs now (a
        4 KiB read must not wait for 4 MiB), and fetch the whole chunk in the
        background if a read-ahead slot is free, so the data still gets cached.
        None if the blocks would be the whole chunk anyway."""
        block = hotpath.BLOCK_SIZE
        lo, hi = start // block * block, min(-(-end // block) * block, key.length)
        if hi - lo >= key.length:
            return None  # the whole chunk anyway: fetch it the usual way, once
        base = key.index * self.chunk_size
        self.in_flight["backend"] += 1
        try:
            data = await self.backend.fetch(key.obj, base + lo, base + hi)
        finally:
            self.in_flight["backend"] -= 1
        self._start_prefetch(key, ahead=True)
        return memoryview(data)[start - lo : end - lo]

    async def _backend_head(self, key: ChunkKey, start: int, end: int) -> memoryview | None:
        """A file's first read of an uncached chunk: GET the pages from the chunk's
        start to the read's end (no more: the first byte is what is waited for), and
        keep them, to complete the chunk with when it is read again (`_load_claimed`).
        None if that would be the whole chunk, or the budget has no room for read-ahead."""
        hi = min(-(-end // ORIGIN_PAGE) * ORIGIN_PAGE, key.length)
        if hi >= key.length or not self.budget.try_claim(key.digest + _HEAD, hi, ahead=True):
            return None
        base = key.index * self.chunk_size
        self.in_flight["backend"] += 1
        try:
            data = await self.backend.fetch(key.obj, base, base + hi)
        except BaseException:
            self.budget.release(key.digest + _HEAD)
            raise
        finally:
            self.in_flight["backend"] -= 1
        heads = self._heads
        if key.digest in heads:  # another first read got there first
            self.budget.release(key.digest + _HEAD)
        else:
            heads[key.digest] = (data, start, end)
            while len(heads) > HEADS_KEPT:
                self.budget.release(heads.popitem(last=False)[0] + _HEAD)
        return memoryview(data)[start:end]

    async def _peer_range(self, key: ChunkKey, start: int, end: int) -> tuple[Buffer | None, str]:
        """A random read of a chunk no local tier holds: just its bytes, from the
        chunk's owner; nothing is kept (the owner holds the chunk). (None, "") if
        no peer served it: the chunk is then loaded whole, as any miss."""
        for tier in self._io_tiers:
            if tier.medium == "network":
                self.in_flight[tier.name] += 1
                try:
                    part = await tier.get_range(key, start, end)
                finally:
                    self.in_flight[tier.name] -= 1
                if part is not None:
                    touched = self._touched
                    if len(touched) >= TOUCHED_KEPT:
                        touched.clear()
                    touched.add(key.digest)
                    return part, tier.name
        return None, ""

    def _note_access(self, obj: ObjectId, stream: ReadStream, start: int, end: int, last_index: int) -> None:
        # The kernel's own read-ahead sends several requests of one sequential
        # reader at once, and they arrive out of order: a read near the last
        # position still counts as sequential.
        window = self.chunk_size
        if stream.next_offset - window <= start <= stream.next_offset + window:
            stream.sequential_reads += 1
            stream.jumps = 0
        else:
            stream.sequential_reads = 0
            stream.jumps += 1
            # `ahead_until` stays: after a jump forward, reading ahead starts past the
            # read anyway. A jump back is mostly the kernel filling a hole it left
            # (it skips read-ahead while FUSE is congested) behind its furthest read:
            # the chunks after the hole were loaded for this stream, maybe read in
            # full and let go already, and read ahead again they were fetched twice.
        stream.next_offset = max(stream.next_offset, end) if stream.sequential_reads else end
        if stream.sequential_reads < 2 or not self.read_ahead:
            return
        n_chunks = -(-obj.size // self.chunk_size)
        first = max(last_index + 1, stream.ahead_until)
        last = min(last_index + self.read_ahead, n_chunks - 1)
        for index in range(first, last + 1):
            if not self._start_prefetch(self._key(obj, index), ahead=True):
                return  # retry these next time round
            stream.ahead_until = index + 1

    def _start_prefetch(self, key: ChunkKey, ahead: bool = False) -> bool:
        digest = key.digest
        if digest in self._flights or digest in self._held:
            return True
        top = self.tiers[0] if self.tiers else None
        if top is not None and digest in top:
            # Already where it would go. Off memory, loading it would only read
            # it and drop it: have the tier read it ahead instead (the SSD asks
            # the kernel to read the file into the page cache).
            if ahead and top is not self._memory:
                self._nursery.start_soon(top.will_need, key)
            return True
        if ahead:
            if not self._room_to_hold():
                return False
            try:
                self._ahead_slots.acquire_nowait()
            except trio.WouldBlock:
                return False
            # Room in the budget now, or no read-ahead: it must not wait, nor take
            # room demand reads need.
            if not self.budget.try_claim(digest, key.length, ahead=True):
                self._ahead_slots.release()
                metrics.READAHEAD_SKIPPED.inc()
                return False
            metrics.READAHEAD_CHUNKS.inc()
        self._nursery.start_soon(self._prefetch, key, ahead)
        return True

    async def _prefetch(self, key: ChunkKey, ahead: bool) -> None:
        try:
            await self._chunk(key, for_reader=True)
            if ahead and (entry := self._held.get(key.digest)) is not None:
                entry[3] = True  # counts against read-ahead until read
        except BackendError as e:
            # The reader that needs this chunk will fetch it again and report the error.
            log.debug("prefetch of %s chunk %d failed: %s", key.obj.path, key.index, e)
        finally:
            if ahead:
                self.budget.release(key.digest)
                self._ahead_slots.release()

    def load_ahead(self, obj: ObjectId, index: int = 0) -> bool:
        """Start loading a chunk no read asked for yet, as read-ahead does (only
        while the budget has room for read-ahead; held for this node's readers).
        Never checkpoints.

        Returns:
            False if there was no room: nothing was started.
        """
        return self._start_prefetch(self._key(obj, index), ahead=True)

    async def chunk(self, obj: ObjectId, index: int) -> tuple[Buffer, str]:
        """One whole chunk, from the fastest tier that has it; see `_chunk`.

        For others (peers asking this node): a chunk it loads counts as held
        when this node's own readers come to it."""
        return await self._chunk(self._key(obj, index))

    def holds(self, digest: bytes) -> bool:
        """Whether a local tier (MEM or SSD, not the peers) holds the chunk now."""
        return any(digest in tier for tier in self.tiers if tier.medium != "network")

    async def warm(self, obj: ObjectId, index: int) -> bool:
        """`warm_run` of one chunk: whether a local tier held it already."""
        return (await self.warm_run(obj, index, 1))[0]

    async def warm_run(self, obj: ObjectId, index: int, count: int) -> list[bool]:
        """Have chunks index .. index + count - 1 of `obj` in the local tiers, for
        warm-up; nothing is returned. Checkpoints.

        With an SSD tier they go there only: each run of consecutive missing chunks
        is fetched with one backend request straight into the tier's write buffers
        (`DiskTier.fill`), never into MEM, so a warm-up neither pushes hot chunks
        out of memory nor pays a copy per chunk, and makes fewer, larger requests.
        Without one, each is loaded as a read would (into MEM). One fetch per
        chunk, shared with readers.

        Returns:
            For each chunk, whether a local tier held it already.
        Raises:
            BackendError: a fetch failed.
        """
        keys = [self._key(obj, i) for i in range(index, index + count)]
        cached = [self.holds(k.digest) for k in keys]
        disk = self._ranged[0] if self._ranged else None
        if disk is None:
            for key, held in zip(keys, cached):
                if not held:
                    await self._chunk(key)
            return cached
        longest = disk.fill_run_chunks(self.chunk_size)
        run: list[ChunkKey] = []
        for key, held in zip(keys, cached):
            if not held:
                run.append(key)
            if run and (held or len(run) == longest or key is keys[-1]):
                await self._fill(disk, run)
                run = []
        return cached

    async def _fill(self, disk: ChunkTier, keys: list[ChunkKey]) -> None:
        """Fetch consecutive chunks into the SSD with one request, as one flight each."""
        if len(keys) > 1 and any(k.digest in self._flights or self.holds(k.digest) for k in keys):
            for key in keys:  # changed meanwhile (a reader came): chunk by chunk
                await self._fill(disk, [key])
            return
        key = keys[0]
        if self.holds(key.digest):
            return
        if key.digest in self._flights:
            await self._chunk(key)  # a reader is fetching it: share that fetch
            return
        flights = [self._flights.setdefault(k.digest, _Flight()) for k in keys]
        try:
            start = key.index * self.chunk_size
            self.in_flight["backend"] += 1
            try:
                held = await disk.fill(keys, functools.partial(self.backend.fetch_into, key.obj, start))
            finally:
                self.in_flight["backend"] -= 1
        except BaseException as e:
            error = None
            if isinstance(e, BackendError):
                error = e
            elif not isinstance(e, trio.Cancelled):
                error = BackendError(f"fetch of {key.obj.path} failed ({type(e).__name__})")
            for flight in flights:
                flight.error = error
            raise
        finally:
            # Readers that waited find no data in the flight: they look in the tiers
            # again, where the chunk is now, or fetch it themselves.
            for k, flight in zip(keys, flights):
                del self._flights[k.digest]
                flight.done.set()
        for k, ok in zip(keys, held):
            if not ok:
                await self._chunk(k)  # no room on the SSD (pinned chunks fill it): keep it as a read would

    async def _chunk(self, key: ChunkKey, for_reader: bool = False) -> tuple[Buffer, str]:
        """One whole chunk, from the fastest tier that has it.

        Args:
            for_reader: loaded for this reader's reads (theirs or read-ahead):
                remember where from, for `read` to count its first reads there.
        Returns:
            (the chunk's bytes, the name of the tier or "backend" it came from).
        Raises:
            BackendError: the backend fetch failed; every waiter sees the same error.
        """
        memory = self._memory
        if memory is not None:
            data = await memory.get(key)  # never checkpoints
            if data is not None:
                return data, memory.name
        digest = key.digest
        if (entry := self._held.get(digest)) is not None:
            return entry[0], entry[1]  # one buffer per chunk: the budget counts each once
        while (flight := self._flights.get(digest)) is not None:
            metrics.SINGLEFLIGHT_WAITS.inc()
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.data is not None:
                return flight.data, flight.source
            # Its leader was cancelled (a peer that asked went away): the fetch is ours now.
        flight = self._flights[digest] = _Flight()
        try:
            flight.data, flight.source = await self._load(key, for_reader)
            return flight.data, flight.source
        except BaseException as e:
            if isinstance(e, BackendError):
                flight.error = e
            elif not isinstance(e, trio.Cancelled):
                flight.error = BackendError(f"fetch of {key.obj.path} failed ({type(e).__name__})")
            raise
        finally:
            del self._flights[digest]
            flight.done.set()

    async def _load(self, key: ChunkKey, for_reader: bool) -> tuple[Buffer, str]:
        # The buffer is claimed before it exists, and until MEM or `_held` claim it.
        await self.budget.claim(key.digest, key.length)
        try:
            return await self._load_claimed(key, for_reader)
        finally:
            self.budget.release(key.digest)

    async def _load_claimed(self, key: ChunkKey, for_reader: bool) -> tuple[Buffer, str]:
        in_flight = self.in_flight
        for tier in self._io_tiers:
            in_flight[tier.name] += 1
            try:
                data = await tier.get(key)
            finally:
                in_flight[tier.name] -= 1
            if data is not None:
                if for_reader:
                    self._note_origin(key, tier.name)
                    if tier.medium == "network":
                        self._hold(key, data, tier.name)
                await self._keep(key, data, tier)
                return data, tier.name
        start = key.index * self.chunk_size
        head = self._heads.pop(key.digest, None)
        if head is not None:
            self.budget.release(key.digest + _HEAD)
        in_flight["backend"] += 1
        try:
            if head is None:
                fetched = await self.backend.fetch(key.obj, start, start + key.length)
            else:
                # Completed from a first read's blocks: the rest only.
                fetched = hotpath.empty_buffer(key.length)
                have = len(head[0])
                fetched[:have] = head[0]
                with memoryview(fetched) as view:
                    await self.backend.fetch_into(key.obj, start + have, [view[have:]])
        finally:
            in_flight["backend"] -= 1
        if for_reader:
            self._note_origin(key, "backend")
            if head is not None:
                self._mark_read(key.digest, head[1], head[2])  # that read had these pages
            self._hold(key, fetched, "backend")
        await self._keep(key, fetched, None)
        return fetched, "backend"

    def _room_to_hold(self) -> bool:
        """Whether one more read-ahead chunk can be held until read, with those in
        flight and room left for the readers' own fetches; lets abandoned ones go."""
        held = self._held
        if held:
            expired = trio.current_time() - HELD_SECONDS
            while held and next(iter(held.values()))[2] < expired:
                self._let_go(next(iter(held)))
        in_flight = 2 * self.read_ahead - self._ahead_slots.value
        return sum(entry[3] for entry in held.values()) + in_flight < self._held_max - HELD_SPARE

    def _hold(self, key: ChunkKey, data: Buffer, source: str) -> None:
        held = self._held
        if key.digest in held or not self.budget.try_claim(key.digest, len(data)):
            return  # (claimed by its flight: never refused)
        held[key.digest] = [data, source, trio.current_time(), False]
        while len(held) > self._held_max:
            self._let_go(next(iter(held)))

    def _let_go(self, digest: bytes) -> None:
        """Stop holding a chunk (if held), and give back its claim."""
        if self._held.pop(digest, None) is not None:
            self.budget.release(digest)

    def _give_up_held(self, budget: MemoryBudget, room: int) -> None:
        """A reclaimer: let held chunks go, least recently read first, until `room`
        fits (a demand read needs it more than a chunk that may be read later)."""
        held = self._held
        while held and not budget.fits(room):
            self._let_go(min(held, key=lambda d: held[d][2]))

    def close(self) -> None:
        """Let every held chunk go and leave the budget (the dataset is removed)."""
        self.budget.remove_reclaimer(self._give_up_held)
        for digest in list(self._held):
            self._let_go(digest)
        while self._heads:
            self.budget.release(self._heads.popitem()[0] + _HEAD)

    def _note_origin(self, key: ChunkKey, source: str) -> None:
        """Remember where a chunk loaded for this reader came from, before `_keep`
        puts it where reads find it (it may checkpoint while the chunk is in MEM)."""
        origins = self._origins
        if len(origins) >= ORIGINS_KEPT:
            self._let_go(next(iter(origins)))
            del origins[next(iter(origins))]
        origins[key.digest] = [source, (1 << -(-key.length // ORIGIN_PAGE)) - 1, key.length]

    async def _keep(self, key: ChunkKey, data: Buffer, found_in: ChunkTier | None) -> None:
        """Copy a chunk into the tiers above `found_in` (None: it came from the backend).

        Nothing is pushed to peers, and a chunk from a peer is kept in memory
        only: its owner holds it on its SSD already.
        """
        from_peer = found_in is not None and found_in.medium == "network"
        held_above = False  # whether a tier above holds the chunk now
        for tier in self.tiers:
            if tier is found_in:
                return
            if tier.medium == "memory":
                await tier.put(key, data)  # never checkpoints
                held_above = True
            elif tier.medium == "network" or from_peer:
                continue
            elif held_above:
                # Write-behind: readers find the chunk above meanwhile, so the
                # reader does not wait for the SSD, unless it is far behind.
                await self._write_slots.acquire()
                claimed = self.budget.try_claim(key.digest, len(data))  # claimed by its flight: never refused
                self._nursery.start_soon(self._write_behind, tier, key, data, claimed)
            else:
                # Nothing above holds it: the chunk must be here before the flight
                # ends, or a read-ahead chunk would be fetched again by its reader.
                await tier.put(key, data)
                held_above = True

    async def _write_behind(self, tier: ChunkTier, key: ChunkKey, data: Buffer, claimed: bool) -> None:
        try:
            await tier.put(key, data)
        finally:
            if claimed:
                self.budget.release(key.digest)
            self._write_slots.release()
