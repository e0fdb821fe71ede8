"""Inode numbers: stable for the life of the mount, never reused.

The kernel's lookup counts are tracked so `forget` is honoured, but a path keeps
its inode after the count drops to zero: a later lookup must give the same
number, and the table costs one small entry per path ever seen.
"""

from __future__ import annotations

ROOT_INODE = 1  # pyfuse3.ROOT_INODE; kept here so only fuse_ops imports pyfuse3


class InodeTable:
    def __init__(self) -> None:
        self._paths: dict[int, str] = {ROOT_INODE: ""}
        self._inodes: dict[str, int] = {"": ROOT_INODE}
        self._lookups: dict[int, int] = {}
        self._next = ROOT_INODE + 1

    def inode(self, path: str) -> int:
        """The inode of `path`, allocated on first sight."""
        ino = self._inodes.get(path)
        if ino is None:
            ino = self._inodes[path] = self._next
            self._paths[ino] = path
            self._next += 1
        return ino

    def path(self, inode: int) -> str:
        """Raises KeyError for an inode this mount never handed out."""
        return self._paths[inode]

    def add_lookup(self, inode: int, n: int = 1) -> None:
        self._lookups[inode] = self._lookups.get(inode, 0) + n

    def forget(self, inode: int, n: int) -> None:
        left = self._lookups.get(inode, 0) - n
        if left > 0:
            self._lookups[inode] = left
        else:
            self._lookups.pop(inode, None)

    def lookup_count(self, inode: int) -> int:
        return self._lookups.get(inode, 0)
