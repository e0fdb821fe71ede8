"""Files open for write: their bytes in the staging area until close.

A file opened for write on a read-write dataset gets one `WriteFile` per path
on this node, shared by every handle open on it. Its bytes are a staged file on
the SSD: created empty (create, O_TRUNC) or filled with the current content
(through the reader: cached chunks are not fetched again). Writes and reads are
plain pwrite/pread on it. Close (flush) and fsync seal the file and hand it to
the uploader (upload.py); until its upload lands, reads and attributes of the
path on this node come from the staged bytes, not the backend.

An upload holds the staged file it was given. A write that comes while it does
(another handle still open, or a write after fsync) first copies the file, so
an upload always sends one closed or fsync'd state of the file, never a mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from cachefs.errors import StagingFull
from cachefs.objects import ObjectId, ObjectInfo, join, key_at
from cachefs.staging import WRITE_OUT_STEP, StagedFile, Staging
from cachefs.upload import EarlyParts, Upload, Uploader

if TYPE_CHECKING:
    from cachefs.node import Dataset

log = logging.getLogger(__name__)

_ids = itertools.count(1)


class WriteFile:
    """One path open for write on this node. Every method runs on the trio thread."""

    def __init__(self, writes: Writes, dataset: Dataset, path: str, staged: StagedFile, fd: int, size: int):
        self.writes = writes
        self.dataset = dataset
        self.path = path
        self.staged = staged
        self.fd = fd
        self.size = size
        self.mtime = time.time()
        self.mtime_set = False  # `mtime` set (utimens), not a write's: a local store's file keeps it
        self.id = next(_ids)
        self.handles = 0
        self.dirty = False  # changed since the last seal
        self.sealed: Upload | None = None  # the last seal's upload
        # Parts sent while a new (or truncated) file is written in sequence (S3, large files).
        self.early: EarlyParts | None = None
        self._parts_from: set[EarlyParts] = set()  # those that sent parts from this file (`truncate`)
        self.written_to = 0  # where the last write ended: the next one is in sequence if it starts here
        self.unlinked = False  # deleted while open: its bytes go nowhere
        self.closed = False  # its last handle was released: its staged file is gone
        # Still being filled when its path was deleted: the file open there then, if one
        # was, which this open shares (`Writes.deleted`).
        self.same_as: WriteFile | None = None
        self.out_to = 0  # --writeback: the staged bytes before this are being written to the disk
        self._owning = trio.Lock()  # one `_own` at a time

    @property
    def key(self) -> tuple[str, str]:
        """(source, path): what `Writes` knows this file by."""
        return (self.dataset.source, self.path)

    @property
    def info(self) -> ObjectInfo:
        return ObjectInfo(self.path, "file", self.size, self.mtime, f"local:{self.id}:{self.size}")

    async def _own(self) -> None:
        """Make the staged file this file's alone (an upload holds the one we had). One
        task at a time: two writes that both found the file held each made a copy, and
        the second replaced the first's, with the write already made into it."""
        async with self._owning:
            staging = self.writes.staging
            if self.staged.holders == 1:
                return
            copy, fd = staging.create_file()
            try:
                try:
                    await staging.reserve(copy, self.size, fd)
                except StagingFull:
                    if self.staged.holders > 1:
                        raise
                    # The upload ended while we waited, and gave back no room (its hold was
                    # not the last): no copy is needed now, so no error either.
                needed = self.staged.holders > 1
                if needed:
                    await trio.to_thread.run_sync(_copy_range, self.fd, fd, self.size)
            except BaseException:
                os.close(fd)
                staging.release(copy)
                raise
            if not needed:
                os.close(fd)
                staging.release(copy)
                return
            os.close(self.fd)
            staging.release(self.staged)
            self.staged, self.fd = copy, fd
            self.out_to = 0  # the copy is all in the page cache

    async def write(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        while True:
            await self._own()
            await self.writes.staging.reserve(self.staged, max(end, self.size), self.fd)
            if self.staged.holders == 1:  # no seal came while we waited for room
                break
        written = os.pwrite(self.fd, data, offset)  # the page cache: no thread hop for 128 KiB
        if self.early is not None:
            self._send_early(offset, offset + written)
        if self.writes.writeback and offset + written >= self.out_to + WRITE_OUT_STEP:
            # A step more is written: the disk takes it now, not all at the fsync.
            step_end = (offset + written) // WRITE_OUT_STEP * WRITE_OUT_STEP
            self.writes.staging.write_out(self.staged, self.out_to, step_end)
            self.out_to = step_end
        self.size = max(self.size, offset + written)
        self.mtime, self.mtime_set = time.time(), False
        self.dirty = True
        return written

    def _send_early(self, start: int, end: int) -> None:
        early = self.early
        early.touched(start, end)
        if start != self.written_to:
            early.stopped = True  # not a sequential writer: it may come back to any part
        self.written_to = end
        self._parts_from.add(early)
        self.writes.uploader.send_early(self.dataset, self.path, early, self.staged, end)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    async def truncate(self, size: int) -> None:
        if size < self.size:
            # Early parts are sent from a mapping of this file (FsspecStore.put_part): cut
            # under one in flight, its read would fault, and SIGBUS ends the daemon. None
            # starts after this; those of parts the file has let go of (renamed or deleted
            # while open, or handed to a close that failed) may still be in flight too.
            if self.early is not None:
                self.early.stopped = True
            for early in list(self._parts_from):
                await early.settled()
            self._parts_from = {early for early in self._parts_from if early.sending}
        while True:
            await self._own()
            await self.writes.staging.reserve(self.staged, size, self.fd)
            if self.staged.holders == 1:
                break
        os.ftruncate(self.fd, size)
        self.out_to = min(self.out_to, size)
        if self.early is not None:
            self.early.touched(size, None)
            self.early.stopped = True
        self.size = size
        self.writes.staging.shrink(self.staged, size, self.fd)
        self.mtime, self.mtime_set = time.time(), False
        self.dirty = True

    def set_mtime(self, mtime: float) -> None:
        self.mtime, self.mtime_set = mtime, True

    async def commit(self, background: bool) -> Upload | None:
        """Seal the file as it is now and upload it; wait for the upload unless `background`.

        Raises:
            BackendError: the upload failed after its retries (not `background`).
        """
        await self.writes.settled(self)
        if not self.dirty or self.unlinked:
            return None
        self.dirty = False
        early, self.early = self.early, None  # later writes change a sealed state: no more early parts
        try:
            with self.writes.committing(self):
                upload = await self.writes.uploader.submit(
                    self.dataset, self.path, self.staged, self.size, background, early, mtime=self.mtime,
                    keep_mtime=self.mtime_set,
                )
        except BaseException:
            # Not sealed (the journal could not be written): still ours to upload, and the
            # parts sent early still of it. A later close or fsync tries again.
            self.dirty = True
            if self.early is None:
                self.early = early
            elif early is not None:
                self.writes.uploader.drop_early(self.dataset, self.path, early)
            raise
        self.sealed = upload
        if not background:
            await upload.landed.wait()
            if upload.error is not None:
                self.dirty = True  # still ours to upload: the next flush or fsync tries again
                raise upload.error
        return upload

    async def sync(self, background: bool) -> None:
        """fsync(): as `commit`; with `background` (--writeback), also until the journal
        holds the last seal durably, whether this call sealed it or an earlier close.

        Raises:
            BackendError: as `commit`.
            OSError: the journal's fsync failed.
        """
        await self.commit(background)
        if background and self.sealed is not None and self.sealed.entry is not None:
            await self.writes.staging.durable(self.sealed.entry)


class Writes:
    """The files open for write on this node, by (source, path)."""

    def __init__(self, staging: Staging, uploader: Uploader, writeback: bool = False):
        self.staging = staging
        self.uploader = uploader
        self.writeback = writeback  # --writeback: fsync() makes the staged bytes durable
        self.files: dict[tuple[str, str], WriteFile] = {}
        self._renaming: dict[tuple[str, str], trio.Event] = {}  # (source, directory) -> set once renamed
        self._renaming_files: dict[tuple[str, str], trio.Event] = {}  # (source, file) -> set once renamed
        self._filling: dict[tuple[str, str], set[WriteFile]] = {}  # files opens are filling, by path
        self._ended = trio.Event()  # set (and replaced) when an open's fill, a commit's submit or a deletion ends
        self._committing: set[WriteFile] = set()  # files whose commit is submitting its upload
        self._deletions: list[Deletion] = []  # deletions (and renames over a path) going on

    def find(self, dataset: Dataset, path: str) -> WriteFile | None:
        return self.files.get((dataset.source, path))

    def info(self, dataset: Dataset, path: str) -> ObjectInfo | None:
        """The attributes of `path` as written on this node and not uploaded yet, if so."""
        wf = self.find(dataset, path)
        if wf is not None and not wf.unlinked:
            return wf.info
        upload = self.uploader.latest(dataset, path)
        if upload is not None:
            mtime = upload.mtime if upload.mtime is not None else upload.sealed_at
            return ObjectInfo(path, "file", upload.size, mtime, f"local:upload:{id(upload)}")
        return None

    def children(self, dataset: Dataset, parent: str) -> list[ObjectInfo]:
        """Files right in directory `parent` written here and not uploaded yet."""
        out = {}
        keys = [k for k in self.files if k[0] == dataset.source] + [k for k in self.uploader.pending if k[0] == dataset.source]
        for _, path in keys:
            if path.rpartition("/")[0] == parent:
                info = self.info(dataset, path)
                if info is not None:
                    out[path] = info
        return list(out.values())

    async def open(self, dataset: Dataset, path: str, current: ObjectInfo | None, truncate: bool) -> WriteFile:
        """The WriteFile of `path`, one more handle on it. A new one starts empty
        (`truncate`, or no `current` file) or with the newest content of the path:
        an upload not landed yet, else `current` read through the dataset's reader.

        Raises:
            BackendError: the current content could not be read; StagingFull.
        """
        wf = self.find(dataset, path)
        made = None
        if wf is None:
            key = (dataset.source, path)
            staged, fd = self.staging.create_file()
            made = WriteFile(self, dataset, path, staged, fd, 0)
            self._filling.setdefault(key, set()).add(made)
            try:
                # The path is being deleted: this open is of the file that goes, unless the
                # deletion fails. Until it is known, the open waits, still filling: `deleted`
                # marks it unlinked, or after `reattach` it shares the file the path has, as
                # any two opens of one path do. (Registered at once, its close brought a
                # deleted file back; returned detached, a failed delete left its writes going
                # nowhere.) The kernel's directory lock holds back creates, not opens. It
                # waits before copying the file in: a copy under way when the delete
                # happened read an object that was gone, and the open failed (ENOENT), though
                # it was to share the file open there.
                await self._deletions_over(made)
                if not truncate and self._shared(made) is None:
                    await self._fill(made, current)
                    await self._deletions_over(made)  # one that began during the copy
            except BaseException:
                os.close(fd)
                self.staging.release(staged)
                raise
            finally:
                key = made.key  # renamed meanwhile (`moved`): its new name
                self._filling[key].discard(made)
                if not self._filling[key]:
                    del self._filling[key]
                self._one_ended()
            wf = self._shared(made)
            if wf is not None:
                os.close(fd)
                self.staging.release(staged)
            else:
                wf = made
                if not made.unlinked:
                    self.files[made.key] = made
        # This handle is taken first: the truncate below may wait, and a release of the
        # file's last other handle meanwhile would let go of its staged copy under it.
        wf.handles += 1
        if wf is not made and truncate and wf.size:
            try:
                await wf.truncate(0)
            except BaseException:
                self.close(wf)
                raise
        if wf.unlinked:
            return wf  # uploads nothing
        if truncate:
            wf.dirty = True  # an O_TRUNC open of an unchanged file still empties it at close
        # Any open of an empty file, not only an O_TRUNC one: fio creates its file, closes
        # it, and opens it again without O_TRUNC to write it; all its parts waited for the
        # close (close-to-open writes at 0.7x raw S3).
        if wf.early is None and wf.size == 0 and dataset.backend.takes_parts and wf.sealed is None:
            wf.early = EarlyParts(self.uploader.part_size)
        return wf

    async def _deletions_over(self, made: WriteFile) -> None:
        """Until no deletion of the path `made` is being opened at is going on, unless one
        already took the file it opens (`deleted`)."""
        while not made.unlinked and self._deletion_of(made.key) is not None:
            await self._ended.wait()

    def _shared(self, made: WriteFile) -> WriteFile | None:
        """The file the open making `made` shares instead, if there is one (`open`).

        Deleted (or replaced by a rename) while this open filled its copy, it opened the
        file that went, and, as after an unlink, writes to it go nowhere: the file open
        there then, if one was and still is, as two opens of one path share a file.
        Otherwise another open of the path may have made its file while this one was
        filled: one file per path, or each handle writes into a copy of its own and a close
        uploads one of them (two O_APPEND writers lost one's bytes to a hole)."""
        if made.unlinked:
            return _alive(made.same_as)
        return self.files.get(made.key)

    async def _fill(self, wf: WriteFile, current: ObjectInfo | None) -> None:
        while (upload := self.uploader.latest(wf.dataset, wf.path)) is not None:
            # Room first, holding nothing: the room may be the upload's own, given back only
            # once it lets go of its file (a hold taken before, waiting, made it ENOSPC).
            await self.staging.reserve(wf.staged, upload.size, wf.fd)
            if upload is self.uploader.latest(wf.dataset, wf.path) and not upload.done.is_set():
                break  # still the newest content, its file still there
            if upload.info is not None:
                current = upload.info  # it landed meanwhile: that is the stored file now
        if upload is not None:
            staged = upload.staged
            self.staging.hold(staged)  # the upload may end (and let go of it) while we copy
            try:
                src = await trio.to_thread.run_sync(os.open, staged.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    await trio.to_thread.run_sync(_copy_range, src, wf.fd, upload.size)
                finally:
                    os.close(src)
            finally:
                self.staging.release(staged)
            wf.size = upload.size
            return
        if current is None or current.kind != "file" or not current.size:
            return
        await self.staging.reserve(wf.staged, current.size, wf.fd)
        reader = wf.dataset.reader
        obj = ObjectId(wf.dataset.source, wf.path, current.version, current.size)
        for index in range(-(-current.size // reader.chunk_size)):
            data, _ = await reader.chunk(obj, index)
            await trio.to_thread.run_sync(os.pwrite, wf.fd, data, index * reader.chunk_size)
        wf.size = current.size
        wf.mtime = current.mtime

    def close(self, wf: WriteFile) -> None:
        """One handle of `wf` is released; the last one lets go of its staged file."""
        wf.handles -= 1
        if wf.handles:
            return
        wf.closed = True
        if wf.dirty and not wf.unlinked:
            log.error("%s: closed with changes that were never uploaded (the close failed); they are lost",
                      join(wf.dataset.name, wf.path))
        self._drop_early(wf)
        key = wf.key
        if self.files.get(key) is wf:
            del self.files[key]
        os.close(wf.fd)
        self.staging.release(wf.staged)

    async def settle(self, dataset: Dataset, path: str) -> None:
        """fsync() of `path` through a handle not open for write: the file open for write
        at `path` is synced as through its own handle; a closed one, until its newest
        upload is durable, as its close would have waited for (--writeback: journaled on
        disk; close-to-open: landed).

        Raises:
            BackendError: that upload failed (close-to-open); OSError: the journal's fsync.
        """
        wf = self.find(dataset, path)
        if wf is not None:
            await wf.sync(background=self.writeback)
            return
        upload = self.uploader.latest(dataset, path)
        if upload is None:
            return
        if upload.entry is not None:
            await self.staging.durable(upload.entry)
            return
        await upload.landed.wait()
        if upload.error is not None:
            raise upload.error

    def open_pending(self, dataset: Dataset, path: str) -> tuple[StagedFile, int] | None:
        """For reading: the staged bytes of the newest upload of `path` not landed yet
        (held until `close_pending`) and an fd of them; None if there is none."""
        upload = self.uploader.latest(dataset, path)
        if upload is None:
            return None
        self.staging.hold(upload.staged)
        try:
            fd = os.open(upload.staged.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.staging.release(upload.staged)
            raise
        return upload.staged, fd

    def close_pending(self, opened: tuple[StagedFile, int]) -> None:
        staged, fd = opened
        os.close(fd)
        self.staging.release(staged)

    async def filled(self, dataset: Dataset, path: str, under: bool = False) -> None:
        """Until no open of `path` (`under`: of a file under directory `path`) is still
        copying its current content in: a rename waits, or the copy would go on reading
        the object the rename deletes or moves (ENOENT)."""
        while any(key_at(key, dataset.source, path, under) for key in self._filling):
            await self._ended.wait()

    @contextlib.contextmanager
    def committing(self, wf: WriteFile):
        """While `wf`'s commit submits its upload (which may wait for the journal): a
        directory rename waits for it (`committed`), or it would upload to the old name."""
        self._committing.add(wf)
        try:
            yield
        finally:
            self._committing.discard(wf)
            self._one_ended()

    async def committed(self, dataset: Dataset, path: str, under: bool = True) -> None:
        """Until no commit of a file under directory `path` (not `under`: of the file `path`)
        is submitting its upload."""
        while any(key_at(wf.key, dataset.source, path, under) for wf in self._committing):
            await self._ended.wait()

    def _one_ended(self) -> None:
        """An open's fill, a commit's submit or a deletion ended: wake those waiting for it."""
        self._ended.set()
        self._ended = trio.Event()

    def moved(self, dataset: Dataset, old: str, new: str) -> None:
        """`old` was renamed to `new`: its open file now writes to `new`."""
        self.deleted(self.unlinked(dataset, new))  # a file open at `new` was replaced: it uploads nothing now
        self._rekey(dataset, old, new)

    def moved_dir(self, dataset: Dataset, old: str, new: str) -> None:
        """Directory `old` was renamed to `new`: the files open under it write under `new`."""
        moving = {key for key in [*self.files, *self._filling] if key_at(key, dataset.source, old, under=True)}
        for _, path in moving:
            self._rekey(dataset, path, new + path[len(old):])
        for deletion in self._deletions:  # a failed delete gives the path back in the new place
            source, path = deletion.key
            if key_at(deletion.key, dataset.source, old, under=True):
                deletion.key = (source, new + path[len(old):])
                if deletion.detached is not None:
                    deletion.detached.path = deletion.key[1]

    def _rekey(self, dataset: Dataset, old: str, new: str) -> None:
        for filling in self._filling.pop((dataset.source, old), ()):
            filling.path = new  # an open still filling its copy opened the file that moved
            self._filling.setdefault((dataset.source, new), set()).add(filling)
        wf = self.files.pop((dataset.source, old), None)
        if wf is not None:
            self._drop_early(wf)  # sent as parts of `old`'s key
            wf.path = new
            self.files[(dataset.source, new)] = wf

    def under(self, dataset: Dataset, directory: str) -> list[WriteFile]:
        """The files open for write under `directory`."""
        return [wf for key, wf in self.files.items() if key_at(key, dataset.source, directory, under=True)]

    @contextlib.asynccontextmanager
    async def renaming_dir(self, dataset: Dataset, directory: str, upload_wait: float):
        """Around the backend's rename of `directory`: what this node wrote under it lands
        first (as for a file: the files open for write committed, the uploads of closed ones
        done, the opens copying a file in finished), and a commit of a file under it waits
        until the rename is over, then uploads under the name the file has after it (no
        kernel lock holds back the close of a file inside a directory being renamed, and
        its upload to the old name would fail once the directory has moved).

        Raises:
            BackendError: a commit failed; BackendUnavailable: uploads still pending after
                `upload_wait` seconds.
        """
        for wf in self.under(dataset, directory):
            if wf.handles and self.find(dataset, wf.path) is wf:  # not closed meanwhile
                await wf.commit(background=False)
        key = (dataset.source, directory)
        done = self._renaming[key] = trio.Event()
        try:
            # Deletions under it (an `rm` that began first) end first: one that went on
            # after the move deleted nothing at its old name, reported success, and left
            # the file, detached, at the new one.
            while self._deletion_of(key, under=True) is not None:
                await self._ended.wait()
            await self.committed(dataset, directory)  # commits that were past `no_rename_over`
            await self.filled(dataset, directory, under=True)
            await self.uploader.wait(dataset, directory, upload_wait, under=True)
            yield
        finally:
            del self._renaming[key]
            done.set()

    @contextlib.asynccontextmanager
    async def renaming_file(self, dataset: Dataset, path: str, upload_wait: float):
        """Around the backend's rename of file `path`: what this node wrote to it lands
        first (the file open for write committed, the uploads of its closes done, each
        recorded: the cached chunks that move are of that version, and no pending entry
        shows the old name again; the opens copying it in finished), and a commit of it
        waits until the rename is over (`no_rename_over`), then uploads under the name the
        file has after it: one landing at `path` after the move would bring `path` back (a
        writer syncing its log during `mv log log.1`).

        Raises:
            BackendError: the commit failed; BackendUnavailable: uploads still pending after
                `upload_wait` seconds.
        """
        wf = self.find(dataset, path)
        if wf is not None:
            await wf.commit(background=False)
        key = (dataset.source, path)
        done = self._renaming_files[key] = trio.Event()
        try:
            await self.committed(dataset, path, under=False)  # a close already submitting its upload
            await self.uploader.wait(dataset, path, upload_wait)
            await self.filled(dataset, path)  # opens of it still copying it in (no kernel lock)
            yield
        finally:
            if self._renaming_files.get(key) is done:
                del self._renaming_files[key]
            done.set()

    async def no_rename_over(self, wf: WriteFile) -> None:
        """Until neither `wf` itself (`renaming_file`) nor a directory it lies under
        (`renaming_dir`) is being renamed."""
        while True:
            done = self._renaming_files.get(wf.key) if self._renaming_files else None
            if done is None:
                done = self.renaming_above(wf.dataset, wf.path)
            if done is None:
                return
            await done.wait()

    def renaming_above(self, dataset: Dataset, path: str) -> trio.Event | None:
        """The rename of a directory `path` lies under, if one is going on (`renaming_dir`):
        an event set once it is over."""
        if not self._renaming:
            return None
        key = (dataset.source, path)
        return next((done for (source, directory), done in self._renaming.items()
                     if key_at(key, source, directory, under=True)), None)

    def unlinked(self, dataset: Dataset, path: str) -> Deletion:
        """`path` is being deleted (or replaced): the file open at it lives on, anonymous,
        and uploads nothing; opens of it wait for the outcome (`open`), and so does a close
        of the file detached (`settled`). Returns the deletion, for `deleted` once it
        happened or `reattach` if it failed: one of the two must follow."""
        wf = self.files.pop((dataset.source, path), None)
        if wf is not None:
            self._drop_early(wf)
            wf.unlinked = True
        deletion = Deletion((dataset.source, path), wf)
        self._deletions.append(deletion)
        return deletion

    def deleted(self, deletion: Deletion) -> None:
        """The deletion happened: the file it detached stays so, and the opens of the path
        still filling opened the file that went, that one (`open`): as after an unlink, they
        upload nothing."""
        self._deletions.remove(deletion)
        same = _alive(deletion.detached)
        for filling in self._filling.get(deletion.key, ()):
            if not filling.unlinked:  # else an earlier deletion took the file it opened
                filling.unlinked = True
                filling.same_as = same
        self._one_ended()

    def reattach(self, deletion: Deletion) -> None:
        """The deletion failed: the file it detached is the path's again (its parts sent
        early are gone: it uploads whole at its close), unless its last handle was let go
        of meanwhile."""
        self._deletions.remove(deletion)
        wf = _alive(deletion.detached)
        if wf is not None and wf.key not in self.files:
            wf.unlinked = False
            self.files[wf.key] = wf
        self._one_ended()

    async def deleting(self, dataset: Dataset, path: str) -> WriteFile | None:
        """For an open of `path` not for write: until no deletion of it is going on, as for
        one for write (`open`). Returns the file open at the path when a deletion that
        happened detached it, if it is still open: the open reads that file, as two opens
        of one path do (a reader let through read the stored object, not what the file
        open there held, even after the delete failed)."""
        detached = None
        while (deletion := self._deletion_of((dataset.source, path))) is not None:
            detached = deletion.detached
            await self._ended.wait()
        return _alive(detached) if detached is not None and detached.unlinked else None

    def _deletion_of(self, key: tuple[str, str], under: bool = False) -> Deletion | None:
        """A deletion going on of (source, path) `key` (`under`: of a path under that
        directory), if there is one."""
        return next((d for d in self._deletions if key_at(d.key, *key, under)), None)

    async def settled(self, wf: WriteFile) -> None:
        """Until neither `wf` nor a directory it lies under is being renamed (`no_rename_over`)
        and no deletion that detached `wf` is going on, both at once: a commit then uploads under
        the path the file has, and only if the deletion failed (uploading nothing then lost
        its writes; uploading anyway would bring a deleted file back). Each wait may let
        the other begin: a delete failing while a directory rename began uploaded to the
        old name while the directory moved."""
        while True:
            await self.no_rename_over(wf)
            if not any(d.detached is wf for d in self._deletions):
                return
            await self._ended.wait()

    def _drop_early(self, wf: WriteFile) -> None:
        if wf.early is not None:
            self.uploader.drop_early(wf.dataset, wf.path, wf.early)
            wf.early = None


@dataclasses.dataclass(eq=False)
class Deletion:
    """A deletion of a path, or a rename over it, from `Writes.unlinked` until `Writes.deleted`
    or `Writes.reattach`."""

    key: tuple[str, str]  # (source, path); a directory rename meanwhile moves it (`moved_dir`)
    detached: WriteFile | None  # the file that was open at the path, if one was


def _alive(wf: WriteFile | None) -> WriteFile | None:
    """`wf`, unless there is none or its last handle was released (its staged file gone)."""
    return wf if wf is not None and not wf.closed else None


def _copy_range(src: int, dst: int, size: int) -> None:
    offset = 0
    while offset < size:
        n = os.copy_file_range(src, dst, size - offset, offset, offset)
        if n == 0:
            raise OSError(f"copy ended {size - offset} bytes early")
        offset += n
