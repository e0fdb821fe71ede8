"""The FUSE front end: the only module that imports pyfuse3.

Turns kernel requests into namespace, reader and write calls, and typed errors
into errnos. Read-only datasets answer every modifying request with EROFS;
read-write ones stage writes (writes.py) and upload them (upload.py); what each
operation does on S3 and its errnos are in docs/semantics.md.
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
from cachefs.objects import ObjectId, ObjectInfo, join
from cachefs.errors import (
    BackendPermissionDenied,
    BackendRefused,
    CachefsError,
    ObjectChanged,
    ObjectNotFound,
    StagingFull,
)
from cachefs.inodes import ROOT_INODE, InodeTable
from cachefs.node import Dataset, Node
from cachefs.reader import ReadStream
from cachefs.staging import StagedFile
from cachefs.writes import WriteFile

log = logging.getLogger(__name__)

assert ROOT_INODE == pyfuse3.ROOT_INODE

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

NAME_MAX = 255  # bytes in one path component


def _errno_of(e: CachefsError) -> int:
    if isinstance(e, BackendRefused):
        return e.errno
    if isinstance(e, StagingFull):
        return errno.ENOSPC
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
    obj: ObjectId | None  # None: read from `write` or `staged`
    stream: ReadStream
    dataset: Dataset
    info: ObjectInfo | None = None  # with `obj`: its attributes at open, as the mount shows them
    write: WriteFile | None = None  # the path is open for write on this node: its bytes
    writable: bool = False  # this handle was opened for write
    write_only: bool = False  # opened O_WRONLY: served without the page cache (`Operations._opened`)
    staged: tuple[StagedFile, int] | None = None  # a closed file not uploaded yet, and an fd of it


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
        config = node.config
        self._uid = os.getuid() if getattr(config, "uid", None) is None else config.uid
        metrics.INODES.set_function(lambda: len(self.inodes))
        self._gid = os.getgid() if getattr(config, "gid", None) is None else config.gid
        self._umask = getattr(config, "umask", 0o022)
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

    def _writable(self, path: str) -> tuple[Dataset, str]:
        """The read-write dataset `path` lies in, and the path inside it.

        Raises:
            FUSEError(EROFS): a read-only dataset, or the root listing the datasets.
        """
        located = self.node.locate(path)
        if located is None or located[0].config.read_only or self.node.writes is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return located

    def _is_rw(self, path: str) -> bool:
        located = self.node.locate(path)
        return located is not None and not located[0].config.read_only

    async def _stat(self, path: str) -> ObjectInfo:
        if self._lists_datasets(path):
            return ObjectInfo("", "dir", 0, self.node.started, "datasets")
        dataset, inner = self._locate(path)
        written = self.node.writes.info(dataset, inner) if self.node.writes is not None else None
        if written is not None:
            return self._outer(dataset, written)
        return self._outer(dataset, await dataset.namespace.stat(inner))

    async def _stored(self, dataset: Dataset, inner: str) -> ObjectInfo | None:
        """What the backend has at `inner` (as far as we know), or None."""
        try:
            return await dataset.namespace.stat(inner)
        except ObjectNotFound:
            return None

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
        rw = self._is_rw(info.path)
        if info.kind == "dir":
            a.st_mode = stat.S_IFDIR | (0o777 & ~self._umask if rw else 0o555)
            a.st_nlink = 2
        elif info.kind == "link":
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_nlink = 1
        else:
            a.st_mode = stat.S_IFREG | (0o666 & ~self._umask if rw else 0o444)
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
            written = self.node.writes.info(dataset, join(inner, name)) if self.node.writes is not None else None
            info = self._outer(dataset, written or await dataset.namespace.lookup(inner, name))
        return self._attrs(self.inodes.lookup(info.path), info)

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        try:
            return self._attrs(inode, await self._stat(self._path(inode)))
        except (ObjectNotFound, pyfuse3.FUSEError) as e:
            if isinstance(e, pyfuse3.FUSEError) and e.errno != errno.ENOENT:
                raise
            held = self._held_open(inode)
            if held is None:
                raise
            return self._attrs(inode, held)

    def _held_open(self, inode: int) -> ObjectInfo | None:
        """For getattr of an inode gone from the backend (or its dataset): the attributes
        of the version an open handle reads, or None if no handle holds one.

        The kernel asks getattr before a read once --attr-ttl has passed: ENOENT
        there would fail read(2) on an open file, which must get ESTALE (or the
        chunks it cached), as docs/semantics.md says.

        Raises:
            FUSEError(ESTALE): the handle's dataset was removed (--force).
        """
        for f in self._files.values():
            if f.inode != inode:
                continue
            if f.dataset.removed:
                raise pyfuse3.FUSEError(errno.ESTALE)
            if f.info is not None:
                return f.info
        return None

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
        # An object store has no size: report a large filesystem.
        s.f_blocks = 1 << 30
        # Room to write where a dataset takes writes (tools check df first), else none.
        writable = any(not d.config.read_only for d in self.node.datasets.values())
        s.f_bfree = s.f_bavail = s.f_blocks // 2 if writable else 0
        # Inodes alike: none free read a full filesystem to `df -i`, and to the usual
        # "out of inodes" alerts on node_exporter's figures, on every read-write mount.
        s.f_files = 1 << 30
        s.f_ffree = s.f_favail = s.f_files // 2 if writable else 0
        s.f_namemax = 255
        usage = await self.usage() if self.usage is not None else None
        if usage is not None:
            # The datasets' total as a full filesystem: df's "used" is their bytes, exactly
            # (1-byte fragments), and the inodes in use their files.
            used, files = usage
            s.f_frsize = 1
            s.f_blocks = used
            s.f_bfree = s.f_bavail = 0  # full even where a dataset takes writes: free would exceed the size
            s.f_files = files
            s.f_ffree = s.f_favail = 0
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
            listed = await dataset.namespace.list_dir(inner)
            if self.node.writes is not None:
                written = {e.name: e for e in self.node.writes.children(dataset, inner)}
                if written:
                    listed = sorted([e for e in listed if e.name not in written] + list(written.values()),
                                    key=lambda e: e.name)
            entries = [self._outer(dataset, e) for e in listed]
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
        path = self._path(inode)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if writing:
            self._writable(path)
        try:
            info = await self._stat(path)
        except ObjectNotFound:
            if not writing:
                raise
            # The kernel still holds a name whose file never landed (created here, and its
            # first close failed): opened for write, it starts empty, as a create would.
            info = ObjectInfo(path, "file", 0, time.time(), "new")
        if info.kind == "dir":
            raise pyfuse3.FUSEError(errno.EISDIR)
        dataset, inner = self._locate(path)
        f = OpenFile(inode, None, ReadStream(), dataset)
        writes = self.node.writes
        if writing:
            current = None if flags & os.O_TRUNC else await self._stored(dataset, inner)
            f.write = await writes.open(dataset, inner, current, truncate=bool(flags & os.O_TRUNC))
            f.writable = True
            f.write_only = flags & os.O_ACCMODE == os.O_WRONLY
        elif writes is not None and (wf := await writes.deleting(dataset, inner) or writes.find(dataset, inner)):
            f.write = wf
            wf.handles += 1  # reads see this node's writes, from the same staged file
        elif writes is not None and (staged := writes.open_pending(dataset, inner)) is not None:
            f.staged = staged
        else:
            f.obj = ObjectId(dataset.source, inner, info.version, info.size)
            f.info = info
            if dataset.walks is not None:
                dataset.walks.opened(inner)
        return self._opened(f, info.version)

    def _opened(self, f: OpenFile, version: str) -> pyfuse3.FileInfo:
        fh = next(self._fh)
        self._files[fh] = f
        f.dataset.open_files += 1
        self.inodes.opened(f.inode)
        fi = pyfuse3.FileInfo(fh=fh)
        # A write-only handle's writes skip the page cache (direct_io): through it, the kernel
        # asked getxattr("security.capability") before every write (FUSE keeps no "no
        # capabilities" state), a request per write, and copied each write into pages
        # nobody reads through that handle. It cannot be mmap'ed (mmap needs read access),
        # so nothing is lost that a handle open for read and write would need.
        fi.direct_io = f.write_only
        local = f.obj is None  # bytes of this node's writes: the kernel's pages may be older
        fi.keep_cache = not local and self._opened_versions.get(f.inode) == version
        if local:
            self._opened_versions.pop(f.inode, None)
        else:
            self._opened_versions[f.inode] = version
        return fi

    @fuse_errors
    async def read(self, fh, off, size):
        f = self._files[fh]
        if f.dataset.removed:
            raise pyfuse3.FUSEError(errno.ESTALE)  # removed with --force while open
        if f.write is not None:
            return f.write.read(off, size)
        if f.staged is not None:
            return os.pread(f.staged[1], size, off)
        try:
            return await f.dataset.reader.read(f.obj, off, size, f.stream)
        except (ObjectChanged, ObjectNotFound) as e:
            f.dataset.namespace.invalidate(f.obj.path)
            self._opened_versions.pop(f.inode, None)
            if isinstance(e, ObjectNotFound):
                # The open file's version is gone, as when it is replaced: ESTALE. ENOENT
                # is for names; read(2) on an open file never returns it.
                raise ObjectChanged(f"{f.obj.path}: deleted since it was opened") from e
            raise

    async def release(self, fh):
        f = self._files.pop(fh, None)
        if f is None:
            return
        f.dataset.open_files -= 1
        if f.write is not None:
            self.node.writes.close(f.write)
        if f.staged is not None:
            self.node.writes.close_pending(f.staged)
        if self.inodes.closed(f.inode):
            self._dropped(f.inode)

    # -- writes (read-write datasets) -------------------------------------------------

    def _writer(self, fh: int) -> WriteFile:
        f = self._files[fh]
        if not f.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if f.dataset.removed:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return f.write

    @fuse_errors
    async def write(self, fh, off, buf):
        return await self._writer(fh).write(off, buf)

    @fuse_errors
    async def flush(self, fh):
        f = self._files.get(fh)
        if f is not None and f.writable:
            # close(): by default the upload is done when this returns (close-to-open).
            await f.write.commit(background=self.node.writes.writeback)

    @fuse_errors
    async def fsync(self, fh, datasync):
        # Durable when this returns: uploaded, or (--writeback) fsync'd and journaled. Through
        # any handle of the file, as fsync(2) syncs the file, not the descriptor: `sync FILE`
        # opens it read-only.
        f = self._files.get(fh)
        if f is None:
            return
        writes = self.node.writes
        if f.write is not None and not f.write.unlinked:
            await f.write.sync(background=writes.writeback)
        elif writes is not None and f.write is None and not f.dataset.config.read_only:
            # Opened for reading before a writer opened the file, or after its close (its
            # upload maybe not landed yet).
            await writes.settle(f.dataset, self._locate(self._path(f.inode))[1])

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        dataset, inner, _ = self._child(parent_inode, name)
        namespace = dataset.namespace
        namespace.creating(inner)
        current = None
        if flags & os.O_EXCL or not flags & os.O_TRUNC:
            # The kernel's lookup may have been answered by the listing of a directory this
            # node is filling (Namespace.lookup): ask the backend, so that O_EXCL still fails
            # and a create without O_TRUNC keeps what another node put there meanwhile.
            parent, _, leaf = inner.rpartition("/")
            current = await namespace.find_now(parent, leaf)
            if current is not None and flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if current is not None and current.kind == "dir":
                raise pyfuse3.FUSEError(errno.EISDIR)
        f = OpenFile(0, None, ReadStream(), dataset, writable=True, write_only=flags & os.O_ACCMODE == os.O_WRONLY)
        f.write = await self.node.writes.open(dataset, inner, current, truncate=current is None)
        info = self._outer(dataset, f.write.info)
        try:
            f.inode = self.inodes.lookup(info.path)
            return self._opened(f, info.version), self._attrs(f.inode, info)
        except BaseException:
            self.node.writes.close(f.write)
            raise

    @staticmethod
    def _name(name: bytes) -> str:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        return os.fsdecode(name)

    def _child(self, parent_inode: int, name: bytes) -> tuple[Dataset, str, str]:
        """(dataset, path inside it, mount path) of entry `name` of a read-write directory."""
        parent = self._path(parent_inode)
        dataset, inner_parent = self._writable(parent)
        name = self._name(name)
        return dataset, join(inner_parent, name), join(parent, name)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        changes = fields.update_size or fields.update_mtime
        if changes or fields.update_mode or fields.update_uid or fields.update_gid:
            dataset, inner = self._writable(path)
            writes = self.node.writes
            f = self._files.get(fh) if fh is not None else None
            wf = f.write if f is not None and f.writable else writes.find(dataset, inner)
            if fields.update_size:
                if wf is not None:
                    # Found by its path, it is held as a handle would be while it changes: its
                    # last close may come while the truncate waits for room, and let go of it.
                    borrowed = f is None or not f.writable
                    if borrowed:
                        wf.handles += 1
                    try:
                        await wf.truncate(attr.st_size)
                        if not any(o.write is wf and o.writable for o in self._files.values()):
                            # Only readers hold it now: no writer's close will upload the change.
                            await wf.commit(background=writes.writeback)
                    finally:
                        if borrowed:
                            writes.close(wf)
                    if wf.closed:
                        wf = None  # its last handle went meanwhile: an mtime is set as on a closed file
                else:  # truncate(2) of a closed file: write it whole again
                    current = None if attr.st_size == 0 else await self._stored(dataset, inner)
                    wf = await writes.open(dataset, inner, current, truncate=attr.st_size == 0)
                    try:
                        await wf.truncate(attr.st_size)
                        await wf.commit(background=self.node.writes.writeback)
                    finally:
                        writes.close(wf)
                    wf = None
            if fields.update_mtime:
                mtime = attr.st_mtime_ns / 1e9
                if wf is not None:
                    wf.set_mtime(mtime)
                elif not writes.uploader.touch(dataset, inner, mtime):  # not landed yet: set after
                    await dataset.backend.set_mtime(inner, mtime)  # S3: an object's mtime is its upload's
                    dataset.namespace.invalidate(inner)
            # Modes and owners are the mount's (--uid, --gid, --umask): accepted, not kept.
        return self._attrs(inode, await self._stat(path))

    @staticmethod
    def _upload_wait(dataset: Dataset) -> float:
        """How long a rename waits for the source's pending uploads: as long as one
        request and its retries may take (a backend that is down must not hang it)."""
        backend = dataset.backend
        return backend.timeout * (backend.retries + 1)

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        dataset, inner, path = self._child(parent_inode, name)
        writes = self.node.writes
        # A directory above is being renamed (the kernel holds no lock of this one's for
        # that): the name is looked up once it has moved, and the rename does not start
        # while a deletion under it goes on (`Writes.renaming_dir`).
        while (renamed := writes.renaming_above(dataset, inner)) is not None:
            await renamed.wait()
            dataset, inner, path = self._child(parent_inode, name)
        info = await self._stat(path)
        if info.kind == "dir":
            raise pyfuse3.FUSEError(errno.EISDIR)
        # First: a close of a handle open on it, or an open of it, while this waits, waits for
        # the outcome (`Writes.unlinked`): uploaded then, it would bring the file back.
        deletion = writes.unlinked(dataset, inner)
        try:
            # A close already submitting its upload (under --writeback it may wait for a journal
            # entry) puts it among those dropped here, not after the DELETE.
            await writes.committed(dataset, inner, under=False)
            landed = await writes.uploader.cancel(dataset, inner)  # else a late upload would bring it back
            stored = await self._stored(dataset, inner)
            if stored is not None or landed:
                # `landed`: an upload cut short landed with its last request, after the listing
                # `_stored` may answer from: the object is there all the same.
                try:
                    await dataset.backend.delete(inner)
                except ObjectNotFound:
                    if stored is not None:
                        raise
        except BaseException:
            writes.reattach(deletion)  # not deleted: the open file is the path's again
            raise
        writes.deleted(deletion)
        dataset.namespace.drop_entry(inner)
        self.inodes.unlinked(path)
        if stored is not None:
            await self._chunks_gone(dataset, stored)

    async def _chunks_gone(self, dataset: Dataset, gone: ObjectInfo) -> None:
        """The file `gone` left the backend (deleted, or replaced by a rename): its cached chunks
        go now, not when the LRU reaches them, unless a handle still reads that version (an
        open file stays readable after its unlink, from what this node holds of it)."""
        if gone.kind != "file":
            return
        for f in self._files.values():
            if f.obj is not None and f.dataset is dataset and f.obj.path == gone.path and f.obj.version == gone.version:
                return
        await self.node.drop_chunks(dataset, gone)

    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        dataset, inner, path = self._child(parent_inode, name)
        if await self._stored(dataset, inner) is not None or self.node.writes.info(dataset, inner) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        await dataset.backend.make_dir(inner)
        info = ObjectInfo(inner, "dir", 0, time.time(), "dir")
        dataset.namespace.made_dir(info)
        info = self._outer(dataset, info)
        return self._attrs(self.inodes.lookup(path), info)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        dataset, inner, path = self._child(parent_inode, name)
        info = await self._stat(path)
        if info.kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not inner:
            raise pyfuse3.FUSEError(errno.EBUSY)  # a dataset's root
        try:
            children = await dataset.namespace.list_dir(inner)
        except ObjectNotFound:
            children = []  # an S3 "directory" whose last object just went
        if children or self.node.writes.children(dataset, inner):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        await dataset.backend.remove_dir(inner)
        dataset.namespace.drop_entry(inner)
        self.inodes.unlinked(path)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        dataset, old, old_path = self._child(parent_inode_old, name_old)
        other, new, new_path = self._child(parent_inode_new, name_new)
        if other is not dataset:
            raise pyfuse3.FUSEError(errno.EXDEV)  # two datasets: mv copies
        if flags & ~RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT
        info = await self._stat(old_path)
        try:
            target = await self._stat(new_path)
        except (pyfuse3.FUSEError, ObjectNotFound):
            target = None
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if target.kind == "dir" and info.kind != "dir":
                raise pyfuse3.FUSEError(errno.EISDIR)
            if info.kind == "dir" and target.kind != "dir":
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if target.kind == "dir" and self.node.writes.children(dataset, new):
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)  # files written here, not uploaded yet
        writes = self.node.writes
        moved = None
        deletion = None
        # Only what the backend holds can be renamed there: this node's writes land first,
        # and the closes meanwhile wait (`Writes.renaming_file`, `Writes.renaming_dir`).
        upload_wait = self._upload_wait(dataset)
        renaming = (writes.renaming_file(dataset, old, upload_wait) if info.kind == "file"
                    else writes.renaming_dir(dataset, old, upload_wait))
        async with renaming:
            if info.kind == "file":
                # Replaced: a file open at `new` uploads nothing from now (a close of it while this
                # waits must not land over what the rename puts there), and its pending bytes are
                # superseded.
                deletion = writes.unlinked(dataset, new)
            try:
                if info.kind == "file":
                    await writes.committed(dataset, new, under=False)  # as at `unlink`
                    await writes.uploader.cancel(dataset, new)
                    moved = await self._stored(dataset, old)  # the version its cached chunks are of
                replaced = await self._stored(dataset, new) if target is not None and target.kind == "file" else None
                answered = await dataset.backend.rename(old, new, info.kind)
            except BaseException:
                if deletion is not None:
                    writes.reattach(deletion)  # not replaced: the file open at `new` is its path's again
                raise
            if deletion is not None:
                writes.deleted(deletion)
            if info.kind == "file":
                writes.moved(dataset, old, new)
            else:
                writes.moved_dir(dataset, old, new)
        dataset.namespace.drop_entry(old)
        dataset.namespace.replaced(new)
        self.inodes.renamed(old_path, new_path)
        if replaced is not None:  # first: without ETags, the file moved there may have its version
            await self._chunks_gone(dataset, replaced)
        if moved is not None:
            await self.node.chunks_renamed(dataset, moved, new, answered)

    # -- what no dataset supports ------------------------------------------------------

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._writable(self._path(new_parent_inode))
        raise pyfuse3.FUSEError(errno.EPERM)  # no hard links in an object store (as link(2) on FAT)

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        self._writable(self._path(parent_inode))
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._writable(self._path(parent_inode))
        raise pyfuse3.FUSEError(errno.ENOTSUP)  # FIFOs, sockets and devices have no object

    @fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        self._writable(self._path(inode))
        raise pyfuse3.FUSEError(errno.ENOTSUP)  # the user.cachefs.* attributes are answers, not storage

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        self._writable(self._path(inode))
        raise pyfuse3.FUSEError(errno.ENOTSUP)


RENAME_NOREPLACE = 1  # <linux/fs.h>


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
