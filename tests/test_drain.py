"""Health endpoints and the graceful drain of a worker on SIGTERM.

In-process (trio's fake clock): /healthz and /readyz of the metrics server, and
the peer server's drain (in-flight requests finish, new ones get "busy").
With real processes: the probes of a worker and a mount, and a worker drained
while two mounts read through the ring, with zero failed reads."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import trio
import trio.testing

from cachefs import metrics
from cachefs.peer import protocol
from cachefs.peer.protocol import ChunkData, ChunkError, Ready
from conftest import S3Proxy, free_port
from test_peer_server import MemoryReader, _authenticate, _connect, _request, _server
from test_peers import _read

CHUNK = 256 << 10


def _get(addr: str, path: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{addr}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def _aget(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


# -- in-process ---------------------------------------------------------------------


@pytest.mark.trio
async def test_healthz_always_and_readyz_only_when_the_node_says_so():
    port = free_port()
    state = {"reason": "starting"}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(metrics.serve, "127.0.0.1", port)
            metrics.set_readiness(None)
            assert await _aget(port, "/healthz") == (200, "ok\n")
            assert await _aget(port, "/readyz") == (503, "starting\n")
            metrics.set_readiness(lambda: state["reason"])
            state["reason"] = None
            assert await _aget(port, "/readyz") == (200, "ready\n")
            assert await _aget(port, "/readyz?verbose") == (200, "ready\n")
            state["reason"] = "draining"
            assert await _aget(port, "/readyz") == (503, "draining\n")
            assert await _aget(port, "/healthz") == (200, "ok\n")
            metrics.set_readiness(lambda: 1 / 0)
            status, body = await _aget(port, "/readyz")
            assert status == 503 and "ZeroDivisionError" in body
            assert (await _aget(port, "/metrics"))[0] == 200
            assert (await _aget(port, "/nope"))[0] == 404
            nursery.cancel_scope.cancel()
    finally:
        metrics.set_readiness(None)


@pytest.mark.trio
@pytest.mark.parametrize("version", [1, 2])
async def test_drain_finishes_in_flight_requests_and_answers_new_ones_busy(autojump_clock, version, monkeypatch):
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", version)
    server = _server(reader=MemoryReader(delay=10.0))
    async with trio.open_nursery() as nursery:
        frames = await _connect(server, nursery)
        assert (await _authenticate(frames))["t"] == Ready.t
        await frames.send(_request(index=1, request_id=1))
        await frames.send(_request(index=2, request_id=2))
        await trio.testing.wait_all_tasks_blocked()
        drained = []

        async def drain():
            drained.append(await server.drain(30.0))
            drained.append(trio.current_time())

        start = trio.current_time()
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        await frames.send(_request(index=3, request_id=3))
        header, _ = await frames.receive()
        assert header["t"] == ChunkError.t and header["id"] == 3 and header["code"] == "busy"
        assert trio.current_time() == start  # at once
        answered = {}
        for _ in range(2):
            header, payload = await frames.receive()
            assert header["t"] == ChunkData.t
            answered[header["id"]] = payload
        assert answered == {1: bytes([1]) * (64 << 10), 2: bytes([2]) * (64 << 10)}
        await trio.testing.wait_all_tasks_blocked()
        assert drained[0] == (2, True) and drained[1] - start == pytest.approx(10.0)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_drain_is_bounded_by_its_timeout(autojump_clock):
    server = _server(reader=MemoryReader(delay=1000.0))
    async with trio.open_nursery() as nursery:
        frames = await _connect(server, nursery)
        assert (await _authenticate(frames))["t"] == Ready.t
        await frames.send(_request(index=1))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        assert await server.drain(5.0) == (1, False)
        assert trio.current_time() - start == pytest.approx(5.0)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_draining_server_stops_listening():
    server = _server()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await nursery.start(server.serve, listeners)
        (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
        assert await server.drain(1.0) == (0, True)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
@pytest.mark.parametrize("version", [1, 2])
async def test_a_busy_owner_sends_the_client_to_the_next_node_at_once(version, monkeypatch):
    """Over TCP, at protocol v1 and v2: a request on an open connection to a draining
    owner gets "busy", and the peer tier asks the next node instead, within the same get."""
    from cachefs.objects import ObjectId, chunk_key
    from cachefs.peer.client import PeerClient, PeerTier
    from cachefs.peer.ring import Ring
    from test_peer_server import CHUNK as SCHUNK, SECRET, SOURCE

    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", version)
    async with trio.open_nursery() as nursery:
        servers, nodes = [], []
        for i in range(2):
            server = _server()
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(server.serve, listeners)
            servers.append(server)
            nodes.append(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        ring = Ring({n: 1.0 for n in nodes})
        client = PeerClient("mount", SECRET, nursery, max_payload=SCHUNK)
        tier = PeerTier(client, lambda: ring, timeout=5.0)
        # The ports, so the ring, differ each run: 64 chunks make "none owned by node 0" (2^-64) impossible in practice.
        obj = ObjectId(SOURCE, "f.bin", "v1", 64 * SCHUNK)
        keys = [chunk_key(obj, SCHUNK, i) for i in range(64)]
        owned = [k for k in keys if ring.owner(k.digest) == nodes[0]]
        assert owned, "no chunk owned by the first node"
        assert await tier.get(owned[0]) == bytes([owned[0].index]) * SCHUNK  # connects to the owner
        assert client._bulk[nodes[0]].version == version  # whole chunks: the bulk lane
        # (0 or 1 in flight: the server may not have finished its answer's bookkeeping yet.)
        assert (await servers[0].drain(1.0))[1] is True
        with trio.fail_after(2):  # at once, not after a timeout
            assert await tier.get(owned[0]) == bytes([owned[0].index]) * SCHUNK
        assert metrics.PEER_REQUESTS.labels(nodes[0], "busy")._value.get() == 1
        assert not client.available(nodes[0])  # skipped for a while...
        assert client._failures.get(nodes[0]) is None  # ...but not counted as a failure
        nursery.cancel_scope.cancel()


# -- real processes -----------------------------------------------------------------


def _peer_args(peers: str, secret_file, *extra):
    return ("--chunk-size", "256K", "--mem-size", "64M", "--cache-size", "256M",
            "--peers", peers, "--secret-file", str(secret_file), *extra)


@pytest.mark.integration
def test_worker_and_mount_answer_the_probes(local_source, secret_file, cachefs_worker, cachefs_mount):
    local_source.write("a.bin", b"x" * 1000)
    worker = cachefs_worker(local_source)
    assert _get(worker.metrics_addr, "/healthz") == (200, "ok\n")
    assert _get(worker.metrics_addr, "/readyz") == (200, "ready\n")
    m = cachefs_mount(local_source, *_peer_args(worker.addr, secret_file))
    assert _get(m.metrics_addr, "/healthz") == (200, "ok\n")
    deadline = time.monotonic() + 10
    while _get(m.metrics_addr, "/readyz")[0] != 200:  # set right after the mount answers
        assert time.monotonic() < deadline, m.log_tail()
        time.sleep(0.05)
    assert _get(m.metrics_addr, "/readyz") == (200, "ready\n")


@pytest.fixture
def slow_s3(s3_source):
    """The test's S3 prefix behind a proxy throttled to 4 MiB/s, so that workers have requests in flight."""
    with S3Proxy(s3_source.backend.endpoint_url, rate=4 << 20) as proxy:

        class Source:
            url = s3_source.url
            mount_args = ["--endpoint-url", proxy.endpoint_url]
            env = s3_source.env
            write = s3_source.write

        Source.proxy = proxy
        yield Source


