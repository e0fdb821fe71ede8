"""`cachefs status` and `cachefs dataset list` as text: a node's metrics (HOST:PORT), or
what its control socket answers (MOUNTPOINT; see cachefs.control)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from cachefs.config import format_size, parse_addr
from cachefs.errors import ConfigError

Samples = dict[tuple[str, frozenset], float]


def scrape(addr: str, timeout: float = 5.0, names: list[str] | None = None) -> Samples:
    """The node's metrics (`names`: only these). Raises ConfigError if the node does not answer."""
    host, port = parse_addr(addr, "status")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback/cluster: never a proxy
    query = "?" + urllib.parse.urlencode([("name[]", n) for n in names]) if names else ""
    try:
        with opener.open(f"http://{host}:{port}/metrics{query}", timeout=timeout) as resp:
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


def is_metrics_addr(target: str) -> bool:
    """HOST:PORT (a --metrics address) rather than a path; write ./NAME for a directory named like one."""
    if "/" in target or target in (".", ".."):
        return False
    try:
        parse_addr(target, "status")
    except ConfigError:
        return False
    return True


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _quota(value) -> str:
    return format_size(value) if isinstance(value, int) and value > 0 else "-"


def render_datasets(rows: list[dict]) -> str:
    """`cachefs dataset list`: one line a dataset (the dataset.list result)."""
    if not rows:
        return "no datasets"
    return _table(
        ["NAME", "URL", "MODE", "SUBDIR", "QUOTA", "OPEN FILES"],
        [
            [
                str(d.get("name") or "(root)"),
                str(d.get("url", "")),
                "ro" if d.get("read_only", True) else "rw",
                str(d.get("subdir") or "-"),
                _quota(d.get("quota")),
                str(d.get("open_files", "-")),
            ]
            for d in rows
        ],
    )


def _dataset_reads(d: dict) -> list[str]:
    """How a dataset's chunk reads were served since start, its evictions, and (with
    --deep) what is cached of it and where."""
    name = str(d.get("name") or "(root)")
    lines = []
    reads = d.get("chunk_reads") or {}
    if reads:
        ratios = d.get("hit_ratio") or {}
        served = ", ".join(f"{source} {ratios.get(source) or 0:.1%}" for source in reads)
        evicted = ", ".join(f"{tier} {n}" for tier, n in (d.get("evictions") or {}).items())
        total = sum(reads.values())
        lines.append(f"  {name}: {total} chunk reads" + (f" served by {served}" if total else "")
                     + f"; evicted chunks: {evicted or '-'}")
    if d.get("residency"):
        lines.extend(_residency(name, d["residency"], "    " if lines else "  "))
    return lines


def _residency(label: str, held: dict, indent: str) -> list[str]:
    lines = [
        f"{indent}{label}: {held.get('files', 0)} files, {_size(held.get('cached_bytes', 0))} of "
        f"{_size(held.get('bytes', 0))} cached ({held.get('ratio', 0):.1%}), "
        f"{held.get('cached_chunks', 0)}/{held.get('chunks', 0)} chunks"
    ]
    nodes = held.get("nodes") or {}
    if nodes:
        where = ", ".join(f"{node} {_size(n)}" for node, n in sorted(nodes.items(), key=lambda item: -item[1]))
        lines.append(f"{indent}  held by: {where}")
    if held.get("unanswered"):
        lines.append(f"{indent}  no answer from: {', '.join(held['unanswered'])} (counted as holding none)")
    return lines


def render_node(target: str, status: dict) -> str:
    """`cachefs status MOUNTPOINT`: the status op's result (shape in docs/operations.md) as text."""
    head = f"{target}: cachefs {status.get('version', '?')}"
    if status.get("hot_path"):
        head += f" (hot path: {status['hot_path']})"
    if status.get("pid"):
        head += f", pid {status['pid']}"
    lines = [head]
    for tier in status.get("tiers") or []:
        lines.append(
            f"  {str(tier.get('name', '?')):<5} {_size(tier.get('used_bytes', 0)):>8} of "
            f"{_size(tier.get('capacity_bytes', 0)):>8}  ({tier.get('chunks', 0)} chunks)"
        )
    datasets = status.get("datasets") or []
    if datasets:
        lines.append("  " + render_datasets(datasets).replace("\n", "\n  "))
        for d in datasets:
            lines.extend(_dataset_reads(d))
    peers = status.get("peers") or []
    if peers:
        down = sorted(str(p.get("node")) for p in peers if not p.get("up"))
        lines.append(f"  peers {len(peers)}; down: {', '.join(down) or 'none'}")
    pins = status.get("pins") or []
    if pins or status.get("pin_quota"):
        lines.append(f"  pins: {_size(status.get('pinned_bytes', 0))} of {_size(status.get('pin_quota', 0))} pin quota")
        for p in pins:
            where = ""
            if p.get("peers"):
                where = "  at " + ", ".join(f"{node} {_size(n)}" for node, n in sorted(p["peers"].items()))
            elif p.get("origin"):
                where = f"  for {p['origin']}"
            lines.append(f"    {p.get('id')}  {p.get('owner')}  {_size(p.get('bytes', 0))}  "
                         f"{', '.join(p.get('paths', []))}  ({p.get('expires_in', 0):.0f} s left){where}")
    writes = status.get("writes")
    if writes:
        mode = "writeback" if writes.get("writeback") else "upload on close"
        lines.append(
            f"  writes ({mode}): {writes.get('open_for_write', 0)} open, {_size(writes.get('staged_bytes', 0))} staged "
            f"of {_size(writes.get('stage_limit', 0))}, {writes.get('pending_uploads', 0)} uploads pending "
            f"({_size(writes.get('pending_bytes', 0))})"
        )
    held = status.get("path")
    if held:
        lines.extend(_residency(held.get("path") or "/", held, "  "))
    shown = {"version", "hot_path", "pid", "tiers", "datasets", "peers", "pins", "pinned_bytes", "pin_quota", "path", "writes"}
    for key, value in status.items():
        if key not in shown and not isinstance(value, (dict, list)):
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)
