"""The chunk hot path: cachefs._purepy and cachefs._native must agree exactly.

Every test runs against both modules, imported directly, so the fallback is
tested even where the extension is built.
"""

import os
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


def make_file(impl, data, key=KEY) -> bytes:
    """What the disk cache writes with os.writev: header, then data."""
    return impl.seal_chunk(key, data) + bytes(data)


def payload(size: int) -> bytes:
    # Non-repeating bytes, so a misplaced offset cannot go unnoticed.
    return (xxhash.xxh3_128_digest(b"seed") * (size // 16 + 1))[:size]


# --- header format and round trip -------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_names(impl):
    assert impl.HEADER_SIZE == 40
    assert impl.MAGIC == b"CFCH" and impl.VERSION == 1 and impl.KEY_DIGEST_SIZE == 16
    for name in impl.__all__:
        assert hasattr(impl, name)
    assert sorted(impl.__all__) == sorted(_purepy.__all__)


@pytest.mark.parametrize("impl", IMPLS)
def test_header_layout(impl):
    data = payload(1000)
    header = impl.seal_chunk(KEY, data)
    assert type(header) is bytes
    expected = struct.pack("<4sHHQQ16s", b"CFCH", 1, 0, 1000, xxhash.xxh3_64_intdigest(data), KEY)
    assert header == expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [0, 1, 4 * MiB])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_round_trip(impl, size, kind):
    data = payload(size)
    header = impl.seal_chunk(KEY, kind(data))
    assert len(header) == impl.HEADER_SIZE
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
def test_open_chunk_is_zero_copy(impl):
    buf = bytearray(make_file(impl, payload(100)))
    view = impl.open_chunk(KEY, buf)
    assert view.obj is buf
    buf[impl.HEADER_SIZE] ^= 0xFF
    assert view[0] == buf[impl.HEADER_SIZE]

    ro = make_file(impl, payload(100))
    view = impl.open_chunk(KEY, ro)
    assert view.obj is ro and view.readonly

    # A slice of a larger buffer (e.g. one mmap or read into a pool) works too.
    big = bytearray(b"junk" + ro + b"junk")
    view = impl.open_chunk(KEY, memoryview(big)[4:-4])
    assert view.obj is big and view == payload(100)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_key_digest_size_is_a_caller_bug(impl):
    data = payload(10)
    with pytest.raises(ValueError, match="16 bytes"):
        impl.seal_chunk(KEY[:15], data)
    with pytest.raises(ValueError, match="16 bytes"):
        impl.open_chunk(KEY + b"x", make_file(impl, data))


# --- corruption ---------------------------------------------------------------


def flip(buf: bytes, pos: int) -> bytes:
    damaged = bytearray(buf)
    damaged[pos] ^= 0x01
    return bytes(damaged)


SIZE = 4096
CORRUPTIONS = {
    "data byte flipped": (lambda f: flip(f, 40 + SIZE // 2), r"^checksum mismatch$"),
    "last data byte flipped": (lambda f: flip(f, len(f) - 1), r"^checksum mismatch$"),
    "magic flipped": (lambda f: flip(f, 0), r"^bad magic$"),
    "version changed": (lambda f: flip(f, 4), r"^unsupported version 0$"),
    "flags set": (lambda f: flip(f, 6), r"^unknown flags 0x1$"),
    "length changed": (lambda f: flip(f, 8), r"^truncated: header says 4097 bytes, file has 4096$"),
    "stored checksum flipped": (lambda f: flip(f, 16), r"^checksum mismatch$"),
    "stored key flipped": (lambda f: flip(f, 39), r"^key mismatch$"),
    "truncated by 1": (lambda f: f[:-1], r"^truncated: header says 4096 bytes, file has 4095$"),
    "extended by 1": (lambda f: f + b"\0", r"^extended: header says 4096 bytes, file has 4097$"),
    "data missing": (lambda f: f[:40], r"^truncated: header says 4096 bytes, file has 0$"),
    "shorter than header": (lambda f: f[:39], r"^truncated: file has 39 bytes, header needs 40$"),
    "empty file": (lambda f: b"", r"^truncated: file has 0 bytes, header needs 40$"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("damage, reason", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corruption_is_detected(impl, damage, reason):
    damaged = damage(make_file(impl, payload(SIZE)))
    with pytest.raises(ChunkCorrupt, match=reason):
        impl.open_chunk(KEY, damaged)


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_key_digest(impl):
    with pytest.raises(ChunkCorrupt, match="^key mismatch$"):
        impl.open_chunk(OTHER_KEY, make_file(impl, payload(SIZE)))


@pytest.mark.parametrize("impl", IMPLS)
def test_every_header_byte_is_checked(impl):
    good = make_file(impl, payload(SIZE))
    for pos in range(impl.HEADER_SIZE):
        for bit in range(8):
            damaged = bytearray(good)
            damaged[pos] ^= 1 << bit
            with pytest.raises(ChunkCorrupt):
                impl.open_chunk(KEY, damaged)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_short_file_is_rejected(impl):
    good = make_file(impl, payload(3))
    for n in range(len(good)):
        with pytest.raises(ChunkCorrupt, match="^truncated: "):
            impl.open_chunk(KEY, good[:n])


@pytest.mark.parametrize("impl", IMPLS)
def test_failed_open_does_not_pin_the_buffer(impl):
    # A caller that reuses a bytearray must be able to resize it after a miss.
    buf = bytearray(make_file(impl, payload(SIZE), key=OTHER_KEY))
    with pytest.raises(ChunkCorrupt, match="key mismatch") as excinfo:
        impl.open_chunk(KEY, buf)
    # excinfo still holds the traceback, and with it the failed call's frame.
    buf.extend(b"more")
    assert excinfo.value is not None


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


@needs_native
@settings(max_examples=300)
@given(
    data=st.binary(max_size=2000),
    key=st.binary(min_size=16, max_size=16),
    damage=st.one_of(
        st.none(),
        st.tuples(st.just("flip"), st.integers(0, 2039), st.integers(1, 255)),
        st.tuples(st.just("cut"), st.integers(0, 2040)),
        st.tuples(st.just("add"), st.binary(min_size=1, max_size=8)),
    ),
    open_key=st.one_of(st.none(), st.binary(min_size=16, max_size=16)),
)
def test_implementations_agree_on_chunks(data, key, damage, open_key):
    header = _purepy.seal_chunk(key, data)
    assert _native.seal_chunk(key, data) == header
    assert _native.checksum(data) == _purepy.checksum(data)
    file = bytearray(header + data)
    if damage is not None and damage[0] == "flip":
        file[damage[1] % len(file)] ^= damage[2]
    elif damage is not None and damage[0] == "cut":
        del file[damage[1] % len(file) :]
    elif damage is not None:
        file += damage[1]
    check_key = key if open_key is None else open_key
    py = outcome(_purepy.open_chunk, check_key, bytes(file))
    assert outcome(_native.open_chunk, check_key, bytes(file)) == py
    if damage is None and open_key is None:
        assert py == ("view", data)


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
