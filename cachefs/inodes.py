"""Inode numbers: stable while the kernel holds them, forgotten when it forgets them.

pyfuse3 `examples/passthroughfs.py` and `rst/general.rst`: every entry handed to
the kernel (a `lookup` reply, an entry `readdir_reply` accepted) adds one to the
inode's lookup count, and `forget(inode, n)` takes n off. At zero, and with no
file handle open on it, the kernel no longer knows the inode, so it is dropped:
the table is bounded by what the kernel holds (its dentry and inode caches), not
by every path ever seen. A path looked up again after that gets a new number.
Numbers come from a counter and are never reused, so a late request for a
forgotten inode can never reach another file.
"""

from __future__ import annotations

ROOT_INODE = 1  # pyfuse3.ROOT_INODE; kept here so only fuse_ops imports pyfuse3


class InodeTable:
    """path <-> inode, with the kernel's lookup count and our open count per inode.

    No method checkpoints: callers allocate and count in one step, so no
    `forget` can run in between.
    """

    def __init__(self) -> None:
        self._paths: dict[int, str] = {ROOT_INODE: ""}
        self._inodes: dict[str, int] = {"": ROOT_INODE}
        self._lookups: dict[int, int] = {}
        self._opens: dict[int, int] = {}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        """Inodes held, the root included: the `cachefs_inodes` gauge."""
        return len(self._paths)

    def lookup(self, path: str) -> int:
        """The inode of `path`, allocated if the kernel does not hold one, with its
        lookup count raised by one: call it exactly when the kernel gets the entry."""
        ino = self._inodes.get(path)
        if ino is None:
            ino = self._inodes[path] = self._next
            self._paths[ino] = path
            self._next += 1
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return ino

    def find(self, path: str) -> int | None:
        """The inode the kernel holds for `path`, if any (nothing is allocated or counted)."""
        return self._inodes.get(path)

    def path(self, inode: int) -> str:
        """Raises KeyError for an inode the kernel does not hold (never handed out, or forgotten)."""
        return self._paths[inode]

    def forget(self, inode: int, n: int) -> bool:
        """Take `n` off the lookup count of `inode`.

        Returns:
            True if the inode was dropped (count zero and not open): the caller
            drops what it keeps per inode too.
        """
        left = self._lookups.get(inode, 0) - n
        if left > 0:
            self._lookups[inode] = left
            return False
        self._lookups.pop(inode, None)
        return self._drop_if_unused(inode)

    def opened(self, inode: int) -> None:
        """A file handle now refers to `inode`: it stays until `closed`, whatever the lookup count."""
        self._opens[inode] = self._opens.get(inode, 0) + 1

    def closed(self, inode: int) -> bool:
        """The handle from `opened` is released. Returns True if the inode was dropped."""
        left = self._opens.get(inode, 0) - 1
        if left > 0:
            self._opens[inode] = left
            return False
        self._opens.pop(inode, None)
        return self._drop_if_unused(inode)

    def _drop_if_unused(self, inode: int) -> bool:
        if inode == ROOT_INODE or inode in self._lookups or inode in self._opens:
            return False
        path = self._paths.pop(inode, None)
        if path is None:
            return False
        if self._inodes.get(path) == inode:  # not unlinked and reused by a new file meanwhile
            del self._inodes[path]
        return True

    def unlinked(self, path: str) -> None:
        """`path` was deleted: a new file made there gets a new inode, while the kernel
        (and open handles) may still hold the old one until it forgets it."""
        self._inodes.pop(path, None)

    def renamed(self, old: str, new: str) -> None:
        """`old` (and, for a directory, everything below it) is now called `new`."""
        self.unlinked(new)  # replaced, if it was there
        prefix = old + "/"
        moved = [(p, ino) for p, ino in self._inodes.items() if p == old or p.startswith(prefix)]
        for path, ino in moved:
            del self._inodes[path]
        for path, ino in moved:
            renamed = new + path[len(old):]
            self._inodes[renamed] = ino
            self._paths[ino] = renamed

    def lookup_count(self, inode: int) -> int:
        return self._lookups.get(inode, 0)
