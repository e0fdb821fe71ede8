"""How the C heap gives freed chunk buffers back to the system.

Measured in the soak (64 MiB --mem-size, 256 KiB chunks, 100 readers): a mount at
250 MiB RSS had 182 MiB in glibc's arenas of which only 85 MiB were in use; the
other 96 MiB were freed chunk buffers glibc kept. After the first big block is
freed glibc raises its mmap threshold above it, so later chunk buffers are cut
from the arenas (one per allocating thread, up to 8 per core), where freed ones
stay, between live objects, for good.

Two remedies, measured in 30-second soaks on the same host (mounts):
- every block of 64 KiB or more mapped on its own (M_MMAP_THRESHOLD): 150 MiB,
  but each buffer is fresh memory: 1.26 M minor faults, 16 CPU s per GiB read;
- two arenas and malloc_trim twice a second (this module): 162-170 MiB, at the
  cost of the defaults (0.37 M faults, 9.7 CPU s per GiB; 0.16 M and 9.6 without).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import trio

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt(3), malloc.h

# Fewer arenas, less freed memory parked in them: the threads that allocate are
# I/O threads, which hardly contend for the heap.
ARENAS = 2
# How often free pages go back: fragmentation builds up over seconds, and a trim
# takes well under a millisecond.
TRIM_SECONDS = 0.5

_libc: ctypes.CDLL | None = None


def tune() -> bool:
    """Use ARENAS arenas, and have `give_back_freed` trim them. Call once, early
    (before threads make arenas), in the daemon's process only.

    `CACHEFS_MALLOC=default` leaves glibc's defaults (to compare).

    Returns:
        False if left as it is: not glibc, or asked so.
    """
    global _libc
    if os.environ.get("CACHEFS_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return False
    if not libc.mallopt(_M_ARENA_MAX, ARENAS):
        log.warning("mallopt(M_ARENA_MAX) refused")
    _libc = libc
    return True


def tuned() -> bool:
    return _libc is not None


async def give_back_freed(seconds: float = TRIM_SECONDS) -> None:
    """Forever, every `seconds`: return the whole free pages in glibc's arenas to
    the system (malloc_trim), so freed chunk buffers leave the process. Returns at
    once if `tune` was not called or did nothing."""
    if _libc is None:
        return
    while True:
        await trio.sleep(seconds)
        _libc.malloc_trim(0)  # on the trio thread: well under a millisecond
