"""The consistent-hash ring that maps a chunk key to the peers that should hold it.

Pure: no I/O, no clock, no randomness. Every process that builds a ring from
the same membership (node id → weight) and the same `vnodes` gets the same
ring, whatever order the nodes arrived in, so every mount asks the same worker
for a given chunk.

Each node gets ``round(vnodes * weight)`` virtual nodes (at least one) at
``xxh3_64(f"{node}#{i}")``. A key belongs to the first virtual node at or after
``xxh3_64(key)``, wrapping around; `owners` keeps walking clockwise for the
fallbacks. So removing a node hands each of its keys to that key's next owner
and moves nothing else, and adding a node takes keys only for itself
(JuiceFS ``getStore``/``removeStore``).

Rings are immutable values: a membership change builds a new ring
(`with_nodes`, `without`), which callers swap in with one assignment.
"""

from __future__ import annotations

import math
import numbers
from array import array
from bisect import bisect_left
from typing import Iterator, Mapping

from xxhash import xxh3_64_intdigest

# Virtual nodes per unit of weight. A node's share of the keys deviates from its
# weight share by about 1/sqrt(vnodes): with 160, 82 of 100 random 10-node
# memberships had a node more than 10 % off its share; with 1000, 1 of 100 (worst
# 10.2 %). The price is build time: about 1 s for 1000 nodes, 0.06 s for 100
# (tests/test_ring.py). A ring is rebuilt only when the membership changes.
DEFAULT_VNODES = 1000

# A weight is relative: a weight in GiB of capacity would give a node millions of
# virtual nodes and a ring that takes minutes to build. Refuse rather than clamp.
MAX_NODE_VNODES = 1 << 20

_HASH_SPACE = 1 << 64


def _check_vnodes(vnodes: object) -> int:
    if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
        raise ValueError(f"vnodes must be a positive integer, not {vnodes!r}")
    return vnodes


def _check_node(node: object, weight: object, vnodes: int) -> float:
    if not isinstance(node, str) or not node:
        raise ValueError(f"a node id must be a non-empty string, not {node!r}")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise ValueError(f"node {node}: weight must be a number, not {weight!r}")
    weight = float(weight)
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"node {node}: weight must be a finite number > 0, not {weight!r}")
    if round(vnodes * weight) > MAX_NODE_VNODES:
        raise ValueError(
            f"node {node}: weight {weight:g} gives {round(vnodes * weight)} virtual nodes "
            f"(at most {MAX_NODE_VNODES}); weights are relative, use smaller ones"
        )
    return weight


