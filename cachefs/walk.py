"""Directory walks: a reader opening a directory's files in listing order gets the
next ones loaded before it opens them.

Tools that go through a dataset file by file (tar, cp -r, rsync, a loader over
sorted shards, `cat *.csv`) open one file after another in name order, and each
cold open waits a whole backend round trip before its first byte; small files
are all round trip. When a file opened follows, in its directory's listing, one
of the last few opened there, the first chunks of the next WALK_AHEAD files (the
whole of a small file: one GET, and no HEAD, the listing has its size and
version) are loaded as read-ahead is: only while the chunk budget has room for
read-ahead, into the reader's held chunks, where the open and reads that follow
find them.

A reader that jumps elsewhere in the directory starts nothing new until it walks
again; one that stops leaves at most WALK_AHEAD loads, which end on their own
and are the first chunks given up when memory is short. Only a directory whose
listing is cached is walked: nothing here lists or stats. No method checkpoints.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque

from cachefs.namespace import Namespace
from cachefs.objects import ObjectId, ObjectInfo
from cachefs.reader import Reader

# Files after the one opened whose first chunk is loaded ahead.
WALK_AHEAD = 8
# An open follows a walk if one of the last this many opens in its directory was
# of one of the this many files before it: several threads walking one directory
# (each taking every n-th file) open its files a little out of order.
WALK_WINDOW = 8
# Directories whose walk is followed; the least recently opened one is forgotten.
WALKS_KEPT = 256


class _Walk:
    __slots__ = ("children", "names", "recent", "loaded_until")

    def __init__(self, children: dict[str, ObjectInfo]):
        self.children = children  # the listing the names were sorted from
        self.names = sorted(children)
        self.recent: deque[int] = deque(maxlen=WALK_WINDOW)  # positions of the last opens
        self.loaded_until = 0  # files before this position were loaded ahead (or skipped)


class DirectoryWalks:
    """The walks through one dataset's directories.

    Args:
        source: the dataset's source URL, for chunk keys.
        namespace: its metadata, whose cached listings give the order.
        reader: its reader, which loads chunks ahead (`Reader.load_ahead`).
    """

    def __init__(self, source: str, namespace: Namespace, reader: Reader):
        self.source = source
        self.namespace = namespace
        self.reader = reader
        self._walks: OrderedDict[str, _Walk] = OrderedDict()

    def opened(self, path: str) -> int:
        """`path` was opened for reading: if that goes on a walk through its
        directory, start loading the files after it.

        Returns:
            How many files' first chunks were asked for.
        """
        if not self.reader.read_ahead:
            return 0
        parent, _, name = path.rpartition("/")
        children = self.namespace.cached_listing(parent)
        if not children:
            return 0
        walk = self._walks.get(parent)
        if walk is None or walk.children is not children:
            if walk is None and len(self._walks) >= WALKS_KEPT:
                self._walks.popitem(last=False)
            walk = self._walks[parent] = _Walk(children)  # a new listing: sorted once
        self._walks.move_to_end(parent)
        names = walk.names
        here = bisect.bisect_left(names, name)
        if here == len(names) or names[here] != name:
            return 0  # created after the listing was made
        follows = any(here - WALK_WINDOW <= p < here for p in walk.recent)
        walk.recent.append(here)
        if not follows:
            return 0
        first = walk.loaded_until
        if not here < first <= here + 1 + WALK_AHEAD + WALK_WINDOW:
            first = here + 1  # a walk starting over, or one past what was loaded
        asked = 0
        for position in range(first, min(here + 1 + WALK_AHEAD, len(names))):
            info = children.get(names[position])
            if info is not None and info.kind == "file" and info.size:
                obj = ObjectId(self.source, info.path, info.version, info.size)
                if not self.reader.load_ahead(obj):
                    break  # no room: the next open tries again
                asked += 1
            walk.loaded_until = position + 1
        return asked

    def forget(self) -> None:
        self._walks.clear()
