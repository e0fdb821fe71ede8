"""Metrics through real processes: byte attribution on a real mount, and the
Grafana dashboard in deploy/grafana/ against what a real mount and worker serve."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

CHUNK = 256 << 10
MiB = 1 << 20
SMALL_CHUNKS = ("--chunk-size", "256K", "--mem-size", "64M", "--cache-size", "256M", "--read-ahead", "8")


def _read_all(path: str, block: int = 128 << 10) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            n += len(data)
    return n


def _drop_page_cache(path: str) -> None:
    # Only this file's pages: the next pass must reach cachefs again.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _by_source(mount) -> dict[str, float]:
    return {s: mount.metric("cachefs_read_bytes_total", source=s) for s in ("mem", "disk", "peer", "backend")}


def test_cold_pass_counts_read_ahead_bytes_as_backend(local_source, cachefs_mount):
    """Read-ahead moves chunks into MEM before the reader asks; the reader's bytes
    still came from the backend, and must be counted so (not as MEM hits)."""
    size = 48 * CHUNK + 1000
    local_source.write("big.bin", random.Random(1).randbytes(size))
    m = cachefs_mount(local_source, *SMALL_CHUNKS)
    path = os.path.join(m.mountpoint, "big.bin")

    assert _read_all(path) == size
    cold = _by_source(m)
    print(f"\ncold pass: {', '.join(f'{s} {v / MiB:.2f} MiB' for s, v in cold.items())} of {size / MiB:.2f} MiB")
    assert m.metric("cachefs_readahead_chunks_total") > 0  # read-ahead did take part
    assert sum(cold.values()) == size
    assert cold["backend"] >= 0.98 * size
    assert cold["mem"] + cold["disk"] <= 0.02 * size
    # Per dataset, the same truth.
    assert m.metric("cachefs_dataset_read_bytes_total", source="backend") == cold["backend"]

    _drop_page_cache(path)
    assert _read_all(path) == size
    warm = {s: v - cold[s] for s, v in _by_source(m).items()}
    print(f"warm pass: {', '.join(f'{s} {v / MiB:.2f} MiB' for s, v in warm.items())}")
    assert warm["backend"] == 0
    assert warm["mem"] + warm["disk"] == size
