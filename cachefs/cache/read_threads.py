"""Threads for the SSD tier's range reads: a lighter hop than `trio.to_thread`.

A range read whose blocks are not in the page cache must wait for the disk, so
it leaves the trio thread. `trio.to_thread.run_sync` costs about twice the CPU
of a plain hand-off (limiter, context copy, thread cache, outcome plumbing): on
our 2-core VM under load, 140-160 us per round trip against 60-70 us with 4
readers, and on an SSD hit whose pages were not cached that hop was most of
the daemon's cost per read (a cached read on the trio thread: ~30 us). Here a
fixed set of threads takes jobs from one queue and reschedules the waiting
task through the trio token: nothing else.

The guide's "no bare threads" is kept in spirit: the threads only run the
functions given to `run`, belong to one tier, and stop at `close`. Like trio's
own worker threads, one idle for IDLE_SECONDS ends (and is started again when
reads need it), so a quiet daemon holds no threads for reads long done.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import outcome
import trio

# Seconds a thread waits for a read before it ends (trio's worker threads: 10 s).
IDLE_SECONDS = 10.0


class ReadThreads:
    """`count` threads, started at the first `run`, that run blocking reads.

    Args:
        count: threads, i.e. reads waiting on the disk at once.
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

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in one of the threads; its result, or its exception raised here.

        Checkpoints. Like `trio.to_thread.run_sync` (without `abandon_on_cancel`), a
        read once handed over is waited for: a cancel takes effect when it returns.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._lock:
            self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
            if self._idle < self._jobs.qsize() and len(self._threads) < self.count and not self._closed:
                thread = threading.Thread(target=self._work, name=f"{self.name} {len(self._threads)}", daemon=True)
                self._threads.add(thread)
                thread.start()
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

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
            if job is None:
                with self._lock:
                    self._threads.discard(me)
                return
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            del job, fn, args  # hold no buffer or descriptor while idle
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the loop is gone, and the task with it

    def close(self) -> None:
        """Let the threads end once the reads handed over are done; does not wait for them."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._jobs.put(None)
