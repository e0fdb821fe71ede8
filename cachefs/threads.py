"""Threads for blocking calls: a lighter hop than `trio.to_thread`.

`trio.to_thread.run_sync` costs about twice the CPU of a plain hand-off
(limiter, context copy, thread cache, naming the OS thread per call, outcome
plumbing): on our 2-core VM under load, 140-160 us per round trip against 60-70
us here. Here a fixed set of threads takes jobs from one queue and reschedules
the waiting task through the trio token: nothing else. Used where hops come by
the thousand: the SSD tier's range reads that wait for the disk and its
warm-up writes, and the backend's requests (a warm-up makes two hops per load;
on the trio thread `to_thread` was a seventh of the worker's Python time).

The guide's "no bare threads" is kept in spirit: the threads only run the
functions given to `run`, belong to one owner, and stop at `close`. Like trio's
own worker threads, one idle for IDLE_SECONDS ends (and is started again when
jobs need it), so a quiet daemon holds no threads for work long done.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import outcome
import trio

# Seconds a thread waits for a job before it ends (trio's worker threads: 10 s).
IDLE_SECONDS = 10.0


class BlockingThreads:
    """`count` threads, started at the first `run`, that run blocking calls.

    Args:
        count: threads, i.e. calls running at once; more wait in a queue.
        name: the threads' name (shown by py-spy, top -H).
    """

    def __init__(self, count: int, name: str, idle_seconds: float = IDLE_SECONDS):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.count = count
        self.name = name
        self.idle_seconds = idle_seconds
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _threads and _idle: a thread ends only with no job queued
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for a job
        self._closed = False

    async def run(self, fn: Callable[..., Any], *args: Any, abandon_on_cancel: bool = False) -> Any:
        """`fn(*args)` in one of the threads; its result, or its exception raised here.

        Checkpoints. As with `trio.to_thread.run_sync`, a call still queued (all
        threads busy) is dropped by a cancel, and one a thread took is waited for (a
        cancel takes effect when it returns), unless `abandon_on_cancel`:
        then a cancel takes effect at once, and the call still runs to its end in its
        thread, its outcome dropped (only for calls without side effects). An
        abandoned call holds its thread until it returns. (Backend reads queue
        behind abandoned ones only until the first times out: then the backend's
        breaker fails reads fast.)
        """
        if self._closed:  # a late call (shutdown): trio's threads still take it
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel)
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        with self._lock:
            self._jobs.put(job)
            self._start_if_needed()

        def abort(_) -> trio.lowlevel.Abort:
            if not abandon_on_cancel:
                with self._lock:
                    if job.started:
                        return trio.lowlevel.Abort.FAILED
                    job.dropped = True  # still queued: it never runs (as trio's limiter wait)
                return trio.lowlevel.Abort.SUCCEEDED
            job.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _start_if_needed(self) -> None:
        # Under _lock. A thread counts as idle from before it waits for a job until after
        # it took one, so a job queued in between finds none idle: the taker checks again.
        if self._idle < self._jobs.qsize() and len(self._threads) < self.count and not self._closed:
            thread = threading.Thread(target=self._work, name=f"{self.name} {len(self._threads)}", daemon=True)
            self._threads.add(thread)
            thread.start()

    @property
    def running(self) -> int:
        """Threads alive now (at most `count`)."""
        return len(self._threads)

    def _work(self) -> None:
        jobs, me = self._jobs, threading.current_thread()
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if jobs.qsize() == 0:  # else a job came as we gave up: take it
                        self._threads.discard(me)
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._start_if_needed()
                if job is not None:
                    job.started = True
            if job is None:
                with self._lock:
                    self._threads.discard(me)
                return
            if job.dropped:
                job.fn = job.args = None
                del job
                continue
            result = outcome.capture(job.fn, *job.args)  # abandoned or not, as trio's threads do
            job.fn = job.args = None  # hold no buffer or descriptor while idle
            try:
                job.token.run_sync_soon(job.deliver, result)
            except trio.RunFinishedError:
                pass  # the loop is gone, and the task with it
            del job, result

    def close(self) -> None:
        """Let the threads end once the calls handed over are done; does not wait for them."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._jobs.put(None)


class _Job:
    __slots__ = ("fn", "args", "token", "task", "abandoned", "started", "dropped")

    def __init__(self, fn: Callable[..., Any], args: tuple, token: trio.lowlevel.TrioToken, task: trio.lowlevel.Task):
        self.fn, self.args, self.token, self.task = fn, args, token, task
        self.abandoned = False  # set on the trio thread only
        # Under the owner's lock: a thread took it; it was cancelled before that.
        self.started = False
        self.dropped = False

    def deliver(self, result: outcome.Outcome) -> None:
        """On the trio thread: wake the waiting task, unless it gave up on the call."""
        if not self.abandoned:
            trio.lowlevel.reschedule(self.task, result)
