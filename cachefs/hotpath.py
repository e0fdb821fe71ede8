"""The chunk hot path: cachefs._native if built, else cachefs._purepy.

Set CACHEFS_PUREPYTHON=1 to force the pure-Python version (tests run both;
it also rules the extension out when debugging), like msgpack's
MSGPACK_PUREPYTHON. Both modules export the same names with the same
behaviour; IMPLEMENTATION says which one is in use: "native" or "purepy".
"""

import os


def _load():
    if os.environ.get("CACHEFS_PUREPYTHON", "") not in ("", "0"):
        from cachefs import _purepy

        return _purepy, "purepy"
    try:
        from cachefs import _native
    except ImportError:
        # Not built (no compiler, or a source checkout): same API, slower.
        from cachefs import _purepy

        return _purepy, "purepy"
    return _native, "native"


_impl, IMPLEMENTATION = _load()

HEADER_SIZE = _impl.HEADER_SIZE
BLOCK_SIZE = _impl.BLOCK_SIZE
MAGIC = _impl.MAGIC
VERSION = _impl.VERSION
KEY_DIGEST_SIZE = _impl.KEY_DIGEST_SIZE
checksum = _impl.checksum
header_size = _impl.header_size
seal_chunk = _impl.seal_chunk
open_chunk = _impl.open_chunk
read_layout = _impl.read_layout
verify_blocks = _impl.verify_blocks
chunk_spans = _impl.chunk_spans
assemble = _impl.assemble
empty_buffer = _impl.empty_buffer

__all__ = [*_impl.__all__, "IMPLEMENTATION"]
