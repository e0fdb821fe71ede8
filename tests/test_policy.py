"""The SSD tier's eviction order and admission: SLRU keeps a hot set through a
read-once scan, where LRU keeps nothing; `--admission scan-resistant` also
keeps a stable part of epochs larger than the cache, where both keep nothing."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.cache.policy import ScanResistant, SegmentedLRU, make_index


def _simulate(policy: str, capacity_chunks: int, dataset_chunks: int, epochs: int) -> float:
    """Hit ratio of epochs 2.. of a cyclic scan, with one-chunk entries."""
    if policy == "slru":
        index = SegmentedLRU(capacity_chunks)
    else:
        index = OrderedDict()
    hits = lookups = 0
    for epoch in range(epochs):
        for i in range(dataset_chunks):
            key = i.to_bytes(16, "big")
            hit = key in index
            if epoch:
                lookups += 1
                hits += hit
            if hit:
                index.touch(key) if policy == "slru" else index.move_to_end(key)
                continue
            while len(index) >= capacity_chunks:
                index.pop_victim() if policy == "slru" else index.popitem(last=False)
            index.add(key, 1) if policy == "slru" else index.__setitem__(key, 1)
    return hits / lookups


def _hot_hits_after_scan(policy: str) -> float:
    """A hot set re-read by every job, then one read-once scan of 3x the cache:
    how much of the hot set still hits afterwards."""
    capacity, hot, scan = 1000, 400, 3000
    index = SegmentedLRU(capacity) if policy == "slru" else OrderedDict()

    def access(key: bytes) -> bool:
        if key in index:
            index.touch(key) if policy == "slru" else index.move_to_end(key)
            return True
        while len(index) >= capacity:
            index.pop_victim() if policy == "slru" else index.popitem(last=False)
        index.add(key, 1) if policy == "slru" else index.__setitem__(key, 1)
        return False

    for _ in range(3):
        for i in range(hot):
            access(b"hot" + i.to_bytes(8, "big"))
    for i in range(scan):
        access(b"scan" + i.to_bytes(8, "big"))
    return sum(access(b"hot" + i.to_bytes(8, "big")) for i in range(hot)) / hot


def test_a_read_once_scan_does_not_flush_the_hot_set():
    lru, slru = _hot_hits_after_scan("lru"), _hot_hits_after_scan("slru")
    print(f"\nhot set hits after a 3x-cache scan: LRU {lru:.0%}, SLRU {slru:.0%}")
    assert lru == 0.0
    assert slru == 1.0


def test_slru_alone_does_not_help_cyclic_epochs_larger_than_the_cache():
    """What `--admission lru` gives (policy.py): every chunk is gone before its second read."""
    assert _simulate("slru", 1000, 1500, 4) == _simulate("lru", 1000, 1500, 4) == 0.0


class _Tier:
    """A tier of one-unit chunks driven as DiskTier drives its index: admit, evict, add; touch on a hit."""

    def __init__(self, admission: str, capacity: int):
        self.index = make_index(admission, capacity)
        self.capacity = capacity
        self.used = 0

    def access(self, key: bytes) -> tuple[bool, bool]:
        """Returns (hit, written)."""
        if key in self.index:
            self.index.touch(key)
            return True, False
        reason = self.index.admit(key, 1, self.used + 1 > self.capacity)
        if reason is None:
            return False, False
        while self.used + 1 > self.capacity:
            try:
                self.index.pop_victim(key if reason == "sample" else None)
            except KeyError:
                return False, False
            self.used -= 1
        self.index.add(key, 1)
        self.used += 1
        return False, True

    def epoch(self, keys: list[bytes]) -> tuple[float, int]:
        """Returns (hit ratio, chunks written)."""
        results = [self.access(k) for k in keys]
        return sum(h for h, _ in results) / len(keys), sum(w for _, w in results)


def _keys(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


@pytest.mark.parametrize("dataset", [1500, 2000, 3000])
def test_scan_resistant_keeps_a_stable_sample_of_epochs_larger_than_the_cache(dataset):
    capacity = 1000
    epochs = {}
    for admission in ("lru", "scan-resistant"):
        tier = _Tier(admission, capacity)
        epochs[admission] = [tier.epoch(_keys("c", dataset)) for _ in range(4)]
    print(f"\ncyclic scan of {dataset / capacity:g}x the cache, (hits, chunks written) per epoch: {epochs}")
    assert all(hits == 0.0 for hits, _ in epochs["lru"])
    for hits, written in epochs["scan-resistant"][1:]:
        # About capacity/dataset of every later epoch hits, and nothing is rewritten.
        assert hits >= 0.95 * capacity / dataset
        assert written == 0
    if dataset == 2000:
        assert min(h for h, _ in epochs["scan-resistant"][1:]) >= 0.4


def test_the_sample_is_the_same_after_a_restart():
    """The rank is a fixed hash of the key: a restarted tier that rebuilt its index
    keeps the same chunks, and a fresh one over the same dataset samples the same ones."""
    held = []
    for _ in range(2):
        tier = _Tier("scan-resistant", 100)
        tier.epoch(_keys("c", 300))
        held.append({k for k in _keys("c", 300) if k in tier.index})
    assert held[0] == held[1] and len(held[0]) == 100


def test_scan_resistant_keeps_a_hot_set_mixed_with_a_scan():
    """A hot set re-read between the chunks of a cyclic scan of 2x the cache: all of
    it stays resident, and the scan still gets the rest of the cache."""
    capacity, hot, scan = 1000, _keys("hot", 300), _keys("scan", 2000)
    for admission, scan_floor in (("lru", 0.0), ("scan-resistant", 0.3)):
        tier = _Tier(admission, capacity)
        for epoch in range(4):
            hot_hits = scan_hits = 0
            for i, key in enumerate(scan):
                scan_hits += tier.access(key)[0]
                hot_hits += tier.access(hot[i % len(hot)])[0]
        print(f"\n{admission}: last epoch, hot set {hot_hits / len(scan):.0%} hits, scan {scan_hits / len(scan):.0%}")
        assert hot_hits == len(scan)  # every hot read of the last epoch hit
        assert scan_hits >= scan_floor * len(scan)


def test_scan_resistant_lets_a_new_working_set_that_fits_replace_an_old_sample():
    tier = _Tier("scan-resistant", 1000)
    for _ in range(3):
        tier.epoch(_keys("old", 2000))  # its sample hits, so it sits in the protected segment
    ratios = [tier.epoch(_keys("new", 500))[0] for _ in range(4)]
    assert ratios[-1] == 1.0


def test_scan_resistant_keeps_the_hot_set_through_a_read_once_scan():
    capacity, tier = 1000, _Tier("scan-resistant", 1000)
    hot = _keys("hot", 400)
    for _ in range(3):
        tier.epoch(hot)
    tier.epoch(_keys("scan", 3 * capacity))
    assert tier.epoch(hot)[0] == 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["access", "pin", "unpin", "pop"]), st.integers(0, 60))))
def test_scan_resistant_stays_consistent(ops):
    tier = _Tier("scan-resistant", 20)
    index: ScanResistant = tier.index
    pinned: set[bytes] = set()
    for op, k in ops:
        key = bytes([k])
        if op == "access":
            tier.access(key)
        elif op == "pin":
            if index.pin(key):
                pinned.add(key)
        elif op == "unpin":
            index.unpin(key)
            pinned.discard(key)
        elif index.pop(key) is not None:
            tier.used -= 1
            pinned.discard(key)
        assert len(index) == tier.used
        assert tier.used <= tier.capacity or pinned
        assert set(index._last) == set(index._probation) | set(index._protected)
        assert index._recent_bytes == sum(index._recent.values()) <= max(index.capacity, 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "touch", "pop", "victim"]), st.integers(0, 30), st.integers(1, 50))))
def test_segments_stay_consistent(ops):
    capacity = 200
    slru = SegmentedLRU(capacity)
    model: dict[bytes, int] = {}
    for op, k, size in ops:
        key = bytes([k])
        if op == "add":
            slru.add(key, size)
            model[key] = size
        elif op == "touch":
            slru.touch(key)
        elif op == "pop":
            assert slru.pop(key) == model.pop(key, None)
        elif model:
            victim, vsize = slru.pop_victim()
            assert model.pop(victim) == vsize
        assert len(slru) == len(model)
        assert all(key in slru for key in model)
        protected = sum(slru._protected.values())
        assert protected == slru._protected_bytes
        assert protected <= slru.protected_limit or len(slru._protected) == 1
