"""The peer wire format: length-prefixed frames and the messages they carry. No I/O.

A frame is::

    >II prefix      header length H (1..MAX_HEADER), payload length P (0..max_payload)
    H bytes         a msgpack map with str keys; "t" names the message type
    P bytes         raw payload (chunk data), outside msgpack so it is never re-encoded

The decoder checks both lengths as soon as the 8-byte prefix arrives, so a peer
cannot make a receiver buffer an oversized frame.

A connection starts with a mutual challenge-response over a shared secret (it
authenticates; it does not encrypt)::

    client → Hello(version, node, nonce_c)
    server → Hello(version, node, nonce_s, mac=hello_mac(secret, "server", nonce_s, nonce_c))
    client → Auth(hello_mac(secret, "client", nonce_c, nonce_s))
    server → Ready()

Then the client sends `GetChunk` requests, and the server answers each with
`ChunkData` (plus the chunk as payload) or `ChunkError`, in any order, matched
by `id`. The role is part of every MAC, so a peer that echoes a MAC back
(reflection) does not authenticate.

Versions: 2 adds `LoadChunk` ("load": the same fields as GetChunk), which has
the server load the chunk into its own tiers and answer `Loaded` (no payload)
or `ChunkError`; warm-up uses it to fill each chunk's owner without pulling
the chunk back. It also adds `HasChunk` ("has", the same fields), answered with
`Held`: whether the server's own tiers hold the chunk (nothing is fetched); the
`user.cachefs.locations` xattr asks each chunk's owner with it. A server accepts a Hello of any version in SUPPORTED_VERSIONS
and answers with the lower of the client's and its own, which is then the
connection's version: a client sends "load" only on a connection of version 2
or later. A version-1 server closes the connection on a version-2 Hello; the
client then connects again with a version-1 Hello. Reads (GetChunk) are the
same in both versions, so a rolling upgrade never stops them; only warm-up
loads chunks locally instead. A v1 server would also close a connection on
"load" (an unexpected message), which is why the version is negotiated, not
assumed.

Version 3 adds an optional `count` to LoadChunk: load chunks index ..
index + count - 1 of one object (a run the server owns), fetched with one
backend request, so a warm-up makes fewer and larger requests (on the JuiceFS
S3 gateway a 16 MiB GET costs about 30% less gateway CPU per byte than four of
4 MiB). The answer, `Loaded`, then carries `cached_mask`: bit i set if chunk
index + i was held before. A client sends `count` > 1 only on a connection of
version 3; a version-2 server closes the connection on a version-3 Hello, and the
client tries again one version lower, down to 1.

Version 4 adds an optional byte range to GetChunk: `start` and `end` (both or
neither, 0 <= start < end <= the chunk's length), and the ChunkData payload is
then bytes start .. end - 1 of the chunk, `checksum` being theirs. A random
reader takes just the bytes it needs from the chunk's owner (a 4 KiB read must
not wait for 4 MiB). A server older than v4 would ignore the two fields (unknown
fields are ignored) and answer the whole chunk, so a client sends them only on a
connection of version 4; on an older one it asks for the whole chunk.

Version 5 adds pins at the chunks' owners. `PinChunks` ("pin") asks the server
to keep some chunks (by digest, DIGEST_SIZE bytes each, concatenated in one bin
field, at most MAX_PIN_DIGESTS per message) from eviction under a lease: the
lease id, owner and time to live are the client's, and a lease with more
chunks than one message holds arrives in several. The server answers `Pinned`:
done, or refused (nothing added) because its pin quota would be exceeded, with
its numbers. `UnpinLeases` ("unpin") ends leases by id, answered with
`Unpinned`. A client sends them only on a connection of version 5; an older
server closes the connection on a version-5 Hello, and the client finds it
cannot pin there.

Every message validates its fields strictly in `from_header`: a wrong type, a
missing field, a negative int, a str longer than MAX_STR or an unknown "t" is a
`ProtocolError`, and the caller closes that connection. Unknown extra fields
are ignored, so a later version can add optional ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from typing import Any, ClassVar, Mapping, Union

import msgpack

from cachefs import hotpath
from cachefs.errors import CachefsError

PROTOCOL_VERSION = 6
# Hello versions a server accepts; a connection runs at min(client's, server's).
SUPPORTED_VERSIONS = frozenset({1, 2, 3, 4, 5, 6})
# The first version with LoadChunk/Loaded.
LOAD_VERSION = 2
# The first version with LoadChunk.count (a run of chunks) and Loaded.cached_mask.
RUN_VERSION = 3
# The first version with GetChunk.start/end (a byte range of the chunk).
RANGE_VERSION = 4
# The first version with PinChunks/Pinned and UnpinLeases/Unpinned (pins at the owners).
PIN_VERSION = 5
# The first version with AskSpace/Space (how much an owner's cache holds, before a warm-up).
SPACE_VERSION = 6
# The most chunks one LoadChunk may name.
MAX_RUN = 64
# What one PinChunks or UnpinLeases may carry: they stay well inside MAX_HEADER.
DIGEST_SIZE = 16
MAX_PIN_DIGESTS = 1024
MAX_PIN_PATHS = 8
MAX_PIN_PATH = 256  # characters of one of them
MAX_LEASE_ID = 64
MAX_UNPIN_LEASES = 64
MAX_TTL_MS = 10 * 365 * 86400 * 1000

PREFIX = struct.Struct(">II")
PREFIX_SIZE = PREFIX.size
MAX_HEADER = 64 << 10
DEFAULT_MAX_PAYLOAD = 64 << 20
MAX_STR = 4096
NONCE_MIN, NONCE_MAX = 16, 64
MAC_SIZE = 32
ROLES = ("server", "client")
ERROR_CODES = frozenset({"refused", "notfound", "changed", "unavailable", "busy", "bad-request"})

_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1
# A message has a handful of fields; these caps keep a few header bytes that
# declare a huge array or map from allocating one before the data is checked.
_MAX_CONTAINER = 256
# Drop consumed bytes once this many have piled up at the front of the buffer
# (and they are at least half of it), so compacting stays linear overall.
_COMPACT_AT = 64 << 10


class ProtocolError(CachefsError):
    """A peer sent a malformed, oversized or unexpected frame: close that connection."""


Buffer = Union[bytes, bytearray, memoryview]


# -- frames --------------------------------------------------------------------


def encode_frame(header: Mapping[str, Any], payload: Buffer = b"") -> tuple[bytes, Buffer]:
    """Encode one frame, leaving the payload alone so it is sent without a copy.

    Args:
        header: a map with a str "t"; values msgpack can pack.
        payload: raw bytes sent after the header.

    Returns:
        (prefix + packed header, payload): send the first, then the second.

    Raises:
        ProtocolError: the header has no str "t" or packs to more than
            MAX_HEADER bytes, or the payload is 4 GiB or more. A receiver would
            reject such a frame.
    """
    if not isinstance(header, Mapping) or not isinstance(header.get("t"), str):
        raise ProtocolError("a frame header must be a map with a str 't'")
    packed = msgpack.packb(dict(header), use_bin_type=True)
    if len(packed) > MAX_HEADER:
        raise ProtocolError(f"header of {len(packed)} bytes > {MAX_HEADER}")
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > _U32_MAX:
        raise ProtocolError(f"payload of {size} bytes does not fit a frame")
    return PREFIX.pack(len(packed), size) + packed, payload


def _unpack_header(data: bytes) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER,
            max_bin_len=MAX_HEADER,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
    except Exception as e:  # noqa: BLE001 - untrusted bytes: every way unpacking fails is a bad frame
        raise ProtocolError(f"header is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header is a {type(header).__name__}, not a map")
    for key in header:
        if not isinstance(key, str):
            raise ProtocolError(f"header has a {type(key).__name__} key")
    if not isinstance(header.get("t"), str):
        raise ProtocolError("header has no str 't'")
    return header


class FrameDecoder:
    """Splits a byte stream into frames. No I/O; no method checkpoints.

    Feed it what the socket returns and call `next_frame` until it returns None.
    After it raises `ProtocolError` the stream is out of sync, and every later
    call raises again: close the connection.

    Args:
        max_payload: the largest payload accepted, in bytes.
        max_header: the largest header accepted, in bytes (1..MAX_HEADER).

    Both limits may be changed between frames (a server raises `max_header`
    once a peer has authenticated).
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, max_header: int = MAX_HEADER):
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) or not 0 <= max_payload <= _U32_MAX:
            raise ValueError(f"max_payload must be an int in 0..{_U32_MAX}, not {max_payload!r}")
        if isinstance(max_header, bool) or not isinstance(max_header, int) or not 0 < max_header <= MAX_HEADER:
            raise ValueError(f"max_header must be an int in 1..{MAX_HEADER}, not {max_header!r}")
        self.max_payload = max_payload
        self.max_header = max_header
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._lengths: tuple[int, int] | None = None  # (H, P) of the frame at _pos, once its prefix is in
        self._failed: str | None = None
        # A large payload in progress is received straight into its own buffer
        # (see receive_buffer), not through _buf: one copy instead of three.
        self._header: dict[str, Any] | None = None
        self._payload: bytearray | None = None
        self._filled = 0
        self._framing = 0  # prefix + header bytes of that frame, received and consumed already

    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf) - self._pos + self._framing + self._filled

    def feed(self, data: Buffer) -> None:
        """Append received bytes.

        Raises:
            ProtocolError: the prefix of the next frame declares an oversized
                header or payload (checked before its body arrives), or the
                decoder failed earlier.
        """
        self._check_failed()
        if self._payload is not None:
            take = min(len(data), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + take] = memoryview(data)[:take]
            self._filled += take
            data = memoryview(data)[take:]
        self._buf += data
        self._prefix()

    def receive_buffer(self, min_payload: int = 64 << 10) -> memoryview | None:
        """Where to receive the rest of the current frame's payload directly
        (e.g. with `socket.recv_into`), then report the count to `received_into`.

        Returns:
            A view of the unfilled part of the payload, once the frame's header is
            in and its payload is at least `min_payload` bytes; None otherwise
            (receive as usual and `feed`). An empty view means the frame is complete.
        Raises:
            ProtocolError: a malformed header, or the decoder failed earlier.
        """
        self._check_failed()
        if self._payload is None:
            lengths = self._prefix()
            if lengths is None or lengths[1] < min_payload:
                return None
            header_len, payload_len = lengths
            start = self._pos + PREFIX_SIZE
            if len(self._buf) < start + header_len:
                return None
            try:
                self._header = _unpack_header(bytes(self._buf[start : start + header_len]))
            except ProtocolError as e:
                self._failed = str(e)
                raise
            have = min(len(self._buf) - start - header_len, payload_len)
            self._payload = hotpath.empty_buffer(payload_len)  # a frame is returned only once filled
            self._payload[:have] = self._buf[start + header_len : start + header_len + have]
            self._filled = have
            self._framing = PREFIX_SIZE + header_len
            self._pos = start + header_len + have
            self._compact()
        return memoryview(self._payload)[self._filled :]

    def received_into(self, n: int) -> None:
        """`n` bytes were written into the view `receive_buffer` returned."""
        assert self._payload is not None and 0 <= n <= len(self._payload) - self._filled
        self._filled += n

    def next_frame(self) -> tuple[dict[str, Any], bytes | bytearray] | None:
        """The next complete frame as (header, payload), or None until more bytes arrive.

        Raises:
            ProtocolError: a malformed or oversized frame, or the decoder failed earlier.
        """
        self._check_failed()
        if self._payload is not None:
            if self._filled < len(self._payload):
                return None
            assert self._header is not None
            frame = (self._header, self._payload)
            self._header, self._payload, self._filled, self._framing, self._lengths = None, None, 0, 0, None
            self._prefix()  # validate the next prefix, if it is already here
            return frame
        lengths = self._prefix()
        if lengths is None:
            return None
        header_len, payload_len = lengths
        start = self._pos + PREFIX_SIZE
        end = start + header_len + payload_len
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:
            header_bytes = bytes(view[start : start + header_len])
            payload = bytes(view[start + header_len : end])
        self._pos = end
        self._lengths = None
        self._compact()
        try:
            header = _unpack_header(header_bytes)
        except ProtocolError as e:
            self._failed = str(e)
            raise
        return header, payload

    def _prefix(self) -> tuple[int, int] | None:
        if self._payload is not None:
            return None  # the current frame's prefix was consumed already
        if self._lengths is None and len(self._buf) - self._pos >= PREFIX_SIZE:
            header_len, payload_len = PREFIX.unpack_from(self._buf, self._pos)
            if not 0 < header_len <= self.max_header:
                self._fail(f"header length {header_len} not in 1..{self.max_header}")
            if payload_len > self.max_payload:
                self._fail(f"payload length {payload_len} > {self.max_payload}")
            self._lengths = header_len, payload_len
        return self._lengths

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AT and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _fail(self, reason: str) -> None:
        self._failed = reason
        # Nothing after a bad frame can be trusted; don't keep it around.
        self._buf.clear()
        self._pos = 0
        raise ProtocolError(reason)

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise ProtocolError(f"stream already failed: {self._failed}")


