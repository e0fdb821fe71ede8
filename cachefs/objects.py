"""The vocabulary every layer shares: what an object and a chunk are, a chunk's
key, and the interface of a chunk tier.

This module does no I/O and imports no other cachefs module, so any layer may
import it without pulling in the layers above or below it (mountpoint-s3 keeps
`ObjectId` in its own small module the same way).

The chunk digest covers the source, path, object version, chunk size and index,
so a changed object can never be served from old chunks or a mix of old and new.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Literal, Protocol

import xxhash

Kind = Literal["file", "dir", "link"]
Buffer = bytes | memoryview
Medium = Literal["memory", "disk", "network"]  # how a chunk tier holds its chunks


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One entry of the source. `path` is relative to the source root ("" is the root)."""

    path: str
    kind: Kind
    size: int
    mtime: float
    version: str  # "etag:<ETag>" if the backend has one, else "stat:<size>-<mtime>"
    link_target: str | None = None

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectId:
    """The exact object version a chunk belongs to. Part of every chunk key."""

    source: str
    path: str
    version: str
    size: int


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def key_at(key: tuple[str, str], source: str, path: str, under: bool = False) -> bool:
    """Whether (source, path) `key` is `path` of `source` (`under`: a path below it)."""
    return key[0] == source and (key[1].startswith(f"{path}/") if under else key[1] == path)


def check_relative_path(path: str) -> None:
    """Paths come from the kernel or from peers: refuse anything that could leave the source root.

    Raises:
        ValueError: an absolute path, or one with empty, "." or ".." components or NUL.
    """
    if path == "":
        return
    if path.startswith("/") or "\0" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"bad path {path!r}")


# Bump when the chunk format or key layout changes: old cache files then simply miss.
CACHE_FORMAT = 3

SOURCE_TAG_SIZE = 4


@functools.lru_cache(maxsize=256)
def source_tag(source: str) -> bytes:
    """The first bytes of every chunk digest of `source`: lets a tier (and its file
    names, after a restart) account bytes per source without a separate index."""
    return xxhash.xxh3_64_digest(source.encode("utf-8", "surrogateescape"))[:SOURCE_TAG_SIZE]


def chunk_digest(obj: ObjectId, chunk_size: int, index: int) -> bytes:
    """The 16-byte key of one chunk of one object version: a source tag, then
    96 bits of hash over everything that identifies the chunk."""
    key = f"cachefs-v{CACHE_FORMAT}\0{obj.source}\0{obj.path}\0{obj.version}\0{obj.size}\0{chunk_size}\0{index}"
    body = xxhash.xxh3_128_digest(key.encode("utf-8", "surrogateescape"))
    return source_tag(obj.source) + body[: 16 - SOURCE_TAG_SIZE]


@dataclasses.dataclass(slots=True)
class ChunkKey:
    """One chunk of one object version: what the reader asks a tier for.

    Local tiers need only `digest` and `length`; the peer tier sends the rest
    to the chunk's owner. Built by `chunk_key`; treat it as immutable (not
    frozen only because a frozen dataclass is several times slower to build).
    """

    obj: ObjectId
    chunk_size: int
    index: int
    digest: bytes
    length: int  # bytes in this chunk: chunk_size, less for the object's last chunk


def chunk_key(obj: ObjectId, chunk_size: int, index: int) -> ChunkKey:
    length = min(chunk_size, obj.size - index * chunk_size)
    return ChunkKey(obj, chunk_size, index, chunk_digest(obj, chunk_size, index), length)


class ChunkTier(Protocol):
    """What the reader asks of a tier (mountpoint-s3's `DataCache`, JuiceFS's
    `CacheManager`): MEM (cache/mem.py), SSD (cache/disk.py), the ring's owner
    of a chunk (peer/client.py). The reader walks them as a list, fastest first.

    Every method may fail only by missing: a corrupt, unreadable or unreachable
    chunk is logged, counted and answered with None (or False). Which methods
    checkpoint depends on `medium`: "memory" never does, the others may.
    """

    name: ClassVar[str]  # in logs, and the `tier` label of the cache metrics
    # How the tier holds chunks: the reader's optimisations depend on it (see reader.py).
    medium: ClassVar[Medium]

    def __contains__(self, digest: bytes) -> bool:
        """Whether the tier holds the chunk, known without I/O (the peer tier cannot know: False)."""
        ...

    async def get(self, key: ChunkKey) -> Buffer | None:
        """The whole chunk, verified, or None."""
        ...

    async def get_range(self, key: ChunkKey, start: int, end: int) -> Buffer | None:
        """Bytes [start, end) of the chunk, or None; the SSD reads only the blocks they fall in."""
        ...

    async def put(self, key: ChunkKey, data: Buffer) -> bool:
        """Keep the chunk if there is room. Returns whether it was stored."""
        ...

    async def will_need(self, key: ChunkKey) -> None:
        """A hint that the chunk will be read soon (the SSD has the kernel read it ahead)."""
        ...
