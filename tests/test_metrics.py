"""Metrics through real processes: byte attribution on a real mount, and the
Grafana dashboard in deploy/grafana/ against what a real mount and worker serve."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

CHUNK = 256 << 10
MiB = 1 << 20
SMALL_CHUNKS = ("--chunk-size", "256K", "--mem-size", "64M", "--cache-size", "256M", "--read-ahead", "8")


def _read_all(path: str, block: int = 128 << 10) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            n += len(data)
    return n


def _drop_page_cache(path: str) -> None:
    # Only this file's pages: the next pass must reach cachefs again.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _by_source(mount) -> dict[str, float]:
    return {s: mount.metric("cachefs_read_bytes_total", source=s) for s in ("mem", "disk", "peer", "backend")}


def test_cold_pass_counts_read_ahead_bytes_as_backend(local_source, cachefs_mount):
    """Read-ahead moves chunks into MEM before the reader asks; the reader's bytes
    still came from the backend, and must be counted so (not as MEM hits)."""
    size = 48 * CHUNK + 1000
    local_source.write("big.bin", random.Random(1).randbytes(size))
    m = cachefs_mount(local_source, *SMALL_CHUNKS)
    path = os.path.join(m.mountpoint, "big.bin")

    assert _read_all(path) == size
    cold = _by_source(m)
    print(f"\ncold pass: {', '.join(f'{s} {v / MiB:.2f} MiB' for s, v in cold.items())} of {size / MiB:.2f} MiB")
    assert m.metric("cachefs_readahead_chunks_total") > 0  # read-ahead did take part
    assert sum(cold.values()) == size
    assert cold["backend"] >= 0.98 * size
    assert cold["mem"] + cold["disk"] <= 0.02 * size
    # Per dataset, the same truth.
    assert m.metric("cachefs_dataset_read_bytes_total", source="backend") == cold["backend"]

    _drop_page_cache(path)
    assert _read_all(path) == size
    warm = {s: v - cold[s] for s, v in _by_source(m).items()}
    print(f"warm pass: {', '.join(f'{s} {v / MiB:.2f} MiB' for s, v in warm.items())}")
    assert warm["backend"] == 0
    assert warm["mem"] + warm["disk"] == size


def test_a_scrape_of_named_metrics_holds_those_alone(local_source, cachefs_mount):
    """?name[]=...: a poller of one gauge (bench.write waits on cachefs_uploads_pending)
    makes the mount render those series only, not every one every 50 ms."""
    from cachefs.status import scrape

    local_source.write("a", b"a")
    m = cachefs_mount(local_source)
    some = scrape(m.metrics_addr, names=["cachefs_uploads_pending", "cachefs_inodes"])
    assert {name for name, _ in some} == {"cachefs_uploads_pending", "cachefs_inodes"}
    assert len(scrape(m.metrics_addr)) > 10 * len(some)


# -- the dashboard ---------------------------------------------------------------------

DASHBOARD = REPO / "deploy" / "grafana" / "cachefs.json"

# Series that have samples only once their event happened (a corrupt chunk):
# for these the scrape must at least declare the family (# TYPE).
EVENT_ONLY = {"cachefs_cache_errors_total"}

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def promql_series(expr: str) -> set[str]:
    """The series names a PromQL expression reads: label matchers, ranges,
    strings, grouping labels and function names stripped."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values, legends)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        name = m.group()
        after = expr[m.end():].lstrip()
        if after.startswith("(") or name in PROMQL_WORDS:
            continue  # a function (rate, sum, histogram_quantile, label_values) or a keyword
        names.add(name)
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_promql_series_extraction():
    assert promql_series(
        'histogram_quantile(0.99, sum by (le, op) (rate(cachefs_fuse_op_seconds_bucket{instance=~"$i"}[5m])))'
    ) == {"cachefs_fuse_op_seconds_bucket"}
    assert promql_series(
        '1 - sum(rate(cachefs_read_bytes_total{source="backend"}[$__rate_interval])) / sum(rate(cachefs_read_bytes_total[1m]))'
    ) == {"cachefs_read_bytes_total"}
    # label_values(METRIC, LABEL): the label looks like a series too; callers drop known labels.
    assert promql_series("label_values(cachefs_cache_capacity_bytes, instance)") == {
        "cachefs_cache_capacity_bytes", "instance"
    }


