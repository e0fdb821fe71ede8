"""The peer wire format: frames, messages and handshake MACs, without sockets.

Everything a peer can send arrives as bytes, so the fuzz tests feed bytes: a
decoder must either return frames or raise ProtocolError, never anything else.
"""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.errors import CachefsError
from cachefs.peer import protocol
from cachefs.peer.protocol import (
    DEFAULT_MAX_PAYLOAD,
    ERROR_CODES,
    MAX_HEADER,
    MAX_STR,
    PROTOCOL_VERSION,
    AskSpace,
    Auth,
    ChunkData,
    ChunkError,
    FrameDecoder,
    GetChunk,
    Hello,
    LoadChunk,
    Loaded,
    ProtocolError,
    Ready,
    Space,
    encode_frame,
    hello_mac,
    parse_message,
    verify_mac,
)

# The hot path's users: run again with CACHEFS_PUREPYTHON=1 (scripts/test.sh).
pytestmark = pytest.mark.fallback

U64_MAX = (1 << 64) - 1


def frame_bytes(header: dict, payload: bytes = b"") -> bytes:
    prefix, body = encode_frame(header, payload)
    return prefix + bytes(body)


def raw_frame(header_bytes: bytes, payload: bytes = b"") -> bytes:
    """A frame around arbitrary header bytes, for malformed headers."""
    return struct.pack(">II", len(header_bytes), len(payload)) + header_bytes + payload


def decode_all(data: bytes, splits: list[int] = (), max_payload: int = DEFAULT_MAX_PAYLOAD) -> list[tuple[dict, bytes]]:
    """Feed `data` cut at `splits`, collecting every frame after each feed."""
    decoder = FrameDecoder(max_payload=max_payload)
    frames = []
    cuts = sorted({min(max(c, 0), len(data)) for c in splits} | {0, len(data)})
    for a, b in zip(cuts, cuts[1:]):
        decoder.feed(data[a:b])
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert decoder.buffered() == 0
    return frames


def bad_frame(header_bytes: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame(header_bytes))
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    # The stream is out of sync: the decoder stays failed.
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    with pytest.raises(ProtocolError):
        decoder.feed(frame_bytes(Ready().to_header()))


# -- strategies ----------------------------------------------------------------

u64 = st.integers(0, U64_MAX)
text = st.text(max_size=60) | st.text(min_size=MAX_STR, max_size=MAX_STR)
nonce = st.binary(min_size=protocol.NONCE_MIN, max_size=protocol.NONCE_MAX)
mac = st.binary(min_size=32, max_size=32)

messages = st.one_of(
    st.builds(Hello, version=u64, node=text, nonce=nonce, mac=st.none() | mac),
    st.builds(Auth, mac=mac),
    st.just(Ready()),
    st.builds(
        GetChunk, id=u64, source=text, path=text, version=text, size=u64, chunk_size=st.integers(1, U64_MAX), index=u64
    ),
    st.builds(ChunkData, id=u64, checksum=u64),
    st.builds(ChunkError, id=u64, code=st.sampled_from(sorted(ERROR_CODES)), message=text),
)
payloads = st.binary(max_size=3000)


# -- frames --------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages, payloads, st.lists(st.integers(0, 10_000), max_size=12))
def test_every_message_round_trips_through_random_splits(message, payload, splits):
    if isinstance(message, ChunkData):
        message = ChunkData(message.id, xxhash.xxh3_64_intdigest(payload))
    data = frame_bytes(message.to_header(), payload)
    [(header, got)] = decode_all(data, splits)
    assert parse_message(header) == message
    assert got == payload and type(got) is bytes


@settings(max_examples=100)
@given(st.lists(st.tuples(messages, payloads), min_size=1, max_size=20), st.lists(st.integers(0, 100_000), max_size=30))
def test_a_stream_of_frames_round_trips(items, splits):
    data = b"".join(frame_bytes(m.to_header(), p) for m, p in items)
    frames = decode_all(data, splits)
    assert [(parse_message(h), p) for h, p in frames] == items


