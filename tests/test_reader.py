"""The Reader over real tiers (MemTier, DiskTier in tmp_path) and a real Backend
driving a FakeStore: byte-exact reads, single-flight, read-ahead and errors.

Backend calls run in worker threads, so these tests use the real clock; the
fake store blocks its threads on a threading.Event (never a sleep) when told
to hang, and every test opens the gate again before it ends.
"""

from __future__ import annotations

import errno
import itertools
import random
import threading
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from cachefs.backend import Backend
from cachefs.cache.disk import DiskTier
from cachefs.cache.mem import MemTier
from cachefs.errors import BackendError, ObjectChanged
from cachefs.objects import ObjectId, ObjectInfo, chunk_digest, chunk_key
from cachefs.reader import RANDOM_AFTER_JUMPS, Reader, ReadStream

# The hot path's users: run again with CACHEFS_PUREPYTHON=1 (scripts/test.sh).
pytestmark = pytest.mark.fallback

C = 64 << 10  # chunk size


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FakeStore:
    """A store with the LocalStore interface (url, stat, list_dir, fetch), in memory.

    Counts fetch calls per (path, start). `hold(pred)` makes matching fetches
    block until `release()`; `fail_next = n` makes the next n fetches raise
    `error()`; `add()` of an existing path changes the object's version, after
    which fetches of the old ObjectId raise ObjectChanged, as LocalStore does.
    """

    url = "fake://bucket/prefix"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.fetches: Counter[tuple[str, int]] = Counter()
        self.order: list[tuple[str, int]] = []
        self.ranges: list[tuple[str, int, int]] = []  # (path, start, end) of each fetch
        self.fail_next = 0
        self.error = lambda: OSError(errno.EIO, "injected I/O error")
        self._gate = threading.Event()
        self._gate.set()
        self._held = lambda path, start: True
        self.in_flight = 0
        self.held_now = 0

    def add(self, path: str, data: bytes) -> ObjectId:
        version = f"v{next(self._versions)}"
        self.objects[path] = (data, version)
        return ObjectId(self.url, path, version, len(data))

    def hold(self, pred=lambda path, start: True) -> None:
        self._held = pred
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    @property
    def calls(self) -> int:
        return sum(self.fetches.values())

    def stat(self, path: str) -> ObjectInfo:
        data, version = self.objects[path]
        return ObjectInfo(path, "file", len(data), 0.0, version)

    def list_dir(self, path: str) -> list[ObjectInfo]:
        return [self.stat(p) for p in self.objects if p.rpartition("/")[0] == path]

    def fetch(self, obj: ObjectId, start: int, end: int) -> bytes:
        with self._lock:
            self.fetches[(obj.path, start)] += 1
            self.order.append((obj.path, start))
            self.ranges.append((obj.path, start, end))
            self.in_flight += 1
            fail = self.fail_next > 0
            self.fail_next -= fail
            held = not self._gate.is_set() and self._held(obj.path, start)
            self.held_now += held
        try:
            if held and not self._gate.wait(10):
                raise TimeoutError("test gate never opened")
            if fail:
                raise self.error()
            data, version = self.objects[obj.path]
            if version != obj.version:
                raise ObjectChanged(f"{obj.path}: changed")
            return data[start:end]
        finally:
            with self._lock:
                self.in_flight -= 1
                self.held_now -= held


@pytest.fixture
def store():
    s = FakeStore()
    yield s
    s.release()  # no worker thread outlives the test


async def wait_until(pred, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.002)


@asynccontextmanager
async def open_reader(
    store: FakeStore,
    *,
    mem: int = 64 * C,
    disk_dir: Path | None = None,
    disk_size: int = 64 * (C + 64),
    read_ahead: int = 0,
    retries: int = 0,
    chunk_size: int = C,
    peers=None,
):
    async with trio.open_nursery() as nursery:
        disk = None
        if disk_dir is not None:
            disk = DiskTier(str(disk_dir), disk_size, 0.0)
            await disk.load()
        backend = Backend(store, concurrency=16, timeout=5.0, retries=retries)
        tiers = [t for t in (MemTier(mem) if mem else None, disk, peers) if t is not None]
        reader = Reader(tiers, backend, chunk_size, read_ahead, nursery)
        try:
            yield reader
        finally:
            store.release()  # let held prefetches finish so the nursery can close


def digest(obj: ObjectId, index: int) -> bytes:
    return chunk_digest(obj, C, index)


def tier(reader: Reader, name: str):
    """The reader's tier called `name` ("mem", "disk")."""
    return next(t for t in reader.tiers if t.name == name)


# -- byte-exact reads -------------------------------------------------------------


