# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled hot path (cachefs._native); same names and behaviour as cachefs._purepy.

Headers are packed and parsed with byte-wise little-endian loads and stores
on the buffer (the compiler turns them into single moves), so no struct
objects or temporary tuples are built per chunk. The per-block checksum calls
xxhash's Python function on memoryview slices to avoid a second C dependency;
for 128 KiB blocks that call's overhead is small next to the hashing itself.

Every reason string, exception type and check order matches _purepy, so
tests can compare the two outcome for outcome. One difference is on purpose:
the memoryviews taken here are released before ChunkCorrupt is raised, and a
compiled frame keeps no locals, so a failed check never pins a bytearray.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

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

# Offsets in the fixed <4sHHQII16s part; the u64 block checksums follow it.
cdef enum:
    _OFF_VERSION = 4
    _OFF_FLAGS = 6
    _OFF_LENGTH = 8
    _OFF_BLOCK_SIZE = 16
    _OFF_BLOCKS = 20
    _OFF_KEY = 24
    _HEADER_SIZE = 40
    _KEY_SIZE = 16
    _VERSION = 2
    _MIN_BLOCK = 4096
    _MAX_BLOCK = 64 << 20
    _BLOCK_SIZE = 128 << 10

MAGIC = b"CFCH"
VERSION = _VERSION
KEY_DIGEST_SIZE = _KEY_SIZE
BLOCK_SIZE = _BLOCK_SIZE
HEADER_SIZE = _HEADER_SIZE

# A C-level reference skips the module dict lookup on every block.
cdef object _xxh3_64 = xxhash.xxh3_64_intdigest