def test_many_frames_in_one_feed():
    requests = [GetChunk(i, "s3://b/p", f"dir/f{i}", "etag:x", 1 << 30, 4 << 20, i) for i in range(2000)]
    decoder = FrameDecoder()
    decoder.feed(b"".join(frame_bytes(r.to_header(), bytes([i % 256]) * (i % 7)) for i, r in enumerate(requests)))
    got = []
    while (frame := decoder.next_frame()) is not None:
        got.append(frame)
    assert [parse_message(h) for h, _ in got] == requests
    assert [p for _, p in got] == [bytes([i % 256]) * (i % 7) for i in range(2000)]
    assert decoder.buffered() == 0 and decoder.next_frame() is None


def test_encode_frame_leaves_the_payload_alone():
    chunk = memoryview(bytearray(b"x" * 1000))
    prefix, body = encode_frame(ChunkData(1, 2).to_header(), chunk)
    assert body is chunk  # sent as is, never concatenated with the header
    assert struct.unpack(">II", prefix[:8]) == (len(prefix) - 8, 1000)
    prefix, body = encode_frame(Ready().to_header())
    assert body == b"" and struct.unpack(">II", prefix[:8])[1] == 0


def test_encode_frame_refuses_frames_a_receiver_would_reject():
    with pytest.raises(ProtocolError):
        encode_frame({"id": 1})
    with pytest.raises(ProtocolError):
        encode_frame({"t": 1})
    with pytest.raises(ProtocolError):
        encode_frame({"t": "get", "blob": b"x" * MAX_HEADER})


def test_a_truncated_frame_is_not_an_error():
    data = frame_bytes(GetChunk(1, "s", "p", "v", 10, 4, 2).to_header(), b"payload")
    for cut in range(len(data)):
        decoder = FrameDecoder()
        decoder.feed(data[:cut])
        assert decoder.next_frame() is None
        assert decoder.buffered() == cut
        decoder.feed(data[cut:])
        assert decoder.next_frame() is not None


@pytest.mark.parametrize(
    "header_len, payload_len, max_payload",
    [
        (0, 0, 100),
        (MAX_HEADER + 1, 0, 100),
        (0xFFFFFFFF, 0, 100),
        (10, 101, 100),
        (10, 0xFFFFFFFF, DEFAULT_MAX_PAYLOAD),
    ],
)
def test_oversized_lengths_are_rejected_from_the_prefix_alone(header_len, payload_len, max_payload):
    prefix = struct.pack(">II", header_len, payload_len)
    decoder = FrameDecoder(max_payload=max_payload)
    decoder.feed(prefix[:5])  # not yet a whole prefix: no verdict
    assert decoder.next_frame() is None
    with pytest.raises(ProtocolError):
        decoder.feed(prefix[5:])  # no body sent: the prefix is enough
    assert decoder.buffered() == 0  # and nothing of it was kept


def test_the_largest_allowed_frame_passes():
    header = {"t": "x", "pad": "a" * 1000}  # already a str16, so growing it keeps the overhead
    header["pad"] += "a" * (MAX_HEADER - len(msgpack.packb(header)))
    assert len(msgpack.packb(header)) == MAX_HEADER
    payload = b"p" * 1000
    [(got, data)] = decode_all(frame_bytes(header, payload), [3, 9, 500], max_payload=1000)
    assert got == header and data == payload


@pytest.mark.parametrize("max_payload", [-1, 1 << 32, 1.5, True])
def test_bad_max_payload(max_payload):
    with pytest.raises(ValueError):
        FrameDecoder(max_payload=max_payload)


