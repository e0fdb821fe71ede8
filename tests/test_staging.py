"""The staging area's journal (--writeback): written at close, made durable in group commits."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading

import pytest
import trio
import trio.testing

from cachefs.staging import COMMIT_INTERVAL, RESERVE_AHEAD, RESERVE_STEP, SPARES, Staging


def _staged_file(staging: Staging, data: bytes):
    staged = staging.new_file()
    with open(staged.path, "wb") as f:
        f.write(data)
    return staged


@pytest.fixture
def staging(tmp_path):
    s = Staging(str(tmp_path), limit=64 << 20, disk=None)
    assert s.open() == []
    return s


@pytest.mark.trio
async def test_an_entry_is_on_disk_when_journal_returns_and_durable_after_a_round(staging, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    staged = _staged_file(staging, b"x" * 1000)
    entry = await staging.journal("s3://b/p", "a/file", staged, 1000)
    # A process killed now loses nothing: the entry is already under its final name.
    with open(os.path.join(staging.journal_dir, f"{entry.seq:012d}.json")) as f:
        assert json.load(f)["path"] == "a/file"
    assert synced == []  # close() did not wait for the disk
    async with trio.open_nursery() as nursery:
        nursery.start_soon(staging.commit_forever)
        await staging.durable(entry)
        nursery.cancel_scope.cancel()
    # The staged bytes and the entry, then both directories' names.
    assert synced[:2] == [staged.path, os.path.join(staging.journal_dir, f"{entry.seq:012d}.json")]
    assert set(synced[2:]) == {staging.dir, staging.journal_dir}


@pytest.mark.trio
async def test_entries_journaled_together_share_one_round(staging, monkeypatch):
    rounds = []
    monkeypatch.setattr(staging, "_sync", lambda entries: rounds.append(sorted(e.seq for e in entries)))
    entries = []
    for i in range(20):
        entries.append(await staging.journal("s3://b/p", f"f{i}", _staged_file(staging, b"y"), 1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(staging.commit_forever)
        for entry in entries:
            await staging.durable(entry)
        late = await staging.journal("s3://b/p", "late", _staged_file(staging, b"z"), 1)
        await staging.durable(late)
        nursery.cancel_scope.cancel()
    assert rounds == [[e.seq for e in entries], [late.seq]]


@pytest.mark.trio
async def test_a_round_comes_an_interval_after_a_close_and_skips_files_uploaded_by_then(staging, monkeypatch, autojump_clock):
    """Without an fsync(), the round waits COMMIT_INTERVAL: a file whose upload landed by
    then is never fsync'd (a round after every close cost two fsyncs per small file)."""
    rounds = []
    monkeypatch.setattr(staging, "_sync", lambda entries: rounds.append([e.path for e in entries]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(staging.commit_forever)
        t0 = trio.current_time()
        landed = await staging.journal("s3://b/p", "landed", _staged_file(staging, b"y"), 1)
        await staging.journal("s3://b/p", "pending", _staged_file(staging, b"z"), 1)
        await trio.sleep(COMMIT_INTERVAL / 2)
        await staging.forget(landed)  # its upload is done: the backend has it
        await trio.sleep(COMMIT_INTERVAL / 2 - 0.01)
        assert rounds == []  # nothing synced while the interval runs
        while not rounds:  # the round runs in a thread: the fake clock may pass it by
            await trio.sleep(0.01)
        assert trio.current_time() >= t0 + COMMIT_INTERVAL
        nursery.cancel_scope.cancel()
    assert rounds == [["pending"]]


@pytest.mark.trio
async def test_fsync_does_not_wait_out_the_interval(staging, monkeypatch, autojump_clock):
    rounds = []
    monkeypatch.setattr(staging, "_sync", lambda entries: rounds.append([e.path for e in entries]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(staging.commit_forever)
        entry = await staging.journal("s3://b/p", "f", _staged_file(staging, b"y"), 1)
        await trio.sleep(0.1)
        t0 = trio.current_time()
        await staging.durable(entry)
        assert trio.current_time() == t0  # no virtual time passed: the round began at once
        nursery.cancel_scope.cancel()
    assert rounds == [["f"]]


@pytest.mark.trio
async def test_a_failed_round_fails_the_fsync_that_waited_for_it(staging, monkeypatch):
    def broken(entries):
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(staging, "_sync", broken)
    entry = await staging.journal("s3://b/p", "f", _staged_file(staging, b"y"), 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(staging.commit_forever)
        with pytest.raises(OSError) as e:
            await staging.durable(entry)
        assert e.value.errno == errno.EIO
        nursery.cancel_scope.cancel()


def test_a_restart_keeps_whole_entries_and_drops_ones_whose_bytes_did_not_reach_the_disk(tmp_path):
    async def journal_two(staging):
        whole = await staging.journal("s3://b/p", "whole", _staged_file(staging, b"a" * 5000), 5000)
        torn = await staging.journal("s3://b/p", "torn", _staged_file(staging, b"b" * 5000), 5000)
        return whole, torn

    first = Staging(str(tmp_path), limit=64 << 20, disk=None)
    first.open()
    whole, torn = trio.run(journal_two, first)
    # An OS crash before the round: the entry made it, the staged bytes only in part.
    os.truncate(torn.staged, 4096)
    open_at_crash = _staged_file(first, b"c")  # a file still open for write: named by no entry

    again = Staging(str(tmp_path), limit=64 << 20, disk=None)
    kept = again.open()
    assert [e.path for e in kept] == ["whole"]
    assert sorted(os.listdir(again.dir)) == [os.path.basename(whole.staged)]
    assert not os.path.exists(open_at_crash.path)
    # New entries continue after the kept ones: no entry overwrites another.
    assert trio.run(again.journal, "s3://b/p", "next", again.new_file(), 0).seq > whole.seq


@pytest.mark.trio
async def test_journaling_a_closed_file_waits_for_no_thread(staging):
    """close() under --writeback writes its entry on the trio thread: in a worker thread it
    waited behind the committer's fsyncs (3.4 ms a close, 0.8 without the hop)."""
    staged = _staged_file(staging, b"x" * 100)
    with trio.testing.assert_no_checkpoints():
        entry = await staging.journal("s3://b/p", "f", staged, 100)
    assert os.listdir(staging.journal_dir) == [f"{entry.seq:012d}.json"]


def test_a_restart_drops_an_entry_an_os_crash_cut_short(tmp_path, caplog):
    """Entries are written once under their final name, not renamed into place: one cut short
    (never fsync'd) is dropped at the restart with an error line, and the others are kept."""
    first = Staging(str(tmp_path), limit=64 << 20, disk=None)
    first.open()
    whole = trio.run(first.journal, "s3://b/p", "whole", _staged_file(first, b"a" * 10), 10)
    torn = trio.run(first.journal, "s3://b/p", "torn", _staged_file(first, b"b" * 10), 10)
    torn_path = os.path.join(first.journal_dir, f"{torn.seq:012d}.json")
    os.truncate(torn_path, os.path.getsize(torn_path) // 2)

    again = Staging(str(tmp_path), limit=64 << 20, disk=None)
    assert [e.path for e in again.open()] == ["whole"]
    assert os.listdir(again.journal_dir) == [f"{whole.seq:012d}.json"]
    assert any("unusable, dropped" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def _local_writeback_node(tmp_path, before: bytes | None = None):
    """A local source (holding f = `before`, if given) served read-write as dataset d by a
    --writeback node: (the source's directory, d's DatasetConfig, the NodeConfig)."""
    from cachefs.config import DatasetConfig, NodeConfig

    src = tmp_path / "src"
    src.mkdir()
    if before is not None:
        (src / "f").write_bytes(before)
    ds = DatasetConfig(name="d", url=str(src), read_only=False)
    config = NodeConfig(mountpoint=str(tmp_path / "mnt"), cache_dir=str(tmp_path / "cache"), cache_size=256 << 20,
                        mem_size=64 << 20, writeback=True, datasets=[ds])
    return src, ds, config


def _backend_down(dataset) -> trio.Event:
    """The uploads of `dataset` wait, then fail (its backend down), once the event is set."""
    from cachefs.errors import BackendError

    down = trio.Event()

    async def refused(*args, **kwargs):
        await down.wait()
        raise BackendError("the backend is down")

    dataset.backend.upload = refused
    return down


async def _closed_while_down_then_readded(node, ds):
    """f written and closed under --writeback while dataset d's backend is down, then
    `dataset remove --force d` and `add d` again (its backend works): (the close's upload,
    the event that makes it fail, the dataset added back)."""
    dataset = node.datasets["d"]
    down = _backend_down(dataset)
    wf = await node.writes.open(dataset, "f", None, truncate=True)
    await wf.write(0, b"closed bytes")
    old = await wf.commit(background=True)  # close() returned
    node.writes.close(wf)
    await trio.testing.wait_all_tasks_blocked()
    await node.remove_dataset("d", force=True)
    return old, down, await node.add_dataset(ds)


def _size_or_0(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # gone, even between a check and the getsize
        return 0


async def _with_spares(staging: Staging, nursery: trio.Nursery) -> None:
    nursery.start_soon(staging.housekeep_forever)
    while len(staging._spare_files) < SPARES or len(staging._spare_entries) < SPARES:
        await trio.sleep(0.01)  # made in a thread


@pytest.mark.trio
async def test_files_and_entries_come_created_ahead_and_entries_keep_the_close_order(staging, monkeypatch):
    """Under --writeback a create on the trio thread waited for ext4's journal, behind the
    committer's fsyncs, and every request with it: staged files and entry files are created
    ahead in a thread, and an entry written into one still replays in the order of the closes."""
    async with trio.open_nursery() as nursery:
        await _with_spares(staging, nursery)
        made = set(os.listdir(staging.dir)) | set(os.listdir(staging.journal_dir))
        creates = []
        real_open = os.open

        def counting_open(path, flags, *args):
            if flags & os.O_CREAT:
                creates.append(path)
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", counting_open)
        entries = []
        for i in range(SPARES * 3):  # more than one batch of spares: used up and made again meanwhile
            with trio.testing.assert_no_checkpoints() if i < SPARES // 2 else contextlib.nullcontext():
                staged, fd = staging.create_file()
            os.write(fd, b"x")
            os.close(fd)
            if i < SPARES // 2:
                assert os.path.basename(staged.path) in made
            if i < SPARES // 2:
                entry_count = len(creates)
            entries.append(await staging.journal("s3://b/p", f"f{i}", staged, 1))
            if i < SPARES // 2:
                assert len(creates) == entry_count  # the entry's file was there already
            await trio.sleep(0)
        nursery.cancel_scope.cancel()
    seqs = [e.seq for e in entries]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len(os.listdir(staging.journal_dir)) == len(entries)  # the spares left were removed
    again = Staging(staging.dir.rpartition("/")[0], limit=64 << 20, disk=None)
    assert [e.path for e in again.open()] == [f"f{i}" for i in range(SPARES * 3)]


def test_a_restart_removes_unused_spares_without_an_error(tmp_path, caplog):
    first = Staging(str(tmp_path), limit=64 << 20, disk=None)
    first.open()

    async def journal_one_with_spares():
        async with trio.open_nursery() as nursery:
            await _with_spares(first, nursery)
            staged, fd = first.create_file()
            os.write(fd, b"a" * 10)
            os.close(fd)
            entry = await first.journal("s3://b/p", "whole", staged, 10)
            nursery.cancel_scope.cancel()
        return entry

    whole = trio.run(journal_one_with_spares)
    # As if killed: the spares stay behind, empty.
    made, entries = first._make_spares(2, [whole.seq + 1, whole.seq + 2])
    for _, fd in made + entries:
        os.close(fd)
    again = Staging(str(tmp_path), limit=64 << 20, disk=None)
    assert [e.path for e in again.open()] == ["whole"]
    assert os.listdir(again.journal_dir) == [f"{whole.seq:012d}.json"]
    assert os.listdir(again.dir) == [os.path.basename(whole.staged)]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]


@pytest.mark.trio
async def test_files_let_go_of_are_removed_off_the_trio_thread_and_their_room_then_given_back(tmp_path, monkeypatch):
    """An unlink on the trio thread waited for ext4's journal too. The room of a file let go
    of comes back only once it is gone (the disk never holds more than the bounds), and a
    writer that needs it meanwhile waits for it: no ENOSPC."""
    staging = Staging(str(tmp_path), limit=2 << 20, disk=None)
    staging.open()
    async with trio.open_nursery() as nursery:
        await _with_spares(staging, nursery)
        staged, fd = staging.create_file()
        await staging.reserve(staged, 2 << 20)  # all the room there is
        os.write(fd, b"x" * 100)
        os.close(fd)
        entry = await staging.journal("s3://b/p", "f", staged, 100)
        entry_path = os.path.join(staging.journal_dir, f"{entry.seq:012d}.json")
        with trio.testing.assert_no_checkpoints():
            staging.release(staged)
        assert os.path.exists(staged.path)  # not removed by the trio thread
        assert staging.used == 2 << 20 and staging.removing == 2 << 20
        # An entry is gone when forget returns (here reused as a spare, under another seq's
        # name): no restart uploads it again after an unlink or a rename of its path (which
        # wait for its upload to be done).
        changed_by = []
        real_unlink, real_rename = os.unlink, os.rename

        def recording(real):
            def call(*args, **kwargs):
                changed_by.append(threading.current_thread())
                return real(*args, **kwargs)
            return call

        monkeypatch.setattr(os, "unlink", recording(real_unlink))
        monkeypatch.setattr(os, "rename", recording(real_rename))
        await staging.forget(entry)
        assert not os.path.exists(entry_path)
        assert changed_by and threading.main_thread() not in changed_by
        other, other_fd = staging.create_file()
        os.close(other_fd)
        await staging.reserve(other, 1 << 20)  # waits for the removal: nothing is draining
        assert not os.path.exists(staged.path)
        assert staging.used == 1 << 20 and staging.removing == 0
        nursery.cancel_scope.cancel()

def _dirty_pages(path: str, start: int, length: int) -> int | None:
    """Pages of `path` in [start, start + length) dirty in the page cache (cachestat(2),
    Linux 6.5); None if the kernel cannot tell."""
    import ctypes

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in
                    ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    libc = ctypes.CDLL(None, use_errno=True)
    span, stat = Range(start, length), Stat()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:  # SYS_cachestat (x86-64)
            return None
    finally:
        os.close(fd)
    return stat.dirty


@pytest.mark.trio
async def test_write_out_starts_writing_the_staged_bytes_to_the_disk(staging):
    """The range write_out asks for leaves the page cache's dirty pages within seconds
    (the kernel's own write-back waits 30 s for them): a later fsync() of the file
    waits for the rest only. (On a machine busy writing, the kernel may write them
    first: then this passes either way.)"""
    from cachefs import staging as staging_mod

    if staging_mod._sync_file_range is None or os.uname().machine != "x86_64":
        pytest.skip("no sync_file_range or cachestat here")
    staged = _staged_file(staging, os.urandom(12 << 20))
    if not _dirty_pages(staged.path, 0, 8 << 20):
        pytest.skip("the page cache does not say which pages are dirty (cachestat, or no write-back here)")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(staging.write_out_forever)
        staging.write_out(staged, 0, 8 << 20)
        with trio.fail_after(10):
            while _dirty_pages(staged.path, 0, 8 << 20):
                await trio.sleep(0.01)  # the request runs in a thread
        nursery.cancel_scope.cancel()
    staging.release(staged)


@pytest.mark.trio
async def test_a_writeback_writer_has_its_bytes_written_out_a_step_at_a_time(staging, monkeypatch):
    """Under --writeback, each WRITE_OUT_STEP a file grows by is handed to write_out
    once: the steps a sequential writer filled, and after a truncate the cut step again."""
    from cachefs.staging import WRITE_OUT_STEP as STEP
    from cachefs.writes import WriteFile, Writes

    asked = []
    monkeypatch.setattr(staging, "write_out", lambda staged, start, end: asked.append((start, end)))
    staged = staging.new_file()
    fd = os.open(staged.path, os.O_RDWR | os.O_CREAT, 0o600)
    wf = WriteFile(Writes(staging, uploader=None, writeback=True), None, "f", staged, fd, 0)
    try:
        block = b"x" * (1 << 20)
        for at in range(0, 2 * STEP + (3 << 20), len(block)):
            await wf.write(at, block)
        assert asked == [(0, STEP), (STEP, 2 * STEP)]
        await wf.truncate(STEP // 2)
        for at in range(STEP // 2, 2 * STEP, len(block)):
            await wf.write(at, block)
        assert asked[2:] == [(STEP // 2, STEP), (STEP, 2 * STEP)]
        plain = Writes(staging, uploader=None)
        wf.writes = plain
        await wf.write(4 * STEP, block)
        assert len(asked) == 4  # without --writeback, nothing: the upload makes the file safe
    finally:
        os.close(fd)
        staging.release(staged)


def _counting(monkeypatch) -> tuple[list, list]:
    """Record the files created (os.open with O_CREAT) and removed from now on: (creates, unlinks)."""
    creates, unlinks = [], []
    real_open, real_unlink = os.open, os.unlink

    def counting_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            creates.append(path)
        return real_open(path, flags, *args, **kwargs)

    def counting_unlink(path, *args, **kwargs):
        unlinks.append(path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "unlink", counting_unlink)
    return creates, unlinks


@pytest.mark.trio
async def test_files_let_go_of_come_back_as_empty_spares_instead_of_being_removed(staging, monkeypatch, autojump_clock):
    """On an ext4 without a journal every create skipped the inodes freed in the last
    minutes, one by one: a fifth of the daemon's CPU writing small files. Staged files and
    entry files let go of are emptied and reused, not removed and made again."""
    async with trio.open_nursery() as nursery:
        await _with_spares(staging, nursery)
        creates, unlinks = _counting(monkeypatch)
        names = set()
        for i in range(SPARES * 4):
            staged, fd = staging.create_file()
            assert os.fstat(fd).st_size == 0  # a reused one is empty
            os.write(fd, b"x" * 1000)
            os.close(fd)
            await staging.reserve(staged, 1000)
            entry = await staging.journal("s3://b/p", f"f{i}", staged, 1000)
            names.add(staged.path)
            await staging.forget(entry)  # uploaded
            staging.release(staged)
        while staging.used:  # room comes back once the file is emptied
            await staging._removal_round.wait()
        assert (creates, unlinks) == ([], [])
        assert len(names) == SPARES * 4  # a new name each time: an old entry names no reused file
        journal = [os.path.join(staging.journal_dir, n) for n in os.listdir(staging.journal_dir)]
        assert len(journal) == SPARES and all(os.path.getsize(p) == 0 for p in journal)
        nursery.cancel_scope.cancel()
    # The forgotten entries are never replayed, and the spares left are removed.
    again = Staging(staging.dir.rpartition("/")[0], limit=64 << 20, disk=None)
    assert again.open() == []
    assert os.listdir(again.dir) == [] and os.listdir(again.journal_dir) == []


@pytest.mark.trio
async def test_a_file_not_reusable_is_removed_and_spares_beyond_the_wanted_ones_too(staging, monkeypatch, autojump_clock):
    async with trio.open_nursery() as nursery:
        await _with_spares(staging, nursery)
        creates, unlinks = _counting(monkeypatch)
        files = [staging.create_file() for _ in range(3)]
        for _ in range(2):  # one more reusable file than the spares taken
            extra = staging.new_file()
            os.close(os.open(extra.path, os.O_CREAT | os.O_WRONLY, 0o600))
            files.append((extra, os.open(extra.path, os.O_RDONLY)))
        inodes = {os.fstat(fd).st_ino: staged for staged, fd in files}
        for staged, fd in files:
            os.close(fd)
            await staging.reserve(staged, 1)
        files[0][0].reusable = False  # early parts read it unheld (Uploader.send_early)
        for staged, _ in files:
            staging.release(staged)
        while staging.used:  # given back once each is emptied or removed
            await staging._removal_round.wait()
        assert not any(os.path.exists(s.path) for s, _ in files)
        spares = {os.fstat(fd).st_ino for _, fd in staging._spare_files}
        assert len(staging._spare_files) == SPARES
        reused = {staged.path for ino, staged in inodes.items() if ino in spares}
        assert sorted(unlinks) == sorted({s.path for s, _ in files} - reused)
        assert files[0][0].path in unlinks and len(reused) == 3 and len(unlinks) == 2
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_file_that_cannot_be_reused_is_removed_and_leaves_nothing_behind(staging, monkeypatch, autojump_clock):
    async with trio.open_nursery() as nursery:
        await _with_spares(staging, nursery)
        staged, fd = staging.create_file()
        os.close(fd)
        await staging.reserve(staged, 1)
        real_open = os.open

        def failing_to_empty(path, flags, *args, **kwargs):
            if flags & os.O_TRUNC:
                raise OSError(errno.EIO, "injected")
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", failing_to_empty)
        staging.release(staged)
        while staging.used:  # given back once it is removed
            await staging._removal_round.wait()
        spares = {os.path.basename(s.path) for s, _ in staging._spare_files}
        assert set(os.listdir(staging.dir)) == spares  # not left under the name it was given
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_large_file_gets_its_room_and_disk_blocks_a_step_ahead_of_its_writes(tmp_path):
    """Past RESERVE_AHEAD, room comes RESERVE_AHEAD at a time and its blocks are allocated
    with it (the file's size stays what was written); a small file's room stays in 1 MiB steps."""
    staging = Staging(str(tmp_path), limit=64 << 20, disk=None)
    staging.open()
    small, small_fd = staging.create_file()
    await staging.reserve(small, 100, small_fd)
    assert small.reserved == RESERVE_STEP
    big, fd = staging.create_file()
    try:
        await staging.reserve(big, RESERVE_AHEAD, fd)
        assert big.reserved == RESERVE_AHEAD
        await staging.reserve(big, RESERVE_AHEAD + 1, fd)
        assert big.reserved == 2 * RESERVE_AHEAD and staging.used == 2 * RESERVE_AHEAD + RESERVE_STEP
        st = os.fstat(fd)
        assert st.st_size == 0
        assert st.st_blocks * 512 >= RESERVE_AHEAD  # the step's blocks, allocated past the end
        for size in range(RESERVE_AHEAD + 2, 2 * RESERVE_AHEAD, RESERVE_STEP):
            with trio.testing.assert_no_checkpoints():
                await staging.reserve(big, size, fd)  # within the step: nothing to take
        assert big.reserved == 2 * RESERVE_AHEAD
    finally:
        os.close(fd)
        os.close(small_fd)


@pytest.mark.trio
async def test_a_large_file_takes_only_the_room_it_needs_when_the_step_ahead_does_not_fit(tmp_path):
    staging = Staging(str(tmp_path), limit=RESERVE_AHEAD + 3 * RESERVE_STEP, disk=None)
    staging.open()
    staged, fd = staging.create_file()
    try:
        await staging.reserve(staged, RESERVE_AHEAD + 2 * RESERVE_STEP, fd)  # no StagingFull, no wait
        assert staged.reserved == staging.used == RESERVE_AHEAD + 2 * RESERVE_STEP
    finally:
        os.close(fd)


class _EvictingDisk:
    """An SSD tier whose claim waits (as DiskTier.claim does when it evicts chunks)."""

    def __init__(self, refuse: bool = False):
        self.used = 0
        self.refuse = refuse

    async def claim(self, need: int) -> bool:
        await trio.sleep(0)
        if self.refuse:
            return False
        self.used += need
        return True

    def give_back(self, room: int) -> None:
        self.used -= room

    def take(self, room: int) -> None:
        self.used += room


@pytest.mark.trio
async def test_writers_reserving_at_once_never_take_more_than_the_limit(tmp_path):
    """Each writer's room is counted before the SSD tier's claim waits: two writers that
    both checked before either had counted took twice the room that was left."""
    from cachefs.staging import StagingFull

    disk = _EvictingDisk()
    staging = Staging(str(tmp_path), limit=4 * RESERVE_STEP, disk=disk)
    staging.open()
    files = [staging.new_file() for _ in range(4)]
    refused = []

    async def writer(staged) -> None:
        try:
            await staging.reserve(staged, 3 * RESERVE_STEP)
        except StagingFull:
            refused.append(staged)  # nothing pending to wait for: refused, not overshot

    async with trio.open_nursery() as nursery:
        for staged in files:
            nursery.start_soon(writer, staged)
    assert staging.used == disk.used == 3 * RESERVE_STEP <= staging.limit
    assert len(refused) == 3
    assert sum(f.reserved for f in files) == 3 * RESERVE_STEP


@pytest.mark.trio
async def test_room_the_disk_refused_is_not_kept_counted(tmp_path):
    staging = Staging(str(tmp_path), limit=4 * RESERVE_STEP, disk=_EvictingDisk(refuse=True))
    staging.open()
    staged = staging.new_file()
    staging.draining_changed(1)  # an upload is pending: the writer waits instead of failing
    with trio.move_on_after(1):  # not the fake clock: the writer waits on an event, not a timer
        await staging.reserve(staged, RESERVE_STEP)
    assert staging.used == 0 and staged.reserved == 0


def _write_file(staging: Staging, writeback: bool = False):
    from cachefs.writes import WriteFile, Writes

    staged, fd = staging.create_file()
    return WriteFile(Writes(staging, uploader=None, writeback=writeback), None, "f", staged, fd, 0)


@pytest.mark.trio
async def test_two_writes_into_a_file_an_upload_holds_both_land_in_its_copy(staging):
    """Both writes find the file held by an upload; the copy is made once and keeps both.
    Each used to make its own copy, the second replacing the first's and its write."""
    wf = _write_file(staging)
    await wf.write(0, b"." * RESERVE_STEP)
    held = wf.staged
    staging.hold(held)  # a close's upload holds it
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wf.write, 0, b"A")
        nursery.start_soon(wf.write, 10, b"B")
    assert os.pread(wf.fd, 12, 0) == b"A" + b"." * 9 + b"B."
    assert wf.staged is not held and held.holders == 1
    assert staging.used == 2 * RESERVE_STEP  # the upload's file and one copy
    staging.release(held)
    os.close(wf.fd)


@pytest.mark.trio
async def test_a_write_waiting_to_copy_a_file_needs_no_copy_once_the_upload_ends(tmp_path):
    """A file larger than the room left: the write waits for the upload to end, then writes
    into the file it has to itself again, with no StagingFull (ENOSPC) for the copy it no
    longer needs."""
    staging = Staging(str(tmp_path), limit=8 * RESERVE_STEP, disk=None)
    staging.open()
    wf = _write_file(staging, writeback=True)
    await wf.write(0, b"x" * (5 * RESERVE_STEP))
    held = wf.staged
    staging.hold(held)  # an fsync's upload (Uploader.submit) holds it, and counts as draining
    staging.draining_changed(wf.size)

    async def upload_ends() -> None:
        await trio.sleep(0)
        staging.draining_changed(-5 * RESERVE_STEP)
        staging.release(held)  # Uploader._run's finally: not the last hold, no room back

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload_ends)
        assert await wf.write(5 * RESERVE_STEP, b"y") == 1
    assert wf.staged is held and held.holders == 1
    assert staging.used == _rounded_room(5 * RESERVE_STEP + 1)
    assert os.pread(wf.fd, 2, 5 * RESERVE_STEP - 1) == b"xy"
    os.close(wf.fd)


def _rounded_room(size: int) -> int:
    return -(-size // RESERVE_STEP) * RESERVE_STEP


def _on_disk(path_or_fd) -> int:
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return st.st_blocks * 512


@pytest.mark.trio
async def test_a_truncate_that_gives_room_back_frees_the_blocks_allocated_ahead_too(tmp_path):
    """A file written to 20 MiB holds room, and blocks, up to 24; truncated up to 21 MiB it
    gives 3 MiB of room back, and those blocks with it (allocated past the end, they outlived
    the truncate, uncounted)."""
    from cachefs.writes import WriteFile, Writes

    staging = Staging(str(tmp_path), limit=64 << 20, disk=None)
    staging.open()
    staged, fd = staging.create_file()
    wf = WriteFile(Writes(staging, uploader=None, writeback=False), None, "f", staged, fd, 0)
    block = os.urandom(1 << 20)
    for at in range(0, 20 << 20, len(block)):
        await wf.write(at, block)
    assert staged.reserved == 24 << 20 and _on_disk(fd) >= 24 << 20
    await wf.truncate(21 << 20)
    assert staged.reserved == staging.used == 21 << 20
    assert _on_disk(fd) <= staged.reserved
    os.close(fd)


def test_a_restart_frees_the_blocks_a_journaled_file_had_allocated_ahead(tmp_path):
    """Counted at a restart as its size rounded up, a journaled file has no more on disk."""
    from cachefs.staging import JournalEntry

    staging = Staging(str(tmp_path), limit=64 << 20, disk=None)
    staging.open()
    staged, fd = staging.create_file()
    trio.run(staging.reserve, staged, 9 << 20, fd)
    os.pwrite(fd, b"x" * (9 << 20), 0)
    os.close(fd)
    assert _on_disk(staged.path) >= 16 << 20  # its room, and blocks, a step ahead
    adopted = Staging(str(tmp_path), limit=64 << 20, disk=None).adopt(
        JournalEntry(1, "s3://b/p", "f", staged.path, 9 << 20, 0.0))
    assert adopted.reserved == 9 << 20
    assert _on_disk(staged.path) <= adopted.reserved


@pytest.mark.trio
async def test_two_opens_of_a_file_at_once_share_one_staged_copy(staging):
    """Both opens fill a copy of the current file (waiting on the reader); the second to
    finish takes the first's file, so both handles write into one. Each used to keep its
    own copy: two O_APPEND writers lost one writer's bytes to a hole."""
    from types import SimpleNamespace

    from cachefs.objects import ObjectInfo
    from cachefs.writes import Writes

    size = 4096

    class Reader:
        chunk_size = size

        async def chunk(self, obj, index):
            await trio.sleep(0)  # as a fetch does: the other open runs meanwhile
            return b"c" * min(size, obj.size - index * size), None

    dataset = SimpleNamespace(source="s3://b/p", reader=Reader(), backend=SimpleNamespace(takes_parts=False))
    uploader = SimpleNamespace(latest=lambda dataset, path: None, part_size=8 << 20)
    writes = Writes(staging, uploader=uploader, writeback=False)
    current = ObjectInfo("f", "file", 3 * size, 0.0, "v1")
    opened = []

    async def open_() -> None:
        opened.append(await writes.open(dataset, "f", current, truncate=False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_)
        nursery.start_soon(open_)
    assert opened[0] is opened[1] and opened[0].handles == 2
    assert staging.used == RESERVE_STEP  # the other copy's room given back
    writes.close(opened[0])
    writes.close(opened[0])
    assert staging.used == 0 or staging.removing


@pytest.mark.trio
async def test_a_close_whose_journal_write_failed_keeps_the_changes_to_upload(staging):
    """--writeback: the journal entry could not be written (a full disk): the close fails,
    and the file is still to be uploaded by the next close or fsync, not marked clean."""
    from types import SimpleNamespace

    from cachefs.writes import WriteFile, Writes

    async def submit(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    writes = Writes(staging, uploader=SimpleNamespace(submit=submit), writeback=True)
    staged, fd = staging.create_file()
    wf = WriteFile(writes, None, "f", staged, fd, 0)
    await wf.write(0, b"data")
    with pytest.raises(OSError):
        await wf.commit(background=True)
    assert wf.dirty and wf.sealed is None
    os.close(fd)


def _filling_open(staging, path: str):
    """An open of `path` (a stored file of 100 bytes) for write, without O_TRUNC, whose
    copy-in waits: (writes, dataset, set once it copies, set to let it go on, `open_(into)`
    that opens and appends the file to list `into`)."""
    from types import SimpleNamespace

    from cachefs.objects import ObjectInfo
    from cachefs.writes import Writes

    filling = trio.Event()
    go_on = trio.Event()

    class Reader:
        chunk_size = 4096

        async def chunk(self, obj, index):
            filling.set()
            await go_on.wait()
            return b"c" * obj.size, None

    async def no_wait(dataset, path, timeout, under=False) -> None:
        pass

    dataset = SimpleNamespace(source="s3://b/p", reader=Reader(), backend=SimpleNamespace(takes_parts=False))
    writes = Writes(staging, uploader=SimpleNamespace(latest=lambda dataset, path: None, part_size=8 << 20,
                                                      wait=no_wait))

    async def open_(into: list) -> None:
        into.append(await writes.open(dataset, path, ObjectInfo(path, "file", 100, 0.0, "v1"), truncate=False))

    return writes, dataset, filling, go_on, open_


async def _open_while_filling(staging, path: str, during):
    """Open `path` as `_filling_open` does and run `during(writes, dataset)` while the open
    still copies the file in: (writes, dataset, the open's file, what `during` returned)."""
    writes, dataset, filling, go_on, open_ = _filling_open(staging, path)
    opened = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_, opened)
        await filling.wait()
        result = during(writes, dataset)
        go_on.set()
    return writes, dataset, opened[0], result


@pytest.mark.trio
async def test_an_open_that_was_filling_when_its_file_was_deleted_uploads_nothing(staging):
    """rm while an open for write still copies the file in: the open gets the file that was
    deleted, as after an unlink. It used to register it under the path, and its close
    brought the deleted file back."""

    def rm(writes, dataset):  # no file registered yet
        deletion = writes.unlinked(dataset, "f")
        writes.deleted(deletion)  # the backend's delete went through
        return deletion

    writes, dataset, wf, deletion = await _open_while_filling(staging, "f", rm)
    assert deletion.detached is None  # no file was open at f yet
    assert wf.unlinked and writes.find(dataset, "f") is None
    assert await wf.commit(background=False) is None  # its close uploads nothing
    writes.close(wf)
    assert writes._filling == {}


@pytest.mark.trio
async def test_an_open_that_was_filling_when_its_file_was_renamed_writes_to_the_new_name(staging):
    """mv while an open for write still copies the file in: the open has the file that
    moved, so its writes go to the new name. It used to register under the old name, and
    its close brought the old name back."""
    writes, dataset, wf, _ = await _open_while_filling(
        staging, "f", lambda writes, dataset: writes.moved(dataset, "f", "g"))  # mv f g: no file registered yet
    assert not wf.unlinked and wf.path == "g"
    assert writes.find(dataset, "g") is wf and writes.find(dataset, "f") is None
    assert not writes._filling
    writes.close(wf)


def _close_all(writes, *files) -> None:
    """Release every handle of `files` (as once their uploads landed), and check that no
    open or deletion is left behind."""
    for wf in files:
        wf.dirty = False
        while wf.handles:
            writes.close(wf)
    assert not writes._filling and not writes._deletions


def _recording_writes(staging, hold: set[str] = frozenset()):
    """Writes whose uploads land at once, recorded by path in order (those of a path in
    `hold` once `release` is set): (writes, dataset, submitted, release)."""
    from types import SimpleNamespace

    from cachefs.writes import Writes

    submitted = []
    release = trio.Event()

    async def submit(dataset, path, staged, size, background, early, **kwargs):
        submitted.append(path)
        if path in hold:
            await release.wait()
        landed = trio.Event()
        landed.set()
        return SimpleNamespace(landed=landed, error=None, entry=None)

    async def wait(dataset, path, timeout, under=False):
        pass

    uploader = SimpleNamespace(submit=submit, wait=wait, latest=lambda dataset, path: None, part_size=8 << 20)
    dataset = SimpleNamespace(source="/src", name="", backend=SimpleNamespace(takes_parts=False))
    return Writes(staging, uploader=uploader), dataset, submitted, release


@pytest.mark.trio
async def test_a_close_during_a_directory_rename_uploads_under_the_new_name(staging):
    """A directory rename lands the files open under it first; a close of one while it
    moves (no kernel lock holds that back) waits, then uploads under the new name."""
    import trio.testing

    writes, dataset, submitted, _ = _recording_writes(staging)
    wf = await writes.open(dataset, "d/f", None, truncate=True)
    await wf.write(0, b"before")
    async with trio.open_nursery() as nursery:
        async with writes.renaming_dir(dataset, "d", 5):
            assert submitted == ["d/f"]  # landed before the directory moves
            await wf.write(0, b"during")
            nursery.start_soon(wf.commit, False)
            await trio.testing.wait_all_tasks_blocked()
            assert submitted == ["d/f"]  # held back while it moves
            writes.moved_dir(dataset, "d", "d2")
    assert submitted == ["d/f", "d2/f"]
    assert writes.find(dataset, "d2/f") is wf and writes.under(dataset, "d2") == [wf]
    wf.dirty = False
    writes.close(wf)


@pytest.mark.trio
async def test_a_directory_rename_waits_for_a_close_already_submitting_its_upload(staging):
    """A close under --writeback that was already submitting its upload (waiting for the
    journal) when the directory rename began: the rename waits for it, so it uploads to
    the old name before the directory moves, not after."""
    import trio.testing

    writes, dataset, submitted, release = _recording_writes(staging, hold={"d/f"})
    wf = await writes.open(dataset, "d/f", None, truncate=True)
    await wf.write(0, b"bytes")
    events = []

    async def rename_dir() -> None:
        async with writes.renaming_dir(dataset, "d", 5):
            events.append("moved")
            writes.moved_dir(dataset, "d", "d2")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wf.commit, True)
        await trio.testing.wait_all_tasks_blocked()  # inside its submit
        nursery.start_soon(rename_dir)
        await trio.testing.wait_all_tasks_blocked()
        assert events == []  # the rename waits for that commit
        release.set()
    assert submitted == ["d/f"] and events == ["moved"] and wf.path == "d2/f"
    wf.dirty = False
    writes.close(wf)


@pytest.mark.trio
async def test_a_directory_rename_commits_no_file_closed_while_it_lands_others(staging):
    """While the rename waits for one file's upload, another file under the directory is
    closed (and let go of): the rename does not commit that one (its staged file is gone)."""
    import trio.testing

    writes, dataset, submitted, release = _recording_writes(staging, hold={"d/f1"})
    f1 = await writes.open(dataset, "d/f1", None, truncate=True)
    f2 = await writes.open(dataset, "d/f2", None, truncate=True)
    await f1.write(0, b"1")
    await f2.write(0, b"2")

    async def rename_dir() -> None:
        async with writes.renaming_dir(dataset, "d", 5):
            writes.moved_dir(dataset, "d", "d2")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rename_dir)
        await trio.testing.wait_all_tasks_blocked()  # waiting for f1's upload
        f2.dirty = False  # as after a close whose upload failed and was given up
        writes.close(f2)
        release.set()
    assert submitted == ["d/f1"]
    f1.dirty = False
    writes.close(f1)


@pytest.mark.trio
async def test_a_directory_rename_waits_for_opens_copying_a_file_under_it_in(staging):
    """open(d/f) without O_TRUNC still copies f in when mv d d2 begins: the rename waits
    for it, or the copy would read d/f after the directory moved (ENOENT)."""
    import trio.testing

    writes, dataset, filling, go_on, open_ = _filling_open(staging, "d/f")
    events = []

    async def rename_dir() -> None:
        async with writes.renaming_dir(dataset, "d", 5):
            events.append("moved")
            writes.moved_dir(dataset, "d", "d2")

    opened = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_, opened)
        await filling.wait()
        nursery.start_soon(rename_dir)
        await trio.testing.wait_all_tasks_blocked()
        assert events == []  # waiting for the copy
        go_on.set()
    wf = opened[0]
    assert events == ["moved"] and wf.path == "d2/f" and writes.find(dataset, "d2/f") is wf
    writes.close(wf)


@pytest.mark.trio
async def test_a_failed_rename_over_a_file_being_opened_leaves_its_open_writing_to_it(staging):
    """mv c b fails at the backend while an open of b still copies b in: that open is b's
    again, as an open file is. It stayed marked deleted, and its writes went nowhere."""

    def failed_rename_over(writes, dataset) -> None:
        deletion = writes.unlinked(dataset, "b")  # mv c b, before its backend call
        writes.reattach(deletion)  # which failed: b is what it was

    writes, dataset, wf, _ = await _open_while_filling(staging, "b", failed_rename_over)
    assert not wf.unlinked and writes.find(dataset, "b") is wf
    writes.close(wf)


@pytest.mark.trio
async def test_an_o_trunc_open_while_the_last_other_handle_closes_returns(staging):
    """An O_TRUNC open truncates the file another handle has open; that handle's release
    meanwhile let go of the staged copy under the truncate, which then waited forever."""
    from types import SimpleNamespace

    import trio.testing

    from cachefs.upload import EarlyParts
    from cachefs.writes import Writes

    dataset = SimpleNamespace(source="s3://b/p", reader=None, backend=SimpleNamespace(takes_parts=False))
    writes = Writes(staging, uploader=SimpleNamespace(latest=lambda dataset, path: None, part_size=8 << 20))
    first = await writes.open(dataset, "f", None, truncate=True)
    await first.write(0, b"x" * 100)
    first.dirty = False  # as after its close's upload
    early = EarlyParts(8 << 20)
    early.sending[0] = True  # a part in flight: a truncate that cuts waits for it
    first._parts_from.add(early)
    opened = []

    async def open_truncating() -> None:
        opened.append(await writes.open(dataset, "f", None, truncate=True))

    with trio.fail_after(5):  # a safety net: the truncate used to spin, never blocking
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_truncating)
            await trio.testing.wait_all_tasks_blocked()  # the open waits inside its truncate
            writes.close(first)  # the other handle's release
            early.sent(0, None)
    wf = opened[0]
    assert wf is first and wf.handles == 1 and wf.size == 0
    assert os.fstat(wf.fd).st_size == 0
    wf.dirty = False  # as after its close's upload
    writes.close(wf)


@pytest.mark.trio
async def test_an_open_filling_while_a_delete_fails_shares_the_file_opened_meanwhile(staging):
    """open(f) (B) still copies f in; another handle opens f with O_TRUNC (A) and writes;
    rm f detaches both, B's copy ends meanwhile, and the delete fails: f is A's again, and
    B's handle writes into A's file, as two opens of one path do. B's open used to return
    its own copy, detached for good: its writes went nowhere."""
    import trio.testing

    writes, dataset, filling, go_on, open_ = _filling_open(staging, "f")
    opened = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_, opened)
        await filling.wait()
        a = await writes.open(dataset, "f", None, truncate=True)
        await a.write(0, b"A's bytes")
        deletion = writes.unlinked(dataset, "f")
        go_on.set()
        await trio.testing.wait_all_tasks_blocked()
        assert not opened  # B waits to know whether f is gone
        writes.reattach(deletion)  # the delete failed
    assert writes.find(dataset, "f") is a and not a.unlinked and a.dirty
    assert opened == [a] and a.handles == 2
    _close_all(writes, a)


@pytest.mark.parametrize("delete_fails", [True, False])
@pytest.mark.trio
async def test_a_close_during_a_delete_uploads_only_if_the_delete_fails(staging, delete_fails):
    """The file open at f is written, rm f detaches it, and its close comes while the delete
    is on its way: the close waits for the outcome. It uploaded nothing, and a failed delete
    then lost its writes (and gave the path to a file whose staged copy was gone)."""
    import trio.testing

    writes, dataset, submitted, _ = _recording_writes(staging)
    wf = await writes.open(dataset, "f", None, truncate=True)
    await wf.write(0, b"written")
    deletion = writes.unlinked(dataset, "f")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wf.commit, False)
        await trio.testing.wait_all_tasks_blocked()
        assert submitted == []  # waiting for the delete
        if delete_fails:
            writes.reattach(deletion)
        else:
            writes.deleted(deletion)
    assert submitted == (["f"] if delete_fails else [])
    assert (writes.find(dataset, "f") is wf) == delete_fails
    wf.dirty = False
    writes.close(wf)


@pytest.mark.trio
async def test_a_file_released_during_a_failed_delete_is_not_the_paths_again(staging):
    writes, dataset, _, _ = _recording_writes(staging)
    wf = await writes.open(dataset, "f", None, truncate=True)
    deletion = writes.unlinked(dataset, "f")
    wf.dirty = False
    writes.close(wf)  # its last handle: the staged copy is let go of
    writes.reattach(deletion)
    assert writes.find(dataset, "f") is None


@pytest.mark.parametrize("o_trunc", [True, False])
@pytest.mark.parametrize("delete_fails", [True, False])
@pytest.mark.trio
async def test_an_open_that_begins_during_a_delete_waits_for_its_outcome(staging, delete_fails, o_trunc):
    """open(f) while rm f is on its way (the kernel holds no lock against it): the open is
    of the file open at f, as two opens of one path are, and each handle sees the other's
    writes. If the delete happens, it uploads nothing (it used to register a file of its
    own at f, whose close brought the deleted file back; or, helper-42's reproduction, got
    a copy of its own); if it fails, the path is that file's again (it used to stay
    detached, its writes going nowhere)."""
    import trio.testing

    writes, dataset, submitted, _ = _recording_writes(staging)
    a = await writes.open(dataset, "f", None, truncate=True)
    await a.write(0, b"AAAA")
    deletion = writes.unlinked(dataset, "f")
    opened = []

    async def open_c() -> None:
        opened.append(await writes.open(dataset, "f", None, truncate=o_trunc))

    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_c)
            await trio.testing.wait_all_tasks_blocked()
            assert not opened
            if delete_fails:
                writes.reattach(deletion)
            else:
                writes.deleted(deletion)
    c = opened[0]
    await c.write(c.size, b"CC")
    assert c is a and a.handles == 2
    assert a.read(0, 10) == (b"CC" if o_trunc else b"AAAACC")  # emptied by O_TRUNC, or not
    if delete_fails:
        assert writes.find(dataset, "f") is a
    else:
        assert a.unlinked and writes.find(dataset, "f") is None
        assert await a.commit(background=False) is None and submitted == []
    _close_all(writes, a)


@pytest.mark.trio
async def test_an_open_of_a_deleted_file_stays_detached_after_a_later_failed_delete(staging):
    """B still copies f in when rm f deletes it; f is created again and a second rm f fails:
    B opened the first f, which is gone, and must not write into the new one."""
    writes, dataset, filling, go_on, open_ = _filling_open(staging, "f")
    opened = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_, opened)
        await filling.wait()
        writes.deleted(writes.unlinked(dataset, "f"))  # the first rm
        a = await writes.open(dataset, "f", None, truncate=True)  # created again
        writes.reattach(writes.unlinked(dataset, "f"))  # the second rm, failed
        go_on.set()
    b = opened[0]
    assert b is not a and b.unlinked and writes.find(dataset, "f") is a
    writes.close(b)
    a.dirty = False
    writes.close(a)


@pytest.mark.trio
async def test_a_cache_disk_with_no_room_is_named_as_such_not_as_a_full_staging_area(tmp_path):
    """The SSD tier refusing room (a disk full of other files, or its chunks pinned) is
    ENOSPC with the disk named: "raise --stage-size" would not help there."""
    from cachefs.staging import StagingFull

    class FullDisk:
        async def claim(self, size: int) -> bool:
            return False

    staging = Staging(str(tmp_path), limit=64 * RESERVE_STEP, disk=FullDisk())
    staging.open()
    with pytest.raises(StagingFull, match="no room on the cache disk"):
        await staging.reserve(staging.new_file(), RESERVE_STEP)
    staging = Staging(str(tmp_path / "small"), limit=RESERVE_STEP, disk=None)
    staging.open()
    with pytest.raises(StagingFull, match="staging is full"):
        await staging.reserve(staging.new_file(), 2 * RESERVE_STEP)


@pytest.mark.parametrize("closing", [False, True])
@pytest.mark.trio
async def test_a_directory_rename_waits_for_a_delete_under_it(staging, closing):
    """rm d/f is under way (its open file detached) when mv d d2 begins: the rename waits
    for the rm's outcome. The delete fails here, so the file is d/f's again, moves to d2/f
    with the directory, and its close (`closing`: one already waiting for the rm) uploads
    d2/f. The rename used to go on beside the rm: the failed delete gave the file its old
    name back, or its waiting close uploaded d/f while the directory moved (helper-42); an
    rm that went on after the move deleted nothing and reported success (helper-45)."""
    import trio.testing

    writes, dataset, submitted, _ = _recording_writes(staging)
    wf = await writes.open(dataset, "d/f", None, truncate=True)
    await wf.write(0, b"bytes")
    deletion = writes.unlinked(dataset, "d/f")  # rm d/f, waiting for its backend call
    moving = []

    async def rename_dir() -> None:
        async with writes.renaming_dir(dataset, "d", 5):
            moving.append(True)
            # And an rm under it that comes now waits for it (`Operations.unlink`).
            assert writes.renaming_above(dataset, "d/g") is not None
            assert writes.renaming_above(dataset, "dd/g") is None
            await trio.testing.wait_all_tasks_blocked()
            assert submitted == []  # nothing uploads while the directory moves
            writes.moved_dir(dataset, "d", "d2")

    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            if closing:
                nursery.start_soon(wf.commit, False)
                await trio.testing.wait_all_tasks_blocked()  # waiting for the rm
            nursery.start_soon(rename_dir)
            await trio.testing.wait_all_tasks_blocked()
            assert moving == []  # waiting for the rm too
            writes.reattach(deletion)  # the delete failed
    assert moving == [True] and writes.find(dataset, "d2/f") is wf
    if not closing:
        await wf.commit(background=False)
    assert submitted == ["d2/f"]
    _close_all(writes, wf)


def _ops_over_stubs(staging, delete=None, rename_gate=None, hold=frozenset(), writeback=False):
    """Operations over one unnamed read-write dataset whose backend holds f ("fff") and
    g ("ggg"); `delete(inner)` runs before a DELETE takes effect, and a rename waits for
    `rename_gate`; an upload of a path in `hold` is submitted once `release` is set (as a
    --writeback close whose journal waits for a spare entry). Returns (ops, writes,
    events: the backend's requests and the uploader's calls in order, release)."""
    from types import SimpleNamespace

    from cachefs.errors import ObjectNotFound
    from cachefs.fuse_ops import Operations
    from cachefs.objects import ObjectInfo
    from cachefs.writes import Writes

    stored = {"f": ObjectInfo("f", "file", 3, 0.0, "vf"), "g": ObjectInfo("g", "file", 3, 0.0, "vg")}
    content = {"f": b"fff", "g": b"ggg"}
    events = []
    release = trio.Event()

    async def stat(inner):
        if inner == "":
            return ObjectInfo("", "dir", 0, 0.0, "dir")
        if inner in stored:
            return stored[inner]
        raise ObjectNotFound(inner)

    class Reader:
        chunk_size = 4096

        async def chunk(self, obj, index):
            return content[obj.path], None

        async def read(self, obj, off, size, stream):
            return content[obj.path][off:off + size]

    async def backend_delete(inner):
        if delete is not None:
            await delete(inner)
        events.append(("delete", inner))
        stored.pop(inner)

    async def backend_rename(old, new, kind):
        if rename_gate is not None:
            await rename_gate.wait()
        events.append(("rename", old, new))
        stored[new] = stored.pop(old)
        content[new] = content.pop(old)

    async def submit(dataset, path, staged, size, background, early, **kwargs):
        if path in hold:
            await release.wait()
        with open(staged.path, "rb") as f:
            events.append(("upload", path, f.read(size)))
        landed = trio.Event()
        landed.set()
        return SimpleNamespace(landed=landed, error=None, entry=None)

    async def cancel(dataset, path):
        events.append(("cancel", path))
        return False  # no upload of it landed meanwhile

    async def wait(dataset, path, timeout, under=False):
        pass

    async def nothing(*args):
        pass

    dataset = SimpleNamespace(source="/src", name="", removed=False, walks=None, open_files=0,
                              config=SimpleNamespace(read_only=False), reader=Reader(),
                              namespace=SimpleNamespace(stat=stat, drop_entry=lambda p: None, invalidate=lambda p: None,
                                                        replaced=lambda p: None),
                              backend=SimpleNamespace(takes_parts=False, delete=backend_delete, rename=backend_rename,
                                                      timeout=1, retries=0))
    uploader = SimpleNamespace(latest=lambda d, p: None, cancel=cancel, submit=submit, wait=wait, part_size=8 << 20)
    writes = Writes(staging, uploader=uploader, writeback=writeback)
    node = SimpleNamespace(config=SimpleNamespace(), writes=writes, datasets={"": dataset},
                           locate=lambda path: (dataset, path), chunks_renamed=nothing)
    ops = Operations(node, entry_ttl=1, attr_ttl=1, block_size=4096)
    ops._chunks_gone = lambda dataset, gone: trio.lowlevel.checkpoint()
    return ops, writes, events, release


@pytest.mark.parametrize("delete_fails", [True, False])
@pytest.mark.trio
async def test_a_read_only_open_during_a_delete_reads_the_file_open_there(staging, delete_fails):
    """A has f open for write and wrote "new"; rm f is on its way; `cat f` opens f read-only
    meanwhile (no kernel lock holds that back): it reads A's file, as a reader opened before
    the rm does, whether the delete then fails or happens. It read the stored object
    (helper-42's reproduction, through Operations over stubs)."""
    import errno

    import pyfuse3
    import trio.testing

    from cachefs.errors import BackendUnavailable

    delete_go = trio.Event()

    async def delete(inner):
        await delete_go.wait()
        if delete_fails:
            raise BackendUnavailable("backend down")

    ops, writes, _, _ = _ops_over_stubs(staging, delete)
    ino = ops.inodes.lookup("f")
    fa = await ops.open(ino, os.O_RDWR | os.O_TRUNC, None)
    await ops.write(fa.fh, 0, b"new")
    outcome = []

    async def rm() -> None:
        try:
            await ops.unlink(pyfuse3.ROOT_INODE, b"f", None)
            outcome.append("deleted")
        except pyfuse3.FUSEError as e:
            outcome.append(errno.errorcode[e.errno])

    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rm)
            await trio.testing.wait_all_tasks_blocked()  # the DELETE is on its way
            opened = []

            async def cat() -> None:
                opened.append(await ops.open(ino, os.O_RDONLY, None))

            nursery.start_soon(cat)
            await trio.testing.wait_all_tasks_blocked()
            delete_go.set()
    assert outcome == (["EIO"] if delete_fails else ["deleted"])
    assert await ops.read(opened[0].fh, 0, 10) == b"new"


@pytest.mark.parametrize("rename", [False, True])
@pytest.mark.trio
async def test_rm_and_rename_wait_for_a_close_already_submitting_its_upload(staging, rename):
    """A close of f was past its checks and still submitting its upload (under --writeback
    it may wait there for a journal entry) when `rm f` or `mv f g` began: they wait for it.
    The rm then drops the upload before its DELETE; it landed after it and brought f back
    (helper-43's review). The rename lands it before moving f; it was started after the
    move, bringing f back with the new bytes while g kept the old ones (helper-44's)."""
    import pyfuse3
    import trio.testing

    ops, writes, events, release = _ops_over_stubs(staging, hold={"f"}, writeback=True)
    ino = ops.inodes.lookup("f")
    fa = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, None)
    await ops.write(fa.fh, 0, b"new")
    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.flush, fa.fh)
            await trio.testing.wait_all_tasks_blocked()  # inside its submit
            if rename:
                nursery.start_soon(ops.rename, pyfuse3.ROOT_INODE, b"f", pyfuse3.ROOT_INODE, b"g", 0, None)
            else:
                nursery.start_soon(ops.unlink, pyfuse3.ROOT_INODE, b"f", None)
            await trio.testing.wait_all_tasks_blocked()
            assert events == []  # waiting for that submit
            release.set()
    if rename:
        assert events[0] == ("upload", "f", b"new") and ("rename", "f", "g") in events
    else:
        assert events == [("upload", "f", b"new"), ("cancel", "f"), ("delete", "f")]


