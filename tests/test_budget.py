"""The chunk budget (--mem-size): MEM, held read-ahead and fetches in flight share it,
and it is never exceeded, with demand reads always making progress."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from cachefs.backend import Backend
from cachefs.budget import MemoryBudget, chunk_budget
from cachefs.cache.mem import MemTier
from cachefs.objects import ObjectId, chunk_key
from cachefs.reader import Reader, ReadStream
from test_reader import C, FakeStore, payload


def d(n: int) -> bytes:
    return n.to_bytes(16, "big")


# -- the ledger ---------------------------------------------------------------------


def test_a_chunk_counts_once_however_many_claim_it():
    budget = MemoryBudget(4 * C)
    assert budget.try_claim(d(1), C)
    assert budget.try_claim(d(1), C)  # held and in MEM: one buffer
    assert budget.used == C
    budget.release(d(1))
    assert budget.used == C
    budget.release(d(1))
    assert budget.used == 0


def test_read_ahead_leaves_the_reserve_and_takes_room_from_caches_only():
    budget = MemoryBudget(4 * C, reserve=2 * C)
    dropped = []

    def holder(b: MemoryBudget, room: int) -> None:
        while dropped != [d(1)] and not b.fits(room):
            dropped.append(d(1))
            b.release(d(1))

    budget.add_reclaimer(holder, cache=False)
    assert budget.try_claim(d(1), C, ahead=True)
    assert budget.try_claim(d(2), C, ahead=True)
    assert not budget.try_claim(d(3), C, ahead=True)  # would eat into the reserve
    assert not dropped  # and read-ahead never takes a reader's chunks
    assert budget.try_claim(d(3), C) and budget.try_claim(d(4), C)  # demand takes the reserve
    assert budget.try_claim(d(5), C)  # ... and then a held chunk
    assert dropped == [d(1)] and budget.used == 4 * C


def test_mem_shrinks_to_make_room():
    mem = MemTier(4 * C)
    budget = mem.budget
    for i in range(4):
        assert budget.try_claim(d(i), C)
        budget.release(d(i))
    assert budget.used == 0
    obj = ObjectId("fake://b", "f", "v1", 8 * C)
    keys = [chunk_key(obj, C, i) for i in range(8)]
    for k in keys[:4]:
        trio.run(mem.put, k, b"x" * C)
    assert mem.used == budget.used == 4 * C
    assert budget.try_claim(d(99), 2 * C)  # a fetch: MEM gives up its two oldest
    assert mem.used == 2 * C and budget.used == 4 * C
    assert keys[0].digest not in mem and keys[3].digest in mem


@pytest.mark.trio
async def test_a_demand_claim_waits_for_a_fetch_in_flight_then_proceeds():
    budget = MemoryBudget(2 * C)
    assert budget.try_claim(d(1), C) and budget.try_claim(d(2), C)
    got = []

    async def demand() -> None:
        await budget.claim(d(3), C)
        got.append(3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(demand)
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        budget.release(d(1))
    assert got == [3] and budget.used == 2 * C


def test_with_mem_off_the_budget_bounds_chunks_in_flight():
    budget = chunk_budget(0, C, read_ahead=8, backend_concurrency=16)
    assert budget.capacity == (16 + 4 * 8 + 4) * C
    assert chunk_budget(64 * C, C, 8, 16).capacity == 64 * C


# -- readers against a small budget -------------------------------------------------------


@pytest.fixture
def store():
    s = FakeStore()
    yield s
    s.release()


@pytest.mark.trio
@pytest.mark.parametrize("mem_chunks", [2, 8, 24])
async def test_many_readers_with_read_ahead_never_exceed_the_budget(store, mem_chunks):
    files = [payload(12 * C + 123 * i, i) for i in range(6)]
    objs = [store.add(f"f{i}", data) for i, data in enumerate(files)]
    budget = chunk_budget(mem_chunks * C, C, read_ahead=8, backend_concurrency=16)
    async with trio.open_nursery() as nursery:
        backend = Backend(store, concurrency=16, timeout=5.0, retries=0)
        reader = Reader([MemTier(mem_chunks * C, budget)], backend, C, 8, nursery, budget=budget)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, budget.used)
                await trio.sleep(0)

        async def sequential(seed: int) -> None:
            rng = random.Random(seed)
            i = rng.randrange(len(objs))
            stream = ReadStream()
            for offset in range(0, objs[i].size, 16 << 10):
                got = await reader.read(objs[i], offset, 16 << 10, stream)
                assert bytes(got) == files[i][offset : offset + (16 << 10)]

        async def randomly(seed: int) -> None:
            rng = random.Random(seed)
            stream = ReadStream()
            for _ in range(30):
                i = rng.randrange(len(objs))
                offset, n = rng.randrange(objs[i].size), rng.randrange(1, 3 * C)
                got = await reader.read(objs[i], offset, n, stream)
                assert bytes(got) == files[i][offset : offset + n]

        nursery.start_soon(watch)
        with trio.fail_after(60):
            async with trio.open_nursery() as readers:
                for seed in range(40):
                    readers.start_soon(sequential if seed % 2 else randomly, seed)
        nursery.cancel_scope.cancel()
    assert budget.peak <= budget.capacity and peak <= budget.capacity
    assert budget.peak > budget.capacity // 2  # the budget was really under pressure
    reader.close()
    assert budget.used == reader.tiers[0].used  # no claim leaked: what is left is MEM's


@pytest.mark.trio
async def test_demand_reads_progress_when_read_ahead_holds_the_budget(store):
    """Read-ahead that nobody reads (readers that stopped) must not block others."""
    files = [payload(16 * C, i) for i in range(4)]
    objs = [store.add(f"g{i}", data) for i, data in enumerate(files)]
    budget = chunk_budget(4 * C, C, read_ahead=8, backend_concurrency=16)
    async with trio.open_nursery() as nursery:
        backend = Backend(store, concurrency=16, timeout=5.0, retries=0)
        reader = Reader([MemTier(4 * C, budget)], backend, C, 8, nursery, budget=budget)
        for i in range(3):  # three readers start sequentially, then stop
            stream = ReadStream()
            for offset in range(0, 3 * C, C):
                await reader.read(objs[i], offset, C, stream)
        with trio.fail_after(20):
            async with trio.open_nursery() as readers:
                for k in range(12):
                    offset = (k % 16) * C

                    async def one(offset=offset) -> None:
                        assert bytes(await reader.read(objs[3], offset, C)) == files[3][offset : offset + C]

                    readers.start_soon(one)
        nursery.cancel_scope.cancel()
    assert budget.peak <= budget.capacity


@pytest.mark.trio
async def test_warm_up_fills_are_claimed_in_the_budget_and_mem_makes_room(tmp_path):
    """A warm-up's fill buffers count under --mem-size: concurrent fills never take
    the budget over its capacity nor the room kept for demand reads, MEM shrinks
    for them, none deadlocks, and the buffers go back to the system afterwards."""
    from cachefs.cache.disk import DiskTier

    budget = MemoryBudget(12 * C, reserve=2 * C)
    mem = MemTier(12 * C, budget)
    disk = DiskTier(str(tmp_path), 1 << 30, 0.0, budget=budget)
    await disk.load()
    assert disk.fill_run_chunks(C) == 5  # half of what is left beside the reserve
    hot = ObjectId("fake://b", "hot", "v1", 12 * C)
    for i in range(12):
        await mem.put(chunk_key(hot, C, i), b"h" * C)
    assert budget.used == 12 * C
    objs = [ObjectId("fake://b", f"w{i}", "v1", 4 * C) for i in range(6)]
    peak = 0

    async def fetch(views) -> None:
        nonlocal peak
        for view in views:
            peak = max(peak, budget.used)
            await trio.lowlevel.checkpoint()  # the other fills go on meanwhile
            view[:] = b"w" * len(view)

    async def fill(obj) -> None:
        keys = [chunk_key(obj, C, i) for i in range(4)]
        assert await disk.fill(keys, fetch) == [True] * 4

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for obj in objs:
                nursery.start_soon(fill, obj)
    assert 4 * C <= peak <= budget.capacity - budget.reserve  # fills ran, within the room read-ahead may take
    assert budget.peak <= budget.capacity
    assert mem.used < 12 * C  # MEM gave up its oldest chunks for them
    assert budget.used == mem.used  # every fill's claim was given back
    assert not disk._fill_buffers  # and no idle buffer is kept
    for obj in objs:
        got = await disk.get(chunk_key(obj, C, 3))
        assert got is not None and bytes(got) == b"w" * C
