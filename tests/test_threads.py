"""cachefs.threads: the SSD tier's hop for range reads that wait for the disk."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from cachefs.threads import BlockingThreads


@pytest.mark.trio
async def test_runs_off_the_trio_thread_and_returns_or_raises():
    threads = BlockingThreads(2, "test")
    try:
        here = threading.get_ident()
        assert await threads.run(lambda a, b: (a + b, threading.get_ident()), 2, 3) != (5, here)
        assert (await threads.run(lambda a, b: a + b, 2, 3)) == 5

        def fail():
            raise OSError(5, "EIO")

        with pytest.raises(OSError, match="EIO"):
            await threads.run(fail)
    finally:
        threads.close()


@pytest.mark.trio
async def test_runs_as_many_reads_at_once_as_it_has_threads():
    """Also when a job is queued while the thread that looked idle is taking the one before."""
    threads = BlockingThreads(3, "test")
    inside, release = [], threading.Event()
    lock = threading.Lock()

    def read(n):
        with lock:
            inside.append(n)
        release.wait(30)  # longer than the wait below: a job left queued fails the test
        return n

    try:
        results = []
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(lambda n=n: _append(results, threads.run(read, n)))
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(300):  # the threads pick their jobs up on their own time
                if len(inside) == 3:
                    break
                await trio.to_thread.run_sync(release.wait, 0.01)
            assert len(inside) == 3
            release.set()
        assert sorted(results) == [0, 1, 2]
    finally:
        threads.close()


async def _append(results, awaitable):
    results.append(await awaitable)


@pytest.mark.trio
async def test_a_cancel_waits_for_the_read_a_thread_took():
    threads = BlockingThreads(1, "test")
    release, taken = threading.Event(), threading.Event()
    got = []

    async def reader(scope):
        with scope:
            got.append(await threads.run(lambda: taken.set() or (release.wait(10) and "read")))
            await trio.lowlevel.checkpoint()
            got.append("not reached: the cancel lands at the next checkpoint")

    try:
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, scope)
            await trio.to_thread.run_sync(taken.wait, 10)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # still waiting: the read holds a buffer and a descriptor
            release.set()
        assert got == ["read"]
    finally:
        threads.close()


@pytest.mark.trio
async def test_a_cancel_drops_a_call_still_queued(autojump_clock):
    """As trio.to_thread's wait for its limiter: a call no thread took yet never runs once
    cancelled (an upload queued at unmount is not sent then), and the one running is
    waited for."""
    threads = BlockingThreads(1, "test")
    release = threading.Event()
    ran = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_append, ran, threads.run(lambda: release.wait(10) and "first"))
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1) as scope:
                await threads.run(lambda: ran.append("queued"))
            assert scope.cancelled_caught and ran == []
            release.set()
        assert await threads.run(lambda: "next") == "next"
        assert ran == ["first"]
    finally:
        threads.close()


@pytest.mark.trio
async def test_an_abandoned_call_returns_at_once_and_holds_its_thread(autojump_clock):
    """abandon_on_cancel: the cancel takes effect at once; the call runs on in its
    thread, its outcome dropped, and holds that thread until it returns, so a call
    queued behind it waits."""
    threads = BlockingThreads(1, "test")
    release = threading.Event()
    ran = []
    try:
        with trio.move_on_after(1) as scope:
            await threads.run(lambda: release.wait(10) and ran.append("first"), abandon_on_cancel=True)
        assert scope.cancelled_caught and ran == []
        with trio.move_on_after(1) as scope:
            await threads.run(lambda: ran.append("queued") or "dropped", abandon_on_cancel=True)
        assert scope.cancelled_caught and ran == []  # behind the first, in the one thread
        release.set()
        assert await threads.run(lambda: "next") == "next"
        assert ran == ["first", "queued"]
    finally:
        threads.close()


@pytest.mark.trio
async def test_a_call_after_close_still_runs():
    threads = BlockingThreads(1, "test")
    threads.close()
    with trio.fail_after(10):
        assert await threads.run(lambda: "late") == "late"


@pytest.mark.trio
async def test_close_ends_the_threads():
    threads = BlockingThreads(2, "test")
    await threads.run(lambda: None)
    started = list(threads._threads)
    assert len(started) == 1 and all(t.is_alive() for t in started)  # one read, one thread: started as needed
    threads.close()
    for t in started:
        t.join(10)
        assert not t.is_alive()


@pytest.mark.trio
async def test_idle_threads_end_and_reads_start_them_again():
    """A daemon that stopped reading holds no read threads (a leak check counting its
    threads sees the same number before and after), and the next read still runs."""
    threads = BlockingThreads(2, "test", idle_seconds=0.05)
    try:
        assert await threads.run(lambda: "first") == "first"
        (thread,) = threads._threads
        await trio.to_thread.run_sync(thread.join, 10)  # ends on its own once idle
        assert not thread.is_alive() and threads.running == 0
        assert await threads.run(lambda: "again") == "again"
        assert threads.running == 1
    finally:
        threads.close()


def test_needs_a_thread():
    with pytest.raises(ValueError):
        BlockingThreads(0, "test")