@pytest.mark.parametrize(
    "header_bytes",
    [
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x82\xa1t\xa3get", id="truncated-map"),
        pytest.param(msgpack.packb({"t": "ready"}) + b"\x00", id="trailing-bytes"),
        pytest.param(msgpack.packb([1, 2]), id="array"),
        pytest.param(msgpack.packb("ready"), id="str"),
        pytest.param(msgpack.packb(None), id="nil"),
        pytest.param(msgpack.packb({1: "x", "t": "ready"}), id="int-key"),
        pytest.param(msgpack.packb({b"t": "ready"}, use_bin_type=True), id="bytes-key"),
        pytest.param(msgpack.packb({"id": 1}), id="no-t"),
        pytest.param(msgpack.packb({"t": 1}), id="int-t"),
        pytest.param(msgpack.packb({"t": b"ready"}, use_bin_type=True), id="bytes-t"),
        pytest.param(b"\x81\xa1t\xdd\xff\xff\xff\xff", id="huge-array-declared"),
        pytest.param(b"\x81\xa1t\xdf\xff\xff\xff\xff", id="huge-map-declared"),
        pytest.param(b"\x81\xa1t\xc6\xff\xff\xff\xff", id="huge-bin-declared"),
        pytest.param(b"\x81\xa1t\xdb\xff\xff\xff\xff", id="huge-str-declared"),
        pytest.param(msgpack.packb({"t": msgpack.ExtType(5, b"x")}), id="ext"),
        pytest.param(b"\x81\xa1t\xa2\xff\xfe", id="bad-utf8"),
        pytest.param(b"\x91" * 5000 + b"\xc0", id="deep-nesting"),
    ],
)
def test_malformed_headers_are_protocol_errors(header_bytes):
    bad_frame(header_bytes)


def test_a_small_header_cannot_allocate_a_large_object():
    # Nested arrays that each declare 65535 elements: msgpack allocates each list
    # before its elements arrive. With msgpack's default limits (derived from the
    # input length) this 64 KiB header peaked at 82 MB; with ours, 0.07 MB.
    header_bytes = b"\xdc\xff\xff" * 2000
    header_bytes += b"\x00" * (MAX_HEADER - len(header_bytes))
    decoder = FrameDecoder()
    decoder.feed(raw_frame(header_bytes))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decoder.next_frame()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_protocol_error_is_a_cachefs_error():
    assert issubclass(ProtocolError, CachefsError)


@settings(max_examples=1000)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_fuzz_random_bytes_yield_frames_or_protocol_error(data, splits):
    _feed_fuzz(data, splits)


@settings(max_examples=1000)
@given(st.integers(0, 300), st.integers(0, 64), st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=8))
def test_fuzz_plausible_prefixes_with_random_headers(header_len, payload_len, body, splits):
    # Random prefixes almost always declare huge lengths; these reach the msgpack checks.
    _feed_fuzz(struct.pack(">II", header_len, payload_len) + body, splits)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64_MAX)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500)
@given(values, st.sampled_from(sorted(protocol.MESSAGE_TYPES) + ["nope"]))
def test_fuzz_well_formed_frames_with_random_fields(value, t):
    header = value if isinstance(value, dict) else {"field": value}
    header = {**header, "t": t}
    try:
        frames = decode_all(frame_bytes(header))
    except ProtocolError:
        return
    for h, _ in frames:
        try:
            parse_message(h)
        except ProtocolError:
            pass


def _feed_fuzz(data: bytes, splits: list[int]) -> None:
    decoder = FrameDecoder(max_payload=1000)
    cuts = sorted({min(c, len(data)) for c in splits} | {0, len(data)})
    try:
        for a, b in zip(cuts, cuts[1:]):
            decoder.feed(data[a:b])
            while (frame := decoder.next_frame()) is not None:
                header, payload = frame
                assert isinstance(header, dict) and isinstance(header["t"], str)
                assert isinstance(payload, bytes)
                try:
                    parse_message(header)
                except ProtocolError:
                    pass
    except ProtocolError:
        pass


def test_many_tiny_feeds_keep_the_buffer_small():
    # One byte at a time through 3000 frames: the consumed front of the buffer
    # must be dropped as we go, or memory (and copying) grows with the stream.
    one = frame_bytes(GetChunk(7, "s", "p", "v", 100, 10, 3).to_header(), b"x" * 40)
    decoder = FrameDecoder()
    count = largest = 0
    for i in range(3000 * len(one)):
        decoder.feed(one[i % len(one) : i % len(one) + 1])
        if decoder.next_frame() is not None:
            count += 1
        largest = max(largest, len(decoder._buf))
    assert count == 3000
    assert largest <= len(one)