# -- field checks --------------------------------------------------------------

_MISSING = object()


def _get(h: Mapping[str, Any], t: str, name: str) -> Any:
    value = h.get(name, _MISSING)
    if value is _MISSING:
        raise ProtocolError(f"{t}: missing {name!r}")
    return value


def _uint(h: Mapping[str, Any], t: str, name: str, minimum: int = 0) -> int:
    value = _get(h, t, name)
    if type(value) is not int:  # not bool, not float
        raise ProtocolError(f"{t}: {name!r} is a {type(value).__name__}, not an int")
    if not minimum <= value <= _U64_MAX:
        raise ProtocolError(f"{t}: {name!r} = {value} is out of range")
    return value


def _str(h: Mapping[str, Any], t: str, name: str) -> str:
    value = _get(h, t, name)
    if type(value) is not str:
        raise ProtocolError(f"{t}: {name!r} is a {type(value).__name__}, not a str")
    if len(value) > MAX_STR:
        raise ProtocolError(f"{t}: {name!r} is longer than {MAX_STR}")
    return value


def _bool(h: Mapping[str, Any], t: str, name: str) -> bool:
    value = _get(h, t, name)
    if type(value) is not bool:
        raise ProtocolError(f"{t}: {name!r} is a {type(value).__name__}, not a bool")
    return value


