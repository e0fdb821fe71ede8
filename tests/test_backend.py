"""The backend layer and the metadata cache above it.

- ``Backend`` over a FakeStore (the LocalStore interface, in memory): bounded
  retries, a deadline that holds even when the store hangs, errors that must
  not be retried, the short circuit-breaker, and the request metrics.
- ``LocalStore`` over real files, symlinks and directories in ``tmp_path``.
- ``Namespace`` (attribute and listing TTLs, the bounded LRU they live in) over a
  Backend, with a fake clock.

Store calls run in worker threads, so Backend timeouts are real wall time;
they are kept to a fraction of a second.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import urllib.parse
from collections import Counter

import botocore.exceptions
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from cachefs import backend as backend_mod
from cachefs.backend import Backend, LocalStore, open_store
from cachefs.objects import ObjectId, ObjectInfo
from cachefs.errors import (
    BackendError,
    BackendPermissionDenied,
    BackendUnavailable,
    ObjectChanged,
    ObjectNotFound,
)
from cachefs import namespace as namespace_mod
from cachefs.namespace import BoundedLru, Namespace


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def requests(op: str, outcome: str) -> float:
    return sample("cachefs_backend_requests_total", op=op, outcome=outcome)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """A tree in memory with the LocalStore interface (url, stat, list_dir, fetch).

    `calls` counts calls per operation; `fail_next = n` makes the next n calls
    raise `error()`; `hang()` blocks calls (on a threading.Event, in their worker
    thread) until `release()`; `short = True` makes fetch return one byte less.
    `add()` of an existing path is a new version: fetches of the old ObjectId
    then raise ObjectChanged, as LocalStore's do.
    """

    url = "fake://bucket/prefix"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.dirs: set[str] = {""}
        self.calls: Counter[str] = Counter()
        self.fail_next = 0
        self.error = lambda: OSError(errno.EIO, "injected I/O error")
        self.short = False
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Semaphore(0)  # released by every call, once it has been counted

    def add(self, path: str, data: bytes = b"") -> ObjectId:
        version = f"v{next(self._versions)}"
        self.files[path] = (data, version)
        parent = path.rpartition("/")[0]
        while parent and parent not in self.dirs:
            self.dirs.add(parent)
            parent = parent.rpartition("/")[0]
        return ObjectId(self.url, path, version, len(data))

    def remove(self, path: str) -> None:
        del self.files[path]

    def hang(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def _enter(self, op: str) -> None:
        with self._lock:
            self.calls[op] += 1
            fail = self.fail_next > 0
            self.fail_next -= fail
        self.entered.release()
        if not self._open.wait(10):
            raise RuntimeError("test store was never released")
        if fail:
            raise self.error()

    def _info(self, path: str) -> ObjectInfo:
        if path in self.dirs:
            return ObjectInfo(path, "dir", 0, 0.0, "dir")
        data, version = self.files[path]
        return ObjectInfo(path, "file", len(data), 0.0, version)

    def stat(self, path: str) -> ObjectInfo:
        self._enter("stat")
        if path not in self.dirs and path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return self._info(path)

    check_name = stat  # counted as a stat: one question about one name

    def list_dir(self, path: str) -> list[ObjectInfo]:
        self._enter("list")
        if path not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        names = [p for p in (*self.dirs, *self.files) if p and p.rpartition("/")[0] == path]
        return [self._info(p) for p in names]

    def fetch(self, obj: ObjectId, start: int, end: int) -> bytes:
        self._enter("fetch")
        if obj.path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such object", obj.path)
        data, version = self.files[obj.path]
        if version != obj.version:
            raise ObjectChanged(f"{obj.path}: changed")
        return data[start : end - 1] if self.short else data[start:end]


@pytest.fixture
def store():
    s = FakeStore()
    yield s
    s.release()  # no worker thread outlives the test


DATA = bytes(range(256)) * 40


# -- Backend: retries --------------------------------------------------------------


@pytest.mark.trio
async def test_retries_until_success(store):
    obj = store.add("f", DATA)
    store.fail_next = 2
    ok, errors = requests("get", "ok"), requests("get", "error")
    backend = Backend(store, concurrency=4, timeout=5.0, retries=3)
    assert await backend.fetch(obj, 100, 300) == DATA[100:300]
    assert store.calls["fetch"] == 3
    assert requests("get", "ok") == ok + 1
    assert requests("get", "error") == errors + 2


@pytest.mark.trio
@pytest.mark.parametrize("retries", [0, 2])
async def test_gives_up_after_retries(store, retries):
    obj = store.add("f", DATA)
    store.fail_next = 100
    errors = requests("get", "error")
    backend = Backend(store, concurrency=4, timeout=5.0, retries=retries)
    with pytest.raises(BackendError) as info:
        await backend.fetch(obj, 0, 10)
    assert type(info.value) is BackendError
    assert store.calls["fetch"] == retries + 1
    assert requests("get", "error") == errors + retries + 1


@pytest.mark.trio
@pytest.mark.parametrize(
    "make_error, expected, retried",
    [
        (lambda: FileNotFoundError(errno.ENOENT, "gone"), ObjectNotFound, False),
        (lambda: NotADirectoryError(errno.ENOTDIR, "not a dir"), ObjectNotFound, False),
        (lambda: PermissionError(errno.EACCES, "denied"), BackendPermissionDenied, False),
        (lambda: ObjectChanged("new etag"), ObjectChanged, False),
        (lambda: ConnectionResetError(errno.ECONNRESET, "reset"), BackendUnavailable, True),
        (lambda: TimeoutError("read timed out"), BackendUnavailable, True),
        (lambda: OSError(errno.EIO, "I/O error"), BackendError, True),
        (lambda: ValueError("botocore says no"), BackendError, True),
        (lambda: botocore.exceptions.NoCredentialsError(), BackendPermissionDenied, False),
    ],
    ids=["enoent", "enotdir", "eacces", "changed", "reset", "timeout", "eio", "other", "no-credentials"],
)
async def test_errors_are_translated_and_only_transient_ones_retried(store, make_error, expected, retried):
    obj = store.add("f", DATA)
    store.fail_next = 100
    store.error = make_error
    backend = Backend(store, concurrency=4, timeout=5.0, retries=1)
    with pytest.raises(BackendError) as info:
        await backend.fetch(obj, 0, 10)
    assert type(info.value) is expected
    assert store.calls["fetch"] == (2 if retried else 1)


@pytest.mark.trio
async def test_object_changed_is_not_retried(store):
    old = store.add("f", DATA)
    store.add("f", DATA[::-1])
    errors = requests("get", "error")
    backend = Backend(store, concurrency=4, timeout=5.0, retries=3)
    with pytest.raises(ObjectChanged):
        await backend.fetch(old, 0, 10)
    assert store.calls["fetch"] == 1
    assert requests("get", "error") == errors + 1


@pytest.mark.trio
async def test_not_found_is_not_retried_and_counted_apart(store):
    notfound, errors = requests("stat", "notfound"), requests("stat", "error")
    backend = Backend(store, concurrency=4, timeout=5.0, retries=3)
    with pytest.raises(ObjectNotFound):
        await backend.stat("missing")
    assert store.calls["stat"] == 1
    assert requests("stat", "notfound") == notfound + 1
    assert requests("stat", "error") == errors


@pytest.mark.trio
async def test_short_read_is_object_changed(store):
    obj = store.add("f", DATA)
    store.short = True
    backend = Backend(store, concurrency=4, timeout=5.0, retries=3)
    with pytest.raises(ObjectChanged):
        await backend.fetch(obj, 0, 100)
    assert store.calls["fetch"] == 1


class CutShortStore(FakeStore):
    """fetch_into whose first request is cut off halfway through its second buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[int, int, int]] = []  # (start, end, buffers)

    def fetch_into(self, obj, start, end, into) -> int:
        self.requests.append((start, end, len(into)))
        data = self.files[obj.path][0][start:end]
        at = 0
        for i, buf in enumerate(into):
            n = len(buf)
            if len(self.requests) == 1 and i == 1:
                buf[: n // 2] = data[at : at + n // 2]
                raise ConnectionError("connection reset halfway")
            buf[:] = data[at : at + n]
            at += n
        return at


@pytest.mark.trio
async def test_a_fetch_into_cut_short_is_retried_whole():
    """A request cut off halfway is asked again for all its bytes, and the buffers
    end up holding exactly the object's range."""
    store = CutShortStore()
    obj = store.add("f", DATA)
    bufs = [memoryview(bytearray(1000)) for _ in range(3)]
    backend = Backend(store, concurrency=4, timeout=5.0, retries=3)
    await backend.fetch_into(obj, 500, bufs)
    assert store.requests == [(500, 3500, 3), (500, 3500, 3)]
    assert b"".join(bytes(b) for b in bufs) == DATA[500:3500]


@pytest.mark.trio
async def test_request_seconds_are_a_requests_own_not_its_wait_for_a_thread(store):
    """cachefs_backend_request_seconds times each request in its thread: one queued behind
    another for the only thread does not count the other's time as its own."""
    clock = FakeClock()
    backend = Backend(store, concurrency=1, timeout=60.0, retries=0, clock=clock)
    store.add("a")
    store.add("b")
    seconds, count = (sample(f"cachefs_backend_request_seconds_{k}", op="stat") for k in ("sum", "count"))
    store.hang()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.stat, "a")
        await trio.to_thread.run_sync(store.entered.acquire)  # the first is in the store
        nursery.start_soon(backend.stat, "b")  # waits for the only thread
        await trio.testing.wait_all_tasks_blocked()
        clock.now += 7.0  # the first takes 7 s
        store.release()
    assert sample("cachefs_backend_request_seconds_count", op="stat") == count + 2
    assert sample("cachefs_backend_request_seconds_sum", op="stat") == seconds + 7.0