@pytest.mark.trio
async def test_an_open_during_a_rename_over_the_path_shares_the_file_open_there(staging):
    """A has g open and wrote "AAAA"; mv f g is on its way; B opens g for write meanwhile
    (an open of an existing file takes no directory lock): as at unlink, B shares A's file.
    The rename's second settling of g (`moved`) took that back, and B got a copy of its
    own (helper-44's review)."""
    import pyfuse3
    import trio.testing

    gate = trio.Event()
    ops, writes, _, _ = _ops_over_stubs(staging, rename_gate=gate)
    ino_g = ops.inodes.lookup("g")
    fa = await ops.open(ino_g, os.O_RDWR, None)
    await ops.write(fa.fh, 0, b"AAAA")
    opened = []

    async def open_b():
        opened.append(await ops.open(ino_g, os.O_RDWR, None))

    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.rename, pyfuse3.ROOT_INODE, b"f", pyfuse3.ROOT_INODE, b"g", 0, None)
            await trio.testing.wait_all_tasks_blocked()  # at the backend's rename
            nursery.start_soon(open_b)
            await trio.testing.wait_all_tasks_blocked()
            assert not opened  # B waits for the outcome
            gate.set()
    assert ops._files[opened[0].fh].write is ops._files[fa.fh].write
    assert await ops.read(opened[0].fh, 0, 10) == b"AAAA"


