#!/usr/bin/env python3
"""A counting (and optionally throttling) HTTP proxy in front of an S3 endpoint.

Tests and benchmarks put it between cachefs and the JuiceFS gateway to see the
backend's side of the story: how many GETs for which byte ranges really
arrived, and how many response bytes left, whatever cachefs's own metrics say.
With a rate it also plays a throttled backend (a token bucket over the
response bytes of all connections together).

It also plays a sick backend: set `proxy.fault` at run time and the requests
it applies to (`proxy.fault_scope`: "data", ranged GETs of object data, the
default; "writes", PUTs, POSTs and DELETEs; "completes", the POSTs that complete
a multipart upload; "listings", LISTs of a directory's entries, not the LISTs of
at most a key or two that check one name; or "all")
get, instead of the real answer:

    "503", "500"     that status with an S3 error body, then the connection closes
    "slow:SECONDS"   the real answer, SECONDS late (longer than the client's
                     timeout: a backend that stopped answering)
    "truncate"       the real status and headers, half the body, then EOF
    "reset"          a TCP reset (RST) instead of any answer
    "lost"           the request reaches the server, its answer is dropped for a
                     TCP reset (once: then the fault is cleared, so a retry is answered)
    None             the real answer (the default)

    with S3Proxy("http://127.0.0.1:9000", rate=100 << 20) as proxy:
        ... point clients at proxy.endpoint_url ...
        proxy.gets          # Counter of (path, Range header) -> requests
        proxy.lists         # Counter of (prefix, max-keys or "") -> LIST requests
        proxy.response_bytes
        proxy.fault = "503"
        proxy.faults        # Counter of fault -> requests it was applied to

`TcpProxy` is a plain TCP relay for anything else (peer connections); its
`blackhole` switch plays a network partition: connections are accepted and
whatever they send is swallowed, nothing is ever answered.

Only loopback: it listens on 127.0.0.1 and forwards to the given upstream.
"""

from __future__ import annotations

import argparse
import collections
import socket
import socketserver
import struct
import threading
import time
import urllib.parse


class _TokenBucket:
    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.tokens + (now - self.last) * self.rate, self.rate / 10)
            self.last = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