def test_a_buffer_that_never_drains_is_still_compacted():
    # Every feed completes one frame and starts the next, so the buffer is never
    # empty; the consumed front must still be dropped now and then.
    one = frame_bytes(ChunkData(1, 2).to_header(), b"y" * 1000)
    half = len(one) // 2
    decoder = FrameDecoder()
    decoder.feed(one[:half])
    largest = 0
    for _ in range(1000):  # about 1 MB through the decoder
        decoder.feed(one[half:] + one[:half])
        assert decoder.next_frame() == ({"t": "chunk", "id": 1, "checksum": 2}, b"y" * 1000)
        assert decoder.next_frame() is None
        largest = max(largest, len(decoder._buf))
    assert decoder.buffered() == half
    assert largest <= 2 * protocol._COMPACT_AT + 2 * len(one)


# -- messages ------------------------------------------------------------------

EXAMPLES = [
    Hello(PROTOCOL_VERSION, "10.0.0.5:7070", b"n" * 16),
    Hello(PROTOCOL_VERSION, "10.0.0.5:7070", b"n" * 64, b"m" * 32),
    Auth(b"m" * 32),
    Ready(),
    GetChunk(1, "s3://bucket/market", "2024/01/trades.parquet", "etag:abc", 1 << 30, 4 << 20, 5),
    ChunkData(1, U64_MAX),
    ChunkError(1, "refused", "source 's3://x' is not served here"),
    LoadChunk(2, "s3://bucket/market", "2024/01/trades.parquet", "etag:abc", 1 << 30, 4 << 20, 5),
    Loaded(2, True),
    AskSpace(3),
    Space(3, 1 << 40),
]
# One value of each msgpack type; a field given any type but its own must be rejected.
TYPE_VALUES = {
    "int": 1, "str": "x", "bytes": b"x" * 32, "float": 1.0, "bool": True, "nil": None, "list": [1], "map": {"a": 1},
}
FIELD_TYPES = {
    "version": "int", "node": "str", "nonce": "bytes", "mac": "bytes", "id": "int", "source": "str", "path": "str",
    "size": "int", "chunk_size": "int", "index": "int", "checksum": "int", "code": "str", "message": "str",
    "cached": "bool", "capacity": "int",
}


def _field_type(message, name: str) -> str:
    if isinstance(message, GetChunk) and name == "version":
        return "str"
    return FIELD_TYPES[name]


def test_message_headers_are_what_the_wire_says():
    assert GetChunk(1, "s", "p", "v", 10, 4, 2).to_header() == {
        "t": "get", "id": 1, "source": "s", "path": "p", "version": "v", "size": 10, "chunk_size": 4, "index": 2,
    }
    assert Hello(1, "n", b"x" * 16).to_header() == {"t": "hello", "version": 1, "node": "n", "nonce": b"x" * 16}
    assert "mac" in Hello(1, "n", b"x" * 16, b"m" * 32).to_header()
    assert ChunkData(3, 9).to_header() == {"t": "chunk", "id": 3, "checksum": 9}
    assert ChunkError(3, "busy", "later").to_header() == {"t": "err", "id": 3, "code": "busy", "message": "later"}
    assert Auth(b"m" * 32).to_header() == {"t": "auth", "mac": b"m" * 32}
    assert Ready().to_header() == {"t": "ready"}


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_field_is_checked(message):
    header = message.to_header()
    assert parse_message(header) == message
    assert parse_message({**header, "future": [1, 2]}) == message  # unknown extra fields are ignored
    for name, value in header.items():
        if name == "t":
            continue
        if not (isinstance(message, Hello) and name == "mac"):
            with pytest.raises(ProtocolError):
                parse_message({k: v for k, v in header.items() if k != name})
        kind = _field_type(message, name)
        for other_kind, wrong in TYPE_VALUES.items():
            if other_kind != kind:
                with pytest.raises(ProtocolError):
                    parse_message({**header, name: wrong})
        if kind == "int":
            for bad in (-1, -(1 << 63), 1 << 64):
                with pytest.raises(ProtocolError):
                    parse_message({**header, name: bad})
        if kind == "str" and name != "code":
            assert parse_message({**header, name: "é" * MAX_STR}) is not None
            with pytest.raises(ProtocolError):
                parse_message({**header, name: "x" * (MAX_STR + 1)})


