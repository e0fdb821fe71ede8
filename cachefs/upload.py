"""Uploads: closed files from the staging area to the backend.

A file is sealed at close (or fsync) and handed to `Uploader.submit`. By default
the caller waits for its upload (close-to-open: once close() returns, any node
that opens the file sees the new bytes), and a backend that fails after the
bounded retries fails the close with EIO. With --writeback, `submit` journals
the file (staging.py) and returns at once; the upload runs in the background
and is retried until the backend takes it, also after a restart.

Uploads of one path run one at a time, in the order the files were closed, so
the last close wins, whole. After an upload the file's chunks go into the local
tiers under the object's new version: the next read is a hit, and no node can
serve a chunk of the old version for the new one (the version is in every
chunk key).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from cachefs import metrics
from cachefs.backend import NOATIME, Written
from cachefs.errors import BackendError, BackendUnavailable, CachefsError
from cachefs.objects import ObjectId, ObjectInfo, chunk_key, key_at, source_tag
from cachefs.staging import JournalEntry, StagedFile, Staging

if TYPE_CHECKING:
    from cachefs.node import Dataset

log = logging.getLogger(__name__)

# Between retries of a background upload that failed: doubling from the first, up to the last.
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
# Chunks of an uploaded file cached at once (each one chunk in memory).
CACHE_WORKERS = 4
# Seconds an upload's chunks wait at most, before they are cached, for the node's other
# uploads to end (`Uploader._uploads_quiet`).
CACHE_YIELD_MAX = 2.0
# Seconds the chunk of a small file waits after its close returned before it is cached:
# the writer's next create and write come first (1.5-2.5 ms here), and the caching then
# runs while its next close waits for the server. Cached at once, it held
# up those requests: writing 64 KiB files one after another, 88.6 against 84.1 files/s
# (medians of 6 alternating rounds; not caching them at all, 98.8 against 88.5).
CACHE_SMALL_AFTER = 0.005
# A chunk this small is read back from the staged file on the trio thread: it was just
# written, so it is in the page cache, and a thread hop cost more than the read.
INLINE_READ = 256 << 10
# A file of one chunk this small, PUT from a thread, is cached by that thread right after
# the PUT (`DiskTier.reserve_unkeyed`); larger ones, and small ones PUT from the trio
# thread (`Backend.puts_from_trio`), after the close returned, so that their close does
# not wait for their chunk's write too.
CACHE_WITH_PUT = 256 << 10


class EarlyParts:
    """Parts of a large file sent while it is still being written.

    A sequential writer that has filled a part will not come back to it, so the
    part goes to the backend at once, and close() sends only the rest: sending
    everything at close made close-to-open writes take the write time plus the
    upload time (half the speed of S3). A part goes as soon as a write fills it,
    not once the writer writes past it: then the last part of a file that ends
    on a part boundary waited for the close, and the close for its upload. None
    goes before the file is larger than one part (a file of one part is a single
    PUT). A write into a part already sent (or in flight) makes it stale, sent
    again at close; a write out of sequence stops early sending for the file.
    Parts are invisible in S3 until the upload is completed, so nothing
    half-written is ever shown."""

    def __init__(self, part_size: int):
        self.part_size = part_size
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}  # part index -> ETag, for parts still true of the file
        self.sending: dict[int, bool] = {}  # parts in flight -> still true of the file
        self.next = 0  # the next part a sequential writer completes
        self.stopped = False
        self.starting = trio.Lock()  # the first part to go starts the multipart upload
        self._idle = trio.Event()

    def touched(self, start: int, end: int | None) -> None:
        """Bytes [start, end) were written (end=None: everything from start was cut off)."""
        first = start // self.part_size
        if end is None:
            indexes = [i for i in [*self.etags, *self.sending] if i >= first]
        else:
            # Every write calls this: visit the parts it covers, not every part sent.
            indexes = range(first, (end - 1) // self.part_size + 1)
        for index in indexes:
            self.etags.pop(index, None)
            if index in self.sending:
                self.sending[index] = False

    def ready(self, end: int) -> list[int]:
        """The parts a sequential writer whose last write ended at `end` has filled."""
        out = []
        while not self.stopped and end > self.part_size and (self.next + 1) * self.part_size <= end:
            out.append(self.next)
            self.next += 1
        return out

    async def settled(self) -> None:
        """Until no part is in flight."""
        while self.sending:
            await self._idle.wait()

    def sent(self, index: int, etag: str | None) -> None:
        """Part `index` is no longer in flight: sent (its ETag) or not (None)."""
        if self.sending.pop(index) and etag is not None:
            self.etags[index] = etag
        if not self.sending:
            self._idle.set()
            self._idle = trio.Event()

    def forget(self) -> None:
        """The multipart upload was completed or aborted: none of its parts is usable."""
        self.upload_id = None
        self.etags.clear()


@dataclasses.dataclass(eq=False)
class Upload:
    """One sealed file on its way to the backend."""

    dataset: Dataset
    path: str  # inside the dataset
    staged: StagedFile
    size: int
    background: bool  # --writeback: retried until it lands; nobody waits for it
    entry: JournalEntry | None = None
    # Set once the backend has the file (or the upload failed): close-to-open needs no more.
    landed: trio.Event = dataclasses.field(default_factory=trio.Event)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)  # cached too: the upload is over
    error: CachefsError | None = None
    info: ObjectInfo | None = None  # the object as uploaded
    ours: bool = True  # whether `info` is of its bytes (not another writer's, landed right after)
    cached: bool = False  # its chunk was cached with the PUT (`Uploader._send`)
    cancelled: bool = False  # the path was deleted: upload nothing more
    pause: trio.CancelScope | None = None  # while waiting to retry
    early: EarlyParts | None = None  # parts sent before the close
    mtime: float | None = None  # set (touch) before it landed: the object takes it after (`Uploader.touch`)
    # Its mtime until it lands: the file's at its close (one answer to every stat, not the time of each)
    sealed_at: float = dataclasses.field(default_factory=time.time)
    after: Upload | None = None  # the upload of the same path before it, which must be done first


class Uploader:
    """Uploads sealed files, one at a time per path, in a nursery of the node.

    Args:
        staging: where the files are and whose room they free.
        part_size: the largest file sent in one PUT, and the part size of larger ones.
        uploaded: called after each upload with (dataset, path, new info); the
            mount updates its metadata there.
    """

    def __init__(
        self,
        staging: Staging,
        nursery: trio.Nursery,
        part_size: int,
        uploaded: Callable[[Dataset, str, ObjectInfo], Awaitable[None]],
    ):
        self.staging = staging
        self.part_size = part_size
        self._nursery = nursery
        self._uploaded = uploaded
        self.pending: dict[tuple[str, str], list[Upload]] = {}  # (source, path) -> not yet landed, oldest first
        # Journaled uploads given up when their dataset was removed: resumed, before any
        # newer write of their paths, if a dataset of their source is added again.
        self.abandoned: list[JournalEntry] = []
        # Told of each: a dataset of its source may be served again already.
        self.on_abandoned: Callable[[JournalEntry], None] = lambda entry: None
        # Close-to-open uploads and early parts being sent now: what closes wait for
        # (under --writeback no close does, and no upload waits on this count).
        self._sending = 0
        self._quiet = trio.Event()  # set (and replaced) when _sending drops to 0
        metrics.UPLOADS_PENDING.set_function(lambda: len(self.all_pending()))
        metrics.UPLOADS_PENDING_BYTES.set_function(lambda: sum(u.size for u in self.all_pending()))

    def all_pending(self) -> list[Upload]:
        """Every upload not landed yet, of every path."""
        return [u for uploads in self.pending.values() for u in uploads]

    def latest(self, dataset: Dataset, path: str) -> Upload | None:
        """The newest upload of `path` not landed yet: what a read of it must see."""
        uploads = self.pending.get((dataset.source, path))
        return uploads[-1] if uploads else None

    def touch(self, dataset: Dataset, path: str, mtime: float) -> bool:
        """A new mtime for `path` while an upload of it has not landed (`tar x` under
        --writeback sets each file's mtime after its close): the object takes it once it
        lands. Set now, it would fail (no object yet) or be undone by the upload. Returns
        whether there was such an upload."""
        upload = self.latest(dataset, path)
        if upload is None or upload.info is not None or upload.cancelled:
            return False
        upload.mtime = mtime
        return True

    def send_early(self, dataset: Dataset, path: str, early: EarlyParts, staged: StagedFile, end: int) -> None:
        """A sequential writer of `path` wrote up to `end`: send the parts it has filled."""
        for index in early.ready(end):
            early.sending[index] = True
            # Not held (a hold would make the writer copy the file, as for a seal): a file let
            # go of first fails the part's read, and the part is sent at close, or never. So
            # the file is never emptied for reuse under a part being read from its mapping.
            staged.reusable = False
            self._nursery.start_soon(self._send_part, dataset, path, early, staged, index)

    async def _send_part(self, dataset: Dataset, path: str, early: EarlyParts, staged: StagedFile, index: int) -> None:
        backend = dataset.backend
        etag = None
        self._sending += 1
        try:
            async with early.starting:
                if early.upload_id is None:
                    early.upload_id = await backend.start_parts(path)
            etag = await backend.put_part(path, early.upload_id, index, early.part_size, staged.path,
                                          (index + 1) * early.part_size)
        except (BackendError, OSError) as e:
            early.stopped = True  # close sends what is missing, with its own retries
            log.info("early part %d of %s not sent (sent at close): %s", index + 1, path, e)
        finally:
            early.sent(index, etag)
            self._sent()

    def drop_early(self, dataset: Dataset, path: str, early: EarlyParts) -> None:
        """The file will not be uploaded with these parts (closed unsealed, or deleted)."""
        early.stopped = True
        self._nursery.start_soon(dataset.backend.abort_parts, path, early)

    async def submit(
        self, dataset: Dataset, path: str, staged: StagedFile, size: int, background: bool,
        early: EarlyParts | None = None, mtime: float | None = None, keep_mtime: bool = False,
    ) -> Upload:
        """Start uploading `staged` (its first `size` bytes) as `path`, whose mtime is
        `mtime` until it lands (default: now), and after too where the store keeps one
        if `keep_mtime` (set by utimens: `cp -p`, `rsync -t`). The upload holds the staged file until it
        is done. With `background`, the file is journaled
        first, so it is uploaded even after a crash (`Staging.durable`: once on disk).

        Raises:
            OSError: the journal could not be written (background only); nothing was started.
        """
        upload = Upload(dataset, path, staged, size, background, early=early)
        if mtime is not None:
            upload.sealed_at = mtime
            if keep_mtime:
                upload.mtime = mtime  # as a touch before it landed (`touch`)
        # The upload's own hold (the writer may let go first), taken before the journal
        # may wait for its spare entries: a write meanwhile must copy the file, not change
        # the state this entry and this upload are of.
        self.staging.hold(staged)
        if background:
            try:
                upload.entry = await self.staging.journal(dataset.source, path, staged, size, upload.sealed_at)
            except BaseException:
                self.staging.release(staged)
                raise
        self._start(upload)
        return upload

    def resume(self, dataset: Dataset, entry: JournalEntry) -> Upload:
        """Upload a journal entry left from before a restart."""
        staged = self.staging.adopt(entry)  # held by this upload alone
        upload = Upload(dataset, entry.path, staged, entry.size, background=True, entry=entry, sealed_at=entry.sealed_at)
        self._start(upload)
        return upload

    def _start(self, upload: Upload) -> None:
        key = (upload.dataset.source, upload.path)
        queued = self.pending.setdefault(key, [])
        # Its turn comes when the one submitted before it is done: the uploads of one path
        # land in the order they were closed (or journaled: a restart resumes its entries
        # in seq order). A lock taken as each task first ran let trio's scheduler pick
        # among tasks started together, and an older close could land last.
        upload.after = queued[-1] if queued else None
        queued.append(upload)
        if len(queued) > 1:
            self._wake_yielders()  # one of them may hold up this upload (`_uploads_quiet`)
        self.staging.draining_changed(+upload.size)
        self._nursery.start_soon(self._run, upload)

    async def wait(self, dataset: Dataset, path: str, timeout: float, under: bool = False) -> None:
        """Until every upload of `path` (`under`: of every file under directory `path`)
        submitted so far has landed or failed, and so has any resumed meanwhile from
        their journal entries (given up with a removed dataset: `Node._abandoned`). Not
        the closes since: a writer closing the file again and again must not hold it up.

        Raises:
            BackendUnavailable: they are still pending after `timeout` seconds (the
                backend is down: a rename must not hang on it).
        """
        uploads = self._pending_at(dataset, path, under)
        waited = set(uploads)
        with trio.move_on_after(timeout):
            while uploads:
                for upload in uploads:
                    await upload.done.wait()
                entries = {u.entry.seq for u in waited if u.entry is not None}
                uploads = [u for u in self._pending_at(dataset, path, under)
                           if u not in waited and u.entry is not None and u.entry.seq in entries]
                waited.update(uploads)
            return
        raise BackendUnavailable(f"{path}: an upload has not landed yet (the backend is not taking it)")

    def _pending_at(self, dataset: Dataset, path: str, under: bool) -> list[Upload]:
        if under:
            return [upload for key, queued in self.pending.items() if key_at(key, dataset.source, path, under=True)
                    for upload in queued]
        return list(self.pending.get((dataset.source, path), ()))

    async def cancel(self, dataset: Dataset, path: str) -> bool:
        """`path` was deleted: drop its pending uploads (and journal entries). Returns
        once none is left, so that no upload can land after the caller deletes the
        object (one in the middle of a request finishes it, within the store's timeouts):
        whether one did land so, which no listing may show yet."""
        uploads = list(self.pending.get((dataset.source, path), ()))
        for upload in uploads:
            upload.cancelled = True
            if upload.pause is not None:
                upload.pause.cancel()
        for upload in uploads:
            await upload.done.wait()
        if self.abandoned:
            await self._supersede((dataset.source, path))  # else a restart would upload it again
        return any(upload.info is not None for upload in uploads)

    async def _run(self, upload: Upload) -> None:
        key = (upload.dataset.source, upload.path)
        delay = RETRY_FIRST
        try:
            if upload.after is not None:
                # Done, not only landed: its journal entry is gone too, so no restart
                # replays it over this one, which may land before a crash.
                await upload.after.done.wait()
                upload.after = None
            if self.abandoned:
                await self._supersede(key)
            while not upload.cancelled:
                try:
                    upload.info, upload.ours = await self._send(upload)
                    break
                except Exception as e:  # noqa: BLE001 - an upload must never take the mount down
                    if not isinstance(e, BackendError):
                        log.exception("upload of %s failed unexpectedly", upload.path)
                        e = BackendError(f"{upload.path}: upload failed ({type(e).__name__}: {e})")
                    if upload.dataset.removed:
                        upload.error = e
                        log.error("upload of %s abandoned: dataset %s was removed", upload.path,
                                  upload.dataset.name or "/")
                        return
                    if not upload.background:
                        upload.error = e
                        metrics.UPLOADS.labels("error").inc()
                        log.error("upload of %s failed: %s", upload.path, e)
                        return
                    metrics.UPLOADS.labels("retry").inc()
                    log.warning("upload of %s failed, retrying in %.0fs: %s", upload.path, delay, e)
                    with trio.CancelScope() as upload.pause:
                        await trio.sleep(delay)
                    upload.pause = None
                    delay = min(delay * 2, RETRY_MAX)
            if upload.cancelled:
                return
            if upload.mtime is not None:
                await self._set_mtime(upload)
            metrics.UPLOADS.labels("ok").inc()
            # The close returns now; until the chunks are cached, this node still reads
            # the file from its staged bytes (it stays pending), so reads make no GET.
            upload.landed.set()
            if not upload.background:
                await _let_waiters_run()
                if upload.size > upload.dataset.reader.chunk_size:
                    await self._uploads_quiet(key)
                elif not upload.cached:
                    await trio.sleep(CACHE_SMALL_AFTER)
            await self._cache_chunks(upload)
            await self._uploaded(upload.dataset, upload.path, upload.info)
        finally:
            with trio.CancelScope(shield=True):
                early = upload.early
                if early is not None and (early.upload_id is not None or early.sending):
                    # Cancelled before it began, maybe while the first part was still starting
                    # the multipart upload (no id yet): `abort_parts` waits for the parts in
                    # flight, then aborts whatever they started. None after a completion or
                    # an abort (`forget`: no id, nothing in flight).
                    self.drop_early(upload.dataset, upload.path, early)
                if upload.entry is not None and (upload.info is not None or upload.cancelled):
                    await self.staging.forget(upload.entry)  # gone before `done`: no restart uploads it again
                uploads = self.pending.get(key, [])
                if upload in uploads:
                    uploads.remove(upload)
                if not uploads:
                    self.pending.pop(key, None)
                self.staging.draining_changed(-upload.size)
                # A journaled upload cut short (unmount, dataset removed) resumes at the next
                # start, or when a dataset of its source is added again (`abandoned`).
                keep = upload.entry is not None and upload.info is None and not upload.cancelled
                self.staging.release(upload.staged, keep_file=keep)
                if keep and upload.dataset.removed:
                    self.abandoned.append(upload.entry)
                    self.on_abandoned(upload.entry)
                upload.landed.set()
                upload.done.set()

    async def _supersede(self, key: tuple[str, str]) -> None:
        """A newer close of `key` is being uploaded: the entries of it given up with their
        dataset (`abandoned`) are dropped, so that no restart or re-added dataset replays
        them over it."""
        for entry in [e for e in self.abandoned if (e.source, e.path) == key]:
            self.abandoned.remove(entry)
            await self.staging.drop_entry(entry)

    @staticmethod
    async def _set_mtime(upload: Upload) -> None:
        """The mtime a touch gave the file before it landed, on the object now, where the
        store keeps one (a local or NAS directory; S3's is the upload's time)."""
        backend = upload.dataset.backend
        if not backend.keeps_mtime:
            return
        try:
            await backend.set_mtime(upload.path, upload.mtime)
            info = await backend.stat(upload.path)  # a local file's version names its mtime
        except BackendError as e:
            log.warning("could not set the mtime of %s after its upload: %s", upload.path, e)
            return
        # The stat may see another writer's file, renamed over ours since: not ours to cache.
        upload.ours = upload.ours and info.size == upload.size and abs(info.mtime - upload.mtime) < 1e-3
        if upload.info is not None and info.version != upload.info.version:
            upload.cached = False  # the chunk its PUT's thread cached is of the version before
        upload.info = info

    async def _send(self, upload: Upload) -> Written:
        """The upload's one attempt: `Backend.upload`; one a close waits for counts as sending.
        A small file PUT from a thread has its chunk cached by that thread, if the SSD tier
        has room for it."""
        waited_for = not upload.background
        if waited_for:
            self._sending += 1
        with_put = _CachedWithPut.reserve(upload)
        try:
            return await upload.dataset.backend.upload(
                upload.path, upload.staged.path, upload.size, self.part_size, upload.early,
                after_put=with_put.write if with_put is not None else None,
            )
        finally:
            if with_put is not None:
                upload.cached = with_put.settle()
            if waited_for:
                self._sent()

    def _sent(self) -> None:
        self._sending -= 1
        if not self._sending:
            self._wake_yielders()

    def _wake_yielders(self) -> None:
        self._quiet.set()
        self._quiet = trio.Event()

    async def _uploads_quiet(self, key: tuple[str, str]) -> None:
        """Until no close-to-open upload or early part is being sent, CACHE_YIELD_MAX
        seconds at most, or until another upload of the same path (`key`) waits for this
        one to end: a close-to-open upload caches its chunks after the others.

        Caching an uploaded file reads and checksums it and writes it to the SSD: 3.7 ms
        of CPU and 12 ms of the disk per 4 MiB chunk here. Run beside other files' uploads
        (4 files written at once, the first done caching while the others still send their
        last parts), it took the CPU and the disk that the others' closes were waiting
        for. The wait is bounded, so that uploads without end never keep a file from the
        cache for long (it is read from its staged bytes meanwhile, with no GET). Only
        for files of more than one chunk: a small file's one chunk is cheap to cache, and
        with 4 writers of small files there is nearly always an upload in flight, so
        their files waited up to the bound (files/s fell 5 %, 5 repeats side by side).
        Not for --writeback uploads, which no close waits for."""
        with trio.move_on_after(CACHE_YIELD_MAX):
            while self._sending and len(self.pending.get(key, ())) <= 1:
                await self._quiet.wait()

    async def _cache_chunks(self, upload: Upload) -> None:
        """Put the uploaded bytes into a local tier as chunks of the new version:
        read-after-write is a hit, with no GET. The SSD tier takes them if there is one,
        straight from the staged file (`DiskTier.put_from`: the only copy is the
        kernel's, into the buffer the chunk file is written from), and
        MEM does not: a large file read back into fresh memory to cache it was a fifth
        of the daemon's CPU writing it, and it pushed out of MEM what readers had
        there; a read of the file takes its chunks into MEM as any SSD hit does. With
        no SSD tier, MEM takes them. The next upload of the path waits for this, so
        CACHE_WORKERS chunks go at once: the reads of the staged file, the checksums
        and the tier's writes overlap (one at a time, this took a third of the close
        of a large file)."""
        if upload.cached:
            return  # by the PUT's thread (`_CachedWithPut`)
        info = upload.info
        local = [t for t in upload.dataset.reader.tiers if t.medium != "network"]
        tiers = [t for t in local if t.medium == "disk"] or local
        if info is None or not tiers or info.size != upload.size or not upload.ours:
            return  # the backend shows other bytes than ours (a concurrent writer): cache nothing
        if tiers[0].medium == "disk":
            try:
                fd = os.open(upload.staged.path, os.O_RDONLY | os.O_CLOEXEC | NOATIME)
            except OSError as e:
                log.warning("could not cache the chunks of %s after its upload: %s", upload.path, e)
                return
            try:
                if os.fstat(fd).st_size >= info.size:  # never cut while an upload holds it
                    await self._put_chunks(upload, tiers, fd)
            finally:
                os.close(fd)
        else:
            await self._put_chunks(upload, tiers, None)

    async def _put_chunks(self, upload: Upload, tiers: list, fd: int | None) -> None:
        """The chunks of the uploaded file into `tiers`: SSD tiers, read by them from `fd`
        (the staged file, open), or (no `fd`) read into memory of their own."""
        info = upload.info
        obj = ObjectId(upload.dataset.source, upload.path, info.version, info.size)
        size = upload.dataset.reader.chunk_size
        chunks = -(-info.size // size)
        indexes = iter(range(chunks))  # shared by the workers

        async def worker() -> None:
            for index in indexes:
                key = chunk_key(obj, size, index)
                start = index * size
                if fd is not None:
                    for tier in tiers:
                        await tier.put_from(key, fd, start)
                    continue
                if key.length <= INLINE_READ:
                    data = _read_at(upload.staged.path, key.length, start)
                else:  # opened per chunk: one thread hop, not three
                    data = await trio.to_thread.run_sync(_read_at, upload.staged.path, key.length, start)
                if len(data) != key.length:
                    break  # cut short under us: cache nothing more
                for tier in tiers:
                    await tier.put(key, data)

        try:
            if chunks == 1:
                await worker()
            else:
                async with trio.open_nursery() as nursery:
                    for _ in range(min(CACHE_WORKERS, chunks)):
                        nursery.start_soon(worker)
        except* OSError as group:
            log.warning("could not cache the chunks of %s after its upload: %s", upload.path, group.exceptions[0])


class _CachedWithPut:
    """The chunk of a small file, cached on the SSD by its upload's thread right after the
    PUT (`Backend.upload(after_put=...)`), in room taken before (`DiskTier.reserve_unkeyed`)."""

    def __init__(self, upload: Upload, tier, tag: bytes, room: int):
        self.upload = upload
        self.tier = tier
        self.tag = tag
        self.room = room
        self.digest: bytes | None = None  # the chunk written

    @classmethod
    def reserve(cls, upload: Upload) -> _CachedWithPut | None:
        """Room for `upload`'s chunk, if it is one small chunk PUT from a thread (not from the
        trio thread: `Backend.puts_from_trio`) and the SSD tier has room now."""
        chunk_size = upload.dataset.reader.chunk_size
        if not 0 < upload.size <= min(CACHE_WITH_PUT, chunk_size):
            return None
        if upload.dataset.backend.puts_from_trio(upload.size):
            return None  # no PUT thread: cached after the close returned
        tier = next((t for t in upload.dataset.reader.tiers if t.medium == "disk"), None)
        if tier is None:
            return None
        tag = source_tag(upload.dataset.source)
        room = tier.reserve_unkeyed(tag, upload.size)
        return cls(upload, tier, tag, room) if room is not None else None

    def write(self, info: ObjectInfo) -> None:
        """Blocking, in the PUT's thread: the chunk of the object `info` the PUT made."""
        upload = self.upload
        if info.size != upload.size:
            return  # the store shows other bytes than ours
        key = chunk_key(ObjectId(upload.dataset.source, upload.path, info.version, info.size),
                        upload.dataset.reader.chunk_size, 0)
        fd = os.open(upload.staged.path, os.O_RDONLY | os.O_CLOEXEC | NOATIME)
        try:
            if self.tier.write_unkeyed(key.digest, fd, key.length):
                self.digest = key.digest
        finally:
            os.close(fd)

    def settle(self) -> bool:
        """Index the chunk written, or give the room back; whether it is cached."""
        return self.tier.settle_unkeyed(self.tag, self.room, self.digest)


async def _let_waiters_run() -> None:
    """Until the tasks woken before this call have run a step: the close waiting for an
    upload answers the kernel before the upload goes on to cache the file's chunks.

    Trio runs the tasks woken in one batch in either order, so one checkpoint can still
    come first; after two, every task woken before the first has run. Caching first kept
    close() waiting 0.5 ms (of 15) per small file, and the next file's requests behind it."""
    await trio.lowlevel.checkpoint()
    await trio.lowlevel.checkpoint()


def _read_at(path: str, length: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | NOATIME)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