@pytest.mark.trio
async def test_stat_and_list_go_through(store):
    store.add("d/a", b"12345")
    store.add("d/b")
    stats, lists = requests("stat", "ok"), requests("list", "ok")
    backend = Backend(store, concurrency=4, timeout=5.0, retries=0)
    assert await backend.stat("d/a") == ObjectInfo("d/a", "file", 5, 0.0, store.files["d/a"][1])
    assert sorted(i.path for i in await backend.list_dir("d")) == ["d/a", "d/b"]
    assert requests("stat", "ok") == stats + 1
    assert requests("list", "ok") == lists + 1


# -- Backend: a hanging store -------------------------------------------------------

TIMEOUT = 0.2

# The hanging-store tests run on trio's fake clock (autojump_clock): the deadline is
# the Backend's, on trio's clock, so the times below are exact, not real seconds with
# slack. The store hangs in a real worker thread, which the Backend abandons.


@pytest.mark.trio
@pytest.mark.parametrize("retries", [0, 3])
async def test_hanging_store_fails_within_the_timeout(store, retries, autojump_clock):
    obj = store.add("f", DATA)
    store.hang()
    errors = requests("get", "error")
    backend = Backend(store, concurrency=4, timeout=TIMEOUT, retries=retries)
    t0 = trio.current_time()
    with trio.fail_after(5):  # without a deadline the fake clock jumps here and fails the test
        with pytest.raises(BackendUnavailable):
            await backend.fetch(obj, 0, 10)
    # One deadline per request, however many retries are allowed.
    assert trio.current_time() - t0 == pytest.approx(TIMEOUT)
    assert store.entered.acquire(timeout=5)  # the hung call reached the store, in its thread
    assert store.calls["fetch"] == 1
    assert requests("get", "error") == errors + 1


@pytest.mark.trio
async def test_hanging_store_with_every_slot_stuck_fails_fast(store, autojump_clock):
    obj = store.add("f", DATA)
    store.hang()
    backend = Backend(store, concurrency=1, timeout=TIMEOUT, retries=2)
    outcomes = []

    async def fetch():
        try:
            await backend.fetch(obj, 0, 10)
        except BackendError as e:
            outcomes.append(type(e))

    t0 = trio.current_time()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(fetch)
    assert trio.current_time() - t0 == pytest.approx(TIMEOUT)  # all three at the one deadline
    assert outcomes == [BackendUnavailable] * 3
    assert store.entered.acquire(timeout=5)
    assert store.calls["fetch"] == 1, "the others never got the only slot"


@pytest.mark.trio
async def test_circuit_breaker_fails_fast_then_lets_requests_through(store):
    obj = store.add("f", DATA)
    clock = FakeClock()
    backend = Backend(store, concurrency=4, timeout=TIMEOUT, retries=0, clock=clock)
    store.hang()
    with pytest.raises(BackendUnavailable):
        await backend.fetch(obj, 0, 10)
    assert backend.is_down
    store.release()

    skipped = requests("get", "skipped")
    with trio.fail_after(1):
        with pytest.raises(BackendUnavailable):
            await backend.fetch(obj, 0, 10)
        with pytest.raises(BackendUnavailable):
            await backend.stat("f")
    assert store.calls == {"fetch": 1}, "a down backend is not asked"
    assert requests("get", "skipped") == skipped + 1

    clock.now += backend_mod.DOWN_COOLDOWN
    assert not backend.is_down
    assert await backend.fetch(obj, 0, 10) == DATA[:10]
    assert store.calls["fetch"] == 2


