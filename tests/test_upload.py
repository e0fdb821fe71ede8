"""Backend.upload's multipart uploads with parts sent early (while the file was written)."""

from __future__ import annotations

import collections
import hashlib
import random
import threading

import pytest
import trio

from cachefs.backend import Backend
from cachefs.objects import ObjectInfo
from cachefs.upload import EarlyParts

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