SIZES = [0, 1, C - 1, C, C + 1, 3 * C + 777]


def interesting_reads(size: int, rng: random.Random) -> list[tuple[int, int]]:
    reads = [(0, size), (0, size + 100), (size, 10), (size + C, 10), (0, 0), (size // 2, 0)]
    for k in range(0, size // C + 2):
        for off in (k * C - 1, k * C, k * C + 1):
            for n in (1, 2, C - 1, C, C + 1, 2 * C + 5):
                if off >= 0:
                    reads.append((off, n))
    for _ in range(100):
        reads.append((rng.randrange(0, size + 10), rng.randrange(0, 3 * C)))
    return reads


TIERS = {
    "mem": dict(mem=64 * C, disk=False),
    "disk": dict(mem=0, disk=True),
    "mem+disk": dict(mem=2 * C, disk=True),  # a small MEM tier: chunks go back and forth
}


@pytest.mark.trio
@pytest.mark.parametrize("tiers", TIERS)
@pytest.mark.parametrize("size", SIZES)
async def test_reads_are_byte_exact(store, tmp_path, size, tiers):
    data = payload(size, size)
    obj = store.add("dir/file", data)
    mem, use_disk = TIERS[tiers]["mem"], TIERS[tiers]["disk"]
    async with open_reader(store, mem=mem, disk_dir=tmp_path if use_disk else None) as reader:
        for offset, n in interesting_reads(size, random.Random(size)):
            got = await reader.read(obj, offset, n)
            assert bytes(got) == data[offset : offset + n], (offset, n)
            if tiers == "mem+disk":
                # Let the write-behind land, so the next read may find every chunk read so far.
                last = min(offset + n, size)
                indexes = range(offset // C, -(-last // C)) if offset < last else ()
                await wait_until(lambda: all(digest(obj, i) in tier(reader, "disk") for i in indexes))
        n_chunks = -(-size // C)
        assert len(store.fetches) == n_chunks
        if tiers != "mem+disk":
            # Every chunk came from the backend once: the tiers served all the rest.
            # (A MEM tier smaller than one read may drop a prefetched chunk before
            # the read gets to it, while its write-behind is still under way.)
            assert all(count == 1 for count in store.fetches.values()), store.fetches
        await wait_until(lambda: all(digest(obj, i) in (reader.tiers[-1]) for i in range(n_chunks)))
        calls = store.calls
        assert bytes(await reader.read(obj, 0, size)) == data
        assert store.calls == calls, "a full second pass must not touch the backend"


@pytest.mark.trio
@pytest.mark.parametrize("piece", [4096, 10_000, C, 3 * C + 1])
async def test_sequential_stream_is_byte_exact(store, tmp_path, piece):
    data = payload(7 * C + 123, piece)
    obj = store.add("big", data)
    async with open_reader(store, mem=3 * C, disk_dir=tmp_path, read_ahead=2) as reader:
        stream = ReadStream()
        out = bytearray()
        while True:
            got = await reader.read(obj, len(out), piece, stream)
            if not got:
                break
            out += got
    assert out == data


# -- single flight -----------------------------------------------------------------


@pytest.mark.trio
async def test_concurrent_reads_of_one_chunk_fetch_it_once(store, tmp_path):
    data = payload(3 * C)
    obj = store.add("f", data)
    waits = sample("cachefs_singleflight_waits_total")
    results: dict[int, bytes] = {}

    async def read(i):
        offset = C + 1000 * i
        results[i] = bytes(await reader.read(obj, offset, 500))

    async with open_reader(store, mem=0, disk_dir=tmp_path) as reader:
        store.hold()
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(read, i)
            await wait_until(lambda: store.calls == 1)
            await trio.testing.wait_all_tasks_blocked()
            store.release()
        assert store.fetches == {("f", C): 1}
        assert sample("cachefs_singleflight_waits_total") == waits + 19
        for i in range(20):
            assert results[i] == data[C + 1000 * i : C + 1000 * i + 500]

        # mem is off: the second pass must come from the SSD, once the write-behind is done.
        await wait_until(lambda: digest(obj, 1) in tier(reader, "disk"))
        # The bytes no read had asked for yet came from the backend, for this reader.
        counted = sample("cachefs_read_bytes_total", source="disk") + sample("cachefs_read_bytes_total", source="backend")
        assert bytes(await reader.read(obj, C, C)) == data[C : 2 * C]
        assert sample("cachefs_read_bytes_total", source="disk") + sample(
            "cachefs_read_bytes_total", source="backend"
        ) == counted + C
        from_disk = sample("cachefs_read_bytes_total", source="disk")
        assert bytes(await reader.read(obj, C, C)) == data[C : 2 * C]
        assert store.calls == 1
        assert sample("cachefs_read_bytes_total", source="disk") == from_disk + C


@pytest.mark.trio
async def test_second_pass_is_served_from_memory(store):
    data = payload(4 * C + 10)
    obj = store.add("f", data)
    async with open_reader(store) as reader:
        assert bytes(await reader.read(obj, 0, len(data))) == data
        calls = store.calls
        assert calls == 5
        from_mem = sample("cachefs_read_bytes_total", source="mem")
        assert bytes(await reader.read(obj, 0, len(data))) == data
        assert store.calls == calls
        assert sample("cachefs_read_bytes_total", source="mem") == from_mem + len(data)


@pytest.mark.trio
async def test_read_across_chunks_fetches_them_concurrently(store):
    data = payload(4 * C)
    obj = store.add("f", data)
    async with open_reader(store) as reader:
        store.hold()
        async with trio.open_nursery() as nursery:
            got = []

            async def read():
                got.append(bytes(await reader.read(obj, C - 10, 2 * C + 20)))

            nursery.start_soon(read)
            # All four chunks are requested before any of them has arrived.
            await wait_until(lambda: store.held_now == 4)
            store.release()
        assert got == [data[C - 10 : 3 * C + 10]]
        assert store.fetches == {("f", k * C): 1 for k in range(4)}


# -- read-ahead --------------------------------------------------------------------


@pytest.mark.trio
async def test_sequential_reads_trigger_read_ahead(store):
    data = payload(8 * C)
    obj = store.add("f", data)
    async with open_reader(store, read_ahead=2) as reader:
        stream = ReadStream()
        assert bytes(await reader.read(obj, 0, C, stream)) == data[:C]
        await trio.testing.wait_all_tasks_blocked()
        assert store.order == [("f", 0)], "one read is not yet a sequential stream"
        assert bytes(await reader.read(obj, C, C, stream)) == data[C : 2 * C]
        # The second sequential read schedules chunks 2 and 3 before anyone asks for them.
        await wait_until(lambda: digest(obj, 2) in tier(reader, "mem") and digest(obj, 3) in tier(reader, "mem"))
        assert store.fetches[("f", 2 * C)] == store.fetches[("f", 3 * C)] == 1
        for k in range(2, 8):
            assert bytes(await reader.read(obj, k * C, C, stream)) == data[k * C : (k + 1) * C]
        await trio.testing.wait_all_tasks_blocked()
    assert all(count == 1 for count in store.fetches.values()), store.fetches
    assert store.calls == 8, "read-ahead must stop at the end of the object"


@pytest.mark.trio
async def test_random_reads_do_not_read_ahead(store):
    data = payload(10 * C)
    obj = store.add("f", data)
    async with open_reader(store, read_ahead=4) as reader:
        stream = ReadStream()
        for k in (5, 0, 8, 2, 7):
            assert bytes(await reader.read(obj, k * C + 3, 100, stream)) == data[k * C + 3 : k * C + 103]
        await trio.testing.wait_all_tasks_blocked()
    assert store.order == [("f", k * C) for k in (5, 0, 8, 2, 7)]


@pytest.mark.trio
async def test_read_ahead_zero_fetches_only_what_is_read(store):
    data = payload(6 * C)
    obj = store.add("f", data)
    async with open_reader(store, read_ahead=0) as reader:
        stream = ReadStream()
        for k in range(3):
            await reader.read(obj, k * C, C, stream)
            await trio.testing.wait_all_tasks_blocked()
    assert store.order == [("f", 0), ("f", C), ("f", 2 * C)]


@pytest.mark.trio
async def test_read_ahead_is_bounded_by_its_semaphore(store):
    read_ahead = 2
    bound = 2 * read_ahead
    objs = [store.add(f"f{i}", payload(6 * C, i)) for i in range(6)]
    ahead = sample("cachefs_readahead_chunks_total")
    async with open_reader(store, read_ahead=read_ahead) as reader:
        # Chunks from index 2 on hang, so every read-ahead stays in flight.
        store.hold(lambda path, start: start >= 2 * C)
        streams = [ReadStream() for _ in objs]
        for obj, stream in zip(objs, streams):
            await reader.read(obj, 0, C, stream)
            await reader.read(obj, C, C, stream)  # sequential: wants chunks 2 and 3 ahead
        await wait_until(lambda: store.held_now == bound)
        await trio.sleep(0.05)  # give any excess read-ahead thread time to show up
        await trio.testing.wait_all_tasks_blocked()
        # Six streams wanted twelve chunks ahead; only `bound` may be in flight.
        assert store.held_now == bound
        assert sum(n for (_, start), n in store.fetches.items() if start >= 2 * C) == bound
        assert sample("cachefs_readahead_chunks_total") == ahead + bound

        store.release()
        await wait_until(lambda: store.in_flight == 0)
        await trio.testing.wait_all_tasks_blocked()
        # Slots are free again: a stream whose read-ahead was skipped gets it on its next read.
        last, stream = objs[-1], streams[-1]
        assert store.fetches[(last.path, 3 * C)] == 0
        await reader.read(last, 2 * C, C, stream)
        await wait_until(lambda: store.fetches[(last.path, 3 * C)] == 1)


@pytest.mark.trio
@pytest.mark.parametrize("tiers", ["none", "disk-only"])
async def test_read_ahead_without_mem_does_not_fetch_twice(store, tmp_path, tiers):
    # With MEM off, a chunk read ahead can only reach its reader through the SSD
    # tier; with no tier at all, read-ahead would be pure double traffic.
    data = payload(6 * C)
    obj = store.add("f", data)
    async with open_reader(store, mem=0, disk_dir=tmp_path if tiers == "disk-only" else None, read_ahead=2) as reader:
        stream = ReadStream()
        for k in range(6):
            assert bytes(await reader.read(obj, k * C, C, stream)) == data[k * C : (k + 1) * C]
            await wait_until(lambda: store.in_flight == 0)
            await trio.testing.wait_all_tasks_blocked()
    assert store.fetches == {("f", k * C): 1 for k in range(6)}


@pytest.mark.trio
async def test_read_ahead_skips_chunks_the_ssd_holds_when_mem_is_off(store, tmp_path):
    # With MEM off, reading a cached chunk ahead would load it from the SSD and
    # drop it: pure waste. Readers take their ranges from the SSD themselves.
    data = payload(6 * C)
    obj = store.add("f", data)
    async with open_reader(store, mem=0, disk_dir=tmp_path, read_ahead=2) as reader:
        for k in range(6):
            await reader.chunk(obj, k)  # the SSD tier holds the whole file
        whole_loads = 0
        disk_get = tier(reader, "disk").get

        async def counting_get(*args):
            nonlocal whole_loads
            whole_loads += 1
            return await disk_get(*args)

        tier(reader, "disk").get = counting_get
        advised = []
        will_need = tier(reader, "disk").will_need

        async def recording_will_need(key):
            advised.append(key.digest)
            await will_need(key)

        tier(reader, "disk").will_need = recording_will_need
        stream = ReadStream()
        for offset in range(0, 6 * C, C // 4):
            assert bytes(await reader.read(obj, offset, C // 4, stream)) == data[offset : offset + C // 4]
        await trio.testing.wait_all_tasks_blocked()
    assert whole_loads == 0
    # ...but the kernel is asked to read the chunks ahead of the reader, each once.
    assert sorted(advised) == sorted(digest(obj, k) for k in range(1, 6))
    assert store.fetches == {("f", k * C): 1 for k in range(6)}


# -- errors ------------------------------------------------------------------------


@pytest.mark.trio
async def test_backend_failure_reaches_every_waiter_and_next_read_retries(store):
    data = payload(2 * C)
    obj = store.add("f", data)
    outcomes: list[BaseException | bytes] = []

    async def read():
        try:
            outcomes.append(bytes(await reader.read(obj, 10, 100)))
        except BackendError as e:
            outcomes.append(e)

    async with open_reader(store, retries=0) as reader:
        store.fail_next = 1
        store.hold()
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(read)
            await wait_until(lambda: store.calls == 1)
            await trio.testing.wait_all_tasks_blocked()
            store.release()
        assert len(outcomes) == 10
        assert all(isinstance(o, BackendError) for o in outcomes), outcomes
        assert store.fetches == {("f", 0): 1}

        assert bytes(await reader.read(obj, 10, 100)) == data[10:110]
        assert store.fetches == {("f", 0): 2}


@pytest.mark.trio
async def test_object_changed_is_not_retried_and_propagates(store):
    old = store.add("f", payload(3 * C, 1))
    async with open_reader(store, retries=3) as reader:
        assert bytes(await reader.read(old, 0, 10)) == payload(3 * C, 1)[:10]
        new = store.add("f", payload(3 * C, 2))  # same path, new version
        with pytest.raises(ObjectChanged):
            await reader.read(old, C, 10)
        assert store.fetches[("f", C)] == 1
        # The new version never sees a chunk of the old one, cached or not.
        assert bytes(await reader.read(new, 0, 2 * C)) == payload(3 * C, 2)[: 2 * C]
        assert store.fetches[("f", 0)] == 2


@pytest.mark.trio
async def test_short_backend_read_is_object_changed(store):
    obj = store.add("f", payload(2 * C))
    lying = ObjectId(obj.source, obj.path, obj.version, 3 * C)  # claims a size the store does not have
    async with open_reader(store, retries=3) as reader:
        with pytest.raises(ObjectChanged):
            await reader.read(lying, 2 * C, 10)
        assert store.fetches[("f", 2 * C)] == 1


@pytest.mark.trio
async def test_corrupt_disk_chunk_is_refetched(store, tmp_path):
    data = payload(2 * C)
    obj = store.add("f", data)
    async with open_reader(store, mem=0, disk_dir=tmp_path) as reader:
        assert bytes(await reader.read(obj, 0, C)) == data[:C]
        await wait_until(lambda: digest(obj, 0) in tier(reader, "disk"))
        path = tmp_path / "chunks" / digest(obj, 0).hex()[:2] / digest(obj, 0).hex()
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(raw)
        errors = sample("cachefs_cache_errors_total", tier="disk", reason="corrupt")

        assert bytes(await reader.read(obj, 0, C)) == data[:C]
        assert sample("cachefs_cache_errors_total", tier="disk", reason="corrupt") == errors + 1
        assert store.fetches[("f", 0)] == 2


@pytest.mark.trio
async def test_a_random_jump_fetches_only_its_blocks_first(store):
    """A reader that jumps into an uncached chunk gets its bytes from a ranged GET
    of the blocks it needs; the whole chunk follows in the background."""
    from cachefs import hotpath

    block, chunk = hotpath.BLOCK_SIZE, 8 * hotpath.BLOCK_SIZE
    data = payload(3 * chunk)
    obj = store.add("f", data)
    async with open_reader(store, chunk_size=chunk, mem=16 * chunk, read_ahead=2) as reader:
        stream = ReadStream(jumps=RANDOM_AFTER_JUMPS - 1)  # it has been jumping around already
        off = chunk + 3 * block + 10
        assert bytes(await reader.read(obj, off, 100, stream)) == data[off : off + 100]
        await wait_until(lambda: ("f", chunk) in store.fetches and store.in_flight == 0)
        assert store.fetches == {("f", chunk + 3 * block): 1, ("f", chunk): 1}  # the block, then the chunk
        # Now cached: the next random read costs nothing.
        assert bytes(await reader.read(obj, off + 2 * block, 100, stream)) == data[off + 2 * block : off + 2 * block + 100]
        assert sum(store.fetches.values()) == 2, store.fetches


@pytest.mark.trio
async def test_a_single_jump_still_fetches_whole_chunks(store):
    """Sequential readers sharing the page cache skip ahead now and then: one jump
    must not turn into an extra ranged GET."""
    from cachefs import hotpath

    chunk = 8 * hotpath.BLOCK_SIZE
    data = payload(3 * chunk)
    obj = store.add("f", data)
    async with open_reader(store, chunk_size=chunk, mem=16 * chunk) as reader:
        stream = ReadStream()
        off = chunk + 3 * hotpath.BLOCK_SIZE
        assert bytes(await reader.read(obj, off, 100, stream)) == data[off : off + 100]
    assert store.fetches == {("f", chunk): 1}


@pytest.mark.trio
@pytest.mark.parametrize("chunk_mib, read_ahead, ranged", [(4, 2, True), (4, 0, False), (1, 2, False)])
async def test_a_files_first_read_takes_its_first_blocks_and_no_byte_twice(store, chunk_mib, read_ahead, ranged):
    """Time to first byte: a file's first read, in the first block of a chunk larger
    than 1 MiB, gets the pages up to its end from a ranged GET; reading on
    completes the chunk with a GET of the rest. A 1 MiB chunk (or no read-ahead)
    is fetched whole. Either way no byte comes from the backend twice, and the
    chunk is let go once read in full (its first read's pages count as read)."""
    chunk = chunk_mib << 20
    data = payload(2 * chunk)
    obj = store.add("f", data)
    async with open_reader(store, chunk_size=chunk, mem=4 * chunk, read_ahead=read_ahead) as reader:
        stream = ReadStream()
        assert bytes(await reader.read(obj, 0, 4096, stream)) == data[:4096]  # open, read a page
        assert store.ranges == ([("f", 0, 4096)] if ranged else [("f", 0, chunk)])
        for offset in range(0, chunk, 128 << 10):  # then reading on, sequentially
            n = 128 << 10
            assert bytes(await reader.read(obj, offset, n, stream)) == data[offset : offset + n]
        await wait_until(lambda: store.in_flight == 0)
        first = sorted(r for r in store.ranges if r[1] < chunk)
        assert first == ([("f", 0, 4096), ("f", 4096, chunk)] if ranged else [("f", 0, chunk)])  # each byte once
        assert chunk_key(obj, chunk, 0).digest not in reader._held  # read in full: let go
        assert not reader._heads and not [d for d in reader.budget._claims if d.endswith(b"/head")]


class FakePeers:
    """A peer tier (medium "network") that serves chunks of the store's objects
    without the backend, and records what it was asked for."""

    name = "peer"
    medium = "network"

    def __init__(self, store: FakeStore):
        self.store = store
        self.asked: list[int] = []

    def __contains__(self, digest: bytes) -> bool:
        return False

    async def get(self, key):
        self.asked.append(key.index)
        data, _ = self.store.objects[key.obj.path]
        start = key.index * key.chunk_size
        return data[start : start + key.length]

    async def get_range(self, key, start, end):
        return None

    async def put(self, key, data):
        raise AssertionError("nothing is pushed to peers")

    async def will_need(self, key):
        pass


@pytest.mark.trio
@pytest.mark.parametrize("mem", [16, 0], ids=["mem+disk", "disk"])
async def test_a_peer_hit_is_kept_in_memory_only_and_jumps_fetch_whole_chunks(store, tmp_path, mem):
    """A chunk from the ring's owner goes to MEM, not to our SSD (the owner holds
    it on its SSD); with peers that serve no ranges (older than protocol v4), a
    jumping reader asks for whole chunks, never backend ranges: the owner fetches
    each chunk once for the ring."""
    from cachefs import hotpath

    chunk = 8 * hotpath.BLOCK_SIZE  # a jump needs fewer blocks than the chunk
    data = payload(4 * chunk)
    obj = store.add("f", data)
    peers = FakePeers(store)
    async with open_reader(store, chunk_size=chunk, mem=mem * chunk, disk_dir=tmp_path, peers=peers) as reader:
        stream = ReadStream(jumps=RANDOM_AFTER_JUMPS)
        for index in (2, 0, 3):
            off = index * chunk + 100
            assert bytes(await reader.read(obj, off, 10, stream)) == data[off : off + 10]
        assert peers.asked == [2, 0, 3]
        assert store.calls == 0
        assert not tier(reader, "disk").usage()[1]
        if mem:
            assert all(chunk_digest(obj, chunk, i) in tier(reader, "mem") for i in (0, 2, 3))
            # Served from MEM now: the peer is not asked again.
            assert bytes(await reader.read(obj, 2 * chunk, chunk, stream)) == data[2 * chunk : 3 * chunk]
            assert peers.asked == [2, 0, 3]


class FakeRangePeers(FakePeers):
    """A ring whose owners speak protocol v4: they serve byte ranges of chunks."""

    def __init__(self, store):
        super().__init__(store)
        self.ranges: list[tuple[int, int, int]] = []

    async def get_range(self, key, start, end):
        self.ranges.append((key.index, start, end))
        data, _ = self.store.objects[key.obj.path]
        base = key.index * key.chunk_size
        return data[base + start : base + end]


@pytest.mark.trio
@pytest.mark.parametrize("mem", [16, 0], ids=["mem+disk", "disk"])
async def test_a_jumping_reader_takes_a_range_from_peers_then_the_chunk(store, tmp_path, mem):
    """Random reads of a chunk no local tier holds take just their bytes from the
    owner the first time (a 4 KiB read must not wait for 4 MiB), across a chunk edge
    too; the second read of a chunk loads it whole into MEM (a chunk read twice is
    read again), and later reads are MEM hits. Without MEM, ranges only. The backend
    is never asked, and nothing goes to the SSD."""
    data = payload(4 * C)
    obj = store.add("f", data)
    peers = FakeRangePeers(store)
    async with open_reader(store, mem=mem * C, disk_dir=tmp_path, peers=peers) as reader:
        stream = ReadStream(jumps=RANDOM_AFTER_JUMPS)
        # Each read far from the last (a near one counts as sequential).
        for off, n in [(2 * C + 100, 10), (0, 1), (3 * C - 1, 2), (C + 5, 5), (4 * C - 5, 5)]:
            assert bytes(await reader.read(obj, off, n, stream)) == data[off : off + n]
        assert store.calls == 0
        assert not tier(reader, "disk").usage()[1]
        assert reader.reads["peer"][0] == 10 + 1 + 2 + 5 + 5
        if not mem:
            assert peers.ranges == [(2, 100, 110), (0, 0, 1), (2, C - 1, C), (3, 0, 1), (1, 5, 10), (3, C - 5, C)]
            assert peers.asked == []
            return
        # Chunk 2 and then chunk 3 were read a second time: loaded whole.
        assert peers.ranges == [(2, 100, 110), (0, 0, 1), (3, 0, 1), (1, 5, 10)]
        assert peers.asked == [2, 3]
        assert tier(reader, "mem").usage()[1] == 2
        assert bytes(await reader.read(obj, 2 * C + 7, 3, stream)) == data[2 * C + 7 : 2 * C + 10]
        await reader.chunk(obj, 1)  # held in MEM now: served from there, not asked again
        assert bytes(await reader.read(obj, C + 7, 3, stream)) == data[C + 7 : C + 10]
        assert len(peers.ranges) == 4 and peers.asked == [2, 3, 1]


@pytest.mark.trio
async def test_a_cancelled_leader_hands_the_fetch_to_a_waiter(store):
    """A worker's fetch for a mount that was killed must not fail the other mounts waiting on it."""
    data = payload(2 * C)
    obj = store.add("f", data)
    got: list[bytes] = []
    leader = trio.CancelScope()

    async def lead() -> None:
        with leader:
            await reader.chunk(obj, 1)

    async def follow() -> None:
        chunk, _ = await reader.chunk(obj, 1)
        got.append(bytes(chunk))

    async with open_reader(store, read_ahead=0) as reader:
        store.hold()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead)
            await wait_until(lambda: store.calls == 1)  # the leader is fetching
            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()  # the follower waits on the leader's flight
            leader.cancel()
            await wait_until(lambda: store.calls == 2)  # and then fetches the chunk itself
            store.release()
    assert got == [data[C:]]


# -- attribution: bytes count where they came from the first time they are read -------


@pytest.mark.trio
async def test_read_ahead_bytes_count_as_backend_until_read_once(store):
    data = payload(6 * C)
    obj = store.add("f", data)
    async with open_reader(store, read_ahead=4) as reader:
        before = {s: sample("cachefs_read_bytes_total", source=s) for s in ("mem", "backend")}
        stream = ReadStream()
        for off in range(0, len(data), C // 2):
            assert bytes(await reader.read(obj, off, C // 2, stream)) == data[off : off + C // 2]
            await trio.testing.wait_all_tasks_blocked()
        assert sample("cachefs_readahead_chunks_total") > 0
        assert sample("cachefs_read_bytes_total", source="backend") - before["backend"] == len(data)
        assert sample("cachefs_read_bytes_total", source="mem") == before["mem"]
        assert reader.reads["backend"][0] == len(data) and reader.reads["mem"][0] == 0
        # Read once: now they are hits.
        assert bytes(await reader.read(obj, 0, len(data))) == data
        assert sample("cachefs_read_bytes_total", source="mem") - before["mem"] == len(data)


@pytest.mark.trio
@pytest.mark.parametrize("tiers", ["none", "disk"])
async def test_a_chunk_read_in_pages_is_held_until_its_last_byte_is_read(store, tmp_path, tiers):
    # The kernel sends page-aligned reads of any size, and a 4 MiB chunk was
    # tracked in 64 KiB parts: a read that ended inside a part counted the whole
    # part as read, so the chunk was let go before the rest of that part was
    # read. The rest then came from the SSD, counted as a hit the backend had
    # sent, or, where no tier kept the chunk (the SSD did not admit it; MEM
    # off), from the backend a second time. Reads as `tar` sent them in
    # bench.epochs: a 64 KiB file, then one file of one chunk.
    chunk = 4 << 20
    files = {"small": (payload(64 << 10, 1), [16 << 10, 48 << 10]),
             "mixed": (payload(3844411, 2), [32 << 10, 128 << 10, 512 << 10, 1 << 20, 1 << 20, 1 << 20, 12 << 10])}
    disk_dir = tmp_path if tiers == "disk" else None
    async with open_reader(store, mem=0, disk_dir=disk_dir, disk_size=4 * (chunk + 4096), chunk_size=chunk) as reader:
        for name, (data, pieces) in files.items():
            obj = store.add(name, data)
            stream, offset = ReadStream(), 0
            for n in pieces:
                got = await reader.read(obj, offset, n, stream)
                assert bytes(got) == data[offset : offset + n]
                offset += n
            await trio.testing.wait_all_tasks_blocked()
        assert store.fetches == {(name, 0): 1 for name in files}
        total = sum(len(data) for data, _ in files.values())
        assert reader.reads["backend"] == [total, sum(len(pieces) for _, pieces in files.values())]
        assert not reader._held, "read in full: let go"


@pytest.mark.trio
async def test_chunk_loaded_for_a_peer_is_a_hit_for_a_local_reader(store):
    data = payload(2 * C)
    obj = store.add("f", data)
    async with open_reader(store) as reader:
        await reader.chunk(obj, 0)  # the peer server asking for it
        assert bytes(await reader.read(obj, 0, C)) == data[:C]
        assert reader.reads["mem"] == [C, 1]
        assert reader.reads["backend"] == [0, 0]


# -- warm-up ---------------------------------------------------------------------------


@pytest.mark.trio
async def test_warm_goes_to_the_ssd_only_and_reads_back_byte_exact(store, tmp_path):
    data = payload(3 * C + 777, seed=3)
    obj = store.add("f", data)
    async with open_reader(store, disk_dir=tmp_path) as reader:
        assert [await reader.warm(obj, i) for i in range(4)] == [False] * 4
        mem, disk = tier(reader, "mem"), tier(reader, "disk")
        # A warmed chunk must not push hot data out of MEM.
        assert mem.usage() == (0, 0)
        assert all(digest(obj, i) in disk for i in range(4))
        assert await reader.warm(obj, 0) is True  # held: nothing fetched again
        assert store.calls == 4
        # Served from the SSD, verified against the checksums sealed in the fill buffer.
        assert bytes(await reader.read(obj, 0, len(data))) == data
        assert store.calls == 4


@pytest.mark.trio
async def test_a_read_during_a_warm_shares_its_fetch(store, tmp_path):
    data = payload(C, seed=4)
    obj = store.add("f", data)
    store.hold()
    async with open_reader(store, disk_dir=tmp_path) as reader, trio.open_nursery() as nursery:
        nursery.start_soon(reader.warm, obj, 0)
        await wait_until(lambda: store.held_now == 1)
        got = []

        async def read() -> None:
            got.append(bytes(await reader.read(obj, 0, C)))

        nursery.start_soon(read)
        await trio.sleep(0.05)
        store.release()
        await wait_until(lambda: got)
        assert got == [data]
        assert store.fetches[("f", 0)] == 1


@pytest.mark.trio
async def test_a_failed_warm_stores_nothing_and_the_next_one_loads(store, tmp_path):
    data = payload(C, seed=5)
    obj = store.add("f", data)
    store.fail_next = 1
    async with open_reader(store, disk_dir=tmp_path) as reader:
        with pytest.raises(BackendError):
            await reader.warm(obj, 0)
        disk = tier(reader, "disk")
        assert digest(obj, 0) not in disk and disk.usage() == (0, 0)
        assert await reader.warm(obj, 0) is False
        assert bytes(await reader.read(obj, 0, C)) == data


@pytest.mark.trio
async def test_a_warm_run_is_one_request_and_a_held_chunk_splits_it(store, tmp_path):
    data = payload(5 * C + 99, seed=6)
    obj = store.add("f", data)
    async with open_reader(store, disk_dir=tmp_path) as reader:
        assert await reader.warm(obj, 2) is False
        assert await reader.warm_run(obj, 0, 6) == [False, False, True, False, False, False]
        # Chunks 0-1 in one GET, 3-5 (the last one short) in another; chunk 2 was held.
        assert sorted(store.fetches) == [("f", 0), ("f", 2 * C), ("f", 3 * C)]
        assert tier(reader, "mem").usage() == (0, 0)
        assert bytes(await reader.read(obj, 0, len(data))) == data
        assert store.calls == 3


@pytest.mark.trio
async def test_a_hole_the_kernel_fills_late_does_not_load_the_chunks_after_it_again(store, tmp_path):
    # The kernel skips read-ahead while FUSE is congested and fills the hole
    # later, with reads behind the furthest one it sent. Those are a jump back,
    # then sequential again: read-ahead from there must not load the chunk after
    # the hole a second time, read in full and let go meanwhile, and (MEM off,
    # the SSD too small to keep it) fetched from the backend again (seen in CI
    # as one 4 MiB chunk too many in test_epochs' first epoch).
    page = 4 << 10
    data = payload(3 * C)
    obj = store.add("f", data)
    async with open_reader(store, mem=0, disk_dir=tmp_path, disk_size=C // 2, read_ahead=2) as reader:
        stream = ReadStream()
        hole = range(C - 3 * page, C, page)
        reads = [o for o in range(0, 3 * C, page) if o not in hole] + list(hole)
        for offset in reads:
            assert bytes(await reader.read(obj, offset, page, stream)) == data[offset : offset + page]
            await trio.testing.wait_all_tasks_blocked()
        await wait_until(lambda: store.in_flight == 0)
        await trio.testing.wait_all_tasks_blocked()
    assert sum(end - start for _, start, end in store.ranges) == len(data), store.ranges
