"""The dataset every system reads, written once through S3, and the raw S3 baseline.

Layout under ``s3://BUCKET/bench/`` (and the same under the tmpfs copy)::

    big.bin                       one big file (--size): sequential and random reads
    small/dNN/fNNNN.bin           64 KiB files, 100 per directory: files/s
    ttfb/fNN.bin                  8 MiB files, each opened once per pass: time to first byte

The bytes are random (nothing compresses or deduplicates them) and a copy is
kept on tmpfs: it is the tmpfs system, the pyfuse3 ceiling's source and the
reference the warm-up pass compares samples against.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.host import MiB

PREFIX = "bench"
BIG = "big.bin"


@dataclasses.dataclass(frozen=True)
class Dataset:
    big_size: int
    small_count: int
    ttfb_count: int
    small_size: int = 64 << 10
    ttfb_size: int = 8 * MiB

    @property
    def small_paths(self) -> list[str]:
        return [f"small/d{i // 100:02d}/f{i:04d}.bin" for i in range(self.small_count)]

    @property
    def ttfb_paths(self) -> list[str]:
        return [f"ttfb/f{i:02d}.bin" for i in range(self.ttfb_count)]

    @property
    def total_bytes(self) -> int:
        return self.big_size + self.small_count * self.small_size + self.ttfb_count * self.ttfb_size

    def write(self, s3, local_root: Path) -> float:
        """Write every file through S3 (``s3`` is a started JuicefsS3) and to ``local_root``.

        Returns:
            Seconds spent.
        """
        t0 = time.monotonic()
        fs = s3.s3fs()
        base = f"{s3.bucket}/{PREFIX}"
        local_root.mkdir(parents=True, exist_ok=True)
        piece = 64 * MiB
        # Multipart upload in 64 MiB parts; the gateway then serves an ETag "<md5>-<parts>".
        with fs.open(f"{base}/{BIG}", "wb", block_size=piece) as remote, open(local_root / BIG, "wb") as local:
            left = self.big_size
            while left:
                data = os.urandom(min(piece, left))
                remote.write(data)
                local.write(data)
                left -= len(data)
        rng = random.Random(5)
        files = {path: rng.randbytes(self.small_size) for path in self.small_paths}
        files.update({path: rng.randbytes(self.ttfb_size) for path in self.ttfb_paths})
        for path, data in files.items():
            target = local_root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        # Concurrent PUTs, a few hundred at a time to bound memory and sockets.
        items = list(files.items())
        for i in range(0, len(items), 256):
            fs.pipe({f"{base}/{path}": data for path, data in items[i:i + 256]})
        return time.monotonic() - t0


def raw_s3_read(s3, size: int, streams: int = 8, range_size: int = 4 * MiB) -> dict:
    """Read ``big.bin`` once with ranged GETs from ``streams`` threads through s3fs.

    The baseline for cold reads: what a Python S3 client gets from this backend
    at this concurrency. The caller drops the page cache first, as for cold reads.

    Returns:
        {"mib_s", "seconds", "bytes", "gets"}
    """
    fs = s3.s3fs()
    path = f"{s3.bucket}/{PREFIX}/{BIG}"
    fs.cat_file(path, start=0, end=1)  # connect and sign once, untimed
    ranges = iter(range(0, size, range_size))
    lock = threading.Lock()
    counts = {"bytes": 0, "gets": 0}

    def stream() -> None:
        while True:
            with lock:
                start = next(ranges, None)
            if start is None:
                return
            data = fs.cat_file(path, start=start, end=min(start + range_size, size))
            with lock:
                counts["bytes"] += len(data)
                counts["gets"] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        for future in [pool.submit(stream) for _ in range(streams)]:
            future.result()
    seconds = time.perf_counter() - t0
    if counts["bytes"] != size:
        raise RuntimeError(f"raw S3 read returned {counts['bytes']} bytes of {size}")
    return {"mib_s": size / MiB / seconds, "seconds": seconds, **counts}


def raw_fast_read(s3, dataset: Dataset, streams: int = 8, range_size: int = 4 * MiB) -> dict:
    """Read every file of ``dataset`` once with ranged GETs of at most ``range_size``
    from ``streams`` threads, with cachefs's own S3 client (backend.S3FastPath:
    presigned URLs, kept-alive connections, bodies received into one buffer), and
    store nothing: the same bytes and requests a warm-up makes, without a cache.

    The ceiling of a warm-up through this backend on this machine, as
    `raw_s3_read` is for reads. The caller drops the page cache first.

    Returns:
        {"mib_s", "seconds", "bytes", "gets"}
    """
    from cachefs.backend import S3FastPath

    fast = S3FastPath(s3.endpoint_url, (s3.access_key, s3.secret_key), 60.0)
    sizes = {BIG: dataset.big_size, **dict.fromkeys(dataset.ttfb_paths, dataset.ttfb_size),
             **dict.fromkeys(dataset.small_paths, dataset.small_size)}
    # Small files first, as a warm-up walks them; then the rest, range by range.
    work = iter([(path, start, min(start + range_size, size)) for path, size in sorted(sizes.items(), key=lambda i: i[1])
                 for start in range(0, size, range_size)])
    lock = threading.Lock()
    counts = {"bytes": 0, "gets": 0}
    fast.get(s3.bucket, f"{PREFIX}/{BIG}", 0, 1, {})  # connect and sign once, untimed

    def stream() -> None:
        try:
            while True:
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                path, start, end = item
                data, _ = fast.get(s3.bucket, f"{PREFIX}/{path}", start, end, {})
                with lock:
                    counts["bytes"] += len(data)
                    counts["gets"] += 1
        finally:
            fast.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        for future in [pool.submit(stream) for _ in range(streams)]:
            future.result()
    seconds = time.perf_counter() - t0
    if counts["bytes"] != dataset.total_bytes:
        raise RuntimeError(f"raw S3 read returned {counts['bytes']} bytes of {dataset.total_bytes}")
    return {"mib_s": dataset.total_bytes / MiB / seconds, "seconds": seconds, **counts}