@pytest.mark.trio
@pytest.mark.parametrize("error", [lambda: FileNotFoundError(errno.ENOENT, "x"), lambda: OSError(errno.EIO, "x")])
async def test_only_unavailability_trips_the_breaker(store, error):
    obj = store.add("f", DATA)
    store.fail_next = 1
    store.error = error
    backend = Backend(store, concurrency=4, timeout=5.0, retries=0, clock=FakeClock())
    with pytest.raises(BackendError):
        await backend.fetch(obj, 0, 10)
    assert not backend.is_down
    assert await backend.fetch(obj, 0, 10) == DATA[:10]


@pytest.mark.trio
async def test_after_the_cooldown_only_one_request_probes_a_dead_backend(store):
    obj = store.add("f", DATA)
    clock = FakeClock()
    backend = Backend(store, concurrency=8, timeout=TIMEOUT, retries=0, clock=clock)
    store.hang()
    with pytest.raises(BackendUnavailable):
        await backend.fetch(obj, 0, 10)
    clock.now += backend_mod.DOWN_COOLDOWN

    async def fetch():
        with pytest.raises(BackendUnavailable):
            await backend.fetch(obj, 0, 10)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(fetch)
    assert store.calls["fetch"] == 2, "one probe after the cooldown, the rest fail fast"


# -- LocalStore --------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(DATA)
    (root / "sub" / "b.bin").write_bytes(b"bee")
    (root / "link").symlink_to("a.txt")
    (root / "dangling").symlink_to("nowhere")
    return root


def test_local_stat_kinds(tree):
    s = LocalStore(str(tree))
    st = os.stat(tree / "a.txt")
    a = s.stat("a.txt")
    assert (a.path, a.name, a.kind, a.size) == ("a.txt", "a.txt", "file", len(DATA))
    assert a.version == f"stat:{st.st_size}-{st.st_mtime_ns}"
    assert a.link_target is None
    assert s.stat("sub").kind == "dir"
    assert s.stat("").kind == "dir"
    link = s.stat("link")
    assert (link.kind, link.link_target) == ("link", "a.txt")
    assert s.stat("dangling").link_target == "nowhere"
    b = s.stat("sub/b.bin")
    assert (b.path, b.name, b.size) == ("sub/b.bin", "b.bin", 3)
    with pytest.raises(FileNotFoundError):
        s.stat("missing")


def test_local_list_dir(tree):
    s = LocalStore(str(tree))
    listing = {i.path: i for i in s.list_dir("")}
    assert {p: i.kind for p, i in listing.items()} == {
        "a.txt": "file",
        "sub": "dir",
        "link": "link",
        "dangling": "link",
    }
    assert listing["a.txt"] == s.stat("a.txt"), "listing and stat agree"
    assert listing["link"].link_target == "a.txt"
    assert [i.path for i in s.list_dir("sub")] == ["sub/b.bin"]
    with pytest.raises(NotADirectoryError):
        s.list_dir("a.txt")


def test_local_fetch_reads_the_version_it_was_given(tree):
    s = LocalStore(str(tree))
    info = s.stat("a.txt")
    obj = ObjectId(s.url, info.path, info.version, info.size)
    assert s.fetch(obj, 0, 10) == DATA[:10]
    assert s.fetch(obj, 1000, 1500) == DATA[1000:1500]


@pytest.mark.parametrize("change", ["same_size_new_mtime", "appended", "replaced"])
def test_local_fetch_refuses_a_changed_file(tree, change):
    s = LocalStore(str(tree))
    info = s.stat("a.txt")
    obj = ObjectId(s.url, info.path, info.version, info.size)
    path = tree / "a.txt"
    st = os.stat(path)
    if change == "same_size_new_mtime":
        path.write_bytes(DATA[::-1])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "appended":
        with open(path, "ab") as f:
            f.write(b"more")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    else:
        tmp = tree / "a.new"
        tmp.write_bytes(DATA)
        os.replace(tmp, path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(ObjectChanged):
        s.fetch(obj, 0, 10)


@pytest.mark.trio
async def test_local_store_through_backend(tree):
    s = LocalStore(str(tree))
    backend = Backend(s, concurrency=4, timeout=5.0, retries=3)
    info = await backend.stat("a.txt")
    obj = ObjectId(s.url, info.path, info.version, info.size)
    assert await backend.fetch(obj, 5, 25) == DATA[5:25]
    with pytest.raises(ObjectNotFound):
        await backend.stat("missing")
    with pytest.raises(ObjectNotFound):
        await backend.list_dir("a.txt")
    os.utime(tree / "a.txt", ns=(0, 1))
    errors = requests("get", "error")
    with pytest.raises(ObjectChanged):
        await backend.fetch(obj, 0, 10)
    assert requests("get", "error") == errors + 1, "ObjectChanged is not retried"
    (tree / "a.txt").unlink()
    with pytest.raises(ObjectNotFound):
        await backend.fetch(obj, 0, 10)


def test_open_store_picks_local_for_paths(tmp_path):
    for url in (str(tmp_path), f"file://{tmp_path}"):
        s = open_store(url)
        assert isinstance(s, LocalStore) and s.root == str(tmp_path)
    rel = open_store(".")
    assert isinstance(rel, LocalStore) and rel.root == os.getcwd()


# -- Namespace ---------------------------------------------------------------------


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ns_store():
    s = FakeStore()
    s.add("d/a", b"aaa")
    s.add("d/b", b"bbbb")
    s.add("d/sub/c", b"c")
    s.add("top", b"t")
    yield s
    s.release()


def namespace(store, clock, attr_ttl=1.0, dir_ttl=5.0, max_entries=100_000) -> Namespace:
    backend = Backend(store, concurrency=4, timeout=5.0, retries=0, clock=clock)
    return Namespace(backend, attr_ttl=attr_ttl, dir_ttl=dir_ttl, clock=clock, max_entries=max_entries)


@pytest.mark.trio
async def test_attr_ttl_is_honoured(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=1.0)
    assert (await ns.stat("d/a")).size == 3
    clock.now += 0.99
    ns_store.add("d/a", b"grown")
    assert (await ns.stat("d/a")).size == 3, "within the TTL: cached"
    assert ns_store.calls["stat"] == 1
    clock.now += 0.01
    assert (await ns.stat("d/a")).size == 5, "at the TTL: asked again"
    assert ns_store.calls["stat"] == 2
    assert (await ns.stat("d/a", max_age=0)).size == 5
    assert ns_store.calls["stat"] == 3, "max_age=0 always asks"


@pytest.mark.trio
async def test_attr_ttl_zero_always_asks(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=0.0)
    for _ in range(3):
        await ns.stat("top")
    assert ns_store.calls["stat"] == 3


@pytest.mark.trio
async def test_listing_answers_lookups_of_children(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=5.0)
    names = [i.name for i in await ns.list_dir("d")]
    assert names == ["a", "b", "sub"], "sorted by name"
    assert ns_store.calls == {"list": 1}

    assert (await ns.lookup("d", "a")).size == 3
    assert (await ns.lookup("d", "sub")).kind == "dir"
    assert (await ns.stat("d/b")).size == 4
    with pytest.raises(ObjectNotFound):
        await ns.lookup("d", "nope")
    assert ns_store.calls == {"list": 1}, "a fresh listing answers without a stat"

    assert [i.name for i in await ns.list_dir("d")] == ["a", "b", "sub"]
    assert ns_store.calls == {"list": 1}, "the listing itself is cached for dir_ttl"


@pytest.mark.trio
async def test_expired_listing_is_revalidated_with_one_list(ns_store, clock):
    """A directory listed before is revalidated by listing it again, not by a HEAD per entry."""
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=5.0)
    await ns.list_dir("d")
    clock.now += 5.0
    ns_store.add("d/new", b"n")
    ns_store.remove("d/b")
    assert (await ns.stat("d/a")).size > 0
    with pytest.raises(ObjectNotFound):
        await ns.lookup("d", "b")
    assert (await ns.lookup("d", "new")).size == 1
    with pytest.raises(ObjectNotFound):
        await ns.lookup("d", "nope")
    assert [i.name for i in await ns.list_dir("d")] == ["a", "new", "sub"]
    assert ns_store.calls == {"list": 2}