@pytest.mark.parametrize(
    "header",
    [
        {"t": "hello", "version": 1, "node": "n", "nonce": b"x" * 15},
        {"t": "hello", "version": 1, "node": "n", "nonce": b"x" * 65},
        {"t": "hello", "version": 1, "node": "n", "nonce": b"x" * 16, "mac": b"m" * 31},
        {"t": "hello", "version": 1, "node": "n", "nonce": b"x" * 16, "mac": b"m" * 33},
        {"t": "hello", "version": 1, "node": "n", "nonce": b"x" * 16, "mac": None},
        {"t": "auth", "mac": b"m" * 16},
        {"t": "get", "id": 1, "source": "s", "path": "p", "version": "v", "size": 10, "chunk_size": 0, "index": 0},
        {"t": "err", "id": 1, "code": "oops", "message": ""},
        {"t": "nope"},
        {"t": ""},
        {"t": None},
        {},
        [("t", "ready")],
    ],
)
def test_invalid_messages(header):
    with pytest.raises(ProtocolError):
        parse_message(header)


def test_a_long_error_message_is_cut_so_the_frame_stays_valid():
    err = ChunkError(1, "unavailable", "x" * 100_000)
    assert len(err.message) == MAX_STR
    [(header, _)] = decode_all(frame_bytes(err.to_header()))
    assert parse_message(header) == err


# -- handshake MACs ------------------------------------------------------------

SECRET = b"correct horse battery staple"
NC, NS = b"c" * 16, b"s" * 32


def test_handshake_macs():
    server_mac = hello_mac(SECRET, "server", NS, NC)
    client_mac = hello_mac(SECRET, "client", NC, NS)
    assert len(server_mac) == len(client_mac) == protocol.MAC_SIZE
    # Each side recomputes what the other should have sent.
    assert verify_mac(hello_mac(SECRET, "server", NS, NC), server_mac)
    assert verify_mac(hello_mac(SECRET, "client", NC, NS), client_mac)
    # Wrong secret, in either direction.
    assert not verify_mac(hello_mac(b"wrong", "server", NS, NC), server_mac)
    assert not verify_mac(hello_mac(SECRET, "client", NC, NS), hello_mac(b"wrong", "client", NC, NS))
    # Reflection: the server's own MAC sent back as the client's Auth.
    assert not verify_mac(hello_mac(SECRET, "client", NC, NS), server_mac)
    # Swapped roles with the same nonces, and swapped nonces with the same role.
    assert not verify_mac(hello_mac(SECRET, "client", NS, NC), server_mac)
    assert not verify_mac(hello_mac(SECRET, "server", NC, NS), server_mac)
    # A different nonce from either side (a replayed handshake).
    assert not verify_mac(hello_mac(SECRET, "server", NS, b"d" * 16), server_mac)
    assert not verify_mac(hello_mac(SECRET, "server", b"t" * 32, NC), server_mac)


def test_verify_mac_rejects_non_bytes():
    expected = hello_mac(SECRET, "server", NS, NC)
    assert verify_mac(expected, bytearray(expected))
    for got in (None, expected.hex(), list(expected), 0, b""):
        assert not verify_mac(expected, got)


@pytest.mark.parametrize("secret, role", [(b"", "server"), (SECRET, "peer"), (SECRET, "Server")])
def test_hello_mac_refuses_bad_arguments(secret, role):
    with pytest.raises(ValueError):
        hello_mac(secret, role, NS, NC)


