"""The peer cache with real processes over loopback: cache workers on a ring,
mounts asking the chunk's owner, the backend counted at the backend's side
(a counting proxy in front of the S3 gateway)."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio

from conftest import REPO, SECRET, free_port, hermetic_env

pytestmark = pytest.mark.integration

CHUNK = 256 << 10
def _peer_args(workers, secret_file, *extra):
    return ("--chunk-size", "256K", "--mem-size", "64M", "--cache-size", "256M",
            "--peers", ",".join(w.addr for w in workers), "--secret-file", str(secret_file), *extra)


def _read(path: str, block: int = CHUNK // 2) -> bytes:
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            out += data
    return bytes(out)


def _ranges(proxy, key: str) -> dict[str, int]:
    return {rng: n for (path, rng), n in proxy.gets.items() if path.endswith("/" + key)}


def test_mounts_share_one_backend_fetch_per_chunk(s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount):
    src = s3_behind_proxy
    data = os.urandom(24 * CHUNK + 1000)
    src.write("hot.bin", data)
    workers = [cachefs_worker(src) for _ in range(3)]
    mounts = [cachefs_mount(src, *_peer_args(workers, secret_file)) for _ in range(3)]
    src.proxy.reset()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(_read, [os.path.join(m.mountpoint, "hot.bin") for m in mounts * 2]))
    assert all(r == data for r in results)
    gets = _ranges(src.proxy, "hot.bin")
    print(f"\nbackend GETs per chunk, 3 mounts x 2 readers each: {sum(gets.values()) / 25:.2f}")
    assert len(gets) == 25, gets  # every chunk fetched...
    assert set(gets.values()) == {1}, gets  # ...once, for all mounts together
    served = sum(w.metric("cachefs_peer_served_total", outcome="ok") for w in workers)
    assert served >= 25 * 3 - 3 * 2  # each mount got (nearly) every chunk from a worker
    for m in mounts:
        assert m.metric("cachefs_read_bytes_total", source="backend") == 0
    # Which worker holds how much of the source: together, the whole file, once.
    from cachefs.cache.disk import file_header_size

    held = sum(w.metric("cachefs_source_cached_bytes", source="src", tier="disk") for w in workers)
    chunk_lengths = [min(CHUNK, len(data) - i) for i in range(0, len(data), CHUNK)]
    assert held == sum(file_header_size(n) + n for n in chunk_lengths)  # data plus headers
    out = subprocess.run([sys.executable, "-m", "cachefs", "status", *(w.metrics_addr for w in workers)],
                         capture_output=True, text=True, cwd=REPO, env=hermetic_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("source src: ") == 3 and "served to peers" in out.stdout
    print(out.stdout)


def test_killed_worker_never_fails_a_read(s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount):
    src = s3_behind_proxy
    data = os.urandom(48 * CHUNK)
    src.write("big.bin", data)
    workers = [cachefs_worker(src) for _ in range(3)]
    m = cachefs_mount(src, *_peer_args(workers, secret_file, "--peer-timeout", "2"))
    out = bytearray()
    with open(os.path.join(m.mountpoint, "big.bin"), "rb", buffering=0) as f:
        while block := f.read(CHUNK // 4):
            out += block
            if len(out) == 8 * CHUNK:
                workers[0].proc.send_signal(signal.SIGKILL)  # mid-read, with requests in flight
    assert bytes(out) == data
    # A second reader after the kill: also complete, served by the survivors and the backend.
    m2 = cachefs_mount(src, *_peer_args(workers, secret_file, "--peer-timeout", "2"))
    assert _read(os.path.join(m2.mountpoint, "big.bin")) == data


def test_stopped_worker_costs_one_timeout_not_a_hang(s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount):
    src = s3_behind_proxy
    data = os.urandom(16 * CHUNK)
    src.write("f.bin", data)
    workers = [cachefs_worker(src) for _ in range(2)]
    m = cachefs_mount(src, *_peer_args(workers, secret_file, "--peer-timeout", "1"))
    workers[0].proc.send_signal(signal.SIGSTOP)  # partitioned: connects, never answers
    try:
        t0 = time.monotonic()
        assert _read(os.path.join(m.mountpoint, "f.bin")) == data
        assert time.monotonic() - t0 < 8  # the breaker skips it after the first timeout
    finally:
        workers[0].proc.send_signal(signal.SIGCONT)


def test_a_new_worker_takes_only_its_share(s3_behind_proxy, tmp_path, secret_file, cachefs_worker, cachefs_mount):
    from cachefs.objects import ObjectId, chunk_digest
    from cachefs.peer.ring import Ring

    src = s3_behind_proxy
    n_chunks = 120
    data = os.urandom(n_chunks * CHUNK)
    src.write("set.bin", data)
    peers_file = tmp_path / "peers"
    workers = [cachefs_worker(src) for _ in range(3)]
    peers_file.write_text("\n".join(w.addr for w in workers) + "\n")
    spec = ("--chunk-size", "256K", "--mem-size", "64M", "--cache-size", "256M",
            "--peers", f"file:{peers_file}", "--secret-file", str(secret_file))
    first = cachefs_mount(src, *spec)
    assert _read(os.path.join(first.mountpoint, "set.bin")) == data
    assert len(_ranges(src.proxy, "set.bin")) == n_chunks

    workers.append(cachefs_worker(src))
    peers_file.write_text("\n".join(w.addr for w in workers) + "\n")
    src.proxy.reset()
    second = cachefs_mount(src, *spec)  # a fresh mount: empty local cache
    assert _read(os.path.join(second.mountpoint, "set.bin")) == data

    # Exactly the chunks the new worker owns miss (it fetches them once); all others
    # are still where the three-node ring put them.
    etag = src.info("set.bin")["ETag"].strip('"')
    obj = ObjectId(src.url, "set.bin", f"etag:{etag}", len(data))
    ring = Ring({w.addr: 1.0 for w in workers})
    moved = {i for i in range(n_chunks) if ring.owner(chunk_digest(obj, CHUNK, i)) == workers[3].addr}
    expected = {f"bytes={i * CHUNK}-{(i + 1) * CHUNK - 1}" for i in moved}
    got = _ranges(src.proxy, "set.bin")
    assert set(got) == expected and set(got.values()) == {1}
    share = len(moved) / n_chunks
    print(f"\nkey movement when a 4th worker joins: {len(moved)}/{n_chunks} chunks = {share:.1%}")
    assert 0.12 <= share <= 0.40


def test_wrong_secret_is_refused_and_reads_still_work(s3_behind_proxy, tmp_path, secret_file, cachefs_worker, cachefs_mount):
    src = s3_behind_proxy
    data = os.urandom(4 * CHUNK)
    src.write("s.bin", data)
    worker = cachefs_worker(src)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the secret")
    wrong.chmod(0o600)
    m = cachefs_mount(src, *_peer_args([worker], wrong))
    assert _read(os.path.join(m.mountpoint, "s.bin")) == data  # from the backend
    assert worker.metric("cachefs_peer_auth_failures_total") >= 1
    assert worker.metric("cachefs_peer_served_total") == 0
    assert m.metric("cachefs_backend_read_bytes_total") == len(data)


def _fetch_chunk(addr: str, secret: bytes, source: str, path: str, version: str, size: int, index: int) -> bytes:
    from cachefs.objects import ObjectId
    from cachefs.peer.client import PeerClient

    async def main():
        async with trio.open_nursery() as nursery:
            client = PeerClient("test-client", secret, nursery, max_payload=CHUNK)
            try:
                with trio.fail_after(10):
                    return await client.get_chunk(addr, ObjectId(source, path, version, size), CHUNK, index)
            except Exception as e:  # raised below, outside the nursery's exception group
                return e
            finally:
                nursery.cancel_scope.cancel()

    result = trio.run(main)
    if isinstance(result, Exception):
        raise result
    return result


def test_malformed_frames_never_take_the_worker_down(local_source, secret_file, cachefs_worker):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    data = os.urandom(2 * CHUNK)
    local_source.write("f.bin", data)
    st_ = os.stat(local_source.path("f.bin"))
    version = f"stat:{st_.st_size}-{st_.st_mtime_ns}"
    worker = cachefs_worker(local_source)
    host, port = worker.addr.rsplit(":", 1)

    def good_request_works():
        assert _fetch_chunk(worker.addr, SECRET.encode(), local_source.url, "f.bin", version, len(data), 1) == data[CHUNK:]

    good_request_works()
    # A wrong secret, a request for a source the worker does not serve, a path out of the root.
    from cachefs.errors import PeerError

    with pytest.raises(PeerError):
        _fetch_chunk(worker.addr, b"wrong", local_source.url, "f.bin", version, len(data), 0)
    with pytest.raises(PeerError, match="refused"):
        _fetch_chunk(worker.addr, SECRET.encode(), "s3://elsewhere/x", "f.bin", version, len(data), 0)
    with pytest.raises(PeerError, match="bad-request"):
        _fetch_chunk(worker.addr, SECRET.encode(), local_source.url, "../../etc/passwd", version, 100, 0)

    def send_raw(blob: bytes) -> None:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                while s.recv(65536):
                    pass
            except OSError:
                pass

    send_raw(b"\xff" * 8 + b"x" * 100)  # absurd lengths in the prefix
    send_raw(b"\x00\x00\x00\x05\x00\x00\x00\x00" + b"\xc1\xc1\xc1\xc1\xc1")  # invalid msgpack

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(min_size=1, max_size=300))
    def fuzz(blob):
        send_raw(blob)

    fuzz()
    good_request_works()
    assert worker.proc.poll() is None
    assert worker.metric("cachefs_peer_protocol_errors_total", side="server") >= 2


def test_a_mount_can_share_its_cache(s3_behind_proxy, secret_file, cachefs_mount):
    """--serve: a mount is a ring member too; another mount reads its chunks from it."""
    src = s3_behind_proxy
    data = os.urandom(8 * CHUNK + 5)
    src.write("shared.bin", data)
    addr = f"127.0.0.1:{free_port()}"
    ring = ("--chunk-size", "256K", "--peers", addr, "--secret-file", str(secret_file))
    sharer = cachefs_mount(src, *ring, "--serve", addr)
    assert _read(os.path.join(sharer.mountpoint, "shared.bin")) == data  # it owns every chunk: from S3
    reader = cachefs_mount(src, *ring)
    assert _read(os.path.join(reader.mountpoint, "shared.bin")) == data
    assert set(_ranges(src.proxy, "shared.bin").values()) == {1}
    assert reader.metric("cachefs_read_bytes_total", source="peer") > 0
    assert reader.metric("cachefs_backend_read_bytes_total") == 0
    assert sharer.metric("cachefs_peer_served_total", outcome="ok") == 9


def test_locations_say_which_node_holds_how_many_chunks(s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount):
    import json

    from cachefs.objects import ObjectId, chunk_digest
    from cachefs.peer.ring import Ring

    src = s3_behind_proxy
    data = os.urandom(20 * CHUNK)
    src.write("loc.bin", data)
    workers = [cachefs_worker(src) for _ in range(3)]
    m = cachefs_mount(src, *_peer_args(workers, secret_file))
    path = os.path.join(m.mountpoint, "loc.bin")
    before = json.loads(os.getxattr(path, "user.cachefs.locations"))
    assert before["chunks"] == 20 and sum(before["nodes"].values()) == 0 and before["unanswered"] == []
    assert _read(path) == data
    after = json.loads(os.getxattr(path, "user.cachefs.locations"))
    print(f"\ngetfattr -n user.cachefs.locations after one read: {after}")
    etag = src.info("loc.bin")["ETag"].strip('"')
    obj = ObjectId(src.url, "loc.bin", f"etag:{etag}", len(data))
    ring = Ring({w.addr: 1.0 for w in workers})
    owned = [ring.owner(chunk_digest(obj, CHUNK, i)) for i in range(20)]
    for w in workers:
        assert after["nodes"].get(w.addr, 0) == owned.count(w.addr)  # each owner holds its share
    mount_node = next(n for n in after["nodes"] if n.startswith("mount:"))
    assert after["nodes"][mount_node] == 20  # and the mount kept what it read in MEM


def test_after_an_upload_the_owner_serves_the_new_version_never_the_old(
    s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount
):
    src = s3_behind_proxy
    rng = random.Random(12)
    old = rng.randbytes(8 * CHUNK + 99)
    src.write("v.bin", old)
    worker = cachefs_worker(src)
    writer = cachefs_mount(src, *_peer_args([worker], secret_file), "--read-write")
    reader = cachefs_mount(src, *_peer_args([worker], secret_file), "--attr-ttl", "0", "--dir-ttl", "0")
    assert _read(os.path.join(reader.mountpoint, "v.bin")) == old  # the worker now holds the old chunks
    served_before = worker.metric("cachefs_peer_served_total", outcome="ok")
    assert served_before >= 9

    new = rng.randbytes(len(old))  # same size: only the version tells them apart
    with open(os.path.join(writer.mountpoint, "v.bin"), "r+b") as f:
        f.write(new)
    assert src.read("v.bin") == new  # close-to-open: landed at close
    src.proxy.reset()
    assert _read(os.path.join(reader.mountpoint, "v.bin")) == new
    # Served by the chunks' owner, which fetched the new version once; never its old chunks.
    assert worker.metric("cachefs_peer_served_total", outcome="ok") >= served_before + 9
    assert reader.metric("cachefs_read_bytes_total", source="backend") == 0
    assert sum(_ranges(src.proxy, "v.bin").values()) == 9