def _bytes(h: Mapping[str, Any], t: str, name: str, min_len: int, max_len: int) -> bytes:
    value = _get(h, t, name)
    if type(value) is not bytes:
        raise ProtocolError(f"{t}: {name!r} is a {type(value).__name__}, not bytes")
    if not min_len <= len(value) <= max_len:
        raise ProtocolError(f"{t}: {name!r} has {len(value)} bytes, not {min_len}..{max_len}")
    return value


# -- messages ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """The first message each way: protocol version, node id and a fresh random nonce.

    The server's Hello also carries `mac` = hello_mac(secret, "server", its nonce, the client's).
    """

    t: ClassVar[str] = "hello"
    version: int
    node: str
    nonce: bytes
    mac: bytes | None = None

    def to_header(self) -> dict[str, Any]:
        h: dict[str, Any] = {"t": self.t, "version": self.version, "node": self.node, "nonce": self.nonce}
        if self.mac is not None:
            h["mac"] = self.mac
        return h

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> Hello:
        mac = _bytes(h, cls.t, "mac", MAC_SIZE, MAC_SIZE) if "mac" in h else None
        version, node = _uint(h, cls.t, "version"), _str(h, cls.t, "node")
        return cls(version, node, _bytes(h, cls.t, "nonce", NONCE_MIN, NONCE_MAX), mac)


@dataclasses.dataclass(frozen=True, slots=True)
class Auth:
    """The client's answer to the server's nonce: hello_mac(secret, "client", its nonce, the server's)."""

    t: ClassVar[str] = "auth"
    mac: bytes

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "mac": self.mac}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> Auth:
        return cls(_bytes(h, cls.t, "mac", MAC_SIZE, MAC_SIZE))


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """The server accepted the client's MAC; requests may follow."""

    t: ClassVar[str] = "ready"

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> Ready:
        return cls()