@pytest.mark.trio
async def test_an_open_of_a_deleted_file_does_not_share_the_file_a_later_rm_detached(staging):
    """B still copies the first f in; rm f happens; f is created again (C) and written; a
    second rm f happens with C still open: B opened the first f, not C. It shared C
    (helper-44's review)."""
    writes, dataset, filling, go_on, open_ = _filling_open(staging, "f")
    opened = []
    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_, opened)
            await filling.wait()
            writes.deleted(writes.unlinked(dataset, "f"))  # the first rm
            c = await writes.open(dataset, "f", None, truncate=True)  # created again
            await c.write(0, b"ZZZ")
            writes.deleted(writes.unlinked(dataset, "f"))  # the second rm, C still open
            go_on.set()
    b = opened[0]
    assert b is not c and b.read(0, 3) == b"ccc"  # the first f's bytes
    writes.close(b)
    _close_all(writes, c)


@pytest.mark.parametrize("rename", [False, True])
@pytest.mark.trio
async def test_an_open_during_a_delete_shares_the_file_open_there_without_copying_it_in(staging, rename):
    """A has f open and wrote "new"; `rm f` (or `mv g f`) is on its way; B opens f O_RDWR
    (no O_TRUNC, no lock): it waits for the outcome before copying f in, then shares A's
    file. It copied the stored f in first, which read the object the delete removed, and
    B's open failed (helper-45's review)."""
    import pyfuse3
    import trio.testing

    from cachefs.errors import ObjectNotFound

    gate = trio.Event()

    async def delete(inner):
        await gate.wait()

    ops, writes, events, _ = _ops_over_stubs(staging, delete=delete, rename_gate=gate)
    ino = ops.inodes.lookup("f")
    fa = await ops.open(ino, os.O_RDWR | os.O_TRUNC, None)
    await ops.write(fa.fh, 0, b"new")
    await ops.flush(fa.fh)

    class GoneOnceDeleted:
        chunk_size = 4096

        async def chunk(self, obj, index):
            await gate.wait()  # reads on once the delete (or rename) has happened
            await trio.lowlevel.checkpoint()
            raise ObjectNotFound(f"{obj.path}: gone")

    ops.node.datasets[""].reader = GoneOnceDeleted()
    opened = []

    async def open_b():
        opened.append(await ops.open(ino, os.O_RDWR, None))

    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            if rename:
                nursery.start_soon(ops.rename, pyfuse3.ROOT_INODE, b"g", pyfuse3.ROOT_INODE, b"f", 0, None)
            else:
                nursery.start_soon(ops.unlink, pyfuse3.ROOT_INODE, b"f", None)
            await trio.testing.wait_all_tasks_blocked()  # at the backend call
            nursery.start_soon(open_b)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert ops._files[opened[0].fh].write is ops._files[fa.fh].write
    assert await ops.read(opened[0].fh, 0, 10) == b"new"


