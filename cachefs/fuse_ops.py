"""The FUSE front end: the only module that imports pyfuse3.

Turns kernel requests into namespace and reader calls, and typed errors into
errnos. Read-only for now: every modifying request gets EROFS.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import itertools
import json
import logging
import os
import stat
import time
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
import trio

from cachefs import metrics
from cachefs.objects import ObjectId, ObjectInfo
from cachefs.errors import BackendPermissionDenied, CachefsError, ObjectChanged, ObjectNotFound
from cachefs.inodes import ROOT_INODE, InodeTable
from cachefs.node import Dataset, Node
from cachefs.reader import ReadStream

log = logging.getLogger(__name__)

assert ROOT_INODE == pyfuse3.ROOT_INODE

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

NAME_MAX = 255  # bytes in one path component


def _errno_of(e: CachefsError) -> int:
    if isinstance(e, ObjectNotFound):
        return errno.ENOENT
    if isinstance(e, ObjectChanged):
        return errno.ESTALE
    if isinstance(e, BackendPermissionDenied):
        return errno.EACCES
    return errno.EIO  # unavailable, timed out, or failed after retries


def fuse_errors(fn: F) -> F:
    """Translate typed errors into FUSEError at the edge; anything else would kill the mount.

    Also times every request (`cachefs_fuse_op_seconds{op}`), errors included."""

    op = fn.__name__
    seconds = metrics.FUSE_OP_SECONDS.labels(op)  # bound once: this runs on every request

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ENOENT:
                metrics.FUSE_ERRORS.labels(op, errno.errorcode.get(e.errno, str(e.errno))).inc()
            raise
        except CachefsError as e:
            code = _errno_of(e)
            if code != errno.ENOENT:
                log.warning("%s: %s -> %s", op, e, errno.errorcode[code])
                metrics.FUSE_ERRORS.labels(op, errno.errorcode[code]).inc()
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("%s failed unexpectedly", op)
            metrics.FUSE_ERRORS.labels(op, "EIO").inc()
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            seconds.observe(time.perf_counter() - t0)

    return wrapper  # type: ignore[return-value]


@dataclasses.dataclass
class OpenFile:
    inode: int
    obj: ObjectId
    stream: ReadStream
    dataset: Dataset


# Extended attributes the mount answers (getfattr -n NAME); all read-only.
XATTR_CONTROL = b"user.cachefs.control"  # on the mount root: the node's control socket
XATTR_DATASET = b"user.cachefs.dataset"  # on anything: the dataset it belongs to
XATTR_PATH = b"user.cachefs.path"  # on anything: its path inside the mount (for the CLI)
XATTR_CACHED = b"user.cachefs.cached"  # on a file or directory: what this node's tiers hold of it (JSON)
XATTR_LOCATIONS = b"user.cachefs.locations"  # on a file: which nodes hold how many of its chunks (JSON)


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over a node's datasets: each dataset's `Namespace`
    (metadata) and `Reader` (data).

    Paths are the mount's: a dataset NAME is the directory NAME at the root, and
    the mount root lists the datasets; a node whose one dataset has no name (the
    `cachefs mount SOURCE MOUNTPOINT` form) serves it at the root itself.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, node: Node, *, entry_ttl: float, attr_ttl: float, block_size: int):
        super().__init__()
        self.node = node
        self.entry_ttl = entry_ttl
        self.attr_ttl = attr_ttl
        self.block_size = block_size
        self.inodes = InodeTable()
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, list[ObjectInfo]] = {}
        self._fh = itertools.count(1)
        # The version each inode had when last opened: the kernel keeps its page
        # cache across opens only while this is unchanged.
        self._opened_versions: dict[int, str] = {}
        self._uid = os.getuid()
        metrics.INODES.set_function(lambda: len(self.inodes))
        self._gid = os.getgid()
        # statfs: None reports a large, full filesystem; else an async function giving
        # (bytes, files) of the datasets, or None while unknown (cachefs fluid-mount).
        self.usage: Callable[[], Awaitable[tuple[int, int] | None]] | None = None

    # -- datasets ------------------------------------------------------------

    def _locate(self, path: str) -> tuple[Dataset, str]:
        """The dataset `path` lies in, and the path inside it.

        Raises:
            FUSEError(ENOENT): no dataset there (the root of a multi-dataset mount has none).
        """
        located = self.node.locate(path)
        if located is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return located

    def _lists_datasets(self, path: str) -> bool:
        """Whether `path` is the mount root of a node that serves named datasets."""
        return path == "" and "" not in self.node.datasets

    @staticmethod
    def _outer(dataset: Dataset, info: ObjectInfo) -> ObjectInfo:
        """`info` with its path as the mount sees it."""
        if not dataset.name:
            return info
        return dataclasses.replace(info, path=f"{dataset.name}/{info.path}" if info.path else dataset.name)

    async def _stat(self, path: str) -> ObjectInfo:
        if self._lists_datasets(path):
            return ObjectInfo("", "dir", 0, self.node.started, "datasets")
        dataset, inner = self._locate(path)
        return self._outer(dataset, await dataset.namespace.stat(inner))

    async def backend_changed(self, dataset: Dataset, changed: list[tuple[ObjectInfo, ObjectInfo | None]]) -> None:
        """Entries of `dataset` changed or went away in the backend: drop the kernel's
        cached pages and attributes of each, and the names of those that went away.
        Call while mounted."""
        for old, new in changed:
            path = self._outer(dataset, old).path
            inode = self.inodes.find(path)
            if inode is not None:
                self._opened_versions.pop(inode, None)  # the next open must not keep old pages
                try:
                    # Not on the trio thread: the kernel may wait for requests we must answer.
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
                except OSError:
                    pass  # the kernel had forgotten it meanwhile
            parent, _, name = path.rpartition("/")
            parent_inode = self.inodes.find(parent)
            if new is None and parent_inode is not None:
                pyfuse3.invalidate_entry_async(parent_inode, os.fsencode(name), ignore_enoent=True)

    def dataset_removed(self, dataset: Dataset) -> None:
        """Call while mounted, when `dataset` is no longer served."""
        if dataset.name:
            try:
                # Let the kernel drop its cached entry now, not after --entry-ttl.
                pyfuse3.invalidate_entry_async(ROOT_INODE, os.fsencode(dataset.name), ignore_enoent=True)
            except Exception:  # noqa: BLE001 - not mounted (yet): nothing cached to drop
                pass

    # -- attributes -------------------------------------------------------

    def _attrs(self, inode: int, info: ObjectInfo) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = self.entry_ttl
        a.attr_timeout = self.attr_ttl
        if info.kind == "dir":
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
        elif info.kind == "link":
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_nlink = 1
        else:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
        a.st_size = info.size
        a.st_blksize = self.block_size
        a.st_blocks = (info.size + 511) // 512
        ns = int(info.mtime * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        a.st_uid = self._uid
        a.st_gid = self._gid
        return a

    def _path(self, inode: int) -> str:
        try:
            return self.inodes.path(inode)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._path(parent_inode)
        name = os.fsdecode(name)
        if len(os.fsencode(name)) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if name in (".", ".."):
            info = await self._stat(parent if name == "." else parent.rpartition("/")[0])
        elif self._lists_datasets(parent):
            info = await self._stat(name)
        else:
            dataset, inner = self._locate(parent)
            info = self._outer(dataset, await dataset.namespace.lookup(inner, name))
        return self._attrs(self.inodes.lookup(info.path), info)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attrs(inode, await self._stat(self._path(inode)))

    async def forget(self, inode_list):
        # Must not raise (pyfuse3 `Operations.forget`); nothing here can.
        for inode, nlookup in inode_list:
            self._forget(inode, nlookup)

    def _forget(self, inode: int, nlookup: int) -> None:
        if self.inodes.forget(inode, nlookup):
            self._dropped(inode)

    def _dropped(self, inode: int) -> None:
        """`inode` left the table: drop everything kept per inode with it."""
        self._opened_versions.pop(inode, None)

    @fuse_errors
    async def readlink(self, inode, ctx):
        path = self._path(inode)
        info = await self._stat(path)
        if info.kind != "link" or info.link_target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        dataset, inner = self._locate(path)
        if not link_stays_inside(inner, info.link_target):
            # Shown, but never followed out of the dataset (the kernel would follow it on the host).
            raise pyfuse3.FUSEError(errno.EACCES)
        return os.fsencode(info.link_target)

    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        if name == XATTR_CONTROL and inode == ROOT_INODE and self.node.control_socket:
            return os.fsencode(self.node.control_socket)
        if name == XATTR_DATASET:
            dataset, _ = self._locate(self._path(inode))
            return os.fsencode(dataset.name)
        if name == XATTR_PATH:
            return os.fsencode(self._path(inode))
        if name in (XATTR_CACHED, XATTR_LOCATIONS):
            dataset, inner = self._locate(self._path(inode))
            info = await dataset.namespace.stat(inner)
            if name == XATTR_CACHED:
                answer = await self.node.residency(dataset, info)
            elif info.kind == "file":
                answer = await self.node.locations(dataset, info)
            else:
                raise pyfuse3.FUSEError(errno.ENODATA)
            return json.dumps(answer, separators=(",", ":")).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode, ctx):
        names = [XATTR_DATASET, XATTR_PATH, XATTR_CACHED, XATTR_LOCATIONS]
        if inode == ROOT_INODE and self.node.control_socket:
            names.append(XATTR_CONTROL)
        return names

    @fuse_errors
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.block_size
        s.f_frsize = self.block_size
        # An object store has no size; report a large, full, read-only filesystem.
        s.f_blocks = 1 << 30
        s.f_bfree = s.f_bavail = 0
        s.f_files = 1 << 30
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        usage = await self.usage() if self.usage is not None else None
        if usage is not None:
            # The datasets' total as a full filesystem: df's "used" is their bytes, exactly
            # (1-byte fragments), and the inodes in use their files.
            used, files = usage
            s.f_frsize = 1
            s.f_blocks = used
            s.f_files = files
        return s

    # -- directories --------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode, ctx):
        path = self._path(inode)
        # One snapshot per open directory: paging through it with offsets can then
        # neither repeat nor skip entries, however the backend changes meanwhile.
        if self._lists_datasets(path):
            started = self.node.started
            entries = [ObjectInfo(name, "dir", 0, started, "dataset") for name in sorted(self.node.datasets)]
        else:
            dataset, inner = self._locate(path)
            entries = [self._outer(dataset, e) for e in await dataset.namespace.list_dir(inner)]
        fh = next(self._fh)
        self._dirs[fh] = entries
        return fh

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        entries = self._dirs[fh]
        for i in range(start_id, len(entries)):
            info = entries[i]
            # readdirplus: each entry the reply takes counts as a lookup (pyfuse3
            # always asks the kernel for readdirplus); one it refuses does not.
            inode = self.inodes.lookup(info.path)
            if not pyfuse3.readdir_reply(token, os.fsencode(info.name), self._attrs(inode, info), i + 1):
                self._forget(inode, 1)
                return

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # -- files ----------------------------------------------------------------

    @fuse_errors
    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        path = self._path(inode)
        info = await self._stat(path)
        if info.kind == "dir":
            raise pyfuse3.FUSEError(errno.EISDIR)
        dataset, inner = self._locate(path)
        obj = ObjectId(dataset.source, inner, info.version, info.size)
        fh = next(self._fh)
        self._files[fh] = OpenFile(inode, obj, ReadStream(), dataset)
        dataset.open_files += 1
        self.inodes.opened(inode)
        fi = pyfuse3.FileInfo(fh=fh)
        fi.keep_cache = self._opened_versions.get(inode) == info.version
        self._opened_versions[inode] = info.version
        return fi

    @fuse_errors
    async def read(self, fh, off, size):
        f = self._files[fh]
        if f.dataset.removed:
            raise pyfuse3.FUSEError(errno.ESTALE)  # removed with --force while open
        try:
            return await f.dataset.reader.read(f.obj, off, size, f.stream)
        except ObjectChanged:
            f.dataset.namespace.invalidate(f.obj.path)
            self._opened_versions.pop(f.inode, None)
            raise

    async def release(self, fh):
        f = self._files.pop(fh, None)
        if f is None:
            return
        f.dataset.open_files -= 1
        if self.inodes.closed(f.inode):
            self._dropped(f.inode)

    # -- everything that would modify the source -------------------------------

    async def _read_only(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = create = mkdir = mknod = symlink = link = unlink = rmdir = rename = _read_only
    write = setxattr = removexattr = _read_only


def link_stays_inside(path: str, target: str) -> bool:
    """Whether symlink `path` (inside its dataset) pointing at `target` resolves inside the dataset."""
    if not target or target.startswith("/"):
        return False
    depth = path.count("/")  # directories between the dataset root and the link
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True
