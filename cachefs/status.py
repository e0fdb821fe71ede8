"""`cachefs status`: what each node (mount or worker) holds and serves, from its metrics."""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from cachefs.config import parse_addr
from cachefs.errors import ConfigError

Samples = dict[tuple[str, frozenset], float]


def scrape(addr: str, timeout: float = 5.0) -> Samples:
    """Raises ConfigError if the node does not answer."""
    host, port = parse_addr(addr, "status")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback/cluster: never a proxy
    try:
        with opener.open(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError as e:
        raise ConfigError(f"{addr}: no metrics there ({e})") from None
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _size(n: float) -> str:
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}B"


def render(addr: str, samples: Samples) -> str:
    lines = [f"{addr}"]
    for tier in ("mem", "disk"):
        cap = _sum(samples, "cachefs_cache_capacity_bytes", tier=tier)
        used = _sum(samples, "cachefs_cache_used_bytes", tier=tier)
        chunks = _sum(samples, "cachefs_cache_chunks", tier=tier)
        lines.append(f"  {tier:<5} {_size(used):>8} of {_size(cap):>8}  ({chunks:.0f} chunks)")
    by_source: dict[str, dict[str, float]] = defaultdict(dict)
    for (name, labels), value in samples.items():
        if name == "cachefs_source_cached_bytes":
            d = dict(labels)
            by_source[d["source"]][d["tier"]] = value
    for source, tiers in sorted(by_source.items()):
        held = ", ".join(f"{tier} {_size(v)}" for tier, v in sorted(tiers.items()))
        lines.append(f"  source {source}: {held}")
    read = {s: _sum(samples, "cachefs_read_bytes_total", source=s) for s in ("mem", "disk", "peer", "backend")}
    total = sum(read.values())
    fetched = _sum(samples, "cachefs_backend_read_bytes_total")
    if total:
        ratio = max(total - fetched, 0) / total
        lines.append(
            f"  read {_size(total)} ("
            + ", ".join(f"{s} {_size(v)}" for s, v in read.items())
            + f"); cache ratio {ratio:.1%}"
        )
    served = _sum(samples, "cachefs_peer_served_bytes_total")
    if served or _sum(samples, "cachefs_peer_served_total"):
        lines.append(f"  served to peers {_size(served)} ({_sum(samples, 'cachefs_peer_served_total', outcome='ok'):.0f} chunks)")
    lines.append(
        f"  backend GETs {_sum(samples, 'cachefs_backend_requests_total', op='get'):.0f}, "
        f"fetched {_size(fetched)}"
    )
    peers = {dict(ls)["peer"]: v for (n, ls), v in samples.items() if n == "cachefs_peer_up"}
    if peers or _sum(samples, "cachefs_ring_nodes"):
        down = sorted(p for p, up in peers.items() if not up)
        lines.append(
            f"  ring {_sum(samples, 'cachefs_ring_nodes'):.0f} nodes; peers down: {', '.join(down) or 'none'}"
        )
    return "\n".join(lines)


def main(addrs: list[str]) -> int:
    for addr in addrs:
        print(render(addr, scrape(addr)))
    return 0
