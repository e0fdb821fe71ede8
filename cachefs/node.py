"""A node: everything one mount or worker process runs, owned by one object.

`Node` owns the shared tiers (one MEM budget and one SSD cap for all datasets),
the peer tier and the peer server, the metrics endpoint, the control socket,
and one backend + namespace + reader per dataset. It is entered as an async
context manager and torn down as a unit (an AsyncExitStack, like S3QL's
mount.py): on exit every dataset's tasks are cancelled and its store closed,
the servers stop, and the SSD tier gives back its descriptors and its lock.

Datasets come and go while the node runs (`add_dataset`, `remove_dataset`):
each runs its background tasks (read-ahead, SSD write-behind) in a nursery of
its own, so removing one cancels only its work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Callable

import trio

from cachefs import control, hotpath, metrics
from cachefs.backend import Backend
from cachefs.config import CacheConfig, Credentials, DatasetConfig, MountOptions
from cachefs.errors import ConfigError
from cachefs.namespace import Namespace
from cachefs.reader import Reader
from cachefs.stack import open_backend, open_peer_tier, open_tiers, reader_tiers, serve_metrics, serve_peers

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Dataset:
    """One dataset a node serves."""

    config: DatasetConfig
    backend: Backend
    reader: Reader
    namespace: Namespace | None  # workers keep no metadata
    tasks: trio.Nursery  # read-ahead and write-behind of this dataset only
    open_files: int = 0
    removed: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def source(self) -> str:
        """The source URL in every chunk key of this dataset."""
        return self.backend.source

    def describe(self) -> dict:
        c = self.config
        return {
            "name": c.name,
            "url": c.url,
            "subdir": c.subdir,
            "source": self.source,
            "read_only": c.read_only,
            "quota": c.quota,
            "endpoint_url": c.endpoint_url,
            "credentials": c.credentials.source,
            "open_files": self.open_files,
        }


class Node:
    """What a mount or a worker runs. Enter it with `async with`.

    Args:
        config: the tiers, backend limits, peers and metrics (a NodeConfig for a
            mount, a WorkerConfig for a worker).
        datasets: served from the start; more with `add_dataset`.
        name: how this node names itself to peers.
        serve: also serve this node's chunks to peers at this address.
        control_socket: the path of the control socket; None: no control socket.
    """

    def __init__(
        self,
        config: CacheConfig,
        datasets: list[DatasetConfig],
        *,
        name: str,
        serve: tuple[str, int] | None = None,
        control_socket: str | None = None,
    ):
        self.config = config
        self.name = name
        self.serve = serve
        self.control_socket = control_socket
        self.mount = isinstance(config, MountOptions)
        self.datasets: dict[str, Dataset] = {}
        # source URL -> reader, shared live with the peer server: a dataset added later is served too.
        self.readers: dict[str, Reader] = {}
        self.started = time.time()
        self.on_removed: Callable[[Dataset], None] = lambda dataset: None
        self._initial = list(datasets)
        self._stack = contextlib.AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._changing = trio.Lock()  # one add or remove at a time

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self._stack.__aenter__()
        try:
            await self._start()
        except BaseException:
            if not await self._stack.__aexit__(*sys.exc_info()):
                raise
        return self

    async def __aexit__(self, *exc_info) -> bool:
        return await self._stack.__aexit__(*exc_info)

    async def _start(self) -> None:
        config = self.config
        nursery = self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        # Exit callbacks run last-in first-out: this one, registered right after the
        # nursery, runs just before it closes, once everything else has let go.
        self._stack.callback(nursery.cancel_scope.cancel)
        await serve_metrics(config, nursery)
        self.mem, self.disk = await open_tiers(config)
        if self.disk is not None:
            self._stack.callback(self.disk.close)
        self.peers = open_peer_tier(config, self.name, nursery)
        self._stack.push_async_callback(self._remove_all)
        for dataset in self._initial:
            await self.add_dataset(dataset)
        metrics.register_source_usage(
            [self.mem, self.disk], lambda: {d.name or d.source: d.source for d in self.datasets.values()}
        )
        self._stack.callback(metrics.unregister_source_usage)
        if self.serve:
            await serve_peers(config, self.name, self.serve, self.readers, nursery)
        if self.control_socket is not None:
            await nursery.start(control.serve_control, self, self.control_socket)

    async def _remove_all(self) -> None:
        with trio.CancelScope(shield=True):
            for name in list(self.datasets):
                await self._remove(self.datasets[name])

    # -- datasets -----------------------------------------------------------------

    async def add_dataset(self, config: DatasetConfig) -> Dataset:
        """Open `config`'s backend and start serving it.

        Raises:
            ConfigError: one line: the name is taken, its source is served already, or
                the source cannot be opened (nothing is left behind then).
        """
        assert self._nursery is not None, "enter the node first"
        async with self._changing:
            config = self._with_node_defaults(config)
            config.check()
            if config.name in self.datasets:
                raise ConfigError(f"dataset {config.name!r} exists already")
            backend = await open_backend(config, self.config)
            try:
                if backend.source in self.readers:
                    other = next(d.name for d in self.datasets.values() if d.source == backend.source)
                    raise ConfigError(f"dataset {config.name!r}: {backend.source} is served already, as {other!r}")
                tasks = await self._nursery.start(_run_tasks)
            except BaseException:
                backend.close()
                raise
            tiers = reader_tiers(self.mem, self.disk, self.peers)
            # Workers do not read ahead: mounts do, and their requests fan out over the ring.
            read_ahead = self.config.read_ahead if self.mount else 0
            reader = Reader(
                tiers, backend, self.config.chunk_size, read_ahead, tasks, dataset=config.name or backend.source
            )
            namespace = None
            if isinstance(self.config, MountOptions):
                c = self.config
                namespace = Namespace(backend, c.attr_ttl, c.dir_ttl, max_entries=c.meta_cache_entries)
            dataset = Dataset(config, backend, reader, namespace, tasks)
            if self.disk is not None and config.quota is not None:
                self.disk.set_quota(dataset.source, config.quota)
            self.datasets[config.name] = dataset
            self.readers[dataset.source] = reader
            log.info("dataset %s = %s%s", config.name or "/", dataset.source, "" if config.read_only else " (rw)")
            return dataset

    def _with_node_defaults(self, config: DatasetConfig) -> DatasetConfig:
        """An S3 dataset that names no endpoint or keys of its own uses the node's."""
        if not config.is_s3:
            return config
        if config.endpoint_url is None and self.config.endpoint_url:
            config = dataclasses.replace(config, endpoint_url=self.config.endpoint_url)
        if config.credentials.source == "environment" and self.config.access_key and self.config.secret_key:
            keys = Credentials(access_key=self.config.access_key, secret_key=self.config.secret_key)
            config = dataclasses.replace(config, credentials=keys)
        return config

    async def remove_dataset(self, name: str, force: bool = False) -> None:
        """Stop serving dataset `name`: its tasks are cancelled and its store closed.

        Raises:
            ConfigError: no such dataset, or files of it are open and not `force`.
        """
        async with self._changing:
            dataset = self.datasets.get(name)
            if dataset is None:
                raise ConfigError(f"no dataset {name!r} (have: {', '.join(self.datasets) or 'none'})")
            if dataset.open_files and not force:
                raise ConfigError(
                    f"dataset {name!r}: {dataset.open_files} file(s) open; close them first, or remove with --force"
                )
            await self._remove(dataset)

    async def _remove(self, dataset: Dataset) -> None:
        del self.datasets[dataset.name]
        del self.readers[dataset.source]
        dataset.removed = True
        dataset.tasks.cancel_scope.cancel()
        dataset.backend.close()
        if self.disk is not None:
            self.disk.set_quota(dataset.source, None)
        self.on_removed(dataset)
        log.info("dataset %s removed", dataset.name or "/")

    def list_datasets(self) -> list[dict]:
        return [d.describe() for d in self.datasets.values()]

    def status(self) -> dict:
        """What this node holds and serves, JSON-able (`cachefs status`)."""
        from cachefs import __version__

        tiers = []
        for tier in (self.mem, self.disk):
            if tier is not None:
                used, chunks = tier.usage()
                tiers.append({"name": tier.name, "used_bytes": used, "capacity_bytes": tier.capacity, "chunks": chunks})
        return {
            "node": self.name,
            "version": __version__,
            "hot_path": hotpath.IMPLEMENTATION,
            "pid": os.getpid(),
            "started": self.started,
            "serving_peers": f"{self.serve[0]}:{self.serve[1]}" if self.serve else None,
            "tiers": tiers,
            "datasets": self.list_datasets(),
            "peers": self.peers.describe() if self.peers is not None else [],
        }


async def _run_tasks(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A nursery for one dataset's background tasks, open until cancelled."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
