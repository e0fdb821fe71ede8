"""Peer protocol throughput without FUSE or a backend: a PeerServer in a child
process serves one 4 MiB chunk from memory; PeerClients in this process fetch it
at several concurrencies. Isolates the wire path behind the "peer hit" cells
(about 2 GiB/s here, so a slow peer hit is the mount's side, not the wire).

    .venv/bin/python -m bench.peer_wire [--concurrency 1,4,16] [--requests 256]

Prints MiB/s per concurrency for (a) N requests issued at once on one
connection and (b) the same requests serialised by a semaphore outside the
client. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time

import trio

CHUNK = 4 << 20
SECRET = b"peer-wire-bench"


async def _serve(port: int) -> None:
    from cachefs.peer.server import PeerServer

    data = os.urandom(CHUNK)

    class FromMemory:
        chunk_size = CHUNK

        async def chunk(self, obj, index):
            return data, "mem"

    server = PeerServer("bench-server", SECRET, {"src": FromMemory()}, max_payload=CHUNK)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(trio.serve_tcp, server.handle, port, host="127.0.0.1"))
        print("ready", flush=True)


async def _fetch(addr: str, requests: int, concurrency: int, outside: bool) -> float:
    from cachefs.objects import ObjectId
    from cachefs.peer.client import PeerClient

    obj = ObjectId("src", "f", "v", 1 << 40)
    async with trio.open_nursery() as nursery:
        client = PeerClient("bench-client", SECRET, nursery, max_payload=CHUNK)
        await client.get_chunk(addr, obj, CHUNK, 0)  # connect and authenticate first
        gate = trio.Semaphore(1 if outside else concurrency)
        total = 0
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal total
            async with gate:
                data = await client.get_chunk(addr, obj, CHUNK, i)
            total += len(data)  # not `total += len(await ...)`: that reads total before the await

        async with trio.open_nursery() as requests_nursery:
            for i in range(requests):
                requests_nursery.start_soon(one, i)
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return total / elapsed / (1 << 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        trio.run(_serve, a.serve)
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from juicefs_backend import free_port, stop_process

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.peer_wire", "--serve", str(port)], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        for n in (int(c) for c in a.concurrency.split(",")):
            at_once = trio.run(_fetch, f"127.0.0.1:{port}", a.requests, n, False)
            serial = trio.run(_fetch, f"127.0.0.1:{port}", a.requests, n, True)
            print(f"{n:3d} tasks: {at_once:7.0f} MiB/s issued at once, {serial:7.0f} MiB/s one at a time")
    finally:
        stop_process(server, timeout=5)


if __name__ == "__main__":
    main()
