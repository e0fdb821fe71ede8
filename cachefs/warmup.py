"""Warm-up: load files of a node's datasets into the cache that will serve them.

`cachefs warmup PATH...` asks the mount's node, through its control socket, to
start a job (`Warmups.start`), then polls its counters (`Warmups.progress`); the
bytes never pass through FUSE. A job:

1. resolves each PATH (relative to the mount root) to a dataset and a path in it
   (at once: a bad PATH is an error of the `warmup.start` request);
2. lists the files with the dataset's Namespace (a directory's own files, or
   its whole tree with `recursive`), so the total bytes are known before any
   chunk is loaded and progress is exact in bytes, whatever the file sizes;
3. without peers, refuses a set larger than the cache ("cannot fit") instead of
   loading chunks that would evict each other; with peers the ring's total
   capacity is not known here, so nothing is checked;
4. loads every chunk, `concurrency` loads at a time, into the cache that will
   serve it; a load is a run of consecutive chunks of a file with the same owner,
   RUN_CHUNKS and RUN_BYTES at most, fetched with one backend request. With peers, the chunks'
   owner on the ring loads them into its own tiers (peer protocol v2 LoadChunk,
   v3 for a run; the chunks are not sent back); without peers, or
   when the owner is us, down or cannot load, the reader loads them into our
   own tiers. Either way a loaded chunk goes to the SSD tier only
   (`Reader.warm_run`): warmed data must not push hot chunks out of MEM. A chunk
   already held there is skipped and counted as cached, so a second warm-up
   makes no backend request, and a warm-up cancelled half way resumes where it
   stopped when run again.

Jobs live in the node, independent of the connection that started them: the CLI
may leave (`--wait-ratio`) while the job goes on. The last JOBS_KEPT finished
jobs stay queryable. A job never raises into the node: whatever goes wrong is
counted as a failed file or ends the job in state "failed" with a reason.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from cachefs import metrics
from cachefs.cache.disk import file_header_size
from cachefs.errors import BackendError, ConfigError, ObjectChanged, ObjectNotFound, PeerError
from cachefs.objects import ObjectId, check_relative_path, chunk_key, join

if TYPE_CHECKING:
    from cachefs.node import Dataset, Node
    from cachefs.objects import ChunkKey

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
# One load (one backend request) takes up to this many bytes and chunks of
# consecutive chunks with the same owner: on the JuiceFS S3 gateway a 16 MiB GET
# costs about 30% less gateway CPU per byte than four of 4 MiB. Progress moves
# when a load ends, so a load is never more than a few chunks.
RUN_BYTES = 16 << 20
RUN_CHUNKS = 4
MAX_CONCURRENCY = 256
MAX_FAILURES_LISTED = 20  # failed files a job names; it counts them all
JOBS_KEPT = 16  # finished jobs whose progress can still be asked for
MAX_WAIT = 5.0  # seconds a progress request may wait for its job to end

# A job's states: listing → running → done (some files may have failed), or failed (no
# loading at all: listing failed, or the set cannot fit), or cancelled.
FINISHED = frozenset({"done", "failed", "cancelled"})


class CannotFit(Exception):
    """The files to warm up are more than the cache holds."""


@dataclasses.dataclass(eq=False)
class _File:
    dataset: Dataset
    obj: ObjectId
    path: str  # as the mount shows it, for the failures list
    chunks_left: int = 0
    error: str | None = None


@dataclasses.dataclass(eq=False)
class WarmupJob:
    """One warm-up and its counters. Bytes are file bytes (chunk lengths), not cache overhead."""

    id: str
    paths: list[str]
    concurrency: int
    state: str = "listing"
    error: str | None = None  # why the job failed as a whole
    files_total: int = 0
    files_done: int = 0  # every chunk in the cache (loaded now or before)
    files_failed: int = 0
    bytes_total: int = 0
    bytes_cached: int = 0  # already in the cache when the job came to them
    bytes_loaded: int = 0  # loaded by this job
    bytes_failed: int = 0
    bytes_by_peers: int = 0  # of bytes_cached + bytes_loaded: in an owner's tiers on the ring
    chunks_total: int = 0
    chunks_cached: int = 0
    chunks_loaded: int = 0
    failed_count: int = 0  # failed files and directories that could not be listed
    failures: list[dict] = dataclasses.field(default_factory=list)  # the first MAX_FAILURES_LISTED
    started: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    ended: trio.Event = dataclasses.field(default_factory=trio.Event)

    def fail(self, path: str, error: str) -> None:
        self.failed_count += 1
        if len(self.failures) < MAX_FAILURES_LISTED:
            self.failures.append({"path": path, "error": error})

    def progress(self) -> dict[str, Any]:
        """The counters, JSON-able: what `warmup.progress` answers."""
        done = self.bytes_cached + self.bytes_loaded
        end = self.finished if self.finished is not None else time.time()
        return {
            "job": self.id,
            "state": self.state,
            "error": self.error,
            "paths": self.paths,
            "concurrency": self.concurrency,
            "files_total": self.files_total,
            "files_done": self.files_done,
            "files_failed": self.files_failed,
            "bytes_total": self.bytes_total,
            "bytes_cached": self.bytes_cached,
            "bytes_loaded": self.bytes_loaded,
            "bytes_failed": self.bytes_failed,
            "bytes_by_peers": self.bytes_by_peers,
            "bytes_done": done,
            "chunks_total": self.chunks_total,
            "chunks_cached": self.chunks_cached,
            "chunks_loaded": self.chunks_loaded,
            # Known only once listing is over: until then the total is still growing.
            "ratio": None if self.state == "listing" else (done / self.bytes_total if self.bytes_total else 1.0),
            "failed_count": self.failed_count,
            "failures": list(self.failures),
            "started": self.started,
            "elapsed": round(end - self.started, 3),
            "finished": self.finished,
        }


class Warmups:
    """A node's warm-up jobs; they run in `nursery` (the node's), so they end with it.

    Args:
        node: whose datasets, tiers and peer tier the jobs use.
        nursery: where jobs run.
    """

    def __init__(self, node: Node, nursery: trio.Nursery):
        self.node = node
        self.nursery = nursery
        self.jobs: dict[str, WarmupJob] = {}
        self._ids = itertools.count(1)

    # -- control ops -----------------------------------------------------------

    async def start(self, paths: list[str], recursive: bool = False, concurrency: int = DEFAULT_CONCURRENCY) -> dict:
        """Start warming up `paths` (relative to the mount root; "" is the root). Checkpoints.

        Returns:
            The new job's progress (its id is "job").
        Raises:
            ConfigError: one line: no paths, a bad concurrency, a path outside any
                dataset, in a dataset that does not exist, or not in its source.
        """
        if not paths:
            raise ConfigError("warmup: no paths given")
        if isinstance(concurrency, bool) or not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ConfigError(f"warmup: concurrency must be 1..{MAX_CONCURRENCY}, not {concurrency}")
        roots = []
        for path in paths:
            for dataset, inner in self._locate(path):
                roots.append((dataset, inner, await self._stat(dataset, inner, path)))
        job = WarmupJob(str(next(self._ids)), list(paths), concurrency)
        self._keep(job)
        self.nursery.start_soon(self._run, job, roots, recursive)
        log.info("warm-up %s of %s started (%s)", job.id, ", ".join(p or "/" for p in paths),
                 "recursive" if recursive else "not recursive")
        return job.progress()

    async def progress(self, job_id: str, wait: float = 0.0) -> dict:
        """A job's counters, once it has ended or `wait` seconds (MAX_WAIT at most)
        have passed, whichever comes first: a client following a job learns at
        once that it ended, not up to a polling interval later."""
        job = self._job(job_id)
        with trio.move_on_after(min(max(wait, 0.0), MAX_WAIT)):
            await job.ended.wait()
        return job.progress()

    def cancel(self, job_id: str) -> dict:
        """Stop a job; chunks loaded so far stay cached, so running it again resumes."""
        job = self._job(job_id)
        job.scope.cancel()
        return job.progress()

    def _job(self, job_id: str) -> WarmupJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise ConfigError(f"no warm-up job {job_id!r} (finished jobs are kept for a while only)")
        return job

    def _keep(self, job: WarmupJob) -> None:
        self.jobs[job.id] = job
        finished = [j for j in self.jobs.values() if j.state in FINISHED]
        for old in finished[: max(0, len(finished) - JOBS_KEPT)]:
            del self.jobs[old.id]

    # -- resolving paths --------------------------------------------------------

    def _locate(self, path: str) -> list[tuple[Dataset, str]]:
        """The (dataset, path in it) pairs `path` names: the mount root of a node with
        named datasets is all of them."""
        try:
            check_relative_path(path)
        except ValueError:
            raise ConfigError(f"{path!r}: not a path inside the mount") from None
        datasets = self.node.datasets
        if "" in datasets:
            return [(datasets[""], path)]
        name, _, inner = path.partition("/")
        if not name:
            if not datasets:
                raise ConfigError("the mount serves no datasets")
            return [(d, "") for d in datasets.values()]
        dataset = datasets.get(name)
        if dataset is None:
            raise ConfigError(f"{path}: no dataset {name!r} in this mount (have: {', '.join(datasets) or 'none'})")
        return [(dataset, inner)]

    async def _stat(self, dataset: Dataset, inner: str, path: str):
        if dataset.namespace is None:
            raise ConfigError("warm up through a mount: a worker keeps no metadata to list files with")
        try:
            return await dataset.namespace.stat(inner)
        except ObjectNotFound:
            raise ConfigError(f"{path or '/'}: no such file or directory") from None
        except BackendError as e:
            raise ConfigError(f"{path or '/'}: cannot read it from the backend ({e})") from None

    # -- the job ----------------------------------------------------------------------

    async def _run(self, job: WarmupJob, roots: list, recursive: bool) -> None:
        """Runs in the node's nursery: never raises, except to be cancelled."""
        t0 = time.monotonic()
        try:
            with job.scope:
                files = await self._walk(job, roots, recursive)
                await self._check_fits(job, files)
                job.state = "running"
                await self._load(job, files)
                job.state = "done"
            if job.scope.cancelled_caught:
                job.state = "cancelled"
        except CannotFit as e:
            job.state, job.error = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - a job's failure must not take the node down
            log.exception("warm-up %s failed", job.id)
            job.state, job.error = "failed", f"internal error: {type(e).__name__}: {e}"
        finally:
            if job.state not in FINISHED:
                job.state = "cancelled"  # the node is shutting down
            job.finished = time.time()
            job.ended.set()
            log.info(
                "warm-up %s %s: %d/%d files, %s loaded, %s cached before, %d failed, %.1fs%s",
                job.id, job.state, job.files_done, job.files_total, _bytes(job.bytes_loaded),
                _bytes(job.bytes_cached), job.failed_count, time.monotonic() - t0,
                f" ({job.error})" if job.error else "",
            )

    async def _walk(self, job: WarmupJob, roots: list, recursive: bool) -> list[_File]:
        """The files to warm up, each once; totals are counted as they are found."""
        files: list[_File] = []
        seen: set[tuple[str, str]] = set()

        def add(dataset: Dataset, info) -> None:
            if (dataset.name, info.path) in seen:
                return
            seen.add((dataset.name, info.path))
            obj = ObjectId(dataset.source, info.path, info.version, info.size)
            n_chunks = -(-info.size // dataset.reader.chunk_size)
            files.append(_File(dataset, obj, join(dataset.name, info.path), n_chunks))
            job.files_total += 1
            job.bytes_total += info.size
            job.chunks_total += n_chunks

        for dataset, inner, info in roots:
            if info.kind == "file":
                add(dataset, info)
                continue
            if info.kind != "dir":
                continue  # a link: its target is warmed up where it lies, if it is in the set
            pending = [inner]
            while pending:
                directory = pending.pop()
                try:
                    entries = await dataset.namespace.list_dir(directory)
                except BackendError as e:
                    job.fail(join(dataset.name, directory) or "/", f"cannot list: {e}")
                    continue
                for entry in entries:
                    if entry.kind == "file":
                        add(dataset, entry)
                    elif entry.kind == "dir" and recursive:
                        pending.append(entry.path)
        return files

    async def _check_fits(self, job: WarmupJob, files: list[_File]) -> None:
        """Raise CannotFit if the cache that would hold `files` cannot: the local one,
        or with peers any owner's, for its share on the ring. Checkpoints.

        Raises:
            CannotFit: naming both sizes.
        """
        node = self.node
        if node.peers is not None:
            await self._check_owners_fit(files)
            return
        disk = node.disk
        if disk is not None:
            need = sum(_on_disk(f.obj.size, f.dataset.reader.chunk_size) for f in files)
            capacity, what = disk.capacity, "the SSD cache"
            quotas = {f.dataset.config.quota for f in files if f.dataset.config.quota is not None}
            if quotas and len({f.dataset.name for f in files}) == 1:
                capacity, what = min(capacity, *quotas), f"dataset {files[0].dataset.name!r}'s quota"
        else:
            need, capacity, what = job.bytes_total, node.mem.capacity, "the memory cache"
        if need > capacity:
            raise CannotFit(f"cannot fit: {_bytes(need)} to load, {what} holds {_bytes(capacity)}")

    async def _check_owners_fit(self, files: list[_File]) -> None:
        """With peers: each owner's share of `files` (its chunks on the ring, headers
        included) must fit the cache its warm-ups fill, which it tells (protocol v6).
        An owner that cannot tell (older, down, no answer in --peer-timeout) is not
        checked: its loads go on as before. Checkpoints.

        Raises:
            CannotFit: the first owner whose share is larger, with both sizes.
        """
        node = self.node
        peers = node.peers
        assert peers is not None
        need: collections.Counter = collections.Counter()  # owner (None: this node) -> bytes
        for f in files:
            for owner, keys in self._runs(f):
                need[owner] += sum(file_header_size(k.length) + k.length for k in keys)
        capacities: dict[str | None, int] = {None: node.warm_capacity()}

        async def ask(owner: str) -> None:
            try:
                with trio.fail_after(node.config.peer_timeout):
                    capacities[owner] = await peers.client.capacity(owner)
            except (PeerError, trio.TooSlowError) as e:
                log.info("warm-up: cannot check that %s can hold its share (%s); not checked", owner, e or "no answer")

        async with trio.open_nursery() as nursery:
            for owner in need:
                if owner is not None:
                    nursery.start_soon(ask, owner)
        for owner, share in need.items():
            capacity = capacities.get(owner)
            if capacity is not None and share > capacity:
                where = "this node's cache" if owner is None else f"the cache of {owner}, its owner on the ring,"
                raise CannotFit(f"cannot fit: {_bytes(share)} to load into {where} which holds {_bytes(capacity)}")

    async def _load(self, job: WarmupJob, files: list[_File]) -> None:
        slots = trio.Semaphore(job.concurrency)
        async with trio.open_nursery() as nursery:
            for f in files:
                if f.chunks_left == 0:  # an empty file: nothing to load
                    job.files_done += 1
                for owner, keys in self._runs(f):
                    await slots.acquire()  # bounded: never more than `concurrency` loads in flight
                    nursery.start_soon(self._chunks, job, f, owner, keys, slots)

    def _runs(self, f: _File):
        """A file's chunks in loads: runs of consecutive chunks with the same owner on
        the ring (None: us), RUN_BYTES at most, each loaded with one backend request.
        Yields (owner, keys)."""
        chunk_size = f.dataset.reader.chunk_size
        longest = max(1, min(RUN_CHUNKS, RUN_BYTES // chunk_size))
        peers = self.node.peers
        run: list[ChunkKey] = []
        run_owner = None
        for index in range(f.chunks_left):
            key = chunk_key(f.obj, chunk_size, index)
            owner = peers.owner(key.digest) if peers is not None else None
            if run and (owner != run_owner or len(run) == longest):
                yield run_owner, run
                run = []
            run_owner = owner
            run.append(key)
        if run:
            yield run_owner, run

    async def _chunks(self, job: WarmupJob, f: _File, owner: str | None, keys: list[ChunkKey],
                      slots: trio.Semaphore) -> None:
        by_peer = False
        try:
            try:
                cached, by_peer = await self._warm(f.dataset, owner, keys)
                outcomes = ["cached" if held else "loaded" for held in cached]
            except (BackendError, PeerError) as e:
                outcomes, error = ["failed"] * len(keys), str(e)
            except Exception as e:  # noqa: BLE001 - one load's bug fails its file, not the job
                log.exception("warm-up %s: %s chunks %d..%d", job.id, f.path, keys[0].index, keys[-1].index)
                outcomes, error = ["failed"] * len(keys), f"internal error: {type(e).__name__}"
        finally:
            slots.release()
        for key, outcome in zip(keys, outcomes):
            metrics.WARMUP_BYTES.labels(outcome).inc(key.length)
            if outcome == "failed":
                job.bytes_failed += key.length
                f.error = f.error or error
            else:
                if outcome == "cached":
                    job.bytes_cached += key.length
                    job.chunks_cached += 1
                else:
                    job.bytes_loaded += key.length
                    job.chunks_loaded += 1
                if by_peer:
                    job.bytes_by_peers += key.length
        f.chunks_left -= len(keys)
        if f.chunks_left == 0:
            metrics.WARMUP_FILES.labels("done" if f.error is None else "failed").inc()
            if f.error is None:
                job.files_done += 1
            else:
                job.files_failed += 1
                job.fail(f.path, f.error)

    async def _warm(self, dataset: Dataset, owner: str | None, keys: list[ChunkKey]) -> tuple[list[bool], bool]:
        """Have consecutive chunks of one object where they will be served from. Checkpoints.

        Args:
            owner: the chunks' owner on the ring; None: load them here.
        Returns:
            (for each chunk, whether it was cached before; whether a peer holds them).
        Raises:
            BackendError: the backend failed (here or at the owner), or the object is gone or changed.
        """
        obj, first = keys[0].obj, keys[0].index
        peers = self.node.peers
        if owner is not None and peers is not None:
            config = self.node.config
            timeout = config.peer_timeout + config.backend_timeout  # the owner may wait on the backend
            try:
                with trio.fail_after(timeout):
                    cached = await peers.client.load_chunks(owner, obj, keys[0].chunk_size, first, len(keys))
                peers.client.mark_ok(owner)
                return cached, True
            except trio.TooSlowError:
                peers.client.mark_failed(owner, f"no answer to a load within {timeout:g}s")
            except PeerError as e:
                if e.code in ("notfound", "changed"):
                    raise (ObjectNotFound if e.code == "notfound" else ObjectChanged)(str(e)) from None
                if e.code not in ("unavailable", "version"):
                    peers.client.mark_failed(owner, e)
                log.debug("warm-up: %s; loading %s chunks %d..%d here", e, obj.path, first, keys[-1].index)
        return await dataset.reader.warm_run(obj, first, len(keys)), False


def _on_disk(size: int, chunk_size: int) -> int:
    """Bytes `size` bytes of one object take in the SSD tier: its chunks and their headers."""
    full, rest = divmod(size, chunk_size)
    need = full * (file_header_size(chunk_size) + chunk_size)
    return need + (file_header_size(rest) + rest if rest else 0)


def _bytes(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB ({n} bytes)"

