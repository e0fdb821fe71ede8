#!/usr/bin/env python3
"""A counting (and optionally throttling) HTTP proxy in front of an S3 endpoint.

Tests and benchmarks put it between cachefs and the JuiceFS gateway to see the
backend's side of the story: how many GETs for which byte ranges really
arrived, and how many response bytes left, whatever cachefs's own metrics say.
With a rate it also plays a throttled backend (a token bucket over the
response bytes of all connections together).

    with S3Proxy("http://127.0.0.1:9000", rate=100 << 20) as proxy:
        ... point clients at proxy.endpoint_url ...
        proxy.gets          # Counter of (path, Range header) -> requests
        proxy.response_bytes

Only loopback: it listens on 127.0.0.1 and forwards to the given upstream.
"""

from __future__ import annotations

import argparse
import collections
import socket
import socketserver
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


class S3Proxy:
    def __init__(self, upstream: str, rate: float | None = None, port: int = 0):
        url = urllib.parse.urlsplit(upstream)
        self.upstream = (url.hostname or "127.0.0.1", url.port or 80)
        self.gets: collections.Counter[tuple[str, str]] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.response_bytes = 0
        self._lock = threading.Lock()
        self._bucket = _TokenBucket(rate) if rate else None
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._relay(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)

    def start(self) -> "S3Proxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "S3Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.gets.clear()
            self.requests.clear()
            self.response_bytes = 0

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
            with self._lock:
                self.requests[method] += 1
                if method == "GET":
                    self.gets[(urllib.parse.unquote(path.split("?")[0]), headers.get("range", ""))] += 1
            length = int(headers.get("content-length", "0") or 0)
            upstream.sendall(head + b"\r\n\r\n")
            while len(rest) < length:
                data = client.recv(65536)
                if not data:
                    return
                rest += data
            upstream.sendall(rest[:length])
            buf = rest[length:]

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