class SlowListStore(FakeStore):
    """LISTs wait while `listing` is clear; other calls go through."""

    def __init__(self) -> None:
        super().__init__()
        self.listing = threading.Event()
        self.listing.set()

    def list_dir(self, path: str) -> list[ObjectInfo]:
        with self._lock:
            self.calls["list started"] += 1
        if not self.listing.wait(10):
            raise RuntimeError("LISTs were never let through")
        return super().list_dir(path)


@pytest.fixture
def slow_list_store():
    s = SlowListStore()
    for i in range(3):
        s.add(f"out/old{i}", b"old")
    yield s
    s.listing.set()
    s.release()


async def _until(condition) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.001)


@pytest.mark.trio
async def test_a_new_name_is_checked_alone_while_its_directory_is_listed_in_the_background(slow_list_store, clock):
    """The kernel's lookup before a create: a name missing from an expired listing is one
    stat of that name; no lookup waits for the LIST of the whole directory."""
    store = slow_list_store
    async with trio.open_nursery() as nursery:
        backend = Backend(store, concurrency=4, timeout=5.0, retries=0, clock=clock)
        ns = Namespace(backend, attr_ttl=1.0, dir_ttl=1.0, clock=clock, nursery=nursery)
        await ns.list_dir("out")
        clock.now += 1.0
        store.listing.clear()  # LISTs hang from now on
        store.add("out/theirs", b"another node's")
        for i in range(5):
            with pytest.raises(ObjectNotFound):
                await ns.lookup("out", f"mine{i}")
        assert (await ns.lookup("out", "theirs")).size == 14, "another node's name is seen at once"
        assert store.calls["stat"] == 6
        # This node's own changes while the LIST is in flight (uploads landed, a delete).
        for i in range(5):
            ns.put_entry(ObjectInfo(f"out/mine{i}", "file", 4, 0.0, f"etag:{i}"))
        ns.drop_entry("out/old0")
        assert store.calls["list started"] == 2, "one LIST in the background, however many lookups"
        store.listing.set()
        await _until(lambda: store.calls["list"] == 2)
        await _until(lambda: "out" not in ns._listing)
        names = [i.name for i in await ns.list_dir("out")]
        assert names == ["mine0", "mine1", "mine2", "mine3", "mine4", "old1", "old2", "theirs"], (
            "the LIST began before this node's changes: they are applied to its result")
        with pytest.raises(ObjectNotFound):
            await ns.lookup("out", "mine9")
        assert store.calls["stat"] == 6 and store.calls["list"] == 2, "the fresh listing answers"


@pytest.mark.trio
async def test_a_directory_this_node_fills_is_listed_again_only_while_that_costs_less_than_name_checks(
        slow_list_store, clock):
    """A writer on this node creating 4 files per --dir-ttl: its listing answers for the new
    names without asking (FILL_TRUST x --dir-ttl), and is listed again only while a LIST costs
    the server no more than checking the names it answered since; past NAME_CHECK_ENTRIES x
    the names of one trust period, each new name is checked alone. Listing it again on every
    expiry made each create cost more than the last (quadratic in the files)."""
    store = slow_list_store
    per_ttl = 4
    bound = namespace_mod.NAME_CHECK_ENTRIES * per_ttl * namespace_mod.FILL_TRUST
    async with trio.open_nursery() as nursery:
        backend = Backend(store, concurrency=4, timeout=5.0, retries=0, clock=clock)
        ns = Namespace(backend, attr_ttl=1.0, dir_ttl=1.0, clock=clock, nursery=nursery)
        await ns.list_dir("out")
        listed_at = []  # entries in the directory at each LIST
        stat_at = []  # entries in the directory at each name checked alone
        for i in range(bound + 60):
            clock.now += 1.0 / per_ttl
            lists, stats = store.calls["list started"], store.calls["stat"]
            with pytest.raises(ObjectNotFound):
                await ns.lookup("out", f"new{i:03d}")
            await trio.testing.wait_all_tasks_blocked()
            await _until(lambda: "out" not in ns._listing)
            if store.calls["list started"] > lists:
                listed_at.append(3 + i)
            if store.calls["stat"] > stats:
                stat_at.append(3 + i)
            store.add(f"out/new{i:03d}", b"n")  # its upload landed
            ns.put_entry(ObjectInfo(f"out/new{i:03d}", "file", 1, 0.0, f"etag:{i}"))
        assert len(listed_at) >= 5, "listed again while small"
        assert max(listed_at) <= bound + 3, f"listed again at {listed_at} entries"
        assert sum(listed_at) <= namespace_mod.NAME_CHECK_ENTRIES * (bound + 60), "no dearer than name checks"
        assert stat_at and min(stat_at) > bound - 3, f"a name checked alone at {stat_at[:3]} entries"
        assert len(stat_at) >= 60 - namespace_mod.FILL_TRUST * per_ttl - 3, "past the bound each name is checked"
        assert (await ns.lookup("out", "old1")).size == 3, "an entry it holds: listed again"