@pytest.mark.trio
async def test_a_read_after_this_nodes_own_close_is_not_of_the_version_a_late_head_names(tmp_path):
    """Through Operations (a real Namespace, stubs below it): process A stats f (its HEAD on
    its way, slow); process B on this node writes f ("new!", O_TRUNC) and closes it
    (uploaded, the namespace told, as `Node._uploaded` does); A's HEAD then answers with what
    f was before the PUT. B's close returned: an open of f now must read "new!"."""
    from types import SimpleNamespace

    from cachefs.fuse_ops import Operations
    from cachefs.namespace import Namespace
    from cachefs.objects import ObjectInfo
    from cachefs.writes import Writes

    old = ObjectInfo("f", "file", 4, 1000.0, "etag:old")
    new = ObjectInfo("f", "file", 4, 1001.0, "etag:new")
    content = {"etag:old": b"old."}
    stored = {"f": old}
    first_head, first_head_asked = trio.Event(), trio.Event()
    heads = []

    class HeadBackend:
        store = object()  # not a LocalStore
        takes_parts = False

        async def stat(self, path):
            heads.append(path)
            answer = stored[path]
            if len(heads) == 1:  # A's HEAD: served now, answered late
                first_head_asked.set()
                await first_head.wait()
            await trio.lowlevel.checkpoint()
            return answer

    class Reader:  # the chunks of each version (the cache)
        chunk_size = 4096

        async def read(self, obj, off, size, stream):
            return content[obj.version][off:off + size]

    backend = HeadBackend()
    namespace = Namespace(backend, attr_ttl=60.0, dir_ttl=60.0)
    staging = Staging(str(tmp_path), limit=64 << 20, disk=None)
    staging.open()

    async def submit(dataset, path, staged, size, background, early, **kwargs):
        with open(staged.path, "rb") as f:
            content["etag:new"] = f.read(size)  # cached under the new version
        stored[path] = new
        namespace.put_entry(new)  # Node._uploaded
        landed = trio.Event()
        landed.set()
        return SimpleNamespace(landed=landed, error=None, entry=None)

    dataset = SimpleNamespace(source="s3://b/p", name="", removed=False, walks=None, open_files=0,
                              config=SimpleNamespace(read_only=False), reader=Reader(), namespace=namespace,
                              backend=backend)
    uploader = SimpleNamespace(latest=lambda d, p: None, submit=submit, part_size=8 << 20)
    writes = Writes(staging, uploader=uploader)
    node = SimpleNamespace(config=SimpleNamespace(), writes=writes, datasets={"": dataset},
                           locate=lambda path: (dataset, path))
    ops = Operations(node, entry_ttl=1, attr_ttl=1, block_size=4096)
    ino = ops.inodes.lookup("f")
    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.getattr, ino, None)  # A: stat f
            await first_head_asked.wait()
            fb = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, None)  # B: echo -n new! > f
            await ops.write(fb.fh, 0, b"new!")
            await ops.flush(fb.fh)  # close() returns: uploaded
            await ops.release(fb.fh)
            first_head.set()  # A's HEAD answers
    fc = await ops.open(ino, os.O_RDONLY, None)  # C, after B's close returned
    assert await ops.read(fc.fh, 0, 4) == b"new!", "read-after-write on this node returned the old version"
    assert (await ops.getattr(ino, None)).st_mtime_ns == int(new.mtime * 1e9)