@dataclasses.dataclass(frozen=True, slots=True)
class GetChunk:
    """A request for chunk `index` (of `chunk_size` bytes) of one object version.

    source, path, version and size are the fields of `cachefs.objects.ObjectId`.
    `from_header` also rejects chunk_size 0.

    v4: `start` and `end` ask for bytes start .. end - 1 of the chunk only
    (both or neither; sent only when set). `from_header` rejects start >= end;
    whether `end` is within the chunk is the server's check (it knows the chunk).
    """

    t: ClassVar[str] = "get"
    id: int
    source: str
    path: str
    version: str
    size: int
    chunk_size: int
    index: int
    start: int | None = None
    end: int | None = None

    def to_header(self) -> dict[str, Any]:
        h = {
            "t": self.t,
            "id": self.id,
            "source": self.source,
            "path": self.path,
            "version": self.version,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "index": self.index,
        }
        if self.start is not None:
            h["start"] = self.start
            h["end"] = self.end
        return h

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> GetChunk:
        t = cls.t
        start = end = None
        if "start" in h or "end" in h:
            start, end = _uint(h, t, "start"), _uint(h, t, "end", minimum=1)
            if start >= end:
                raise ProtocolError(f"{t}: range {start}..{end} is empty")
        return cls(
            id=_uint(h, t, "id"),
            source=_str(h, t, "source"),
            path=_str(h, t, "path"),
            version=_str(h, t, "version"),
            size=_uint(h, t, "size"),
            chunk_size=_uint(h, t, "chunk_size", minimum=1),
            index=_uint(h, t, "index"),
            start=start,
            end=end,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkData:
    """The answer to GetChunk `id`: the chunk is the frame's payload; `checksum` is its xxh3_64."""

    t: ClassVar[str] = "chunk"
    id: int
    checksum: int

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id, "checksum": self.checksum}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> ChunkData:
        return cls(_uint(h, cls.t, "id"), _uint(h, cls.t, "checksum"))


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkError:
    """GetChunk `id` failed. `code` is one of ERROR_CODES; `message` is for logs.

    Codes: "refused" (source not served here), "notfound", "changed",
    "unavailable" (the backend failed), "busy", "bad-request".

    A `message` longer than MAX_STR is cut to MAX_STR characters here, so a long
    backend error never makes a frame the receiver must reject.
    """

    t: ClassVar[str] = "err"
    id: int
    code: str
    message: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.message, str) and len(self.message) > MAX_STR:
            object.__setattr__(self, "message", self.message[:MAX_STR])

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id, "code": self.code, "message": self.message}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> ChunkError:
        code = _str(h, cls.t, "code")
        if code not in ERROR_CODES:
            raise ProtocolError(f"err: unknown code {code[:40]!r}")
        return cls(_uint(h, cls.t, "id"), code, _str(h, cls.t, "message"))


