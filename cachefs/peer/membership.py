"""Who is on the ring: a static list, a DNS name (a Kubernetes headless Service)
re-resolved periodically, or a file re-read when it changes.

    --peers 10.0.0.5:7070,10.0.0.6:7070@2
    --peers dns+cachefs-workers.ns.svc:7070
    --peers file:/etc/cachefs/peers        (one HOST:PORT[@WEIGHT] a line, # comments)
"""

from __future__ import annotations

import logging
import math
import os

import trio

from cachefs import metrics
from cachefs.config import parse_addr
from cachefs.errors import ConfigError
from cachefs.peer.ring import Ring

log = logging.getLogger(__name__)

DNS_INTERVAL = 30.0
FILE_INTERVAL = 2.0


def parse_node_list(text: str, what: str) -> dict[str, float]:
    """'host:port[@weight],...' (commas or newlines) → {node: weight}.

    Raises:
        ConfigError: a bad address or weight.
    """
    nodes: dict[str, float] = {}
    for item in text.replace("\n", ",").split(","):
        item = item.split("#", 1)[0].strip()
        if not item:
            continue
        addr, _, weight_text = item.partition("@")
        host, port = parse_addr(addr, what)
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{what}: {item!r}: the weight must be a positive number")
        nodes[f"{host}:{port}"] = weight
    return nodes


class Membership:
    """Holds the current ring; `run` keeps it up to date for dns+ and file: specs."""

    def __init__(self, spec: str):
        self.spec = spec
        self.kind = "static"
        if spec.startswith("dns+"):
            self.kind = "dns"
            self._dns_host, self._dns_port = parse_addr(spec[len("dns+") :], "--peers")
            nodes: dict[str, float] = {}
        elif spec.startswith("file:"):
            self.kind = "file"
            self._path = spec[len("file:") :]
            self._mtime = None
            nodes = self._read_file()
        else:
            nodes = parse_node_list(spec, "--peers")
            if not nodes:
                raise ConfigError("--peers: no peers given")
        self._set(nodes)

    @property
    def ring(self) -> Ring:
        return self._ring

    def _set(self, nodes: dict[str, float]) -> None:
        self._ring = Ring(nodes)
        metrics.RING_NODES.set(len(nodes))

    def _read_file(self) -> dict[str, float]:
        try:
            self._mtime = os.stat(self._path).st_mtime_ns
            with open(self._path) as f:
                return parse_node_list(f.read(), f"--peers file:{self._path}")
        except OSError as e:
            raise ConfigError(f"--peers file:{self._path}: {e.strerror}") from None

    async def run(self) -> None:
        """Refresh the ring until cancelled; a failed refresh keeps the last ring."""
        if self.kind == "static":
            return
        while True:
            try:
                if self.kind == "dns":
                    await self._refresh_dns()
                else:
                    await self._refresh_file()
            except (OSError, ConfigError) as e:
                log.warning("--peers %s: cannot refresh (%s); keeping %d nodes", self.spec, e, len(self._ring))
            await trio.sleep(DNS_INTERVAL if self.kind == "dns" else FILE_INTERVAL)

    async def _refresh_dns(self) -> None:
        infos = await trio.socket.getaddrinfo(self._dns_host, self._dns_port, type=trio.socket.SOCK_STREAM)
        nodes = {}
        for family, *_, sockaddr in infos:
            host = f"[{sockaddr[0]}]" if family == trio.socket.AF_INET6 else sockaddr[0]
            nodes[f"{host}:{sockaddr[1]}"] = 1.0
        if nodes != {n: self._ring.weight(n) for n in self._ring.nodes}:
            log.info("--peers %s: %d nodes", self.spec, len(nodes))
            self._set(nodes)

    async def _refresh_file(self) -> None:
        if os.stat(self._path).st_mtime_ns != self._mtime:
            nodes = await trio.to_thread.run_sync(self._read_file)
            log.info("--peers file:%s: %d nodes", self._path, len(nodes))
            self._set(nodes)
