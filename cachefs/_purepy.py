"""Pure-Python hot path: chunk headers, checksums, read splitting, assembly.

native/_native.pyx (compiled as cachefs._native) exports the same names with
the same behaviour; import them from cachefs.hotpath, which picks one.

A chunk file is a header followed by the chunk data. The header is a fixed
part, struct ``<4sHHQII16s``: magic b"CFCH", format version, flags (0;
reserved for compression), data length, block size, block count and the
16-byte digest of the chunk key (so a file renamed or swapped on disk is
caught too); then one little-endian u64 xxh3_64 per block of the data. Per-block
checksums let a read of 4 KiB verify 128 KiB, not the whole chunk.
"""

import struct

import xxhash

from cachefs.errors import ChunkCorrupt

__all__ = [
    "HEADER_SIZE",
    "BLOCK_SIZE",
    "MAGIC",
    "VERSION",
    "KEY_DIGEST_SIZE",
    "checksum",
    "header_size",
    "seal_chunk",
    "open_chunk",
    "read_layout",
    "verify_blocks",
    "chunk_spans",
    "assemble",
    "empty_buffer",
]

MAGIC = b"CFCH"
VERSION = 2
KEY_DIGEST_SIZE = 16
BLOCK_SIZE = 128 << 10
_HEADER = struct.Struct("<4sHHQII16s")
HEADER_SIZE = _HEADER.size  # the fixed part; the block checksums follow it
assert HEADER_SIZE == 40
_MIN_BLOCK = 4096
_MAX_BLOCK = 64 << 20

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


def _check_block_size(block_size: int) -> None:
    if not _MIN_BLOCK <= block_size <= _MAX_BLOCK or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two from 4K to 64M, got {block_size}")


def header_size(length: int, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of header (fixed part and checksums) before `length` bytes of data."""
    return HEADER_SIZE + 8 * (-(-length // block_size))


def seal_chunk(key_digest: bytes, data, block_size: int = BLOCK_SIZE) -> bytes:
    """Build the header for a chunk file.

    The caller writes the header and ``data`` with os.writev, so the data is
    never copied into a joined buffer.

    Args:
      key_digest: 16-byte digest of the chunk key.
      data: the chunk data (any C-contiguous buffer).
      block_size: bytes covered by each checksum; a power of two from 4K to 64M.

    Returns:
      The header_size(len(data), block_size)-byte header.

    Raises:
      ValueError: key_digest is not 16 bytes, or a bad block_size.
    """
    _check_key_digest(key_digest)
    _check_block_size(block_size)
    with memoryview(data) as view:
        view = view.cast("B")
        length = view.nbytes
        sums = [_xxh3_64(view[i : i + block_size]) for i in range(0, length, block_size)]
    fixed = _HEADER.pack(MAGIC, VERSION, 0, length, block_size, len(sums), bytes(key_digest))
    return fixed + struct.pack(f"<{len(sums)}Q", *sums)


def read_layout(key_digest: bytes, head, file_size: int) -> tuple:
    """Check a chunk file's header against its key and size, without its data.

    Args:
      key_digest: 16-byte digest of the expected chunk key.
      head: the file's first bytes: at least its whole header (header_size of
        the data length; 8 KiB always covers a 64 MiB chunk in 128 KiB blocks).
      file_size: the file's size.

    Returns:
      (data length, block size, data offset, list of block checksums).

    Raises:
      ChunkCorrupt: short file, bad magic, version or flags, a length that does
        not match the file, a bad block size or count, another key's chunk.
      ValueError: key_digest is not 16 bytes.
    """
    _check_key_digest(key_digest)
    with memoryview(head) as outer, outer.cast("B") as view:
        if file_size < HEADER_SIZE:
            raise ChunkCorrupt(f"truncated: file has {file_size} bytes, header needs {HEADER_SIZE}")
        if len(view) < HEADER_SIZE:
            raise ValueError(f"read_layout needs the first {HEADER_SIZE} bytes, got {len(view)}")
        magic, version, flags, length, block_size, n_blocks, key = _HEADER.unpack_from(view)
        if magic != MAGIC:
            raise ChunkCorrupt("bad magic")
        if version != VERSION:
            raise ChunkCorrupt(f"unsupported version {version}")
        if flags != 0:
            raise ChunkCorrupt(f"unknown flags {flags:#x}")
        if not _MIN_BLOCK <= block_size <= _MAX_BLOCK or block_size & (block_size - 1):
            raise ChunkCorrupt(f"bad block size {block_size}")
        if n_blocks != -(-length // block_size):
            raise ChunkCorrupt(f"{n_blocks} block checksums for {length} bytes")
        offset = HEADER_SIZE + 8 * n_blocks
        have = file_size - offset
        if length != have:
            what = "truncated" if have < length else "extended"
            raise ChunkCorrupt(f"{what}: header says {length} bytes, file has {max(have, 0)}")
        if key != bytes(key_digest):
            raise ChunkCorrupt("key mismatch")
        if len(view) < offset:
            raise ValueError(f"read_layout needs the first {offset} bytes, got {len(view)}")
        sums = list(struct.unpack_from(f"<{n_blocks}Q", view, HEADER_SIZE))
    return length, block_size, offset, sums


def verify_blocks(sums, block_size: int, first_block: int, data) -> None:
    """Check consecutive blocks of a chunk's data against their checksums.

    Args:
      sums: the block checksums from read_layout.
      block_size: the chunk's block size.
      first_block: index of the block ``data`` starts with.
      data: whole blocks, the last one possibly the chunk's short tail.

    Raises:
      ChunkCorrupt: a block does not match, or ``data`` runs past the last block.
      ValueError: a bad block_size.
    """
    _check_block_size(block_size)
    with memoryview(data) as outer, outer.cast("B") as view:
        n = -(-len(view) // block_size)
        if first_block < 0 or first_block + n > len(sums):
            raise ChunkCorrupt(f"blocks {first_block}..{first_block + n - 1} past the last ({len(sums) - 1})")
        for i in range(n):
            if _xxh3_64(view[i * block_size : (i + 1) * block_size]) != sums[first_block + i]:
                raise ChunkCorrupt(f"checksum mismatch in block {first_block + i}")


def open_chunk(key_digest: bytes, buf) -> memoryview:
    """Validate a whole chunk file and return its data without copying.

    Args:
      key_digest: 16-byte digest of the expected chunk key.
      buf: the whole file (bytes, bytearray, memoryview).

    Returns:
      A memoryview of the data part that shares memory with ``buf``.

    Raises:
      ChunkCorrupt: as read_layout, or a block that fails its checksum.
      ValueError: key_digest is not 16 bytes.
    """
    view = memoryview(buf).cast("B")
    data = None
    try:
        _, block_size, offset, sums = read_layout(key_digest, view, len(view))
        data = view[offset:]
        verify_blocks(sums, block_size, 0, data)
    except ChunkCorrupt:
        # The traceback would keep the views alive and a bytearray un-resizable.
        if data is not None:
            data.release()
        view.release()
        raise
    return data


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


def empty_buffer(size: int) -> bytearray:
    """A bytearray of `size` bytes for a receive to fill; its contents are undefined
    (here zeroed: Python has no way to skip that)."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    return bytearray(size)
