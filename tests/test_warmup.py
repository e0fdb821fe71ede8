"""`cachefs warmup`: the job's accounting in-process with fakes and trio's fake
clock; the peer protocol's LoadChunk over memory streams; and real mounts,
workers and an S3 server whose GETs are counted at a proxy in front of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pytest
import trio
import trio.testing

from conftest import REPO, S3Proxy, hermetic_env, serve_on_loopback

from cachefs.errors import BackendError, ConfigError, ObjectNotFound
from cachefs.objects import ObjectInfo, chunk_key
from cachefs.peer import protocol
from cachefs.peer.protocol import Auth, ChunkData, GetChunk, Hello, LoadChunk, Loaded, Ready
from cachefs.peer.server import PeerServer
from cachefs.peer.stream import FrameStream
from cachefs.warmup import RUN_CHUNKS, Warmups

CHUNK = 256 << 10
SMALL = ("--chunk-size", "256K", "--mem-size", "32M", "--cache-size", "128M")


# -- fakes ---------------------------------------------------------------------------------


class FakeTier:
    name = "mem"
    medium = "memory"

    def __init__(self):
        self.held: set[bytes] = set()

    def __contains__(self, digest: bytes) -> bool:
        return digest in self.held


class FakeReader:
    """Loads a chunk in `delay` seconds into its one tier; paths in `broken` fail."""

    def __init__(self, chunk_size: int = CHUNK, delay: float = 1.0, broken: tuple[str, ...] = ()):
        self.chunk_size = chunk_size
        self.tier = FakeTier()
        self.tiers = [self.tier]
        self.delay = delay
        self.broken = broken
        self.fetches = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def chunk(self, obj, index):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(self.delay)
            if obj.path in self.broken:
                raise BackendError(f"{obj.path}: 503 slow down")
            self.fetches += 1
            self.tier.held.add(chunk_key(obj, self.chunk_size, index).digest)
            return b"", "backend"
        finally:
            self.in_flight -= 1


    async def warm(self, obj, index):
        return (await self.warm_run(obj, index, 1))[0]

    async def warm_run(self, obj, index, count):
        cached = [chunk_key(obj, self.chunk_size, i).digest in self.tier.held for i in range(index, index + count)]
        for i, held in enumerate(cached):
            if not held:
                await self.chunk(obj, index + i)
        return cached


class FakeNamespace:
    def __init__(self, files: dict[str, int]):
        self.files = files

    def _info(self, path: str) -> ObjectInfo:
        if path in self.files:
            return ObjectInfo(path, "file", self.files[path], 0.0, f"etag:{path}")
        if path == "" or any(f.startswith(path + "/") for f in self.files):
            return ObjectInfo(path, "dir", 0, 0.0, "dir")
        raise ObjectNotFound(path)

    async def stat(self, path: str) -> ObjectInfo:
        return self._info(path)

    async def list_dir(self, path: str) -> list[ObjectInfo]:
        prefix = path + "/" if path else ""
        names = {f[len(prefix):].split("/")[0] for f in self.files if f.startswith(prefix)}
        return [self._info(prefix + n) for n in sorted(names)]


def _node(files: dict[str, int], reader: FakeReader, mem: int = 1 << 40):
    dataset = types.SimpleNamespace(
        name="ds", source="mem://src", reader=reader, namespace=FakeNamespace(files),
        config=types.SimpleNamespace(quota=None),
    )
    return types.SimpleNamespace(
        datasets={"ds": dataset}, peers=None, disk=None, mem=types.SimpleNamespace(capacity=mem),
        config=types.SimpleNamespace(peer_timeout=5.0, backend_timeout=30.0),
    )


async def _finish(warmups: Warmups, job: str) -> dict:
    while (p := await warmups.progress(job, wait=0.5))["state"] not in ("done", "failed", "cancelled"):
        pass
    return p


FILES = {"a/x.bin": 3 * CHUNK + 5, "a/b/y.bin": CHUNK, "a/b/c/z.bin": 1, "a/empty": 0, "top.bin": 2 * CHUNK}


# -- the job, in-process ------------------------------------------------------------------------


@pytest.mark.trio
async def test_progress_is_exact_in_bytes_and_a_rerun_finds_everything_cached(autojump_clock):
    reader = FakeReader()
    async with trio.open_nursery() as nursery:
        warmups = Warmups(_node(FILES, reader), nursery)
        p = await warmups.start(["ds/a"], recursive=True, concurrency=2)
        first = await _finish(warmups, p["job"])
        total = sum(v for k, v in FILES.items() if k.startswith("a/"))
        assert first["state"] == "done" and first["files_total"] == first["files_done"] == 4
        assert first["bytes_total"] == first["bytes_loaded"] == first["bytes_done"] == total
        assert first["chunks_loaded"] == 4 + 1 + 1 and first["bytes_cached"] == 0 and first["ratio"] == 1.0
        assert reader.most_in_flight == 2  # --concurrency bounds the chunks in flight

        again = await _finish(warmups, (await warmups.start(["ds/a"], recursive=True))["job"])
        assert again["bytes_cached"] == total and again["bytes_loaded"] == 0 and reader.fetches == 6


@pytest.mark.trio
async def test_a_progress_request_is_answered_the_moment_its_job_ends(autojump_clock):
    """`warmup.progress` with a wait: answered when the job ends, not a polling
    interval later (the CLI used to learn of the end up to 0.5 s late)."""
    async with trio.open_nursery() as nursery:
        warmups = Warmups(_node(FILES, FakeReader(delay=1.25)), nursery)
        job = (await warmups.start(["ds/top.bin"]))["job"]  # two chunks, one after the other: 2.5 s
        asked_at = trio.current_time()
        p = await warmups.progress(job, wait=5.0)
        assert p["state"] == "done" and trio.current_time() - asked_at == pytest.approx(2.5)
        again = trio.current_time()
        assert (await warmups.progress(job, wait=5.0))["state"] == "done"  # an ended job: at once
        assert trio.current_time() == again


@pytest.mark.trio
async def test_a_progress_request_waits_at_most_its_wait(autojump_clock):
    reader = FakeReader()
    async with trio.open_nursery() as nursery:
        warmups = Warmups(_node(FILES, reader), nursery)
        job = (await warmups.start(["ds"], recursive=True, concurrency=1))["job"]
        t0 = trio.current_time()
        p = await warmups.progress(job, wait=0.25)
        assert p["state"] == "running" and trio.current_time() - t0 == pytest.approx(0.25)
        t0 = trio.current_time()
        await warmups.progress(job, wait=3600)
        assert trio.current_time() - t0 <= 5.0  # MAX_WAIT: a request never holds the socket long
        warmups.cancel(job)


@pytest.mark.trio
async def test_a_directory_without_recursive_is_its_own_files(autojump_clock):
    async with trio.open_nursery() as nursery:
        warmups = Warmups(_node(FILES, FakeReader()), nursery)
        p = await _finish(warmups, (await warmups.start(["ds/a", "ds/a/x.bin"]))["job"])
        assert p["files_total"] == 2 and p["bytes_total"] == 3 * CHUNK + 5  # x.bin once, the empty file


@pytest.mark.trio
async def test_cancel_stops_and_a_rerun_resumes(autojump_clock):
    reader = FakeReader()
    async with trio.open_nursery() as nursery:
        warmups = Warmups(_node(FILES, reader), nursery)
        job = (await warmups.start(["ds"], recursive=True, concurrency=1))["job"]
        await trio.sleep(3.5)
        p = warmups.cancel(job)
        p = await _finish(warmups, job)
        # A load is a run of a file's chunks, counted when it ends: the run cut short
        # counts nothing, though its first chunks are in the cache.
        assert len(reader.tier.held) == 3
        assert p["state"] == "cancelled" and 0 < p["chunks_loaded"] <= 3
        rerun = await _finish(warmups, (await warmups.start(["ds"], recursive=True))["job"])
        assert rerun["state"] == "done" and rerun["chunks_cached"] == 3 and rerun["chunks_loaded"] == rerun["chunks_total"] - 3


@pytest.mark.trio
async def test_failed_files_are_counted_and_listed(autojump_clock):
    files = {f"f{i:02d}": CHUNK for i in range(25)}
    reader = FakeReader(broken=tuple(files)[:22])
    async with trio.open_nursery() as nursery:
        warmups = Warmups(_node(files, reader), nursery)
        p = await _finish(warmups, (await warmups.start(["ds"]))["job"])
        assert p["state"] == "done" and p["files_failed"] == p["failed_count"] == 22 and p["files_done"] == 3
        assert len(p["failures"]) == 20 and {"path": "ds/f00", "error": "f00: 503 slow down"} in p["failures"][:8]
        assert p["bytes_failed"] == 22 * CHUNK and p["bytes_loaded"] == 3 * CHUNK


@pytest.mark.trio
async def test_a_set_larger_than_the_cache_is_refused(autojump_clock):
    reader = FakeReader()
    async with trio.open_nursery() as nursery:
        warmups = Warmups(_node(FILES, reader, mem=4 * CHUNK), nursery)
        p = await _finish(warmups, (await warmups.start(["ds"], recursive=True))["job"])
        assert p["state"] == "failed" and p["error"].startswith("cannot fit: ") and "memory cache holds 1.0 MiB" in p["error"]
        assert reader.fetches == 0


@pytest.mark.trio
async def test_bad_paths_are_one_line_errors():
    async with trio.open_nursery() as nursery:
        warmups = Warmups(_node(FILES, FakeReader()), nursery)
        for path, message in [
            ("nope/x", "no dataset 'nope' in this mount (have: ds)"),
            ("ds/missing", "ds/missing: no such file or directory"),
            ("ds/../etc", "not a path inside the mount"),
        ]:
            with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
                await warmups.start([path])
        with pytest.raises(ConfigError, match="concurrency"):
            await warmups.start(["ds"], concurrency=0)
        assert not warmups.jobs


# -- LoadChunk over the peer protocol -------------------------------------------------------------


async def _peer(server: PeerServer, nursery, version: int) -> tuple[FrameStream, int]:
    client, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle, server_end)
    frames = FrameStream(client, max_payload=CHUNK)
    nonce = os.urandom(16)
    await frames.send({**Hello(version, "client", nonce).to_header()})
    hello = protocol.parse_message((await frames.receive())[0])
    await frames.send(Auth(protocol.hello_mac(b"s", "client", nonce, hello.nonce)).to_header())
    assert protocol.parse_message((await frames.receive())[0]) == Ready()
    return frames, hello.version


@pytest.mark.trio
async def test_load_fills_the_owner_and_says_whether_it_was_cached():
    reader = FakeReader(delay=0)
    server = PeerServer("w", b"s", {"mem://src": reader}, max_payload=CHUNK)
    fields = dict(source="mem://src", path="f.bin", version="v", size=3 * CHUNK, chunk_size=CHUNK, index=1)
    async with trio.open_nursery() as nursery:
        frames, version = await _peer(server, nursery, protocol.PROTOCOL_VERSION)
        assert version == protocol.PROTOCOL_VERSION  # the newest: LoadChunk runs included
        for request_id, cached in ((1, False), (2, True)):
            await frames.send(LoadChunk(id=request_id, **fields).to_header())
            header, payload = await frames.receive()
            assert protocol.parse_message(header) == Loaded(request_id, cached) and payload == b""
        assert reader.fetches == 1
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_v3_load_of_a_run_says_which_chunks_were_cached():
    reader = FakeReader(delay=0)
    server = PeerServer("w", b"s", {"mem://src": reader}, max_payload=CHUNK)
    fields = dict(source="mem://src", path="f.bin", version="v", size=3 * CHUNK + 1, chunk_size=CHUNK)
    async with trio.open_nursery() as nursery:
        frames, version = await _peer(server, nursery, 3)
        await frames.send(LoadChunk(id=1, **fields, index=1, count=1).to_header())
        assert protocol.parse_message((await frames.receive())[0]) == Loaded(1, False)
        await frames.send(LoadChunk(id=2, **fields, index=0, count=4).to_header())
        assert protocol.parse_message((await frames.receive())[0]) == Loaded(2, False, cached_mask=0b0010)
        await frames.send(LoadChunk(id=3, **fields, index=0, count=4).to_header())
        assert protocol.parse_message((await frames.receive())[0]) == Loaded(3, True, cached_mask=0b1111)
        assert reader.fetches == 4
        # A run past the object's end is refused before anything is loaded.
        await frames.send(LoadChunk(id=4, **fields, index=2, count=3).to_header())
        assert protocol.parse_message((await frames.receive())[0]).code == "bad-request"
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_v2_connection_cannot_load_a_run():
    server = PeerServer("w", b"s", {"mem://src": FakeReader(delay=0)}, max_payload=CHUNK)
    fields = dict(source="mem://src", path="f.bin", version="v", size=3 * CHUNK, chunk_size=CHUNK, index=0)
    async with trio.open_nursery() as nursery:
        frames, version = await _peer(server, nursery, 2)
        assert version == 2
        await frames.send(LoadChunk(id=1, **fields).to_header())
        assert protocol.parse_message((await frames.receive())[0]) == Loaded(1, False)
        await frames.send(LoadChunk(id=2, **fields, count=2).to_header())
        assert await frames.receive() is None  # not a v2 message: the connection is closed


@pytest.mark.trio
async def test_a_v3_client_loads_a_run_from_a_v2_server_chunk_by_chunk(monkeypatch):
    from cachefs.objects import ObjectId
    from cachefs.peer.client import PeerClient

    reader = FakeReader(delay=0)
    server = PeerServer("w", b"s", {"mem://src": reader}, max_payload=CHUNK)
    obj = ObjectId("mem://src", "f.bin", "v", 3 * CHUNK)
    async with trio.open_nursery() as nursery:
        peer = await serve_on_loopback(server, nursery)
        # The server of the previous release: v1 and v2 only, so it closes on our v3 Hello.
        monkeypatch.setattr(protocol, "SUPPORTED_VERSIONS", frozenset({1, 2}))
        client = PeerClient("mount", b"s", nursery, max_payload=CHUNK)
        await client.load_chunk(peer, obj, CHUNK, 1)
        assert client._conns[peer].version == 2
        assert await client.load_chunks(peer, obj, CHUNK, 0, 3) == [False, True, False]
        assert reader.fetches == 3
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_v1_client_gets_v1_and_cannot_load():
    reader = FakeReader(delay=0)
    server = PeerServer("w", b"s", {"mem://src": reader}, max_payload=CHUNK)
    fields = dict(source="mem://src", path="f.bin", version="v", size=3 * CHUNK, chunk_size=CHUNK, index=0)
    async with trio.open_nursery() as nursery:
        frames, version = await _peer(server, nursery, 1)
        assert version == 1  # a rolling upgrade: old mounts keep reading from new workers
        await frames.send(GetChunk(id=1, **fields).to_header())
        header, _ = await frames.receive()
        assert header["t"] == ChunkData.t
        await frames.send(LoadChunk(id=2, **fields).to_header())
        assert await frames.receive() is None  # not a v1 message: the connection is closed


class V1Server(PeerServer):
    """A server of protocol version 1: it refuses any other Hello by closing the connection."""

    async def _handshake(self, frames, peer):
        hello = protocol.parse_message((await frames.receive())[0])
        if hello.version != 1:
            raise protocol.ProtocolError(f"expected hello v1, got v{hello.version}")
        nonce = os.urandom(16)
        mac = protocol.hello_mac(self.secret, "server", nonce, hello.nonce)
        await frames.send(Hello(1, self.node, nonce, mac).to_header())
        auth = protocol.parse_message((await frames.receive())[0])
        expected = protocol.hello_mac(self.secret, "client", hello.nonce, nonce)
        return 1 if protocol.verify_mac(expected, auth.mac) else None


@pytest.mark.trio
async def test_a_v2_client_reads_from_a_v1_server_and_does_not_ask_it_to_load():
    from cachefs.errors import PeerError
    from cachefs.objects import ObjectId
    from cachefs.peer.client import PeerClient

    reader = FakeReader(delay=0)
    reader.chunk = types.MethodType(lambda self, obj, index: _chunk_of(index), reader)
    server = V1Server("w", b"s", {"mem://src": reader}, max_payload=CHUNK)
    obj = ObjectId("mem://src", "f.bin", "v", 3 * CHUNK)
    async with trio.open_nursery() as nursery:
        peer = await serve_on_loopback(server, nursery)
        client = PeerClient("mount", b"s", nursery, max_payload=CHUNK)
        assert await client.get_chunk(peer, obj, CHUNK, 2) == bytes([2]) * CHUNK
        with pytest.raises(PeerError) as e:
            await client.load_chunk(peer, obj, CHUNK, 2)
        assert e.value.code == "version"
        nursery.cancel_scope.cancel()


async def _chunk_of(index: int):
    return bytes([index]) * CHUNK, "mem"


# -- real processes -----------------------------------------------------------------------------

pytest_integration = pytest.mark.integration


def _warmup(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cachefs", "warmup", *map(str, args)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=hermetic_env(), cwd=REPO, timeout=timeout,
    )


def _json_lines(out: subprocess.CompletedProcess) -> list[dict]:
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines and all(line["type"] == "progress" for line in lines[:-1]), out.stdout
    assert lines[-1]["type"] == "summary", out.stdout
    return lines


def _data_gets(proxy, prefix: str) -> int:
    """GETs of object data under the test's prefix (not the bucket's LISTs)."""
    return sum(n for (path, _), n in proxy.gets.items() if path.startswith(f"/{prefix}/"))


def _each_range_once(proxy, prefix: str) -> bool:
    return all(n == 1 for (path, _), n in proxy.gets.items() if path.startswith(f"/{prefix}/"))


def _tree(src) -> dict[str, bytes]:
    files = {
        "train/a.bin": os.urandom(5 * CHUNK + 17),
        "train/deep/b.bin": os.urandom(CHUNK),
        "train/deep/c.bin": os.urandom(100),
        "train/empty": b"",
        "val/d.bin": os.urandom(2 * CHUNK - 1),
    }
    for path, data in files.items():
        src.write(path, data)
    return files


def _read_all(root: str, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        with open(os.path.join(root, path), "rb") as f:
            assert f.read() == data, path


@pytest_integration
def test_warmup_then_reading_it_all_makes_no_backend_gets(s3_behind_proxy, cachefs_mount):
    src = s3_behind_proxy
    files = _tree(src)
    m = cachefs_mount(None, "--dataset", f"ds={src.url}", *src.mount_args, *SMALL, env=src.env)
    total = sum(map(len, files.values()))
    out = _warmup(os.path.join(m.mountpoint, "ds"), "--recursive", "--json")
    assert out.returncode == 0, out.stderr
    summary = _json_lines(out)[-1]
    assert summary["state"] == "done" and summary["exit"] == 0 and summary["files_done"] == len(files)
    assert summary["bytes_total"] == summary["bytes_loaded"] == total and summary["bytes_cached"] == 0
    assert summary["chunks_loaded"] == 6 + 1 + 1 + 0 + 2
    # One GET per run of RUN_CHUNKS consecutive chunks: a.bin's 6 chunks take two.
    assert _data_gets(src.proxy, src.prefix) == 2 + 1 + 1 + 0 + 1 and _each_range_once(src.proxy, src.prefix)
    assert m.metric("cachefs_cache_used_bytes", tier="mem") == 0  # warmed into the SSD tier only
    assert m.metric("cachefs_cache_chunks", tier="disk") == summary["chunks_loaded"]
    src.proxy.reset()
    _read_all(os.path.join(m.mountpoint, "ds"), files)
    assert _data_gets(src.proxy, src.prefix) == 0
    # Again: everything is cached already, and says so; the backend sees no GET.
    again = _warmup(os.path.join(m.mountpoint, "ds"), "-r", "--json")
    assert again.returncode == 0, again.stderr
    summary = _json_lines(again)[-1]
    assert summary["bytes_cached"] == total and summary["bytes_loaded"] == 0
    assert _data_gets(src.proxy, src.prefix) == 0
    # Without --json and not on a terminal: plain lines, then the summary.
    plain = _warmup(os.path.join(m.mountpoint, "ds", "val"))
    assert plain.returncode == 0 and plain.stdout.splitlines()[-1].startswith("cachefs: warmup "), plain.stdout
    print(out.stdout.splitlines()[-1], plain.stdout, sep="\n")


@pytest_integration
def test_a_warmup_from_one_mount_fills_the_ring_for_the_other(s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount):
    src = s3_behind_proxy
    files = _tree(src)
    workers = [cachefs_worker(src) for _ in range(3)]
    peers = (*SMALL, "--peers", ",".join(w.addr for w in workers), "--secret-file", str(secret_file))
    m1 = cachefs_mount(src, *peers)
    m2 = cachefs_mount(src, *peers)
    src.proxy.reset()
    out = _warmup(m1.mountpoint, "-r", "--json")
    assert out.returncode == 0, out.stderr
    summary = _json_lines(out)[-1]
    total = sum(map(len, files.values()))
    assert summary["bytes_loaded"] == summary["bytes_by_peers"] == total  # all of it at the owners
    # A run of consecutive chunks with one owner is one GET: at most one per chunk, none twice.
    assert 4 <= _data_gets(src.proxy, src.prefix) <= summary["chunks_loaded"]
    assert _each_range_once(src.proxy, src.prefix)
    assert sum(w.metric("cachefs_peer_served_total", outcome="loaded") for w in workers) == summary["chunks_total"]
    # The owners hold it on their SSDs only: a warm-up must not push hot data out of MEM.
    assert all(w.metric("cachefs_cache_used_bytes", tier="mem") == 0 for w in workers)
    assert sum(w.metric("cachefs_cache_chunks", tier="disk") for w in workers) == summary["chunks_total"]
    # Before reading, the other mount sees all of it cached, and where: at the workers, not itself.
    for name, data in files.items():
        held = json.loads(os.getxattr(os.path.join(m2.mountpoint, name), "user.cachefs.cached"))
        assert (held["bytes"], held["cached_bytes"], held["ratio"], held["unanswered"]) == (len(data), len(data), 1.0, [])
        assert sum(n for node, n in held["nodes"].items() if node in {w.addr for w in workers}) == len(data), held
    deep = json.loads(subprocess.run(
        [sys.executable, "-m", "cachefs", "status", m2.mountpoint, "--deep", "--json"],
        capture_output=True, text=True, env=hermetic_env(), cwd=REPO, check=True,
    ).stdout)
    residency = deep["datasets"][0]["residency"]
    assert (residency["bytes"], residency["cached_bytes"], residency["unanswered"]) == (total, total, [])
    by_worker = {w.addr: residency["nodes"].get(w.addr, 0) for w in workers}
    assert sum(by_worker.values()) == total and sum(residency["nodes"].values()) == total, residency  # m2 holds none
    src.proxy.reset()
    _read_all(m2.mountpoint, files)  # the other mount's first read: byte-exact...
    assert _data_gets(src.proxy, src.prefix) == 0  # ...and no backend GET
    # What m2 now holds too does not hide what the workers hold: each node's bytes are its own.
    for name, data in files.items():
        held = json.loads(os.getxattr(os.path.join(m2.mountpoint, name), "user.cachefs.cached"))
        assert sum(n for node, n in held["nodes"].items() if node in {w.addr for w in workers}) == len(data), held
    assert m1.metric("cachefs_read_bytes_total", source="backend") == 0  # m1 pushed nothing through itself


@pytest_integration
def test_a_warmup_larger_than_the_cache_says_it_cannot_fit(s3_behind_proxy, cachefs_mount):
    src = s3_behind_proxy
    src.write("big.bin", os.urandom(8 * CHUNK))
    m = cachefs_mount(src, "--chunk-size", "256K", "--mem-size", "1M", "--cache-size", "1M")
    src.proxy.reset()
    out = _warmup(m.mountpoint, "-r")
    assert out.returncode == 1
    assert out.stderr.startswith("cachefs: error: warmup 1 failed: cannot fit: 2.0 MiB"), out.stderr
    assert "the SSD cache holds 1.0 MiB" in out.stderr
    assert _data_gets(src.proxy, src.prefix) == 0  # refused before loading anything


@pytest_integration
def test_a_warmup_larger_than_an_owners_cache_says_it_cannot_fit(s3_behind_proxy, secret_file, cachefs_worker,
                                                                  cachefs_mount):
    """With peers the chunks go to their owners on the ring: each owner's share is
    checked against the capacity it tells (peer protocol v6), before any GET."""
    src = s3_behind_proxy
    src.write("big.bin", os.urandom(8 * CHUNK))
    worker = cachefs_worker(src, "--cache-size", "1M")
    m = cachefs_mount(src, *SMALL, "--peers", worker.addr, "--secret-file", str(secret_file))
    src.proxy.reset()
    out = _warmup(m.mountpoint, "-r")
    assert out.returncode == 1
    assert out.stderr.startswith("cachefs: error: warmup 1 failed: cannot fit: 2.0 MiB"), out.stderr
    assert f"into the cache of {worker.addr}, its owner on the ring, which holds 1.0 MiB" in out.stderr
    assert _data_gets(src.proxy, src.prefix) == 0  # refused before loading anything
    assert worker.metric("cachefs_peer_served_total", outcome="loaded") == 0


@pytest_integration
def test_wait_ratio_returns_early_and_the_node_goes_on(s3_source, cachefs_mount):
    from cachefs import control_client

    data = os.urandom(32 * CHUNK)
    s3_source.write("slow.bin", data)
    with S3Proxy(s3_source.backend.endpoint_url, rate=2 << 20) as proxy:  # 8 MiB at 2 MiB/s: ~4 s
        m = cachefs_mount(s3_source, "--endpoint-url", proxy.endpoint_url, *SMALL)
        t0 = time.monotonic()
        out = _warmup(os.path.join(m.mountpoint, "slow.bin"), "--wait-ratio", "0.5", "--json", "--concurrency", "2")
        assert out.returncode == 0, out.stderr
        summary = _json_lines(out)[-1]
        assert summary["early"] and 0.5 <= summary["ratio"] < 1 and summary["state"] == "running"
        assert time.monotonic() - t0 < 6
        sock = control_client.socket_for(m.mountpoint)
        deadline = time.monotonic() + 60
        while (p := control_client.request(sock, "warmup.progress", {"job": summary["job"]}))["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert p["state"] == "done" and p["bytes_done"] == len(data)
        proxy.reset()
        with open(os.path.join(m.mountpoint, "slow.bin"), "rb") as f:
            assert f.read() == data
        assert _data_gets(proxy, s3_source.prefix) == 0


@pytest_integration
def test_ctrl_c_cancels_the_job_and_a_rerun_resumes(s3_source, cachefs_mount):
    import signal

    data = os.urandom(32 * CHUNK)
    s3_source.write("slow.bin", data)
    with S3Proxy(s3_source.backend.endpoint_url, rate=2 << 20) as proxy:
        m = cachefs_mount(s3_source, "--endpoint-url", proxy.endpoint_url, *SMALL)
        cmd = [sys.executable, "-m", "cachefs", "warmup", m.mountpoint, "-r", "--json", "--concurrency", "1"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=hermetic_env(), cwd=REPO)
        first = json.loads(proc.stdout.readline())  # the job has started
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert stderr.splitlines() == ["cachefs: warmup interrupted; loaded chunks stay cached, so running it again resumes"]
        summary = json.loads(stdout.splitlines()[-1])
        assert summary["type"] == "summary" and summary["job"] == first["job"]
        loaded = summary["bytes_loaded"]
        assert 0 < loaded < len(data)
        from cachefs import control_client

        sock = control_client.socket_for(m.mountpoint)
        deadline = time.monotonic() + 10
        while (p := control_client.request(sock, "warmup.progress", {"job": first["job"]}))["state"] != "cancelled":
            assert time.monotonic() < deadline, p
            time.sleep(0.1)
        gets_before = _data_gets(proxy, s3_source.prefix)
        rerun = _warmup(m.mountpoint, "-r", "--json")
        assert rerun.returncode == 0, rerun.stderr
        summary = _json_lines(rerun)[-1]
        assert summary["bytes_cached"] >= loaded and summary["bytes_done"] == len(data)
        # Only what the first run had not loaded is fetched now, in runs of up to RUN_CHUNKS.
        gets = _data_gets(proxy, s3_source.prefix) - gets_before
        assert -(-summary["chunks_loaded"] // RUN_CHUNKS) <= gets <= summary["chunks_loaded"] < 32


@pytest_integration
def test_bad_paths_give_one_line_and_fail(local_source, tmp_path, cachefs_mount):
    local_source.write("f.bin", b"x")
    m = cachefs_mount(None, "--dataset", f"ds={local_source.url}")
    for path, message in [
        (tmp_path, f"cachefs: error: {tmp_path}: not in a cachefs mount"),
        (os.path.join(m.mountpoint, "nope", "f.bin"), "cachefs: error: nope/f.bin: no dataset 'nope' in this mount (have: ds)"),
        (os.path.join(m.mountpoint, "ds", "nope"), "cachefs: error: ds/nope: no such file or directory"),
    ]:
        out = _warmup(path)
        assert out.returncode != 0 and out.stderr.splitlines() == [message], out.stderr