@pytest.mark.parametrize("readded", ["after", "before"])
def test_an_upload_abandoned_by_a_removed_dataset_never_lands_over_a_newer_close(tmp_path, readded):
    """--writeback: a close of "f" is journaled while the backend does not take it, and the
    dataset is removed (`cachefs dataset remove`): its upload is abandoned, its entry kept
    "to resume when a dataset of the same source is added again". The dataset is added
    again (`after` the upload was given up, or `before`, while it still waits to fail); a
    newer close of "f" lands. The entry was resumed at the add (`after`) or dropped as
    superseded (`before`); it was once kept until the next start, and replayed there: the
    OLDER bytes replaced the newer ones in the backend."""
    from cachefs.node import Node

    src, ds, config = _local_writeback_node(tmp_path)

    async def write(node, data: bytes, wait: bool):
        dataset = node.datasets["d"]
        wf = await node.writes.open(dataset, "f", None, truncate=True)
        await wf.write(0, data)
        upload = await wf.commit(background=True)
        node.writes.close(wf)
        if wait:
            await upload.done.wait()
        return upload

    async def first_run():
        async with Node(config, config.datasets, name="t") as node:
            dataset = node.datasets["d"]
            down = _backend_down(dataset)
            old = await write(node, b"old bytes", wait=False)
            await trio.testing.wait_all_tasks_blocked()
            await node.remove_dataset("d")
            if readded == "before":
                await node.add_dataset(ds)
                newer = await write(node, b"the newer bytes", wait=False)  # waits for the old one
                down.set()
                await newer.done.wait()
                assert (src / "f").read_bytes() == b"the newer bytes"
                return [len(b"old bytes")]
            down.set()
            await old.done.wait()  # abandoned: its entry stays for a later add of the source
            await node.add_dataset(ds)
            resumed = [u.size for u in node.uploader.all_pending()]
            await write(node, b"the newer bytes", wait=True)
            assert (src / "f").read_bytes() == b"the newer bytes"
            return resumed

    resumed = trio.run(first_run)

    async def restart():
        async with Node(config, config.datasets, name="t") as node:
            for upload in node.uploader.all_pending():
                await upload.done.wait()

    trio.run(restart)
    assert (src / "f").read_bytes() == b"the newer bytes", "a restart replayed the older close over the newer one"
    assert resumed == [len(b"old bytes")], "the abandoned upload did not resume when its source was added again"