def _scrape(addr: str) -> tuple[set[str], set[str]]:
    """(sample names, family names) served at http://ADDR/metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples, families = set(), set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        samples.update(s.name for s in family.samples)
    return samples, families


def test_every_series_the_dashboard_queries_exists(local_source, secret_file, cachefs_worker, cachefs_mount):
    dashboard = json.loads(DASHBOARD.read_text())
    data = random.Random(2).randbytes(12 * CHUNK + 5)
    local_source.write("d/a.bin", data)
    worker = cachefs_worker(local_source)
    # A small MEM tier, so that reading evicts; --peers, so that the peer series move.
    m = cachefs_mount(
        local_source, "--chunk-size", "256K", "--mem-size", "1M", "--cache-size", "64M",
        "--peers", worker.addr, "--secret-file", str(secret_file),
    )
    path = os.path.join(m.mountpoint, "d", "a.bin")
    assert _read_all(path) == len(data)
    with pytest.raises(OSError):
        os.getxattr(path, "user.no-such-attribute")  # ENODATA: a FUSE error, counted
    assert m.metric("cachefs_peer_requests_total", outcome="ok") > 0

    scraped = [_scrape(m.metrics_addr), _scrape(worker.metrics_addr)]
    samples = set().union(*(s for s, _ in scraped))
    families = set().union(*(f for _, f in scraped))
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    queried = set().union(*map(promql_series, exprs)) - {"instance", "dataset"}
    assert queried, exprs
    missing = []
    for name in sorted(queried):
        if name in EVENT_ONLY:
            if name.removesuffix("_total") not in families:
                missing.append(name)
        elif name not in samples:
            missing.append(name)
    assert not missing, f"the dashboard queries series no node serves: {missing}"
    # And every panel has a query: no empty placeholders.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel.get("targets") and all(t["expr"] for t in panel["targets"]), panel["title"]


@pytest.mark.parametrize("values", [[], [0.00005, 0.0001, 0.00011, 0.3, 30, 31, 0.0], [1e-7] * 5 + [7.5] * 3])
def test_hot_series_expose_what_prometheus_client_would(values):
    """The lock-free series bumped on every read serve the same samples as
    prometheus_client's own Counter and Histogram fed the same values."""
    import prometheus_client as prom

    from cachefs import metrics

    ours_h = metrics.FUSE_OP_SECONDS.labels(f"test-{len(values)}")
    ours_c = metrics.READ_BYTES.labels(f"test-{len(values)}")
    registry = prom.CollectorRegistry()
    theirs_h = prom.Histogram(
        "cachefs_fuse_op_seconds", "", ["op"], buckets=metrics.FUSE_OP_SECONDS.buckets, registry=registry
    ).labels(f"test-{len(values)}")
    theirs_c = prom.Counter("cachefs_read_bytes", "", ["source"], registry=registry).labels(f"test-{len(values)}")
    for v in values:
        for h in (ours_h, theirs_h):
            h.observe(v)
        for c in (ours_c, theirs_c):
            c.inc(int(v * 1000) + 1)

    def samples(reg) -> dict:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in reg.collect()
            if family.name in ("cachefs_fuse_op_seconds", "cachefs_read_bytes")
            for s in family.samples
            if not s.name.endswith("_created") and f"test-{len(values)}" in s.labels.values()
        }

    expected = samples(registry)
    assert len(expected) == len(metrics.FUSE_OP_SECONDS.buckets) + 1 + 2 + 1  # buckets, +Inf, _count, _sum, counter
    assert samples(prom.REGISTRY) == pytest.approx(expected)