class _Listener:
    """A threaded TCP server on 127.0.0.1 that hands each connection to `_relay`."""

    def __init__(self, port: int, name: str):
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._relay(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    def _relay(self, client: socket.socket) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class S3Proxy(_Listener):
    def __init__(self, upstream: str, rate: float | None = None, port: int = 0):
        url = urllib.parse.urlsplit(upstream)
        self.upstream = (url.hostname or "127.0.0.1", url.port or 80)
        self.gets: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lists: collections.Counter[tuple[str, str]] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.response_bytes = 0
        self.fault: str | None = None
        self.fault_scope = "data"
        self.faults: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._bucket = _TokenBucket(rate) if rate else None
        super().__init__(port, "s3-proxy")
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.gets.clear()
            self.lists.clear()
            self.requests.clear()
            self.response_bytes = 0
            self.faults.clear()

    def _fault_for(self, method: str, path: str, headers: dict[str, str], listing: tuple[str, str] | None) -> str | None:
        fault = self.fault  # read once: the test may flip it meanwhile
        if fault is None:
            return None
        if self.fault_scope == "data" and not (method == "GET" and "range" in headers):
            return None
        if self.fault_scope == "writes" and method not in ("PUT", "POST", "DELETE"):
            return None
        if self.fault_scope == "completes" and not (method == "POST" and "uploadId=" in path):
            return None
        if self.fault_scope == "listings" and (listing is None or listing[1] in ("1", "2")):
            return None
        with self._lock:
            if fault == "lost":
                if self.fault != "lost":
                    return None  # another request took the one loss
                self.fault = None
            self.faults[fault] += 1
        return fault

    def _inject(self, fault: str, client: socket.socket, request: bytes) -> bool:
        """Answer one request as `fault` says. Returns whether the connection may go on.

        Clients wait for each answer before they send the next request (no
        pipelining), so writing to `client` here cannot interleave with the
        response pump.
        """
        if fault.startswith("slow:"):
            time.sleep(float(fault.partition(":")[2]))
            return True  # then forwarded as usual
        if fault in ("500", "503"):
            code, reason = ("SlowDown", "Slow Down") if fault == "503" else ("InternalError", "Internal Server Error")
            body = f"<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            client.sendall(
                f"HTTP/1.1 {fault} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            client.shutdown(socket.SHUT_RDWR)
            return False
        if fault == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # linger 0: the kernel sends RST
            return False
        if fault == "lost":
            self._exchange(request)  # done by the server
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return False
        if fault == "truncate":
            head, body = self._exchange(request)
            client.sendall(head + body[: len(body) // 2])
            client.shutdown(socket.SHUT_RDWR)
            return False
        raise ValueError(f"unknown fault {fault!r}")

    def _exchange(self, request: bytes) -> tuple[bytes, bytes]:
        """Send one request upstream on a connection of its own; its response head and body."""
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = up.recv(65536)
                if not data:
                    return buf, b""
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            while len(body) < length and (data := up.recv(65536)):
                body += data
            return head + b"\r\n\r\n", body

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=60)
        except OSError:
            client.close()
            return
        done = threading.Event()
        back = threading.Thread(target=self._pump_responses, args=(upstream, client, done), daemon=True)
        back.start()
        try:
            self._pump_requests(client, upstream)
        except OSError:
            pass
        finally:
            try:
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            done.wait(60)
            upstream.close()
            client.close()

    def _pump_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy client → upstream, parsing just enough HTTP/1.1 to count requests."""
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = client.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = (lines[0].split(" ") + ["", ""])[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            listing = None
            if method == "GET":
                query = urllib.parse.parse_qs(path.partition("?")[2])
                if "list-type" in query:
                    listing = (query.get("prefix", [""])[0], query.get("max-keys", [""])[0])
            with self._lock:
                self.requests[method] += 1
                if method == "GET":
                    self.gets[(urllib.parse.unquote(path.split("?")[0]), headers.get("range", ""))] += 1
                if listing is not None:
                    self.lists[listing] += 1
            length = int(headers.get("content-length", "0") or 0)
            while len(rest) < length:
                data = client.recv(65536)
                if not data:
                    return
                rest += data
            request, buf = head + b"\r\n\r\n" + rest[:length], rest[length:]
            fault = self._fault_for(method, path, headers, listing)
            if fault is not None and not self._inject(fault, client, request):
                return
            upstream.sendall(request)

    def _pump_responses(self, upstream: socket.socket, client: socket.socket, done: threading.Event) -> None:
        try:
            while data := upstream.recv(256 << 10):
                if self._bucket:
                    self._bucket.take(len(data))
                with self._lock:
                    self.response_bytes += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            done.set()


class TcpProxy(_Listener):
    """A TCP relay from 127.0.0.1:port to `upstream` ("HOST:PORT") that can play a partition.

    While `blackhole` is set, connections (new and open ones) are accepted and
    read but nothing crosses in either direction, so the far side looks hung,
    not closed. Clearing it closes the connections that lost bytes (their
    streams are broken) and relays new ones again.
    """

    def __init__(self, upstream: str, port: int = 0):
        host, _, port_ = upstream.rpartition(":")
        self.upstream = (host, int(port_))
        self.blackhole = False
        self.connections = 0
        self._lock = threading.Lock()
        self._broken: list[socket.socket] = []
        super().__init__(port, "tcp-proxy")
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        super().stop()
        self.restore()

    def restore(self) -> None:
        """End the partition: close the connections it broke; new ones are relayed."""
        self.blackhole = False
        with self._lock:
            broken, self._broken = self._broken, []
        for sock in broken:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _relay(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        upstream = None
        if not self.blackhole:
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                return
        if upstream is None:  # partitioned from the start: swallow until closed
            self._swallow(client)
            client.close()
            return
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join(60)
        upstream.close()
        client.close()

    def _swallow(self, sock: socket.socket) -> None:
        with self._lock:
            self._broken.append(sock)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.blackhole:
                    self._swallow(src)
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (dst, src):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("upstream", help="http://127.0.0.1:PORT of the S3 server")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", type=float, help="bytes/s of responses, all connections together")
    a = p.parse_args()
    with S3Proxy(a.upstream, a.rate, a.port) as proxy:
        print(f"endpoint={proxy.endpoint_url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