def test_a_full_handshake_through_frames():
    """Client and server, each with its own decoder, exchange the four handshake frames."""

    def run(client_secret: bytes, server_secret: bytes) -> tuple[bool, bool]:
        to_server, to_client = FrameDecoder(), FrameDecoder()
        to_server.feed(frame_bytes(Hello(PROTOCOL_VERSION, "mount-1", NC).to_header()))
        hello = parse_message(to_server.next_frame()[0])
        assert isinstance(hello, Hello) and hello.mac is None
        reply = Hello(PROTOCOL_VERSION, "worker-1", NS, hello_mac(server_secret, "server", NS, hello.nonce))
        to_client.feed(frame_bytes(reply.to_header()))
        got = parse_message(to_client.next_frame()[0])
        client_ok = verify_mac(hello_mac(client_secret, "server", got.nonce, NC), got.mac)
        to_server.feed(frame_bytes(Auth(hello_mac(client_secret, "client", NC, got.nonce)).to_header()))
        auth = parse_message(to_server.next_frame()[0])
        server_ok = verify_mac(hello_mac(server_secret, "client", hello.nonce, NS), auth.mac)
        return client_ok, server_ok

    assert run(SECRET, SECRET) == (True, True)
    assert run(SECRET, b"other") == (False, False)


@given(
    payload_len=st.integers(min_value=64 << 10, max_value=300 << 10),
    splits=st.lists(st.integers(min_value=1, max_value=100_000), min_size=1, max_size=30),
    into=st.lists(st.booleans(), min_size=1, max_size=30),
)
@settings(max_examples=40, deadline=None)
def test_large_payloads_received_in_place_match_fed_ones(payload_len, splits, into):
    """The zero-copy path (receive_buffer/received_into) and feed() mix freely and
    give the same frames as feeding everything."""
    payload = bytes(range(256)) * (payload_len // 256) + b"x" * (payload_len % 256)
    first = b"".join(encode_frame(ChunkData(1, 7).to_header(), payload))
    second = b"".join(encode_frame(ChunkData(2, 8).to_header(), b"tail"))
    wire = memoryview(first + second)
    dec = FrameDecoder(max_payload=1 << 20)
    frames, pos, i = [], 0, 0
    while pos < len(wire):
        size = splits[i % len(splits)]
        target = dec.receive_buffer() if into[i % len(into)] else None
        if target is not None and len(target):
            n = min(size, len(target), len(wire) - pos)
            target[:n] = wire[pos : pos + n]
            dec.received_into(n)
        else:
            n = min(size, len(wire) - pos)
            dec.feed(wire[pos : pos + n])
        pos += n
        i += 1
        while (frame := dec.next_frame()) is not None:
            frames.append(frame)
    assert [(h["id"], bytes(p)) for h, p in frames] == [(1, payload), (2, b"tail")]
    assert dec.buffered() == 0


def test_a_frame_whose_header_was_taken_for_an_in_place_payload_still_counts_as_buffered():
    """Found by tests/fuzz_peer.py: once receive_buffer had consumed a big frame's
    prefix and header, buffered() said 0 until payload bytes came, so a stream that
    ended right after the header looked like a clean end, not a frame cut short."""
    prefix, _ = encode_frame(ChunkData(1, 7).to_header(), b"x" * (128 << 10))
    dec = FrameDecoder(max_payload=1 << 20)
    dec.feed(prefix)
    assert dec.buffered() == len(prefix)
    target = dec.receive_buffer()
    assert target is not None and len(target) == 128 << 10
    assert dec.buffered() == len(prefix)
    target[:5] = b"xxxxx"
    dec.received_into(5)
    assert dec.buffered() == len(prefix) + 5


@pytest.mark.trio
async def test_a_stream_that_ends_after_a_big_frames_header_is_a_protocol_error():
    import trio.testing

    from cachefs.peer.stream import FrameStream

    prefix, _ = encode_frame(ChunkData(1, 7).to_header(), b"x" * (128 << 10))
    ours, theirs = trio.testing.memory_stream_pair()
    frames = FrameStream(ours, max_payload=1 << 20)
    await theirs.send_all(prefix)
    await theirs.aclose()
    with pytest.raises(ProtocolError, match="middle of a frame"):
        await frames.receive()
