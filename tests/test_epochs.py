"""Epochs over a dataset twice the SSD tier (MEM off), through a real mount on
the S3 gateway: the backend serves each epoch at most once (plus one chunk per
reader) whatever the admission policy, and `--admission scan-resistant` makes
every epoch after the first hit about capacity/dataset, where LRU hits nothing."""

from __future__ import annotations

import os
import random

import pytest

pytestmark = pytest.mark.integration

CHUNK = 256 << 10
KiB, MiB = 1 << 10, 1 << 20
CACHE = 6 * MiB


def _dataset() -> dict[str, bytes]:
    """About 12 MiB (2 x CACHE) of mixed sizes: one file of many chunks, files of a
    few chunks, and small ones of a fraction of a chunk."""
    rng = random.Random(14)
    files = {"big.bin": rng.randbytes(4 * MiB)}
    files.update({f"mid/m{i}.bin": rng.randbytes(rng.randint(300 * KiB, 1200 * KiB)) for i in range(8)})
    files.update({f"small/s{i:02d}.bin": rng.randbytes(32 * KiB) for i in range(40)})
    return files


def _epoch(root: str, files: dict[str, bytes], block: int = 64 * KiB, first: int = 0) -> None:
    """Read every file in full, in order, `block` bytes at a time (after a first
    read of `first` bytes, if given), dropping its pages first so the reads reach
    cachefs."""
    for name, data in files.items():
        path = os.path.join(root, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        with open(path, "rb", buffering=0) as f:
            got = bytearray(f.read(first) if first else b"")
            while piece := f.read(block):  # several reads per chunk, as the kernel sends them
                got += piece
        assert got == data, name


@pytest.mark.parametrize("admission", ["lru", "scan-resistant"])
def test_epochs_twice_the_cache_read_the_backend_at_most_once(s3_source, cachefs_mount, admission):
    files = _dataset()
    for name, data in files.items():
        s3_source.write(name, data)
    total = sum(len(d) for d in files.values())
    mount = cachefs_mount(s3_source, "--chunk-size", "256K", "--mem-size", "0", "--cache-size", str(CACHE),
                          "--read-ahead", "16", "--admission", admission)
    per_epoch = []
    for _ in range(3):
        before = {k: mount.metric(name, **labels) for k, (name, labels) in _SERIES.items()}
        _epoch(mount.mountpoint, files)
        per_epoch.append({k: mount.metric(name, **labels) - before[k] for k, (name, labels) in _SERIES.items()})
    print(f"\n{admission}: dataset {total} bytes, cache {CACHE}; per epoch: {per_epoch}")
    for epoch in per_epoch:
        # One reader: at most the data, plus one chunk.
        assert epoch["backend"] <= total + CHUNK
    assert per_epoch[0]["disk"] == 0, "nothing was cached before the first epoch"
    for epoch in per_epoch[1:]:
        hits = epoch["disk"] / total
        if admission == "lru":
            assert hits < 0.2
        else:
            assert hits >= 0.35  # about CACHE/total = 0.5, less the chunk headers' share of the cache
            assert epoch["written"] <= 0.5 * CACHE


@pytest.mark.parametrize("admission", ["lru", "scan-resistant"])
def test_a_first_epoch_in_small_reads_fetches_each_chunk_once(s3_source, cachefs_mount, admission):
    # cachefs's default 4 MiB chunks read as `tar` reads: first what is left of
    # its 10 KiB record after the file's header (here 2 KiB), then 10 KiB at a
    # time. The kernel's read-ahead then starts at 16 KiB and grows: its requests
    # end at no 64 KiB boundary, and the reader must hold each chunk until its
    # last byte is read. Let go earlier, the rest of it came from the SSD (a
    # "hit" on data never read before) or, where the SSD had not admitted it,
    # from the backend again.
    rng = random.Random(4)
    files = {"one-chunk.bin": rng.randbytes(3844411), "chunks.bin": rng.randbytes(9 * MiB + 4321)}
    files.update({f"small/s{i:02d}.bin": rng.randbytes(64 * KiB) for i in range(24)})
    files.update({f"mixed/x{i}.bin": rng.randbytes(rng.randint(256 * KiB, 4 * MiB)) for i in range(4)})
    for name, data in files.items():
        s3_source.write(name, data)
    total = sum(len(d) for d in files.values())
    mount = cachefs_mount(s3_source, "--mem-size", "0", "--cache-size", "8M", "--admission", admission)
    _epoch(mount.mountpoint, files, block=10 * KiB, first=2 * KiB)
    got = {k: mount.metric(name, **labels) for k, (name, labels) in _SERIES.items()}
    print(f"\n{admission}: dataset {total} bytes; first epoch: {got}")
    assert got["backend"] == total
    assert got["disk"] == 0


_SERIES = {
    "backend": ("cachefs_backend_read_bytes_total", {}),
    "disk": ("cachefs_read_bytes_total", {"source": "disk"}),
    "written": ("cachefs_cache_written_bytes_total", {"tier": "disk"}),
}