@dataclasses.dataclass(frozen=True, slots=True)
class LoadChunk(GetChunk):
    """Protocol v2: load chunk `index` into the server's own tiers; answered with
    `Loaded` (no payload) or `ChunkError`. The same fields and checks as GetChunk.

    v3: `count` chunks from `index` on (1..MAX_RUN; sent only when not 1)."""

    t: ClassVar[str] = "load"
    count: int = 1

    def to_header(self) -> dict[str, Any]:
        h = GetChunk.to_header(self)
        if self.count != 1:
            h["count"] = self.count
        return h

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> LoadChunk:
        get = GetChunk.from_header.__func__(GetChunk, h)
        count = _uint(h, cls.t, "count", minimum=1) if "count" in h else 1
        if count > MAX_RUN:
            raise ProtocolError(f"{cls.t}: 'count' = {count} is more than {MAX_RUN}")
        return cls(**{f.name: getattr(get, f.name) for f in dataclasses.fields(GetChunk)}, count=count)


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    """The answer to LoadChunk `id`: the server holds the chunk now; `cached`: it held it before.

    v3, for a LoadChunk with `count` > 1: `cached` is whether it held all of them,
    and `cached_mask` which (bit i: chunk index + i); sent only then."""

    t: ClassVar[str] = "loaded"
    id: int
    cached: bool
    cached_mask: int | None = None

    def to_header(self) -> dict[str, Any]:
        h = {"t": self.t, "id": self.id, "cached": self.cached}
        if self.cached_mask is not None:
            h["cached_mask"] = self.cached_mask
        return h

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> Loaded:
        mask = _uint(h, cls.t, "cached_mask") if "cached_mask" in h else None
        return cls(_uint(h, cls.t, "id"), _bool(h, cls.t, "cached"), mask)


@dataclasses.dataclass(frozen=True, slots=True)
class HasChunk(GetChunk):
    """Protocol v2: does the server's own tiers hold chunk `index`? Answered with `Held`
    (or ChunkError for a bad request); nothing is fetched. The same fields as GetChunk."""

    t: ClassVar[str] = "has"


