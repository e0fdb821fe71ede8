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

import collections
import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from typing import Awaitable, Callable

import trio

from cachefs import control, heap, hotpath, metrics
from cachefs.backend import Answered, Backend
from cachefs.config import CacheConfig, Credentials, DatasetConfig, MountOptions, format_size
from cachefs.errors import BackendError, ConfigError, ObjectNotFound, PeerError
from cachefs.logsafe import loggable
from cachefs.namespace import Namespace
from cachefs.objects import ObjectId, ObjectInfo, chunk_digest, source_tag
from cachefs.peer import protocol
from cachefs.peer.protocol import PinChunks, Pinned
from cachefs.pins import Lease, PinRegistry
from cachefs.reader import Reader
from cachefs.stack import open_backend, open_peer_tier, open_tiers, reader_tiers, serve_metrics, serve_peers
from cachefs.staging import JournalEntry, Staging
from cachefs.upload import Uploader
from cachefs.walk import DirectoryWalks
from cachefs.warmup import Warmups
from cachefs.writes import Writes

log = logging.getLogger(__name__)

# The longest lease owner (a job id): it travels to the ring's owners with each pin.
MAX_OWNER = 256


@dataclasses.dataclass(eq=False)
class Dataset:
    """One dataset a node serves."""

    config: DatasetConfig
    backend: Backend
    reader: Reader
    namespace: Namespace | None  # workers keep no metadata
    tasks: trio.Nursery  # read-ahead and write-behind of this dataset only
    walks: DirectoryWalks | None = None  # with the namespace: files loaded ahead of a walk
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
            "pin_quota": c.pin_quota,
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
        # Told which entries of a dataset changed or disappeared in the backend (fuse_ops
        # drops the kernel's caches of them).
        self.on_changed: Callable[[Dataset, list[tuple[ObjectInfo, ObjectInfo | None]]], Awaitable[None]] = _nothing
        self._initial = list(datasets)
        self._stack = contextlib.AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._changing = trio.Lock()  # one add or remove at a time
        self._pinning = trio.Lock()  # one pin at a time: its quota checks hold until it is made
        self.peer_server = None  # with `serve`: the PeerServer, once listening
        self.ready = False  # set by the mount once the kernel answers, by the worker once it listens
        self.draining = False

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
        if heap.tuned():  # a daemon, not a test
            nursery.start_soon(heap.give_back_freed)
        await serve_metrics(config, nursery)
        metrics.set_readiness(self.not_ready)
        # Torn down (datasets closing, servers stopping): not ready, until the metrics server goes.
        self._stack.callback(metrics.set_readiness, lambda: "draining" if self.draining else "stopping")
        self.mem, self.disk = await open_tiers(config)
        if self.disk is not None:
            self._stack.callback(self.disk.close)
        self.peers = open_peer_tier(config, self.name, nursery)
        self.pins = PinRegistry(os.path.join(config.cache_dir, "pins.json") if self.disk is not None else None)
        if self.disk is not None:
            for lease in self.pins.load():
                self.disk.pin(lease.digests)
            if self.pins.leases:
                log.info("%d pin leases kept from before the restart", len(self.pins.leases))
        self._pins_changed = trio.Event()
        nursery.start_soon(self._expire_pins)
        if self.disk is not None:
            metrics.PINNED_BYTES.set_function(lambda: self.disk.pinned_bytes)
        metrics.PINNED_LEASE_BYTES.set_function(self.pins.pinned)
        self.warmups = Warmups(self, nursery)  # `cachefs warmup` jobs; they end with the node
        # Written files (rw datasets): opened with the first rw dataset, or at once if
        # uploads journaled before a restart are waiting.
        self.staging: Staging | None = None
        self.uploader: Uploader | None = None
        self.writes: Writes | None = None
        self._journal: list[JournalEntry] = []
        if self.mount and (
            any(not d.read_only for d in self._initial) or os.path.isdir(os.path.join(config.cache_dir, "journal"))
        ):
            await self._open_staging()
        self._stack.push_async_callback(self._remove_all)
        for dataset in self._initial:
            await self.add_dataset(dataset)
        for entry in self._journal:
            log.warning("upload of %s to %s waits in the journal for a dataset of that source", entry.path, entry.source)
        metrics.register_source_usage(
            [self.mem, self.disk], lambda: {d.name or d.source: d.source for d in self.datasets.values()}
        )
        self._stack.callback(metrics.unregister_source_usage)
        # The control socket first: a node whose peer port answers can be asked how it
        # is (a worker restarted under its clients was once asked before it could answer).
        if self.control_socket is not None:
            await nursery.start(control.serve_control, self, self.control_socket)
        if self.serve:
            self.peer_server = await serve_peers(
                config, self.name, self.serve, self.readers, nursery, pins=self, capacity=self.warm_capacity
            )
            if self.draining:  # asked to drain before it listened: it never takes a request
                await self.peer_server.drain(0)

    async def _open_staging(self) -> None:
        config = self.config
        try:
            staging = Staging(config.cache_dir, config.stage_limit, self.disk)
            self._journal = await trio.to_thread.run_sync(staging.open)
        except OSError as e:
            raise ConfigError(f"{config.label('cache_dir')} {config.cache_dir}: cannot hold staged writes ({e})") from None
        staging.count_kept(self._journal)
        self.staging = staging
        self._nursery.start_soon(staging.commit_forever)
        self._nursery.start_soon(staging.housekeep_forever)
        self._nursery.start_soon(staging.write_out_forever)
        self._stack.callback(staging.sync_all)  # runs after the uploads stopped: what is left resumes
        self.uploader = Uploader(staging, self._nursery, config.part_size, self._uploaded)
        self.uploader.on_abandoned = self._abandoned
        self.writes = Writes(staging, self.uploader, writeback=bool(getattr(config, "writeback", False)))
        if self._journal:
            log.info("%d uploads journaled before the restart resume", len(self._journal))
        self._stack.callback(self._report_unfinished)

    def _abandoned(self, entry: JournalEntry) -> None:
        """An upload given up with its removed dataset: resumed at once if a dataset of its
        source is served again (added back while the upload still failed), unless a newer
        upload of its path is pending, which drops it (`Uploader._supersede`)."""
        dataset = next((d for d in self.datasets.values() if d.source == entry.source), None)
        if dataset is None or self.uploader.pending.get((entry.source, entry.path)):
            return
        self.uploader.abandoned.remove(entry)
        self.uploader.resume(dataset, entry)

    def _report_unfinished(self) -> None:
        left = [u for u in self.uploader.all_pending() if u.entry is not None]
        if left:
            log.warning("%d uploads not finished (%d bytes); they resume at the next start with --cache-dir %s",
                        len(left), sum(u.size for u in left), self.config.cache_dir)

    async def _uploaded(self, dataset: Dataset, path: str, info: ObjectInfo) -> None:
        if dataset.namespace is not None and not dataset.removed:
            dataset.namespace.put_entry(info)

    def not_ready(self) -> str | None:
        """Why /readyz says 503 (one line), or None: ready for work."""
        if self.draining:
            return "draining"
        if not self.ready:
            return "starting"
        return None

    async def drain(self, timeout: float) -> tuple[int, bool]:
        """Leave the ring gracefully: /readyz says "draining", the peer server stops
        accepting connections and requests (answering "busy"), and the requests in
        flight finish, within `timeout` seconds. Checkpoints.

        Returns:
            (the requests that were in flight, whether all finished in time).
        """
        self.draining = True
        if self.peer_server is None:
            return 0, True
        return await self.peer_server.drain(timeout)

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
            if not config.read_only:
                if not self.mount:
                    raise ConfigError(f"dataset {config.name!r}: a worker serves datasets read-only")
                if self.staging is None:
                    await self._open_staging()
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
                tiers, backend, self.config.chunk_size, read_ahead, tasks, dataset=config.name or backend.source,
                budget=self.mem.budget,
            )
            namespace = None
            if isinstance(self.config, MountOptions):
                c = self.config
                namespace = Namespace(backend, c.attr_ttl, c.dir_ttl, max_entries=c.meta_cache_entries, nursery=tasks)
            walks = None if namespace is None else DirectoryWalks(backend.source, namespace, reader)
            dataset = Dataset(config, backend, reader, namespace, tasks, walks)
            if self.disk is not None and config.quota is not None:
                self.disk.set_quota(dataset.source, config.quota)
            self.datasets[config.name] = dataset
            self.readers[dataset.source] = reader
            refresh_every = getattr(self.config, "meta_refresh", 0)
            if namespace is not None and refresh_every:
                tasks.start_soon(self._refresh_every, dataset, refresh_every)
            log.info("dataset %s = %s%s", config.name or "/", dataset.source, "" if config.read_only else " (rw)")
            # In seq order: the uploads of a path land in the order they were journaled.
            left = [e for e in self._journal if e.source == dataset.source]
            if self.uploader is not None:
                left += [e for e in self.uploader.abandoned if e.source == dataset.source]
            for entry in sorted(left, key=lambda e: e.seq):
                if entry in self._journal:
                    self._journal.remove(entry)
                else:
                    self.uploader.abandoned.remove(entry)
                self.uploader.resume(dataset, entry)
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
        dataset.reader.close()
        dataset.backend.close()
        if self.disk is not None:
            self.disk.set_quota(dataset.source, None)
        self.on_removed(dataset)
        log.info("dataset %s removed", dataset.name or "/")

    def unhook(self) -> None:
        """Forget `on_removed` and `on_changed` (the mount they told is gone)."""
        self.on_removed = lambda dataset: None
        self.on_changed = _nothing

    def locate(self, path: str) -> tuple[Dataset, str] | None:
        """The dataset a mount path lies in and the path inside it; None for the
        root of a node with named datasets, or a name that is no dataset."""
        root = self.datasets.get("")
        if root is not None:
            return root, path
        name, _, inner = path.partition("/")
        dataset = self.datasets.get(name) if name else None
        return (dataset, inner) if dataset is not None else None

    async def refresh(self, path: str, recursive: bool = False) -> dict:
        """Ask the backend again now for what is known of `path` (and below it, with
        `recursive`); changed and deleted entries leave every cache: ours, the
        kernel's, and the chunks of their old versions.

        Raises:
            ConfigError: `path` is in no dataset.
            BackendError: the backend could not be asked.
        """
        located = self.locate(path)
        if located is None:
            if path == "":  # the root of a multi-dataset mount: all of them
                found = [await self._refresh(d, "", recursive) for d in list(self.datasets.values())]
                return {"changed": sum(f["changed"] for f in found), "gone": sum(f["gone"] for f in found)}
            raise ConfigError(f"{path!r} is in no dataset of this node")
        return await self._refresh(*located, recursive)

    async def _refresh(self, dataset: Dataset, inner: str, recursive: bool) -> dict:
        if dataset.namespace is None:
            raise ConfigError("a worker keeps no metadata to refresh")
        changed = await dataset.namespace.refresh(inner, recursive)
        for old, _ in changed:
            if old.kind == "file":
                await self.drop_chunks(dataset, old)
        if changed:
            log.info("dataset %s: %d entries changed in the backend", dataset.name or "/", len(changed))
            await self.on_changed(dataset, changed)
        return {"changed": sum(new is not None for _, new in changed), "gone": sum(new is None for _, new in changed)}

    def _digests(self, dataset: Dataset, info: ObjectInfo) -> list[bytes]:
        """The keys of the chunks of file `info` (of its version), in order."""
        obj = ObjectId(dataset.source, info.path, info.version, info.size)
        size = self.config.chunk_size
        return [chunk_digest(obj, size, index) for index in range((info.size + size - 1) // size)]

    async def drop_chunks(self, dataset: Dataset, old: ObjectInfo) -> None:
        """Chunks of a version no one will ask for again (changed, deleted or replaced in the
        backend) go now, not after the LRU reaches them."""
        await self._drop_digests(self._digests(dataset, old))

    async def _drop_digests(self, digests: list[bytes]) -> None:
        for digest in digests:
            self.mem.remove(digest)
        if self.disk is not None:
            await self.disk.remove_all(digests)

    async def chunks_renamed(
        self, dataset: Dataset, old: ObjectInfo, new_path: str, answered: Answered | None = None
    ) -> None:
        """The file `old` was renamed to `new_path` in the backend: its chunks held here are
        kept as the chunks of the object now at `new_path`, with no copy (`mv tmp final`
        after a write reads `final` from the cache, as it read `tmp`). A new object of
        other bytes, or one that cannot be asked for now, drops them instead. `answered`:
        what the rename's answer said of the object it made (an S3 copy), to tell it from
        another writer's landed at `new_path` before the stat that names its version."""
        held = self._digests(dataset, old)
        if not any(d in self.mem or (self.disk is not None and d in self.disk) for d in held):
            return  # nothing to keep: no need to ask for the new version
        if dataset.backend.renames_keep_version:
            new = dataclasses.replace(old, path=new_path)  # no stat: it could see another writer's
        else:
            try:
                new = await dataset.namespace.stat(new_path)
            except (BackendError, ObjectNotFound) as e:
                log.info("dropping the cached chunks of %s, renamed to %s: %s", old.path, new_path, e)
                new = None
            if new is not None and answered is not None and not answered.could_be(new, old.size):
                log.info("dropping the cached chunks of %s: %s was written over right after the rename",
                         old.path, new_path)
                new = None
        if new is None or new.kind != "file" or new.size != old.size:
            await self._drop_digests(held)
            return
        pairs = list(zip(held, self._digests(dataset, new)))
        self.mem.rename(pairs)
        if self.disk is not None:
            await self.disk.rename(pairs)

    async def _refresh_every(self, dataset: Dataset, seconds: float) -> None:
        """--meta-refresh: revalidate the dataset's cached metadata in the background."""
        while True:
            await trio.sleep(seconds)
            try:
                await self._refresh(dataset, "", recursive=True)
            except BackendError as e:
                log.warning("dataset %s: background refresh failed: %s", dataset.name or "/", e)

    # -- pins -----------------------------------------------------------------------

    async def pin(self, paths: list[str], ttl: float, owner: str) -> dict:
        """Keep the chunks of `paths` (files, or all files below directories) on the SSD
        tier until the lease ends, `ttl` seconds from now, or they are unpinned.

        With peers, each chunk is pinned at its owner on the ring (see
        `_pin_at_owners`), all or nothing; only the chunks this node owns are
        pinned here.

        Raises:
            ConfigError: no SSD tier where a chunk must be pinned, a path in no
                dataset, a pin quota (ours, a dataset's or an owner's) would be
                exceeded, or an owner could not be asked. Nothing is pinned then.
        """
        if not 0 < ttl < 10 * 365 * 86400:
            raise ConfigError(f"a lease of {ttl:g} s: give a positive duration")
        if not 0 < len(owner) <= MAX_OWNER:
            raise ConfigError(f"a lease owner is 1..{MAX_OWNER} characters, not {len(owner)}")
        if self.disk is None and self.peers is None:
            raise ConfigError("pins keep chunks on the SSD tier, and this node has none (--cache-size 0)")
        chunks: list[tuple[bytes, int]] = []  # (digest, length)
        per_dataset: dict[str, int] = {}
        size = self.config.chunk_size
        for path in paths:
            dataset, inner = self._dataset_of(path)
            for f in await self._files(dataset, inner):
                obj = ObjectId(dataset.source, f.path, f.version, f.size)
                chunks += [(chunk_digest(obj, size, i), min(size, f.size - i * size))
                           for i in range((f.size + size - 1) // size)]
                per_dataset[dataset.name] = per_dataset.get(dataset.name, 0) + f.size
        here, at_owners = self._by_owner(chunks)
        if here and self.disk is None:
            raise ConfigError("pins keep chunks on the SSD tier, and this node has none (--cache-size 0)")
        async with self._pinning:
            wanted_here = sum(length for _, length in here)
            checks = []
            if wanted_here:
                checks.append(("the", wanted_here, self.pins.pinned(), self.config.pin_limit, "--pin-quota"))
            for name, wanted in per_dataset.items():
                limit = self.datasets[name].config.pin_quota
                if limit is not None:
                    checks.append((f"dataset {name}'s", wanted, self.pins.pinned_of(name), limit, "its pin_quota"))
            for whose, wanted, pinned, limit, knob in checks:
                if pinned + wanted > limit:
                    raise ConfigError(
                        f"pinning {format_size(wanted)} more would pin {format_size(pinned + wanted)}, over {whose} "
                        f"pin quota of {format_size(limit)} ({format_size(pinned)} pinned now); unpin something or raise {knob}"
                    )
            lease_id = self.pins.new_id()
            if at_owners:
                await self._pin_at_owners(lease_id, owner, paths, ttl, at_owners)
            digests = [digest for digest, _ in here]
            peers = {node: sum(length for _, length in held) for node, held in at_owners.items()}
            lease = self.pins.new(owner, paths, ttl, digests, per_dataset, lease_id=lease_id, peers=peers)
            if digests:
                self.disk.pin(digests)
            await self._pins_saved()
        log.info("pinned %s for %s (lease %s, %gs%s)", ", ".join(paths), owner, lease.id, ttl,
                 f"; at {len(peers)} owners" if peers else "")
        return lease.describe(self.pins.clock())

    def _by_owner(self, chunks: list[tuple[bytes, int]]) -> tuple[list[tuple[bytes, int]], dict[str, list[tuple[bytes, int]]]]:
        """The chunks to pin here (without peers, or those we own on the ring), and those of each other owner."""
        ring = self.peers.ring() if self.peers is not None else None
        if ring is None or not ring.nodes:
            return chunks, {}
        here: list[tuple[bytes, int]] = []
        at_owners: dict[str, list[tuple[bytes, int]]] = {}
        for chunk in chunks:
            owner = ring.owner(chunk[0])
            if owner == self.name:
                here.append(chunk)
            else:
                at_owners.setdefault(owner, []).append(chunk)
        return here, at_owners

    async def _pin_at_owners(
        self, lease_id: str, owner: str, paths: list[str], ttl: float, at_owners: dict[str, list[tuple[bytes, int]]]
    ) -> None:
        """Pin each owner's chunks there under lease `lease_id` (protocol v5), all of
        them or none: if one owner refuses (over its pin quota), is older than v5 or
        does not answer within --peer-timeout, the lease is ended at every owner
        asked, and this raises.

        Raises:
            ConfigError: one line, the first owner's reason (with its numbers for a quota).
        """
        client = self.peers.client
        asked: set[str] = set()
        failures: list[str] = []

        async def pin_at(node: str, held: list[tuple[bytes, int]]) -> None:
            asked.add(node)
            total, sent = sum(length for _, length in held), 0
            for start in range(0, len(held), protocol.MAX_PIN_DIGESTS):
                batch = held[start : start + protocol.MAX_PIN_DIGESTS]
                size = sum(length for _, length in batch)
                with trio.move_on_after(self.config.peer_timeout) as scope:
                    try:
                        answer = await client.pin_chunks(node, lease_id, owner, ttl, [d for d, _ in batch], size, paths)
                    except PeerError as e:
                        why = "it is older than pins at the owners (peer protocol v5)" if e.code == "version" else str(e)
                        failures.append(f"cannot pin at owner {node}: {why}")
                        return
                if scope.cancelled_caught:
                    failures.append(f"cannot pin at owner {node}: no answer within {self.config.peer_timeout:g} s")
                    return
                if answer.refused:
                    before = answer.pinned - sent  # what others pin there, without this lease's earlier batches
                    failures.append(
                        f"pinning {format_size(total)} more at owner {node} would pin {format_size(before + total)}, "
                        f"over its pin quota of {format_size(answer.quota)} ({format_size(before)} pinned now); "
                        f"unpin something or raise that node's --pin-quota"
                    )
                    return
                sent += size

        try:
            async with trio.open_nursery() as nursery:
                for node, held in sorted(at_owners.items()):
                    nursery.start_soon(pin_at, node, held)
        except BaseException:  # cancelled (the caller left): leave no lease behind either
            await self._unpin_at_owners({node: [lease_id] for node in asked})
            raise
        if failures:
            await self._unpin_at_owners({node: [lease_id] for node in asked})
            raise ConfigError(failures[0] + (f" (and {len(failures) - 1} more owners refused)" if len(failures) > 1 else ""))

    async def _unpin_at_owners(self, by_node: dict[str, list[str]]) -> set[str]:
        """End leases at their owners (protocol v5), each within --peer-timeout.
        Never raises: an owner that cannot be told ends its lease at its TTL.

        Returns:
            The owners that were not told.
        """
        unreached: set[str] = set()

        async def unpin_at(node: str, ids: list[str]) -> None:
            for start in range(0, len(ids), protocol.MAX_UNPIN_LEASES):
                why = f"no answer within {self.config.peer_timeout:g} s"
                with trio.move_on_after(self.config.peer_timeout):
                    try:
                        await self.peers.client.unpin_leases(node, ids[start : start + protocol.MAX_UNPIN_LEASES])
                        continue
                    except PeerError as e:
                        why = str(e)
                log.warning("cannot end leases %s at owner %s (%s); they end at their TTL there", ", ".join(ids), node, why)
                unreached.add(node)
                return

        with trio.CancelScope(shield=True):  # a pin that failed must not leave leases behind
            async with trio.open_nursery() as nursery:
                for node, ids in by_node.items():
                    nursery.start_soon(unpin_at, node, ids)
        return unreached

    async def unpin(self, *, paths: list[str] = (), owner: str | None = None, ids: list[str] = ()) -> list[dict]:
        """End the leases pinning any of `paths`, of `owner`, or with these ids, here
        and at the owners that keep their chunks. An owner that cannot be told is
        listed in the lease's "unreached"; its part ends at the lease's TTL."""
        gone = self.pins.take(ids=list(ids), owner=owner, paths=list(paths))
        self._unpin_here(gone)
        if gone:
            await self._pins_saved()
        unreached = await self._unpin_at_owners(_owners_of(gone)) if self.peers is not None else set()
        now = self.pins.clock()
        described = []
        for lease in gone:
            d = lease.describe(now)
            if unreached & set(lease.peers):
                d["unreached"] = sorted(unreached & set(lease.peers))
            described.append(d)
        return described

    def _unpin_here(self, leases: list[Lease]) -> None:
        for lease in leases:
            if lease.digests:
                self.disk.unpin(lease.digests)

    def list_pins(self) -> list[dict]:
        now = self.pins.clock()
        return [lease.describe(now) for lease in self.pins.leases.values()]

    def warm_capacity(self) -> int:
        """What the cache a warm-up fills here holds: the SSD tier, else MEM (see Reader.warm_run)."""
        return self.disk.capacity if self.disk is not None else self.mem.capacity

    # The peer server's PinHolder: pins of the chunks we own, asked for by peers.

    async def hold_pins(self, req: PinChunks) -> Pinned | str:
        """Keep chunks a peer pins (it found us their owner) under its lease; refused
        (nothing pinned) over our --pin-quota. Saved before the answer goes out."""
        if self.disk is None:
            return f"{self.name} has no SSD tier to pin on"
        digests = req.digest_list()
        async with self._pinning:
            pinned, quota = self.pins.pinned(), self.config.pin_limit
            if pinned + req.bytes > quota:
                log.info("refused a pin of %s for %s from %s: %s pinned of a %s quota", format_size(req.bytes),
                         loggable(req.owner), loggable(req.origin), format_size(pinned), format_size(quota))
                return Pinned(req.id, True, pinned, quota)
            try:
                lease = self.pins.hold(req.lease, req.owner, req.origin, list(req.paths), req.ttl_ms / 1000, digests,
                                       req.bytes)
            except ValueError as e:
                return str(e)
            self.disk.pin(digests)
            await self._pins_saved()
        log.info("pinned %d chunks (%s) for %s from %s (lease %s)", len(digests), format_size(req.bytes),
                 loggable(req.owner), loggable(req.origin), lease.id)
        return Pinned(req.id, False, pinned + req.bytes, quota)

    async def release_pins(self, leases: tuple[str, ...]) -> tuple[int, int]:
        """End leases a peer made here (unpinned or ended there)."""
        gone = self.pins.take(ids=list(leases))
        self._unpin_here(gone)
        if gone:
            await self._pins_saved()
            log.info("leases %s ended by their origin", ", ".join(lease.id for lease in gone))
        return len(gone), sum(lease.bytes for lease in gone)

    async def _pins_saved(self) -> None:
        await trio.to_thread.run_sync(self.pins.save)
        self._pins_changed.set()

    async def _expire_pins(self) -> None:
        """End each lease when its time is up (also those that ran out while the node was
        down), here and, for leases made here, at their owners (who end theirs at the
        same TTL anyway)."""
        while True:
            next_expiry = self.pins.next_expiry()
            wait = math.inf if next_expiry is None else max(0.0, next_expiry - self.pins.clock())
            with trio.move_on_after(wait):
                await self._pins_changed.wait()
            self._pins_changed = trio.Event()
            expired = self.pins.take_expired()
            self._unpin_here(expired)
            for lease in expired:
                log.info("pin lease %s of %s expired", lease.id, lease.owner)
            if expired:
                await trio.to_thread.run_sync(self.pins.save)
                if self.peers is not None and any(lease.peers for lease in expired):
                    self._nursery.start_soon(self._unpin_at_owners, _owners_of(expired))

    def _dataset_of(self, path: str) -> tuple[Dataset, str]:
        located = self.locate(path)
        if located is None or located[0].namespace is None:
            raise ConfigError(f"{path!r} is in no dataset of this node")
        return located

    async def _files(self, dataset: Dataset, inner: str) -> list[ObjectInfo]:
        """The file at `inner`, or every file below the directory `inner`."""
        info = await dataset.namespace.stat(inner)
        if info.kind != "dir":
            return [info] if info.kind == "file" else []
        files, todo = [], [inner]
        while todo:
            for entry in await dataset.namespace.list_dir(todo.pop()):
                if entry.kind == "file":
                    files.append(entry)
                elif entry.kind == "dir":
                    todo.append(entry.path)
        return files

    def list_datasets(self) -> list[dict]:
        """Each dataset's settings, what this node's tiers hold of it, and how its
        reads were served since start: chunk reads by where they came from (each
        tier, "peer", "backend"), the share each served, and chunks evicted per tier."""
        rows = []
        tiers = [t for t in (self.mem, self.disk) if t is not None]
        for dataset in self.datasets.values():
            row = dataset.describe()
            tag = source_tag(dataset.source)
            row["cached_bytes"] = {t.name: t.by_source.get(tag, 0) for t in tiers}
            reads = {source: n for source, (_, n) in dataset.reader.reads.items()}
            row["chunk_reads"] = reads
            total = sum(reads.values())
            row["hit_ratio"] = {source: round(n / total, 4) if total else None for source, n in reads.items()}
            row["evictions"] = {t.name: t.evicted_by_source.get(tag, 0) for t in tiers}
            rows.append(row)
        return rows

    async def residency(self, dataset: Dataset, info: ObjectInfo) -> dict:
        """How much of a file (or of the files right in a directory) is cached where
        this node reads it: in its own tiers or at each chunk's owner on the ring.
        See `_held`."""
        files = [info] if info.kind == "file" else []
        if info.kind == "dir" and dataset.namespace is not None:
            files = [e for e in await dataset.namespace.list_dir(info.path) if e.kind == "file"]
        return await self._held(dataset, files)

    async def subtree_residency(self, path: str) -> dict:
        """`residency` of every file below mount path `path` ("" on a multi-dataset
        mount: every dataset), one walk of the listings.

        Raises:
            ConfigError: `path` is in no dataset.
        """
        if self.locate(path) is None and path == "":
            parts = [await self.subtree_residency(name) for name in self.datasets]
            nodes: collections.Counter[str] = collections.Counter()
            for p in parts:
                nodes.update(p["nodes"])
            return {k: sum(p[k] for p in parts) for k in ("files", "bytes", "cached_bytes", "chunks", "cached_chunks")} | {
                "ratio": _ratio(sum(p["cached_bytes"] for p in parts), sum(p["bytes"] for p in parts)),
                "nodes": dict(nodes),
                "unanswered": sorted({n for p in parts for n in p["unanswered"]}),
            }
        dataset, inner = self._dataset_of(path)
        return await self._held(dataset, await self._files(dataset, inner))

    async def locations(self, dataset: Dataset, info: ObjectInfo) -> dict:
        """Which nodes hold how many of a file's chunks: this node's own tiers, and each
        chunk's owner on the ring (asked with HasChunk, within --peer-timeout).
        A chunk held both here and by its owner counts for both."""
        if info.kind != "file":
            raise ConfigError(f"{info.path or '/'}: locations are per file")
        found = await self._where(dataset, [info])
        return {"chunks": len(found.chunks), "nodes": dict(found.chunk_counts), "unanswered": sorted(found.unanswered)}

    async def _held(self, dataset: Dataset, files: list[ObjectInfo]) -> dict:
        """Of `files`: bytes and chunks, those cached (here, or at the chunk's owner on
        the ring: where a read of it is no backend GET), the ratio of the bytes, and
        how many bytes of them each node holds ("nodes"; the input a scheduler needs
        for cache-aware placement). Owners that did not answer are "unanswered"
        and count as holding nothing."""
        found = await self._where(dataset, files)
        cached = sum(length for (_, length), holders in zip(found.chunks, found.holders) if holders)
        total = sum(f.size for f in files)
        return {
            "files": len(files),
            "bytes": total,
            "cached_bytes": cached,
            "ratio": _ratio(cached, total),
            "chunks": len(found.chunks),
            "cached_chunks": sum(1 for holders in found.holders if holders),
            "nodes": dict(found.byte_counts),
            "unanswered": sorted(found.unanswered),
        }

    async def _where(self, dataset: Dataset, files: list[ObjectInfo]) -> _Whereabouts:
        """Who holds each chunk of `files`: this node's tiers, and the chunk's owner on
        the ring, asked with HasChunk (16 at once, each within --peer-timeout), also
        about chunks held here: each node's count is what it truly holds."""
        size = self.config.chunk_size
        local = [t for t in (self.mem, self.disk) if t is not None and t.capacity]
        found = _Whereabouts()
        asks: list[tuple[int, ObjectId, int, str]] = []  # (chunk number, object, index, owner)
        ring = self.peers.ring() if self.peers is not None else None
        for f in files:
            obj = ObjectId(dataset.source, f.path, f.version, f.size)
            for index in range((f.size + size - 1) // size):
                digest = chunk_digest(obj, size, index)
                found.add((digest, min(size, f.size - index * size)))
                if any(digest in t for t in local):
                    found.held(len(found.chunks) - 1, self.name)
                found.asked(self.name)
                owner = ring.owners(digest, 1)[0] if ring is not None and ring.nodes else self.name
                if owner != self.name:
                    asks.append((len(found.chunks) - 1, obj, index, owner))
        if asks:
            limit = trio.CapacityLimiter(16)

            async def ask(n: int, obj: ObjectId, index: int, owner: str) -> None:
                if not self.peers.client.available(owner):
                    found.unanswered.add(owner)
                    return
                async with limit:
                    with trio.move_on_after(self.config.peer_timeout):
                        try:
                            found.asked(owner)
                            if await self.peers.client.has_chunk(owner, obj, size, index):
                                found.held(n, owner)
                            return
                        except PeerError:
                            pass
                    found.unanswered.add(owner)

            async with trio.open_nursery() as nursery:
                for n, obj, index, owner in asks:
                    nursery.start_soon(ask, n, obj, index, owner)
        return found

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
            "pins": self.list_pins(),
            "pinned_bytes": self.pins.pinned(),
            "pin_quota": self.config.pin_limit if self.disk is not None else 0,
            "writes": self._writes_status(),
        }

    def _writes_status(self) -> dict | None:
        if self.staging is None:
            return None
        pending = self.uploader.all_pending()
        return {
            "writeback": self.writes.writeback,
            "staged_bytes": self.staging.used,
            "stage_limit": self.staging.limit,
            "open_for_write": len(self.writes.files),
            "pending_uploads": len(pending),
            "pending_bytes": sum(u.size for u in pending),
        }


class _Whereabouts:
    """Chunks of some files, and which nodes hold each (see Node._where)."""

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, int]] = []  # (digest, length)
        self.holders: list[list[str]] = []
        self.chunk_counts: dict[str, int] = {}  # node -> chunks it holds
        self.byte_counts: dict[str, int] = {}  # node -> bytes of the chunks it holds
        self.unanswered: set[str] = set()

    def add(self, chunk: tuple[bytes, int]) -> None:
        self.chunks.append(chunk)
        self.holders.append([])

    def asked(self, node: str) -> None:
        """`node` answered (or is this one): it is listed, with 0 if it holds none."""
        self.chunk_counts.setdefault(node, 0)
        self.byte_counts.setdefault(node, 0)

    def held(self, n: int, node: str) -> None:
        self.holders[n].append(node)
        self.chunk_counts[node] = self.chunk_counts.get(node, 0) + 1
        self.byte_counts[node] = self.byte_counts.get(node, 0) + self.chunks[n][1]


def _owners_of(leases: list[Lease]) -> dict[str, list[str]]:
    """node -> the ids of `leases` it keeps chunks of."""
    by_node: dict[str, list[str]] = {}
    for lease in leases:
        for node in lease.peers:
            by_node.setdefault(node, []).append(lease.id)
    return by_node


def _ratio(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 1.0


async def _nothing(*args) -> None:
    pass


async def _run_tasks(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A nursery for one dataset's background tasks, open until cancelled."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