@pytest.mark.integration
def test_a_worker_drained_while_two_mounts_read_fails_no_read(slow_s3, secret_file, cachefs_worker, cachefs_mount, tmp_path):
    src = slow_s3
    data = os.urandom(64 * CHUNK + 123)
    src.write("big.bin", data)
    workers = [cachefs_worker(src, "--drain-timeout", "20") for _ in range(3)]
    peers_file = tmp_path / "peers"
    peers_file.write_text("".join(f"{w.addr}\n" for w in workers))
    # One mount follows the peers file; the other still names the drained worker (the "busy"/breaker path).
    following = cachefs_mount(src, *_peer_args(f"file:{peers_file}", secret_file, "--peer-timeout", "10"))
    static = cachefs_mount(src, *_peer_args(",".join(w.addr for w in workers), secret_file, "--peer-timeout", "10"))
    victim = workers[0]
    started = threading.Event()

    def read(mountpoint: str) -> bytes:
        started.set()
        return _read(os.path.join(mountpoint, "big.bin"))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        reads = [pool.submit(read, m.mountpoint) for m in (following, static, following, static)]
        started.wait()
        time.sleep(0.5)  # the workers are busy fetching chunks from the throttled backend (4 s in all)
        t0 = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        peers_file.write_text("".join(f"{w.addr}\n" for w in workers[1:]))
        # Draining: no longer ready, still healthy (or gone already, if nothing was in flight).
        # (Polled: the signal takes a moment to reach the worker's trio loop.)
        status = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                status = _get(victim.metrics_addr, "/readyz")
            except (urllib.error.URLError, ConnectionError):
                break
            if status[0] != 200:
                break
            time.sleep(0.01)
        print(f"\n/readyz of the draining worker: {status}")
        assert status is None or (status[0] == 503 and status[1] in ("draining\n", "stopping\n"))
        exit_code = victim.proc.wait(timeout=30)
        drain_seconds = time.monotonic() - t0
        results, errors = [], []
        for f in reads:
            try:
                results.append(f.result(timeout=120))
            except Exception as e:  # noqa: BLE001 - counted, then asserted zero
                errors.append(e)
    log_text = victim.log_path.read_text()
    drained = re.search(r"drained (\d+) in-flight requests in ([\d.]+)s", log_text)
    busy = sum(m.metric("cachefs_peer_requests_total", peer=victim.addr, outcome="busy") for m in (following, static))
    print(f"drain: exit {exit_code} after {drain_seconds:.2f}s; log: {drained and drained.group(0)}; "
          f"busy answers seen by the mounts: {busy:g}; read errors: {errors}")
    assert errors == []
    assert all(r == data for r in results) and len(results) == 4
    assert exit_code == 0 and drain_seconds < 20 + 5
    assert drained is not None, log_text[-3000:]
    for m in (following, static):
        assert not any(
            s.name == "cachefs_fuse_errors_total" and s.value for s in _samples(m.metrics_addr)
        )
    # The mounts go on with the other workers (and only those, for the one following the file).
    again = [_read(os.path.join(m.mountpoint, "big.bin")) for m in (following, static)]
    assert again == [data, data]


def _samples(addr: str):
    from prometheus_client.parser import text_string_to_metric_families

    _, text = _get(addr, "/metrics")
    for family in text_string_to_metric_families(text):
        yield from family.samples