@pytest.mark.trio
async def test_a_directory_this_node_fills_answers_new_names_from_its_listing(ns_store, clock):
    """The kernel's lookup before each create, in a directory this node added an entry to
    within --dir-ttl: answered by its listing, expired or not, for FILL_TRUST x --dir-ttl after
    the LIST, without asking. Another node's name made meanwhile is not seen by lookups for that
    long; `find_now` (a create with O_EXCL or without O_TRUNC) still asks the backend."""
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=1.0)
    listed = clock.now
    await ns.list_dir("d")
    await ns.stat("d")  # the kernel's lookup of the directory
    clock.now += 0.5
    ns.put_entry(ObjectInfo("d/mine0", "file", 4, 0.0, "etag:0"))  # an upload of this node landed
    ns_store.add("d/theirs", b"another node's")
    calls = dict(ns_store.calls)
    trust = namespace_mod.FILL_TRUST * 1.0
    for i in range(1, 20):
        clock.now += 0.4  # past --dir-ttl after the third; each create within --dir-ttl of the last
        ns.creating(f"d/mine{i}")
        with pytest.raises(ObjectNotFound):
            await ns.lookup("d", f"mine{i}")
        assert clock.now - listed < trust
    with pytest.raises(ObjectNotFound):
        await ns.lookup("d", "theirs")
    assert ns_store.calls == calls, "nothing asked while filling"
    assert (await ns.stat("d")).kind == "dir" and ns_store.calls == calls, "nor the directory's attributes"
    assert (await ns.find_now("d", "theirs")).size == 14, "a create that must not replace it asks"
    assert ns_store.calls["stat"] == calls["stat"] + 1
    assert await ns.find_now("d", "mine3") is None
    clock.now = listed + trust  # the listing is too old to answer for names it lacks
    ns.creating("d/mine20")
    with pytest.raises(ObjectNotFound):
        await ns.lookup("d", "mine20")
    assert ns_store.calls["stat"] == calls["stat"] + 3, "checked alone again"


@pytest.mark.trio
async def test_a_directory_this_node_stopped_filling_checks_new_names_again(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=1.0)
    await ns.list_dir("d")
    ns.put_entry(ObjectInfo("d/mine", "file", 4, 0.0, "etag:0"))
    clock.now += namespace_mod.FILL_TRUST * 1.0 - 1.0
    await ns.list_dir("d")
    ns_store.add("d/theirs", b"another node's")
    clock.now += 1.5  # nothing added for FILL_TRUST x --dir-ttl: not filling; the listing expired
    assert (await ns.lookup("d", "theirs")).size == 14
    assert ns_store.calls["stat"] == 1


@pytest.mark.trio
async def test_a_new_name_while_the_backend_is_down_is_answered_by_the_stale_listing(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=1.0)
    await ns.list_dir("d")
    clock.now += 5
    ns_store.fail_next = 100
    ns_store.error = lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    with pytest.raises(ObjectNotFound):
        await ns.lookup("d", "new")
    assert (await ns.lookup("d", "a")).size == 3


@pytest.mark.trio
async def test_a_directory_this_node_made_is_known_empty(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=1.0)
    ns.made_dir(ObjectInfo("made", "dir", 0, 0.0, "dir"))
    for i in range(3):
        with pytest.raises(ObjectNotFound):
            await ns.lookup("made", f"f{i}")
    assert (await ns.lookup("", "made")).kind == "dir"
    assert ns_store.calls == {}


@pytest.mark.trio
async def test_concurrent_revalidations_share_one_list(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=1.0)
    await ns.list_dir("d")
    clock.now += 2.0
    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "a", "b", "sub"):
            nursery.start_soon(ns.stat, f"d/{name}")
    assert ns_store.calls["list"] == 2


@pytest.mark.trio
async def test_lookup_without_listing_stats_the_child(ns_store, clock):
    ns = namespace(ns_store, clock)
    assert (await ns.lookup("", "top")).size == 1
    assert (await ns.lookup("", "top")).size == 1
    assert ns_store.calls == {"stat": 1}, "the attributes are cached for attr_ttl"
    with pytest.raises(ObjectNotFound):
        await ns.lookup("d", "nope")


@pytest.mark.trio
async def test_invalidate_forgets_the_object_and_its_parent_listing(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=100.0, dir_ttl=100.0)
    await ns.list_dir("d")
    await ns.stat("d/a")
    assert ns_store.calls == {"list": 1}
    ns_store.add("d/a", b"changed!")
    ns_store.remove("d/b")

    ns.invalidate("d/a")
    assert (await ns.stat("d/a")).size == 8
    assert ns_store.calls["stat"] == 1
    assert [i.name for i in await ns.list_dir("d")] == ["a", "sub"]
    assert ns_store.calls["list"] == 2

    await ns.list_dir("d/sub")
    ns.invalidate("d/sub")  # a directory: its own listing goes too
    await ns.list_dir("d/sub")
    assert ns_store.calls["list"] == 4


@pytest.mark.trio
async def test_stale_metadata_is_served_while_the_backend_is_down(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=1.0)
    assert (await ns.stat("top")).size == 1
    assert len(await ns.list_dir("d")) == 3
    clock.now += 10
    ns_store.fail_next = 100
    ns_store.error = lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert (await ns.stat("top")).size == 1
    assert [i.name for i in await ns.list_dir("d")] == ["a", "b", "sub"]
    with pytest.raises(BackendUnavailable):
        await ns.stat("d/sub/c")  # never seen: nothing to serve


@pytest.mark.trio
async def test_not_found_is_not_papered_over_with_stale_attributes(ns_store, clock):
    ns = namespace(ns_store, clock, attr_ttl=1.0)
    await ns.stat("top")
    ns_store.remove("top")
    clock.now += 1.0
    with pytest.raises(ObjectNotFound):
        await ns.stat("top")
    with pytest.raises(ObjectNotFound):
        await ns.stat("top")
    assert ns_store.calls["stat"] == 3, "a miss is not cached"


@pytest.mark.trio
async def test_opening_a_second_entry_lists_the_directory(ns_store, clock):
    """Small-file datasets: after two different entries of one directory, a LIST
    answers every other entry, instead of a HEAD per file."""
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=1.0)
    await ns.stat("d/a")
    assert ns_store.calls == {"stat": 1}
    await ns.stat("d/b")
    assert ns_store.calls == {"stat": 1, "list": 1}
    await ns.stat("d/sub")
    with pytest.raises(ObjectNotFound):
        await ns.stat("d/nope")
    assert ns_store.calls == {"stat": 1, "list": 1}


# -- the bounded metadata cache ------------------------------------------------------


def test_bounded_lru_evicts_least_recently_used_by_weight():
    lru: BoundedLru[str, int] = BoundedLru(5)
    lru.put("a", 1)
    lru.put("b", 2, weight=2)
    lru.put("c", 3, weight=2)
    assert lru.entries == 5 and len(lru) == 3
    assert lru.get("a") == 1  # now the most recently used
    lru.put("d", 4)
    assert "b" not in lru, "the least recently used went first"
    assert lru.entries == 4 and lru.get("a") == 1 and lru.get("c") == 3
    assert "d" in lru
    lru.put("c", 30, weight=1)  # replacing an entry re-weighs it
    assert lru.entries == 3 and lru.get("c") == 30
    assert lru.pop("c") == 30 and lru.pop("c") is None
    assert lru.entries == 2


