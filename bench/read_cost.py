"""cachefs's own CPU per MEM-hit read, without FUSE: the part of a small O_DIRECT
read's cost that is ours, where bench/'s rand 4k direct cells also time pyfuse3,
trio and the kernel's round trip (the pyfuse3 ceiling pays those too).

    python -m bench.read_cost [--size 256M] [--reads 200000] [--block 4K]

Builds a node on a local source file in a temporary directory, opens the file
through `Operations` as the kernel would, reads it whole once (MEM now holds
it), then times random reads of --block bytes with `time.process_time`, best
of 5 rounds. Process CPU time barely moves with other work on the machine, so
two trees compare fairly back to back (PYTHONPATH=TREE python -m bench.read_cost).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import pyfuse3
import trio

from cachefs import cli
from cachefs.config import parse_size
from cachefs.fuse_ops import Operations
from cachefs.node import Node


async def _measure(source_dir: str, cache_dir: str, size: int, reads: int, block: int) -> float:
    argv = ["mount", "--cache-size", "0", "--mem-size", str(2 * size), "--cache-dir", cache_dir,
            source_dir, os.path.join(cache_dir, "mnt")]
    args, extra = cli._parser().parse_known_args(argv)
    config = cli._node_config(args, extra)
    async with Node(config, config.datasets, name="read-cost") as node:
        ops = Operations(node, entry_ttl=config.entry_ttl, attr_ttl=config.attr_ttl, block_size=1 << 20)
        attr = await ops.lookup(pyfuse3.ROOT_INODE, b"data.bin", None)
        fh = (await ops.open(attr.st_ino, os.O_RDONLY, None)).fh
        for offset in range(0, size, 1 << 20):
            await ops.read(fh, offset, 1 << 20)
        rng = random.Random(1)
        offsets = [rng.randrange(size // block) * block for _ in range(reads)]
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            for offset in offsets:
                await ops.read(fh, offset, block)
            best = min(best, (time.process_time() - t0) / reads)
        await ops.release(fh)
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="size of the file (default 256M)")
    parser.add_argument("--reads", type=int, default=200_000, help="reads per round (default 200000)")
    parser.add_argument("--block", default="4K", help="bytes per read (default 4K)")
    a = parser.parse_args()
    size, block = parse_size(a.size, "--size"), parse_size(a.block, "--block")
    with tempfile.TemporaryDirectory(prefix="cachefs-read-cost-") as tmp:
        source_dir, cache_dir = os.path.join(tmp, "src"), os.path.join(tmp, "cache")
        os.makedirs(source_dir)
        os.makedirs(os.path.join(cache_dir, "mnt"))
        with open(os.path.join(source_dir, "data.bin"), "wb") as f:
            f.write(os.urandom(size))
        seconds = trio.run(_measure, source_dir, cache_dir, size, a.reads, block)
    print(f"cachefs CPU per {a.block} MEM-hit read, FUSE excluded: {seconds * 1e6:.2f} µs (best of 5 × {a.reads:,})")


if __name__ == "__main__":
    main()
