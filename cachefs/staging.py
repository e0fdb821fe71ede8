"""The staging area: written files on the SSD until the backend has them.

Layout under --cache-dir: `staging/<id>` holds the bytes of one file being
written (or closed and not yet uploaded), `journal/<seq>.json` one closed file
waiting for its upload under --writeback. Eviction never touches either.

Room: staged bytes count against --stage-size and against the SSD tier's
--cache-size (chunks are evicted to make room), reserved a mebibyte at a time
before the bytes are written, so neither bound is ever overshot (a file let go
of is removed in a thread, and its room comes back once it is gone). A writer that
needs room while closed files are waiting for their uploads waits for them
(back-pressure); if only files still open hold the room, nothing would ever
free it, and the write fails with ENOSPC (`StagingFull`) instead of hanging
(files being removed count as freeing room).

Durability (--writeback): close() writes a closed file's journal entry (one
write(2) into an empty entry file created ahead, on the trio thread: a thread hop
there made the close wait behind the committer's fsyncs, 3.4 ms a file against
0.8) and returns; a process killed after that loses nothing, the kernel has the
bytes. Staged files and entry files are created ahead, SPARES at a time, in a
thread (`housekeep_forever`): a create on the trio thread waited for ext4's journal
and held up every request of the mount. The committer then makes entries
durable in rounds (group commit): it fsyncs the staged bytes and the entry of
every file journaled since its last round and not uploaded yet, then the two
directories once, off the close path, so a writer does not wait for the disk
once per file (three fsyncs per close made --writeback slower than upload on
close for small files). A round starts COMMIT_INTERVAL after the first entry
it covers (ext4 commits its journal every 5 s too), or at once when fsync()
waits for it: most small files have landed by then and need no fsync at all
(a round after every close kept the SSD busy with two fsyncs per file, and the
creates of new files waited behind them). A large file's bytes are written out
while it is written, WRITE_OUT_STEP at a time (`write_out`: started, not waited
for), so the fsync that ends it waits for its last step, not for all of it.
What an OS crash or power loss can
take is what a local filesystem would: files closed but not fsync'd within
the last COMMIT_INTERVAL and not uploaded yet. At the next start, `open` keeps the entries whose staged
file has the entry's size (a crash before the round can leave a short file: that
entry is dropped with an error line, as is an entry the crash cut short, which
no rename guards: like a short staged file, it was never fsync'd); empty entry
files (spares never used) and staged files no entry names (files open at the
crash, spares) are deleted.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import itertools
import json
import logging
import math
import os
import time
import uuid
from typing import TYPE_CHECKING

import trio

from cachefs import metrics
from cachefs.backend import NOATIME, fsync_path
from cachefs.config import format_size
from cachefs.errors import StagingFull

if TYPE_CHECKING:
    from cachefs.cache.disk import DiskTier

log = logging.getLogger(__name__)

# Room is reserved in steps of this many bytes, not per write.
RESERVE_STEP = 1 << 20
# Past this size, room is reserved this far ahead of the writes (while it can be had) and
# its disk blocks allocated with it (`_preallocate`): a 1 MiB step took a statvfs and an
# eviction pass every other FUSE write, and ext4 spent a tenth of the daemon's CPU writing
# a large file allocating its blocks one page at a time (delayed allocation).
RESERVE_AHEAD = 8 << 20
# Seconds from a file's close to the committer's round that makes it durable, unless
# fsync() asks sooner or its upload lands first.
COMMIT_INTERVAL = 5.0
# Empty staged files and journal entry files kept created ahead (each kind), made again
# in a thread once half are used: see `Staging.housekeep_forever`.
SPARES = 16
# Seconds housekeep_forever gathers files to remove before a round: one thread hop per
# file let go of cost more CPU than the unlinks it moved off the trio thread.
REMOVE_INTERVAL = 0.05
# How often a writer waiting for room the cache disk refused asks it again.
DISK_RECHECK = 1.0
# Under --writeback, a file's staged bytes are written out to the disk this many at a
# time as they are written (`write_out`), so that its fsync() waits for the last step
# only: fsync() of a 256 MiB file written at once took 0.5 s, a third of the writer's time.
WRITE_OUT_STEP = 8 << 20


@dataclasses.dataclass(eq=False)
class StagedFile:
    """The bytes of one file on local disk. Held by the file open for write and by
    each upload of it in flight; deleted when the last holder lets go."""

    path: str
    reserved: int = 0  # bytes of room held for it
    holders: int = 1
    keep: bool = False  # a journaled upload cut short resumes from it at the next start
    # Emptied and reused as a spare once let go of (`Staging.housekeep_forever`). Not if
    # something reads it without holding it (early parts): emptied, its mapping would fault.
    reusable: bool = True


@dataclasses.dataclass
class JournalEntry:
    """A closed file waiting to be uploaded (--writeback), as kept on disk."""

    seq: int
    source: str  # the dataset's source URL
    path: str  # inside the source
    staged: str  # the StagedFile's path
    size: int
    sealed_at: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


class Staging:
    """Room, files and the journal of one node's written files.

    Args:
        cache_dir: where `staging/` and `journal/` live (the SSD tier's directory).
        limit: --stage-size, in bytes.
        disk: the SSD tier, whose --cache-size the staged bytes count against; None: no SSD tier.
    """

    def __init__(self, cache_dir: str, limit: int, disk: DiskTier | None):
        self.dir = os.path.join(cache_dir, "staging")
        self.journal_dir = os.path.join(cache_dir, "journal")
        self.limit = limit
        self.disk = disk
        self.used = 0  # bytes reserved by staged files
        self.draining = 0  # bytes of staged files waiting for or in an upload: they will free room
        self.removing = 0  # room of files let go of, given back once housekeep_forever removed them
        self._freed = trio.Event()
        self._seq = itertools.count(1)
        self._unsynced: dict[int, JournalEntry] = {}  # journaled, waiting for the committer
        self._syncing: dict[int, JournalEntry] = {}  # in the committer's round now
        self._journaled = trio.Event()  # set when _unsynced gains an entry
        self._asked = trio.Event()  # set when fsync() waits for an entry in _unsynced
        self._round_done = trio.Event()  # set (and replaced) after each round
        self._failed: set[int] = set()  # seqs whose round failed: fsync() reports EIO
        # Files created ahead by `housekeep_forever`, taken oldest first: (StagedFile, fd)
        # empty staged files, and (seq, fd) empty journal entry files in seq order.
        self._spare_files: collections.deque[tuple[StagedFile, int]] = collections.deque()
        self._spare_entries: collections.deque[tuple[int, int]] = collections.deque()
        self._spares_low = True  # half the spares of a kind are used (the first ones: at the start)
        self._preparing: trio.Event | None = None  # set when the spares being made are in
        self._kept: dict[str, int] = {}  # staged file kept for its journal entry -> its room, still counted
        self._kept_held: dict[str, StagedFile] = {}  # the same, while another holder still holds it
        self._entry_order = trio.Lock()  # journal()s waiting for entry files, in the order they came
        # Files let go of, for `housekeep_forever`: (path, room to give back after, reuse). A
        # staged or entry file to reuse is emptied and kept as a spare, if spares are wanted.
        self._doomed: list[tuple[str, int, bool]] = []
        self._housekeeping = False  # housekeep_forever runs: it removes, not the trio thread
        self._chores = trio.Event()  # set when there is something for housekeep_forever
        self._chores.set()
        self._spares_wanted = trio.Event()  # set when _spares_low becomes true
        self._unremoved: set[str] = set()  # entry files doomed and not removed or emptied yet (`forget` waits)
        self._removal_round = trio.Event()  # set (and replaced) after each removal round
        self._write_out, self._writing_out = trio.open_memory_channel(math.inf)  # (path, start, end)
        metrics.STAGING_CAPACITY.set(limit)
        metrics.STAGED_BYTES.set_function(lambda: self.used)

    def open(self) -> list[JournalEntry]:
        """Create the directories; return the journal's entries (oldest first) and
        delete staged files that none of them names. Blocking: run in a thread."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(self.journal_dir, mode=0o700, exist_ok=True)
        entries = []
        for name in os.listdir(self.journal_dir):
            full = os.path.join(self.journal_dir, name)
            if not name.endswith(".json") or os.path.getsize(full) == 0:
                # An entry cut short before its rename (older versions), a spare never used, or
                # one an OS crash left empty (never fsync'd): never promised to anyone.
                os.unlink(full)
                continue
            try:
                with open(full) as f:
                    entry = JournalEntry(**json.load(f))
                if os.path.getsize(entry.staged) != entry.size:
                    raise ValueError(f"{entry.staged} is not {entry.size} bytes")
            except (OSError, ValueError, TypeError) as e:
                log.error("journal entry %s is unusable, dropped: %s", full, e)
                os.unlink(full)
                continue
            entries.append(entry)
        entries.sort(key=lambda e: e.seq)
        self._seq = itertools.count(max((e.seq for e in entries), default=0) + 1)
        named = {os.path.basename(e.staged) for e in entries}
        for name in os.listdir(self.dir):
            if name not in named:
                os.unlink(os.path.join(self.dir, name))  # open for write at the crash: never closed
        return entries

    def count_kept(self, entries: list[JournalEntry]) -> None:
        """The staged files of the entries `open` found take their room now, until resumed
        (`adopt`) or dropped: an entry whose source is not (yet) a dataset's keeps its
        bytes on the disk meanwhile."""
        for entry in entries:
            room = _rounded(entry.size)
            self._kept[entry.staged] = self._kept.get(entry.staged, 0) + room
            self._take_found(room)

    def adopt(self, entry: JournalEntry) -> StagedFile:
        """The staged file of a journal entry found by `open` (or kept after its upload was
        given up: `release`), with its room taken (and
        the blocks allocated ahead past its end, before the crash, freed: not counted)."""
        held = self._kept_held.pop(entry.staged, None)
        if held is not None:
            # Kept while still held (a file open for write at it, of the removed dataset):
            # the one staged file, its room counted once, goes on with this upload.
            held.keep = False
            held.holders += 1
            return held
        with contextlib.suppress(OSError):
            fd = os.open(entry.staged, os.O_WRONLY | os.O_CLOEXEC)
            try:
                _free_tail(fd, entry.size)
            finally:
                os.close(fd)
        kept = self._kept.pop(entry.staged, 0)
        if kept:
            self._give_back(kept)  # kept by this process, and counted since: taken again below
        room = _rounded(entry.size)
        self._take_found(room)
        return StagedFile(entry.staged, reserved=room)

    def _take_found(self, room: int) -> None:
        """Count `room` of a staged file already on the disk: taken even if over a bound lowered since."""
        self.used += room
        if self.disk is not None:
            self.disk.take(room)

    # -- files ------------------------------------------------------------------------

    def new_file(self) -> StagedFile:
        """A staged file not created yet (the caller creates it); see `create_file`."""
        return StagedFile(os.path.join(self.dir, uuid.uuid4().hex))

    def create_file(self) -> tuple[StagedFile, int]:
        """An empty staged file and an fd of it, open for read and write: one created ahead
        if any is left (no create on the trio thread), else created now. No checkpoint.

        Raises:
            OSError: it could not be created.
        """
        self._used_spare(self._spare_files)
        if self._spare_files:
            return self._spare_files.popleft()
        staged = self.new_file()
        return staged, _create(staged.path)

    def _used_spare(self, spares: collections.deque) -> None:
        if len(spares) <= SPARES // 2:
            self._spares_low = True
            self._spares_wanted.set()
            self._chores.set()

    async def housekeep_forever(self) -> None:
        """Create and remove the staging area's files in a thread, for the trio thread: a
        create or an unlink there waits for ext4's journal, behind the committer's fsyncs,
        and every request of the mount with it (under --writeback with 4 writers of small
        files, the two creates and two unlinks of each file held it 2 ms per file).

        Keeps SPARES empty staged files and journal entry files created ahead. The files let
        go of (`release`, `forget`) come back as spares, emptied, in batches, as long as
        spares are wanted; the others are removed. New ones are made once half the spares
        are used. Their room is given back once they are empty or gone, so the disk never
        holds more than the bounds. Entry files take their seqs when made or reused, in
        order, so entries still replay in the order the files were closed.

        Reused, not removed and made again: on an ext4 without a journal every create
        skips, one by one, the inodes freed in the last minutes (`recently_deleted`). With a
        file removed per file written, that was a fifth of the daemon's CPU writing small
        files (perf), and over 2,000 files on a fresh file system 0.5 ms per file. When
        cancelled (the node stops), it removes what is left to remove and the spares not used."""
        self._housekeeping = True
        try:
            while True:
                await self._chores.wait()
                if not self._spares_low:  # only removals: gather more first, unless spares run low
                    with trio.move_on_after(REMOVE_INTERVAL):
                        await self._spares_wanted.wait()
                self._chores = trio.Event()
                doomed, self._doomed = self._doomed, []
                remove, reuse_files, reuse_entries = [], [], []
                files_wanted = SPARES - len(self._spare_files)
                entries_wanted = SPARES - len(self._spare_entries)
                for path, _, reuse in doomed:
                    entry = self._is_entry(path)
                    if reuse and entry and len(reuse_entries) < entries_wanted:
                        reuse_entries.append((path, next(self._seq)))
                    elif reuse and not entry and len(reuse_files) < files_wanted:
                        reuse_files.append(path)
                    else:
                        remove.append(path)
                files, seqs = 0, []
                if self._spares_low:
                    self._spares_low = False
                    self._spares_wanted = trio.Event()
                    files = files_wanted - len(reuse_files)
                    seqs = [next(self._seq) for _ in range(entries_wanted - len(reuse_entries))]
                if reuse_entries or seqs:
                    self._preparing = trio.Event()
                made: tuple[list, list] = ([], [])
                try:
                    with trio.CancelScope(shield=True):  # what the thread makes is ours to remove
                        made = await trio.to_thread.run_sync(self._housekeep, remove, reuse_files, reuse_entries,
                                                             files, seqs)
                except OSError as e:
                    log.warning("could not create spare staging files (they are made on demand): %s", e)
                finally:
                    if self._preparing is not None:
                        self._preparing.set()
                        self._preparing = None
                    self._removed(doomed)
                self._spare_files.extend(made[0])
                self._spare_entries.extend(made[1])
        finally:
            self._housekeeping = False
            doomed, self._doomed = self._doomed, []
            _remove_all([p for p, _, _ in doomed])
            self._removed(doomed)
            self._unremoved.clear()  # all removed now: no forget may wait for a round any more
            self.drop_spares()

    def _housekeep(
        self, remove: list[str], reuse_files: list[str], reuse_entries: list[tuple[str, int]], files: int,
        seqs: list[int],
    ) -> tuple[list[tuple[StagedFile, int]], list[tuple[int, int]]]:
        """Blocking: empty the staged files `reuse_files` and the entry files `reuse_entries`
        ((path, its new seq)) as spares (one that cannot be is removed); remove `remove`; then
        create `files` staged files and entry files for `seqs`. Returns the spares (on an
        error, none: what was made or reused is removed). Entries to reuse are the oldest
        let go of, and are emptied before the others are removed: a kill in between
        never leaves an older entry of a path whole and a newer one gone, which a restart
        would replay over the newer bytes already landed."""
        reused: list[tuple[StagedFile, int]] = []
        reused_entries: list[tuple[int, int]] = []
        for path in reuse_files:
            try:
                reused.append(self._reuse_file(path))
            except OSError as e:
                log.debug("could not reuse %s (removed): %s", path, e)
                _remove_all([path])
        for path, seq in reuse_entries:
            try:
                reused_entries.append((seq, self._reuse_entry(path, seq)))
            except OSError as e:
                log.debug("could not reuse %s (removed): %s", path, e)
                _remove_all([path])
        _remove_all(remove)
        try:
            made, entries = self._make_spares(files, seqs)
        except BaseException:
            self._discard(reused, reused_entries)
            raise
        return reused + made, reused_entries + entries

    def _reuse_file(self, path: str) -> tuple[StagedFile, int]:
        """Blocking: the staged file `path`, emptied, as a spare under a new name: a journal
        entry of its last content, should an OS crash bring one back, names no file then."""
        staged = self.new_file()
        os.rename(path, staged.path)
        try:
            return staged, os.open(staged.path, os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC)
        except BaseException:
            _remove_all([staged.path])  # under its new name: the caller removes the old one
            raise

    def _reuse_entry(self, path: str, seq: int) -> int:
        """Blocking: the entry file `path`, emptied (never to be replayed again), renamed
        as the spare entry `seq`; its fd."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.rename(path, self._seq_path(seq))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _is_entry(self, path: str) -> bool:
        return os.path.dirname(path) == self.journal_dir

    def _make_spares(self, files: int, seqs: list[int]) -> tuple[list[tuple[StagedFile, int]], list[tuple[int, int]]]:
        """Blocking: create the spares; on an error, none (what was made is removed)."""
        made: list[tuple[StagedFile, int]] = []
        entries: list[tuple[int, int]] = []
        try:
            for _ in range(files):
                staged = self.new_file()
                made.append((staged, _create(staged.path)))
            for seq in seqs:
                entries.append((seq, _create(self._seq_path(seq))))
        except BaseException:
            self._discard(made, entries)
            raise
        return made, entries

    def drop_spares(self) -> None:
        """Remove the spares not used (a restart removes them too). Blocking: 2 x SPARES unlinks at most."""
        files, entries = list(self._spare_files), list(self._spare_entries)
        self._spare_files.clear()
        self._spare_entries.clear()
        self._discard(files, entries)

    def _discard(self, files: list[tuple[StagedFile, int]], entries: list[tuple[int, int]]) -> None:
        """Blocking: close and remove spares, (StagedFile, fd) files and (seq, fd) entry files."""
        for path, fd in [(s.path, fd) for s, fd in files] + [(self._seq_path(q), fd) for q, fd in entries]:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def reserve(self, staged: StagedFile, size: int, fd: int | None = None) -> None:
        """Make sure `staged` has room for `size` bytes, waiting for uploads to free some.
        A file past RESERVE_AHEAD gets room up to the next multiple of it if there is that
        much, and with `fd` (the file, open for write) its disk blocks too, as does a jump
        of RESERVE_AHEAD or more (only steps under it stay sparse until written).

        Raises:
            StagingFull: no upload is pending that could free room.
        """
        waited = False
        while (need := _rounded(size) - staged.reserved) > 0:
            ahead = _ahead(size) - staged.reserved
            if ahead > need and await self._take(ahead):
                if fd is not None:
                    _preallocate(fd, staged.reserved, ahead)
                staged.reserved += ahead
                return
            if await self._take(need):
                if fd is not None and need >= RESERVE_AHEAD:
                    # A jump (a truncate up, a file copied in): its blocks now, or the disk
                    # shows the room free, and chunks cached meanwhile take it.
                    _preallocate(fd, staged.reserved, need)
                staged.reserved += need
                return
            disk_refused = self.used + need <= self.limit  # not the staging limit
            if not self.draining and not self.removing:
                if disk_refused:
                    raise StagingFull(
                        f"no room on the cache disk for {format_size(need)} more of a file open for write "
                        f"({format_size(self.used)} staged; the rest of --cache-size is pinned, or the disk is "
                        f"within --free-space-ratio of full): free space on it or raise --cache-size"
                    )
                raise StagingFull(
                    f"staging is full ({format_size(self.used)} of {format_size(self.limit)} held by files "
                    f"open for write); raise --stage-size or --cache-size"
                )
            if not waited:
                metrics.STAGING_WAITS.inc()
                waited = True
            # The disk's room comes back with nothing here to tell (a pin lease ending, space
            # freed on the disk by others): it is asked again now and then.
            with trio.move_on_after(DISK_RECHECK if disk_refused else math.inf):
                await self._freed.wait()

    async def _take(self, need: int) -> bool:
        if self.used + need > self.limit:
            return False
        # Counted before the claim, which may wait (evicting chunks): a writer checking
        # meanwhile must see it, or both pass the check and the limit is overshot.
        self.used += need
        try:
            claimed = self.disk is None or await self.disk.claim(need)
        except BaseException:
            self._unclaimed(need)
            raise
        if not claimed:
            self._unclaimed(need)
        return claimed

    def _unclaimed(self, need: int) -> None:
        """Room counted by `_take` that the disk did not give after all."""
        self.used -= need
        self._freed.set()  # a writer that found it counted may fit now
        self._freed = trio.Event()

    def shrink(self, staged: StagedFile, size: int, fd: int | None = None) -> None:
        """`staged` (open as `fd`) was truncated to `size` bytes: give back the room it no
        longer needs, and the disk blocks allocated ahead in it."""
        spare = staged.reserved - _rounded(size)
        if spare > 0:
            if fd is not None:
                _free_tail(fd, size)
            staged.reserved -= spare
            self._give_back(spare)

    def hold(self, staged: StagedFile) -> None:
        staged.holders += 1

    def release(self, staged: StagedFile, keep_file: bool = False) -> None:
        """One holder lets go; the last one deletes the file (unless `keep_file`: a
        journaled upload that must resume at the next start) and frees its room."""
        staged.holders -= 1
        staged.keep |= keep_file  # whoever lets go last: the journal still needs the file
        if staged.holders > 0:
            if keep_file:
                self._kept_held[staged.path] = staged  # `adopt` takes it over as it is
            return
        self._kept_held.pop(staged.path, None)
        room, staged.reserved = staged.reserved, 0
        if staged.keep:
            # Still on the disk, so still counted, until its entry is resumed (`adopt`) or
            # dropped (`drop_entry`), or the node stops.
            self._kept[staged.path] = self._kept.get(staged.path, 0) + room
            return
        if self._housekeeping:
            self._doom(staged.path, room, reuse=staged.reusable)
            return
        _remove_all([staged.path])
        self._give_back(room)

    def _doom(self, path: str, room: int, reuse: bool) -> None:
        self._doomed.append((path, room, reuse))
        self.removing += room
        self._chores.set()

    def _removed(self, doomed: list[tuple[str, int, bool]]) -> None:
        room = sum(r for _, r, _ in doomed)
        self.removing -= room
        self._give_back(room)
        self._unremoved.difference_update(p for p, _, _ in doomed)
        self._removal_round.set()
        self._removal_round = trio.Event()

    def _give_back(self, room: int) -> None:
        self.used -= room
        if self.disk is not None:
            self.disk.give_back(room)
        self._freed.set()
        self._freed = trio.Event()

    def draining_changed(self, delta: int) -> None:
        self.draining += delta
        if not self.draining:
            self._freed.set()  # waiters must see that nothing more will come
            self._freed = trio.Event()

    # -- durability -------------------------------------------------------------------

    def write_out(self, staged: StagedFile, start: int, end: int) -> None:
        """Have the kernel start writing bytes [start, end) of `staged` to the disk, not
        waiting for it (`write_out_forever` does it in a thread): a later fsync() of the
        file then waits for what was written since. No checkpoint."""
        if _sync_file_range is not None:
            self._write_out.send_nowait((staged.path, start, end))

    async def write_out_forever(self) -> None:
        """Start the writes `write_out` asked for, one at a time. Runs until cancelled."""
        async for path, start, end in self._writing_out:
            try:
                await trio.to_thread.run_sync(_start_write_out, path, start, end)
            except FileNotFoundError:
                pass  # uploaded and let go of already: nothing to keep
            except OSError as e:  # the fsync that needs these bytes reports its own error
                log.debug("could not start writing %s out: %s", path, e)

    # -- journal ----------------------------------------------------------------------

    async def journal(
        self, source: str, path: str, staged: StagedFile, size: int, sealed_at: float | None = None
    ) -> JournalEntry:
        """Journal a closed file, so that a restart uploads it. Returns once the entry is
        written (to the page cache); `durable` waits for it to be on disk. Checkpoints only
        if no spare entry file is left and spares are being made (it waits for them).

        Raises:
            OSError: the entry could not be written.
        """
        self._used_spare(self._spare_entries)
        if self._entry_order.locked() or (not self._spare_entries and self._preparing is not None):
            # Spares being made hold the next seqs: wait for them, in line (trio's Lock is
            # FIFO). Woken together by one event, waiters took the seqs in any order, and
            # the later of two closes of a path could take the lower seq and land first.
            async with self._entry_order:
                while not self._spare_entries and self._preparing is not None:
                    await self._preparing.wait()
                seq, fd = self._entry_file()
        else:
            seq, fd = self._entry_file()
        entry = JournalEntry(seq, source, path, staged.path, size, time.time() if sealed_at is None else sealed_at)
        data = entry.to_json().encode()
        try:
            # One write of a file made empty ahead (or now), no temporary name and rename: a
            # kill leaves it whole (the kernel has it), and one an OS crash cuts short (or
            # empty) was not durable yet, so `open` drops it as it drops an entry whose
            # staged bytes are short.
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"short write of journal entry {entry.seq}")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self._entry_path(entry))  # the write's error is the one to report
            raise
        os.close(fd)
        self._unsynced[entry.seq] = entry
        self._journaled.set()
        return entry

    def _entry_file(self) -> tuple[int, int]:
        """The next seq and its entry file, open for writing: a spare, or made now."""
        if self._spare_entries:
            return self._spare_entries.popleft()
        seq = next(self._seq)
        return seq, _create(self._seq_path(seq), os.O_WRONLY)

    def _entry_path(self, entry: JournalEntry) -> str:
        return self._seq_path(entry.seq)

    def _seq_path(self, seq: int) -> str:
        return os.path.join(self.journal_dir, f"{seq:012d}.json")

    async def durable(self, entry: JournalEntry) -> None:
        """Until `entry` and its staged bytes are on disk (what fsync() promises).

        Raises:
            OSError: the round that covered it failed to sync.
        """
        while entry.seq in self._unsynced or entry.seq in self._syncing:
            if entry.seq in self._unsynced:
                self._asked.set()  # no waiting out the interval
            await self._round_done.wait()
        if entry.seq in self._failed:
            self._failed.discard(entry.seq)
            raise OSError(errno.EIO, f"could not make the staged bytes of {entry.path} durable")

    async def commit_forever(self) -> None:
        """The committer: one round at a time, COMMIT_INTERVAL after the first entry
        journaled since the last one (sooner if fsync() waits), each covering every
        entry journaled before it began and not uploaded yet (the entries journaled
        during a round wait for the next)."""
        while True:
            await self._journaled.wait()
            with trio.move_on_after(COMMIT_INTERVAL):
                await self._asked.wait()
            self._journaled = trio.Event()
            self._asked = trio.Event()
            self._syncing, self._unsynced = self._unsynced, {}
            if self._syncing:
                try:
                    await trio.to_thread.run_sync(self._sync, list(self._syncing.values()))
                except OSError as e:
                    log.error("could not fsync %d journaled files: %s", len(self._syncing), e)
                    self._failed.update(self._syncing)
            self._syncing = {}
            self._round_done.set()
            self._round_done = trio.Event()

    def sync_all(self) -> None:
        """Make every entry journaled so far durable now (at shutdown). Blocking."""
        self._sync([*self._syncing.values(), *self._unsynced.values()])
        self._unsynced = {}

    def _sync(self, entries: list[JournalEntry]) -> None:
        for entry in entries:
            for path in (entry.staged, self._entry_path(entry)):
                try:
                    fsync_path(path)
                except FileNotFoundError:
                    pass  # uploaded and let go of already: nothing to keep
        if entries:
            fsync_path(self.dir)  # the staged files' names
            fsync_path(self.journal_dir)  # the entries' names

    async def drop_entry(self, entry: JournalEntry) -> None:
        """An entry whose upload was given up, its staged file kept, will never be uploaded:
        the entry, then the file and its room, go."""
        await self.forget(entry)
        held = self._kept_held.pop(entry.staged, None)
        if held is not None:
            held.keep = False  # its last holder removes it, and gives its room back
            return
        await trio.to_thread.run_sync(_remove_all, [entry.staged])
        kept = self._kept.pop(entry.staged, 0)
        if kept:
            self._give_back(kept)

    async def forget(self, entry: JournalEntry) -> None:
        """The entry's upload is done (or cancelled): no round needs to sync it now. Returns
        once its file is gone or empty (by `housekeep_forever`, off the trio thread), so
        that no restart uploads it again after the caller moved on (an unlink or a rename
        of the path, a newer close landing). Checkpoints only while housekeep_forever runs."""
        self._unsynced.pop(entry.seq, None)
        path = self._entry_path(entry)
        if not self._housekeeping:
            _remove_all([path])
            return
        self._doom(path, 0, reuse=True)
        self._unremoved.add(path)
        while path in self._unremoved:
            await self._removal_round.wait()


def _remove_all(paths: list[str]) -> None:
    """Unlink `paths`, in order; those already gone are skipped, and one that cannot be
    removed is logged (a restart removes a staged file no entry names). Blocking."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", path, e)