class Ring:
    """An immutable consistent-hash ring of weighted nodes. No method does I/O.

    Args:
        nodes: node id (e.g. ``"10.0.0.5:7070"``) → weight. A node with weight 2
            gets twice the virtual nodes, so about twice the keys, of weight 1.
        vnodes: virtual nodes per unit of weight.

    Raises:
        ValueError: an empty or non-str node id, a weight that is not a finite
            number > 0 (or too large, see `MAX_NODE_VNODES`), or vnodes < 1.
    """

    __slots__ = ("_vnodes", "_weights", "_ids", "_nodes", "_positions", "_owners")

    def __init__(self, nodes: Mapping[str, float] | None = None, vnodes: int = DEFAULT_VNODES):
        self._vnodes = _check_vnodes(vnodes)
        weights = {node: _check_node(node, w, self._vnodes) for node, w in (nodes or {}).items()}
        # Sorted ids: nothing below depends on the order the caller built the mapping in.
        self._ids: tuple[str, ...] = tuple(sorted(weights))
        self._weights: dict[str, float] = {node: weights[node] for node in self._ids}
        self._nodes = frozenset(self._ids)
        # One int per virtual node: position << 32 | index into _ids. Sorting these
        # is 2.6x faster than sorting (position, id) tuples, and equal positions (a
        # 64-bit hash collision) are ordered by node id, the same on every process.
        points: list[int] = []
        for index, node in enumerate(self._ids):
            for i in range(self._count(node)):
                points.append(xxh3_64_intdigest(f"{node}#{i}".encode()) << 32 | index)
        points.sort()
        self._positions = array("Q", [p >> 32 for p in points])
        self._owners = array("I", [p & 0xFFFFFFFF for p in points])

    def _count(self, node: str) -> int:
        # At least one, so every member owns some keys however small its weight.
        return max(1, round(self._vnodes * self._weights[node]))

    # -- lookups ---------------------------------------------------------------

    def owners(self, key: bytes, n: int = 1) -> list[str]:
        """The first `n` distinct nodes clockwise from `key`: the owner, then its fallbacks.

        Args:
            key: the chunk key (any bytes; cachefs uses the 16-byte chunk digest).
            n: how many nodes to return.

        Returns:
            min(n, len(self)) node ids in ring order; [] for an empty ring.

        Raises:
            ValueError: n < 0.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        want = min(n, len(self._ids))
        if want == 0:
            return []
        positions, owners, ids = self._positions, self._owners, self._ids
        total = len(positions)
        start = bisect_left(positions, xxh3_64_intdigest(key))
        if want == 1:
            return [ids[owners[start % total]]]
        found: list[str] = []
        seen: set[int] = set()
        for i in range(start, start + total):
            index = owners[i % total]
            if index not in seen:
                seen.add(index)
                found.append(ids[index])
                if len(found) == want:
                    break
        return found

    def owner(self, key: bytes) -> str | None:
        """The node that owns `key`, or None if the ring is empty."""
        if not self._ids:
            return None
        return self._ids[self._owners[bisect_left(self._positions, xxh3_64_intdigest(key)) % len(self._positions)]]

    def shares(self) -> dict[str, float]:
        """Each node's fraction of the hash space (they sum to 1.0); {} for an empty ring.

        This is the fraction of keys a node owns on average, for status output and
        for checking that weights do what they say.
        """
        if not self._ids:
            return {}
        arcs = dict.fromkeys(self._ids, 0)
        positions, owners, ids = self._positions, self._owners, self._ids
        previous = positions[-1] - _HASH_SPACE  # the last vnode's arc wraps past zero
        for position, index in zip(positions, owners):
            arcs[ids[index]] += position - previous
            previous = position
        return {node: arc / _HASH_SPACE for node, arc in arcs.items()}

    # -- membership ------------------------------------------------------------

    @property
    def nodes(self) -> frozenset[str]:
        return self._nodes

    @property
    def vnodes(self) -> int:
        return self._vnodes

    def weight(self, node: str) -> float:
        """The weight of `node`. Raises KeyError if it is not on the ring."""
        return self._weights[node]

    def with_nodes(self, nodes: Mapping[str, float]) -> Ring:
        """A new ring with `nodes` added (or re-weighted, if already members).

        Returns this ring itself if that changes nothing.

        Raises:
            ValueError: as for `Ring`.
        """
        merged = {**self._weights, **{node: _check_node(node, w, self._vnodes) for node, w in nodes.items()}}
        if merged == self._weights:
            return self
        return Ring(merged, self._vnodes)

    def without(self, node: str) -> Ring:
        """A new ring without `node`; the same ring if it is not a member."""
        if node not in self._weights:
            return self
        return Ring({n: w for n, w in self._weights.items() if n != node}, self._vnodes)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def __iter__(self) -> Iterator[str]:
        """Node ids in sorted order."""
        return iter(self._ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._vnodes == other._vnodes and self._weights == other._weights

    def __hash__(self) -> int:
        return hash((self._vnodes, tuple(self._weights.items())))

    def __repr__(self) -> str:
        members = ", ".join(f"{node!r}: {weight:g}" for node, weight in self._weights.items())
        return f"Ring({{{members}}}, vnodes={self._vnodes})"
