"""Assemble the layers a mount or a worker is made of, from its config."""

from __future__ import annotations

import gc
import logging
import os
import socket
from typing import Callable

import trio

from cachefs import metrics
from cachefs.backend import Backend, open_store
from cachefs.budget import chunk_budget
from cachefs.cache.disk import DiskTier
from cachefs.cache.mem import MemTier
from cachefs.config import CacheConfig, DatasetConfig
from cachefs.errors import (
    BackendError,
    CacheDirInUse,
    BackendPermissionDenied,
    BackendUnavailable,
    ConfigError,
    ObjectNotFound,
)
from cachefs.objects import ChunkTier
from cachefs.peer.client import PeerClient, PeerTier
from cachefs.peer.membership import Membership
from cachefs.peer.server import PeerServer, PinHolder
from cachefs.reader import Reader

log = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    """Keep what start-up built out of the cyclic collector's way.

    botocore's service models, s3fs and trio leave ~90k long-lived objects
    that every full collection walks again (45 ms each here); reads allocate
    enough to trigger collections, and perf of a cold read showed
    gc_collect_main at 3.5% of the mount's CPU.
    """
    gc.collect()
    gc.freeze()


async def serve_metrics(config: CacheConfig, nursery: trio.Nursery) -> None:
    if config.metrics:
        host, port = config.metrics
        try:
            await nursery.start(metrics.serve, host, port)
        except OSError as e:
            raise ConfigError(f"--metrics {host}:{port}: cannot listen ({e.strerror})") from None


async def open_tiers(config: CacheConfig) -> tuple[MemTier, DiskTier | None]:
    """The local tiers; the SSD tier's directory is this process's until it exits.

    Raises:
        ConfigError: the cache directory is in use by another process, or unusable.
    """
    budget = chunk_budget(config.mem_size, config.chunk_size, config.read_ahead, config.backend_concurrency)
    mem = MemTier(config.mem_size, budget)
    disk = None
    if config.cache_size:
        # Only a worker drops the page cache of what it served (DiskTier: mounts re-read their hot chunks).
        drop_pages = getattr(config, "drop_page_cache", False)
        disk = DiskTier(
            config.cache_dir, config.cache_size, config.free_space_ratio, admission=config.admission,
            drop_pages=drop_pages, budget=budget,
        )
        try:
            await disk.load()
        except CacheDirInUse as e:
            raise ConfigError(f"{config.label('cache_dir')} {e}; give each mount and worker its own") from None
        except OSError as e:
            raise ConfigError(f"{config.label('cache_dir')} {config.cache_dir}: unusable ({e})") from None
    return mem, disk


def reader_tiers(mem: MemTier, disk: DiskTier | None, peers: PeerTier | None = None) -> list[ChunkTier]:
    """The tiers a reader walks, fastest first: those that are on."""
    return [t for t in (mem if mem.capacity else None, disk, peers) if t is not None]


async def open_backend(dataset: DatasetConfig, config: CacheConfig) -> Backend:
    """The backend of one dataset, checked to be readable.

    Raises:
        ConfigError: naming what is wrong with the source: a clear error beats an empty mount.
    """
    url = dataset.source
    c = dataset.credentials
    store = open_store(url, dataset.endpoint_url, config.backend_timeout, c.key_pair(), profile=c.profile,
                       unsigned_payload=getattr(config, "unsigned_payload", False))
    backend = Backend(
        store, config.backend_concurrency, config.backend_timeout, config.backend_retries,
        upload_concurrency=getattr(config, "upload_concurrency", 4),
    )
    try:
        info = await backend.stat("")
    except ObjectNotFound:
        if not dataset.read_only and dataset.is_s3 and await _bucket_exists(store):
            return backend  # a new output prefix: empty until the first write makes it
        backend.close()
        raise ConfigError(f"{url}: no such bucket, prefix or directory") from None
    except BackendError as e:
        backend.close()
        if isinstance(e, ObjectNotFound):
            raise ConfigError(f"{url}: no such bucket, prefix or directory") from None
        if isinstance(e, BackendPermissionDenied):
            raise ConfigError(f"{url}: access denied; check the credentials ({e})") from None
        if isinstance(e, BackendUnavailable):
            raise ConfigError(f"{url}: cannot reach the backend ({e})") from None
        raise ConfigError(f"{url}: cannot read the source ({e})") from None
    if info.kind != "dir":
        backend.close()
        raise ConfigError(f"{url}: is a file, not a directory or prefix")
    return backend


async def _bucket_exists(store) -> bool:
    try:
        return await trio.to_thread.run_sync(store.bucket_exists)
    except Exception:  # noqa: BLE001 - unreadable counts as missing: the caller names the URL
        return False


def open_peer_tier(config: CacheConfig, node: str, nursery: trio.Nursery) -> PeerTier | None:
    """The peer tier for `--peers`, its ring kept up to date in `nursery`; None without peers."""
    if not config.peers:
        return None
    assert config.peer_secret is not None  # checked with the config
    membership = Membership(config.peers)
    nursery.start_soon(membership.run)
    client = PeerClient(node, config.peer_secret, nursery, max_payload=config.chunk_size)
    return PeerTier(client, lambda: membership.ring, config.peer_timeout)


async def serve_peers(
    config: CacheConfig, node: str, address: tuple[str, int], readers: dict[str, Reader], nursery: trio.Nursery,
    pins: PinHolder | None = None, capacity: Callable[[], int] | None = None,
) -> PeerServer:
    """Serve the chunks of `readers` (source URL → reader) to authenticated peers at `address`,
    keep the pins they ask for in `pins`, and tell them `capacity()`, what the cache a
    warm-up fills holds.

    Returns:
        The server, listening (`drain` it to stop).
    """
    assert config.peer_secret is not None
    server = PeerServer(
        node, config.peer_secret, readers, max_payload=config.chunk_size, pins=pins, capacity=capacity
    )
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise ConfigError(f"{host}:{port}: cannot listen for peers ({e.strerror})") from None
    await nursery.start(server.serve, listeners)
    log.info("serving %s to peers on %s:%d as %s", ", ".join(readers), host, port, node)
    return server


def client_node_name() -> str:
    """How a mount that does not serve names itself to peers (logs only)."""
    return f"mount:{socket.gethostname()}:{os.getpid()}"
