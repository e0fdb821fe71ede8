"""The chunk hot path: cachefs._purepy and cachefs._native must agree exactly.

Every test runs against both modules, imported directly, so the fallback is
tested even where the extension is built.
"""

import os
import random
import struct
import subprocess
import sys

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs import _purepy
from cachefs.errors import ChunkCorrupt

try:
    from cachefs import _native
except ImportError:
    _native = None

NOT_BUILT = "cachefs._native is not built (run: pip install -e . --no-build-isolation)"
IMPLS = [
    pytest.param(_purepy, id="purepy"),
    pytest.param(_native, id="native", marks=pytest.mark.skipif(_native is None, reason=NOT_BUILT)),
]
needs_native = pytest.mark.skipif(_native is None, reason=NOT_BUILT)

KEY = xxhash.xxh3_128_digest(b"bucket/object\0etag-1\0chunk 7")
OTHER_KEY = xxhash.xxh3_128_digest(b"bucket/object\0etag-2\0chunk 7")
MiB = 1 << 20


def make_file(impl, data, key=KEY, block_size=None) -> bytes:
    """What the disk cache writes with os.writev: header, then data."""
    if block_size is None:
        return impl.seal_chunk(key, data) + bytes(data)
    return impl.seal_chunk(key, data, block_size) + bytes(data)


def payload(size: int) -> bytes:
    # Non-repeating bytes, so a misplaced offset or block cannot go unnoticed.
    return random.Random(size).randbytes(size)


def block_sums(data, block_size):
    """Reference: xxh3_64 of each block_size slice, the last one maybe short."""
    view = memoryview(data)
    return [xxhash.xxh3_64_intdigest(view[i : i + block_size]) for i in range(0, len(view), block_size)]


def expected_header(data, block_size, key=KEY) -> bytes:
    sums = block_sums(data, block_size)
    fixed = struct.pack("<4sHHQII16s", b"CFCH", 2, 0, len(data), block_size, len(sums), key)
    return fixed + struct.pack(f"<{len(sums)}Q", *sums)


# --- header format and round trip -------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_names(impl):
    assert impl.HEADER_SIZE == 40
    assert impl.BLOCK_SIZE == 128 << 10
    assert impl.MAGIC == b"CFCH" and impl.VERSION == 2 and impl.KEY_DIGEST_SIZE == 16
    for name in impl.__all__:
        assert hasattr(impl, name)
    assert sorted(impl.__all__) == sorted(_purepy.__all__)


@pytest.mark.parametrize("impl", IMPLS)
def test_header_size(impl):
    bs = impl.BLOCK_SIZE
    assert impl.header_size(0) == 40
    assert impl.header_size(1) == 48
    assert impl.header_size(bs) == 48
    assert impl.header_size(bs + 1) == 56
    assert impl.header_size(4 * MiB) == 40 + 8 * 32
    assert impl.header_size(64 * MiB) == 40 + 8 * 512  # fits the 8 KiB head read_layout documents
    assert impl.header_size(4 * MiB, 4096) == 40 + 8 * 1024
    assert impl.header_size(4 * MiB + 1, MiB) == 40 + 8 * 5
    assert impl.header_size(0, 4096) == 40
    for size in (0, 1, 4095, 4096, 4097, 3 * 4096 + 5):
        for block_size in (4096, 8192, bs):
            assert impl.header_size(size, block_size) == len(impl.seal_chunk(KEY, bytes(size), block_size))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [0, 1, 1000, 128 << 10, (128 << 10) + 1, 2 * (128 << 10) + 7])
def test_header_layout(impl, size):
    data = payload(size)
    header = impl.seal_chunk(KEY, data)
    assert type(header) is bytes
    assert header == expected_header(data, 128 << 10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_size", [4096, MiB])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 4 * MiB, 4 * MiB + 100])
def test_block_sizes(impl, block_size, size):
    data = payload(size)
    header = impl.seal_chunk(KEY, data, block_size)
    assert header == expected_header(data, block_size)
    assert len(header) == impl.header_size(size, block_size)
    file = header + data
    assert impl.open_chunk(KEY, file) == data
    length, got_block_size, offset, sums = impl.read_layout(KEY, file[: len(header)], len(file))
    assert (length, got_block_size, offset) == (size, block_size, len(header))
    assert sums == block_sums(data, block_size)
    impl.verify_blocks(sums, block_size, 0, data)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_size", [0, 1, 2048, 4095, 4097, 3 * 4096, (64 << 20) + 1, 128 << 20, 1 << 70, -4096])
def test_bad_block_size_is_a_caller_bug(impl, block_size):
    with pytest.raises(ValueError, match=rf"^block_size must be a power of two from 4K to 64M, got {block_size}$"):
        impl.seal_chunk(KEY, payload(10), block_size)


@pytest.mark.parametrize("impl", IMPLS)
def test_largest_block_size(impl):
    data = payload(100)
    header = impl.seal_chunk(KEY, data, 64 << 20)
    assert impl.read_layout(KEY, header, len(header) + 100)[:3] == (100, 64 << 20, 48)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [0, 1, 4 * MiB])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_round_trip(impl, size, kind):
    data = payload(size)
    header = impl.seal_chunk(KEY, kind(data))
    assert len(header) == impl.header_size(size)
    view = impl.open_chunk(KEY, kind(header + data))
    assert isinstance(view, memoryview)
    assert view.format == "B" and view.ndim == 1
    assert view.nbytes == size
    assert view == data


