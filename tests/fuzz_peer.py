"""Coverage-guided fuzzing (atheris/libFuzzer) of what a worker does with a peer's bytes.

One input is a byte stream as a peer would send it, plus two bytes that choose
the decoder's limits and how the stream is cut into receives. The target runs
what `cachefs.peer.stream.FrameStream.receive` and `cachefs.peer.server`
run on those bytes, without sockets:

- `FrameDecoder` twice: the whole stream in one `feed`, and cut into small
  receives through `receive_buffer`/`received_into` (the in-place payload path)
  or `feed`; both must see the same frames and the same verdict;
- `parse_message` on every header; a message must survive a re-encode;
- for requests, the server's own validation (`PeerServer._resolve`, which runs
  `_check_request` and `check_relative_path`) and the chunk key it would use;
  for Hello/Auth, the MAC checks of the handshake.

A `ProtocolError` (the worker closes that connection) or a refusal is a correct
answer; any other exception, or a broken invariant (AssertionError), is a bug
and atheris stops with a crash report.

Run (from the repo root; the corpus directory is filled with the seeds, which are
valid frames made with the protocol's own encoders, then with what libFuzzer finds):

    .venv/bin/python -m tests.fuzz_peer -atheris_runs=1000000 [CORPUS_DIR]
    .venv/bin/python -m tests.fuzz_peer crash-<sha1>      # replay one input

tests/test_fuzz.py runs a short version in CI; docs/reliability.md records a long run.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["cachefs"]):
    from cachefs.objects import ObjectId, chunk_key
    from cachefs.peer import protocol
    from cachefs.peer.protocol import (
        Auth,
        ChunkData,
        ChunkError,
        FrameDecoder,
        GetChunk,
        HasChunk,
        Held,
        Hello,
        LoadChunk,
        Loaded,
        PinChunks,
        Pinned,
        ProtocolError,
        Ready,
        UnpinLeases,
        Unpinned,
        encode_frame,
        parse_message,
    )
    from cachefs.peer.server import HANDSHAKE_MAX_HEADER, PeerServer

SOURCE = "s3://bucket/data"
CHUNK_SIZE = 256 << 10
SECRET = b"fuzz secret"
# Byte 0 of an input picks (max_payload, max_header, raise max_header after the first frame).
MAX_PAYLOADS = (0, 1, 300, 64 << 10)
MAX_HEADERS = (HANDSHAKE_MAX_HEADER, protocol.MAX_HEADER, 16, 1)


class _FakeReader:
    """All `PeerServer._resolve` asks of a reader."""

    chunk_size = CHUNK_SIZE
    tiers = ()


SERVER = PeerServer("fuzz-node", SECRET, {SOURCE: _FakeReader()}, max_payload=CHUNK_SIZE)


def _decoder(config: int) -> tuple[FrameDecoder, bool]:
    decoder = FrameDecoder(max_payload=MAX_PAYLOADS[config & 3], max_header=MAX_HEADERS[(config >> 2) & 3])
    return decoder, bool(config & 16)


def _all_at_once(stream: bytes, config: int) -> tuple[list, bool, int]:
    """(frames, failed, bytes left buffered) with the stream in one feed."""
    decoder, raise_header = _decoder(config)
    frames: list = []
    try:
        decoder.feed(stream)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
            if raise_header:
                decoder.max_header = protocol.MAX_HEADER
    except ProtocolError:
        return frames, True, -1
    return frames, False, decoder.buffered()


def _in_receives(stream: bytes, config: int, cut: int) -> tuple[list, bool, int]:
    """The same, cut into receives of 1..64 bytes the way FrameStream.receive takes them."""
    decoder, raise_header = _decoder(config)
    in_place = bool(config & 32)
    min_payload = 1 + (config >> 6)  # 1..4: payloads this big are received in place
    frames: list = []
    pos, step = 0, cut or 1
    try:
        while True:
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
                if raise_header:
                    decoder.max_header = protocol.MAX_HEADER
            if pos >= len(stream):
                return frames, False, decoder.buffered()
            step = (step * 37 + 11) % 64 + 1  # deterministic, varied cuts
            target = decoder.receive_buffer(min_payload) if in_place else None
            if target is not None and len(target):
                n = min(len(target), step, len(stream) - pos)
                target[:n] = stream[pos : pos + n]
                decoder.received_into(n)
            else:
                n = min(step, len(stream) - pos)
                decoder.feed(stream[pos : pos + n])
            pos += n
    except ProtocolError:
        return frames, True, -1


def _same_frames(a: list, b: list) -> bool:
    return all(ha == hb and bytes(pa) == bytes(pb) for (ha, pa), (hb, pb) in zip(a, b))


def _check_message(header: dict, payload: bytes) -> None:
    """What a worker does with one decoded frame; only ProtocolError may escape."""
    try:
        message = parse_message(header)
    except ProtocolError:
        return
    # A parsed message re-encodes to a frame a receiver accepts, and parses back equal.
    prefix, body = encode_frame(message.to_header())
    decoder = FrameDecoder(max_payload=0)
    decoder.feed(prefix + bytes(body))
    again = decoder.next_frame()
    assert again is not None and parse_message(again[0]) == message, (message, again)
    if isinstance(message, GetChunk):  # LoadChunk and HasChunk too
        resolved = SERVER._resolve(message)
        if isinstance(resolved, ChunkError):
            assert resolved.code in ("refused", "bad-request"), resolved
            assert resolved.code in protocol.ERROR_CODES
            encode_frame(resolved.to_header())  # the refusal itself must be sendable
            return
        reader, obj = resolved
        assert obj == ObjectId(message.source, message.path, message.version, message.size)
        key = chunk_key(obj, reader.chunk_size, message.index)
        assert len(key.digest) == 16 and 0 < key.length <= CHUNK_SIZE, key
        if isinstance(message, HasChunk):
            assert SERVER._has(message) == Held(message.id, False)
    elif isinstance(message, PinChunks):
        digests = message.digest_list()
        assert 0 < len(digests) <= protocol.MAX_PIN_DIGESTS and {len(d) for d in digests} == {protocol.DIGEST_SIZE}
        assert message.bytes >= len(digests) and 0 < message.ttl_ms <= protocol.MAX_TTL_MS
    elif isinstance(message, Hello):
        own = os.urandom(16)
        mac = protocol.hello_mac(SECRET, "server", own, message.nonce)
        assert len(mac) == protocol.MAC_SIZE
        if message.mac is not None:
            assert not protocol.verify_mac(mac, message.mac) or message.mac == mac
    elif isinstance(message, Auth):
        expected = protocol.hello_mac(SECRET, "client", b"n" * 16, b"m" * 16)
        assert protocol.verify_mac(expected, message.mac) == (message.mac == expected)


def one_input(data: bytes) -> None:
    """The fuzz target. Raises only on a bug."""
    if len(data) < 2:
        return
    config, cut, stream = data[0], data[1], data[2:]
    whole, whole_failed, whole_left = _all_at_once(stream, config)
    parts, parts_failed, parts_left = _in_receives(stream, config, cut)
    # However the bytes are cut, the decoder sees the same frames and reaches the same
    # verdict; only a frame cut short by the end of the stream may be judged early (the
    # in-place path checks a header before its payload is in) or not yet.
    if whole_failed != parts_failed:
        assert (parts_left if whole_failed else whole_left) > 0, (whole_failed, parts_failed)
    assert _same_frames(whole, parts), (whole, parts)
    if not whole_failed and not parts_failed:
        assert len(whole) == len(parts) and whole_left == parts_left, (len(whole), len(parts), whole_left, parts_left)
    for header, payload in whole:
        assert isinstance(header, dict) and isinstance(header.get("t"), str)
        assert len(payload) <= MAX_PAYLOADS[config & 3]
        _check_message(header, payload)


def seeds() -> list[bytes]:
    """Valid frames, made with the protocol's own encoders, each behind a few configs."""
    messages = [
        Hello(protocol.PROTOCOL_VERSION, "node-a", b"\x01" * 16),
        Hello(1, "node-b", b"\x02" * 32, b"\x03" * protocol.MAC_SIZE),
        Auth(b"\x04" * protocol.MAC_SIZE),
        Ready(),
        GetChunk(1, SOURCE, "dir/file.bin", "etag-1", 3 * CHUNK_SIZE + 5, CHUNK_SIZE, 3),
        LoadChunk(2, SOURCE, "a/b/c", "v", 10, CHUNK_SIZE, 0),
        HasChunk(3, SOURCE, "x", "v", 1, CHUNK_SIZE, 0),
        GetChunk(4, "s3://other/src", "../etc/passwd", "v", 100, CHUNK_SIZE, 0),
        ChunkData(5, 0xDEADBEEF),
        ChunkError(6, "notfound", "no such key"),
        Loaded(7, True),
        Held(8, False),
        PinChunks(10, "0123456789ab", "job-1", "mount:h:1", 60_000, 3 << 18, b"\x05" * 48, ("ds/a",)),
        Pinned(10, True, 1 << 20, 1 << 21),
        UnpinLeases(11, ("0123456789ab",)),
        Unpinned(11, 1, 3 << 18),
    ]
    frames = []
    for message in messages:
        prefix, body = encode_frame(message.to_header())
        frames.append(prefix + bytes(body))
    prefix, body = encode_frame(ChunkData(9, 1).to_header(), b"p" * 200)
    with_payload = prefix + bytes(body)
    out = []
    for i, frame in enumerate(frames):
        config = 1 | (1 << 2) | (32 if i % 2 else 0)  # max_payload 1, MAX_HEADER
        out.append(bytes([config, i]) + frame)
    out.append(bytes([2 | (1 << 2) | 32, 7]) + with_payload)  # max_payload 300, received in place
    out.append(bytes([0 | 16, 3]) + frames[0] + frames[2] + frames[4] + frames[5])  # a handshake, then requests
    out.append(bytes([2 | (1 << 2), 9]) + b"".join(frames) + with_payload[:-50])  # ends mid-frame
    return out


def main(argv: list[str]) -> None:
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if not corpus:
        # Seeds go in a fresh directory, which libFuzzer then grows.
        corpus = [tempfile.mkdtemp(prefix="cachefs-fuzz-peer-")]
        argv = [*argv, corpus[0]]
    if not os.path.isfile(corpus[0]):  # a file is an input to replay, e.g. a crash-<sha1>
        os.makedirs(corpus[0], exist_ok=True)
        for i, seed in enumerate(seeds()):
            path = os.path.join(corpus[0], f"seed-{i:02d}")
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(seed)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