@pytest.mark.trio
async def test_a_kill_while_entries_are_let_go_of_never_leaves_an_older_entry_of_a_path_than_a_newer_one(
        staging, monkeypatch, autojump_clock):
    """Two closes of "f" land one after the other (the second upload runs once the first
    released the path's lock, while the first's `forget` still waits for housekeeping), and
    housekeep_forever gathers both entries into one round. More entries are let go of than
    spares are wanted: the first ones are emptied for reuse, the rest removed, and
    `_housekeep` removes before it empties. A kill -9 between the two leaves the OLDER
    entry of "f" whole (its staged file is still there: it is released after `forget`)
    and the newer one gone: the restart uploads the older bytes over the newer ones that
    had landed."""
    import math
    import shutil

    other = await staging.journal("s3://b/p", "g", _staged_file(staging, b"g" * 10), 10)  # journaled earlier
    async with trio.open_nursery() as nursery:
        await _with_spares(staging, nursery)
        older = await staging.journal("s3://b/p", "f", _staged_file(staging, b"old" * 10), 30)
        newer = await staging.journal("s3://b/p", "f", _staged_file(staging, b"newer" * 10), 50)
        older_path = staging._entry_path(older)
        cache_dir = staging.dir.rpartition("/")[0]
        crash_dir = cache_dir + "-at-kill"
        real_reuse = staging._reuse_entry

        def reuse_entry(path, seq):
            if path == older_path:  # kill -9 as the older entry is about to be emptied
                shutil.copytree(cache_dir, crash_dir)
            return real_reuse(path, seq)

        monkeypatch.setattr(staging, "_reuse_entry", reuse_entry)
        # The three uploads landed within REMOVE_INTERVAL: each `forget`s its entry, in this order.
        autojump_clock.autojump_threshold = math.inf
        for entry in (other, older, newer):
            nursery.start_soon(staging.forget, entry)
            await trio.testing.wait_all_tasks_blocked()
        autojump_clock.autojump_threshold = 0
        while _size_or_0(older_path):  # until housekeeping emptied (and renamed) or removed it
            await trio.sleep(0.01)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert os.path.isdir(crash_dir), "housekeeping emptied no entry"
    for name in os.listdir(os.path.join(crash_dir, "journal")):  # the same --cache-dir after the restart
        full = os.path.join(crash_dir, "journal", name)
        with open(full) as f:
            text = f.read()
        with open(full, "w") as f:
            f.write(text.replace(cache_dir + "/", crash_dir + "/"))
    replayed = [e.seq for e in Staging(crash_dir, limit=64 << 20, disk=None).open() if e.path == "f"]
    assert replayed in ([], [newer.seq], [older.seq, newer.seq]), \
        f"the restart replays {replayed}: the older close of f ({older.seq}) without the newer ({newer.seq})"


