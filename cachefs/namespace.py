"""Metadata: the source's tree as the mount sees it, cached with TTLs.

An object's attributes are trusted for --attr-ttl seconds and a directory's
listing for --dir-ttl; a fresh listing also answers lookups and attributes of
its children, so `ls -l` or opening many small files costs one LIST, not one
HEAD per file. When the backend fails, what we already know is served stale
rather than failing: cached data must stay readable while the backend is down.

A name missing from an expired listing (the kernel's lookup before a create, a
probe for a file that is not there) is checked alone, with one `check_name` of
that name (its HEAD and directory LIST in one round trip), never by waiting for the whole directory to be listed again: a writer
creating files in a directory of thousands would otherwise wait for a LIST of
all of them once per --dir-ttl. The directory is listed again in the background
instead, while that costs the server less than checking the names it would
answer: a LIST costs in proportion to its entries (NAME_CHECK_ENTRIES of them as
much as one name check), so only a listing of at most NAME_CHECK_ENTRIES entries
per new name looked up in it per --dir-ttl. Then the names after it are answered
from memory again, and once half its --dir-ttl has passed, a lookup of a name it
lacks lists it again ahead of time, so that a writer creating one file after
another never finds it expired. A writer filling a large directory has each new
name checked alone, a constant cost per file: listing again a directory that
grows with every create cost the server more with each file (quadratic in the
files). In a directory this node is filling (it added an entry within FILL_TRUST x --dir-ttl), its
listing answers for the names it lacks for FILL_TRUST x --dir-ttl without asking at
all, and is listed again ahead of that only while the LIST costs no more than the
name checks it spares (see `lookup` for what another node's new name means then).
A listing's age counts from the start of its LIST. Names this
node itself adds or removes while a LIST of their directory is in flight are
applied to its result: the node never loses sight of its own writes because a
LIST started before them.

What we know is bounded: attributes and listings share one LRU of
--meta-cache-entries entries (one per object's attributes; one per listing plus
one per child in it), so walking a dataset of millions of files holds at most
that many. What is evicted is asked for again, like what expired.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

import trio

from cachefs import metrics
from cachefs.backend import Backend, LocalStore
from cachefs.config import DEFAULT_META_CACHE_ENTRIES
from cachefs.errors import BackendError, ObjectNotFound
from cachefs.objects import ObjectInfo, join

log = logging.getLogger(__name__)

# Directories whose first entry was stat'ed but which were not listed (yet): only
# a hint for when to list, so a small fixed bound is enough.
FIRST_CHILD_DIRS = 4096

# How long (in --dir-ttl) the listing of a directory this node is filling answers
# for the names it lacks, without asking the backend: see `Namespace.lookup`.
FILL_TRUST = 10

# Listed entries that cost the server as much as checking one name alone (a HEAD and
# a LIST of one key). Measured on the JuiceFS gateway: a LIST of 300 entries took
# 145 ms of its CPU, a name check 3 ms (HEAD 1.2, LIST of one key 1.9).
NAME_CHECK_ENTRIES = 6

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedLru(Generic[K, V]):
    """An LRU map whose values each weigh some entries, holding at most `max_entries`
    of them in total. One value heavier than that alone is still kept, alone: a huge
    directory listed over and over would cost far more than the memory.

    `get` refreshes an entry; `in` does not. No method checkpoints.
    """

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self.entries = 0  # the sum of the weights held
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, weight: int = 1) -> None:
        self.pop(key)
        self._items[key] = (value, weight)
        self.entries += weight
        while self.entries > self.max_entries and len(self._items) > 1:
            _, (_, w) = self._items.popitem(last=False)
            self.entries -= w

    def keys(self) -> list[K]:
        """The keys held, least recently used first (a copy: safe to change the map meanwhile)."""
        return list(self._items)

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.entries -= item[1]
        return item[0]


# HEADs of a path `_ask` sends while this node keeps replacing it (`replaced`).
ASKS_WHEN_REPLACED = 3
_ASK_AGAIN = object()  # `_Asking.own` of a path replaced by an object this node has no attributes of


class _Asking:
    """One HEAD of a path on its way, and what this node did to the path meanwhile."""

    __slots__ = ("overtaken", "own")

    def __init__(self) -> None:
        self.overtaken = False
        self.own: ObjectInfo | None | object = None


class Namespace:
    """Every method that may ask the backend checkpoints and raises `BackendError`s."""

    def __init__(
        self,
        backend: Backend,
        attr_ttl: float,
        dir_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = DEFAULT_META_CACHE_ENTRIES,
        nursery: trio.Nursery | None = None,
    ):
        """`nursery`: where listings are revalidated in the background; None: never."""
        self.backend = backend
        self.attr_ttl = attr_ttl
        self.dir_ttl = dir_ttl
        self._clock = clock
        # Keys ("attr", path) and ("dir", path): one LRU order, one budget.
        self._cache: BoundedLru[tuple[str, str], tuple] = BoundedLru(max_entries)
        self._listing: dict[str, trio.Event] = {}  # single-flight of LIST per directory
        # directory being listed -> its entries this node put (info), dropped (None) or replaced
        # by an object of attributes unknown (_ASK_AGAIN) meanwhile
        self._own_changes: dict[str, dict[str, ObjectInfo | None | object]] = {}
        # path being asked (a HEAD on its way) -> one `_Asking` per request
        self._asking: dict[str, list[_Asking]] = {}
        self._nursery = nursery
        # directory not listed yet -> the one child stat'ed
        self._first_child: BoundedLru[str, str] = BoundedLru(FIRST_CHILD_DIRS)
        # directory listed -> names looked up and missing from its listing since that LIST
        self._misses: BoundedLru[str, int] = BoundedLru(FIRST_CHILD_DIRS)
        # directory -> when this node last added an entry to it (created, uploaded, made)
        self._filled: BoundedLru[str, float] = BoundedLru(FIRST_CHILD_DIRS)
        metrics.META_CACHE_ENTRIES.set_function(lambda: self._cache.entries)

    # The two kinds of entry in the one LRU.
    def _attr(self, path: str) -> tuple[ObjectInfo, float] | None:
        return self._cache.get(("attr", path))

    def _set_attr(self, path: str, info: ObjectInfo, fetched_at: float) -> None:
        self._cache.put(("attr", path), (info, fetched_at))

    def _listed(self, path: str) -> tuple[dict[str, ObjectInfo], float] | None:
        return self._cache.get(("dir", path))

    def _set_listed(self, path: str, children: dict[str, ObjectInfo], fetched_at: float) -> None:
        self._cache.put(("dir", path), (children, fetched_at), 1 + len(children))

    def cached_listing(self, path: str) -> dict[str, ObjectInfo] | None:
        """The children of `path` by name as last listed, however old; None if it
        is not listed. Asks nothing."""
        cached = self._listed(path)
        return None if cached is None else cached[0]

    def _fresh(self, fetched_at: float, ttl: float) -> bool:
        return self._clock() - fetched_at < ttl

    async def stat(self, path: str, max_age: float | None = None) -> ObjectInfo:
        """Attributes of `path`, at most `max_age` (default --attr-ttl) seconds old."""
        ttl = self.attr_ttl if max_age is None else max_age
        cached = self._attr(path)
        if cached is not None and self._fresh(cached[1], ttl):
            return cached[0]
        known = self._made_up_dir(path, cached)
        if known is not None:
            return known
        parent, _, name = path.rpartition("/")
        if path and (("dir", parent) in self._cache or self._second_child(parent, name)):
            # A directory we listed before, or a second entry of one directory
            # being opened: one LIST answers (and later revalidates) all its
            # entries, where a HEAD per file costs thousands of requests for a
            # dataset of small files.
            self._first_child.pop(parent)
            children = await self._children(parent, ttl)
            if name not in children:
                self._cache.pop(("attr", path))
                raise ObjectNotFound(f"{path}: not found")
            return children[name]
        try:
            info, asked_at = await self._ask(path, self.backend.stat)
        except ObjectNotFound:
            self._cache.pop(("attr", path))
            if path:
                raise
            # The dataset's root was there when it was mounted (or it is a read-write
            # dataset's new prefix, made by its first write): an empty directory.
            info, asked_at = ObjectInfo("", "dir", 0, 0.0, "dir"), self._clock()
        except BackendError as e:
            if cached is None:
                raise
            # Backend down: keep serving what we know, so cached data stays readable.
            log.info("serving stale attributes of %s: %s", path or "/", e)
            return cached[0]
        self._set_attr(path, info, asked_at)
        return info

    def _made_up_dir(self, path: str, cached: tuple[ObjectInfo, float] | None) -> ObjectInfo | None:
        """An object store's directory listed within --dir-ttl, or one this node is filling
        (`_filling`), or the dataset's root: it is still there, and its attributes are made
        up (version "dir"), so what we knew of them still holds. No HEAD for the getattr the
        kernel sends after every create in it, or of the root every --attr-ttl.
        None otherwise (a local directory's attributes are real: they are asked again)."""
        if isinstance(self.backend.store, LocalStore):
            return None
        if not path:
            # The dataset's root: a prefix, there while the bucket is (see `stat`).
            return cached[0] if cached is not None and cached[0].version == "dir" else None
        own = self._listed(path)
        if own is None:
            return None
        if not self._fresh(own[1], self.dir_ttl) and not self._filling(path, own[1]):
            return None
        info = cached[0] if cached is not None else None
        if info is None:
            parent, _, name = path.rpartition("/")
            listed = self._listed(parent)
            info = listed[0].get(name) if listed is not None else None
        return info if info is not None and info.kind == "dir" and info.version == "dir" else None

    def _second_child(self, parent: str, name: str) -> bool:
        """Remember `name` as the first child of `parent` stat'ed; True if another came first."""
        first = self._first_child.get(parent)
        if first is None:
            self._first_child.put(parent, name)
            return False
        return first != name

    def _filling(self, parent: str, fetched_at: float) -> bool:
        """Whether `parent`, listed at `fetched_at`, is a directory this node is filling
        (it added an entry within FILL_TRUST x --dir-ttl) whose listing is young enough
        (as much) to answer for the names it lacks."""
        added = self._filled.get(parent)
        now = self._clock()
        trust = FILL_TRUST * self.dir_ttl
        return added is not None and now - added < trust and now - fetched_at < trust

    async def lookup(self, parent: str, name: str) -> ObjectInfo:
        """The child `name` of directory `parent`.

        In a directory this node is filling, a name its listing lacks is not there,
        for FILL_TRUST x --dir-ttl after the LIST, without asking: the kernel looks up
        every name before creating it, and a check of each at the backend cost a round
        trip per file and as much of the server as the PUT itself. A name another node
        makes there meanwhile is not seen here for that long; a create of it on this
        node replaces it at close (last close wins, whole), except a create that must
        not (O_EXCL, or without O_TRUNC), which asks the backend (`find_now`).

        Raises:
            ObjectNotFound: no such entry.
        """
        listing = self._listed(parent)
        if listing is not None:
            children, fetched_at = listing
            if name not in children and self._filling(parent, fetched_at):
                self._missed(parent)
                self._refill_soon(parent, len(children), fetched_at)
                raise ObjectNotFound(f"{join(parent, name)}: not found")
            if self._fresh(fetched_at, self.dir_ttl):
                child = children.get(name)
                if child is None:
                    self._missed(parent)
                    if not self._fresh(fetched_at, self.dir_ttl / 2):
                        # Before the next new name finds it expired.
                        self._list_soon(parent, len(children), fetched_at, self.dir_ttl / 2)
                    raise ObjectNotFound(f"{join(parent, name)}: not found")
                return child
            if name not in children:
                return await self._new_name(parent, name, len(children), fetched_at)
        return await self.stat(join(parent, name))

    async def find_now(self, parent: str, name: str) -> ObjectInfo | None:
        """For a create that must not replace what is there: the child `name` of `parent`
        as a listing within --dir-ttl shows it, else as the backend has it now (one
        name check, however recently this node filled the directory); None if absent.

        Raises:
            BackendError: the backend could not be asked.
        """
        listing = self._listed(parent)
        if listing is not None and self._fresh(listing[1], self.dir_ttl):
            return listing[0].get(name)
        path = join(parent, name)
        cached = self._attr(path)
        if cached is not None and self._fresh(cached[1], self.attr_ttl):
            return cached[0]
        try:
            return await self._check_name(path)
        except ObjectNotFound:
            return None

    async def _check_name(self, path: str) -> ObjectInfo:
        """The backend's answer for one name, kept as its attributes (or forgotten: gone).

        Raises:
            ObjectNotFound, BackendError: as `Backend.check_name`.
        """
        try:
            info, asked_at = await self._ask(path, self.backend.check_name)
        except ObjectNotFound:
            self._cache.pop(("attr", path))
            raise
        self._set_attr(path, info, asked_at)
        return info

    async def _ask(self, path: str, ask: Callable[[str], Awaitable[ObjectInfo]]) -> tuple[ObjectInfo, float]:
        """`await ask(path)` (a HEAD), unless this node changed `path` while it was on its
        way: then what this node made (or ObjectNotFound: removed). The answer may be of
        the object before that change (a close's upload landed meanwhile), and would
        bring the old version back as the path's current one. With the answer, the
        time it is fresh from: now, or (an answer overtaken by a replacement, given as the
        last of ASKS_WHEN_REPLACED) long ago, so that it is not kept as fresh.

        Raises:
            ObjectNotFound, BackendError: as `ask`, if this node changed nothing.
        """
        for asked in range(1, ASKS_WHEN_REPLACED + 1):
            asking = _Asking()
            self._asking.setdefault(path, []).append(asking)
            failed: BackendError | None = None
            try:
                info = await ask(path)
            except (ObjectNotFound, BackendError) as e:
                if not asking.overtaken:
                    raise
                failed = e
            finally:
                waiting = self._asking[path]
                waiting.remove(asking)  # by identity: `_Asking` has no equality of its own
                if not waiting:
                    del self._asking[path]
            if not asking.overtaken:
                return info, self._clock()
            if asking.own is _ASK_AGAIN and asked == ASKS_WHEN_REPLACED:
                # Replaced again and again (`mv tmp f` in a loop): the last answer, true
                # while it was asked, rather than no answer while the renames go on.
                if failed is not None:
                    raise failed
                return info, -math.inf
            if asking.own is _ASK_AGAIN:
                continue  # replaced by something this node did not see: the backend knows
            if asking.own is None:
                raise ObjectNotFound(f"{path}: not found")
            return asking.own, self._clock()
        raise AssertionError("unreachable")

    def _overtake(self, path: str, own: ObjectInfo | None | object) -> None:
        """This node made `path` `own` (None: removed it; _ASK_AGAIN: replaced it by an
        object of attributes unknown): the HEADs of it on their way are out of date."""
        for asking in self._asking.get(path, ()):
            asking.overtaken, asking.own = True, own

    def creating(self, path: str) -> None:
        """This node creates `path` (its upload comes at close): its directory is being filled."""
        self._filled.put(path.rpartition("/")[0], self._clock())

    def _refill_soon(self, path: str, listed: int, fetched_at: float) -> None:
        """A directory this node is filling (its listing of `listed` entries LISTed at
        `fetched_at`): once half its trust has passed, list it again in the background,
        so that it goes on answering, if that LIST costs the server no more than
        checking the names it answered since (NAME_CHECK_ENTRIES entries each). Else
        its trust runs out, and new names are checked alone again."""
        trust = FILL_TRUST * self.dir_ttl
        if self._nursery is None or path in self._listing or self._fresh(fetched_at, trust / 2):
            return
        if listed <= NAME_CHECK_ENTRIES * (self._misses.get(path) or 0):
            self._nursery.start_soon(self._revalidate, path, trust / 2)

    def _missed(self, parent: str) -> None:
        self._misses.put(parent, (self._misses.get(parent) or 0) + 1)

    async def _new_name(self, parent: str, name: str, listed: int, fetched_at: float) -> ObjectInfo:
        """`name` is not in the expired listing (of `listed` entries, LISTed at
        `fetched_at`) of `parent`: ask the backend about that one name, not for the
        whole directory again."""
        path = join(parent, name)
        cached = self._attr(path)
        if cached is not None and self._fresh(cached[1], self.attr_ttl):
            return cached[0]
        self._missed(parent)
        self._list_soon(parent, listed, fetched_at, self.dir_ttl)
        try:
            return await self._check_name(path)
        except ObjectNotFound:
            raise
        except BackendError as e:
            # Backend down: the listing we know has no such name.
            log.info("serving a stale listing of %s: %s", parent or "/", e)
            raise ObjectNotFound(f"{path}: not found") from None

    def _list_soon(self, path: str, listed: int, fetched_at: float, max_age: float) -> None:
        """List `path` (a listing of `listed` entries, LISTed at `fetched_at`) again in
        the background, if that costs the server less than the name checks it would
        save (as many as new names were looked up in it per --dir-ttl so far), and no
        LIST of it is in flight already."""
        if self._nursery is None or self.dir_ttl <= 0 or path in self._listing:
            return
        age = max(self._clock() - fetched_at, self.dir_ttl / 2)
        names_per_ttl = (self._misses.get(path) or 0) * self.dir_ttl / age
        if listed <= NAME_CHECK_ENTRIES * names_per_ttl:
            self._nursery.start_soon(self._revalidate, path, max_age)

    async def _revalidate(self, path: str, max_age: float) -> None:
        try:
            await self._children(path, max_age)
        except BackendError as e:
            log.debug("background listing of %s failed: %s", path or "/", e)

    async def list_dir(self, path: str) -> list[ObjectInfo]:
        """The children of `path`, sorted by name, at most --dir-ttl seconds old."""
        children = await self._children(path, self.dir_ttl)
        return sorted(children.values(), key=lambda e: e.name)

    async def _children(self, path: str, max_age: float) -> dict[str, ObjectInfo]:
        cached = self._listed(path)
        if cached is not None and self._fresh(cached[1], max_age):
            return cached[0]
        while (listing := self._listing.get(path)) is not None:
            await listing.wait()  # one LIST per directory at a time: take its result
            cached = self._listed(path)
            if cached is not None:
                return cached[0]
        self._listing[path] = trio.Event()
        own = self._own_changes[path] = {}
        started = self._clock()  # what the LIST shows is at least this recent: its age counts from here
        self._misses.pop(path)  # new names are counted afresh for this listing
        try:
            try:
                entries = await self.backend.list_dir(path)
            except ObjectNotFound:
                if path:
                    raise
                entries = []  # the root, emptied (or not made yet): see `stat`
            except BackendError as e:
                if cached is None:
                    raise
                log.info("serving a stale listing of %s: %s", path or "/", e)
                return cached[0]
            children = {e.name: e for e in entries}
            for name, info in own.items():  # this node's changes the LIST may have missed
                if info is None:
                    children.pop(name, None)
                elif info is not _ASK_AGAIN:
                    children[name] = info
            # The listing alone answers its children's attributes too (`stat` asks
            # it first), so they are not also cached one by one: half the memory. Not
            # one that may show an entry before a change of this node's it cannot know.
            if _ASK_AGAIN not in own.values():
                self._set_listed(path, children, started)
            return children
        finally:
            del self._own_changes[path]
            self._listing.pop(path).set()

    async def refresh(self, path: str, recursive: bool = False) -> list[tuple[ObjectInfo, ObjectInfo | None]]:
        """Ask the backend again now for what is cached of `path`: its attributes and
        listing, and with `recursive` those of everything cached below it.

        Returns:
            (what was known, what is there now or None if it is gone) for each
            entry whose version changed or that disappeared.
        Raises:
            BackendError: the backend could not be asked; what is cached stays as it was.
        """
        def under(p: str) -> bool:
            return p == path or (recursive and (not path or p.startswith(path + "/")))

        keys = [key for key in self._cache.keys() if under(key[1])]
        changed: list[tuple[ObjectInfo, ObjectInfo | None]] = []
        for kind, p in sorted(keys, key=lambda k: (k[1].count("/"), k[0] == "attr")):
            if kind == "dir":
                cached = self._cache.get(("dir", p))
                if cached is None:
                    continue  # evicted meanwhile
                try:
                    fresh = await self._children(p, max_age=0)
                except ObjectNotFound:
                    fresh = {}
                    self._cache.pop(("dir", p))
                for name, old in cached[0].items():
                    new = fresh.get(name)
                    if new is None or new.version != old.version:
                        changed.append((old, new))
            else:
                cached = self._cache.get(("attr", p))
                if cached is None:
                    continue
                try:
                    new = await self.stat(p, max_age=0)
                except ObjectNotFound:
                    new = None
                if new is None or new.version != cached[0].version:
                    changed.append((cached[0], new))
        # A child seen both in its own attributes and in a listing counts once.
        unique = list({old.path: (old, new) for old, new in changed}.values())
        now = self._clock()
        for old, new in unique:
            # `stat` asks an entry's own attributes before its parent's listing: they must agree.
            asked = self._cache.pop(("attr", old.path))
            if new is not None:
                # As fresh as `stat` kept it: an answer overtaken by this node's renames is stale.
                self._set_attr(old.path, new, asked[1] if asked is not None and asked[0] is new else now)
        return unique

    def put_entry(self, info: ObjectInfo) -> None:
        """This node changed the backend: `info` is there now (written, made, renamed to).
        Known at once, without asking, also in the parent's listing if one is cached."""
        now = self._clock()
        parent = info.path.rpartition("/")[0]
        self._overtake(info.path, info)
        self._filled.put(parent, now)
        if parent in self._own_changes:
            self._own_changes[parent][info.name] = info
        listed = self._listed(parent)
        if listed is not None:
            # A copy: an open directory's snapshot may share the dict.
            self._set_listed(parent, {**listed[0], info.name: info}, listed[1])
            self._cache.pop(("attr", info.path))
        else:
            self._set_attr(info.path, info, now)

    def drop_entry(self, path: str) -> None:
        """This node removed `path` from the backend (deleted, renamed away)."""
        self._overtake(path, None)
        self._cache.pop(("attr", path))
        self._cache.pop(("dir", path))
        parent, _, name = path.rpartition("/")
        if parent in self._own_changes:
            self._own_changes[parent][name] = None
        listed = self._listed(parent)
        if listed is not None and name in listed[0]:
            children = dict(listed[0])
            del children[name]
            self._set_listed(parent, children, listed[1])

    def replaced(self, path: str) -> None:
        """This node put an object at `path` whose attributes it does not know (the target
        of a rename, an S3 copy): what is known of `path` is forgotten, and a HEAD of it on
        its way asks again (its answer may be of the object replaced; `drop_entry` would
        have it say that nothing is there)."""
        self._overtake(path, _ASK_AGAIN)
        parent, _, name = path.rpartition("/")
        if parent in self._own_changes:
            self._own_changes[parent][name] = _ASK_AGAIN
        self.invalidate(path)

    def made_dir(self, info: ObjectInfo) -> None:
        """This node made the directory `info` where nothing was: known, and known empty."""
        self.put_entry(info)
        self._set_listed(info.path, {}, self._clock())

    def invalidate(self, path: str) -> None:
        """Forget what we know of `path`, e.g. after the backend said it changed."""
        self._cache.pop(("attr", path))
        parent = path.rpartition("/")[0]
        self._cache.pop(("dir", parent))
        self._cache.pop(("dir", path))