@dataclasses.dataclass(frozen=True, slots=True)
class Held:
    """The answer to HasChunk `id`."""

    t: ClassVar[str] = "held"
    id: int
    held: bool

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id, "held": self.held}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> Held:
        return cls(_uint(h, cls.t, "id"), _bool(h, cls.t, "held"))


def _strs(h: Mapping[str, Any], t: str, name: str, min_len: int, max_len: int, max_chars: int = MAX_STR) -> tuple[str, ...]:
    value = _get(h, t, name)
    if type(value) is not list:
        raise ProtocolError(f"{t}: {name!r} is a {type(value).__name__}, not a list")
    if not min_len <= len(value) <= max_len:
        raise ProtocolError(f"{t}: {name!r} has {len(value)} items, not {min_len}..{max_len}")
    for item in value:
        if type(item) is not str or not 0 < len(item) <= max_chars:
            raise ProtocolError(f"{t}: {name!r} holds something other than a str of 1..{max_chars} characters")
    return tuple(value)


def _lease_id(h: Mapping[str, Any], t: str, name: str) -> str:
    value = _str(h, t, name)
    if not 0 < len(value) <= MAX_LEASE_ID:
        raise ProtocolError(f"{t}: {name!r} is not 1..{MAX_LEASE_ID} characters")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class PinChunks:
    """Protocol v5: keep chunks from eviction under lease `lease` of `owner` for
    `ttl_ms` milliseconds from now (the server's clock), counted against the
    server's pin quota as `bytes`. Answered with `Pinned` or ChunkError.

    `digests` is DIGEST_SIZE-byte chunk digests, concatenated (1..MAX_PIN_DIGESTS
    of them); `bytes` is their chunks' length, at least one byte each. A lease
    id the server has already (from this `origin` and `owner`) gets these
    chunks added: a lease larger than one message arrives in several.
    `origin` (the node that pinned) and `paths` (the first MAX_PIN_PATHS it
    pinned, each cut to MAX_PIN_PATH characters) are for the server's status."""

    t: ClassVar[str] = "pin"
    id: int
    lease: str
    owner: str
    origin: str
    ttl_ms: int
    bytes: int
    digests: bytes
    paths: tuple[str, ...] = ()

    def digest_list(self) -> list[bytes]:
        return [self.digests[i : i + DIGEST_SIZE] for i in range(0, len(self.digests), DIGEST_SIZE)]

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id, "lease": self.lease, "owner": self.owner, "origin": self.origin,
                "ttl_ms": self.ttl_ms, "bytes": self.bytes, "digests": self.digests, "paths": list(self.paths)}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> PinChunks:
        t = cls.t
        digests = _bytes(h, t, "digests", DIGEST_SIZE, DIGEST_SIZE * MAX_PIN_DIGESTS)
        if len(digests) % DIGEST_SIZE:
            raise ProtocolError(f"{t}: 'digests' has {len(digests)} bytes, not a multiple of {DIGEST_SIZE}")
        size = _uint(h, t, "bytes")
        if size < len(digests) // DIGEST_SIZE:
            raise ProtocolError(f"{t}: {size} bytes for {len(digests) // DIGEST_SIZE} chunks")
        ttl_ms = _uint(h, t, "ttl_ms", minimum=1)
        if ttl_ms > MAX_TTL_MS:
            raise ProtocolError(f"{t}: 'ttl_ms' = {ttl_ms} is more than {MAX_TTL_MS}")
        return cls(
            id=_uint(h, t, "id"),
            lease=_lease_id(h, t, "lease"),
            owner=_str(h, t, "owner"),
            origin=_str(h, t, "origin"),
            ttl_ms=ttl_ms,
            bytes=size,
            digests=digests,
            paths=_strs(h, t, "paths", 0, MAX_PIN_PATHS, MAX_PIN_PATH),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Pinned:
    """The answer to PinChunks `id`: pinned, or `refused` (nothing added) because
    the server's pin quota would be exceeded. `pinned`: bytes the server's leases
    pin now; `quota`: its pin quota."""

    t: ClassVar[str] = "pinned"
    id: int
    refused: bool
    pinned: int
    quota: int

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id, "refused": self.refused, "pinned": self.pinned, "quota": self.quota}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> Pinned:
        t = cls.t
        return cls(_uint(h, t, "id"), _bool(h, t, "refused"), _uint(h, t, "pinned"), _uint(h, t, "quota"))


