"""Backend.upload's multipart uploads with parts sent early (while the file was written),
and when the Uploader caches an uploaded file's chunks."""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import random
import threading
import time
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from cachefs.backend import Answered, Backend, Written
from cachefs.cache.disk import DiskTier, file_header_size
from cachefs.objects import ObjectId, ObjectInfo, chunk_key
from cachefs.staging import SPARES, Staging
from cachefs.upload import CACHE_SMALL_AFTER, CACHE_YIELD_MAX, EarlyParts, Uploader

PART = 1000


class PartsStore:
    """A store that keeps multipart uploads in memory, as S3 does: parts by number,
    the object assembled from the ETags named at completion."""

    is_s3 = True
    url = "s3://fake"

    def __init__(self):
        self._lock = threading.Lock()
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.puts: collections.Counter[int] = collections.Counter()  # part number -> PUTs
        self.objects: dict[str, bytes] = {}
        self.aborted: list[str] = []

    def start_multipart(self, path: str) -> str:
        with self._lock:
            upload_id = f"u{len(self.uploads) + 1}"
            self.uploads[upload_id] = {}
            return upload_id

    def put_part(self, path: str, upload_id: str, number: int, staged: str, start: int, end: int) -> str:
        with open(staged, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        with self._lock:
            self.uploads[upload_id][number] = body
            self.puts[number] += 1
        return hashlib.md5(body).hexdigest()

    def finish_multipart(self, path: str, upload_id: str, etags: list[str], size: int) -> ObjectInfo:
        parts = self.uploads.pop(upload_id)
        assert [hashlib.md5(parts[n]).hexdigest() for n in range(1, len(etags) + 1)] == etags, "parts named wrong"
        self.objects[path] = b"".join(parts[n] for n in range(1, len(etags) + 1))
        return ObjectInfo(path, "file", size, 0.0, "etag:x")

    def abort_multipart(self, path: str, upload_id: str) -> None:
        self.aborted.append(upload_id)
        self.uploads.pop(upload_id, None)


async def _until(condition) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.001)  # the store answers in threads


def _staged_upload(tmp_path, data: bytes) -> tuple:
    """`data` staged in a file, a store, a backend over it, and early parts of a
    multipart upload of "f" begun: (staged, store, backend, early)."""
    staged = tmp_path / "staged"
    staged.write_bytes(data)
    store = PartsStore()
    backend = Backend(store, concurrency=2, timeout=10, retries=0, upload_concurrency=8)
    early = EarlyParts(PART)
    early.upload_id = store.start_multipart("f")
    return staged, store, backend, early


@pytest.mark.trio
async def test_a_close_sends_the_parts_never_sent_while_early_ones_are_still_in_flight(tmp_path):
    data = random.Random(3).randbytes(4 * PART + 10)
    staged, store, backend, early = _staged_upload(tmp_path, data)
    early.next = 2
    early.sending = {0: True, 1: True}  # left behind by the writer; their PUTs not answered yet
    done = trio.Event()

    async def close() -> None:
        await backend.upload("f", str(staged), len(data), PART, early)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close)
        # Parts 3 to 5 (the tail) go up while parts 1 and 2 are still in flight.
        await _until(lambda: store.puts.keys() == {3, 4, 5})
        assert not done.is_set()
        etag = store.put_part("f", early.upload_id, 1, str(staged), 0, PART)  # part 1's early PUT lands
        early.sent(0, etag)
        early.sent(1, None)  # part 2's failed: the close sends it itself
        await done.wait()
    assert store.objects["f"] == data
    assert store.puts == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    assert not store.aborted and early.upload_id is None


@pytest.mark.trio
async def test_a_part_written_into_while_in_flight_is_sent_again(tmp_path):
    data = bytearray(random.Random(4).randbytes(3 * PART + 1))
    staged, store, backend, early = _staged_upload(tmp_path, data)
    early.sending = {0: True}
    etag = store.put_part("f", early.upload_id, 1, str(staged), 0, PART)  # the old bytes of part 1
    early.touched(10, 20)  # then written into, before its PUT was answered
    data[10:20] = b"x" * 10
    staged.write_bytes(data)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.upload, "f", str(staged), len(data), PART, early)
        await _until(lambda: store.puts.keys() == {1, 2, 3, 4})
        early.sent(0, etag)
    assert store.objects["f"] == data
    assert store.puts[1] == 2


def test_a_part_is_ready_once_filled_and_the_file_is_larger_than_one_part():
    early = EarlyParts(PART)
    assert early.ready(PART) == []  # may stay a file of one part: a single PUT
    assert early.ready(PART + 1) == [0]
    assert early.ready(3 * PART) == [1, 2]  # filled, not yet written past
    assert early.ready(3 * PART + 5) == []
    early.stopped = True
    assert early.ready(10 * PART) == []


def _dataset_over(backend) -> SimpleNamespace:
    """A dataset of `backend` as the Uploader sees one: no tier to cache chunks in."""
    return SimpleNamespace(source="s3://b/p", name="", removed=False, backend=backend,
                           reader=SimpleNamespace(tiers=[], chunk_size=4096))


async def _nothing(*args) -> None:
    pass


class HeldBackend:
    """A backend whose uploads each end when the test lets them (`land`)."""

    def __init__(self):
        self.gates: dict[str, trio.Event] = {}

    async def upload(self, path, staged, size, part_size, early=None, after_put=None) -> Written:
        await self.gates.setdefault(path, trio.Event()).wait()
        return Written(ObjectInfo(path, "file", size, 0.0, f"v-{path}"), ours=True)

    def puts_from_trio(self, size: int) -> bool:
        return False

    def land(self, path: str) -> None:
        self.gates.setdefault(path, trio.Event()).set()

    async def start_parts(self, path) -> str:
        return f"parts-{path}"

    async def put_part(self, path, upload_id, index, part_size, staged, size) -> str:
        await self.gates.setdefault(path, trio.Event()).wait()
        return f"etag-{index}"


class RecordingDiskTier:
    """An SSD tier that records which chunks were cached, and when."""

    medium = "disk"

    def __init__(self):
        self.cached: list[tuple[str, float]] = []

    async def put_from(self, key, fd, offset) -> bool:
        self.cached.append((key.obj.path, trio.current_time()))
        return True

    def reserve_unkeyed(self, tag, length):
        return None  # no room without evicting: small chunks are cached with put_from too


def _uploader_over(tmp_path, nursery):
    """An Uploader of a dataset whose backend is a HeldBackend and whose one tier is a
    RecordingDiskTier: (uploader, staging, dataset)."""
    staging = Staging(str(tmp_path), 1 << 30, None)
    staging.open()
    tier = RecordingDiskTier()
    dataset = SimpleNamespace(source="s3://b/p", name="", removed=False, backend=HeldBackend(),
                              reader=SimpleNamespace(tiers=[tier], chunk_size=4096))

    async def uploaded(dataset, path, info) -> None:
        pass

    return Uploader(staging, nursery, 8 << 20, uploaded), staging, dataset


