"""A cache worker outlives whatever its peers do: real worker processes, real
mounts killed mid-read, and hand-made clients that speak (or garble) the wire
format. After each abuse the worker is alive and serves a good request byte-exact."""

from __future__ import annotations

import os
import random
import resource
import signal
import socket
import struct
import subprocess

import msgpack
import pytest

from conftest import SECRET, free_port
from test_peers import CHUNK, _fetch_chunk, _peer_args, _ranges, _read

pytestmark = pytest.mark.integration

KILL_ROUNDS = int(os.environ.get("CACHEFS_KILL_ROUNDS", "10"))


class RawClient:
    """A blocking client that speaks the peer wire format by hand, so a test can
    send exactly the bytes it wants, before or after authenticating."""

    def __init__(self, addr: str):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        from cachefs.peer.protocol import FrameDecoder

        self.decoder = FrameDecoder(max_payload=64 << 20)

    def send(self, header: dict, payload: bytes = b"") -> None:
        packed = msgpack.packb(header, use_bin_type=True)
        self.sock.sendall(struct.pack(">II", len(packed), len(payload)) + packed + payload)

    def receive(self):
        """The next frame, or None when the server closed the connection."""
        while (frame := self.decoder.next_frame()) is None:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)
        return frame

    def authenticate(self, secret: bytes = SECRET.encode(), node: str = "raw-test-client") -> None:
        from cachefs.peer import protocol

        nonce = os.urandom(16)
        self.send({"t": "hello", "version": protocol.PROTOCOL_VERSION, "node": node, "nonce": nonce})
        header, _ = self.receive()
        mac = protocol.hello_mac(secret, "client", nonce, header["nonce"])
        self.send({"t": "auth", "mac": mac})
        ready = self.receive()
        assert ready is not None and ready[0]["t"] == "ready", ready

    def closed_by_server(self) -> bool:
        """True if the server closes the connection (within the socket timeout)."""
        try:
            while True:
                frame = self.receive()
                if frame is None:
                    return True
        except (TimeoutError, socket.timeout):
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def served(local_source, secret_file, cachefs_worker):
    """A worker over a local source holding f.bin, and a check that it still serves it."""
    data = os.urandom(3 * CHUNK + 100)
    local_source.write("f.bin", data)
    st = os.stat(local_source.path("f.bin"))
    version = f"stat:{st.st_size}-{st.st_mtime_ns}"
    worker = cachefs_worker(local_source)

    class Served:
        def request(self, **overrides) -> dict:
            fields = dict(id=1, source=local_source.url, path="f.bin", version=version, size=len(data),
                          chunk_size=CHUNK, index=0)
            fields.update(overrides)
            return {"t": "get", **fields}

        def still_serving(self) -> None:
            assert worker.proc.poll() is None, "the worker died"
            got = _fetch_chunk(worker.addr, SECRET.encode(), local_source.url, "f.bin", version, len(data), 3)
            assert got == data[3 * CHUNK:]

    s = Served()
    s.worker, s.source, s.data, s.version = worker, local_source, data, version
    return s


