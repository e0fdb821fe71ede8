"""Pins at the chunks' owners on the wire (peer protocol v5): the messages, their
field checks and size bounds, and a client and server negotiating them, in-process
over loopback, with servers of the previous release."""

from __future__ import annotations

import os

import msgpack
import pytest
import trio
import trio.testing
from conftest import serve_on_loopback

from cachefs.errors import PeerError
from cachefs.peer import protocol
from cachefs.peer.client import PeerClient
from cachefs.peer.protocol import (
    DIGEST_SIZE,
    MAX_HEADER,
    MAX_LEASE_ID,
    MAX_PIN_DIGESTS,
    MAX_PIN_PATH,
    MAX_PIN_PATHS,
    MAX_STR,
    MAX_TTL_MS,
    MAX_UNPIN_LEASES,
    Auth,
    Hello,
    PinChunks,
    Pinned,
    ProtocolError,
    Ready,
    UnpinLeases,
    Unpinned,
    encode_frame,
    parse_message,
)
from cachefs.peer.server import PeerServer
from cachefs.peer.stream import FrameStream
from cachefs.pins import PinRegistry

SECRET = b"test secret"
U64_MAX = (1 << 64) - 1

PIN = PinChunks(7, "0123456789ab", "job-1", "mount:h:1", 3_600_000, 300, b"\x01" * 16 + b"\x02" * 16, ("ds/a", "ds/b"))
EXAMPLES = [PIN, Pinned(7, False, 300, 1000), Pinned(8, True, 900, 1000), UnpinLeases(9, ("a", "b")), Unpinned(9, 2, 300)]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: f"{type(m).__name__}-{m.id}")
def test_the_pin_messages_round_trip_and_every_field_is_required(message):
    prefix, _ = encode_frame(message.to_header())
    assert len(prefix) <= MAX_HEADER + protocol.PREFIX_SIZE
    header = msgpack.unpackb(prefix[protocol.PREFIX_SIZE :], raw=False)
    assert parse_message(header) == message
    assert parse_message({**header, "future": 1}) == message  # a later version may add optional fields
    for name, value in header.items():
        if name == "t":
            continue
        with pytest.raises(ProtocolError):
            parse_message({k: v for k, v in header.items() if k != name})
        for wrong in (None, 1.5, -1, "x", b"x", [], {}, True):
            if type(wrong) is type(value) and wrong != -1:
                continue  # a value of the right type: checked below where it matters
            with pytest.raises(ProtocolError):
                parse_message({**header, name: wrong})


@pytest.mark.parametrize(
    "change",
    [
        {"digests": b""},
        {"digests": b"\x01" * 17},  # not whole digests
        {"digests": b"\x01" * (DIGEST_SIZE * (MAX_PIN_DIGESTS + 1))},
        {"bytes": 1},  # fewer bytes than chunks
        {"ttl_ms": 0},
        {"ttl_ms": MAX_TTL_MS + 1},
        {"lease": ""},
        {"lease": "x" * (MAX_LEASE_ID + 1)},
        {"owner": "x" * (MAX_STR + 1)},
        {"paths": ["p"] * (MAX_PIN_PATHS + 1)},
        {"paths": ["x" * (MAX_PIN_PATH + 1)]},
        {"paths": [""]},
        {"paths": [1]},
        {"paths": "ds/a"},
        {"id": U64_MAX + 1},
    ],
)
def test_a_bad_pin_is_a_protocol_error(change):
    with pytest.raises(ProtocolError):
        parse_message({**PIN.to_header(), **change})


@pytest.mark.parametrize(
    "change",
    [{"leases": []}, {"leases": ["a"] * (MAX_UNPIN_LEASES + 1)}, {"leases": ["x" * (MAX_LEASE_ID + 1)]},
     {"leases": [""]}, {"leases": [b"a"]}, {"leases": "a"}],
)
def test_a_bad_unpin_is_a_protocol_error(change):
    with pytest.raises(ProtocolError):
        parse_message({**UnpinLeases(1, ("a",)).to_header(), **change})


def test_the_largest_pin_fits_a_header():
    """Every field at its limit, in 4-byte characters: still a frame a receiver accepts."""
    wide = "\U0001f600"
    biggest = PinChunks(U64_MAX, "l" * MAX_LEASE_ID, wide * MAX_STR, wide * MAX_STR, MAX_TTL_MS, U64_MAX,
                        b"\xff" * (DIGEST_SIZE * MAX_PIN_DIGESTS), (wide * MAX_PIN_PATH,) * MAX_PIN_PATHS)
    prefix, _ = encode_frame(biggest.to_header())  # raises if over MAX_HEADER
    assert parse_message(msgpack.unpackb(prefix[protocol.PREFIX_SIZE :], raw=False)) == biggest
    assert biggest.digest_list() == [b"\xff" * DIGEST_SIZE] * MAX_PIN_DIGESTS


