"""Pins with leases: chunks kept from eviction until a lease ends.

A platform pins a job's inputs before the job starts (`cachefs pin PATH --ttl 6h
--owner job-123`) and unpins them when it ends; a lease that nobody ends expires
on its own, so a crashed scheduler never leaves the cache full of pins. Leases
are written to a file in the cache directory (atomically), so they survive a
restart of the node, and the chunks they pin stay pinned across it.

A lease pins the chunks of the object versions its paths had when it was made.

With peers, a chunk is pinned where it is read from: at its owner on the ring.
The mount's lease then records how many of its bytes each owner keeps
(`peers`), and each owner keeps a lease of the same id, owner and time to live
for the chunks it owns (`origin` names the mount it came from); only the bytes
pinned on a node's own SSD tier count against its --pin-quota.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Callable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Lease:
    id: str
    owner: str
    paths: list[str]  # as the mount names them
    expires: float  # seconds since the epoch
    bytes: int  # of the files it pins, whether cached yet or not
    datasets: dict[str, int]  # dataset name -> bytes of it pinned
    digests: list[bytes] = dataclasses.field(repr=False)  # of the chunks pinned on this node's SSD tier
    peers: dict[str, int] = dataclasses.field(default_factory=dict)  # node -> bytes of it pinned at that owner
    origin: str | None = None  # a lease kept for this peer; None: made here

    @property
    def here(self) -> int:
        """Bytes of it pinned on this node's SSD tier (what counts against --pin-quota)."""
        return self.bytes - sum(self.peers.values())

    def describe(self, now: float) -> dict:
        d = {"id": self.id, "owner": self.owner, "paths": self.paths, "bytes": self.bytes,
             "datasets": self.datasets, "expires": self.expires, "expires_in": round(self.expires - now, 1)}
        if self.peers:
            d["peers"] = self.peers
        if self.origin is not None:
            d["origin"] = self.origin
        return d

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["digests"] = [x.hex() for x in self.digests]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Lease:
        return cls(**{**d, "digests": [bytes.fromhex(x) for x in d["digests"]]})


class PinRegistry:
    """The leases of one node, kept in `path` (None: in memory only). No I/O but `save`/`load`.

    Args:
        clock: seconds since the epoch (leases outlive the process, so not monotonic).
    """

    def __init__(self, path: str | None, clock: Callable[[], float] = time.time):
        self.path = path
        self.clock = clock
        self.leases: dict[str, Lease] = {}

    def load(self) -> list[Lease]:
        """The leases saved earlier that have not expired; a damaged file is set aside, not fatal."""
        if self.path is None or not os.path.exists(self.path):
            return []
        try:
            with open(self.path) as f:
                leases = [Lease.from_json(d) for d in json.load(f)]
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("pins file %s is unreadable (%s); starting without pins", self.path, e)
            os.replace(self.path, self.path + ".bad")
            return []
        now = self.clock()
        self.leases = {lease.id: lease for lease in leases if lease.expires > now}
        return list(self.leases.values())

    def save(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump([lease.to_json() for lease in self.leases.values()], f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:12]

    def new(
        self, owner: str, paths: list[str], ttl: float, digests: list[bytes], datasets: dict[str, int],
        *, lease_id: str | None = None, peers: dict[str, int] | None = None,
    ) -> Lease:
        """A lease made here; `digests` are pinned here, `peers` (node -> bytes) at the owners."""
        lease = Lease(lease_id or self.new_id(), owner, paths, self.clock() + ttl, sum(datasets.values()), datasets,
                      digests, dict(peers or {}))
        self.leases[lease.id] = lease
        return lease

    def hold(self, lease_id: str, owner: str, origin: str, paths: list[str], ttl: float, digests: list[bytes],
             size: int) -> Lease:
        """Chunks a peer pins here under its lease `lease_id`: a new lease, or more of
        one it sent before (a lease too large for one message arrives in several).

        Raises:
            ValueError: the id is taken by a lease of another owner or node.
        """
        lease = self.leases.get(lease_id)
        if lease is None:
            lease = self.leases[lease_id] = Lease(lease_id, owner, paths, self.clock() + ttl, 0, {}, [], origin=origin)
        elif (lease.owner, lease.origin) != (owner, origin):
            raise ValueError(f"lease {lease_id} is another's here")
        lease.digests += digests
        lease.bytes += size
        return lease

    def pinned(self) -> int:
        """Bytes pinned on this node's SSD tier by all leases."""
        return sum(lease.here for lease in self.leases.values())

    def pinned_of(self, dataset: str) -> int:
        """Bytes of `dataset` pinned by the leases made here, wherever they are kept."""
        return sum(lease.datasets.get(dataset, 0) for lease in self.leases.values())

    def take(self, *, ids: list[str] = (), owner: str | None = None, paths: list[str] = ()) -> list[Lease]:
        """Remove and return the leases with these ids, of this owner, or pinning any of these paths."""
        gone = [
            lease for lease in self.leases.values()
            if lease.id in ids or (owner is not None and lease.owner == owner) or set(paths) & set(lease.paths)
        ]
        for lease in gone:
            del self.leases[lease.id]
        return gone

    def take_expired(self) -> list[Lease]:
        now = self.clock()
        return self.take(ids=[lease.id for lease in self.leases.values() if lease.expires <= now])

    def next_expiry(self) -> float | None:
        return min((lease.expires for lease in self.leases.values()), default=None)
