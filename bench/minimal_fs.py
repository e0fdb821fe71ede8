"""The ceiling for any Python FUSE filesystem: pyfuse3 serving one file from memory.

    python -m bench.minimal_fs SOURCE_FILE MOUNTPOINT

reads SOURCE_FILE into one bytes object (which touches every page, so nothing
is faulted in while timing), mounts a read-only filesystem holding only that
file under the same name, and answers read() with memoryview slices of it: no
copy in Python, no cache lookup, no checksum. Whatever cachefs does on a hit
costs time on top of this.

It mounts the way cachefs does (cachefs/mount.py): the same options, the same
trio task limit (cachefs's config defaults), and the same bdi
read_ahead_kb once the kernel has processed INIT, so both get the same request
sizes from the kernel. Runs until unmounted or sent SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1


class OneFile(pyfuse3.Operations):
    """A root directory holding one read-only file whose bytes live in memory."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, name: bytes, data: bytes):
        super().__init__()
        self.name = name
        self.data = memoryview(data)
        self.mtime_ns = 1_700_000_000 * 10**9

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.entry_timeout = a.attr_timeout = 1.0  # cachefs's default TTLs
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = len(self.data)
            a.st_blocks = (len(self.data) + 511) // 512
        a.st_blksize = 1 << 20
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        if name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attrs(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        # The data never changes: keep the page cache across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return self.data[off:off + size]


def _set_read_ahead(real_mountpoint: str, kb: int) -> None:
    """As cachefs/mount.py `_set_kernel_read_ahead`: via mountinfo, never a stat() of our own mount."""
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real_mountpoint and " - fuse" in line:
                dev = fields[2]
    if dev is None:
        raise OSError(f"{real_mountpoint} is not in /proc/self/mountinfo")
    with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
        f.write(str(kb))


def cachefs_fuse_settings() -> tuple[int, int]:
    """(max_tasks, read_ahead_kb) as cachefs mounts with them: the defaults of the
    config dataclass in cachefs.config that has both fields (found by field name,
    so a reshuffle of the config classes does not break the ceiling)."""
    import cachefs.config

    for obj in vars(cachefs.config).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            defaults = {f.name: f.default for f in dataclasses.fields(obj)}
            if "fuse_tasks" in defaults and "kernel_read_ahead_kb" in defaults:
                return defaults["fuse_tasks"], defaults["kernel_read_ahead_kb"]
    print("minimal_fs: cachefs.config has no fuse_tasks/kernel_read_ahead_kb; using 64 and 4096",
          file=sys.stderr)
    return 64, 4096


async def serve(ops: OneFile, mountpoint: str) -> None:
    max_tasks, read_ahead_kb = cachefs_fuse_settings()
    print(f"minimal_fs: max_tasks={max_tasks} read_ahead_kb={read_ahead_kb}", flush=True)
    options = set(pyfuse3.default_options)
    options |= {"ro", "noatime", "fsname=bench-minimal", "subtype=minimalfs"}
    if os.getuid() == 0:
        options.add("allow_other")
    real_mountpoint = os.path.realpath(mountpoint)
    pyfuse3.init(ops, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:
            async def when_serving() -> None:
                # INIT resets the bdi read-ahead; a stat() that returns means it was processed.
                await trio.to_thread.run_sync(os.stat, real_mountpoint)
                _set_read_ahead(real_mountpoint, read_ahead_kb)

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(when_serving)
            nursery.start_soon(on_signals)
            await pyfuse3.main(min_tasks=4, max_tasks=max_tasks)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the file to serve (read into memory)")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    with open(args.source, "rb") as f:
        data = f.read()  # one bytes object: every page written, so prefaulted
    ops = OneFile(os.fsencode(os.path.basename(args.source)), data)
    trio.run(serve, ops, args.mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