def test_mounts_killed_mid_read_never_take_the_worker_down(s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount):
    """The bug this file is for: a mount kill -9'd while it reads through a worker
    used to end the worker (an ExceptionGroup escaped the connection's handler)."""
    src = s3_behind_proxy
    src.write("first.bin", b"the prefix must exist before the worker starts")
    worker = cachefs_worker(src)
    rng = random.Random(9)
    files = {}
    for n in range(KILL_ROUNDS):
        # A new file each round, so the worker is loading from S3 when its peer dies.
        data = files[f"r{n}.bin"] = os.urandom(24 * CHUNK)
        src.write(f"r{n}.bin", data)
        m = cachefs_mount(src, *_peer_args([worker], secret_file, "--read-ahead", "16"))
        kill_after = rng.randint(1, 8) * CHUNK // 2
        got = 0
        try:
            with open(os.path.join(m.mountpoint, f"r{n}.bin"), "rb", buffering=0) as f:
                while block := f.read(CHUNK // 2):
                    got += len(block)
                    if got >= kill_after:
                        m.proc.send_signal(signal.SIGKILL)  # read-ahead requests are in flight
                        m.proc.wait(10)
        except OSError:
            pass  # ENOTCONN: the mount is gone, as it should be
        subprocess.run(["fusermount3", "-u", "-z", m.mountpoint], capture_output=True)
        assert worker.proc.poll() is None, f"the worker died in round {n + 1} of {KILL_ROUNDS}"
    fresh = cachefs_mount(src, *_peer_args([worker], secret_file))
    for name, data in files.items():
        assert _read(os.path.join(fresh.mountpoint, name)) == data
    assert fresh.metric("cachefs_backend_read_bytes_total") == 0  # all of it through the worker
    assert worker.proc.poll() is None


@pytest.mark.parametrize("abuse", [
    "garbage", "unknown-type", "second-hello", "long-path", "long-name", "negative-chunk-size",
    "eof-mid-frame", "reset-mid-request", "payload",
])
def test_an_authenticated_peer_that_misbehaves_loses_only_its_connection(served, abuse):
    c = RawClient(served.worker.addr)
    c.authenticate()
    if abuse == "garbage":
        c.sock.sendall(os.urandom(4096))
    elif abuse == "unknown-type":
        c.send({"t": "delete-everything", "id": 1})
    elif abuse == "second-hello":
        c.send({"t": "hello", "version": 1, "node": "again", "nonce": os.urandom(16)})
    elif abuse == "long-path":
        c.send(served.request(path="a" * 4097))
    elif abuse == "long-name":  # fits the frame, but no filesystem has such a name
        c.send(served.request(path="d/" + "n" * 300))
        header, _ = c.receive()
        assert (header["t"], header["code"]) == ("err", "bad-request")
    elif abuse == "negative-chunk-size":
        c.send(served.request(chunk_size=-1))
    elif abuse == "eof-mid-frame":
        packed = msgpack.packb(served.request(), use_bin_type=True)
        c.sock.sendall(struct.pack(">II", len(packed), 0) + packed[:5])
        c.sock.shutdown(socket.SHUT_WR)
    elif abuse == "reset-mid-request":
        c.send(served.request(index=1))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    elif abuse == "payload":  # no client message carries one
        packed = msgpack.packb(served.request(), use_bin_type=True)
        c.sock.sendall(struct.pack(">II", len(packed), 1 << 20) + packed)
    if abuse not in ("reset-mid-request", "long-name"):
        assert c.closed_by_server()
    c.close()
    served.still_serving()


def test_requests_outside_the_object_are_refused_before_any_fetch(s3_behind_proxy, secret_file, cachefs_worker):
    """size 0 used to become a `bytes=0--1` GET of the whole object (and switch
    the S3 fast path off for good); a chunk past the end is refused likewise."""
    from cachefs.errors import PeerError

    src = s3_behind_proxy
    data = os.urandom(2 * CHUNK)
    src.write("big.bin", data)
    etag = src.info("big.bin")["ETag"].strip('"')
    worker = cachefs_worker(src)
    src.proxy.reset()
    for size, index in ((0, 0), (len(data), 2), (CHUNK, 1), (1, 5)):
        with pytest.raises(PeerError, match="bad-request"):
            _fetch_chunk(worker.addr, SECRET.encode(), src.url, "big.bin", f"etag:{etag}", size, index)
    assert _ranges(src.proxy, "big.bin") == {}  # not one GET
    # And the good request still takes the ranged fast path: one GET of exactly the chunk.
    assert _fetch_chunk(worker.addr, SECRET.encode(), src.url, "big.bin", f"etag:{etag}", len(data), 1) == data[CHUNK:]
    assert _ranges(src.proxy, "big.bin") == {f"bytes={CHUNK}-{2 * CHUNK - 1}": 1}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_unauthenticated_hellos_cannot_make_the_worker_allocate(local_source, secret_file, cachefs_worker):
    """150 connections each declaring a 4 MiB payload in their hello, sending half of it, then stalling."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    local_source.write("f.bin", b"x")
    worker = cachefs_worker(local_source, "--chunk-size", "4M")  # chunk frames of 4 MiB are legitimate
    host, port = worker.addr.rsplit(":", 1)
    before = _rss_mib(worker.proc.pid)
    hello = msgpack.packb({"t": "hello", "version": 1, "node": "x", "nonce": os.urandom(16)}, use_bin_type=True)
    socks = []
    try:
        for _ in range(150):
            s = socket.create_connection((host, int(port)), timeout=10)
            socks.append(s)
            try:  # the header and 1 MiB of the payload: a server that buffers it holds 150 MiB
                s.sendall(struct.pack(">II", len(hello), 4 << 20) + hello + b"\1" * (2 << 20))
            except OSError:
                pass  # refused at the prefix
        c = RawClient(worker.addr)  # a round trip: the worker has read what it was sent
        c.authenticate()
        c.close()
        grown = _rss_mib(worker.proc.pid) - before
    finally:
        for s in socks:
            s.close()
    print(f"\nworker RSS growth with 150 stalled 4 MiB hellos: {grown:.1f} MiB")
    assert grown < 150
    assert worker.proc.poll() is None


def test_a_forged_log_line_stays_inside_its_quotes(served):
    forged = "x\n2026-01-01 00:00:00,000 INFO cachefs.worker: FORGED"
    for _ in range(3):
        c = RawClient(served.worker.addr)
        with pytest.raises(Exception):  # the server refuses a wrong MAC and closes
            c.authenticate(secret=b"not the secret", node=forged)
        c.close()
    served.still_serving()
    log = served.worker.log_path.read_text()
    assert "authentication failed" in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())
    assert "'x\\n2026-01-01" in log


def test_failed_handshakes_are_logged_once_per_interval_with_a_count(served):
    for _ in range(30):
        c = RawClient(served.worker.addr)
        with pytest.raises(Exception):
            c.authenticate(secret=b"wrong")
        c.close()
    served.still_serving()
    lines = [line for line in served.worker.log_path.read_text().splitlines() if "authentication failed" in line]
    assert 1 <= len(lines) <= 3, lines  # 30 failures, one line per 10 s


def test_garbage_before_and_after_authentication_leaves_the_worker_serving(served):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.booleans(), st.binary(min_size=1, max_size=600))
    def fuzz(authenticate, blob):
        c = RawClient(served.worker.addr)
        try:
            if authenticate:
                c.authenticate()
            c.sock.sendall(blob)
            c.sock.shutdown(socket.SHUT_WR)
            c.closed_by_server()
        except OSError:
            pass
        finally:
            c.close()

    fuzz()
    served.still_serving()


def test_a_secret_file_others_can_read_is_refused(local_source, tmp_path, run_cachefs):
    secret = tmp_path / "open-secret"
    secret.write_text(SECRET)
    secret.chmod(0o640)
    res = run_cachefs("worker", "--listen", f"127.0.0.1:{free_port()}", "--source", f"s={local_source.url}",
                      "--secret-file", secret, "--cache-dir", tmp_path / "c")
    assert res.returncode == 2
    assert "permissions 0640 are too open" in res.stderr and "chmod 600" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# -- the fault matrix's security and path rows (docs/reliability.md) ------------------


def test_a_replayed_handshake_is_refused_and_the_worker_keeps_serving(served):
    """An eavesdropper who recorded a good client's Hello and Auth cannot replay them:
    the server's nonce is fresh per connection and both nonces are in the MAC."""
    from cachefs.peer import protocol

    first = RawClient(served.worker.addr)
    nonce = os.urandom(16)
    hello = {"t": "hello", "version": protocol.PROTOCOL_VERSION, "node": "recorded", "nonce": nonce}
    first.send(hello)
    header, _ = first.receive()
    recorded_auth = {"t": "auth", "mac": protocol.hello_mac(SECRET.encode(), "client", nonce, header["nonce"])}
    first.send(recorded_auth)
    assert first.receive()[0]["t"] == "ready"
    first.close()

    replay = RawClient(served.worker.addr)
    replay.send(hello)
    header, _ = replay.receive()
    assert header["t"] == "hello"
    replay.send(recorded_auth)  # the MAC of the last connection's nonces
    assert replay.closed_by_server()
    replay.close()
    assert "authentication failed" in served.worker.log_path.read_text()
    served.still_serving()


def test_a_request_without_a_handshake_gets_nothing(served):
    c = RawClient(served.worker.addr)
    c.send(served.request())
    assert c.closed_by_server()  # no chunk, no error frame: the connection is closed
    c.close()
    served.still_serving()


def test_a_source_the_worker_does_not_serve_is_refused_on_a_connection_that_goes_on(served):
    """A worker never becomes a proxy to arbitrary URLs; the refusal costs the peer nothing else."""
    c = RawClient(served.worker.addr)
    c.authenticate()
    for source in ("s3://elsewhere/data", served.source.url + "/..", "/etc"):
        c.send(served.request(source=source))
        header, payload = c.receive()
        assert (header["t"], header["code"], payload) == ("err", "refused", b""), header
    c.send(served.request(id=2, index=3))  # the same connection still serves
    header, payload = c.receive()
    assert header["t"] == "chunk" and header["id"] == 2 and bytes(payload) == served.data[3 * CHUNK:]
    c.close()
    assert served.worker.metric("cachefs_peer_served_total", outcome="refused") == 3


@pytest.mark.parametrize("path", [
    "..", "../f.bin", "a/../../f.bin", "/etc/passwd", "/f.bin", "./f.bin", "a//f.bin",
    "f.bin\0", "\0", "d/" + "n" * 256, "",
])
def test_request_paths_that_could_leave_the_source_are_refused_at_the_edge(served, path):
    """The peer edge of the dataset-path row: `..`, absolute paths, NUL and names over
    NAME_MAX get `bad-request` before any tier or the backend is asked."""
    secret = served.source.root.parent / "secret.txt"
    secret.write_bytes(b"outside the source")
    c = RawClient(served.worker.addr)
    c.authenticate()
    c.send(served.request(path=path, size=len(b"outside the source")))
    header, payload = c.receive()
    assert (header["t"], header["code"], payload) == ("err", "bad-request", b""), header
    c.close()
    served.still_serving()