async def _submit(uploader, staging, dataset, path: str, background: bool = False, size: int = 5000):
    """Upload `size` bytes (5000: 2 chunks of 4096, a file that waits to be cached) as `path`."""
    staged, fd = staging.create_file()
    os.pwrite(fd, b"x" * size, 0)
    os.close(fd)
    upload = await uploader.submit(dataset, path, staged, size, background)
    staging.release(staged)  # the writer lets go: the upload holds it
    return upload


async def _landed_while_another_is_sent(uploader, staging, dataset, other: str) -> tuple:
    """Upload "a" (2 chunks) and `other`; return once "a" has landed (its close returned)
    and `other` is still being sent: (the two Uploads)."""
    first = await _submit(uploader, staging, dataset, "a")
    second = await _submit(uploader, staging, dataset, other)
    dataset.backend.land("a")
    await first.landed.wait()
    return first, second


@pytest.mark.trio
async def test_a_close_to_open_upload_caches_its_chunks_after_the_uploads_still_in_flight(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        uploader, staging, dataset = _uploader_over(tmp_path, nursery)
        tier = dataset.reader.tiers[0]
        first, second = await _landed_while_another_is_sent(uploader, staging, dataset, "b")
        await trio.sleep(1)
        assert tier.cached == []  # "a"'s close returned, but its chunks wait while "b" is sent
        dataset.backend.land("b")
        await first.done.wait()
        await second.done.wait()
        assert sorted(p for p, _ in tier.cached) == ["a", "a", "b", "b"]  # 5000 bytes: 2 chunks each


@pytest.mark.trio
async def test_an_upload_waits_to_cache_its_chunks_for_a_bounded_time_only(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        uploader, staging, dataset = _uploader_over(tmp_path, nursery)
        tier, backend = dataset.reader.tiers[0], dataset.backend
        first, _ = await _landed_while_another_is_sent(uploader, staging, dataset, "stuck")  # never answered
        landed_at = trio.current_time()
        await first.done.wait()
        assert [p for p, _ in tier.cached] == ["a", "a"]
        assert tier.cached[0][1] - landed_at == pytest.approx(CACHE_YIELD_MAX, abs=0.01)
        # A --writeback upload caches at once: no close waits for the others.
        background = await _submit(uploader, staging, dataset, "w", background=True)
        start = trio.current_time()
        backend.land("w")
        await background.done.wait()
        assert [t for p, t in tier.cached if p == "w"] == [start, start]
        # A file of one chunk does not wait for the others either (cheap to cache, and small
        # files would pile up waiting), only for the writer's next requests to go first.
        small = await _submit(uploader, staging, dataset, "s", size=100)
        start = trio.current_time()
        backend.land("s")
        await small.done.wait()
        assert [t for p, t in tier.cached if p == "s"] == [pytest.approx(start + CACHE_SMALL_AFTER, abs=1e-6)]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_an_upload_caches_at_once_when_a_newer_close_of_its_path_waits_for_it(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        uploader, staging, dataset = _uploader_over(tmp_path, nursery)
        tier = dataset.reader.tiers[0]
        first, _ = await _landed_while_another_is_sent(uploader, staging, dataset, "stuck")  # never answered
        await trio.sleep(0.5)
        assert tier.cached == []  # yielding to "stuck"
        # The path is closed again: its upload waits for the first one's end (uploads of
        # a path land in order), so the first stops yielding.
        start = trio.current_time()
        await _submit(uploader, staging, dataset, "a")
        await first.done.wait()
        assert [t for p, t in tier.cached] == [start, start]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_file_whose_parts_are_sent_early_is_removed_never_emptied_for_reuse(tmp_path):
    """Early parts are read from a mapping of the staged file without holding it: emptied
    for reuse under a part in flight (`Staging.housekeep_forever`), the read would fault."""
    async with trio.open_nursery() as nursery:
        uploader, staging, dataset = _uploader_over(tmp_path, nursery)
        nursery.start_soon(staging.housekeep_forever)
        await _until(lambda: len(staging._spare_files) == SPARES)
        staged, fd = staging.create_file()  # a spare: one is wanted back
        os.pwrite(fd, b"x" * 3000, 0)
        os.close(fd)
        await staging.reserve(staged, 3000)
        early = EarlyParts(PART)
        uploader.send_early(dataset, "big", early, staged, 3000)
        assert early.sending  # parts in flight, the file not held
        inode = os.stat(staged.path).st_ino
        staging.release(staged)  # the writer went away (its file unlinked)
        await _until(lambda: not staging.used)  # given back once it is removed (or emptied)
        assert not os.path.exists(staged.path)
        assert inode not in {os.fstat(fd).st_ino for _, fd in staging._spare_files}
        dataset.backend.land("big")
        nursery.cancel_scope.cancel()


class PutStore:
    """A store of single PUTs that answer with the version, as S3's ETag does."""

    is_s3 = True
    url = "s3://fake"

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def put_file(self, path: str, staged: str) -> ObjectInfo:
        with open(staged, "rb") as f:
            self.objects[path] = f.read()
        return ObjectInfo(path, "file", len(self.objects[path]), 0.0, f"etag-{len(self.objects)}")


async def _closed_and_uploaded(stage_dir, dataset, path: str, data: bytes):
    """`data` closed as `path` (close-to-open) and uploaded by an Uploader of its own; the Upload, done."""
    async with trio.open_nursery() as nursery:
        staging = Staging(str(stage_dir), 1 << 30, None)
        staging.open()

        async def uploaded(dataset, path, info) -> None:
            pass

        uploader = Uploader(staging, nursery, 8 << 20, uploaded)
        staged, fd = staging.create_file()
        os.pwrite(fd, data, 0)
        os.close(fd)
        upload = await uploader.submit(dataset, path, staged, len(data), False)
        staging.release(staged)
        await upload.done.wait()
        nursery.cancel_scope.cancel()
    return upload


@pytest.mark.trio
async def test_a_small_file_is_cached_by_its_put_thread_with_no_hop_of_its_own(tmp_path):
    """The chunk of a small file goes to the SSD from the PUT's thread, in room taken
    before: a hop to a write thread cost more CPU than writing it."""
    disk = DiskTier(str(tmp_path / "cache"), 1 << 20, 0.0)
    await disk.load()

    async def no_hop(*args, **kwargs):
        raise AssertionError("a write thread was asked")

    disk._write_threads.run = no_hop
    store = PutStore()
    backend = Backend(store, concurrency=2, timeout=10, retries=0)
    dataset = SimpleNamespace(source="s3://b/p", name="", removed=False, backend=backend,
                              reader=SimpleNamespace(tiers=[disk], chunk_size=4096))
    data = random.Random(9).randbytes(3000)
    upload = await _closed_and_uploaded(tmp_path, dataset, "small", data)
    assert upload.cached and store.objects["small"] == data
    key = chunk_key(ObjectId("s3://b/p", "small", upload.info.version, len(data)), 4096, 0)
    assert bytes(await disk.get(key)) == data
    assert disk.usage() == (file_header_size(len(data)) + len(data), 1)


@pytest.mark.trio
async def test_a_write_while_a_writeback_close_journals_goes_to_a_copy(tmp_path):
    """The upload holds the closed file before its journal entry may wait for spare entry
    files: a write by another handle meanwhile copies the file, so the entry, the upload and
    the staged bytes are all of the closed state. It used to change the file in place: the
    entry named 1000 bytes of a file of 2000, which a restart after kill -9 dropped."""
    from cachefs.writes import WriteFile, Writes

    async with trio.open_nursery() as nursery:
        uploader, staging, dataset = _uploader_over(tmp_path, nursery)
        while staging._spare_entries:  # used up, and more being made: journal() waits
            os.close(staging._spare_entries.popleft()[1])
        staging._preparing = trio.Event()
        staged, fd = staging.create_file()
        wf = WriteFile(Writes(staging, uploader=uploader, writeback=True), dataset, "f", staged, fd, 0)
        await wf.write(0, b"a" * 1000)
        closed = {}

        async def close() -> None:
            closed["upload"] = await uploader.submit(dataset, "f", staged, 1000, background=True)

        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        await wf.write(0, b"B" * 2000)  # another handle, while the close journals
        staging._preparing.set()
        staging._preparing = None
        await trio.testing.wait_all_tasks_blocked()
        upload = closed["upload"]
        assert wf.staged is not staged  # the write made its own copy
        assert upload.entry.size == 1000 and upload.staged is staged
        with open(staged.path, "rb") as f:
            assert f.read() == b"a" * 1000
        assert os.pread(wf.fd, 2001, 0) == b"B" * 2000
        dataset.backend.land("f")
        await upload.done.wait()
        os.close(wf.fd)
        staging.release(wf.staged)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_an_mtime_set_before_the_upload_landed_is_set_on_the_object_after(tmp_path):
    """`tar x` under --writeback sets a file's mtime after its close, before its upload
    lands. The object takes that mtime once it lands (set before, it failed with ENOENT
    on a local source, or was undone by the upload), and the upload's version is the one
    of the object with it."""

    class TimedBackend(HeldBackend):
        keeps_mtime = True

        def __init__(self):
            super().__init__()
            self.mtimes: dict[str, float] = {}

        async def set_mtime(self, path, mtime) -> None:
            self.mtimes[path] = mtime

        async def stat(self, path) -> ObjectInfo:
            return ObjectInfo(path, "file", 5000, self.mtimes[path], f"v-{path}-{self.mtimes[path]}")

    async with trio.open_nursery() as nursery:
        uploader, staging, dataset = _uploader_over(tmp_path, nursery)
        dataset.backend = backend = TimedBackend()
        upload = await _submit(uploader, staging, dataset, "f", background=True)
        await trio.testing.wait_all_tasks_blocked()  # the upload is on its way, held
        assert uploader.touch(dataset, "f", 1e9)
        assert backend.mtimes == {}  # not set on what is there now
        backend.land("f")
        await upload.done.wait()
        assert backend.mtimes == {"f": 1e9}
        assert upload.info.version == "v-f-1000000000.0"
        assert not uploader.touch(dataset, "f", 2e9)  # nothing pending: set as usual
        nursery.cancel_scope.cancel()


_TRUNCATE_UNDER_A_PART = r"""
import os, sys, threading, time
from types import SimpleNamespace
import trio
from cachefs.backend import Backend, _mapped_range
from cachefs.staging import Staging
from cachefs.upload import Uploader
from cachefs.writes import Writes

PART = 1 << 20
reading = threading.Event()

class SlowStore:
    # put_part as FsspecStore.put_part reads a part: through a mapping of the staged file.
    is_s3 = True
    url = "s3://fake"
    def start_multipart(self, path): return "u1"
    def put_part(self, path, upload_id, number, staged, start, end):
        fd = os.open(staged, os.O_RDONLY)
        try:
            with _mapped_range(fd, start, end) as body:
                reading.set()
                for at in range(0, len(body), 4096):  # slowly, a page at a time
                    body[at]
                    time.sleep(0.001)
                return "etag"
        finally:
            os.close(fd)
    def abort_multipart(self, path, upload_id): pass

async def main(directory, how):
    staging = Staging(directory, 1 << 30, None)
    staging.open()
    async with trio.open_nursery() as nursery:
        async def uploaded(*args): pass
        uploader = Uploader(staging, nursery, PART, uploaded)
        backend = Backend(SlowStore(), concurrency=2, timeout=10, retries=0, upload_concurrency=4)
        dataset = SimpleNamespace(source="s3://b/p", name="", removed=False, backend=backend,
                                  reader=SimpleNamespace(tiers=[], chunk_size=PART))
        writes = Writes(staging, uploader)
        wf = await writes.open(dataset, "f", None, truncate=True)
        await wf.write(0, b"x" * (PART + 4096))  # part 1 filled: sent early
        await trio.to_thread.run_sync(reading.wait)
        if how == "rename":
            writes.moved(dataset, "f", "g")
        else:
            writes.unlinked(dataset, "f")
        await wf.truncate(0)  # must wait for the part's read of the mapping
        print("survived", flush=True)
        nursery.cancel_scope.cancel()

trio.run(main, sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("how", ["rename", "unlink"])
def test_a_truncate_waits_for_parts_still_read_from_the_file(tmp_path, how):
    """A file renamed or deleted while open lets go of its early parts; a truncate after
    that still waits for one being read from the file's mapping. It used to cut the file
    under the read: SIGBUS, which ends the daemon (here, the child process)."""
    import subprocess
    import sys

    script = tmp_path / "truncate_under_a_part.py"
    script.write_text(_TRUNCATE_UNDER_A_PART)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "staging"), how], capture_output=True,
                       text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


@pytest.mark.trio
async def test_a_part_refused_fails_the_upload_with_its_own_error(tmp_path):
    """A part's 403 is the upload's BackendPermissionDenied (EACCES at the close), not an
    exception group the uploader took for an unexpected failure (EIO), and the upload is
    aborted."""
    from cachefs.errors import BackendPermissionDenied

    class RefusingStore(PartsStore):
        def put_part(self, path, upload_id, number, staged, start, end):
            if number == 2:
                raise PermissionError(13, "Access Denied")
            return super().put_part(path, upload_id, number, staged, start, end)

    data = random.Random(4).randbytes(3 * PART)
    staged = tmp_path / "staged"
    staged.write_bytes(data)
    store = RefusingStore()
    backend = Backend(store, concurrency=2, timeout=10, retries=0, upload_concurrency=8)
    with pytest.raises(BackendPermissionDenied):
        await backend.upload("f", str(staged), len(data), PART)
    assert store.aborted == ["u1"]


@pytest.mark.trio
async def test_an_upload_cancelled_while_its_first_early_part_starts_the_multipart_aborts_it(tmp_path):
    """rm of a file whose close waits behind an earlier upload of the path, while its first
    early part is still starting the multipart upload: once that part is done, the multipart
    upload it started is aborted. With no id yet at the cancel, it used to be left behind."""

    class SlowStart(HeldBackend):
        def __init__(self):
            super().__init__()
            self.starting = trio.Event()
            self.started = trio.Event()
            self.aborted: list[str] = []

        async def start_parts(self, path) -> str:
            self.starting.set()
            await self.started.wait()
            return f"parts-{path}"

        async def put_part(self, path, upload_id, index, part_size, staged, size) -> str:
            return f"etag-{index}"

        async def abort_parts(self, path, early) -> None:
            await early.settled()
            if early.upload_id is not None:
                self.aborted.append(early.upload_id)
                early.forget()

    async with trio.open_nursery() as nursery:
        uploader, staging, dataset = _uploader_over(tmp_path, nursery)
        dataset.backend = backend = SlowStart()
        first = await _submit(uploader, staging, dataset, "f")  # held by the backend: the path's lock
        staged, fd = staging.create_file()
        os.pwrite(fd, b"y" * 3 * PART, 0)
        early = EarlyParts(PART)
        early.next = 1
        early.sending[0] = True
        staged.reusable = False
        nursery.start_soon(uploader._send_part, dataset, "f", early, staged, 0)
        await backend.starting.wait()  # the first part is starting the multipart upload
        second = await uploader.submit(dataset, "f", staged, 3 * PART, True, early)
        staging.release(staged)
        os.close(fd)

        async def rm() -> None:
            await uploader.cancel(dataset, "f")

        nursery.start_soon(rm)
        await trio.testing.wait_all_tasks_blocked()
        backend.land("f")  # the first upload ends; the second finds itself cancelled
        await second.done.wait()
        backend.started.set()  # only now does the part get its multipart upload's id
        await first.done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert backend.aborted == ["parts-f"]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_closed_file_not_uploaded_yet_keeps_one_mtime(tmp_path, autojump_clock, monkeypatch):
    """A close-to-open close returned (the upload landed) and its chunks wait to be cached
    (up to CACHE_YIELD_MAX, while other uploads are sent): meanwhile the node answers its
    attributes from the pending upload (`Writes.info`). Its mtime must not change from one
    stat to the next with nothing written (it was the time of each stat)."""
    import cachefs.writes
    from cachefs.writes import Writes

    wall = [1_000_000.0]
    monkeypatch.setattr(cachefs.writes, "time", SimpleNamespace(time=lambda: wall[0]))
    async with trio.open_nursery() as nursery:
        uploader, staging, dataset = _uploader_over(tmp_path, nursery)
        writes = Writes(staging, uploader)
        first, _ = await _landed_while_another_is_sent(uploader, staging, dataset, "b")
        assert not first.done.is_set()  # still pending: attributes from the staged bytes
        seen = writes.info(dataset, "a")
        wall[0] += 0.5  # half a second later, nothing written
        again = writes.info(dataset, "a")
        assert again.size == seen.size
        assert again.mtime == seen.mtime, f"mtime moved from {seen.mtime} to {again.mtime} with no write"
        nursery.cancel_scope.cancel()


class ContentBackend:
    """A backend that keeps what each upload sent, in the order they landed."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.landed: list[tuple[str, bytes]] = []

    async def upload(self, path, staged, size, part_size, early=None, after_put=None) -> Written:
        await trio.sleep(0)
        with open(staged, "rb") as f:
            body = f.read(size)
        self.objects[path] = body
        self.landed.append((path, body))
        return Written(ObjectInfo(path, "file", size, 0.0, f"v{len(self.landed)}"), ours=True)

    def puts_from_trio(self, size: int) -> bool:
        return False


@pytest.mark.trio
async def test_a_restart_replays_two_entries_of_one_path_in_the_order_of_their_closes(tmp_path):
    """--writeback, kill -9 with two closes of one path still journaled (the backend was
    down): after the restart the object must hold the LAST close's bytes. The resumed
    uploads are started in seq order, but each takes the path's lock only when its task
    first runs, and trio runs the tasks started in one batch in either order."""

    for attempt in range(16):
        cache_dir = tmp_path / f"c{attempt}"
        first = Staging(str(cache_dir), 1 << 30, None)
        first.open()
        for data in (b"old" * 100, b"newer" * 100):  # two closes of "f", in this order
            staged, fd = first.create_file()
            os.pwrite(fd, data, 0)
            os.close(fd)
            await first.journal("s3://b/p", "f", staged, len(data))
        # kill -9 here; the restart:
        again = Staging(str(cache_dir), 1 << 30, None)
        entries = again.open()
        assert [e.size for e in entries] == [300, 500]
        backend = ContentBackend()
        dataset = SimpleNamespace(source="s3://b/p", name="", removed=False, backend=backend,
                                  reader=SimpleNamespace(tiers=[], chunk_size=4096))

        async def uploaded(dataset, path, info) -> None:
            pass

        async with trio.open_nursery() as nursery:
            uploader = Uploader(again, nursery, 8 << 20, uploaded)
            uploads = [uploader.resume(dataset, e) for e in entries]
            for upload in uploads:
                await upload.done.wait()
        assert backend.objects["f"] == b"newer" * 100, f"attempt {attempt}: the older close won"


@pytest.mark.trio
async def test_two_writeback_closes_of_one_path_waiting_for_entry_files_land_in_close_order(tmp_path):
    """--writeback: a close (flush of handle 1) seals the file and waits in `journal` for
    spare entry files being made; handle 2 then writes (into a copy) and closes, and waits
    there too. Both wake at once, and trio runs them in either order: the second close can
    take the lower seq and the path's upload lock first, so the first close's older state
    lands last (and a restart replays it last too): the write made through handle 2, whose
    close returned, is lost."""
    from cachefs.writes import WriteFile, Writes

    for attempt in range(16):
        async with trio.open_nursery() as nursery:
            uploader, staging = None, Staging(str(tmp_path / f"c{attempt}"), 1 << 30, None)
            staging.open()
            backend = ContentBackend()
            dataset = _dataset_over(backend)
            uploader = Uploader(staging, nursery, 8 << 20, _nothing)
            staging._preparing = trio.Event()  # spare entry files being made: journal() waits
            staged, fd = staging.create_file()
            wf = WriteFile(Writes(staging, uploader=uploader, writeback=True), dataset, "f", staged, fd, 0)
            wf.handles = 2
            await wf.write(0, b"a" * 1000)
            nursery.start_soon(wf.commit, True)  # close of handle 1
            await trio.testing.wait_all_tasks_blocked()
            await wf.write(1000, b"b" * 1000)  # handle 2 appends (into a copy) ...
            nursery.start_soon(wf.commit, True)  # ... and closes
            await trio.testing.wait_all_tasks_blocked()
            staging._preparing.set()
            staging._preparing = None
            await trio.testing.wait_all_tasks_blocked()
            for upload in list(uploader.all_pending()):
                await upload.done.wait()
            os.close(wf.fd)
            staging.release(wf.staged)
        assert backend.objects["f"] == b"a" * 1000 + b"b" * 1000, f"attempt {attempt}: the first close's state won"
        journal = Staging(str(tmp_path / f"c{attempt}"), 1 << 30, None)
        assert journal.open() == []


class RacedStore:
    """A store whose PUT answers name no version (the JuiceFS gateway without --keep-etag;
    any S3 store before this mount saw a HEAD or LIST name an ETag), so the version of the object just written is taken from a HEAD after the
    PUT. Another node's PUT of the same path, of the same size, lands between the two."""

    is_s3 = True
    url = "s3://fake"

    def __init__(self, theirs: bytes, etags: bool):
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.theirs = theirs
        self.etags = etags  # whether HEADs name ETags (else the version is the size and second)

    def put_file(self, path: str, staged: str) -> Answered:
        with open(staged, "rb") as f:
            ours = f.read()
        self.objects[path] = (ours, 1000.0)
        self.objects[path] = (self.theirs, 1001.0)  # the other node's PUT, right after ours
        # What the answer says of ours: its Date, and its ETag where the store names one
        # (not the version a HEAD reports here: without ETags, or none seen in a HEAD yet).
        return Answered(hashlib.md5(ours).hexdigest() if self.etags else "", 1000.0)

    def stat(self, path: str) -> ObjectInfo:
        data, mtime = self.objects[path]
        version = f"etag:{hashlib.md5(data).hexdigest()}" if self.etags else f"stat:{len(data)}-{int(mtime)}"
        return ObjectInfo(path, "file", len(data), mtime, version)


@pytest.mark.parametrize("etags", [False, True])
@pytest.mark.trio
async def test_an_upload_never_caches_its_bytes_under_the_version_of_another_writers_object(tmp_path, etags):
    """Two nodes write one path, same size; the other node's PUT lands between this node's
    PUT and the HEAD that tells this node its new version. The HEAD names the other node's
    object: this node's bytes must not be cached under that version (it is the object in
    the backend, the last close, and the one every later open of the path reads)."""
    disk = DiskTier(str(tmp_path / "cache"), 1 << 20, 0.0)
    await disk.load()
    ours = random.Random(1).randbytes(3000)
    theirs = random.Random(2).randbytes(3000)
    store = RacedStore(theirs, etags)
    backend = Backend(store, concurrency=2, timeout=10, retries=0)
    dataset = SimpleNamespace(source="s3://b/p", name="", removed=False, backend=backend,
                              reader=SimpleNamespace(tiers=[disk], chunk_size=4096))
    await _closed_and_uploaded(tmp_path / "stage", dataset, "f", ours)
    assert store.objects["f"][0] == theirs  # the last PUT won, whole
    now_there = store.stat("f")  # what every open of "f" reads from now on
    key = chunk_key(ObjectId("s3://b/p", "f", now_there.version, now_there.size), 4096, 0)
    cached = await disk.get(key)
    assert cached is None or bytes(cached) == theirs, "this node's bytes cached as the other node's version"


@pytest.mark.trio
async def test_a_local_upload_names_the_version_of_the_file_it_wrote(tmp_path, monkeypatch):
    """A local (or NAS) directory: the version of an upload is that of the file it renamed
    into place (a rename keeps size and mtime), with no stat after it, which could see
    another writer's file renamed over it right after (and cache this node's bytes as its)."""
    from cachefs.backend import LocalStore

    src = tmp_path / "src"
    src.mkdir()
    store = LocalStore(str(src))
    backend = Backend(store, concurrency=2, timeout=10, retries=0)
    staged = tmp_path / "staged"
    staged.write_bytes(b"ours")
    put_file = store.put_file

    landed = {}

    def put_then_replaced(path, staged_path):
        info = put_file(path, staged_path)
        landed["version"] = LocalStore(str(src)).stat(path).version  # ours, as a stat saw it then
        theirs = tmp_path / "theirs"
        theirs.write_bytes(b"them")
        os.utime(theirs, ns=(1, 1))
        os.replace(theirs, src / path)  # another writer's file, right after ours
        return info

    monkeypatch.setattr(store, "put_file", put_then_replaced)
    monkeypatch.setattr(store, "stat", lambda path: pytest.fail("a stat after the upload"))
    written = await backend.upload("f", str(staged), 4, PART)
    assert written.ours
    assert written.info.size == 4 and written.info.version == landed["version"]
    backend.close()


class _ChunkTier:
    medium = "disk"

    async def put_from(self, key, fd, offset) -> bool:
        return True

    def reserve_unkeyed(self, tag, length):
        return None


@pytest.mark.parametrize("writeback", [False, True])
@pytest.mark.trio
async def test_an_open_for_write_of_a_file_whose_upload_is_pending_waits_for_it_not_enospc(tmp_path, writeback):
    """Staging (8 MiB) holds only a closed 5 MiB file waiting for its upload. An open of it
    for write (no O_TRUNC: `>>`) needs a 5 MiB copy: it waits for the upload (back-pressure)
    and fails not. The fill held the upload's staged file while it waited for room, so the
    upload's end freed nothing, nothing was left draining, and the open got StagingFull
    (ENOSPC): helper-47's review, its test."""
    from cachefs.errors import StagingFull
    from cachefs.writes import Writes

    mib = 1 << 20
    size = 5 * mib
    data = b"z" * size

    class Reader:
        chunk_size = mib
        tiers = [_ChunkTier()]

        async def chunk(self, obj, index):  # the object as uploaded, once it landed
            assert obj.version == "v-f"
            return data[index * mib:(index + 1) * mib], None

    staging = Staging(str(tmp_path), limit=8 * mib, disk=None)
    staging.open()
    backend = HeldBackend()
    dataset = SimpleNamespace(source="s3://b/p", name="", removed=False, backend=backend, reader=Reader())

    async def uploaded(dataset, path, info) -> None:
        pass

    async with trio.open_nursery() as nursery:
        uploader = Uploader(staging, nursery, 8 << 20, uploaded)
        writes = Writes(staging, uploader, writeback=writeback)
        # The file as its writer left it: written, closed, its upload pending.
        staged, fd = staging.create_file()
        await staging.reserve(staged, size, fd)
        os.pwrite(fd, data, 0)
        os.close(fd)
        upload = await uploader.submit(dataset, "f", staged, size, background=writeback)
        staging.release(staged)  # the writer's last handle is released
        opened = {}
        ended = trio.Event()

        async def open_for_append() -> None:
            try:
                opened["wf"] = await writes.open(dataset, "f", ObjectInfo("f", "file", 1, 0.0, "v-old"),
                                                 truncate=False)
            except StagingFull as e:
                opened["error"] = e
            finally:
                ended.set()

        nursery.start_soon(open_for_append)
        await trio.testing.wait_all_tasks_blocked()
        assert not opened  # waiting for room: back-pressure
        backend.land("f")  # the upload lands and ends: its staged file can go
        await upload.done.wait()
        with trio.fail_after(5):  # a safety net only: it ends at once
            await ended.wait()
        assert "error" not in opened, f"ENOSPC for an open while only a closed file filled staging: {opened.get('error')}"
        wf = opened["wf"]
        assert wf.size == size and os.pread(wf.fd, 10, size - 10) == data[-10:]
        writes.close(wf)
        nursery.cancel_scope.cancel()


class _CountingDisk:
    """The SSD tier's side of staged room: what `claim`/`take` counted and `give_back` returned."""

    def __init__(self):
        self.used = 0

    async def claim(self, need: int) -> bool:
        self.used += need
        return True

    def take(self, room: int) -> None:
        self.used += room

    def give_back(self, room: int) -> None:
        self.used -= room


@pytest.mark.trio
async def test_a_staged_file_kept_for_the_next_start_keeps_its_room(tmp_path):
    """--writeback: a dataset is removed (--force) while an upload of it is pending; the
    upload is abandoned and its staged file kept on the SSD (for a re-add of the source or
    the next start). Its room was given back all the same: the bytes stayed on disk, counted
    neither in staging nor in the SSD tier's --cache-size, which the chunk cache then filled
    on top of them (helper-47's review, its test). Dropped, the entry gives it back."""
    from cachefs.errors import BackendError

    class DownBackend(HeldBackend):
        async def upload(self, path, staged, size, part_size, early=None, after_put=None):
            await self.gates.setdefault(path, trio.Event()).wait()
            raise BackendError(f"{path}: backend closed")

    disk = _CountingDisk()
    staging = Staging(str(tmp_path), limit=64 << 20, disk=disk)
    staging.open()
    backend = DownBackend()
    dataset = SimpleNamespace(source="s3://b/p", name="d", removed=False, backend=backend,
                              reader=SimpleNamespace(tiers=[_ChunkTier()], chunk_size=1 << 20))

    async def uploaded(dataset, path, info) -> None:
        pass

    size = 3 * (1 << 20)
    async with trio.open_nursery() as nursery:
        uploader = Uploader(staging, nursery, 8 << 20, uploaded)
        staged, fd = staging.create_file()
        await staging.reserve(staged, size, fd)
        os.pwrite(fd, b"w" * size, 0)
        os.close(fd)
        upload = await uploader.submit(dataset, "f", staged, size, background=True)
        staging.release(staged)  # closed: journaled, the upload holds it
        dataset.removed = True  # `cachefs remove-dataset --force`
        backend.land("f")  # its next attempt fails: abandoned
        await upload.done.wait()
        assert os.path.getsize(staged.path) == size  # kept for the next start
        assert staging.used >= size and disk.used >= size, (
            f"{size} bytes kept on the SSD, counted: staging {staging.used}, SSD tier {disk.used}")
        assert uploader.abandoned == [upload.entry]
        await staging.drop_entry(upload.entry)  # a newer close of "f" superseded it
        assert not os.path.exists(staged.path) and staging.used == 0 and disk.used == 0
        nursery.cancel_scope.cancel()


def test_a_kill_during_a_local_upload_leaves_no_partial_file_in_the_dataset(tmp_path):
    """A local (or NAS) dataset: `put_file` copies the staged file to `.cachefs-upload-PID-TID`
    beside its target, then renames it over. A kill -9 of the daemon during the copy leaves
    that file, half-written, in the user's directory: listed by this mount, keeping `rmdir`
    from succeeding, and removed by nothing (the next daemon has another pid): helper-46's
    review, its test. The mount's listings now skip such files, and an rmdir of a directory
    holding only stale ones (older than STALE_UPLOAD_AGE) removes them."""
    import subprocess
    import sys
    import textwrap

    from cachefs.backend import LocalStore

    src = tmp_path / "src"
    src.mkdir()
    staged = tmp_path / "staged"
    staged.write_bytes(b"x" * (1 << 20))
    child = textwrap.dedent(f"""
        import os, shutil, signal
        from cachefs.backend import LocalStore

        def copy_half_then_die(a, b):
            with open(a, "rb") as f, open(b, "wb") as g:
                g.write(f.read(1 << 19))
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the copy

        shutil.copyfile = copy_half_then_die
        LocalStore({str(src)!r}).put_file("f", {str(staged)!r})
    """)
    subprocess.run([sys.executable, "-c", child], check=False, env={**os.environ})
    listed = [info.path for info in LocalStore(str(src)).list_dir("")]
    assert listed == [], f"left in the dataset after kill -9: {listed}"
    (left,) = os.listdir(src)
    with pytest.raises(OSError) as fresh:
        LocalStore(str(src)).remove_dir("")  # it could be another node's upload on its way
    assert fresh.value.errno == errno.ENOTEMPTY
    os.utime(src / left, (time.time() - 7200,) * 2)
    LocalStore(str(tmp_path)).remove_dir("src")
    assert not src.exists()


@pytest.mark.parametrize("written_over", [False, True])
@pytest.mark.trio
async def test_chunks_kept_across_a_rename_are_never_labelled_as_another_writers_object(written_over):
    """`mv tmp final` on S3 (a copy, then a delete): the chunks of tmp held here are kept as
    final's, of the version a stat names after the copy. If another node wrote `final`
    (same size) between the copy and that stat, the stat names its object: the chunks were
    relabelled as its and served for it (helper-48's review). The copy's answer (its ETag
    and Date) now tells them apart, and they are dropped."""
    from cachefs.cache.mem import MemTier
    from cachefs.node import Node
    from cachefs.objects import chunk_key

    chunk = 4096
    old = ObjectInfo("tmp", "file", 3000, 1000.0, "etag:aaa")
    copied = ObjectInfo("final", "file", 3000, 1000.0, "etag:aaa")  # S3 keeps a one-part ETag
    theirs = ObjectInfo("final", "file", 3000, 1001.0, "etag:bbb")

    async def stat(path):
        return theirs if written_over else copied

    node = Node.__new__(Node)
    node.config = SimpleNamespace(chunk_size=chunk)
    node.mem = MemTier(1 << 20)
    node.disk = None
    dataset = SimpleNamespace(source="s3://b/p", namespace=SimpleNamespace(stat=stat),
                              backend=SimpleNamespace(renames_keep_version=False))
    ours = b"o" * 3000
    await node.mem.put(chunk_key(ObjectId("s3://b/p", "tmp", "etag:aaa", 3000), chunk, 0), ours)
    await node.chunks_renamed(dataset, old, "final", Answered("aaa", 1000.0))
    now_there = theirs if written_over else copied
    cached = await node.mem.get(chunk_key(ObjectId("s3://b/p", "final", now_there.version, 3000), chunk, 0))
    if written_over:
        assert cached is None, "this node's chunks relabelled as another writer's object"
    else:
        assert cached is not None and bytes(cached) == ours  # `mv tmp final` reads final from the cache


@pytest.mark.trio
async def test_an_upload_touched_before_it_landed_never_caches_its_bytes_under_another_writers_version(tmp_path):
    """A local (or NAS) dataset: `tar x` (or `touch -d`) sets f's mtime before its upload
    landed (`Uploader.touch`); once it lands, `_set_mtime` sets it and takes the version
    from a STAT after, which may see another writer's file renamed over f right after
    (same size, other bytes), as the HEAD after a PUT could (e121e96). `upload.ours` stays
    True: this node caches its bytes as the chunks of the other writer's version, and
    every read of f here returns them (helper-49's review, its test)."""
    import random

    from cachefs.backend import Backend, LocalStore
    from cachefs.cache.disk import DiskTier
    from cachefs.objects import ObjectId, chunk_key
    from cachefs.staging import Staging
    from cachefs.upload import Uploader
    from types import SimpleNamespace

    src = tmp_path / "src"
    src.mkdir()
    store = LocalStore(str(src))
    size = 300 << 10  # over CACHE_WITH_PUT: cached after the upload, by `_cache_chunks`
    ours = random.Random(1).randbytes(size)
    theirs = random.Random(2).randbytes(size)
    real_set_mtime = store.set_mtime

    def set_mtime_then_replaced(path, mtime):
        real_set_mtime(path, mtime)
        other = tmp_path / "theirs"
        other.write_bytes(theirs)
        os.replace(other, src / path)  # another node's close of f, right after

    store.set_mtime = set_mtime_then_replaced
    backend = Backend(store, concurrency=2, timeout=10, retries=0)
    disk = DiskTier(str(tmp_path / "cache"), 16 << 20, 0.0)
    await disk.load()
    dataset = SimpleNamespace(source="file://src", name="", removed=False, backend=backend,
                              reader=SimpleNamespace(tiers=[disk], chunk_size=1 << 20))
    staging = Staging(str(tmp_path / "stage"), 1 << 30, None)
    staging.open()

    async def uploaded(dataset, path, info) -> None:
        pass

    async with trio.open_nursery() as nursery:
        uploader = Uploader(staging, nursery, 8 << 20, uploaded)
        staged, fd = staging.create_file()
        os.pwrite(fd, ours, 0)
        os.close(fd)
        upload = await uploader.submit(dataset, "f", staged, size, background=True)
        staging.release(staged)
        assert uploader.touch(dataset, "f", 1_000_000.0)  # `touch -d`, before it landed
        await upload.done.wait()
        nursery.cancel_scope.cancel()
    backend.close()
    now_there = store.stat("f")  # what every open of f reads from now on
    assert (src / "f").read_bytes() == theirs
    key = chunk_key(ObjectId("file://src", "f", now_there.version, now_there.size), 1 << 20, 0)
    cached = await disk.get(key)
    assert cached is None or bytes(cached) == theirs, "this node's bytes cached as the other writer's version"


@pytest.mark.parametrize("writeback", [False, True])
@pytest.mark.trio
async def test_a_closed_file_waiting_for_its_upload_keeps_the_mtime_it_had_open(tmp_path, writeback):
    """docs/semantics.md: `touch` of an open file sets "its mtime until the upload" (`cp -p`
    sets it with futimens before close). Once closed, while its upload is pending, the node
    answers the close's time (`Upload.sealed_at`) instead: the mtime jumps at the close,
    with no write, and the one `cp -p` set is gone before the upload even began
    (helper-49's review, its test)."""
    from types import SimpleNamespace

    from cachefs.staging import Staging
    from cachefs.upload import Uploader
    from cachefs.writes import Writes

    class Held:
        takes_parts = False

        async def upload(self, *args, **kwargs):
            await trio.sleep_forever()

        def puts_from_trio(self, size):
            return False

    staging = Staging(str(tmp_path), 1 << 30, None)
    staging.open()
    dataset = SimpleNamespace(source="file:///src", name="", removed=False, backend=Held(),
                              reader=SimpleNamespace(tiers=[], chunk_size=4096))

    async def uploaded(*args):
        pass

    async with trio.open_nursery() as nursery:
        uploader = Uploader(staging, nursery, 8 << 20, uploaded)
        writes = Writes(staging, uploader, writeback=writeback)
        wf = await writes.open(dataset, "f", None, truncate=True)
        await wf.write(0, b"data")
        wf.set_mtime(1_000_000.0)  # cp -p: futimens(fd) before close
        assert writes.info(dataset, "f").mtime == 1_000_000.0
        if writeback:
            await wf.commit(background=True)
        else:
            nursery.start_soon(wf.commit, False)  # close(): waits for the upload
            await trio.testing.wait_all_tasks_blocked()
        writes.close(wf)
        pending = writes.info(dataset, "f")
        nursery.cancel_scope.cancel()
    assert pending.mtime == 1_000_000.0, f"mtime after close, upload pending: {pending.mtime}"


@pytest.mark.trio
async def test_a_rename_waits_for_the_uploads_before_it_not_for_closes_since(tmp_path):
    """`Uploader.wait` (a rename's wait for its source's uploads) ends once the uploads
    pending when it began are done, though a writer has closed the file again since: an
    application appending and closing its log in a loop must not keep `mv app.log
    app.log.1` waiting until its timeout (EIO)."""
    staging = Staging(str(tmp_path), 1 << 30, None)
    staging.open()
    backend = HeldBackend()
    dataset = _dataset_over(backend)

    async def closed(uploader, data: bytes):
        staged, fd = staging.create_file()
        os.pwrite(fd, data, 0)
        os.close(fd)
        upload = await uploader.submit(dataset, "app.log", staged, len(data), False)
        staging.release(staged)
        return upload

    async with trio.open_nursery() as nursery:
        uploader = Uploader(staging, nursery, 8 << 20, _nothing)
        first = await closed(uploader, b"line 1\n")
        waited = trio.Event()

        async def rename_waits() -> None:
            await uploader.wait(dataset, "app.log", timeout=3600)
            waited.set()

        nursery.start_soon(rename_waits)
        await trio.testing.wait_all_tasks_blocked()
        second = await closed(uploader, b"line 1\nline 2\n")  # closed again meanwhile
        backend.land("app.log")  # the first lands; the second, behind it, will not yet
        await first.landed.wait()
        backend.gates["app.log"] = trio.Event()
        await first.done.wait()
        with trio.fail_after(5):  # a safety net: it ends at once
            await waited.wait()
        assert not second.done.is_set()
        backend.land("app.log")
        await second.done.wait()
        nursery.cancel_scope.cancel()


def _ops_over_a_slow_backend(tmp_path, nursery, put_seconds: float, writeback: bool = False):
    """Operations over one read-write dataset whose backend holds "log" (empty) and takes
    `put_seconds` per PUT, with a real Staging, Uploader and Writes: (ops, stored, renames)."""
    from cachefs.errors import ObjectNotFound
    from cachefs.fuse_ops import Operations
    from cachefs.writes import Writes

    stored = {"": ObjectInfo("", "dir", 0, 0.0, "dir"), "log": ObjectInfo("log", "file", 0, 0.0, "v0")}
    renames = []

    async def stat(inner):
        await trio.lowlevel.checkpoint()
        if inner in stored:
            return stored[inner]
        raise ObjectNotFound(inner)

    class SlowBackend:
        takes_parts = False
        keeps_mtime = False
        timeout = 10
        retries = 2  # a rename waits 30 s at most for the uploads of what it moves

        async def upload(self, path, staged, size, part_size, early=None, after_put=None) -> Written:
            await trio.sleep(put_seconds)
            stored[path] = ObjectInfo(path, "file", size, 0.0, f"v{trio.current_time()}")
            return Written(stored[path], ours=True)

        def puts_from_trio(self, size):
            return True

        async def rename(self, old, new, kind):
            await trio.lowlevel.checkpoint()
            renames.append((old, new))
            stored[new] = stored.pop(old)

    staging = Staging(str(tmp_path), 1 << 30, None)
    staging.open()

    async def uploaded(dataset, path, info):
        pass

    uploader = Uploader(staging, nursery, 8 << 20, uploaded)
    dataset = SimpleNamespace(
        source="s3://b/p", name="", removed=False, walks=None, open_files=0,
        config=SimpleNamespace(read_only=False), reader=SimpleNamespace(tiers=[], chunk_size=4096),
        namespace=SimpleNamespace(stat=stat, drop_entry=lambda p: None, invalidate=lambda p: None,
                                  replaced=lambda p: None),
        backend=SlowBackend())
    writes = Writes(staging, uploader, writeback=writeback)

    async def nothing(*args):
        pass

    node = SimpleNamespace(config=SimpleNamespace(), writes=writes, datasets={"": dataset},
                           locate=lambda path: (dataset, path), chunks_renamed=nothing)
    ops = Operations(node, entry_ttl=1, attr_ttl=1, block_size=4096)
    ops._chunks_gone = lambda dataset, gone: trio.lowlevel.checkpoint()
    return ops, stored, renames


@pytest.mark.parametrize("writeback", [False, True])
@pytest.mark.trio
async def test_mv_of_a_log_whose_writers_keep_syncing_it(tmp_path, autojump_clock, monkeypatch, writeback):
    """Log rotation: two worker processes append to `log` through handles they keep open,
    and fsync every line (close-to-open; a PUT takes 0.2 s), or (--writeback) close a
    handle after every line; `mv log log.1` meanwhile, then the workers stop (their handles
    stay open, on log.1) and every upload lands. The rename lands what was written so far
    and moves it, at once; the workers go on writing into log.1, as on any file system,
    and nothing makes `log` again.
    - With `Uploader.wait` waiting until no upload of the path was pending at all (50a5143),
      the workers always started one more: the rename waited out its 30 s and failed with
      EIO (helper-51's review).
    - The closes made while the rename waited were still of `log`, and landed there after
      the move: `log` came back with a copy of those lines (helper-52's review)."""
    import errno

    import pyfuse3

    async def inline(fn, *args, **kwargs):  # no thread hop: the fake clock jumps over none
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    async with trio.open_nursery() as nursery:
        ops, stored, renames = _ops_over_a_slow_backend(tmp_path, nursery, put_seconds=0.2, writeback=writeback)
        ino = ops.inodes.lookup("log")

        async def worker(line: bytes, scope):
            fh = (await ops.open(ino, os.O_WRONLY | os.O_APPEND, None)).fh
            with scope:
                while True:
                    wf = ops._files[fh].write
                    await ops.write(fh, wf.size, line)
                    if writeback:
                        await ops.flush(fh)  # a close: journaled, uploaded in the background
                        await trio.sleep(0.05)
                    else:
                        await ops.fsync(fh, False)  # landed when it returns

        scopes = [trio.CancelScope(), trio.CancelScope()]
        nursery.start_soon(worker, b"worker A\n", scopes[0])
        nursery.start_soon(worker, b"worker B\n", scopes[1])
        await trio.sleep(0.3)
        start = trio.current_time()
        outcome = "renamed"
        try:
            await ops.rename(pyfuse3.ROOT_INODE, b"log", pyfuse3.ROOT_INODE, b"log.1", 0, None)
        except pyfuse3.FUSEError as e:
            outcome = errno.errorcode[e.errno]
        took = trio.current_time() - start
        for scope in scopes:
            scope.cancel()
        uploader = ops.node.writes.uploader
        with trio.fail_after(600):  # every upload lands (the --writeback backlog too)
            while uploader.all_pending():
                await uploader.all_pending()[-1].done.wait()
        nursery.cancel_scope.cancel()
    assert outcome == "renamed" and took < 5, f"mv log log.1 with its writers syncing: {outcome} after {took:.1f} s"
    assert "log" not in stored, f"after `mv log log.1`, log is back: {stored.get('log')}; log.1: {stored.get('log.1')}"


@pytest.mark.trio
async def test_a_small_file_copied_with_its_mtime_is_cached_under_the_version_it_lands_as(tmp_path):
    """`cp -p` of a small file to a local dataset with an SSD tier: its chunk, cached by the
    PUT's thread, was of the version before the mtime was set after it landed, so the next
    read missed (helper-52's review, its test). It is cached again under the version the
    file lands as."""
    """`cp -p small f` to a local (or NAS) dataset with an SSD tier: the data written, futimens
    on the fd, the close. The PUT's thread caches the chunk (`_CachedWithPut`) under the
    version the PUT made (its mtime: the upload's time); `_set_mtime` then sets the preserved
    mtime, and the file's version (`stat:<size>-<mtime_ns>`) with it. `_cache_chunks` skips
    (`upload.cached`): the chunk is cached under a version that is gone, and the first read
    of f after its close misses."""
    from cachefs.backend import LocalStore
    from cachefs.writes import Writes

    src = tmp_path / "src"
    src.mkdir()
    store = LocalStore(str(src))
    backend = Backend(store, concurrency=2, timeout=10, retries=0)
    disk = DiskTier(str(tmp_path / "cache"), 16 << 20, 0.0)
    await disk.load()
    dataset = SimpleNamespace(source=str(src), name="", removed=False, backend=backend,
                              reader=SimpleNamespace(tiers=[disk], chunk_size=1 << 20))
    staging = Staging(str(tmp_path / "stage"), 1 << 30, None)
    staging.open()

    async def uploaded(*args) -> None:
        pass

    async with trio.open_nursery() as nursery:
        uploader = Uploader(staging, nursery, 8 << 20, uploaded)
        writes = Writes(staging, uploader)
        wf = await writes.open(dataset, "f", None, truncate=True)
        await wf.write(0, b"data")
        wf.set_mtime(1_000_000.0)  # futimens(fd) before close (`cp -p`)
        upload = await wf.commit(background=False)
        pending = writes.info(dataset, "f").mtime
        writes.close(wf)
        await upload.done.wait()
        nursery.cancel_scope.cancel()
    backend.close()
    now_there = store.stat("f")
    assert pending == 1_000_000.0  # shown while its upload is pending (60f5add)
    # ... and the store's file's once it landed: it was the upload's time, the mtime flipping
    # back to "now" (helper-51's review, its test, b5cc4a9)
    assert now_there.mtime == 1_000_000.0 and upload.info.version == now_there.version
    key = chunk_key(ObjectId(str(src), "f", now_there.version, now_there.size), 1 << 20, 0)
    cached = await disk.get(key)
    assert cached is not None and bytes(cached) == b"data", (
        f"chunk of f ({now_there.version}) not cached after its close; upload.cached={upload.cached}")