@dataclasses.dataclass(frozen=True, slots=True)
class UnpinLeases:
    """Protocol v5: end the leases with these ids (1..MAX_UNPIN_LEASES); ids the
    server does not have are no error. Answered with `Unpinned`."""

    t: ClassVar[str] = "unpin"
    id: int
    leases: tuple[str, ...]

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id, "leases": list(self.leases)}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> UnpinLeases:
        return cls(_uint(h, cls.t, "id"), _strs(h, cls.t, "leases", 1, MAX_UNPIN_LEASES, MAX_LEASE_ID))


@dataclasses.dataclass(frozen=True, slots=True)
class Unpinned:
    """The answer to UnpinLeases `id`: how many of the leases the server had, and the bytes they pinned."""

    t: ClassVar[str] = "unpinned"
    id: int
    leases: int
    bytes: int

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id, "leases": self.leases, "bytes": self.bytes}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> Unpinned:
        return cls(_uint(h, cls.t, "id"), _uint(h, cls.t, "leases"), _uint(h, cls.t, "bytes"))


@dataclasses.dataclass(frozen=True, slots=True)
class AskSpace:
    """Protocol v6: how many bytes does the cache a warm-up fills on the server hold
    (its SSD tier, else MEM)? Answered with `Space`, or ChunkError "refused"."""

    t: ClassVar[str] = "space?"
    id: int

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> AskSpace:
        return cls(_uint(h, cls.t, "id"))


@dataclasses.dataclass(frozen=True, slots=True)
class Space:
    """The answer to AskSpace `id`: the bytes that cache holds at most, chunk headers included."""

    t: ClassVar[str] = "space"
    id: int
    capacity: int

    def to_header(self) -> dict[str, Any]:
        return {"t": self.t, "id": self.id, "capacity": self.capacity}

    @classmethod
    def from_header(cls, h: Mapping[str, Any]) -> Space:
        return cls(_uint(h, cls.t, "id"), _uint(h, cls.t, "capacity"))


Message = Union[
    Hello, Auth, Ready, GetChunk, LoadChunk, HasChunk, ChunkData, Loaded, Held, ChunkError,
    PinChunks, Pinned, UnpinLeases, Unpinned, AskSpace, Space,
]

MESSAGE_TYPES: Mapping[str, type[Message]] = {
    cls.t: cls for cls in (Hello, Auth, Ready, GetChunk, LoadChunk, HasChunk, ChunkData, Loaded, Held, ChunkError)
} | {cls.t: cls for cls in (PinChunks, Pinned, UnpinLeases, Unpinned)} | {  # v5
    cls.t: cls for cls in (AskSpace, Space)  # v6
}


def parse_message(header: Mapping[str, Any]) -> Message:
    """The message a frame header carries, with every field checked.

    Raises:
        ProtocolError: not a map, unknown "t", or a missing or invalid field.
    """
    if not isinstance(header, Mapping):
        raise ProtocolError(f"header is a {type(header).__name__}, not a map")
    t = header.get("t")
    cls = MESSAGE_TYPES.get(t) if isinstance(t, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(t)[:40]!r}")
    return cls.from_header(header)


# -- handshake -----------------------------------------------------------------


def hello_mac(secret: bytes, role: str, own_nonce: bytes, peer_nonce: bytes) -> bytes:
    """HMAC-SHA256 proving that `role` knows `secret`, bound to both nonces.

    Args:
        secret: the shared secret.
        role: "server" or "client": the side that computes the MAC.
        own_nonce: the nonce the computing side sent in its Hello.
        peer_nonce: the nonce it received.

    Returns:
        MAC_SIZE bytes.

    Raises:
        ValueError: empty secret or unknown role.
    """
    if not secret:
        raise ValueError("the peer secret is empty")
    if role not in ROLES:
        raise ValueError(f"role must be 'server' or 'client', not {role!r}")
    return hmac.new(secret, role.encode() + b"\0" + own_nonce + peer_nonce, hashlib.sha256).digest()


def verify_mac(expected: bytes, got: object) -> bool:
    """Whether `got` equals `expected`, in constant time. A non-bytes `got` is False."""
    if not isinstance(got, (bytes, bytearray)):
        return False
    return hmac.compare_digest(expected, got)
