"""The reader: turns (object, offset, size) into chunks and walks the tiers.

MEM → SSD → peer (the chunk's owner on the ring) → backend, with one fetch per chunk at a time (single-flight),
sequential-read detection that fetches the next chunks ahead in the nursery,
and a bound on how much read-ahead may be in flight at once.
"""

from __future__ import annotations

import dataclasses
import logging

import trio

from cachefs import hotpath, metrics
from cachefs.backend import Backend
from cachefs.cache.disk import DiskTier
from cachefs.cache.mem import MemTier
from cachefs.errors import BackendError
from cachefs.objects import Buffer, ObjectId, chunk_digest
from cachefs.peer.client import PeerTier

log = logging.getLogger(__name__)


# A reader counts as random (its misses fetch just the blocks they need) after
# this many non-sequential reads in a row.
RANDOM_AFTER_JUMPS = 3

# At most this many fetched chunks wait to be written to the SSD.
WRITE_BEHIND_CHUNKS = 8


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
    sequential_reads: int = 0
    jumps: int = 0  # non-sequential reads in a row
    ahead_until: int = 0  # first chunk index not yet scheduled for read-ahead


class Reader:
    """Serves byte ranges of object versions from the chunk tiers.

    Args:
        nursery: where read-ahead and SSD write-behind tasks run.
        peers: the peer tier, asked after the local tiers and before the backend.
    """

    def __init__(
        self,
        mem: MemTier,
        disk: DiskTier | None,
        backend: Backend,
        chunk_size: int,
        read_ahead: int,
        nursery: trio.Nursery,
        peers: PeerTier | None = None,
    ):
        self.mem = mem
        self.disk = disk
        self.peers = peers
        self.backend = backend
        self.chunk_size = chunk_size
        # Read-ahead hands chunks to the reader through a tier; with none there is
        # nowhere to keep them, and reading ahead would only fetch everything twice.
        self.read_ahead = read_ahead if mem.capacity or disk is not None else 0
        self._nursery = nursery
        self._flights: dict[bytes, _Flight] = {}
        # Read-ahead that cannot start at once is skipped, not queued: it must never
        # pile up memory or backend slots ahead of real reads.
        self._ahead_slots = trio.Semaphore(max(2 * read_ahead, 1))
        # Chunks waiting for the SSD hold memory outside the MEM tier's budget:
        # when the disk falls behind, readers wait for a slot instead.
        self._write_slots = trio.Semaphore(WRITE_BEHIND_CHUNKS)

    def _chunk_len(self, obj: ObjectId, index: int) -> int:
        return min(self.chunk_size, obj.size - index * self.chunk_size)

    async def read(self, obj: ObjectId, offset: int, size: int, stream: ReadStream | None = None) -> Buffer:
        """Bytes [offset, offset+size) of `obj`, short at EOF.

        Raises:
            BackendError: a chunk could not be fetched after retries.
        """
        spans = hotpath.chunk_spans(offset, size, obj.size, self.chunk_size)
        if not spans:
            return b""
        if stream is not None:
            self._note_access(obj, stream, offset, offset + size, spans[-1][0])
        # Random readers (and every reader without a MEM tier) take just the
        # blocks they need from the SSD; sequential readers promote whole chunks.
        randomly = stream is not None and stream.sequential_reads < 2
        partial = self.disk is not None and (not self.mem.capacity or randomly)
        # A reader that keeps jumping: misses take only the blocks they need from
        # the backend. One jump is not enough: several sequential readers of one
        # file share the page cache, so each one's requests skip ahead now and
        # then, and must not cost extra GETs. Not with peers: there the chunk's
        # owner fetches it once for the whole cluster.
        jumped = stream is not None and stream.jumps >= RANDOM_AFTER_JUMPS and self.peers is None
        if not partial:
            for index, _, _ in spans[1:]:
                # A read across chunks: fetch the later ones while we wait for the first.
                self._start_prefetch(obj, index)
        parts = []
        for index, start, end in spans:
            digest = chunk_digest(obj, self.chunk_size, index)
            # Only a chunk that no tier holds whole and no fetch is bringing can be read in part.
            whole = digest in self.mem or digest in self._flights
            part = None
            if partial and not whole and digest in self.disk:
                part = await self.disk.get_range(digest, start, end, self._chunk_len(obj, index))
                source = "disk"
            if part is None and jumped and not whole and (self.disk is None or digest not in self.disk):
                part = await self._backend_range(obj, index, start, end)
                source = "backend"
            if part is None:
                chunk, source = await self._chunk(obj, index, digest)
                part = memoryview(chunk)[start:end]
            parts.append(part)
            metrics.read_bytes(source).inc(end - start)
        return hotpath.assemble(parts)

    async def _backend_range(self, obj: ObjectId, index: int, start: int, end: int) -> memoryview | None:
        """A random read of an uncached chunk: GET just the blocks it needs now (a
        4 KiB read must not wait for 4 MiB), and fetch the whole chunk in the
        background if a read-ahead slot is free, so the data still gets cached.
        None if the blocks would be the whole chunk anyway."""
        block = hotpath.BLOCK_SIZE
        lo, hi = start // block * block, min(-(-end // block) * block, self._chunk_len(obj, index))
        if hi - lo >= self._chunk_len(obj, index):
            return None  # the whole chunk anyway: fetch it the usual way, once
        base = index * self.chunk_size
        data = await self.backend.fetch(obj, base + lo, base + hi)
        self._start_prefetch(obj, index, ahead=True)
        return memoryview(data)[start - lo : end - lo]

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
            stream.ahead_until = 0
        stream.next_offset = max(stream.next_offset, end) if stream.sequential_reads else end
        if stream.sequential_reads < 2 or not self.read_ahead:
            return
        n_chunks = -(-obj.size // self.chunk_size)
        first = max(last_index + 1, stream.ahead_until)
        last = min(last_index + self.read_ahead, n_chunks - 1)
        for index in range(first, last + 1):
            if not self._start_prefetch(obj, index, ahead=True):
                return  # retry these next time round
            stream.ahead_until = index + 1

    def _start_prefetch(self, obj: ObjectId, index: int, ahead: bool = False) -> bool:
        digest = chunk_digest(obj, self.chunk_size, index)
        if digest in self._flights or digest in self.mem:
            return True
        if not self.mem.capacity and self.disk is not None and digest in self.disk:
            # Already where it would go: loading it would only read it and drop
            # it. Have the kernel read the file ahead into the page cache instead.
            if ahead:
                self._nursery.start_soon(self.disk.will_need, digest)
            return True
        if ahead:
            try:
                self._ahead_slots.acquire_nowait()
            except trio.WouldBlock:
                return False
            metrics.READAHEAD_CHUNKS.inc()
        self._nursery.start_soon(self._prefetch, obj, index, ahead)
        return True

    async def _prefetch(self, obj: ObjectId, index: int, ahead: bool) -> None:
        try:
            await self.chunk(obj, index)
        except BackendError as e:
            # The reader that needs this chunk will fetch it again and report the error.
            log.debug("prefetch of %s chunk %d failed: %s", obj.path, index, e)
        finally:
            if ahead:
                self._ahead_slots.release()

    async def chunk(self, obj: ObjectId, index: int) -> tuple[Buffer, str]:
        """One whole chunk, from the fastest tier that has it; see `_chunk`."""
        return await self._chunk(obj, index, chunk_digest(obj, self.chunk_size, index))

    async def _chunk(self, obj: ObjectId, index: int, digest: bytes) -> tuple[Buffer, str]:
        """One whole chunk, from the fastest tier that has it.

        Returns:
            (the chunk's bytes, the name of the tier or "backend" it came from).
        Raises:
            BackendError: the backend fetch failed; every waiter sees the same error.
        """
        data = self.mem.get(digest)
        if data is not None:
            return data, self.mem.name
        flight = self._flights.get(digest)
        if flight is not None:
            metrics.SINGLEFLIGHT_WAITS.inc()
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            return flight.data, flight.source
        flight = self._flights[digest] = _Flight()
        try:
            flight.data, flight.source = await self._load(obj, index, digest)
            return flight.data, flight.source
        except BaseException as e:
            flight.error = e if isinstance(e, BackendError) else BackendError(f"fetch of {obj.path} cancelled")
            raise
        finally:
            del self._flights[digest]
            flight.done.set()

    async def _load(self, obj: ObjectId, index: int, digest: bytes) -> tuple[Buffer, str]:
        length = self._chunk_len(obj, index)
        if self.disk is not None:
            data = await self.disk.get(digest, length)
            if data is not None:
                self.mem.put(digest, data)
                return data, self.disk.name
        if self.peers is not None:
            data = await self.peers.get(obj, self.chunk_size, index, digest, length)
            if data is not None:
                # Kept in MEM only: the owner holds it on its SSD already.
                self.mem.put(digest, data)
                return data, self.peers.name
        start = index * self.chunk_size
        fetched = await self.backend.fetch(obj, start, start + length)
        self.mem.put(digest, fetched)
        if self.disk is not None:
            if self.mem.capacity:
                # Write-behind: the reader does not wait for the SSD, unless it is far behind.
                await self._write_slots.acquire()
                self._nursery.start_soon(self._write_behind, digest, fetched)
            else:
                # No MEM tier: the chunk must be on the SSD before the flight ends,
                # or a read-ahead chunk would be fetched again by its reader.
                await self.disk.put(digest, fetched)
        return fetched, "backend"

    async def _write_behind(self, digest: bytes, data: Buffer) -> None:
        assert self.disk is not None
        try:
            await self.disk.put(digest, data)
        finally:
            self._write_slots.release()
