"""Chunk cache tiers. Every tier stores whole chunks under a 16-byte key digest.

The digest covers the source, path, object version, chunk size and index, so a
changed object can never be served from old chunks or a mix of old and new.
"""

from __future__ import annotations

import functools

import xxhash

from cachefs.backend import ObjectId

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
