"""The SSD tier: one file per chunk under --cache-dir, bounded by --cache-size
and --free-space-ratio.

Layout: `DIR/chunks/ab/ab12...ef` (32 hex digits of the key digest). Each file
is a header (magic, length, key digest, an xxh3 checksum per 128 KiB block)
and the data. Files are written to a temp file and renamed into place, and
only verified blocks are ever served: a random read verifies the blocks it
reads, a whole-chunk read all of them.
We do not fsync: a file torn by a crash fails its length or checksum check and
is dropped, which is the same outcome as never having cached it.

The directory has one owner: `load` takes an exclusive flock on `DIR/lock`
(holding the owner's pid) before it scans, so a second process pointed at it
fails (CacheDirInUse) instead of evicting, or deleting the temp files of,
chunks that are not its own. The kernel drops the lock when the owner exits.

Files are written with O_DIRECT where the file system takes it: on our VMs a
buffered write of a new 4 MiB file costs ~25x the CPU of a direct one (fresh
page-cache pages and their first touch), and dirty page cache would count
against a container's memory limit. Warm-up's writes are the exception (see
`_write_filled`): there the disk's latency, not CPU, was the limit. Reads stay buffered, so a hot chunk file
also lives in the page cache, unless the tier drops what it read (`drop_pages`,
a worker's default: see `DiskTier`).

Warm-up writes without a copy of ours (`fill`): the backend receives the chunks
straight into reused buffers with room for the header before each, and those
buffers are written as they are, buffered (see `_write_filled`).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import threading
import time
from collections import OrderedDict
from collections import Counter
from typing import Awaitable, Callable, ClassVar

import trio

from cachefs import hotpath, metrics
from cachefs.budget import MemoryBudget
from cachefs.cache.policy import ADMISSIONS, make_index
from cachefs.threads import BlockingThreads
from cachefs.errors import CacheDirInUse, ChunkCorrupt
from cachefs.objects import SOURCE_TAG_SIZE, Buffer, ChunkKey, Medium, source_tag

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[0-9a-f]{32}$")
_DIR_RE = re.compile(r"^[0-9a-f]{2}$")


# Bytes each checksum of a chunk file we write covers. A range read whose blocks
# are in the page cache reads and verifies only the blocks it needs, and on our
# VMs the kernel's copy out of the page cache is most of a hit's cost: preadv of
# 128 KiB from the page cache ~22 us, of 32 KiB ~7.5 us, of 4 KiB ~3 us (xxh3 of
# 128 KiB: ~3 us). Files keep their block size in the header, so files written with
# another one stay readable.
CHECKSUM_BLOCK = 32 << 10
# What a range read that must wait for the disk reads at least: 128 KiB, aligned,
# all verified. It fills the page cache as fast as 128 KiB checksum blocks did
# (smaller disk reads were tried, 16 KiB: the page cache fills 8 x slower, and
# random 4 KiB O_DIRECT reads after a page cache drop ran at 0.66 x the rate).
_FILL_SPAN = 128 << 10
# A chunk file's first bytes, read once to parse its header: enough for the
# header in the smallest block size a file may have (4 KiB), and at least 8 KiB
# (all of a small chunk, with its data).
_HEAD_PROBE = 8192
_SMALLEST_BLOCK = 4096
# Block checksums of parsed chunk headers kept for range reads (8 bytes each in
# an array, so 8 MiB: the headers of 8192 chunks of 4 MiB in 32 KiB blocks).
_LAYOUT_SUMS_KEPT = 1 << 20
# Chunk files kept open for range reads. A range read whose blocks are in the
# page cache is then served on the trio thread (preadv RWF_NOWAIT, ~8 us for
# 32 KiB) instead of by a worker thread: the two thread switches of a hop
# cost more than the read on our VMs.
_FDS_KEPT = 256
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# O_DIRECT wants the buffer, the file offset and the length aligned to the
# device's block size; a page covers every device we expect.
_DIRECT_ALIGN = mmap.PAGESIZE
# In the cache directory, next to chunks/: held by the process that owns the directory.
LOCK_FILE = "lock"
# Writes at once, each holding one aligned buffer of a chunk for as long as
# the tier lives: outside the chunk budget, a term of the memory formula (docs/configuration.md).
WRITE_THREADS = 4
# The most bytes of chunks warm-up loads (`fill`) hold at once, in aligned
# buffers, while they are fetched and written: 8 loads of 16 MiB in flight, as
# many as it takes to keep the backend busy. They are claimed in the chunk
# budget (--mem-size, less the room demand reads keep) while in use, and
# given back to the system when no fill runs.
FILL_BYTES = 128 << 20


# Where a chunk file's header names its chunk: the key's digest ends the fixed part
# (magic, format version, flags, length, block size, block count, digest).
_KEY_DIGEST_AT = hotpath.HEADER_SIZE - hotpath.KEY_DIGEST_SIZE


def file_header_size(length: int) -> int:
    """Bytes of header before `length` bytes of data in a chunk file we write."""
    return hotpath.header_size(length, CHECKSUM_BLOCK)


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _own_dir(cache_dir: str) -> int:
    """Lock `cache_dir` for this process and write our pid into the lock file.

    Returns:
        The lock file's descriptor: the lock lasts until it is closed.
    Raises:
        CacheDirInUse: another process holds the lock.
        OSError: the lock file cannot be created.
    """
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(cache_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        pid = f" (pid {owner})" if owner.isdigit() else ""
        raise CacheDirInUse(f"{cache_dir}: in use by another cachefs process{pid}") from None
    except OSError as e:
        # A file system without flock (some network ones): run, but unguarded.
        log.warning("cache directory %s: cannot lock it (%s); make sure no other process uses it", cache_dir, e.strerror)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _advise_will_need(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


class DiskTier:
    """Chunks on local disk: a `ChunkTier`. `get`, `put` and `fill` checkpoint (file
    I/O runs in threads); `get_range` need not (see `_read_range`).

    Args:
        drop_pages: after reading a chunk file, drop its pages from the page cache
            (posix_fadvise DONTNEED). For a worker: it serves each chunk to a peer,
            which keeps it in its own tiers, so the pages would rarely be read
            again, yet a container's memory limit counts them. A mount keeps them:
            its hot chunk files are read again and again, and from the page cache
            a range read is served on the trio thread (RWF_NOWAIT) without a hop.
        budget: the daemon's chunk budget, where `fill`'s buffers are claimed.
    """

    name: ClassVar[str] = "disk"
    medium: ClassVar[Medium] = "disk"

    def __init__(
        self,
        cache_dir: str,
        capacity: int,
        free_space_ratio: float,
        io_threads: int = 8,
        admission: str = ADMISSIONS[0],
        drop_pages: bool = False,
        budget: MemoryBudget | None = None,
    ):
        self.cache_dir = cache_dir
        self.root = os.path.join(cache_dir, "chunks")
        self._lock_fd: int | None = None  # while we own the directory
        self.capacity = capacity
        self.free_space_ratio = free_space_ratio
        self.used = 0  # bytes on disk, including writes in progress
        # digest -> file size, in eviction order; decides which new chunks are stored (--admission)
        self._index = make_index(admission, capacity)
        self.by_source: Counter[bytes] = Counter()  # source tag -> bytes of indexed chunks
        self.evicted_by_source: Counter[bytes] = Counter()  # source tag -> chunks evicted
        self._quotas: dict[bytes, int] = {}  # source tag -> bytes that source may hold (dataset quota)
        self._reserved: Counter[bytes] = Counter()  # source tag -> bytes of its writes in progress
        self._pins: Counter[bytes] = Counter()  # digest -> leases pinning it (held now or once written)
        self._writing: set[bytes] = set()
        self._layouts: dict[bytes, tuple] = {}  # digest -> read_layout() of its file
        self._layout_sums = 0  # checksums held in _layouts
        self._limiter = trio.CapacityLimiter(io_threads)
        # Range reads the page cache cannot answer at once: the hop on an SSD hit.
        self._range_threads = BlockingThreads(io_threads, "cachefs disk range read")
        self._write_threads = BlockingThreads(WRITE_THREADS, "cachefs disk write")
        self._direct = hasattr(os, "O_DIRECT")  # off for good after the file system refuses it
        self._aligned: list[mmap.mmap] = []  # free write buffers; at most WRITE_THREADS exist
        # digest -> an open read-only fd of its file. Readers use dup()s, so the
        # cache may close its own at any time (eviction, drop) under the lock.
        self._fds: OrderedDict[bytes, int] = OrderedDict()
        self._fds_lock = threading.Lock()
        self.drop_pages = drop_pages and hasattr(os, "posix_fadvise")
        # Dropped pages are never there for a read that must not block.
        self._nowait = bool(_NOWAIT) and not self.drop_pages
        self._budget = budget
        self._fill_buffers: list[mmap.mmap] = []  # free `fill` buffers, one per chunk of a fill
        self._fill_slots: trio.Semaphore | None = None  # chunks fills may hold: made at the first
        self._fill_lock = trio.Lock()
        self._fills = 0  # fills holding slots; their buffers are freed when none does
        metrics.CACHE_CAPACITY.labels(self.name).set(capacity)
        self._hits = metrics.CACHE_HITS.labels(self.name)
        self._misses = metrics.CACHE_MISSES.labels(self.name)
        self._rejected = metrics.CACHE_REJECTED.labels(self.name)
        self._written = metrics.CACHE_WRITTEN_BYTES.labels(self.name)

    # -- start-up -----------------------------------------------------------

    async def load(self) -> None:
        """Take the cache directory for this process, then rebuild the index from
        the files on disk, so a restarted mount stays warm.

        Raises:
            CacheDirInUse: another process owns the directory.
            OSError: the directory cannot be locked or scanned.
        """
        self._lock_fd = await trio.to_thread.run_sync(_own_dir, self.cache_dir)
        entries = await trio.to_thread.run_sync(self._scan)
        for digest, size, _ in sorted(entries, key=lambda e: e[2]):
            self._index.add(digest, size)
            self.used += size
            self.by_source[digest[:SOURCE_TAG_SIZE]] += size
        _, victims = self._claim_room(0)
        await trio.to_thread.run_sync(_unlink_all, victims)
        log.info("disk cache %s: %d chunks, %d bytes", self.root, len(self._index), self.used)
        self._publish()

    def _scan(self) -> list[tuple[bytes, int, float]]:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        entries = []
        for sub in os.scandir(self.root):
            if not (sub.is_dir(follow_symlinks=False) and _DIR_RE.match(sub.name)):
                continue
            for f in os.scandir(sub.path):
                if _NAME_RE.match(f.name) and f.name.startswith(sub.name):
                    st = f.stat(follow_symlinks=False)
                    # atime is unreliable (noatime); mtime is bumped on every hit instead.
                    entries.append((bytes.fromhex(f.name), st.st_size, st.st_mtime))
                else:
                    # Leftover temp files of a crashed writer, or anything else we did not make.
                    try:
                        os.unlink(f.path)
                    except OSError:
                        pass
        return entries

    def close(self) -> None:
        """Close the kept descriptors and give up the directory; the tier is unusable after."""
        self._range_threads.close()
        self._write_threads.close()
        with self._fds_lock:
            fds = list(self._fds.values())
            self._fds.clear()
        for fd in fds:
            os.close(fd)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the tier interface ---------------------------------------------------

    def _path(self, digest: bytes) -> str:
        name = digest.hex()
        return os.path.join(self.root, name[:2], name)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._index

    async def get(self, key: ChunkKey) -> memoryview | None:
        """The whole verified chunk, or None if absent, corrupt or of the wrong length."""
        return await self._checked_read(key.digest, self._read, key.digest, key.length)

    async def get_range(self, key: ChunkKey, start: int, end: int) -> memoryview | None:
        """Bytes [start, end) of a chunk, reading and verifying only the blocks
        they fall in (a 4 KiB random read costs one 128 KiB block, not the chunk).
        None if absent, corrupt or of the wrong length."""
        digest = key.digest
        return await self._checked_read(digest, self._read_range, digest, start, end, key.length, ranged=True)

    async def _checked_read(self, digest: bytes, read, *args, ranged: bool = False) -> memoryview | None:
        if digest not in self._index:
            self._misses.inc()
            return None
        self._index.touch(digest)
        try:
            # A range read: on this thread if the page cache holds its blocks, else on a range thread.
            data = read(*args, nowait=True) if ranged and self._nowait else None
            if data is None:
                if ranged:
                    data = await self._range_threads.run(read, *args)
                else:
                    data = await trio.to_thread.run_sync(read, *args, limiter=self._limiter)
        except (ChunkCorrupt, OSError) as e:
            reason = "corrupt" if isinstance(e, ChunkCorrupt) else "io"
            if not isinstance(e, FileNotFoundError):
                log.warning("dropping cached chunk %s: %s", digest.hex(), e)
                metrics.CACHE_ERRORS.labels(self.name, reason).inc()
            await self._drop(digest)
            self._misses.inc()
            return None
        self._hits.inc()
        return data

    def _read(self, digest: bytes, expected_len: int) -> memoryview:
        path = self._path(digest)
        with open(path, "rb", buffering=0) as f:
            buf = f.read()
            if self.drop_pages:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        data = hotpath.open_chunk(digest, buf)
        if len(data) != expected_len:
            raise ChunkCorrupt(f"length {len(data)}, expected {expected_len}")
        # Keep LRU order across restarts; a cheap metadata update.
        now = time.time()
        os.utime(path, (now, now))
        return data

    def _read_range(
        self, digest: bytes, start: int, end: int, expected_len: int, nowait: bool = False
    ) -> memoryview | None:
        """With `nowait` (on the trio thread): None unless the file is open already,
        its header parsed and the blocks in the page cache; never blocks on the disk."""
        layout = self._layouts.get(digest)
        if nowait and layout is None:
            return None
        fd = self._open_for_read(digest, cached_only=nowait)
        if fd is None:
            return None
        try:
            head = b""
            if layout is None:
                # Random readers come back to the same chunks: keep their parsed
                # headers, so a hit costs one pread instead of two.
                head = os.pread(fd, max(_HEAD_PROBE, hotpath.header_size(expected_len, _SMALLEST_BLOCK)), 0)
                length, size, offset, sums = hotpath.read_layout(digest, head, os.fstat(fd).st_size)
                layout = (length, size, offset, array.array("Q", sums))  # 8 bytes a checksum, not ~40
                self._forget_layout(digest)  # a read on another thread may have parsed it too
                if self._layout_sums + len(sums) > _LAYOUT_SUMS_KEPT:
                    self._layouts.clear()
                    self._layout_sums = 0
                self._layouts[digest] = layout
                self._layout_sums += len(sums)
            length, block_size, offset, sums = layout
            if length != expected_len:
                raise ChunkCorrupt(f"length {length}, expected {expected_len}")
            # From the page cache, just the blocks asked for; from the disk, a whole fill span.
            span = block_size if nowait else max(block_size, _FILL_SPAN)
            lo, hi = start // span * span, min(-(-end // span) * span, length)
            if offset + hi <= len(head):
                data = head[offset + lo : offset + hi]  # a small chunk: already read
            elif nowait:
                data = hotpath.empty_buffer(hi - lo)
                try:
                    if os.preadv(fd, [data], offset + lo, _NOWAIT) != hi - lo:
                        return None  # partly cached: the rest would block
                except BlockingIOError:
                    return None  # not in the page cache
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._nowait = False  # the file system cannot say "would block"
                    return None
            else:
                data = os.pread(fd, hi - lo, offset + lo)
                if self.drop_pages:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if len(data) != hi - lo:
            raise ChunkCorrupt(f"short read: {len(data)} of {hi - lo} bytes")
        hotpath.verify_blocks(sums, block_size, lo // block_size, data)
        return memoryview(data)[start - lo : end - lo]

    def _open_for_read(self, digest: bytes, cached_only: bool) -> int | None:
        """A new descriptor of the chunk's file (a dup of the kept one, so closing
        it never races with the cache); None if `cached_only` and none is kept."""
        with self._fds_lock:
            fd = self._fds.get(digest)
            if fd is not None:
                self._fds.move_to_end(digest)
                return os.dup(fd)
        if cached_only:
            return None
        fd = os.open(self._path(digest), os.O_RDONLY | os.O_CLOEXEC)
        if self.drop_pages:
            # No kernel read-ahead around the blocks read: its pages, still being read in
            # when the read returns, would be left behind by the drop (fadvise skips them).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        with self._fds_lock:
            if digest in self._index and digest not in self._fds:
                self._fds[digest] = os.dup(fd)
                if len(self._fds) > _FDS_KEPT:
                    os.close(self._fds.popitem(last=False)[1])
        return fd

    def _forget_layout(self, digest: bytes) -> None:
        layout = self._layouts.pop(digest, None)
        if layout is not None:
            self._layout_sums -= len(layout[3])

    def _forget_fd(self, digest: bytes) -> None:
        with self._fds_lock:
            fd = self._fds.pop(digest, None)
        if fd is not None:
            os.close(fd)

    async def will_need(self, key: ChunkKey) -> None:
        """Start the kernel reading a chunk's file into the page cache: read-ahead
        for readers that take their ranges straight from the SSD, at a deeper
        queue than their own requests and without daemon memory."""
        try:
            await trio.to_thread.run_sync(_advise_will_need, self._path(key.digest), limiter=self._limiter)
        except OSError:
            pass  # only a hint: a chunk evicted meanwhile is just not read ahead

    def pin(self, digests: list[bytes]) -> None:
        """Keep these chunks from eviction (those held now, and the others once written)
        until `unpin`ned as many times. A corrupt pinned chunk is still dropped."""
        for digest in digests:
            self._pins[digest] += 1
            self._index.pin(digest)
        self._publish()

    def unpin(self, digests: list[bytes]) -> None:
        for digest in digests:
            left = self._pins[digest] - 1
            if left > 0:
                self._pins[digest] = left
            else:
                self._pins.pop(digest, None)
                self._index.unpin(digest)
        self._publish()

    @property
    def pinned_bytes(self) -> int:
        """Bytes of pinned chunks held now."""
        return self._index.pinned_bytes

    def set_quota(self, source: str, limit: int | None) -> None:
        """Bound the bytes chunks of `source` may hold here (None: only the tier's cap).
        A source over a new, lower quota gives back room as its next chunks arrive."""
        tag = source_tag(source)
        if limit is None:
            self._quotas.pop(tag, None)
        else:
            self._quotas[tag] = limit

    async def put(self, key: ChunkKey, data: Buffer) -> bool:
        """Store a chunk unless present; evicts first so the cap is never exceeded.

        Returns:
            True if stored; False if already present, being written, not
            admitted (--admission) or no room.
        """
        return await self._store(key.digest, len(data), self._write, data)

    async def put_from(self, key: ChunkKey, fd: int, offset: int) -> bool:
        """As `put`, the chunk's bytes the key.length bytes of file `fd` at `offset` (a
        staged file just uploaded). In the write thread they are read straight into the
        aligned buffer the chunk file is written from: the kernel's copy is the only one,
        and the GIL is not held for it (a copy from bytes of ours into that buffer held
        it, 1 ms per chunk of 4 MiB, while FUSE requests waited).

        Raises:
            Nothing: a short read or a failed write counts as a write error (False).
        """
        return await self._store(key.digest, key.length, self._write_from, fd, offset, key.length)

    # -- the chunk of a small file being uploaded ---------------------------------------

    def reserve_unkeyed(self, tag: bytes, length: int) -> int | None:
        """Room for the one chunk (`length` bytes) of a small file of the source `tag` being
        uploaded, whose key is not known yet: its version comes with the upload's answer.
        The upload's own thread then writes it (`write_unkeyed`) right after the PUT: a hop
        to a write thread of its own cost more CPU than writing the file (0.6 ms against
        0.18 per 64 KiB chunk here), and its trio work held up the next file's requests.
        Only if it fits without evicting anything; else None (cache it with `put_from`).
        Returns the room taken, for `settle_unkeyed`."""
        size = file_header_size(length) + length
        self.used += size
        self._reserved[tag] += size
        try:
            fits = not self._over_quota(tag) and not self._over_capacity(
                self._statvfs() if self.free_space_ratio else None, 0)
        except OSError:
            fits = False
        if not fits:
            self.used -= size
            self._unreserve(tag, size)
            return None
        return size

    def write_unkeyed(self, digest: bytes, fd: int, length: int) -> bool:
        """Blocking, in the caller's thread: write chunk `digest`, the first `length` bytes of
        file `fd`, into the room `reserve_unkeyed` took. In a buffer and under a temporary
        name of its own: the write threads' buffers are theirs, and a `put` of the same chunk
        (a peer asking for it) may be writing at the same time. Returns False (logged) on
        an error."""
        try:
            self._write_from(digest, fd, 0, length, own=True)
            return True
        except OSError as e:
            log.warning("cannot write chunk %s to %s: %s", digest.hex(), self.root, e)
            metrics.CACHE_ERRORS.labels(self.name, "write").inc()
            return False

    def settle_unkeyed(self, tag: bytes, room: int, digest: bytes | None) -> bool:
        """After `write_unkeyed` of chunk `digest` (None: none was written) into the room
        `reserve_unkeyed` took: index the chunk, or give the room back. Returns whether
        it is indexed."""
        self._unreserve(tag, room)
        indexed = digest is not None and digest not in self._index and digest not in self._writing
        if indexed:
            self._index.admit(digest, room, False)  # the policy's bookkeeping: there is room
            self._indexed(digest, room)
        else:
            self.used -= room  # failed, or that chunk is (being) stored already: the same bytes
        self._publish()
        return indexed

    def fill_run_chunks(self, chunk_size: int) -> int:
        """The most chunks of `chunk_size` one `fill` may take, and fills together."""
        room = FILL_BYTES
        if self._budget is not None:
            # Half of what read-ahead may take: fills wait for their room with
            # partial claims (one at a time), so they must never need it all.
            room = min(room, (self._budget.capacity - self._budget.reserve) // 2)
        return max(1, room // chunk_size)

    async def fill(self, keys: list[ChunkKey], fetch: Callable[[list[memoryview]], Awaitable[None]]) -> list[bool]:
        """Store consecutive chunks of one object that `fetch` writes straight into
        buffers of ours (warm-up).

        `fetch(views)` fills the views in turn, all key.length bytes of each, with
        one backend request; each view lies in a page-aligned buffer with room for
        its chunk's header before it, and once the fetch is done the buffers are
        written as they are (buffered: see `_write_filled`), all in one hop to a
        thread: no copy of ours, no MEM tier, and no fresh memory per chunk (the buffers
        are reused while fills run; FILL_BYTES of them at most, claimed in the
        chunk budget, which MEM makes room for). Nothing is fetched if every chunk
        is held already, or if there is no room. Checkpoints.

        Args:
            keys: at most fill_run_chunks(chunk size) keys of consecutive chunks.
        Returns:
            For each chunk, whether it is held now (stored, present before, or being
            written by someone else); False: no room, or the write failed.
        Raises:
            Whatever `fetch` raises; no chunk is stored then.
        """
        n = len(keys)
        if self._fill_slots is None:
            self._fill_slots = trio.Semaphore(self.fill_run_chunks(keys[0].chunk_size))
        slots = self._fill_slots
        if n > self.fill_run_chunks(keys[0].chunk_size):
            raise ValueError(f"a fill of {n} chunks: more than {self.fill_run_chunks(keys[0].chunk_size)}")
        budget = self._budget
        slots_taken, claims = 0, []
        self._fills += 1
        try:
            # Taken whole under a lock, so fills waiting for room never each hold a
            # part: the one waiting gets the rest as the others end. Claimed as
            # read-ahead is, leaving demand reads their room and readers their chunks.
            async with self._fill_lock:
                for _ in range(n):
                    await slots.acquire()
                    slots_taken += 1
                if budget is not None:
                    for k in keys:
                        await budget.claim(k.digest, k.length, ahead=True)
                        claims.append(k.digest)
            return await self._fill(keys, fetch)
        finally:
            for digest in claims:
                budget.release(digest)
            for _ in range(slots_taken):
                slots.release()
            self._fills -= 1
            if not self._fills:
                self._fill_buffers.clear()  # unclaimed now: the system's again

    async def _fill(self, keys: list[ChunkKey], fetch) -> list[bool]:
        held = [k.digest in self._index or k.digest in self._writing for k in keys]
        if all(held):
            return held
        tag = keys[0].digest[:SOURCE_TAG_SIZE]  # one object: one source
        mine = {i: file_header_size(k.length) + k.length for i, k in enumerate(keys) if not held[i]}
        for i, size in mine.items():
            # Reserve before fetching: concurrent puts cannot overshoot the cap or a quota together.
            self._writing.add(keys[i].digest)
            self.used += size
            self._reserved[tag] += size
        written = 0  # of the chunks in `mine`, in order: the first `written` are on disk
        try:
            room, victims = self._claim_room(sum(mine.values()), tag)
            if victims:
                await trio.to_thread.run_sync(_unlink_all, victims, limiter=self._limiter)
            if not room:
                return held
            buffers = []
            for k in keys:
                padded = -(-(file_header_size(k.length) + k.length) // _DIRECT_ALIGN) * _DIRECT_ALIGN
                buf = self._fill_buffers.pop() if self._fill_buffers else None
                buffers.append(buf if buf is not None and len(buf) >= padded else mmap.mmap(-1, padded))
            # No `with`: if `fetch` raises, a thread it abandoned may still hold the views;
            # the buffers are then left to the garbage collector, never reused.
            views = []
            for k, buf in zip(keys, buffers):
                head = file_header_size(k.length)
                views.append(memoryview(buf)[head : head + k.length])
            await fetch(views)
            del views
            # Then every chunk in one hop to a thread: a hop per chunk, or writing each
            # as its bytes arrive, cost more CPU than it saved time (page-cache writes).
            jobs = [(keys[i].digest, buffers[i], file_header_size(keys[i].length), keys[i].length) for i in mine]
            written, error = await self._write_threads.run(self._write_filled, jobs)
            for i in list(mine)[:written]:
                self._indexed(keys[i].digest, mine[i])
                held[i] = True
            self._fill_buffers.extend(buffers)
            if error is not None:
                raise error
            return held
        except OSError as e:
            log.warning("cannot write chunks of %s to %s: %s", keys[0].obj.path, self.root, e)
            metrics.CACHE_ERRORS.labels(self.name, "write").inc()
            return held
        finally:
            for n, (i, size) in enumerate(mine.items()):
                if n >= written:
                    self.used -= size
                self._unreserve(tag, size)
                self._writing.discard(keys[i].digest)
            self._publish()

    async def _store(self, digest: bytes, length: int, write: Callable[..., None], *args) -> bool:
        """Reserve room for a chunk of `length` bytes, then write it in a thread with
        `write(digest, *args)` and index the file."""
        if digest in self._index or digest in self._writing:
            return False
        size = file_header_size(length) + length
        tag = digest[:SOURCE_TAG_SIZE]
        reason = "pinned" if digest in self._pins else self._index.admit(digest, size, self.used + size > self.capacity)
        if reason is None:
            self._rejected.inc()
            return False
        self._writing.add(digest)
        # Reserve before writing: concurrent puts cannot overshoot the cap or a quota together.
        self.used += size
        self._reserved[tag] += size
        stored = False
        try:
            room, victims = self._claim_room(size, tag, sample=digest if reason == "sample" else None)
            if victims:
                await trio.to_thread.run_sync(_unlink_all, victims, limiter=self._limiter)
            if room:
                await self._write_threads.run(write, digest, *args)
                self._indexed(digest, size)
                stored = True
            return stored
        except OSError as e:
            # A full or vanished cache disk costs cache hits, never a read: this
            # runs as write-behind, where raising would take the mount down.
            log.warning("cannot write chunk %s to %s: %s", digest.hex(), self.root, e)
            metrics.CACHE_ERRORS.labels(self.name, "write").inc()
            return False
        finally:
            if not stored:
                self.used -= size
            self._unreserve(tag, size)
            self._writing.discard(digest)
            self._publish()

    def _indexed(self, digest: bytes, size: int) -> None:
        """A chunk file of `size` bytes was just written (its room reserved): index it."""
        self._written.inc(size)
        self._index.add(digest, size)
        if digest in self._pins:
            self._index.pin(digest)
        self.by_source[digest[:SOURCE_TAG_SIZE]] += size

    def _write(self, digest: bytes, data: bytes | memoryview) -> None:
        header = hotpath.seal_chunk(digest, data, CHECKSUM_BLOCK)
        self._write_file(
            digest, lambda fd: self._write_buffered(fd, header, data), lambda fd: self._write_direct(fd, header, data)
        )

    def _write_from(self, digest: bytes, fd: int, offset: int, length: int, own: bool = False) -> None:
        """Write chunk `digest` from the `length` bytes of file `fd` at `offset`. `own`: in a
        buffer and under a temporary name of its own, not a write thread's (`write_unkeyed`)."""
        head = file_header_size(length)
        with self._own_buffer(head + length) if own else self._aligned_buffer(head + length) as view:
            with view[head:] as data:
                if os.preadv(fd, [data], offset) != length:
                    raise OSError(errno.EIO, f"short read of chunk {digest.hex()} from {fd}")
                header = hotpath.seal_chunk(digest, data, CHECKSUM_BLOCK)
            view[:head] = header
            self._write_file(digest, lambda f: self._write_buffered(f, view, b""),
                             lambda f: self._write_aligned(f, view),
                             tmp_suffix=f"-{threading.get_ident()}" if own else "")

    def _write_filled(self, jobs: list[tuple[bytes, mmap.mmap, int, int]]) -> tuple[int, OSError | None]:
        """Write `fill` buffers, each (digest, buffer, head, length): the chunk at
        [head, head + length), its header sealed in front. Stops at the first error.

        Buffered, unlike other chunk writes, as JuiceFS writes its cache: a warm-up
        writes as fast as the backend sends, and an O_DIRECT write waits for the
        disk, which the backend may be reading from too (warming 1 GiB into a
        worker: 171 MiB/s direct, 210 buffered, 183 buffered with the writeback
        started at once by FADV_DONTNEED; 0.4 s more CPU per GiB). Tried again with
        fills written whole and the tail not truncated: the kernel's copy into fresh
        pages is most of a worker's CPU (perf: 58%), and O_DIRECT took 15% of it off,
        but the warm-up still ended 10% later, its writes contending with the
        backend's reads instead of following them. The kernel writes the pages back
        later; they are clean page cache then, which reclaim takes first (the worker
        drops a chunk file's pages once it has served it).

        Returns:
            (chunks written, the error that stopped the rest or None).
        """
        for n, (digest, buf, head, length) in enumerate(jobs):
            try:
                with memoryview(buf) as view:
                    with view[head : head + length] as data:
                        header = hotpath.seal_chunk(digest, data, CHECKSUM_BLOCK)
                    view[:head] = header
                    with view[: head + length] as whole:
                        self._write_file(digest, lambda fd: self._write_buffered(fd, whole, b""))
            except OSError as e:
                return n, e
        return len(jobs), None

    def _write_file(self, digest: bytes, write_buffered, write_direct=None, tmp_suffix: str = "") -> None:
        """Write a chunk's file: to a temp file with `write_direct(fd)` (O_DIRECT, if
        given and the file system takes it) or else `write_buffered(fd)`, then renamed
        into place."""
        path = self._path(digest)
        tmp = f"{path}.tmp{os.getpid()}{tmp_suffix}"
        direct = write_direct is not None and self._direct
        try:
            fd = self._create(tmp, direct)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = self._create(tmp, direct)
        try:
            try:
                if not direct:
                    write_buffered(fd)
                else:
                    try:
                        write_direct(fd)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        # Opened, but not writable that way (alignment): go buffered for good.
                        self._refuse_direct()
                        os.close(fd)
                        fd = -1  # closed: never close its number twice
                        fd = self._create(tmp)
                        write_buffered(fd)
            finally:
                if fd >= 0:
                    os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _create(self, path: str, direct: bool = True) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        if direct and self._direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o600)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._refuse_direct()
        return os.open(path, flags, 0o600)

    def _refuse_direct(self) -> None:
        if self._direct:
            log.info("%s does not take O_DIRECT writes; writing through the page cache", self.root)
        self._direct = False
        self._aligned.clear()
        self._fill_buffers.clear()

    @staticmethod
    def _write_buffered(fd: int, header: bytes, data: bytes | memoryview) -> None:
        written = os.writev(fd, [header, data])
        if written != len(header) + len(data):
            raise OSError(f"short write ({written} bytes)")

    def _write_direct(self, fd: int, header: bytes, data: bytes | memoryview) -> None:
        # Header and data copied into one page-aligned buffer: its aligned part goes
        # straight to the disk (see `_write_aligned`).
        with self._aligned_buffer(len(header) + len(data)) as view:
            view[: len(header)] = header
            view[len(header) :] = data
            self._write_aligned(fd, view)

    @contextlib.contextmanager
    def _aligned_buffer(self, length: int):
        """A view of the first `length` bytes of a page-aligned write buffer, taken from
        the free ones (or made), and given back after."""
        try:
            buf = self._aligned.pop()  # atomic: writer threads never share a buffer
        except IndexError:
            buf = None
        if buf is None or len(buf) < length:
            buf = mmap.mmap(-1, length)  # page-aligned
        try:
            with memoryview(buf) as whole, whole[:length] as view:
                yield view
        finally:
            self._aligned.append(buf)

    @staticmethod
    @contextlib.contextmanager
    def _own_buffer(length: int):
        """A view of a page-aligned buffer of `length` bytes made for one write, freed after."""
        buf = mmap.mmap(-1, length)
        try:
            with memoryview(buf) as view:
                yield view
        finally:
            buf.close()

    @staticmethod
    def _write_aligned(fd: int, whole: memoryview) -> None:
        """Write `whole` (a view from the start of a page-aligned buffer) to `fd`, opened
        O_DIRECT: its aligned part direct, the tail after it (a chunk's header makes
        every file end off the alignment) through the page cache.

        Not padded and cut back: ext4 zeroes what a truncate cuts from the last block,
        and reads that block back from the disk to do it, which took half as long as
        writing the 4 MiB before it (strace: ftruncate 9 ms median, the write 20)."""
        length = len(whole)
        aligned = length - length % _DIRECT_ALIGN
        if aligned:
            with whole[:aligned] as out:
                written = os.write(fd, out)
            if written != aligned:
                raise OSError(f"short write ({written} bytes)")
        if aligned < length:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            with whole[aligned:] as tail:
                written = os.pwrite(fd, tail, aligned)
            if written != length - aligned:
                raise OSError(f"short write ({written} bytes)")

    def _statvfs(self) -> os.statvfs_result:
        try:
            return os.statvfs(self.root)
        except FileNotFoundError:
            os.makedirs(self.root, mode=0o700, exist_ok=True)  # removed under us (a tmp cleaner)
            return os.statvfs(self.root)

    def _claim_room(self, size: int, tag: bytes = b"", sample: bytes | None = None) -> tuple[bool, list[str]]:
        """Evict chunks (SLRU order) from the index until the source `tag`'s chunks
        (with its writes in progress, `size` among them) fit its quota, `self.used`
        (which already counts `size`) fits the cap, and writing `size` more bytes
        leaves --free-space-ratio of the disk free. Index changes stay on the trio
        thread; the caller unlinks. `sample`: room for this chunk admitted as a
        sample (see cachefs.cache.policy), taken from chunks ranked above it only.

        Returns:
            (whether there is room, paths of the evicted files to unlink).
        Raises:
            OSError: the cache directory cannot be examined.
        """
        victims: list[str] = []
        freed = 0
        quota = self._quotas.get(tag)
        if quota is not None and size > quota:
            return False, victims  # would never fit: keep what the source has
        while self._over_quota(tag):
            victim = self._index.pop_victim_with_prefix(tag)
            if victim is None:
                return False, victims  # its writes in progress alone fill the quota
            freed += self._evicted(*victim, victims)
        st = self._statvfs() if self.free_space_ratio else None
        while self._over_capacity(st, freed):
            try:
                victim = self._index.pop_victim(sample)
            except KeyError:
                return False, victims  # nothing left but pinned chunks
            freed += self._evicted(*victim, victims)
        return True, victims

    def _over_quota(self, tag: bytes) -> bool:
        """The source `tag`'s chunks, with its writes in progress, are more than its quota."""
        quota = self._quotas.get(tag)
        return quota is not None and self.by_source[tag] + self._reserved[tag] > quota

    def _over_capacity(self, st: os.statvfs_result | None, freed: int) -> bool:
        """`self.used` is over the cap, or the disk (`st`, None: not checked), once `freed`
        bytes are gone and the writes in progress written, has less than --free-space-ratio free."""
        if self.used > self.capacity:
            return True
        if st is None:
            return False
        # statvfs does not see writes still in progress: count them as written.
        writing = sum(self._reserved.values())
        return st.f_bavail * st.f_frsize + freed - writing < self.free_space_ratio * st.f_blocks * st.f_frsize

    def _unreserve(self, tag: bytes, size: int) -> None:
        self._reserved[tag] -= size
        if not self._reserved[tag]:
            del self._reserved[tag]

    def _evicted(self, digest: bytes, size: int, victims: list[str]) -> int:
        """Account for a chunk taken out of the index; its file joins `victims`. Returns its size."""
        self._forget_layout(digest)
        self._forget_fd(digest)  # else its space stays in use until the fd closes
        self.used -= size
        self.by_source[digest[:SOURCE_TAG_SIZE]] -= size
        self.evicted_by_source[digest[:SOURCE_TAG_SIZE]] += 1
        victims.append(self._path(digest))
        metrics.CACHE_EVICTIONS.labels(self.name).inc()
        return size

    # -- room for other files (staged writes) -------------------------------------

    async def claim(self, size: int) -> bool:
        """Take `size` bytes of this tier's capacity for files of the staging area,
        evicting chunks first (within --cache-size and --free-space-ratio).

        Returns:
            False if that much cannot be freed (what is left is pinned); nothing is taken then.
        """
        self.used += size
        self._reserved[b""] += size  # counted as being written until statvfs sees it
        try:
            room, victims = self._claim_room(size)
        except OSError as e:
            log.warning("cannot make room in %s: %s", self.root, e)
            room, victims = False, []
        finally:
            self._unreserve(b"", size)
        try:
            if victims:
                await trio.to_thread.run_sync(_unlink_all, victims, limiter=self._limiter)
        except BaseException:
            room = False  # the caller gets the error: nothing is taken
            raise
        finally:
            if not room:
                self.used -= size
            self._publish()
        return room

    def take(self, size: int) -> None:
        """Count `size` bytes of staged files found on disk at start-up, room or not."""
        self.used += size
        self._publish()

    def give_back(self, size: int) -> None:
        """Room taken by `claim` or `take` is free again."""
        self.used -= size
        self._publish()

    async def remove_all(self, digests: list[bytes]) -> None:
        """Drop the chunks of `digests` held (of an object changed or deleted) now: their
        files go in one thread hop, not one each."""
        paths = [self._path(digest) for digest in digests if self._forget(digest)]
        if paths:
            self._publish()
            try:
                await trio.to_thread.run_sync(_unlink_all, paths, limiter=self._limiter)
            except OSError as e:
                # Out of the index already: a file left behind is a chunk no one asks for, which
                # the LRU takes after a restart. The caller's change (an rm) happened all the same.
                log.warning("cannot remove dropped chunk files in %s: %s", self.root, e)
                metrics.CACHE_ERRORS.labels(self.name, "write").inc()

    async def rename(self, pairs: list[tuple[bytes, bytes]]) -> int:
        """Keep each chunk `old` as chunk `new`, the same bytes under another key (the chunks
        of an object renamed in the backend): its file is renamed and the digest its header
        names rewritten, no data copied. A chunk pinned or being written, and one whose new
        digest is held or being written already, stays as it is. Returns how many moved."""
        moves = []
        for old, new in pairs:
            if old in self._index and old not in self._pins and old not in self._writing \
                    and new not in self._index and new not in self._writing:
                self._forget_layout(old)
                self._forget_fd(old)
                moves.append((old, new, self._index.pop(old)))
                self._writing.add(new)  # a put of it meanwhile would find the file being renamed
        if not moves:
            return 0
        try:
            moved = await trio.to_thread.run_sync(self._rename_files, [m[:2] for m in moves], limiter=self._limiter)
        finally:
            for _, new, _ in moves:
                self._writing.discard(new)
        for (old, new, size), ok in zip(moves, moved):
            if ok:
                self._index.add(new, size)
                if new in self._pins:  # pinned by its name before it was here
                    self._index.pin(new)
            else:
                self.used -= size
                self.by_source[old[:SOURCE_TAG_SIZE]] -= size
        self._publish()
        return sum(moved)

    def _rename_files(self, pairs: list[tuple[bytes, bytes]]) -> list[bool]:
        """In a thread: the file of each chunk `old` becomes chunk `new`'s. Only if its header
        names `old` (a file of another chunk put in its place is not made one of `new`, whose
        checksums it would pass). The digest goes into the header before the rename: a crash
        in between leaves a file whose header names another chunk than its name, which a
        read drops as corrupt."""
        done = []
        for old, new in pairs:
            path = self._path(old)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    if os.pread(fd, len(old), _KEY_DIGEST_AT) != old:
                        raise ChunkCorrupt("its header names another chunk")
                    if os.pwrite(fd, new, _KEY_DIGEST_AT) != len(new):
                        raise OSError(errno.EIO, f"short write of the header of {path}")
                finally:
                    os.close(fd)
                target = self._path(new)
                try:
                    os.rename(path, target)
                except FileNotFoundError:
                    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                    os.rename(path, target)
                done.append(True)
            except (ChunkCorrupt, OSError) as e:
                log.warning("cannot keep cached chunk %s as %s: %s", old.hex(), new.hex(), e)
                metrics.CACHE_ERRORS.labels(self.name, "corrupt" if isinstance(e, ChunkCorrupt) else "write").inc()
                _unlink_all([path])
                done.append(False)
        return done

    async def _drop(self, digest: bytes) -> None:
        if self._forget(digest):
            self._publish()
        try:
            await trio.to_thread.run_sync(os.unlink, self._path(digest))
        except FileNotFoundError:
            pass

    def _forget(self, digest: bytes) -> bool:
        """A chunk out of the layouts, the open fds and the index; whether it was indexed."""
        self._forget_layout(digest)
        self._forget_fd(digest)
        return self._unindex(digest)

    def _unindex(self, digest: bytes) -> bool:
        """Take a chunk out of the index and its bytes out of the counts; whether it was there."""
        size = self._index.pop(digest)
        if size is None:
            return False
        self.used -= size
        self.by_source[digest[:SOURCE_TAG_SIZE]] -= size
        return True

    def _publish(self) -> None:
        metrics.CACHE_USED.labels(self.name).set(self.used)
        metrics.CACHE_CHUNKS.labels(self.name).set(len(self._index))

    def usage(self) -> tuple[int, int]:
        """Returns (bytes used, chunks held)."""
        return self.used, len(self._index)
