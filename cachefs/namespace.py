"""Metadata: the source's tree as the mount sees it, cached with TTLs.

An object's attributes are trusted for --attr-ttl seconds and a directory's
listing for --dir-ttl; a fresh listing also answers lookups and attributes of
its children, so `ls -l` or opening many small files costs one LIST, not one
HEAD per file. When the backend fails, what we already know is served stale
rather than failing: cached data must stay readable while the backend is down.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import trio

from cachefs.backend import Backend
from cachefs.objects import ObjectInfo, join
from cachefs.errors import BackendError, ObjectNotFound

log = logging.getLogger(__name__)


class Namespace:
    """Every method that may ask the backend checkpoints and raises `BackendError`s."""

    def __init__(self, backend: Backend, attr_ttl: float, dir_ttl: float, clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.attr_ttl = attr_ttl
        self.dir_ttl = dir_ttl
        self._clock = clock
        self._attrs: dict[str, tuple[ObjectInfo, float]] = {}
        self._dirs: dict[str, tuple[dict[str, ObjectInfo], float]] = {}
        self._listing: dict[str, trio.Event] = {}  # single-flight of LIST per directory
        self._first_child: dict[str, str] = {}  # directory not listed yet -> the one child stat'ed

    def _fresh(self, fetched_at: float, ttl: float) -> bool:
        return self._clock() - fetched_at < ttl

    async def stat(self, path: str, max_age: float | None = None) -> ObjectInfo:
        """Attributes of `path`, at most `max_age` (default --attr-ttl) seconds old."""
        ttl = self.attr_ttl if max_age is None else max_age
        cached = self._attrs.get(path)
        if cached is not None and self._fresh(cached[1], ttl):
            return cached[0]
        parent, _, name = path.rpartition("/")
        if path and (parent in self._dirs or self._first_child.setdefault(parent, name) != name):
            # A directory we listed before, or a second entry of one directory
            # being opened: one LIST answers (and later revalidates) all its
            # entries, where a HEAD per file costs thousands of requests for a
            # dataset of small files.
            self._first_child.pop(parent, None)
            children = await self._children(parent, ttl)
            if name not in children:
                self._attrs.pop(path, None)
                raise ObjectNotFound(f"{path}: not found")
            return children[name]
        try:
            info = await self.backend.stat(path)
        except ObjectNotFound:
            self._attrs.pop(path, None)
            raise
        except BackendError as e:
            if cached is None:
                raise
            # Backend down: keep serving what we know, so cached data stays readable.
            log.info("serving stale attributes of %s: %s", path or "/", e)
            return cached[0]
        self._attrs[path] = (info, self._clock())
        return info

    async def lookup(self, parent: str, name: str) -> ObjectInfo:
        """The child `name` of directory `parent`.

        Raises:
            ObjectNotFound: no such entry.
        """
        listing = self._dirs.get(parent)
        if listing is not None and self._fresh(listing[1], self.dir_ttl):
            child = listing[0].get(name)
            if child is None:
                raise ObjectNotFound(f"{join(parent, name)}: not found")
            return child
        return await self.stat(join(parent, name))

    async def list_dir(self, path: str) -> list[ObjectInfo]:
        """The children of `path`, sorted by name, at most --dir-ttl seconds old."""
        children = await self._children(path, self.dir_ttl)
        return sorted(children.values(), key=lambda e: e.name)

    async def _children(self, path: str, max_age: float) -> dict[str, ObjectInfo]:
        cached = self._dirs.get(path)
        if cached is not None and self._fresh(cached[1], max_age):
            return cached[0]
        while (listing := self._listing.get(path)) is not None:
            await listing.wait()  # one LIST per directory at a time: take its result
            cached = self._dirs.get(path)
            if cached is not None:
                return cached[0]
        self._listing[path] = trio.Event()
        try:
            try:
                entries = await self.backend.list_dir(path)
            except BackendError as e:
                if cached is None or isinstance(e, ObjectNotFound):
                    raise
                log.info("serving a stale listing of %s: %s", path or "/", e)
                return cached[0]
            now = self._clock()
            children = {e.name: e for e in entries}
            self._dirs[path] = (children, now)
            for e in entries:
                self._attrs[e.path] = (e, now)
            return children
        finally:
            self._listing.pop(path).set()

    def invalidate(self, path: str) -> None:
        """Forget what we know of `path`, e.g. after the backend said it changed."""
        self._attrs.pop(path, None)
        parent = path.rpartition("/")[0]
        self._dirs.pop(parent, None)
        self._dirs.pop(path, None)
