"""How the C heap hands out and takes back chunk buffers.

Measured in the soak (64 MiB --mem-size, 256 KiB chunks, 100 readers): a mount at
250 MiB RSS had 182 MiB in glibc's arenas of which only 85 MiB were in use; the
other 96 MiB were freed chunk buffers glibc kept. glibc serves a block of 128 KiB
or more with its own mmap until the first such block is freed; then it raises
that threshold above the block (up to 32 MiB), so every later chunk buffer is cut
from an arena (one per thread that allocated it, up to 8 per core), and freed
ones stay there, fragmented, for good. A fixed threshold keeps every chunk buffer
in its own mapping, which free() returns to the system at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# The smallest --chunk-size: every chunk buffer is mapped on its own whatever the size.
MAP_FROM = 64 << 10
# Fewer arenas, less memory parked in them: the threads that allocate are I/O
# threads, which do not contend for the heap.
ARENAS = 2


def return_chunk_buffers() -> bool:
    """Have glibc map each block of MAP_FROM bytes or more on its own and unmap it
    when freed. Call once, early: arenas made before keep what they hold.

    `CACHEFS_MALLOC=default` leaves glibc's defaults (to compare).

    Returns:
        False if left as it is: there is no mallopt (not glibc), or asked so.
    """
    if os.environ.get("CACHEFS_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MAP_FROM)) and bool(mallopt(_M_ARENA_MAX, ARENAS))
    if not ok:
        log.warning("mallopt refused; freed chunk buffers may stay in the heap")
    return ok