cdef inline uint16_t _load16(const unsigned char* p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef inline uint32_t _load32(const unsigned char* p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t _load64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(7, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline void _store16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void _store32(unsigned char* p, uint32_t v) noexcept nogil:
    cdef int i
    for i in range(4):
        p[i] = (v >> (8 * i)) & 0xFF


cdef inline void _store64(unsigned char* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF


cdef inline bint _bad_block_size(uint64_t block_size) noexcept nogil:
    return block_size < _MIN_BLOCK or block_size > _MAX_BLOCK or (block_size & (block_size - 1)) != 0


cdef inline uint64_t _blocks(uint64_t length, uint64_t block_size) noexcept nogil:
    # Ceiling division that cannot overflow near 2**64.
    return length // block_size + (length % block_size != 0)


def checksum(data):
    """xxh3_64 of a buffer (bytes, bytearray, memoryview); returns an int."""
    return _xxh3_64(data)


cdef bytes _key_bytes(key_digest):
    # A wrong-sized digest is a caller bug, not a corrupt chunk.
    if len(key_digest) != _KEY_SIZE:
        raise ValueError(f"key_digest must be {_KEY_SIZE} bytes, got {len(key_digest)}")
    return bytes(key_digest)


cdef Py_ssize_t _block_size_arg(block_size) except -1:
    # Checked on the Python object, as _purepy does, so a huge int is a
    # ValueError and not an OverflowError.
    if not _MIN_BLOCK <= block_size <= _MAX_BLOCK or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two from 4K to 64M, got {block_size}")
    return block_size


def header_size(length, block_size=BLOCK_SIZE):
    """Bytes of header (fixed part and checksums) before `length` bytes of data."""
    return _HEADER_SIZE + 8 * (-(-length // block_size))


def seal_chunk(key_digest, data, block_size=BLOCK_SIZE):
    """Return the header_size(len(data), block_size)-byte header for ``data``.

    See cachefs._purepy.seal_chunk; raises ValueError for a key_digest that is
    not 16 bytes or a block_size that is not a power of two from 4K to 64M.
    """
    cdef bytes key = _key_bytes(key_digest)
    cdef Py_ssize_t bs = _block_size_arg(block_size)
    cdef Py_ssize_t length, n, i
    cdef bytes header
    cdef unsigned char* p
    with memoryview(data) as outer:
        view = outer.cast("B")
        try:
            length = view.nbytes
            n = <Py_ssize_t>_blocks(length, bs)
            if n > 0xFFFFFFFF:
                # _purepy's struct.pack fails the same way (after hashing).
                raise struct.error("'I' format requires 0 <= number <= 4294967295")
            header = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + 8 * n)
            p = <unsigned char*>PyBytes_AS_STRING(header)
            memcpy(p, b"CFCH", 4)
            _store16(p + _OFF_VERSION, _VERSION)
            _store16(p + _OFF_FLAGS, 0)
            _store64(p + _OFF_LENGTH, length)
            _store32(p + _OFF_BLOCK_SIZE, bs)
            _store32(p + _OFF_BLOCKS, n)
            memcpy(p + _OFF_KEY, <const char*>key, _KEY_SIZE)
            for i in range(n):
                _store64(p + _HEADER_SIZE + 8 * i, _xxh3_64(view[i * bs : (i + 1) * bs]))
        finally:
            view.release()
    return header


cdef object _layout_problem(
    const unsigned char* p,
    Py_ssize_t avail,
    long long file_size,
    const char* key,
    uint64_t* length_out,
    uint32_t* block_size_out,
    Py_ssize_t* offset_out,
):
    """Why the header at ``p`` does not describe ``key``'s chunk, or None.

    ``avail`` bytes of the file are at ``p``; the checks and reasons are
    _purepy.read_layout's, in the same order.
    """
    if file_size < _HEADER_SIZE or avail < _HEADER_SIZE:
        return f"truncated: file has {file_size} bytes, header needs {_HEADER_SIZE}"
    if memcmp(p, b"CFCH", 4) != 0:
        return "bad magic"
    cdef uint16_t version = _load16(p + _OFF_VERSION)
    if version != _VERSION:
        return f"unsupported version {version}"
    cdef uint16_t flags = _load16(p + _OFF_FLAGS)
    if flags != 0:
        return f"unknown flags {flags:#x}"
    cdef uint64_t length = _load64(p + _OFF_LENGTH)
    cdef uint32_t block_size = _load32(p + _OFF_BLOCK_SIZE)
    if _bad_block_size(block_size):
        return f"bad block size {block_size}"
    cdef uint32_t n_blocks = _load32(p + _OFF_BLOCKS)
    if n_blocks != _blocks(length, block_size):
        return f"{n_blocks} block checksums for {length} bytes"
    # At most 40 + 8 * (2**32 - 1): no overflow in 64 bits.
    cdef long long offset = _HEADER_SIZE + 8 * <long long>n_blocks
    cdef long long have = file_size - offset
    if have < 0 or <uint64_t>have != length:
        what = "truncated" if have < 0 or <uint64_t>have < length else "extended"
        return f"{what}: header says {length} bytes, file has {have if have > 0 else 0}"
    if memcmp(p + _OFF_KEY, key, _KEY_SIZE) != 0:
        return "key mismatch"
    length_out[0] = length
    block_size_out[0] = block_size
    offset_out[0] = offset
    return None


def read_layout(key_digest, head, long long file_size):
    """Check a chunk file's header against its key and size, without its data.

    See cachefs._purepy.read_layout. Returns (data length, block size, data
    offset, list of block checksums); raises ChunkCorrupt with the same
    reasons, and ValueError for a bad key_digest or a ``head`` shorter than
    the header.
    """
    cdef bytes key = _key_bytes(key_digest)
    cdef Py_buffer pb
    cdef const unsigned char* p
    cdef uint64_t length = 0
    cdef uint32_t block_size = 0
    cdef Py_ssize_t offset = 0, avail = 0, i
    cdef list sums = None
    view = memoryview(head).cast("B")
    if file_size >= _HEADER_SIZE and view.nbytes < _HEADER_SIZE:
        avail = view.nbytes
        view.release()
        # The caller read too little: its bug, not a corrupt chunk.
        raise ValueError(f"read_layout needs the first {_HEADER_SIZE} bytes, got {avail}")
    PyObject_GetBuffer(view, &pb, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>pb.buf
        avail = pb.len
        problem = _layout_problem(p, avail, file_size, key, &length, &block_size, &offset)
        if problem is None and avail >= offset:
            sums = [_load64(p + _HEADER_SIZE + 8 * i) for i in range((offset - _HEADER_SIZE) // 8)]
    finally:
        PyBuffer_Release(&pb)
        # Released here, so a raised error cannot keep ``head`` pinned.
        view.release()
    if problem is not None:
        raise ChunkCorrupt(problem)
    if sums is None:
        # The caller read too little: its bug, not a corrupt chunk.
        raise ValueError(f"read_layout needs the first {offset} bytes, got {avail}")
    return length, block_size, offset, sums


# sums is any sequence from the caller: index it with bounds checks, so a
# wrong range is an IndexError and never a read past a list's end.
@cython.boundscheck(True)
def verify_blocks(sums, Py_ssize_t block_size, Py_ssize_t first_block, data):
    """Check consecutive blocks of a chunk's data against their checksums.

    See cachefs._purepy.verify_blocks; raises ChunkCorrupt with the same
    reasons for a mismatch or ``data`` running past the last block.
    """
    cdef Py_ssize_t n, i, count
    if _bad_block_size(block_size) if block_size > 0 else True:
        raise ValueError(f"block_size must be a power of two from 4K to 64M, got {block_size}")
    problem = None
    view = memoryview(data).cast("B")
    try:
        n = -(-view.nbytes // block_size)
        count = len(sums)
        if first_block < 0 or first_block + n > count:
            problem = f"blocks {first_block}..{first_block + n - 1} past the last ({count - 1})"
        else:
            for i in range(n):
                if _xxh3_64(view[i * block_size : (i + 1) * block_size]) != sums[first_block + i]:
                    problem = f"checksum mismatch in block {first_block + i}"
                    break
    finally:
        view.release()
    if problem is not None:
        raise ChunkCorrupt(problem)


def open_chunk(key_digest, buf):
    """Validate a whole chunk file and return a zero-copy view of its data.

    See cachefs._purepy.open_chunk; raises ChunkCorrupt with the same reasons.
    """
    view = memoryview(buf).cast("B")
    cdef bytes key = _key_bytes(key_digest)
    cdef Py_buffer pb
    cdef const unsigned char* p
    cdef uint64_t length = 0
    cdef uint32_t block_size = 0
    cdef Py_ssize_t offset = 0, n, i, start, stop
    PyObject_GetBuffer(view, &pb, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>pb.buf
        problem = _layout_problem(p, pb.len, pb.len, key, &length, &block_size, &offset)
        if problem is None:
            n = (offset - _HEADER_SIZE) // 8
            for i in range(n):
                start = offset + i * block_size
                stop = start + block_size
                if stop > pb.len:
                    stop = pb.len
                if <uint64_t>_xxh3_64(view[start:stop]) != _load64(p + _HEADER_SIZE + 8 * i):
                    problem = f"checksum mismatch in block {i}"
                    break
    finally:
        PyBuffer_Release(&pb)
    if problem is not None:
        # The traceback would keep the view alive and a bytearray un-resizable.
        view.release()
        raise ChunkCorrupt(problem)
    return view[offset:]


@cython.cdivision(True)
def chunk_spans(long long offset, long long size, long long file_size, long long chunk_size):
    """Split a read into (chunk_index, start, end) spans; see cachefs._purepy."""
    if offset < 0 or size < 0 or file_size < 0:
        raise ValueError(f"negative offset/size/file_size: {offset}, {size}, {file_size}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # offset + size may overflow; file_size - offset cannot.
    cdef long long end = offset + size if size < file_size - offset else file_size
    cdef long long pos = offset, index, base, start, stop
    cdef list spans = []
    while pos < end:
        index = pos // chunk_size
        base = index * chunk_size
        start = pos - base
        stop = end - base
        if stop > chunk_size:
            stop = chunk_size
        spans.append((index, start, stop))
        pos = base + stop
    return spans


def assemble(parts):
    """Concatenate buffers: b"" for none, the part itself for one, else one copy."""
    cdef Py_ssize_t n = len(parts), i, got = 0, total = 0
    if n == 1:
        return parts[0]
    if n == 0:
        return b""
    cdef Py_buffer* views = <Py_buffer*>PyMem_Malloc(n * sizeof(Py_buffer))
    if views == NULL:
        raise MemoryError()
    cdef bytes out
    cdef char* dst
    try:
        # Hold every buffer until the copy ends so no part can change size.
        for i in range(n):
            PyObject_GetBuffer(parts[i], &views[i], PyBUF_SIMPLE)
            got += 1
            total += views[i].len
        out = PyBytes_FromStringAndSize(NULL, total)
        dst = PyBytes_AS_STRING(out)
        for i in range(n):
            memcpy(dst, views[i].buf, views[i].len)
            dst += views[i].len
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        PyMem_Free(views)
    return out


def empty_buffer(Py_ssize_t size):
    """A bytearray of `size` bytes for a receive to fill; its contents are undefined.

    Unlike bytearray(size) nothing is zeroed, so a fresh page is touched once,
    by the receive that fills it, and that happens with the GIL released (the
    zeroing pass would hold it).
    """
    if size < 0:
        raise ValueError(f"negative size {size}")
    return PyByteArray_FromStringAndSize(NULL, size)