class Holder:
    """The node's side of PinHolder, with a real registry and a quota (no SSD tier)."""

    def __init__(self, quota: int):
        self.quota = quota
        self.pins = PinRegistry(None)

    async def hold_pins(self, req: PinChunks) -> Pinned | str:
        pinned = self.pins.pinned()
        if pinned + req.bytes > self.quota:
            return Pinned(req.id, True, pinned, self.quota)
        try:
            self.pins.hold(req.lease, req.owner, req.origin, list(req.paths), req.ttl_ms / 1000, req.digest_list(),
                           req.bytes)
        except ValueError as e:
            return str(e)
        return Pinned(req.id, False, pinned + req.bytes, self.quota)

    async def release_pins(self, leases):
        gone = self.pins.take(ids=list(leases))
        return len(gone), sum(lease.bytes for lease in gone)


def _server(holder: Holder | None) -> PeerServer:
    return PeerServer("worker-1", SECRET, {}, max_payload=1 << 16, pins=holder)


@pytest.mark.trio
async def test_a_client_pins_adds_to_a_lease_is_refused_over_quota_and_unpins():
    holder = Holder(quota=1000)
    digests = [bytes([i]) * DIGEST_SIZE for i in range(4)]
    async with trio.open_nursery() as nursery:
        peer = await serve_on_loopback(_server(holder), nursery)
        client = PeerClient("mount-1", SECRET, nursery, max_payload=1 << 16)
        assert await client.pin_chunks(peer, "lease-1", "job", 60, digests[:2], 400, ["ds/a"]) == Pinned(1, False, 400, 1000)
        # A second message of the same lease adds to it.
        answer = await client.pin_chunks(peer, "lease-1", "job", 60, digests[2:], 400, ["ds/a"])
        assert (answer.refused, answer.pinned) == (False, 800)
        [lease] = holder.pins.leases.values()
        assert (lease.id, lease.owner, lease.origin, lease.paths, lease.bytes) == ("lease-1", "job", "mount-1", ["ds/a"], 800)
        assert lease.digests == digests
        # Over the quota: refused with the numbers, nothing added.
        answer = await client.pin_chunks(peer, "lease-2", "job", 60, digests[:1], 201, [])
        assert (answer.refused, answer.pinned, answer.quota) == (True, 800, 1000)
        assert list(holder.pins.leases) == ["lease-1"]
        # Another owner's lease id is not added to.
        with pytest.raises(PeerError) as e:
            await client.pin_chunks(peer, "lease-1", "other-job", 60, digests[:1], 1, [])
        assert e.value.code == "refused" and "another's" in str(e.value)
        assert (await client.unpin_leases(peer, ["lease-1", "never-was"])) == Unpinned(5, 1, 800)
        assert holder.pins.leases == {}
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_server_that_keeps_no_pins_refuses_them_on_a_connection_that_goes_on():
    async with trio.open_nursery() as nursery:
        peer = await serve_on_loopback(_server(None), nursery)
        client = PeerClient("mount-1", SECRET, nursery, max_payload=1 << 16)
        with pytest.raises(PeerError) as e:
            await client.pin_chunks(peer, "l", "job", 60, [b"\x01" * DIGEST_SIZE], 1, [])
        assert e.value.code == "refused"
        with pytest.raises(PeerError):
            await client.pin_chunks(peer, "l", "job", 60, [b"\x01" * DIGEST_SIZE], 1, [])
        assert not client._conns[peer].closed
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_server_of_the_previous_release_keeps_no_pins(monkeypatch):
    """A v4 server closes the connection on a v5 Hello; the client speaks v4 and
    reports that the peer cannot pin, without sending anything it would not know."""
    holder = Holder(quota=1000)
    async with trio.open_nursery() as nursery:
        monkeypatch.setattr(protocol, "SUPPORTED_VERSIONS", frozenset({1, 2, 3, 4}))
        peer = await serve_on_loopback(_server(holder), nursery)
        client = PeerClient("mount-1", SECRET, nursery, max_payload=1 << 16)
        for ask in (lambda: client.pin_chunks(peer, "l", "job", 60, [b"\x01" * DIGEST_SIZE], 1, []),
                    lambda: client.unpin_leases(peer, ["l"])):
            with pytest.raises(PeerError) as e:
                await ask()
            assert e.value.code == "version"
        assert client._conns[peer].version == 4 and not client._conns[peer].closed
        assert holder.pins.leases == {}
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_pin_on_a_v4_connection_closes_it():
    """Pins are v5 requests only: a client that negotiated v4 and sends one is broken."""
    holder = Holder(quota=1000)
    for version, expect_closed in ((4, True), (5, False)):
        async with trio.open_nursery() as nursery:
            client_end, server_end = trio.testing.memory_stream_pair()
            nursery.start_soon(_server(holder).handle, server_end)
            frames = FrameStream(client_end, max_payload=1 << 16)
            nonce = os.urandom(16)
            await frames.send(Hello(version, "client", nonce).to_header())
            hello = protocol.parse_message((await frames.receive())[0])
            assert hello.version == version
            await frames.send(Auth(protocol.hello_mac(SECRET, "client", nonce, hello.nonce)).to_header())
            assert (await frames.receive())[0]["t"] == Ready.t
            await frames.send(UnpinLeases(1, ("l",)).to_header())
            frame = await frames.receive()
            assert (frame is None) == expect_closed
            if not expect_closed:
                assert parse_message(frame[0]) == Unpinned(1, 0, 0)
            nursery.cancel_scope.cancel()