def test_bounded_lru_keeps_one_oversized_value_alone():
    lru: BoundedLru[str, str] = BoundedLru(10)
    lru.put("small", "s")
    lru.put("huge", "h", weight=50)
    assert len(lru) == 1 and lru.get("huge") == "h" and lru.entries == 50
    lru.put("small", "s")
    assert "huge" not in lru and lru.entries == 1


def test_bounded_lru_refuses_a_bound_below_one():
    with pytest.raises(ValueError):
        BoundedLru(0)


@pytest.fixture
def wide_store():
    """20 directories of 9 files each."""
    s = FakeStore()
    for d in range(20):
        for f in range(9):
            s.add(f"d{d:02}/f{f}", b"x" * f)
    yield s
    s.release()


@pytest.mark.trio
async def test_listings_stay_within_the_entry_bound(wide_store, clock):
    ns = namespace(wide_store, clock, attr_ttl=100.0, dir_ttl=100.0, max_entries=35)
    for d in range(20):
        assert len(await ns.list_dir(f"d{d:02}")) == 9
        assert ns._cache.entries <= 35
    assert len(ns._cache) == 3, "three listings of 1 + 9 entries fit in 35"
    assert sample("cachefs_meta_cache_entries") == ns._cache.entries == 30
    # The three most recent listings answer lookups; an evicted one is listed again.
    assert wide_store.calls["list"] == 20
    assert (await ns.lookup("d19", "f3")).size == 3
    assert wide_store.calls["list"] == 20
    assert (await ns.lookup("d00", "f3")).size == 3
    assert (await ns.lookup("d00", "f4")).size == 4
    assert wide_store.calls == {"list": 21, "stat": 1}, "evicted: as if never listed, one HEAD then one LIST"
    assert (await ns.lookup("d00", "f5")).size == 5
    assert wide_store.calls == {"list": 21, "stat": 1}


@pytest.mark.trio
async def test_attributes_stay_within_the_entry_bound(wide_store, clock):
    ns = namespace(wide_store, clock, attr_ttl=100.0, dir_ttl=100.0, max_entries=10)
    for d in range(20):
        await ns.stat(f"d{d:02}/f1")  # the first entry of each: a HEAD, no LIST
    assert wide_store.calls == {"stat": 20}
    assert ns._cache.entries == 10
    await ns.stat("d19/f1")
    assert wide_store.calls == {"stat": 20}, "recent: still cached"
    await ns.stat("d00")  # evicted long ago, and a first entry of the root
    assert wide_store.calls == {"stat": 21}


@pytest.mark.trio
async def test_recently_used_entries_survive_eviction(wide_store, clock):
    ns = namespace(wide_store, clock, attr_ttl=100.0, dir_ttl=100.0, max_entries=25)
    await ns.list_dir("d00")
    for d in range(1, 20):
        await ns.lookup("d00", "f0")  # keeps d00 the most recently used
        await ns.list_dir(f"d{d:02}")
    assert wide_store.calls["list"] == 20
    assert (await ns.lookup("d00", "f8")).size == 8
    assert wide_store.calls["list"] == 20, "d00 was used all along: never evicted"


@pytest.mark.trio
async def test_ttls_hold_within_the_bound(wide_store, clock):
    ns = namespace(wide_store, clock, attr_ttl=1.0, dir_ttl=5.0, max_entries=50)
    await ns.list_dir("d00")
    clock.now += 4.9
    await ns.list_dir("d00")
    assert wide_store.calls["list"] == 1
    clock.now += 0.1
    await ns.list_dir("d00")
    assert wide_store.calls["list"] == 2, "at the dir TTL: listed again"


@pytest.mark.trio
async def test_only_what_is_still_cached_is_served_stale(wide_store, clock):
    ns = namespace(wide_store, clock, attr_ttl=1.0, dir_ttl=1.0, max_entries=20)
    await ns.list_dir("d00")
    await ns.list_dir("d01")  # 2 × 10 entries: both fit
    await ns.list_dir("d02")  # evicts d00
    clock.now += 10
    wide_store.fail_next = 100
    wide_store.error = lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert len(await ns.list_dir("d02")) == 9, "still cached: served stale"
    assert (await ns.stat("d01/f2")).size == 2
    with pytest.raises(BackendUnavailable):
        await ns.list_dir("d00")  # evicted: nothing to serve


@pytest.mark.trio
async def test_first_child_hints_are_bounded(wide_store, clock, monkeypatch):
    monkeypatch.setattr(namespace_mod, "FIRST_CHILD_DIRS", 4)
    ns = namespace(wide_store, clock)
    for d in range(20):
        await ns.stat(f"d{d:02}/f0")
    assert len(ns._first_child) == 4
    await ns.stat("d19/f1")  # a second entry of a recent directory: one LIST
    assert wide_store.calls == {"stat": 20, "list": 1}
    assert "d19" not in ns._first_child


@pytest.mark.trio
async def test_single_flight_holds_when_listings_evict_each_other(wide_store, clock):
    """Waiters of a LIST whose result another listing evicted before they woke
    list again, once between them, and never fail."""
    ns = namespace(wide_store, clock, attr_ttl=100.0, dir_ttl=100.0, max_entries=10)
    results = []

    async def list_it(path):
        results.append((path, len(await ns.list_dir(path))))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(list_it, "d00")
            nursery.start_soon(list_it, "d01")
    assert sorted(results) == [("d00", 9)] * 4 + [("d01", 9)] * 4
    assert 2 <= wide_store.calls["list"] <= 4, "at most one LIST per directory at a time, and one retry each"


@pytest.mark.trio
async def test_a_listing_used_for_new_names_is_listed_again_before_it_expires(ns_store, clock):
    """A writer creating one file after another: once half of --dir-ttl has passed, a
    lookup of a new name lists the directory again in the background, so the next
    ones never find the listing expired (and its age counts from the LIST's start)."""
    async with trio.open_nursery() as nursery:
        backend = Backend(ns_store, concurrency=4, timeout=5.0, retries=0, clock=clock)
        ns = Namespace(backend, attr_ttl=1.0, dir_ttl=1.0, clock=clock, nursery=nursery)
        await ns.list_dir("d")
        for i in range(10):
            clock.now += 0.3
            with pytest.raises(ObjectNotFound):
                await ns.lookup("d", f"new{i}")
            await trio.testing.wait_all_tasks_blocked()  # a LIST it started is in flight now
            await _until(lambda: "d" not in ns._listing)
        assert ns_store.calls.get("stat", 0) == 0, "no name was checked alone: the listing never expired"
        assert 4 <= ns_store.calls["list"] <= 6
        with pytest.raises(ObjectNotFound):
            await ns.lookup("d", "nope")  # a fresh listing, in its first half: nothing more
        assert (await ns.lookup("d", "a")).size == 3
        assert 4 <= ns_store.calls["list"] <= 6 and ns_store.calls.get("stat", 0) == 0


