"""Prometheus metrics, and a small trio HTTP endpoint that serves them.

Names follow `cachefs_*_bytes/_seconds/_total`; hits, misses and errors are
separate series. Later layers (peers, workers) add to these, never rename them.
"""

from __future__ import annotations

import bisect
import logging
import urllib.parse
import weakref
from typing import Callable

import prometheus_client as prom
import trio
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

log = logging.getLogger(__name__)


class _HotCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class HotCounter:
    """A labelled counter for series bumped on every FUSE read: `inc` is a plain
    add, where prometheus_client's takes a lock (2 µs; a MEM hit costs ~30 µs
    in all). Only the trio thread may bump one: the add is not atomic.
    Exposed as `NAME_total`, like prom.Counter."""

    def __init__(self, name: str, documentation: str, labelnames: list[str]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], _HotCount] = {}
        prom.REGISTRY.register(self)

    def labels(self, *values: str) -> _HotCount:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _HotCount()
        return child

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family

    def describe(self):
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _HotObservations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class HotHistogram:
    """A labelled histogram with HotCounter's plain adds (observe: 0.3 µs, not 3)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], buckets: tuple[float, ...]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.buckets = tuple(sorted(buckets))
        self._children: dict[tuple[str, ...], _HotObservations] = {}
        prom.REGISTRY.register(self)

    def labels(self, *values: str) -> _HotObservations:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _HotObservations(self.buckets)
        return child

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative, running = [], 0
            for bound, n in zip(self.buckets + (float("inf"),), list(child.counts)):
                running += n
                cumulative.append((prom.utils.floatToGoString(bound), running))
            family.add_metric(list(values), cumulative, child.sum)
        yield family

    def describe(self):
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


READ_BYTES = HotCounter(
    "cachefs_read_bytes", "Bytes returned to readers, by where the chunk came from", ["source"]
)


def read_bytes(source: str) -> _HotCount:
    """READ_BYTES for one source."""
    return READ_BYTES.labels(source)


CACHE_HITS = HotCounter("cachefs_cache_hits", "Chunk lookups served by a tier", ["tier"])
CACHE_MISSES = HotCounter("cachefs_cache_misses", "Chunk lookups a tier could not serve", ["tier"])
CACHE_ERRORS = prom.Counter(
    "cachefs_cache_errors", "Cached chunks dropped as corrupt or unreadable", ["tier", "reason"]
)
CACHE_EVICTIONS = prom.Counter("cachefs_cache_evictions", "Chunks evicted to stay within capacity", ["tier"])
CACHE_REJECTED = prom.Counter(
    "cachefs_cache_rejected", "New chunks the admission policy did not store (--admission)", ["tier"]
)
CACHE_WRITTEN_BYTES = prom.Counter("cachefs_cache_written_bytes", "Bytes of chunk files written", ["tier"])
CACHE_USED = prom.Gauge("cachefs_cache_used_bytes", "Bytes held by a cache tier", ["tier"])
CACHE_CAPACITY = prom.Gauge("cachefs_cache_capacity_bytes", "Configured capacity of a cache tier", ["tier"])
BUDGET_BYTES = prom.Gauge(
    "cachefs_chunk_budget_bytes",
    "Chunk bytes held in memory (MEM, unread read-ahead, fetches in flight) against --mem-size",
    ["kind"],  # used, peak, capacity
)
CACHE_CHUNKS = prom.Gauge("cachefs_cache_chunks", "Chunks held by a cache tier", ["tier"])

BACKEND_REQUESTS = prom.Counter(
    "cachefs_backend_requests", "Backend requests by operation and outcome", ["op", "outcome"]
)
BACKEND_READ_BYTES = prom.Counter("cachefs_backend_read_bytes", "Bytes fetched from the backend")
BACKEND_WRITTEN_BYTES = prom.Counter("cachefs_backend_written_bytes", "Bytes of files uploaded to the backend")
STAGED_BYTES = prom.Gauge("cachefs_staged_bytes", "Bytes of written files held in the staging area")
STAGING_CAPACITY = prom.Gauge("cachefs_staging_capacity_bytes", "The staging area's bound (--stage-size)")
UPLOADS_PENDING = prom.Gauge("cachefs_uploads_pending", "Closed files not yet uploaded (--writeback)")
UPLOADS_PENDING_BYTES = prom.Gauge("cachefs_uploads_pending_bytes", "Bytes of closed files not yet uploaded")
UPLOADS = prom.Counter("cachefs_uploads", "File uploads by outcome (ok, error, retried later)", ["outcome"])
STAGING_WAITS = prom.Counter("cachefs_staging_waits", "Writes that waited for uploads to free staging room")
BACKEND_SECONDS = prom.Histogram(
    "cachefs_backend_request_seconds",
    "Latency of successful backend requests",
    ["op"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SINGLEFLIGHT_WAITS = prom.Counter(
    "cachefs_singleflight_waits", "Chunk reads that waited for a fetch already in flight"
)
READAHEAD_CHUNKS = prom.Counter("cachefs_readahead_chunks", "Chunks fetched ahead of the reader")
READAHEAD_SKIPPED = prom.Counter(
    "cachefs_readahead_skipped", "Read-ahead chunks not fetched: the chunk budget (--mem-size) had no room"
)
PEER_REQUESTS = prom.Counter(
    "cachefs_peer_requests", "Chunk requests sent to peers, by peer and outcome", ["peer", "outcome"]
)
PEER_SECONDS = prom.Histogram(
    "cachefs_peer_request_seconds",
    "Latency of successful peer chunk requests",
    ["peer"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PEER_UP = prom.Gauge("cachefs_peer_up", "1 while a peer is used, 0 while its circuit breaker is open", ["peer"])
RING_NODES = prom.Gauge("cachefs_ring_nodes", "Nodes on the consistent-hash ring")
PEER_SERVED = prom.Counter("cachefs_peer_served", "Chunk requests answered for peers, by outcome", ["outcome"])
PEER_SERVED_BYTES = prom.Counter("cachefs_peer_served_bytes", "Chunk bytes sent to peers")
PEER_PROTOCOL_ERRORS = prom.Counter(
    "cachefs_peer_protocol_errors", "Connections closed for malformed or oversized frames", ["side"]
)
PEER_AUTH_FAILURES = prom.Counter("cachefs_peer_auth_failures", "Peer connections refused by the handshake")
PEER_CONNECTIONS_CLOSED = prom.Counter(
    "cachefs_peer_connections_closed",
    "Peer connections a server closed by a limit or an error of its own (see docs/operations.md)",
    ["reason"],
)
FUSE_ERRORS = prom.Counter("cachefs_fuse_errors", "Errors returned to the kernel", ["op", "errno"])
FUSE_OP_SECONDS = HotHistogram(
    "cachefs_fuse_op_seconds",
    "Time cachefs took to answer a FUSE request, errors included, by operation",
    ["op"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INODES = prom.Gauge("cachefs_inodes", "Inodes the mount holds: those the kernel has looked up, plus open files")
WARMUP_BYTES = prom.Counter(
    "cachefs_warmup_bytes", "Bytes warm-up jobs went through, by outcome (loaded, cached: there already, failed)", ["outcome"]
)
WARMUP_FILES = prom.Counter("cachefs_warmup_files", "Files warm-up jobs finished, by outcome (done, failed)", ["outcome"])
PINNED_BYTES = prom.Gauge("cachefs_pinned_bytes", "Bytes of pinned chunks the SSD tier holds")
PINNED_LEASE_BYTES = prom.Gauge("cachefs_pin_lease_bytes", "Bytes of the files pin leases cover, cached or not")
META_CACHE_ENTRIES = prom.Gauge(
    "cachefs_meta_cache_entries",
    "Metadata cache entries held: one per object's attributes, one per directory listing and per child in it",
)


# Why this process is not ready for work, or None once it is (`set_readiness`).
_not_ready: Callable[[], str | None] = lambda: "starting"


def set_readiness(not_ready: Callable[[], str | None] | None) -> None:
    """What /readyz asks: a callable giving a one-line reason the node is not ready,
    or None when it is. None (the default): "starting"."""
    global _not_ready
    _not_ready = not_ready if not_ready is not None else (lambda: "starting")


def _health(path: bytes) -> tuple[bytes, bytes] | None:
    """(status, body) for the probes: /healthz while the process runs, /readyz once the node is ready."""
    if path == b"/healthz":
        return b"200 OK", b"ok\n"
    if path == b"/readyz":
        try:
            reason = _not_ready()
        except Exception as e:  # noqa: BLE001 - a probe answers; it never takes the server down
            reason = f"readiness check failed: {type(e).__name__}"
        if reason is None:
            return b"200 OK", b"ready\n"
        return b"503 Service Unavailable", reason.replace("\n", " ").encode() + b"\n"
    return None


async def serve(host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve GET /metrics, /healthz and /readyz until cancelled. Started with
    `nursery.start`, so the port is bound on return."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    request += data
                target = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
                path, _, query = target.partition(b"?")
                content_type = b"text/plain; charset=utf-8"
                health = _health(path)
                if health is not None:
                    status, body = health
                elif path in (b"/metrics", b"/"):
                    # ?name[]=NAME&...: those metrics only (as Prometheus's own client serves
                    # them); a poller of one gauge then costs no full scrape, 7 ms of CPU.
                    names = urllib.parse.parse_qs(query.decode("latin-1")).get("name[]")
                    registry = prom.REGISTRY.restricted_registry(names) if names else prom.REGISTRY
                    body, status = prom.generate_latest(registry), b"200 OK"
                    content_type = prom.CONTENT_TYPE_LATEST.encode()
                else:
                    body, status = b"not found\n", b"404 Not Found"
                head = (
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type
                    + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                )
                await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the scraper went away
        except Exception:  # noqa: BLE001 - one bad request must not stop the metrics server
            log.exception("metrics: request failed")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    task_status.started()
    await trio.serve_listeners(handle, listeners)


class SourceUsage:
    """Collects `cachefs_source_cached_bytes{source,tier}` at scrape time from the
    tiers' per-source counters: which node holds how much of each source.

    `sources` is asked at every scrape (name → source URL), so datasets added
    or removed while the node runs show up or go."""

    def __init__(self, tiers: list, sources: Callable[[], dict[str, str]]):
        self.tiers = [t for t in tiers if t is not None]
        self.sources = sources

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from cachefs.objects import source_tag

        family = GaugeMetricFamily(
            "cachefs_source_cached_bytes", "Bytes of each source held by a cache tier", labels=["source", "tier"]
        )
        for name, url in self.sources().items():
            tag = source_tag(url)
            for tier in self.tiers:
                family.add_metric([name, tier.name], tier.by_source.get(tag, 0))
        yield family


_source_usage: SourceUsage | None = None


def register_source_usage(tiers: list, sources: Callable[[], dict[str, str]]) -> None:
    """Serve the per-source usage of `tiers` (one node per process: replaces an earlier one)."""
    global _source_usage
    unregister_source_usage()
    _source_usage = SourceUsage(tiers, sources)
    prom.REGISTRY.register(_source_usage)


def unregister_source_usage() -> None:
    global _source_usage
    if _source_usage is not None:
        prom.REGISTRY.unregister(_source_usage)
        _source_usage = None


# The readers of this process (one per dataset), read at scrape time by ReaderStats.
_readers: weakref.WeakSet = weakref.WeakSet()


def track_reader(reader) -> None:
    """Export `reader`'s per-dataset counters while it lives (called by `Reader.__init__`)."""
    _readers.add(reader)


