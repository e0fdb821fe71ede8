# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled hot path (cachefs._native); same names and behaviour as cachefs._purepy.

Headers are packed and parsed with byte-wise little-endian loads and stores
on the buffer (the compiler turns them into single moves), so no struct
objects or temporary tuples are built per chunk. The checksum calls
xxhash's Python function to avoid a second C dependency; for 4 MiB chunks
that call is the cost that matters anyway.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint16_t, uint64_t
from libc.string cimport memcmp, memcpy

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

# Offsets in the <4sHHQQ16s header.
cdef enum:
    _OFF_VERSION = 4
    _OFF_FLAGS = 6
    _OFF_LENGTH = 8
    _OFF_DIGEST = 16
    _OFF_KEY = 24
    _HEADER_SIZE = 40
    _KEY_SIZE = 16

MAGIC = b"CFCH"
VERSION = 1
KEY_DIGEST_SIZE = _KEY_SIZE
HEADER_SIZE = _HEADER_SIZE

_xxh3_64 = xxhash.xxh3_64_intdigest


cdef inline uint16_t _load16(const unsigned char* p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef inline uint64_t _load64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(7, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline void _store16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void _store64(unsigned char* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF


def checksum(data):
    """xxh3_64 of a buffer (bytes, bytearray, memoryview); returns an int."""
    return _xxh3_64(data)


cdef bytes _key_bytes(key_digest):
    # A wrong-sized digest is a caller bug, not a corrupt chunk.
    if len(key_digest) != _KEY_SIZE:
        raise ValueError(f"key_digest must be {_KEY_SIZE} bytes, got {len(key_digest)}")
    return bytes(key_digest)


def seal_chunk(key_digest, data):
    """Return the 40-byte header for ``data``; see cachefs._purepy.seal_chunk."""
    cdef bytes key = _key_bytes(key_digest)
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    cdef uint64_t length = view.len
    PyBuffer_Release(&view)
    cdef uint64_t digest = _xxh3_64(data)
    cdef bytes header = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(header)
    memcpy(p, b"CFCH", 4)
    _store16(p + _OFF_VERSION, 1)
    _store16(p + _OFF_FLAGS, 0)
    _store64(p + _OFF_LENGTH, length)
    _store64(p + _OFF_DIGEST, digest)
    memcpy(p + _OFF_KEY, <const char*>key, _KEY_SIZE)
    return header


cdef object _problem(const unsigned char* p, Py_ssize_t size, const char* key, object view):
    """Return why the file at ``p`` is not a valid chunk for ``key``, or None."""
    if size < _HEADER_SIZE:
        return f"truncated: file has {size} bytes, header needs {_HEADER_SIZE}"
    if memcmp(p, b"CFCH", 4) != 0:
        return "bad magic"
    cdef uint16_t version = _load16(p + _OFF_VERSION)
    if version != 1:
        return f"unsupported version {version}"
    cdef uint16_t flags = _load16(p + _OFF_FLAGS)
    if flags != 0:
        return f"unknown flags {flags:#x}"
    cdef uint64_t length = _load64(p + _OFF_LENGTH)
    cdef uint64_t have = size - _HEADER_SIZE
    if length != have:
        what = "truncated" if have < length else "extended"
        return f"{what}: header says {length} bytes, file has {have}"
    if memcmp(p + _OFF_KEY, key, _KEY_SIZE) != 0:
        return "key mismatch"
    cdef uint64_t digest = _load64(p + _OFF_DIGEST)
    if <uint64_t>_xxh3_64(view[_HEADER_SIZE:]) != digest:
        return "checksum mismatch"
    return None


def open_chunk(key_digest, buf):
    """Validate a chunk file and return a zero-copy view of its data.

    See cachefs._purepy.open_chunk; raises ChunkCorrupt with the same reasons.
    """
    cdef bytes key = _key_bytes(key_digest)
    view = memoryview(buf).cast("B")
    cdef Py_buffer pb
    PyObject_GetBuffer(view, &pb, PyBUF_SIMPLE)
    try:
        problem = _problem(<const unsigned char*>pb.buf, pb.len, <const char*>key, view)
    finally:
        PyBuffer_Release(&pb)
    if problem is not None:
        # The traceback would keep the view alive and a bytearray un-resizable.
        view.release()
        raise ChunkCorrupt(problem)
    return view[_HEADER_SIZE:]


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