@pytest.mark.parametrize("impl", IMPLS)
def test_checksum_accepts_any_buffer(impl):
    data = payload(4097)
    expected = xxhash.xxh3_64_intdigest(data)
    for buf in (data, bytearray(data), memoryview(data), memoryview(data)[0:]):
        assert impl.checksum(buf) == expected
    assert impl.checksum(memoryview(b"xx" + data)[2:]) == expected
    assert impl.checksum(b"") == xxhash.xxh3_64_intdigest(b"")


@pytest.mark.parametrize("impl", IMPLS)
def test_seal_chunk_accepts_any_buffer(impl):
    data = payload(10000)
    expected = expected_header(data, 4096)
    for buf in (data, bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        assert impl.seal_chunk(KEY, buf, 4096) == expected
    # A non-byte format is hashed as its bytes.
    assert impl.seal_chunk(KEY, memoryview(data[:8000]).cast("Q"), 4096) == expected_header(data[:8000], 4096)


@pytest.mark.parametrize("impl", IMPLS)
def test_open_chunk_is_zero_copy(impl):
    offset = impl.header_size(100)
    buf = bytearray(make_file(impl, payload(100)))
    view = impl.open_chunk(KEY, buf)
    assert view.obj is buf
    buf[offset] ^= 0xFF
    assert view[0] == buf[offset]

    ro = make_file(impl, payload(100))
    view = impl.open_chunk(KEY, ro)
    assert view.obj is ro and view.readonly

    # A slice of a larger buffer (e.g. one mmap or read into a pool) works too.
    big = bytearray(b"junk" + ro + b"junk")
    view = impl.open_chunk(KEY, memoryview(big)[4:-4])
    assert view.obj is big and view == payload(100)

    # Several blocks: still one view of the caller's memory.
    data = payload(3 * 4096 + 1)
    many = bytearray(make_file(impl, data, block_size=4096))
    view = impl.open_chunk(KEY, many)
    assert view.obj is many and view == data
    assert view.nbytes == len(data)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_key_digest_size_is_a_caller_bug(impl):
    data = payload(10)
    file = make_file(impl, data)
    with pytest.raises(ValueError, match="^key_digest must be 16 bytes, got 15$"):
        impl.seal_chunk(KEY[:15], data)
    with pytest.raises(ValueError, match="^key_digest must be 16 bytes, got 17$"):
        impl.open_chunk(KEY + b"x", file)
    with pytest.raises(ValueError, match="^key_digest must be 16 bytes, got 0$"):
        impl.read_layout(b"", file, len(file))


# --- corruption ---------------------------------------------------------------


def flip(buf: bytes, pos: int, bits: int = 0x01) -> bytes:
    damaged = bytearray(buf)
    damaged[pos] ^= bits
    return bytes(damaged)


BS = 128 << 10  # the default block size
SIZE = 2 * BS + BS // 2  # three blocks, the last one short: 0x50000 bytes
HDR = 40 + 3 * 8
assert SIZE == 0x50000

# Where the damage is caught: "layout" by read_layout (header and size alone),
# "blocks" only by checking the data (open_chunk, verify_blocks).
CORRUPTIONS = {
    "byte in first block": (lambda f: flip(f, HDR + 10), "blocks", r"^checksum mismatch in block 0$"),
    "byte in middle block": (lambda f: flip(f, HDR + BS + BS // 2), "blocks", r"^checksum mismatch in block 1$"),
    "first byte of last block": (lambda f: flip(f, HDR + 2 * BS), "blocks", r"^checksum mismatch in block 2$"),
    "last byte of last block": (lambda f: flip(f, len(f) - 1), "blocks", r"^checksum mismatch in block 2$"),
    "checksum table, first byte": (lambda f: flip(f, 40), "blocks", r"^checksum mismatch in block 0$"),
    "checksum table, last byte": (lambda f: flip(f, HDR - 1), "blocks", r"^checksum mismatch in block 2$"),
    "blocks swapped": (
        lambda f: f[:HDR] + f[HDR + BS : HDR + 2 * BS] + f[HDR : HDR + BS] + f[HDR + 2 * BS :],
        "blocks",
        r"^checksum mismatch in block 0$",
    ),
    "magic flipped": (lambda f: flip(f, 0), "layout", r"^bad magic$"),
    "version changed": (lambda f: flip(f, 4), "layout", r"^unsupported version 3$"),
    "version 1 header": (lambda f: flip(f, 4, 0x03), "layout", r"^unsupported version 1$"),
    "flags set": (lambda f: flip(f, 6), "layout", r"^unknown flags 0x1$"),
    "length off by one": (lambda f: flip(f, 8), "layout", rf"^truncated: header says {SIZE + 1} bytes, file has {SIZE}$"),
    "length with another block count": (lambda f: flip(f, 10), "layout", r"^3 block checksums for 262144 bytes$"),
    "block size not a power of two": (lambda f: flip(f, 16), "layout", r"^bad block size 131073$"),
    "block size zero": (lambda f: flip(f, 18, 0x02), "layout", r"^bad block size 0$"),
    "block size halved": (lambda f: flip(f, 18, 0x03), "layout", rf"^3 block checksums for {SIZE} bytes$"),
    "block size too large": (lambda f: flip(f, 19, 0x80), "layout", rf"^bad block size {0x80020000}$"),
    "block count changed": (lambda f: flip(f, 20), "layout", rf"^2 block checksums for {SIZE} bytes$"),
    "stored key flipped": (lambda f: flip(f, 39), "layout", r"^key mismatch$"),
    "truncated by 1": (lambda f: f[:-1], "layout", rf"^truncated: header says {SIZE} bytes, file has {SIZE - 1}$"),
    "extended by 1": (lambda f: f + b"\0", "layout", rf"^extended: header says {SIZE} bytes, file has {SIZE + 1}$"),
    "data missing": (lambda f: f[:HDR], "layout", rf"^truncated: header says {SIZE} bytes, file has 0$"),
    "checksum table cut": (lambda f: f[:44], "layout", rf"^truncated: header says {SIZE} bytes, file has 0$"),
    "shorter than fixed header": (lambda f: f[:39], "layout", r"^truncated: file has 39 bytes, header needs 40$"),
    "empty file": (lambda f: b"", "layout", r"^truncated: file has 0 bytes, header needs 40$"),
}
LAYOUT = {name: c for name, c in CORRUPTIONS.items() if c[1] == "layout"}
BLOCKS = {name: c for name, c in CORRUPTIONS.items() if c[1] == "blocks"}


@pytest.fixture(scope="module")
def good_file():
    file = _purepy.seal_chunk(KEY, payload(SIZE)) + payload(SIZE)
    assert len(file) == HDR + SIZE
    return file


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("damage, where, reason", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corruption_is_detected(impl, good_file, damage, where, reason):
    damaged = damage(good_file)
    with pytest.raises(ChunkCorrupt, match=reason):
        impl.open_chunk(KEY, damaged)
    with pytest.raises(ChunkCorrupt, match=reason):
        impl.open_chunk(KEY, bytearray(damaged))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("damage, where, reason", LAYOUT.values(), ids=LAYOUT.keys())
def test_read_layout_rejects_a_bad_header(impl, good_file, damage, where, reason):
    damaged = damage(good_file)
    # The whole file, or just a fixed-size first read of it.
    for head in (damaged, damaged[:8192], damaged[:HDR]):
        with pytest.raises(ChunkCorrupt, match=reason):
            impl.read_layout(KEY, head, len(damaged))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("damage, where, reason", BLOCKS.values(), ids=BLOCKS.keys())
def test_verify_blocks_rejects_bad_data(impl, good_file, damage, where, reason):
    damaged = damage(good_file)
    length, block_size, offset, sums = impl.read_layout(KEY, damaged[:8192], len(damaged))
    assert (length, block_size, offset) == (SIZE, BS, HDR)
    with pytest.raises(ChunkCorrupt, match=reason):
        impl.verify_blocks(sums, block_size, 0, memoryview(damaged)[offset:])


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_key_digest(impl, good_file):
    with pytest.raises(ChunkCorrupt, match="^key mismatch$"):
        impl.open_chunk(OTHER_KEY, good_file)
    with pytest.raises(ChunkCorrupt, match="^key mismatch$"):
        impl.read_layout(OTHER_KEY, good_file[:HDR], len(good_file))


@pytest.mark.parametrize("impl", IMPLS)
def test_every_fixed_header_bit_is_checked(impl):
    good = make_file(impl, payload(5000), block_size=4096)
    for pos in range(impl.HEADER_SIZE):
        for bit in range(8):
            damaged = flip(good, pos, 1 << bit)
            with pytest.raises(ChunkCorrupt):
                impl.open_chunk(KEY, damaged)
            # The fixed header alone is enough to catch it.
            with pytest.raises(ChunkCorrupt):
                impl.read_layout(KEY, damaged, len(damaged))


@pytest.mark.parametrize("impl", IMPLS)
def test_every_checksum_table_bit_is_checked(impl):
    data = payload(5000)
    good = make_file(impl, data, block_size=4096)
    table = range(impl.HEADER_SIZE, impl.header_size(len(data), 4096))
    assert len(table) == 16
    for pos in table:
        block = (pos - impl.HEADER_SIZE) // 8
        for bit in range(8):
            damaged = flip(good, pos, 1 << bit)
            with pytest.raises(ChunkCorrupt, match=f"^checksum mismatch in block {block}$"):
                impl.open_chunk(KEY, damaged)
            _, _, offset, sums = impl.read_layout(KEY, damaged, len(damaged))
            with pytest.raises(ChunkCorrupt, match=f"^checksum mismatch in block {block}$"):
                impl.verify_blocks(sums, 4096, block, data[block * 4096 :])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size, block_size", [(3, None), (2 * 4096 + 1, 4096)])
def test_every_short_file_is_rejected(impl, size, block_size):
    good = make_file(impl, payload(size), block_size=block_size)
    for n in range(len(good)):
        with pytest.raises(ChunkCorrupt, match="^truncated: "):
            impl.open_chunk(KEY, good[:n])


def _failed_open(impl, buf):
    impl.open_chunk(KEY, buf)


def _failed_layout(impl, buf):
    impl.read_layout(KEY, buf, len(buf))


def _failed_verify(impl, buf):
    impl.verify_blocks([0] * 8, 4096, 0, buf)


@pytest.mark.parametrize(
    "impl",
    [
        pytest.param(_purepy, id="purepy"),
        pytest.param(_native, id="native", marks=pytest.mark.skipif(_native is None, reason=NOT_BUILT)),
    ],
)
@pytest.mark.parametrize(
    "call, key, damage, reason",
    [
        (_failed_open, OTHER_KEY, None, "^key mismatch$"),
        (_failed_open, KEY, -1, "^checksum mismatch in block 0$"),
        (_failed_open, KEY, "cut", "^truncated: "),
        (_failed_layout, OTHER_KEY, None, "^key mismatch$"),
        (_failed_verify, KEY, None, "^checksum mismatch in block 0$"),
    ],
    ids=["open-key", "open-checksum", "open-truncated", "read_layout", "verify_blocks"],
)
def test_failed_check_does_not_pin_the_buffer(impl, call, key, damage, reason):
    # A caller that reuses a bytearray must be able to resize it after a miss.
    buf = bytearray(make_file(impl, payload(SIZE // 64), key=key))
    if damage == "cut":
        del buf[-1:]
    elif damage is not None:
        buf[damage] ^= 1
    with pytest.raises(ChunkCorrupt, match=reason) as excinfo:
        call(impl, buf)
    # excinfo still holds the traceback, and with it the failed call's frame.
    buf.extend(b"more")
    assert excinfo.value is not None


# --- read_layout and verify_blocks ---------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_read_layout(impl, kind):
    data = payload(SIZE)
    file = make_file(impl, data)
    for head in (file[:HDR], file[:8192], file):
        layout = impl.read_layout(KEY, kind(head), len(file))
        assert layout == (SIZE, BS, HDR, block_sums(data, BS))
        assert type(layout) is tuple and type(layout[3]) is list
        assert all(type(x) is int for x in (*layout[:3], *layout[3]))


@pytest.mark.parametrize("impl", IMPLS)
def test_read_layout_of_an_empty_chunk(impl):
    file = make_file(impl, b"")
    assert impl.read_layout(KEY, file, 40) == (0, BS, 40, [])
    impl.verify_blocks([], BS, 0, b"")
    assert impl.open_chunk(KEY, file) == b""


@pytest.mark.parametrize("impl", IMPLS)
def test_read_layout_head_covers_64_mib(impl):
    # 8 KiB, one small read, holds the header of a 64 MiB chunk in 128 KiB blocks.
    data = bytes(64 * MiB)
    file_size = impl.header_size(len(data)) + len(data)
    head = impl.seal_chunk(KEY, data)
    assert len(head) <= 8192
    length, block_size, offset, sums = impl.read_layout(KEY, head + bytes(8192 - len(head)), file_size)
    assert (length, block_size, offset, len(sums)) == (64 * MiB, BS, 40 + 8 * 512, 512)
    assert set(sums) == {xxhash.xxh3_64_intdigest(bytes(BS))}


@pytest.mark.parametrize("impl", IMPLS)
def test_read_layout_needs_the_whole_header(impl, good_file):
    # The file is fine; the caller read too little of it.
    for n in range(impl.HEADER_SIZE, HDR):
        with pytest.raises(ValueError, match=rf"^read_layout needs the first {HDR} bytes, got {n}$"):
            impl.read_layout(KEY, good_file[:n], len(good_file))
    assert impl.read_layout(KEY, good_file[:HDR], len(good_file))[2] == HDR


BLOCK_RUN_SIZE = 5 * 4096 + 100  # six blocks of 4 KiB, the last one 100 bytes


@pytest.fixture(scope="module")
def small_blocks():
    data = payload(BLOCK_RUN_SIZE)
    sums = _purepy.read_layout(KEY, _purepy.seal_chunk(KEY, data, 4096), 40 + 6 * 8 + len(data))[3]
    assert len(sums) == 6
    return data, sums


def runs(n_blocks):
    return [(first, last) for first in range(n_blocks) for last in range(first, n_blocks)]


@pytest.mark.parametrize("impl", IMPLS)
def test_verify_blocks_accepts_any_run(impl, small_blocks):
    data, sums = small_blocks
    for first, last in runs(6):
        run = data[first * 4096 : (last + 1) * 4096]
        assert impl.verify_blocks(sums, 4096, first, run) is None
        assert impl.verify_blocks(sums, 4096, first, memoryview(data)[first * 4096 : (last + 1) * 4096]) is None
        impl.verify_blocks(sums, 4096, first, bytearray(run))
    # Nothing to check is fine too.
    impl.verify_blocks(sums, 4096, 0, b"")
    impl.verify_blocks(sums, 4096, 5, b"")


@pytest.mark.parametrize("impl", IMPLS)
def test_verify_blocks_rejects_a_flip_in_any_covered_block(impl, small_blocks):
    data, sums = small_blocks
    for first, last in runs(6):
        run = data[first * 4096 : (last + 1) * 4096]
        for block in range(first, last + 1):
            lo = (block - first) * 4096
            hi = min(lo + 4096, len(run))
            for pos in (lo, (lo + hi) // 2, hi - 1):
                with pytest.raises(ChunkCorrupt, match=f"^checksum mismatch in block {block}$"):
                    impl.verify_blocks(sums, 4096, first, flip(run, pos))


@pytest.mark.parametrize("impl", IMPLS)
def test_verify_blocks_rejects_misplaced_runs(impl, small_blocks):
    data, sums = small_blocks
    # The right bytes checked against another block's checksum.
    with pytest.raises(ChunkCorrupt, match="^checksum mismatch in block 1$"):
        impl.verify_blocks(sums, 4096, 1, data[:4096])
    # A short tail that is not the chunk's tail.
    with pytest.raises(ChunkCorrupt, match="^checksum mismatch in block 2$"):
        impl.verify_blocks(sums, 4096, 2, data[2 * 4096 : 2 * 4096 + 100])
    # A tail one byte too long or short.
    with pytest.raises(ChunkCorrupt, match="^checksum mismatch in block 5$"):
        impl.verify_blocks(sums, 4096, 5, data[5 * 4096 :] + b"\0")
    with pytest.raises(ChunkCorrupt, match="^checksum mismatch in block 5$"):
        impl.verify_blocks(sums, 4096, 5, data[5 * 4096 : -1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "first, lo, hi, extra, reason",
    [
        # Two blocks' worth of data starting at the last block.
        (5, 4 * 4096, None, b"", r"^blocks 5\.\.6 past the last \(5\)$"),
        # Anything at all after the last block.
        (6, 0, 0, b"x", r"^blocks 6\.\.6 past the last \(5\)$"),
        (6, 0, 0, bytes(4096), r"^blocks 6\.\.6 past the last \(5\)$"),
        # A whole extra block after the real tail.
        (4, 4 * 4096, None, bytes(4096), r"^blocks 4\.\.6 past the last \(5\)$"),
        (0, 0, None, bytes(4096), r"^blocks 0\.\.6 past the last \(5\)$"),
        (-1, 0, 4096, b"", r"^blocks -1\.\.-1 past the last \(5\)$"),
        (1 << 40, 5 * 4096, None, b"", rf"^blocks {1 << 40}\.\.{1 << 40} past the last \(5\)$"),
    ],
)
def test_verify_blocks_rejects_runs_past_the_last_block(impl, small_blocks, first, lo, hi, extra, reason):
    data, sums = small_blocks
    run = data[lo:hi] + extra
    with pytest.raises(ChunkCorrupt, match=reason):
        impl.verify_blocks(sums, 4096, first, run)


@pytest.mark.parametrize("impl", IMPLS)
def test_read_a_range_of_a_chunk(impl):
    """What a reader does for a 4 KiB read: header, then the 128 KiB around it."""
    data = payload(4 * MiB)
    file = make_file(impl, data)
    length, block_size, offset, sums = impl.read_layout(KEY, file[:8192], len(file))
    want = 3 * MiB + 5000
    block = want // block_size
    got = memoryview(file)[offset + block * block_size : offset + (block + 1) * block_size]
    impl.verify_blocks(sums, block_size, block, got)
    assert got[want % block_size] == data[want]
    with pytest.raises(ChunkCorrupt, match=f"^checksum mismatch in block {block}$"):
        impl.verify_blocks(sums, block_size, block, flip(bytes(got), 7))


# --- chunk_spans --------------------------------------------------------------


def spans_by_bytes(offset, size, file_size, chunk_size):
    """Reference: group every byte read by its chunk. Only for small inputs."""
    spans = {}
    for pos in range(offset, min(offset + size, file_size)):
        index, within = divmod(pos, chunk_size)
        first, _ = spans.get(index, (within, within))
        spans[index] = (first, within + 1)
    return [(index, start, end) for index, (start, end) in spans.items()]


def spans_by_intervals(offset, size, file_size, chunk_size):
    """Reference: intersect [offset, end) with each chunk's byte range."""
    end = min(offset + size, file_size)
    if end <= offset:
        return []
    spans = []
    for index in range(offset // chunk_size, (end - 1) // chunk_size + 1):
        lo, hi = index * chunk_size, (index + 1) * chunk_size
        spans.append((index, max(offset, lo) - lo, min(end, hi) - lo))
    return spans


@pytest.mark.parametrize("impl", IMPLS)
@given(
    offset=st.integers(0, 300),
    size=st.integers(0, 300),
    file_size=st.integers(0, 300),
    chunk_size=st.integers(1, 64),
)
def test_chunk_spans_small(impl, offset, size, file_size, chunk_size):
    expected = spans_by_bytes(offset, size, file_size, chunk_size)
    assert impl.chunk_spans(offset, size, file_size, chunk_size) == expected


@st.composite
def big_reads(draw):
    chunk_size = draw(st.one_of(st.sampled_from([4096, 1 * MiB, 4 * MiB, 8 * MiB]), st.integers(1, 1 << 24)))
    offset = draw(st.integers(0, 1 << 50))
    size = draw(st.integers(0, 40 * chunk_size))
    # Half the files end inside or right at the read, so EOF cases are common.
    file_size = draw(
        st.one_of(
            st.integers(0, 1 << 50),
            st.integers(max(0, offset - chunk_size), offset + size + chunk_size),
            st.just(offset),
            st.just(offset + size),
        )
    )
    return offset, size, file_size, chunk_size


@pytest.mark.parametrize("impl", IMPLS)
@given(read=big_reads())
def test_chunk_spans_large(impl, read):
    offset, size, file_size, chunk_size = read
    spans = impl.chunk_spans(*read)
    assert spans == spans_by_intervals(*read)
    # The spans cover exactly the clamped read.
    assert sum(end - start for _, start, end in spans) == max(0, min(offset + size, file_size) - offset)
    for index, start, end in spans:
        assert 0 <= start < end <= chunk_size
        assert type(index) is int and type(start) is int and type(end) is int


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_spans_examples(impl):
    spans = impl.chunk_spans
    assert spans(0, 10, 100, 4) == [(0, 0, 4), (1, 0, 4), (2, 0, 2)]
    assert spans(5, 3, 100, 4) == [(1, 1, 4)]
    assert spans(5, 2, 100, 4) == [(1, 1, 3)]
    assert spans(3, 2, 100, 4) == [(0, 3, 4), (1, 0, 1)]
    assert spans(0, 0, 100, 4) == []  # size 0
    assert spans(100, 10, 100, 4) == []  # at EOF
    assert spans(150, 10, 100, 4) == []  # past EOF
    assert spans(0, 10, 0, 4) == []  # empty file
    assert spans(98, 10, 100, 4) == [(24, 2, 4)]  # clamped at EOF
    assert spans(95, 10, 101, 4) == [(23, 3, 4), (24, 0, 4), (25, 0, 1)]
    # Near the int64 limit, offset + size must not overflow.
    big = (1 << 63) - 1
    assert spans(big - 5, big, big, 1 << 20) == [(big >> 20, (1 << 20) - 6, (1 << 20) - 1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "args", [(-1, 1, 10, 4), (0, -1, 10, 4), (0, 1, -1, 4), (0, 1, 10, 0), (0, 1, 10, -4)]
)
def test_chunk_spans_rejects_bad_values(impl, args):
    with pytest.raises(ValueError):
        impl.chunk_spans(*args)


# --- assemble -----------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_assemble(impl):
    chunk = memoryview(payload(300))
    assert impl.assemble([]) == b""
    part = chunk[10:20]
    assert impl.assemble([part]) is part
    parts = [chunk[0:100], memoryview(bytearray(b"xyz")), b"", chunk[250:300]]
    out = impl.assemble(parts)
    assert type(out) is bytes
    assert out == b"".join(parts)
    three = [chunk[0:1], chunk[1:200], chunk[200:]]
    assert impl.assemble(three) == bytes(chunk)
    assert impl.assemble([b"", b""]) == b""


@pytest.mark.parametrize("impl", IMPLS)
def test_assemble_rejects_non_buffers(impl):
    with pytest.raises(TypeError):
        impl.assemble([b"a", "b"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [0, 1, 4096, 4 * MiB + 3])
def test_empty_buffer_is_a_writable_bytearray_of_that_size(impl, size):
    buf = impl.empty_buffer(size)
    assert type(buf) is bytearray and len(buf) == size
    data = payload(size)
    memoryview(buf)[:] = data
    assert buf == data


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_buffer_rejects_a_negative_size(impl):
    with pytest.raises(ValueError):
        impl.empty_buffer(-1)


# --- both implementations agree -------------------------------------------------


def outcome(fn, *args):
    """The result, or the exception type and message, for comparing implementations."""
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - any difference must show up
        return ("raised", type(e), str(e))
    if isinstance(result, memoryview):
        return ("view", bytes(result))
    return ("value", result)


@st.composite
def chunk_data(draw):
    # Sizes around the 4 KiB block edges, with bytes from a seeded RNG: fast
    # to draw and never repeating, unlike st.binary at these sizes.
    size = draw(st.one_of(st.integers(0, 64), st.integers(0, 6 * 4096 + 10), st.sampled_from([4095, 4096, 4097, 8192])))
    return random.Random(draw(st.integers(0, 2**32))).randbytes(size)


DAMAGE = st.one_of(
    st.none(),
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20)),
    st.tuples(st.just("add"), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("word"), st.sampled_from([8, 16, 20]), st.integers(0, 2**32 - 1)),
)


def damaged_file(file: bytes, damage) -> bytes:
    file = bytearray(file)
    if damage is None:
        pass
    elif damage[0] == "flip":
        file[damage[1] % len(file)] ^= damage[2]
    elif damage[0] == "cut":
        del file[damage[1] % len(file) :]
    elif damage[0] == "add":
        file += damage[1]
    else:  # overwrite the low 32 bits of the length, block size or block count
        struct.pack_into("<I", file, damage[1], damage[2])
    return bytes(file)


@needs_native
@settings(max_examples=300)
@given(
    data=chunk_data(),
    key=st.binary(min_size=16, max_size=16),
    block_size=st.sampled_from([4096, 8192, 128 << 10]),
    damage=DAMAGE,
    open_key=st.one_of(st.none(), st.binary(min_size=16, max_size=16)),
    head_len=st.one_of(st.none(), st.integers(0, 200)),
)
def test_implementations_agree_on_chunks(data, key, block_size, damage, open_key, head_len):
    header = _purepy.seal_chunk(key, data, block_size)
    assert _native.seal_chunk(key, data, block_size) == header
    assert _native.header_size(len(data), block_size) == _purepy.header_size(len(data), block_size) == len(header)
    assert _native.checksum(data) == _purepy.checksum(data)
    file = damaged_file(header + data, damage)
    check_key = key if open_key is None else open_key
    py = outcome(_purepy.open_chunk, check_key, file)
    assert outcome(_native.open_chunk, check_key, file) == py
    assert outcome(_native.open_chunk, check_key, bytearray(file)) == py
    if damage is None and open_key is None:
        assert py == ("view", data)
    head = file if head_len is None else file[:head_len]
    py_layout = outcome(_purepy.read_layout, check_key, head, len(file))
    assert outcome(_native.read_layout, check_key, head, len(file)) == py_layout
    if damage is None and open_key is None and head_len is None:
        assert py_layout == ("value", (len(data), block_size, len(header), block_sums(data, block_size)))


@needs_native
@settings(max_examples=300)
@given(
    data=chunk_data(),
    block_size=st.sampled_from([4096, 8192]),
    first=st.integers(-2, 9),
    start=st.integers(0, 7 * 4096),
    length=st.integers(0, 7 * 4096),
    flip_at=st.one_of(st.none(), st.integers(0, 7 * 4096)),
    extra=st.binary(max_size=4),
)
def test_implementations_agree_on_blocks(data, block_size, first, start, length, flip_at, extra):
    sums = block_sums(data, block_size)
    run = bytearray(data[start : start + length] + extra)
    if flip_at is not None and run:
        run[flip_at % len(run)] ^= 0x40
    py = outcome(_purepy.verify_blocks, sums, block_size, first, bytes(run))
    assert outcome(_native.verify_blocks, sums, block_size, first, bytes(run)) == py
    assert outcome(_native.verify_blocks, tuple(sums), block_size, first, memoryview(run)) == py


@needs_native
@given(length=st.integers(-(1 << 40), 1 << 40), block_size=st.one_of(st.integers(-(1 << 30), 1 << 30), st.sampled_from([4096, 1 << 17, 1 << 26, 1 << 27])))
def test_implementations_agree_on_sizes(length, block_size):
    assert outcome(_native.header_size, length, block_size) == outcome(_purepy.header_size, length, block_size)
    assert outcome(_native.seal_chunk, KEY, b"abc", block_size) == outcome(_purepy.seal_chunk, KEY, b"abc", block_size)


@needs_native
@given(
    offset=st.integers(-5, 1 << 62),
    size=st.integers(-5, 1 << 62),
    file_size=st.integers(-5, 1 << 62),
    chunk_size=st.integers(-5, 1 << 30),
)
def test_implementations_agree_on_spans(offset, size, file_size, chunk_size):
    if chunk_size > 0 and size // chunk_size > 1000:
        size = size % (1000 * chunk_size)  # keep the span lists small
    args = (offset, size, file_size, chunk_size)
    assert outcome(_native.chunk_spans, *args) == outcome(_purepy.chunk_spans, *args)


@needs_native
@given(parts=st.lists(st.binary(max_size=100), max_size=6))
def test_implementations_agree_on_assemble(parts):
    views = [memoryview(p) for p in parts]
    py, c = _purepy.assemble(views), _native.assemble(views)
    assert bytes(c) == bytes(py) == b"".join(parts)
    assert type(c) is type(py)


# --- hotpath selection ----------------------------------------------------------


def implementation_in_subprocess(env_value):
    env = {k: v for k, v in os.environ.items() if k != "CACHEFS_PUREPYTHON"}
    if env_value is not None:
        env["CACHEFS_PUREPYTHON"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", "import cachefs.hotpath as h; print(h.IMPLEMENTATION)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_hotpath_honours_purepython_env():
    assert implementation_in_subprocess("1") == "purepy"


@needs_native
def test_hotpath_prefers_native():
    assert implementation_in_subprocess(None) == "native"
    assert implementation_in_subprocess("0") == "native"


def test_hotpath_reexports_the_chosen_module():
    from cachefs import hotpath

    impl = _native if hotpath.IMPLEMENTATION == "native" else _purepy
    assert hotpath.IMPLEMENTATION in ("native", "purepy")
    for name in impl.__all__:
        assert getattr(hotpath, name) is getattr(impl, name)
    assert "IMPLEMENTATION" in hotpath.__all__


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_size", [0, -4096, 3000, 1 << 30])
def test_verify_blocks_refuses_a_bad_block_size(impl, block_size):
    """A nonsense block size is a caller bug: never a check that passes on nothing."""
    with pytest.raises(ValueError, match="block_size"):
        impl.verify_blocks([0] * 4, block_size, 0, b"x" * 4096)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_short_head_is_the_callers_bug_not_a_corrupt_file(impl):
    """Too few bytes read must not make a caller delete a good chunk file."""
    file = impl.seal_chunk(KEY, b"y" * 10_000) + b"y" * 10_000
    with pytest.raises(ValueError, match="needs the first 40 bytes"):
        impl.read_layout(KEY, file[:20], len(file))