@pytest.mark.trio
async def test_a_truncate_by_path_while_the_last_handle_is_released_ends_and_leaks_nothing(tmp_path):
    """truncate(2) of f by its path (no fh: `setattr` finds the file open for write by its
    path) waits for staging room, full of a closed file whose upload is pending; meanwhile
    f's last handle is closed. The truncate then took room for a file let go of, never
    given back, and looped for good, a copy made and dropped each round (helper-47's
    review). It now holds the file as a handle does: it ends once the upload frees room,
    and, the last holder, uploads the truncated file itself."""
    from types import SimpleNamespace

    mib = 1 << 20
    staging = Staging(str(tmp_path), limit=8 * mib, disk=None)
    staging.open()
    ops, writes, events, _ = _ops_over_stubs(staging)
    pending, fd = staging.create_file()  # a closed file, its upload pending
    os.close(fd)
    await staging.reserve(pending, 6 * mib)
    staging.draining_changed(+6 * mib)
    ino = ops.inodes.lookup("f")
    fa = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, None)
    await ops.write(fa.fh, 0, b"a" * mib)
    attr = SimpleNamespace(st_size=4 * mib)
    fields = SimpleNamespace(update_size=True, update_mtime=False, update_mode=False, update_uid=False,
                             update_gid=False)
    with trio.fail_after(5):  # a safety net
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.setattr, ino, attr, fields, None, None)
            await trio.testing.wait_all_tasks_blocked()  # waiting for room
            await ops.flush(fa.fh)  # the close: "a" * 1 MiB uploaded
            await ops.release(fa.fh)
            staging.draining_changed(-6 * mib)  # the pending upload lands and lets go of its file
            staging.release(pending)
    assert events[-2:] == [("upload", "f", b"a" * mib), ("upload", "f", b"a" * mib + bytes(3 * mib))]
    assert writes.find(ops.node.datasets[""], "f") is None
    assert staging.used == 0, f"{staging.used} bytes of room held by a file nobody holds"


@pytest.mark.trio
async def test_a_writer_waiting_for_room_the_cache_disk_refused_gets_it_once_the_disk_has_it(tmp_path, autojump_clock):
    """The SSD tier is full of pinned chunks (a pin lease), so it refuses a writer's room; an
    upload (--writeback, its backend down: retried for as long as it takes) is pending, so the
    writer waits instead of failing. The lease ends and the chunks are unpinned: the room is
    there, but nothing woke the writer: `Staging._freed` is set only by staging's own events,
    and the writer slept until that unrelated upload landed (helper-47's review, its test).
    It now asks the disk again now and then (DISK_RECHECK)."""
    from cachefs.cache.disk import DiskTier
    from cachefs.objects import ObjectId, chunk_key

    MiB = 1 << 20

    disk = DiskTier(str(tmp_path / "cache"), 4 * MiB, 0.0, admission="lru")
    await disk.load()
    obj = ObjectId("s3://b/p", "o", "v1", 3 * MiB)
    keys = [chunk_key(obj, MiB, index) for index in range(3)]
    for key in keys:
        assert await disk.put(key, b"c" * MiB)
    disk.pin([k.digest for k in keys])
    staging = Staging(str(tmp_path), limit=4 * MiB, disk=disk)
    staging.open()
    staging.draining_changed(+MiB)  # another file's upload, pending for as long as its backend is down
    staged = staging.new_file()
    got = trio.Event()

    async def writer() -> None:
        await staging.reserve(staged, 2 * MiB)
        got.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert not got.is_set()  # waiting: the disk has no room now
        disk.unpin([k.digest for k in keys])  # the lease ended: the chunks can go
        # The clock jumps only once the run has been idle for a while, so not while the disk
        # tier evicts in a thread (it would jump past the hour then).
        autojump_clock.autojump_threshold = 0.5
        with trio.move_on_after(3600):
            await got.wait()
        assert got.is_set(), "the writer still waits an hour after the cache disk had room for it"
        assert staged.reserved == 2 * MiB
    disk.close()