class ReaderStats:
    """Collects the per-dataset series from the readers' plain-int counters at
    scrape time, so that a read pays a dict update instead of a locked inc:

    - `cachefs_dataset_read_bytes_total{dataset,source}`: bytes returned to
      readers, by where they truly came from (`Reader._origins`).
    - `cachefs_dataset_cache_hits_total{dataset,tier}` and
      `cachefs_dataset_cache_misses_total{dataset,tier}`: chunk reads a tier
      served, and those it did not (served by a tier below it or the backend).
    - `cachefs_fetches_in_flight{dataset,tier}`: chunk fetches waiting on a
      tier below MEM or on the backend (`tier`="backend") right now.
    """

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        read_bytes: dict[tuple[str, str], int] = {}
        hits: dict[tuple[str, str], int] = {}
        misses: dict[tuple[str, str], int] = {}
        in_flight: dict[tuple[str, str], int] = {}
        for reader in list(_readers):
            dataset = reader.dataset
            names = [t.name for t in reader.tiers]
            reads = {source: n for source, (_, n) in reader.reads.items()}
            for source, (n, _) in reader.reads.items():
                read_bytes[dataset, source] = read_bytes.get((dataset, source), 0) + n
            for i, tier in enumerate(names):
                hits[dataset, tier] = hits.get((dataset, tier), 0) + reads[tier]
                below = sum(reads[s] for s in names[i + 1 :]) + reads["backend"]
                misses[dataset, tier] = misses.get((dataset, tier), 0) + below
            for tier, n in reader.in_flight.items():
                in_flight[dataset, tier] = in_flight.get((dataset, tier), 0) + n
        families = [
            (CounterMetricFamily, "cachefs_dataset_read_bytes", "source", read_bytes,
             "Bytes returned to readers of a dataset, by where they came from the first time they were read"),
            (CounterMetricFamily, "cachefs_dataset_cache_hits", "tier", hits, "Chunk reads of a dataset a tier served"),
            (CounterMetricFamily, "cachefs_dataset_cache_misses", "tier", misses,
             "Chunk reads of a dataset a tier did not serve (a tier below it or the backend did)"),
            (GaugeMetricFamily, "cachefs_fetches_in_flight", "tier", in_flight,
             "Chunk fetches waiting on a tier below MEM, or on the backend"),
        ]
        for kind, name, label, values, doc in families:
            family = kind(name, doc, labels=["dataset", label])
            for labels, value in sorted(values.items()):
                family.add_metric(list(labels), value)
            yield family


prom.REGISTRY.register(ReaderStats())