@pytest.mark.trio
async def test_an_object_store_directory_listed_recently_needs_no_head(ns_store, clock):
    """The kernel asks a directory's attributes every --attr-ttl while files are created
    in it; an object store's directory attributes are made up, and a fresh listing of it
    shows it is still there."""
    ns = namespace(ns_store, clock, attr_ttl=1.0, dir_ttl=5.0)
    assert (await ns.stat("d")).kind == "dir"
    await ns.list_dir("d")
    assert ns_store.calls == {"stat": 1, "list": 1}
    clock.now += 2.0  # the attributes expired, the listing did not
    assert (await ns.stat("d")).kind == "dir"
    assert ns_store.calls == {"stat": 1, "list": 1}
    clock.now += 3.0  # both expired
    assert (await ns.stat("d")).kind == "dir"
    assert ns_store.calls == {"stat": 2, "list": 1}


# -- the S3 fast path's presigned URLs ------------------------------------------------


def _signing_at_a_fixed_time(monkeypatch, endpoint, token):
    """A fast path with example credentials (and `token`), botocore's clock set to the
    same fixed time as ours, and a key with every character SigV4 escapes: (fast, now, key)."""
    import datetime

    import botocore.auth

    from cachefs.backend import S3FastPath

    fast = S3FastPath(endpoint, ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"), 5.0)
    if token is not None:
        fast.signer._credentials.token = token
    now = datetime.datetime(2026, 11, 28, 3, 4, 5)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: now)
    return fast, now, "t-1/d/é-ü 日本+plus%per~tilde&amp'quote"


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://s3.example.com:443", None])
@pytest.mark.parametrize("token", [None, "session/token+="])
def test_presigned_urls_are_botocores(monkeypatch, endpoint, token):
    """Signed without botocore's machinery, the same URL to the character (so the same
    signature) as botocore's generate_presigned_url, for every request of the fast path."""
    fast, now, key = _signing_at_a_fixed_time(monkeypatch, endpoint, token)
    cases = [
        ("get_object", {"Bucket": "bucket", "Key": key}, "GET"),
        ("head_object", {"Bucket": "bucket", "Key": key}, "HEAD"),
        ("put_object", {"Bucket": "bucket", "Key": key}, "PUT"),
        ("upload_part", {"Bucket": "bucket", "Key": key, "UploadId": "a+b/c==", "PartNumber": 7}, "PUT"),
        ("list_objects_v2", {"Bucket": "bucket", "Prefix": "t-1/d é/", "Delimiter": "/", "EncodingType": "url"}, "GET"),
        ("list_objects_v2", {"Bucket": "bucket", "Prefix": "p/", "Delimiter": "/", "MaxKeys": 1, "EncodingType": "url",
                             "ContinuationToken": "tok+en/=="}, "GET"),
    ]
    for operation, params, method in cases:
        ours = fast.signer._fast(operation, params, method, now)
        assert ours is not None, operation
        scheme, netloc, target = ours
        theirs = urllib.parse.urlsplit(fast.client.generate_presigned_url(operation, Params=params, ExpiresIn=900))
        assert (scheme, netloc) == (theirs.scheme, theirs.netloc), operation
        path, _, query = target.partition("?")
        assert path == theirs.path, operation
        assert sorted(query.split("&")) == sorted(theirs.query.split("&")), operation
    fast.close()


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://s3.example.com:443", None])
@pytest.mark.parametrize("token", [None, "session/token+="])
def test_signed_puts_are_botocores(monkeypatch, endpoint, token):
    """A PUT signed over its body's SHA-256 carries the same Authorization header (so
    the same signature) as botocore's SigV4 signing of that request with its payload signed."""
    import botocore.auth
    import botocore.awsrequest

    fast, now, key = _signing_at_a_fixed_time(monkeypatch, endpoint, token)
    body = bytearray(b"part bytes " * 1000)
    for operation, params in [
        ("put_object", {"Bucket": "bucket", "Key": key}),
        ("upload_part", {"Bucket": "bucket", "Key": key, "UploadId": "a+b/c==", "PartNumber": 7}),
    ]:
        scheme, netloc, target, headers = fast.signer.sign(operation, params, "PUT", memoryview(body), now)
        request = botocore.awsrequest.AWSRequest("PUT", f"{scheme}://{netloc}{target}", data=bytes(body))
        signer = botocore.auth.S3SigV4Auth(fast.signer._credentials, "s3", fast.signer.region)
        signer._should_sha256_sign_payload = lambda request: True  # as botocore does over HTTP
        signer.add_auth(request)
        assert headers["x-amz-content-sha256"] == request.headers["X-Amz-Content-SHA256"], operation
        assert headers["Authorization"] == request.headers["Authorization"], operation
    fast.close()