@pytest.mark.trio
async def test_staged_room_not_written_yet_is_kept_free_on_the_cache_disk(tmp_path):
    """A 64 MiB cache disk, --free-space-ratio 0.25 (16 MiB kept free), a --cache-size larger
    than the disk. A writer truncates its file up to 24 MiB (room reserved: the SSD tier's
    claim checks the disk, counting the 24 MiB "as being written until statvfs sees it"), then
    chunks are cached, then the writer fills its file. The claim stops counting the room as
    soon as it returns, and a truncate allocates no blocks: statvfs never sees it, so the
    chunk cache takes the writer's 24 MiB and the disk ends up overfilled (on a real disk of
    that size the writer's pwrite gets ENOSPC, and the write EIO): helper-47's review, its
    test. A jump of room is now allocated on the disk as it is reserved."""
    from cachefs.cache.disk import DiskTier
    from cachefs.objects import ObjectId, chunk_key
    from cachefs.writes import WriteFile, Writes

    MiB = 1 << 20
    total, ratio = 64 * MiB, 0.25

    def allocated() -> int:
        return sum(os.lstat(os.path.join(dp, f)).st_blocks * 512 for dp, _, fs in os.walk(tmp_path) for f in fs)

    def statvfs():
        free = total - allocated()
        return os.statvfs_result((4096, 1, total, free, free, 1000, 1000, 1000, 0, 255))

    disk = DiskTier(str(tmp_path), 1 << 30, ratio, admission="lru")
    disk._statvfs = statvfs
    await disk.load()
    staging = Staging(str(tmp_path), limit=32 * MiB, disk=disk)
    staging.open()
    staged, fd = staging.create_file()
    wf = WriteFile(Writes(staging, uploader=None, writeback=False), None, "f", staged, fd, 0)
    await wf.truncate(24 * MiB)  # room for all of it, taken now: the writes that follow cannot fail
    assert staged.reserved == 24 * MiB
    obj = ObjectId("s3://b/p", "o", "v1", 64 * MiB)
    for index in range(64):  # reads fill the cache meanwhile, as far as the tier lets them
        await disk.put(chunk_key(obj, MiB, index), os.urandom(MiB))
    for at in range(0, 24 * MiB, MiB):  # the writer fills its file
        await wf.write(at, b"w" * MiB)
    free = total - allocated()
    os.close(fd)
    disk.close()
    assert free >= ratio * total, f"{free / MiB:.1f} MiB free of {total // MiB}: less than the " \
                                  f"{ratio * total / MiB:.0f} MiB --free-space-ratio keeps"


def test_an_entry_left_for_a_source_not_mounted_yet_keeps_its_room_until_resumed(tmp_path):
    """A --writeback close journaled, the node stopped before it landed; the next start
    mounts no dataset of that source at first. The entry's staged file stays on the cache
    disk meanwhile: it counts against staging and the SSD tier's --cache-size (it counted
    nowhere until the source was added: helper-47's review). Added, it resumes, lands, and
    its room is free again."""
    from cachefs.config import DatasetConfig, NodeConfig
    from cachefs.node import Node

    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    ds = DatasetConfig(name="d", url=str(src), read_only=False)
    elsewhere = DatasetConfig(name="e", url=str(other), read_only=False)
    data = b"x" * (3 << 20)

    def config(datasets):
        return NodeConfig(mountpoint=str(tmp_path / "mnt"), cache_dir=str(tmp_path / "cache"), cache_size=256 << 20,
                          mem_size=64 << 20, writeback=True, datasets=datasets)

    async def first_run():
        async with Node(config([ds]), [ds], name="t") as node:
            dataset = node.datasets["d"]

            async def never(*args, **kwargs):
                await trio.sleep_forever()

            dataset.backend.upload = never
            wf = await node.writes.open(dataset, "f", None, truncate=True)
            await wf.write(0, data)
            await wf.commit(background=True)
            node.writes.close(wf)
            await node.staging.durable(node.uploader.all_pending()[0].entry)

    trio.run(first_run)

    async def restart():
        async with Node(config([elsewhere]), [elsewhere], name="t") as node:
            staged_room = node.staging.used
            disk_used = node.disk.used
            await node.add_dataset(ds)
            for upload in node.uploader.all_pending():
                await upload.done.wait()
            return staged_room, disk_used, node.staging.used - node.staging.removing  # gone, or going

    staged_room, disk_used, after = trio.run(restart)
    assert (src / "f").read_bytes() == data
    assert staged_room >= len(data) and disk_used >= len(data), \
        f"a staged file of {len(data)} bytes on the cache disk, counted: staging {staged_room}, SSD tier {disk_used}"
    assert after == 0


def test_an_upload_abandoned_after_its_dataset_was_added_again_resumes(tmp_path):
    """--writeback, the backend down: `cachefs dataset remove --force d` then `add d` again
    (say, with fixed keys) while the upload of "f" waits to fail (in a request or between
    retries). It fails after the add, with the old dataset's closed backend: it is appended
    to `Uploader.abandoned`, which only an add of the source looks at: the add happened
    already. Nothing resumes it until the next start: the close that returned is not in the
    backend, and the mount shows the old f (helper-49's review, its test)."""
    from cachefs.node import Node

    src, ds, config = _local_writeback_node(tmp_path, b"before")

    async def main():
        async with Node(config, config.datasets, name="t") as node:
            old, down, readded = await _closed_while_down_then_readded(node, ds)
            down.set()  # the old attempt fails now
            await old.done.wait()
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(10):  # a safety net: whatever resumes runs at once
                for upload in node.uploader.all_pending():
                    await upload.done.wait()
            stuck = list(node.uploader.abandoned)
            shown = node.writes.info(readded, "f")
            return (src / "f").read_bytes(), stuck, shown

    stored, stuck, shown = trio.run(main)
    assert stored == b"closed bytes", (
        f"the returned close never landed: backend has {stored!r}; abandoned with its dataset present: "
        f"{[(e.path, e.size) for e in stuck]}; the mount shows {shown}")


def test_a_file_deleted_after_its_dataset_was_added_again_stays_deleted_after_a_restart(tmp_path):
    """As above (the upload abandoned after the re-add, left in `Uploader.abandoned`), then
    `rm f` through the mount: `Uploader.cancel` drops pending uploads only, the abandoned
    entry stays in the journal, and the next start uploads it: the deleted file is back
    (helper-49's review, its test)."""
    from cachefs.node import Node

    src, ds, config = _local_writeback_node(tmp_path)

    async def first_run():
        async with Node(config, config.datasets, name="t") as node:
            old, down, readded = await _closed_while_down_then_readded(node, ds)
            down.set()
            await old.done.wait()
            # `rm f`, as Operations.unlink does it: its uploads dropped (one resumed from the
            # abandoned entry may have landed meanwhile), then the object deleted.
            await node.uploader.cancel(readded, "f")
            if (src / "f").exists():
                await readded.backend.delete("f")
            readded.namespace.drop_entry("f")

    trio.run(first_run)
    assert not (src / "f").exists()

    async def restart():
        async with Node(config, config.datasets, name="t") as node:
            for upload in node.uploader.all_pending():
                await upload.done.wait()

    trio.run(restart)
    assert not (src / "f").exists(), f"f, deleted before the restart, is back: {(src / 'f').read_bytes()!r}"


def test_a_file_still_open_when_its_kept_upload_resumes_gives_its_room_back_at_its_close(tmp_path):
    """--writeback, the backend down: a writer fsyncs f and keeps it open (its upload holds
    the same staged file as the open file); `cachefs dataset remove --force d`; the upload
    is given up, its staged file kept (`keep`), still held by the open file. `add d` again:
    the entry is resumed (`adopt`: a second StagedFile of the same path, its room taken
    again) and lands. The writer's close then lets go of the first StagedFile: it is
    `keep`, so its room goes to `Staging._kept`, under a path whose entry was resumed
    already: nothing ever pops it. Staging and the SSD tier count it until the node stops
    (helper-49's review, its test)."""
    from cachefs.node import Node

    src, ds, config = _local_writeback_node(tmp_path)
    size = 3 << 20

    async def main():
        async with Node(config, config.datasets, name="t") as node:
            dataset = node.datasets["d"]
            down = _backend_down(dataset)
            staging = node.staging
            wf = await node.writes.open(dataset, "f", None, truncate=True)
            await wf.write(0, b"x" * size)
            old = await wf.commit(background=True)  # fsync(): sealed, the file stays open
            await trio.testing.wait_all_tasks_blocked()
            await node.remove_dataset("d", force=True)
            down.set()
            await old.done.wait()  # abandoned, its staged file kept (the open file holds it too)
            await node.add_dataset(ds)  # resumed from the entry
            for upload in node.uploader.all_pending():
                await upload.done.wait()
            assert (src / "f").read_bytes() == b"x" * size
            node.writes.close(wf)  # the writer's close (ESTALE for its writes; release still comes)
            with trio.fail_after(10):  # a safety net: housekeeping removes what was let go of
                while staging.removing:
                    await staging._removal_round.wait()
            return staging.used, dict(staging._kept)

    used, kept = trio.run(main)
    assert used == 0, f"{used} bytes of staging room never given back; _kept={kept}"


def test_a_rename_after_the_readd_waits_for_the_close_resumed_from_the_removed_dataset(tmp_path):
    """--writeback, the backend down: `f` closed (its upload pending), `cachefs dataset
    remove --force d`, `add d` again, then `mv f g` through the mount. The rename waits for
    the uploads of f (`Uploader.wait`); the one it waits for fails with the removed
    dataset's backend and is resumed at once into the new dataset (`Node._abandoned`), as a
    new Upload the rename does not wait for. The rename moves the backend's old f to g,
    then the resumed upload lands f again: g has the bytes from before the close, and f,
    renamed away, is back.
    (helper-50's review, its test)."""
    from cachefs.errors import ObjectNotFound
    from cachefs.fuse_ops import Operations
    from cachefs.node import Node

    src, ds, config = _local_writeback_node(tmp_path, b"before")

    async def main():
        async with Node(config, config.datasets, name="t") as node:
            old, down, readded = await _closed_while_down_then_readded(node, ds)
            # Deterministic: the new dataset's metadata requests and rename answer on the
            # trio thread (no thread hop), and its uploads start once every other task waits.
            backend, store = readded.backend, readded.backend.store

            async def direct(fn, *args):
                await trio.lowlevel.checkpoint()
                try:
                    return fn(*args)
                except FileNotFoundError as e:
                    raise ObjectNotFound(str(e)) from None

            backend.stat = lambda path: direct(store.stat, path)
            backend.check_name = lambda path: direct(store.check_name, path)
            backend.list_dir = lambda path: direct(store.list_dir, path)
            backend.rename = lambda old, new, kind: direct(store.rename, old, new, kind)
            real_upload = backend.upload

            async def upload_when_all_wait(*args, **kwargs):
                await trio.testing.wait_all_tasks_blocked()
                return await real_upload(*args, **kwargs)

            backend.upload = upload_when_all_wait
            ops = Operations(node, entry_ttl=1.0, attr_ttl=1.0, block_size=4096)
            parent = ops.inodes.lookup("d")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ops.rename, parent, b"f", parent, b"g", 0, None)  # mv d/f d/g
                await trio.testing.wait_all_tasks_blocked()  # the rename waits for f's upload
                down.set()  # which fails now, with the removed dataset's backend
            await old.done.wait()
            with trio.fail_after(10):
                while node.uploader.all_pending():
                    for upload in node.uploader.all_pending():
                        await upload.done.wait()
            return {p.name: p.read_bytes() for p in src.iterdir()}

    files = trio.run(main)
    assert files == {"g": b"closed bytes"}, f"after `close f; mv f g`, the backend has {files}"
