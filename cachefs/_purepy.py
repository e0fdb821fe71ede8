"""Pure-Python hot path: chunk headers, checksums, read splitting, assembly.

native/_native.pyx (compiled as cachefs._native) exports the same names with
the same behaviour; import them from cachefs.hotpath, which picks one.

A chunk file is a 40-byte header followed by the chunk data. The header is
struct ``<4sHHQQ16s``: magic b"CFCH", format version, flags (0; reserved for
compression), data length, xxh3_64 of the data, and the 16-byte xxh3_128
digest of the chunk key, so a file renamed or swapped on disk is caught too.
"""

import struct

import xxhash

from cachefs.errors import ChunkCorrupt

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "KEY_DIGEST_SIZE",
    "checksum",
    "seal_chunk",
    "open_chunk",
    "chunk_spans",
    "assemble",
]

MAGIC = b"CFCH"
VERSION = 1
KEY_DIGEST_SIZE = 16
_HEADER = struct.Struct("<4sHHQQ16s")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 40

_xxh3_64 = xxhash.xxh3_64_intdigest


def checksum(data) -> int:
    """xxh3_64 of a buffer.

    Args:
      data: bytes, bytearray, memoryview or any C-contiguous buffer.

    Returns:
      The 64-bit digest as an int.
    """
    return _xxh3_64(data)


def _check_key_digest(key_digest) -> None:
    # A wrong-sized digest is a caller bug, not a corrupt chunk.
    if len(key_digest) != KEY_DIGEST_SIZE:
        raise ValueError(f"key_digest must be {KEY_DIGEST_SIZE} bytes, got {len(key_digest)}")


def seal_chunk(key_digest: bytes, data) -> bytes:
    """Build the header for a chunk file.

    The caller writes the header and ``data`` with os.writev, so the data is
    never copied into a joined buffer.

    Args:
      key_digest: 16-byte xxh3_128 digest of the chunk key.
      data: the chunk data (any C-contiguous buffer).

    Returns:
      The HEADER_SIZE-byte header.

    Raises:
      ValueError: key_digest is not 16 bytes.
    """
    _check_key_digest(key_digest)
    with memoryview(data) as view:
        length = view.nbytes
    return _HEADER.pack(MAGIC, VERSION, 0, length, _xxh3_64(data), bytes(key_digest))


def _problem(key_digest, view: memoryview):
    """Return why ``view`` is not a valid chunk file for ``key_digest``, or None."""
    size = len(view)
    if size < HEADER_SIZE:
        return f"truncated: file has {size} bytes, header needs {HEADER_SIZE}"
    magic, version, flags, length, digest, key = _HEADER.unpack_from(view)
    if magic != MAGIC:
        return "bad magic"
    if version != VERSION:
        return f"unsupported version {version}"
    if flags != 0:
        return f"unknown flags {flags:#x}"
    have = size - HEADER_SIZE
    if length != have:
        what = "truncated" if have < length else "extended"
        return f"{what}: header says {length} bytes, file has {have}"
    if key != key_digest:
        return "key mismatch"
    if _xxh3_64(view[HEADER_SIZE:]) != digest:
        return "checksum mismatch"
    return None


def open_chunk(key_digest: bytes, buf) -> memoryview:
    """Validate a whole chunk file and return its data without copying.

    Args:
      key_digest: 16-byte xxh3_128 digest of the expected chunk key.
      buf: the whole file (bytes, bytearray, memoryview).

    Returns:
      A memoryview of the data part that shares memory with ``buf``.

    Raises:
      ChunkCorrupt: short file, bad magic, version or flags, a length that
        does not match the file, another key's chunk, or a bad checksum.
      ValueError: key_digest is not 16 bytes.
    """
    _check_key_digest(key_digest)
    view = memoryview(buf).cast("B")
    problem = _problem(bytes(key_digest), view)
    if problem is not None:
        # The traceback would keep the view alive and a bytearray un-resizable.
        view.release()
        raise ChunkCorrupt(problem)
    return view[HEADER_SIZE:]


def chunk_spans(offset: int, size: int, file_size: int, chunk_size: int) -> list:
    """Split a read into per-chunk spans.

    Args:
      offset: first byte of the read.
      size: number of bytes requested.
      file_size: the file's size; the read is clamped to it.
      chunk_size: bytes per chunk.

    Returns:
      ``[(chunk_index, start_in_chunk, end_in_chunk), ...]`` in file order,
      end exclusive; empty for size 0 or a read at or after EOF.

    Raises:
      ValueError: negative offset, size or file_size, or chunk_size <= 0.
    """
    if offset < 0 or size < 0 or file_size < 0:
        raise ValueError(f"negative offset/size/file_size: {offset}, {size}, {file_size}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    end = min(offset + size, file_size)
    spans = []
    pos = offset
    while pos < end:
        index, start = divmod(pos, chunk_size)
        stop = min(chunk_size, end - index * chunk_size)
        spans.append((index, start, stop))
        pos += stop - start
    return spans


def assemble(parts):
    """Concatenate buffers with at most one copy.

    Args:
      parts: a list of buffers (usually memoryview slices of chunks).

    Returns:
      b"" for no parts, the part itself for one (zero copy), else new bytes.
    """
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)