def test_a_put_whose_answer_stalls_leaves_no_broken_connection_for_the_next():
    """A PUT's answer whose body never came (the read timed out): its connection is closed,
    not kept with the answer unread, where the next request on it failed at once."""
    import socket

    from cachefs.backend import S3FastPath

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    answered = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                buf = b""
                try:
                    while True:
                        while b"\r\n\r\n" not in buf:
                            data = conn.recv(65536)
                            if not data:
                                raise ConnectionError
                            buf += data
                        head, _, buf = buf.partition(b"\r\n\r\n")
                        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                          if line.lower().startswith(b"content-length")))
                        while len(buf) < length:
                            buf += conn.recv(65536)
                        buf = buf[length:]
                        answered.append(head.split(b" ")[1])
                        if len(answered) == 1:  # a body promised, never sent
                            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                        else:
                            conn.sendall(b'HTTP/1.1 200 OK\r\nETag: "e"\r\nContent-Length: 0\r\n\r\n')
                except (ConnectionError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fast = S3FastPath(f"http://127.0.0.1:{port}", ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"), 0.3)
    try:
        with pytest.raises(TimeoutError):
            fast.put("bucket", "a", b"first", {})
        assert fast.put("bucket", "b", b"second", {})["etag"] == '"e"'
        assert [target.rsplit(b"/", 1)[1] for target in answered] == [b"a", b"b"]
    finally:
        fast.close()
        listener.close()


@pytest.mark.trio
async def test_a_head_answered_after_this_nodes_upload_does_not_bring_back_the_old_version():
    """A stat of f sends a HEAD; before its answer comes, this node writes f and closes it:
    the upload lands and the mount records the new version (`Namespace.put_entry`, from
    `Node._uploaded`). The HEAD, served by the backend before the PUT, then answers with the
    old version: it must not replace the one this node knows it wrote."""
    old = ObjectInfo("f", "file", 5, 1000.0, "etag:old")
    new = ObjectInfo("f", "file", 7, 1001.0, "etag:new")
    asked, answer = trio.Event(), trio.Event()

    class SlowHead:
        store = object()  # not a LocalStore

        async def stat(self, path):
            asked.set()
            await answer.wait()
            return old  # what the backend held when it served the HEAD

    ns = Namespace(SlowHead(), attr_ttl=60.0, dir_ttl=60.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ns.stat, "f")
        await asked.wait()  # the HEAD is on its way
        ns.put_entry(new)  # this node's upload of f landed meanwhile
        assert await ns.stat("f") == new
        answer.set()
    assert await ns.stat("f") == new, "the HEAD's late answer replaced this node's own write"


@pytest.mark.trio
async def test_a_stat_of_a_rename_target_on_its_way_during_the_rename_does_not_say_it_is_gone():
    """`mv tmp final` while a HEAD of final is on its way: the rename overtakes it, and it
    asks again; it said final was gone (ENOENT for a file there at every instant), when
    the rename told the namespace final was dropped (helper-49's review, its test)."""
    """`mv tmp final` over an existing `final` (atomic on a local or NAS directory: `final`
    exists at every instant). Another process stats `final` meanwhile; its HEAD is on its
    way when the rename ends. `Operations.rename` then calls `drop_entry(new)` (to forget
    what it knew of `final`), which now also `_overtake`s the HEAD as if this node had
    REMOVED `final`: the stat says ENOENT, for a file that never went away."""
    from cachefs.errors import ObjectNotFound
    from cachefs.namespace import Namespace
    from cachefs.objects import ObjectInfo

    stored = {"final": ObjectInfo("final", "file", 3, 1000.0, "etag:old"),
              "tmp": ObjectInfo("tmp", "file", 5, 1001.0, "etag:new")}
    asked, answer = trio.Event(), trio.Event()

    class Backend:
        store = object()  # not a LocalStore

        async def stat(self, path):
            found = stored.get(path)
            asked.set()
            await answer.wait()
            if found is None:
                raise ObjectNotFound(path)
            return found

    namespace = Namespace(Backend(), attr_ttl=60.0, dir_ttl=60.0)
    seen = {}

    async def stat_final():
        try:
            seen["final"] = await namespace.stat("final")
        except ObjectNotFound as e:
            seen["final"] = e

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stat_final)
        await asked.wait()  # the HEAD of final is on its way (it finds the old final)
        # The rename, in the backend, then as Operations.rename tells the namespace:
        stored["final"] = ObjectInfo("final", "file", 5, 1001.0, "etag:new")
        del stored["tmp"]
        namespace.drop_entry("tmp")
        namespace.replaced("final")
        answer.set()
    assert isinstance(seen["final"], ObjectInfo), f"stat of final during `mv tmp final`: {seen['final']!r}"
    assert seen["final"].version == "etag:new"


@pytest.mark.trio
async def test_a_stat_of_a_file_replaced_by_renames_more_often_than_a_head_takes_still_answers(autojump_clock):
    """A job publishes `status.json` with `mv tmp status.json` every 0.5 s (through this
    node); the backend is slow, a HEAD takes 1 s (queued behind other requests). `stat
    status.json` on this node: each rename overtakes the HEAD on its way (`replaced`:
    _ASK_AGAIN), and `_ask` sends another, without bound. The stat should answer (with
    either version) within a few HEADs; it never does while the renames go on, and every
    lap costs the backend one more HEAD. It now answers after ASKS_WHEN_REPLACED HEADs
    (helper-50's review, its test)."""
    from cachefs.namespace import Namespace
    from cachefs.objects import ObjectInfo

    version = 0
    heads = 0

    class Backend:
        store = object()  # not a LocalStore

        async def stat(self, path):
            nonlocal heads
            heads += 1
            await trio.sleep(1.0)
            return ObjectInfo(path, "file", 10, 1000.0 + version, f"etag:{version}")

    namespace = Namespace(Backend(), attr_ttl=60.0, dir_ttl=60.0)
    answered = None

    async def publisher():
        nonlocal version
        while True:
            await trio.sleep(0.5)
            version += 1  # the backend's rename of tmp over status.json, then:
            namespace.drop_entry("tmp")
            namespace.replaced("status.json")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        with trio.move_on_after(60):
            answered = await namespace.stat("status.json")
        nursery.cancel_scope.cancel()
    assert answered is not None, f"stat of status.json still unanswered after 60 s and {heads} HEADs"


@pytest.mark.parametrize("asking", ["stat", "refresh"])
@pytest.mark.trio
async def test_an_answer_overtaken_by_renames_does_not_keep_the_version_the_last_rename_replaced(autojump_clock, asking):
    """A job publishes `status.json` with `mv tmp status.json` through this node, three
    times, 1 s apart, then stops; the backend is slow (a HEAD reads the object half-way
    through its 1 s). A `stat` (or a `refresh`) of status.json meanwhile: each rename
    overtakes the HEAD on its way, and the third HEAD, overtaken too, is the last `_ask`
    sends (ASKS_WHEN_REPLACED): it answers with the object the last rename replaced. That
    answer was cached as fresh, by `stat` (helper-51's review) and then again by `refresh`
    (helper-52's): for --attr-ttl this node showed the version before its own last rename."""
    from cachefs.namespace import Namespace
    from cachefs.objects import ObjectInfo

    version = 0

    class Backend:
        store = object()  # not a LocalStore

        async def stat(self, path):
            await trio.sleep(0.5)
            seen = version  # what the server has when the HEAD reaches it
            await trio.sleep(0.5)
            return ObjectInfo(path, "file", 10 + seen, 1000.0 + seen, f"etag:{seen}")

    namespace = Namespace(Backend(), attr_ttl=60.0, dir_ttl=60.0, clock=trio.current_time)
    if asking == "refresh":
        assert (await namespace.stat("status.json")).version == "etag:0"

    async def publisher():
        nonlocal version
        await trio.sleep(0.75)
        for _ in range(3):
            version += 1  # the backend's rename of tmp over status.json, then:
            namespace.drop_entry("tmp")
            namespace.replaced("status.json")
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher)
        if asking == "stat":
            await namespace.stat("status.json")
        else:
            await namespace.refresh("status.json")
    # The renames are over; the backend has had version 3 since t=2.75.
    later = await namespace.stat("status.json")
    assert later.version == "etag:3", f"stat after the last `mv tmp status.json` on this node: {later.version}"