def _create(path: str, access: int = os.O_RDWR) -> int:
    """Create the new file `path` (0600) and open it."""
    return os.open(path, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _libc_function(name: str, *argtypes):
    """The C library's function `name` (returning an int, errno kept), or None where it
    has none (not Linux)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


# None (not Linux): fsync() writes everything then.
_sync_file_range = _libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2  # start writing the dirty pages in the range, wait for nothing


def _start_write_out(path: str, start: int, end: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | NOATIME)
    try:
        if _sync_file_range(fd, start, end - start, _SYNC_FILE_RANGE_WRITE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _rounded(size: int) -> int:
    return -(-size // RESERVE_STEP) * RESERVE_STEP


def _ahead(size: int) -> int:
    return -(-size // RESERVE_AHEAD) * RESERVE_AHEAD if size > RESERVE_AHEAD else _rounded(size)


# None (not Linux): blocks are allocated as they are written.
_fallocate = _libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_FALLOC_FL_KEEP_SIZE = 1  # blocks past the end of the file: its size stays what was written
_FALLOC_FL_PUNCH_HOLE = 2


def _free_tail(fd: int, size: int) -> None:
    """Free the blocks `_preallocate` allocated past `size`, the file's end: they outlive a
    truncate that makes the file larger, and its close, but its room is counted only up to
    `_rounded(size)`. Best effort, as `_preallocate`."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)  # ext4 frees them on a truncate, also to the same size
    if _fallocate is not None:  # where a truncate keeps them (ext4 punches nothing past the end)
        _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, size, 2 * RESERVE_AHEAD)


def _preallocate(fd: int, offset: int, length: int) -> None:
    """Allocate the disk blocks of [offset, offset + length) of `fd` now, in one extent. Best
    effort: a file system that cannot (EOPNOTSUPP) or a full disk leaves it to the writes."""
    if _fallocate is not None:
        _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length)
