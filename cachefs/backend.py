"""The backend layer: the only module that talks to fsspec.

`Store` classes are blocking adapters over one source (a local directory or an
fsspec filesystem). `Backend` runs them from trio: every call goes to a worker
thread under one CapacityLimiter, with a per-attempt timeout and bounded
retries, so a dead backend turns into an error in bounded time and never a hang.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import hashlib
import hmac
import http.client
import logging
import math
import mmap
import os
import random
import shutil
import stat as stat_mod
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Awaitable, Callable, NamedTuple, NoReturn, TypeVar
from xml.etree import ElementTree

import trio

from cachefs import hotpath, metrics
from cachefs.async_put import AsyncPutter, NotHandled
from cachefs.errors import (
    BackendError,
    BackendPermissionDenied,
    BackendRefused,
    BackendUnavailable,
    ConfigError,
    ObjectChanged,
    ObjectNotFound,
)
from cachefs.logsafe import LogLimiter
from cachefs.objects import Kind, ObjectId, ObjectInfo, check_relative_path, join
from cachefs.threads import BlockingThreads

if TYPE_CHECKING:
    from cachefs.upload import EarlyParts

log = logging.getLogger(__name__)
_fallbacks = LogLimiter(log, interval=60.0)

T = TypeVar("T")

# Idle connections kept for PUTs from the trio thread (as many as uploads run at once).
ASYNC_PUT_KEEP = 8
# The largest file sent by a PUT from the trio thread (`FsspecStore.put_file_async`):
# its body is read and hashed there. Larger ones go through the upload threads.
ASYNC_PUT_MAX = 256 << 10


def fsync_path(path: str) -> None:
    """fsync a file, or a directory (which makes the names in it durable), by its path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A local upload's temporary name, beside its target until renamed over it. A kill -9 of the
# daemon in the middle of a copy leaves one behind: listings skip them, and an rmdir of a
# directory holding nothing else removes those older than STALE_UPLOAD_AGE.
UPLOAD_TEMP_PREFIX = ".cachefs-upload-"
STALE_UPLOAD_AGE = 3600.0


def _remove_stale_uploads(directory: str) -> bool:
    """Remove the temporary files of uploads cut short in `directory`, if it holds nothing
    else and none was written in the last STALE_UPLOAD_AGE seconds (one may be on its way
    from another node); whether it did."""
    names = os.listdir(directory)
    if not names or not all(n.startswith(UPLOAD_TEMP_PREFIX) for n in names):
        return False
    paths = [os.path.join(directory, n) for n in names]
    if any(time.time() - os.lstat(p).st_mtime < STALE_UPLOAD_AGE for p in paths):
        return False
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    return True


def _local_version(st: os.stat_result) -> str:
    return f"stat:{st.st_size}-{st.st_mtime_ns}"


def _remote_version(etag: str, size: int, mtime: float) -> str:
    # Whole seconds: listings carry milliseconds, HEAD/GET headers only seconds.
    return f"etag:{etag}" if etag else f"stat:{size}-{int(mtime)}"


class LocalStore:
    """A local or NAS directory (also a JuiceFS mount path), read with plain syscalls."""

    keeps_mtime = True  # set_mtime sets it
    renames_keep_version = True  # a rename keeps the file's size and mtime: its version

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root

    def _abs(self, path: str) -> str:
        check_relative_path(path)
        return os.path.join(self.root, path) if path else self.root

    def _info(self, path: str, st: os.stat_result) -> ObjectInfo:
        if stat_mod.S_ISDIR(st.st_mode):
            kind: Kind = "dir"
        elif stat_mod.S_ISLNK(st.st_mode):
            kind = "link"
        else:
            kind = "file"
        target = os.readlink(self._abs(path)) if kind == "link" else None
        return ObjectInfo(path, kind, st.st_size, st.st_mtime, _local_version(st), target)

    def close(self) -> None:
        """Nothing is kept open between requests."""

    def stat(self, path: str) -> ObjectInfo:
        return self._info(path, os.lstat(self._abs(path)))

    def check_name(self, path: str) -> ObjectInfo:
        """`stat` of a name that is probably not there (one lstat either way)."""
        return self.stat(path)

    def list_dir(self, path: str) -> list[ObjectInfo]:
        out = []
        with os.scandir(self._abs(path)) as it:
            for entry in it:
                if entry.name.startswith(UPLOAD_TEMP_PREFIX):
                    continue  # an upload on its way (`put_file`), or one a kill cut short
                child = join(path, entry.name)
                try:
                    out.append(self._info(child, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue  # deleted while we listed
        return out

    def fetch(self, obj: ObjectId, start: int, end: int) -> bytes:
        fd = os.open(self._abs(obj.path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            # The local equivalent of a conditional GET: refuse a file that is not
            # the version the reader opened, so chunks of two versions never mix.
            if _local_version(st) != obj.version:
                raise ObjectChanged(f"{obj.path}: changed since it was opened")
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)

    # -- changes (read-write datasets) --------------------------------------------

    def put_file(self, path: str, staged: str) -> ObjectInfo:
        """Copy `staged` to `path`: to a temporary name beside it, fsync'd, then renamed
        over it, so `path` is never seen half-written. Returns the attributes of the file
        written (a rename keeps them): a stat after could see another writer's."""
        target = self._abs(path)
        tmp = os.path.join(os.path.dirname(target), f"{UPLOAD_TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}")
        try:
            shutil.copyfile(staged, tmp)  # copy_file_range/sendfile: no bytes through Python
            fsync_path(tmp)
            info = self._info(path, os.lstat(tmp))
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_path(os.path.dirname(target))
        return info

    def delete(self, path: str) -> None:
        os.unlink(self._abs(path))

    def make_dir(self, path: str) -> None:
        os.mkdir(self._abs(path), 0o755)

    def remove_dir(self, path: str) -> None:
        target = self._abs(path)
        try:
            os.rmdir(target)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY or not _remove_stale_uploads(target):
                raise
            os.rmdir(target)

    def rename(self, old: str, new: str, kind: Kind) -> None:
        os.rename(self._abs(old), self._abs(new))

    def set_mtime(self, path: str, mtime: float) -> None:
        os.utime(self._abs(path), (mtime, mtime), follow_symlinks=False)

    def fetch_into(self, obj: ObjectId, start: int, end: int, into: list[memoryview]) -> int:
        """`fetch` into the buffers `into` in turn (end - start bytes in all); returns the bytes read."""
        fd = os.open(self._abs(obj.path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _local_version(os.fstat(fd)) != obj.version:
                raise ObjectChanged(f"{obj.path}: changed since it was opened")
            n = os.preadv(fd, into, start)
        finally:
            os.close(fd)
        return n


class FsspecStore:
    """Any fsspec filesystem; S3 gets conditional ranged GETs."""

    keeps_mtime = False  # an object's mtime is its upload's: set_mtime sets nothing

    def __init__(
        self,
        url: str,
        endpoint_url: str | None,
        timeout: float,
        credentials: tuple[str, str] | None = None,
        profile: str | None = None,
        unsigned_payload: bool = False,
    ):
        import fsspec  # imported here: the local store must not pay for it

        # The URL names the source in chunk keys on every node: one spelling only.
        self.url = url.rstrip("/")
        protocol, _, _ = url.partition("://")
        options: dict = {"skip_instance_cache": True}
        if protocol in ("s3", "s3a"):
            options.update(
                use_listings_cache=False,
                config_kwargs={
                    "connect_timeout": timeout,
                    "read_timeout": timeout,
                    # cachefs retries on its own, with its own bound; botocore must not multiply it.
                    "retries": {"max_attempts": 1, "mode": "standard"},
                },
            )
            if endpoint_url:
                options["endpoint_url"] = endpoint_url
            if credentials:
                options["key"], options["secret"] = credentials
            elif profile:
                options["profile"] = profile
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"{url}: unsupported source ({e})") from None
        self.root = root.rstrip("/")
        self.is_s3 = protocol in ("s3", "s3a")
        self.fast: S3FastPath | None = None
        self.fast_list = True  # LISTs can fall back to s3fs on their own
        self._putter: AsyncPutter | None = None  # small PUTs from the trio thread (`put_file_async`)
        # Whether this store's HEADs and LISTs name ETags, as the last one seen did (None: none
        # seen yet). Some servers name one in PUT answers only (the JuiceFS gateway without
        # --keep-etag): a version taken from such an answer is not the one a stat reports.
        self.stats_name_etags: bool | None = None
        if self.is_s3:
            self.fs.retries = 1
            self.fast = S3FastPath(endpoint_url, credentials, timeout, profile, unsigned_payload)
            if (endpoint_url or "").startswith("http://"):
                self._putter = AsyncPutter(timeout, keep=ASYNC_PUT_KEEP)

    def close(self) -> None:
        """Close the store's connections (s3fs's session; the fast path's, of this thread)."""
        if self.fast is not None:
            self.fast.close()
        if self._putter is not None:
            self._putter.close()
        s3 = getattr(self.fs, "_s3", None)
        if s3 is not None:
            type(self.fs).close_session(self.fs.loop, s3)

    def _abs(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def _rel(self, name: str) -> str:
        name = name.rstrip("/")
        if name == self.root:
            return ""
        return name[len(self.root) + 1 :] if name.startswith(self.root + "/") else name

    def _info(self, d: dict) -> ObjectInfo:
        path = self._rel(d["name"])
        if d.get("type") == "directory":
            return ObjectInfo(path, "dir", 0, 0.0, "dir")
        size = int(d.get("size") or 0)
        mtime = d.get("LastModified") or d.get("mtime") or d.get("created") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        etag = (d.get("ETag") or d.get("etag") or "").strip('"')
        self.stats_name_etags = bool(etag)
        return ObjectInfo(path, "file", size, float(mtime), _remote_version(etag, size, float(mtime)))

    def _written(self, path: str, size: int, headers: dict[str, str]) -> ObjectInfo | Answered:
        """`_written`, if this store's stats are known to name ETags too; else what the
        answer says (`Answered`), so that the caller's HEAD gives the version a stat
        reports (and tells whether they do) and can be checked against it."""
        info = _written(path, size, headers) if self.stats_name_etags else None
        return info if info is not None else _answered(headers)

    def stat(self, path: str) -> ObjectInfo:
        return self._stat(path, together=False)

    def check_name(self, path: str) -> ObjectInfo:
        """`stat` of a name that is probably not there (the lookup before a create): its
        HEAD and the LIST that tells a directory go out together, one round trip, where
        `stat` sends the LIST only after the HEAD found nothing (two round trips, both on
        the path of every create under --writeback)."""
        return self._stat(path, together=True)

    def _stat(self, path: str, together: bool) -> ObjectInfo:
        if self.fast is not None and self.fast_list:
            bucket, key = self._key(path)
            if key:
                try:
                    return self._fast_stat(path, bucket, key, together)
                except _FallBack as e:
                    _fallbacks.warning("stat-fallback", "a plain HEAD or LIST got an answer only s3fs handles (%s); "
                                       "using s3fs for this request", e)
        info = self._info(self.fs.info(self._abs(path)))
        return dataclasses.replace(info, path=path)

    def _fast_stat(self, path: str, bucket: str, key: str, together: bool) -> ObjectInfo:
        """As s3fs's `info`: a HEAD of the key; if there is no such object, a directory if
        anything lies under `key/` (a LIST of one key), sent with the HEAD if `together`.
        Through the fast path: s3fs spent 6 ms of CPU on the two (the lookup of every new
        name a writer creates)."""
        found = self.fast.head_or_dir(bucket, key) if together else self.fast.head(bucket, key)
        if found is None:
            found = self.fast.any_under(bucket, f"{key}/")
        if found is False:
            raise FileNotFoundError(errno.ENOENT, f"{bucket}/{key}")
        if found is True:
            return ObjectInfo(path, "dir", 0, 0.0, "dir")
        return dataclasses.replace(self._info(found), path=path)

    def list_dir(self, path: str) -> list[ObjectInfo]:
        base = self._abs(path)
        out = []
        for d in self._ls(base):
            info = self._info(d)
            if info.path == path or not info.name:
                continue  # some stores list the directory itself, or a "dir/" marker
            out.append(info)
        return out

    def _ls(self, base: str) -> list[dict]:
        if self.fast is not None and self.fast_list:
            bucket, _, prefix = base.partition("/")
            try:
                return self.fast.list(bucket, f"{prefix}/" if prefix else "")
            except _FallBack as e:
                log.warning("plain LISTs do not work with this S3 backend (%s); listing with s3fs", e)
                self.fast_list = False
        return self.fs.ls(base, detail=True)

    def fetch(self, obj: ObjectId, start: int, end: int) -> bytes:
        if self.is_s3:
            return self._s3_get(obj, start, end)
        return self.fs.cat_file(self._abs(obj.path), start=start, end=end)

    def fetch_into(self, obj: ObjectId, start: int, end: int, into: list[memoryview]) -> int:
        """`fetch` into the buffers `into` in turn (end - start bytes in all); returns
        the bytes read. The S3 fast path receives straight into them; other stores copy."""
        data = self._s3_get(obj, start, end, into) if self.is_s3 else self.fetch(obj, start, end)
        if data is into:
            return end - start
        return _scatter(data, into)

    def _s3_get(self, obj: ObjectId, start: int, end: int, into: list[memoryview] | None = None):
        from fsspec.asyn import sync

        bucket, key = self._key(obj.path)  # as writes do: s3fs's split_path cost 2% of a warm-up's thread time
        fs = self.fs
        etag = obj.version.removeprefix("etag:") if obj.version.startswith("etag:") else ""
        conditions = {"IfMatch": f'"{etag}"'} if etag else {}
        if self.fast is not None:

            def check(headers: dict) -> None:
                last_modified = headers.get("Last-Modified")
                self._check_version(
                    obj,
                    headers.get("Content-Range", ""),
                    email.utils.parsedate_to_datetime(last_modified) if last_modified and not etag else None,
                )

            try:
                data, _ = self.fast.get(
                    bucket, key, start, end, {"If-Match": f'"{etag}"'} if etag else {},
                    into=into, check=check,
                )
            except _FallBack as e:
                # This request only: one odd answer must not change how every later one is made.
                _fallbacks.warning("get-fallback", "a plain ranged GET got an answer only s3fs handles (%s); "
                                   "using s3fs for this request", e)
            else:
                return data

        async def get() -> tuple[dict, bytes]:
            resp = await fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **conditions
            )
            try:
                return resp, await resp["Body"].read()
            finally:
                resp["Body"].close()

        try:
            resp, data = sync(fs.loop, get)
        except OSError as e:
            code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412"):
                raise ObjectChanged(f"{obj.path}: changed since it was opened (ETag)") from None
            raise
        self._check_version(obj, resp.get("ContentRange", ""), None if conditions else resp.get("LastModified"))
        return data

    # -- changes (read-write datasets) --------------------------------------------
    # S3 through botocore's client (thread-safe, one per store); other fsspec
    # filesystems through fsspec's own calls, whole files only.

    def _key(self, path: str) -> tuple[str, str]:
        bucket, _, key = self._abs(path).partition("/")
        return bucket, key

    def put_file(self, path: str, staged: str) -> ObjectInfo | Answered | None:
        """Upload `staged` as `path` in one request (a single PUT on S3).

        Returns:
            The new object's attributes if the answer names its version (an ETag), else
            what the answer says of it (S3), or None (nothing: another fsspec store).
        """
        if not self.is_s3:
            self.fs.put_file(staged, self._abs(path))
            return None
        body = _read_whole(staged)
        return self._written(path, len(body), self._put(path, body, {}))

    @property
    def puts_async(self) -> bool:
        """True if `put_file_async` may send PUTs (an S3 endpoint over plain HTTP)."""
        return self._putter is not None

    async def put_file_async(self, path: str, staged: str) -> ObjectInfo | Answered:
        """`put_file` of a small file from the trio thread (`cachefs.async_put`): its body
        is read here (it was just written: from the page cache) and signed as
        `S3FastPath.put` signs it.

        Raises:
            NotHandled: send it with `put_file` instead (an answer only that path reads).
            As `put_file` otherwise.
        """
        putter = self._putter
        if putter is None:
            raise NotHandled("no PUTs from the trio thread to this store")
        bucket, key = self._key(path)
        body = _read_whole(staged)
        signed = self.fast.signer.sign("put_object", {"Bucket": bucket, "Key": key}, "PUT", body)
        if signed is None or signed[0] != "http":
            raise NotHandled("not a request signed for plain HTTP")
        _, netloc, target, headers = signed
        try:
            answer = await putter.put(netloc, target, headers, body)
        except NotHandled as e:
            if e.for_good:
                log.info("%s: PUTs go through threads from now on (%s)", self.url, e)
                self._putter = None
            raise
        return self._written(path, len(body), answer)

    def _put(
        self, path: str, body: bytes | memoryview, query: dict, source: tuple[int, int] | None = None
    ) -> dict[str, str]:
        """PUT over the fast path (a part, with UploadId and PartNumber in `query`), or
        through botocore for an answer only it handles; the answer's headers. `source`:
        (fd, offset) of a file that holds `body`, sent from there (see `S3FastPath.put`)."""
        bucket, key = self._key(path)
        try:
            return self.fast.put(bucket, key, body, query, source)
        except _FallBack:
            call = self.fast.client.upload_part if query else self.fast.client.put_object
            return _headers(call(Bucket=bucket, Key=key, Body=bytes(body), **query))

    def start_multipart(self, path: str) -> str:
        bucket, key = self._key(path)
        return self.fast.client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]

    def put_part(self, path: str, upload_id: str, number: int, staged: str, start: int, end: int) -> str:
        """Upload bytes [start, end) of `staged` as part `number`; returns its ETag.

        Sent from the page cache with no copy of ours: hashed (for the signature)
        through a read-only mapping of the part, and sent with sendfile(2). A read into
        a buffer and a send from it were two copies: the read alone was a ninth of the
        daemon's CPU writing a large file. The caller must not shrink the file while a
        part of it is in flight: a mapped page past the end faults (SIGBUS) when read.
        """
        fd = os.open(staged, os.O_RDONLY | os.O_CLOEXEC | NOATIME)
        try:
            if os.fstat(fd).st_size < end:
                raise OSError(errno.EIO, f"{staged}: short read of part {number}")
            with _mapped_range(fd, start, end) as body:
                return self._put(path, body, {"UploadId": upload_id, "PartNumber": number}, source=(fd, start)).get("etag", "")
        finally:
            os.close(fd)

    def finish_multipart(self, path: str, upload_id: str, etags: list[str], size: int) -> ObjectInfo | Answered:
        """Complete the upload; the new object's attributes as `put_file` returns them."""
        bucket, key = self._key(path)
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
        try:
            answer = self.fast.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as e:
            # The answer to an earlier attempt was lost after S3 completed the upload: this
            # retry finds no such upload, though the object landed. Its ETag tells: S3 makes
            # a multipart object's from its parts' MD5s, which our parts' ETags are.
            landed = self._completed_as(path, bucket, key, etags, size) if _error_code(e) == "NoSuchUpload" else None
            if landed is None:
                raise
            log.info("%s: the upload was completed by an attempt whose answer was lost", path)
            return landed
        return self._written(path, size, _headers(answer))

    def _completed_as(self, path: str, bucket: str, key: str, etags: list[str], size: int) -> ObjectInfo | None:
        """The object at `key` if it is the completion of exactly these parts (its ETag
        is theirs combined, and its size ours); else None (it cannot be told: a store
        whose ETags are not MD5s, or no such object)."""
        expected = _multipart_etag(etags)
        if expected is None:
            return None
        found = self.fast.head(bucket, key)
        if not found or found.get("ETag", "").strip('"') != expected or found.get("size") != size:
            return None
        return dataclasses.replace(self._info(found), path=path)

    def abort_multipart(self, path: str, upload_id: str) -> None:
        bucket, key = self._key(path)
        self.fast.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    def delete(self, path: str) -> None:
        if not self.is_s3:
            self.fs.rm_file(self._abs(path))
            return
        bucket, key = self._key(path)
        self.fast.client.delete_object(Bucket=bucket, Key=key)

    def make_dir(self, path: str) -> None:
        """S3 has no directories: a zero-byte "NAME/" marker keeps an empty one listed."""
        if not self.is_s3:
            self.fs.makedirs(self._abs(path), exist_ok=False)
            return
        bucket, key = self._key(path)
        self.fast.client.put_object(Bucket=bucket, Key=f"{key}/", Body=b"")

    def remove_dir(self, path: str) -> None:
        if not self.is_s3:
            self.fs.rmdir(self._abs(path))
            return
        bucket, key = self._key(path)
        listed = self.fast.client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/", MaxKeys=2)
        if any(item["Key"] != f"{key}/" for item in listed.get("Contents", [])):
            raise BackendRefused(f"{path}: directory not empty", errno.ENOTEMPTY)
        self.fast.client.delete_object(Bucket=bucket, Key=f"{key}/")

    def rename(self, old: str, new: str, kind: Kind) -> Answered | None:
        """A file: server-side copy, then delete (not atomic on S3; docs/semantics.md).
        A directory would be a copy of every object under it: refused with EXDEV, so
        that `mv` copies and deletes it itself."""
        if kind == "dir":
            raise BackendRefused(f"{old}: an object store cannot rename a directory", errno.EXDEV)
        if not self.is_s3:
            self.fs.mv(self._abs(old), self._abs(new))
            return None
        bucket, key = self._key(old)
        _, new_key = self._key(new)
        answer = self.fast.client.copy_object(Bucket=bucket, Key=new_key, CopySource={"Bucket": bucket, "Key": key})
        self.fast.client.delete_object(Bucket=bucket, Key=key)
        copied = answer.get("CopyObjectResult", {})
        return _answered({**_headers(answer), "etag": copied.get("ETag") or ""})

    def set_mtime(self, path: str, mtime: float) -> None:
        """An object's mtime is the time it was written; S3 cannot set it."""

    def bucket_exists(self) -> bool:
        bucket, _ = self._key("")
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def _check_version(obj: ObjectId, content_range: str, last_modified) -> None:
        """Servers without ETags (the JuiceFS gateway) still report the object's
        total size and mtime with every ranged GET: check them against the version."""
        total = content_range.rpartition("/")[2]
        if total.isdigit() and int(total) != obj.size:
            raise ObjectChanged(f"{obj.path}: size changed from {obj.size} to {total}")
        if last_modified is not None and obj.version != _remote_version("", obj.size, last_modified.timestamp()):
            raise ObjectChanged(f"{obj.path}: modified since it was opened")


# Staged files are opened with it to be read: the first read of a file just written would
# update its atime (relatime), a journal transaction per file that waits behind the
# staging area's fsyncs.
NOATIME = getattr(os, "O_NOATIME", 0)


@contextlib.contextmanager
def _mapped_range(fd: int, start: int, end: int):
    """A read-only view of bytes [start, end) of file `fd`, mapped from its page cache,
    all at once (not a page fault at a time as it is read). The file must not shrink
    below `end` while the view is read: a page past its end faults (SIGBUS, which ends
    the process)."""
    base = start - start % mmap.ALLOCATIONGRANULARITY  # where a mapping may begin
    mapping = mmap.mmap(fd, end - base, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                        prot=mmap.PROT_READ, offset=base)
    try:
        with memoryview(mapping) as whole, whole[start - base :] as view:
            yield view
    finally:
        mapping.close()


def _request_from_file(
    conn: http.client.HTTPConnection, method: str, target: str, headers: dict, fd: int, offset: int, count: int
) -> None:
    """Send a request as `conn.request` does, its body the `count` bytes of `fd` at
    `offset`, with sendfile(2) (a TLS socket reads and sends them instead)."""
    conn.putrequest(method, target)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    with open(fd, "rb", buffering=0, closefd=False) as file:
        sent = conn.sock.sendfile(file, offset, count)
    if sent != count:
        raise OSError(errno.EIO, f"the file ended {count - sent} bytes before the request's body")


def _drain(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> None:
    """Read the rest of an answer with no body of use (a HEAD's, a PUT's), so that the kept
    connection is ready for the next request; one whose read failed (a timeout) is closed:
    kept with its answer unread, it failed the next request sent on it."""
    try:
        resp.read()
    except BaseException:
        conn.close()
        raise


def _headers(answer: dict) -> dict[str, str]:
    """A botocore answer's HTTP headers (names in lower case), with its ETag."""
    headers = dict(answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}))
    if answer.get("ETag"):
        headers["etag"] = answer["ETag"]
    return headers


def _read_whole(staged: str) -> bytes:
    """The bytes of the small file `staged`, the body of a single PUT."""
    fd = os.open(staged, os.O_RDONLY | os.O_CLOEXEC | NOATIME)
    try:
        return os.read(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Answered:
    """What the answer to a PUT (or to a multipart completion) says of the object it made,
    where that is not the version a stat reports (a store whose HEADs name no ETag, or
    not known yet to name one): its ETag ("" if none) and its Date, to the second (None
    if none). The version then comes from a HEAD after the PUT, which may already see
    another writer's object: `could_be` tells whether it can be ours."""

    etag: str
    mtime: float | None

    def could_be(self, seen: ObjectInfo, size: int) -> bool:
        """Whether `seen` (a stat after the PUT) can be the object this answer is of: not if
        it differs in kind, size or ETag, or was written after the answer's second."""
        if seen.kind != "file" or seen.size != size:
            return False
        if self.etag and seen.version.startswith("etag:"):
            return seen.version == f"etag:{self.etag}"
        return self.mtime is None or int(seen.mtime) <= self.mtime


class Written(NamedTuple):
    """What `Backend.upload` made: the object now at the path, and whether it is the one
    uploaded (not another writer's, landed between the PUT and the HEAD that named it)."""

    info: ObjectInfo
    ours: bool


def _answered(headers: dict[str, str]) -> Answered:
    return Answered((headers.get("etag") or "").strip('"'), _date_second(headers.get("date")))


def _date_second(date: str | None) -> float | None:
    """An HTTP Date header as a time in whole seconds, or None."""
    try:
        return float(int(email.utils.parsedate_to_datetime(date).timestamp()))
    except (TypeError, ValueError):
        return None


def _written(path: str, size: int, headers: dict[str, str]) -> ObjectInfo | None:
    """The attributes of an object just written, from the headers (names in lower case)
    of the answer to its PUT or CompleteMultipartUpload: its ETag is the version a HEAD
    would report (where HEADs name ETags: `FsspecStore._written`), and names exactly the
    bytes we sent (a HEAD could already see a concurrent writer's object). The mtime is
    the answer's Date, to the second like a HEAD's Last-Modified. None without an ETag (a
    store without them): the caller asks with a HEAD."""
    answered = _answered(headers)
    if not answered.etag:
        return None
    mtime = answered.mtime if answered.mtime is not None else float(int(time.time()))
    return ObjectInfo(path, "file", size, mtime, _remote_version(answered.etag, size, mtime))


class _ThreadConnections(dict):
    """One thread's kept-alive connections, by (netloc, spare): closed when the thread ends
    and its locals go (left to the collector, each socket warned of being left open)."""

    def __del__(self) -> None:
        for conn in self.values():
            conn.close()


class S3FastPath:
    """Ranged GETs and LISTs over plain HTTP keep-alive connections (one per
    thread) with presigned URLs.

    A GET's body goes from the socket straight into its buffer (`readinto`,
    GIL released), where aiobotocore copies it several times in Python: 598 vs
    459 MiB/s with 8 streams on the bench machine. A LIST page is parsed by
    ElementTree in C: a directory of 2,000 small files lists in 150 ms against
    270 ms through s3fs, whose botocore parser (a dateutil parse per key) was
    most of the difference; a small-file workload pays that on every refresh.

    A GET answered in a way only s3fs handles (a redirect to another region, a
    malformed-request error) is retried through s3fs, that request alone; a
    listing we cannot parse switches LISTs back to s3fs for good.
    """

    def __init__(
        self, endpoint_url: str | None, credentials: tuple[str, str] | None, timeout: float, profile: str | None = None,
        unsigned_payload: bool = False,
    ):
        import botocore.config
        import botocore.session

        session = botocore.session.Session(profile=profile) if profile and not credentials else botocore.session.get_session()
        config = botocore.config.Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto",
                **({"payload_signing_enabled": False} if unsigned_payload else {})},
            connect_timeout=timeout,
            read_timeout=timeout,
            # cachefs retries on its own (Backend._change), with its own bound.
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        keys = dict(zip(("aws_access_key_id", "aws_secret_access_key"), credentials)) if credentials else {}
        region = session.get_config_variable("region") or "us-east-1"
        self.client = session.create_client("s3", endpoint_url=endpoint_url, region_name=region, config=config, **keys)
        self.timeout = timeout
        self._local = threading.local()
        self.signer = _Presigner(self.client, unsigned_payload)

    def close(self) -> None:
        """Close the calling thread's kept-alive connections (each thread has its own)."""
        for conn in self._local.__dict__.pop("conns", {}).values():
            conn.close()

    def _connection(self, scheme: str, netloc: str, fresh: bool, spare: bool = False) -> http.client.HTTPConnection:
        """The thread's kept-alive connection to `netloc` (`spare`: its second one, for a
        request sent while the first waits for its own answer)."""
        conns = self._local.__dict__.get("conns")
        if conns is None:
            conns = self._local.conns = _ThreadConnections()
        conn = conns.get((netloc, spare))
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = conns[(netloc, spare)] = cls(netloc, timeout=self.timeout)
        return conn

    def get(
        self, bucket: str, key: str, start: int, end: int, headers: dict[str, str],
        into: list[memoryview] | None = None,
        check: Callable[[dict], None] | None = None,
    ) -> tuple[bytearray | list[memoryview], dict]:
        """Bytes [start, end) and the response headers; if `into` is given, the bytes
        are received into its buffers in turn (end - start bytes in all) and it is returned.

        `check(headers)` runs before any byte of the body is received (it raises if
        the answer is not the version asked for).

        Raises:
            FileNotFoundError, PermissionError, ObjectChanged (412/416, or a shorter range
            than asked: the object is smaller than the caller knows), OSError (others),
            _FallBack (an answer only s3fs can handle).
        """
        resp, conn = self._send("get_object", {"Bucket": bucket, "Key": key}, {**headers, "Range": f"bytes={start}-{end - 1}"})
        if resp.status == 206:
            served = resp.getheader("Content-Range", "").partition(" ")[2].partition("/")[0]
            if served and served != f"{start}-{end - 1}":
                # Less than asked: the object ends before `end`, so it is not the one the
                # range was taken from (callers ask within the size they know). Without an
                # ETag to condition on, this is how a smaller new version shows; its body
                # must not pass for a connection cut short (retries, then EIO and the breaker).
                conn.close()
                raise ObjectChanged(f"{bucket}/{key}: changed since it was opened (bytes {served} of {start}-{end - 1})")
            total, got = end - start, 0
            try:
                if check is not None:
                    check(dict(resp.getheaders()))
                data = hotpath.empty_buffer(end - start) if into is None else into  # filled below or raised
                for buf in [data] if into is None else into:
                    with memoryview(buf) as view:
                        size, filled = len(view), 0
                        while filled < size and (n := resp.readinto(view[filled:])):
                            filled += n
                    got += filled
                    if filled < size:
                        break
            except BaseException:
                conn.close()  # a body cut short (timeout, IncompleteRead) must not poison the next request
                raise
            if got < total or resp.read(1):
                conn.close()
                raise ConnectionError(f"{key}: {got} of {total} bytes before the connection ended")
            return data, dict(resp.getheaders())
        self._fail(resp, conn, f"{bucket}/{key}", expected=206)

    def list(self, bucket: str, prefix: str, max_keys: int | None = None) -> list[dict]:
        """The entries right under `prefix` ("" or ending in "/"), shaped like
        s3fs's `ls(detail=True)`: name, type, size, and for files LastModified and ETag.

        Raises:
            FileNotFoundError (nothing under a non-empty prefix), PermissionError,
            OSError, _FallBack (an answer only s3fs can handle).
        """
        out: list[dict] = []
        params = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "EncodingType": "url"}
        if max_keys is not None:
            params["MaxKeys"] = max_keys  # entries per page; the server's default otherwise
        while True:
            page = self._list_page(params)
            fields = {_local_name(e.tag): e for e in page}
            decode = urllib.parse.unquote_plus if _text(fields.get("EncodingType")) == "url" else str
            for entry in page:
                tag = _local_name(entry.tag)
                if tag == "CommonPrefixes":
                    name = decode(_child_text(entry, "Prefix")).rstrip("/")
                    out.append({"name": f"{bucket}/{name}", "type": "directory", "size": 0})
                elif tag == "Contents":
                    out.append({
                        "name": f"{bucket}/{decode(_child_text(entry, 'Key'))}",
                        "type": "file",
                        "size": int(_child_text(entry, "Size") or 0),
                        "LastModified": datetime.datetime.fromisoformat(_child_text(entry, "LastModified")),
                        "ETag": _child_text(entry, "ETag"),
                    })
            token = _text(fields.get("NextContinuationToken"))
            if _text(fields.get("IsTruncated")) != "true" or not token:
                break
            params["ContinuationToken"] = token
        if not out and prefix:
            raise FileNotFoundError(errno.ENOENT, f"{bucket}/{prefix}")
        return out

    def head(self, bucket: str, key: str) -> dict | None:
        """The object `key` shaped like s3fs's `info` (name, type, size, LastModified,
        ETag), or None if there is no such object.

        Raises:
            PermissionError, OSError, _FallBack (an answer only s3fs can handle).
        """
        resp, conn = self._send("head_object", {"Bucket": bucket, "Key": key}, {}, method="HEAD")
        if resp.status == 404:
            _drain(resp, conn)
            return None
        if resp.status != 200:
            self._fail(resp, conn, f"{bucket}/{key}", expected=200)
        _drain(resp, conn)
        modified = resp.getheader("Last-Modified")
        return {
            "name": f"{bucket}/{key}",
            "type": "file",
            "size": int(resp.getheader("Content-Length") or 0),
            "LastModified": email.utils.parsedate_to_datetime(modified) if modified else 0,
            "ETag": resp.getheader("ETag") or "",
        }

    def _list_page(self, params: dict) -> ElementTree.Element:
        """One ListObjectsV2 answer, parsed.

        Raises:
            FileNotFoundError, PermissionError, OSError, _FallBack (unparsable).
        """
        resp, conn = self._send("list_objects_v2", params, {})
        if resp.status != 200:
            self._fail(resp, conn, f"{params['Bucket']}/{params['Prefix']}", expected=200)
        try:
            return ElementTree.fromstring(resp.read())
        except ElementTree.ParseError as e:
            conn.close()
            raise _FallBack(f"unparsable listing ({e})") from None
        except BaseException:
            conn.close()  # as in get: a half-read answer must not stay on the kept connection
            raise

    @staticmethod
    def _under_params(bucket: str, prefix: str) -> dict:
        return {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": 1, "EncodingType": "url"}

    @staticmethod
    def _lists_any(page: ElementTree.Element) -> bool:
        return any(_local_name(e.tag) in ("Contents", "CommonPrefixes") for e in page)

    def any_under(self, bucket: str, prefix: str) -> bool:
        """Whether any key starts with `prefix` (one LIST of at most one key).

        Raises:
            PermissionError, OSError, _FallBack (an answer only s3fs can handle).
        """
        return self._lists_any(self._list_page(self._under_params(bucket, prefix)))

    def head_or_dir(self, bucket: str, key: str) -> dict | bool:
        """As `head`, and if there is no such object, as `any_under(key/)`: True for a
        directory, False for nothing. The LIST is sent on the thread's spare connection
        before the HEAD, so both are in flight at once. A LIST answer that cannot be
        used as it is (a connection the server had closed, an error) is asked again
        the ordinary way, which reports it.

        Raises:
            PermissionError, OSError, _FallBack (an answer only s3fs can handle).
        """
        scheme, netloc, target = self.signer.presign("list_objects_v2", self._under_params(bucket, f"{key}/"), "GET")
        spare: http.client.HTTPConnection | None = self._connection(scheme, netloc, fresh=False, spare=True)
        try:
            spare.request("GET", target)
        except Exception:  # noqa: BLE001 - asked again below, the ordinary way
            spare.close()
            spare = None
        try:
            found = self.head(bucket, key)
        except BaseException:
            if spare is not None:
                spare.close()  # its unread answer must not meet the next request
            raise
        page = None
        if spare is not None:
            try:
                resp = spare.getresponse()
                body = resp.read()
                if resp.status == 200 and found is None:
                    page = ElementTree.fromstring(body)
            except (http.client.HTTPException, OSError, ElementTree.ParseError):
                spare.close()
            except BaseException:
                spare.close()
                raise
        if found is not None:
            return found
        if page is None:
            return self.any_under(bucket, f"{key}/")
        return self._lists_any(page)

    def put(
        self, bucket: str, key: str, body: bytes | bytearray | memoryview, query: dict,
        source: tuple[int, int] | None = None,
    ) -> dict[str, str]:
        """PUT `body` as the object `key` (or, with UploadId and PartNumber in `query`, as
        a part of a multipart upload); returns the answer's headers, names in lower case.
        The body's SHA-256 is signed (x-amz-content-sha256, SigV4 in the Authorization
        header), so the server refuses a body damaged on the way, as the Content-MD5
        sent before did at 2.5 times the CPU (SHA-256 runs on the CPU's SHA extensions:
        Content-MD5 was 2.8 of the daemon's 4.4 CPU seconds per GiB of a large file
        written; x-amz-checksum-crc32 is cheaper still, but the JuiceFS gateway ignores
        it). Only without credentials to sign with does Content-MD5 carry the check.
        A bytearray or memoryview body is sent as it is (a bytes body http.client copies
        behind its headers first). One request through botocore cost 4 ms of CPU, most
        of it its event hooks: for small files that was a third of the daemon's time per file.
        With `source`, (fd, offset) of a file holding `body` there, the body is sent from
        the file with sendfile(2) (`body` is only hashed): no copy into the socket's buffers.

        Raises:
            FileNotFoundError (no such bucket or upload), PermissionError, OSError, _FallBack.
        """
        operation = "upload_part" if "UploadId" in query else "put_object"
        params = {"Bucket": bucket, "Key": key, **query}
        headers = {"Content-Length": str(len(body))}
        signed = self.signer.sign(operation, params, "PUT", body)
        if signed is None:
            headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        resp, conn = self._send(operation, params, headers, method="PUT", body=body, signed=signed, source=source)
        if resp.status != 200:
            self._fail(resp, conn, f"{bucket}/{key}", expected=200)
        _drain(resp, conn)
        return {name.lower(): value for name, value in resp.getheaders()}

    def _send(
        self, operation: str, params: dict, headers: dict, method: str = "GET",
        body: bytes | bytearray | memoryview | None = None,
        signed: tuple[str, str, str, dict[str, str]] | None = None, source: tuple[int, int] | None = None,
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """Send a request, presigned, or as `signed` (`_Presigner.sign`) if given; its
        body from `source`, (fd, offset) of a file, if given (`body` only gives its length)."""
        if signed is None:
            scheme, netloc, target = self.signer.presign(operation, params, method)
        else:
            scheme, netloc, target, auth = signed
            headers = {**headers, **auth}
        for attempt in (1, 2):
            conn = self._connection(scheme, netloc, fresh=attempt == 2)
            try:
                if source is None:
                    conn.request(method, target, body=body, headers=headers)
                else:
                    _request_from_file(conn, method, target, headers, *source, len(body))
                return conn.getresponse(), conn
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if attempt == 2:  # not just a kept-alive connection the server had closed
                    raise
            except BaseException:
                # A timeout leaves the connection waiting for its answer ("Request-sent"):
                # kept, it would fail every later request of this thread.
                conn.close()
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _fail(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, what: str, expected: int) -> NoReturn:
        body = resp.read(4096)
        conn.close()
        if resp.status == 404:
            raise FileNotFoundError(errno.ENOENT, what)
        if resp.status == 403:
            raise PermissionError(errno.EACCES, f"{what}: {body[:200]!r}")
        if resp.status in (412, 416):
            raise ObjectChanged(f"{what}: changed since it was opened (HTTP {resp.status})")
        if resp.status in (200, 206, 301, 307, 400) and resp.status != expected:
            raise _FallBack(f"HTTP {resp.status}")
        raise OSError(errno.EIO, f"{what}: HTTP {resp.status} {body[:200]!r}")


# Query parameters of the requests the fast path makes, by botocore's name for them.
_QUERY_NAMES = {
    "Prefix": "prefix", "Delimiter": "delimiter", "MaxKeys": "max-keys", "EncodingType": "encoding-type",
    "ContinuationToken": "continuation-token", "UploadId": "uploadId", "PartNumber": "partNumber",
}
_SAFE = "-_.~"  # what SigV4 leaves unescaped in a query


class _Presigner:
    """Presigned URLs of the fast path's requests, as botocore's `generate_presigned_url`
    makes them (SigV4 in the query, UNSIGNED-PAYLOAD, 15 minutes), and PUTs signed in
    their Authorization header over their body's SHA-256 (`sign`), at a tenth of its
    cost: 0.5 ms of CPU per URL in botocore (its endpoint rules, event hooks and
    request objects), a tenth of the daemon's time per small file written. Where each
    bucket's requests go (scheme, host, path-style or virtual-hosted) is asked of
    botocore once per bucket; an operation or parameter not known here, or a client
    without credentials, goes through botocore."""

    def __init__(self, client, unsigned_payload: bool = False):
        self.client = client
        self.unsigned_payload = unsigned_payload
        self.region = client.meta.region_name
        self._credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        self._bases: dict[str, tuple[str, str, str, str]] = {}  # bucket -> scheme, netloc, object path prefix, bucket path
        self._key: tuple[str, str, bytes] | None = None  # (secret, date, signing key): one per day

    def presign(self, operation: str, params: dict, method: str, now: datetime.datetime | None = None) -> tuple[str, str, str]:
        """(scheme, host[:port], path?query) of a presigned request."""
        fast = self._fast(operation, params, method, now)
        if fast is not None:
            return fast
        url = urllib.parse.urlsplit(self.client.generate_presigned_url(operation, Params=params, ExpiresIn=900))
        return url.scheme, url.netloc, f"{url.path}?{url.query}"

    def _base(self, bucket: str) -> tuple[str, str, str, str]:
        base = self._bases.get(bucket)
        if base is None:
            obj = urllib.parse.urlsplit(self.client.generate_presigned_url("head_object", Params={"Bucket": bucket, "Key": "k"}))
            whole = urllib.parse.urlsplit(self.client.generate_presigned_url("list_objects_v2", Params={"Bucket": bucket}))
            if not obj.path.endswith("/k"):
                raise ValueError(obj.path)
            base = self._bases[bucket] = (obj.scheme, obj.netloc, obj.path[:-1], whole.path)
        return base

    def _fast(self, operation: str, params: dict, method: str, now: datetime.datetime | None):
        request = self._request(operation, params, now)
        if request is None:
            return None
        scheme, netloc, host, path, query, frozen, stamp, scope = request
        query.update({
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"{frozen.access_key}/{scope}",
            "X-Amz-Date": stamp,
            "X-Amz-Expires": "900",
            "X-Amz-SignedHeaders": "host",
        })
        if frozen.token is not None:
            query["X-Amz-Security-Token"] = frozen.token
        canonical_query = _canonical_query(query)
        canonical = f"{method}\n{path}\n{canonical_query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD"
        signature = self._signature(frozen.secret_key, stamp, scope, canonical)
        return scheme, netloc, f"{path}?{canonical_query}&X-Amz-Signature={signature}"

    def sign(
        self, operation: str, params: dict, method: str, body: bytes | bytearray | memoryview,
        now: datetime.datetime | None = None,
    ) -> tuple[str, str, str, dict[str, str]] | None:
        """(scheme, host[:port], path?query, headers) of a request signed as botocore signs
        it over HTTP: SigV4 in the Authorization header over the SHA-256 of `body`, which
        the server checks. None where there is nothing to sign with (no credentials) or
        the request is not one of the fast path's."""
        request = self._request(operation, params, now)
        if request is None:
            return None
        scheme, netloc, host, path, query, frozen, stamp, scope = request
        payload = "UNSIGNED-PAYLOAD" if self.unsigned_payload else hashlib.sha256(body).hexdigest()
        headers = {"x-amz-content-sha256": payload, "x-amz-date": stamp}
        if frozen.token is not None:
            headers["x-amz-security-token"] = frozen.token
        names = ";".join(["host", *headers])  # already in order: content-sha256, date, security-token
        lines = "".join(f"{name}:{value}\n" for name, value in [("host", host), *headers.items()])
        canonical_query = _canonical_query(query)
        canonical = f"{method}\n{path}\n{canonical_query}\n{lines}\n{names}\n{headers['x-amz-content-sha256']}"
        signature = self._signature(frozen.secret_key, stamp, scope, canonical)
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={frozen.access_key}/{scope}, "
                                    f"SignedHeaders={names}, Signature={signature}")
        return scheme, netloc, f"{path}?{canonical_query}" if canonical_query else path, headers

    def _request(self, operation: str, params: dict, now: datetime.datetime | None):
        """What both ways of signing need: (scheme, netloc, host as signed, path, query
        parameters, frozen credentials, time stamp, scope); None: botocore's to sign."""
        credentials = self._credentials
        if credentials is None or operation not in ("get_object", "head_object", "put_object", "upload_part",
                                                     "list_objects_v2"):
            return None
        try:
            scheme, netloc, object_path, bucket_path = self._base(params["Bucket"])
        except ValueError:
            return None
        query = {"list-type": "2"} if operation == "list_objects_v2" else {}
        for name, value in params.items():
            if name in ("Bucket", "Key"):
                continue
            if name not in _QUERY_NAMES:
                return None
            query[_QUERY_NAMES[name]] = str(value)
        if operation == "list_objects_v2":
            path = bucket_path
        else:
            path = object_path + urllib.parse.quote(params["Key"].encode(), safe="/~")
        frozen = credentials.get_frozen_credentials()
        now = now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        host = netloc
        if (scheme, host.rpartition(":")[2]) in (("http", "80"), ("https", "443")):
            host = host.rpartition(":")[0]
        return scheme, netloc, host, path, query, frozen, stamp, scope

    def _signature(self, secret: str, stamp: str, scope: str, canonical: str) -> str:
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        return hmac.new(self._signing_key(secret, stamp[:8]), to_sign.encode(), hashlib.sha256).hexdigest()

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key is None or self._key[:2] != (secret, day):
            key = f"AWS4{secret}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._key = (secret, day, key)
        return self._key[2]


def _canonical_query(query: dict[str, str]) -> str:
    return "&".join(sorted(
        f"{urllib.parse.quote(k, safe=_SAFE)}={urllib.parse.quote(v, safe=_SAFE)}" for k, v in query.items()
    ))


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]  # S3 answers in its 2006-03-01 namespace; some servers in none


def _text(element: ElementTree.Element | None) -> str:
    return (element.text or "") if element is not None else ""


def _child_text(element: ElementTree.Element, name: str) -> str:
    for child in element:
        if _local_name(child.tag) == name:
            return child.text or ""
    return ""


class _FallBack(Exception):
    """The fast S3 path cannot serve this backend; use s3fs."""


Store = LocalStore | FsspecStore


def open_store(
    url: str,
    endpoint_url: str | None = None,
    timeout: float = 30.0,
    credentials: tuple[str, str] | None = None,
    profile: str | None = None,
    unsigned_payload: bool = False,
) -> Store:
    """Pick the store for a source URL: a plain path or file:// is local, anything else fsspec.
    `unsigned_payload`: S3 PUT bodies are not hashed into their signature (`_Presigner.sign`).

    Raises:
        ConfigError: unknown scheme or a missing library for it.
    """
    if url.startswith("file://"):
        return LocalStore(url[len("file://") :])
    if "://" not in url:
        return LocalStore(url)
    return FsspecStore(url, endpoint_url, timeout, credentials, profile, unsigned_payload)


def _timed(clock: Callable[[], float], fn: Callable[..., T], *args) -> tuple[T, float]:
    """`fn(*args)` and the seconds it took by `clock`: a request's own time, in its thread,
    not the wait for a free thread before it (under --writeback, 1,500 small files queued
    for 4 upload threads made a PUT of milliseconds count as 3.7 s)."""
    t0 = clock()
    result = fn(*args)
    return result, clock() - t0


def _put_then(
    put_file: Callable[..., ObjectInfo | Answered | None], then: Callable[[ObjectInfo], None], *args
) -> ObjectInfo | Answered | None:
    """`put_file(*args)`, then `then(info)` in the same thread if the answer named the version."""
    info = put_file(*args)
    if isinstance(info, ObjectInfo):
        try:
            then(info)
        except Exception:  # noqa: BLE001 - the object is in the store: this must not fail (and retry) the PUT
            log.exception("after the upload of %s", info.path)
    return info


def _one_error(group: BaseExceptionGroup) -> BaseException:
    """What a nursery of part uploads raised, as one error: the first BackendError among
    its leaves (a 403 stays EACCES for the close), else the group as it is."""
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        elif isinstance(error, BackendError):
            return error
    return group


def _fetch_into(store, obj: ObjectId, start: int, end: int, into: list[memoryview]) -> int:
    """`store.fetch_into`, or `fetch` and a copy for a store without it."""
    fetch_into = getattr(store, "fetch_into", None)
    if fetch_into is not None:
        return fetch_into(obj, start, end, into)
    return _scatter(store.fetch(obj, start, end), into)


def _scatter(data, into: list[memoryview]) -> int:
    """Copy `data` into the buffers `into` in turn; returns len(data)."""
    view, at = memoryview(data), 0
    for buf in into:
        n = min(len(buf), len(view) - at)
        buf[:n] = view[at : at + n]
        at += n
    return len(view)


def _translate(e: BaseException, what: str) -> BackendError:
    """Map the many exception types of fsspec/s3fs/botocore/aiohttp onto our few."""
    if isinstance(e, BackendError):
        return e
    if isinstance(e, FileNotFoundError) or (isinstance(e, OSError) and e.errno == errno.ENOENT):
        return ObjectNotFound(f"{what}: not found")
    if isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM)):
        return BackendPermissionDenied(f"{what}: access denied ({e})")
    if isinstance(e, (NotADirectoryError, IsADirectoryError)):
        return ObjectNotFound(f"{what}: {e}")
    if isinstance(e, OSError) and e.errno in _REFUSALS:
        return BackendRefused(f"{what}: {e.strerror or e}", e.errno)
    status = _http_status(e)
    if status == 404:
        return ObjectNotFound(f"{what}: not found")
    if status == 403:
        return BackendPermissionDenied(f"{what}: access denied ({e})")
    name = type(e).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        # botocore found no keys: as permanent as refused ones, and the fix is the user's.
        return BackendPermissionDenied(
            f"{what}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or a dataset's profile= or access_key_file=/secret_key_file= (docs/configuration.md)")
    if isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
        return BackendUnavailable(f"{what}: backend unreachable ({name}: {e})")
    return BackendError(f"{what}: {name}: {e}")


# Errors that another attempt cannot fix.
_PERMANENT = (ObjectNotFound, ObjectChanged, BackendPermissionDenied, BackendRefused)

# Local (and NAS) refusals of a change that have an errno of their own for the caller.
_REFUSALS = frozenset({
    errno.ENOTEMPTY, errno.EEXIST, errno.EXDEV, errno.ENOSPC,
    errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EINVAL,
})


def _error_code(e: BaseException) -> str | None:
    """The S3 error code ("NoSuchUpload") of a botocore ClientError, if `e` is one."""
    response = getattr(e, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _multipart_etag(etags: list[str]) -> str | None:
    """The ETag S3 gives the object completed from parts of these ETags: the MD5 of their
    MD5s, then "-" and how many. None if a part's ETag is not an MD5 (SSE-KMS, some stores)."""
    digests = []
    for etag in etags:
        etag = etag.strip('"')
        if len(etag) != 32:
            return None
        try:
            digests.append(bytes.fromhex(etag))
        except ValueError:
            return None
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(etags)}"


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError, if `e` is one."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


# S3 takes at most this many parts in one multipart upload.
MAX_PARTS = 10_000

# After the backend stops answering, fail new requests at once for this long
# instead of making every miss wait out its own timeout; then let one request
# through as a probe (the others still fail fast) until one succeeds.
DOWN_COOLDOWN = 2.0


class Backend:
    """A store driven from trio with bounded concurrency, time and retries.

    Each request has one deadline, `timeout` seconds, that covers waiting for a
    slot and all its attempts (at most `retries` + 1), so a miss fails within
    --backend-timeout whatever the backend does. Every method checkpoints.
    Errors are `BackendError` subclasses only.
    """

    def __init__(
        self, store: Store, concurrency: int, timeout: float, retries: int, clock=time.monotonic, upload_concurrency: int = 4
    ):
        self.store = store
        self.source = store.url
        self.timeout = timeout
        self.retries = retries
        # Reads (GETs, stats, listings) run in these threads, `concurrency` at once: a
        # lighter hop than trio.to_thread (see cachefs.threads), paid on every miss.
        self._read_threads = BlockingThreads(concurrency, "cachefs backend")
        # Uploads have their own threads: a big upload must not hold up reads' misses. Not
        # trio.to_thread: its hop (context copy, limiter, thread cache) was a twentieth of
        # the daemon's CPU when writing small files under --writeback.
        self._upload_threads = BlockingThreads(upload_concurrency, "cachefs upload")
        # Changes sent from either (a thread, or the trio thread: `fn_async`), so many at once.
        self._upload_slots = trio.CapacityLimiter(upload_concurrency)
        self._clock = clock
        self._down_until: float | None = None  # None while the backend answers
        self._probing = False

    @property
    def is_down(self) -> bool:
        """True while requests fail fast: in the cool-down, or while a probe is out."""
        return self._down_until is not None and (self._clock() < self._down_until or self._probing)

    async def _call(self, op: str, what: str, fn: Callable[..., T], *args) -> T:
        if self.is_down:
            metrics.BACKEND_REQUESTS.labels(op, "skipped").inc()
            raise BackendUnavailable(f"{what}: backend is down (probing it again shortly)")
        probe = self._down_until is not None
        self._probing |= probe
        try:
            return await self._attempts(op, what, fn, *args)
        finally:
            if probe:
                self._probing = False

    async def _attempts(
        self, op: str, what: str, fn: Callable[..., T], *args, change: bool = False,
        fn_async: Callable[..., Awaitable[T]] | None = None,
    ) -> T:
        """Run `fn(*args)` in a thread, retried up to --backend-retries times.
        `fn_async` (a change only): each attempt is `await fn_async(*args)` instead,
        until it raises NotHandled: then `fn`, in a thread, from then on.

        A read has one deadline, --backend-timeout, over all its attempts, and the
        attempt running at it is abandoned: a read has no side effects. A `change`
        is never abandoned (a PUT left running could land after a later one and undo
        it): each of its attempts is bounded by the store's own connect and read
        timeouts instead, it runs in the upload slots, and it neither trips nor
        clears the breaker that fails reads fast (`is_down`).
        """
        deadline = math.inf if change else trio.current_time() + self.timeout
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            error: BackendError | None = None
            with trio.move_on_at(deadline):
                try:
                    if change:
                        async with self._upload_slots:
                            if fn_async is not None:
                                try:
                                    t0 = self._clock()
                                    result = await fn_async(*args)
                                    seconds = self._clock() - t0
                                except NotHandled as e:
                                    log.debug("%s %s: through a thread (%s)", op, what, e)
                                    fn_async = None
                            if fn_async is None:
                                result, seconds = await self._upload_threads.run(_timed, self._clock, fn, *args)
                    else:
                        result, seconds = await self._read_threads.run(_timed, self._clock, fn, *args,
                                                                       abandon_on_cancel=True)
                except Exception as e:  # noqa: BLE001 - translated right here
                    error = _translate(e, what)
                else:
                    metrics.BACKEND_REQUESTS.labels(op, "ok").inc()
                    metrics.BACKEND_SECONDS.labels(op).observe(seconds)
                    if not change:
                        self._down_until = None
                    return result
            if error is None:
                error = BackendUnavailable(f"{what}: no answer from the backend within {self.timeout:g}s")
            metrics.BACKEND_REQUESTS.labels(op, "notfound" if isinstance(error, ObjectNotFound) else "error").inc()
            pause = delay * (1 + random.random())
            if isinstance(error, _PERMANENT) or attempt > self.retries or trio.current_time() + pause >= deadline:
                if not change:
                    # Any answer, even "not found", means the backend is up.
                    self._down_until = self._clock() + DOWN_COOLDOWN if isinstance(error, BackendUnavailable) else None
                raise error
            log.warning("%s %s failed (attempt %d of %d), retrying: %s", op, what, attempt, self.retries + 1, error)
            await trio.sleep(pause)
            delay = min(delay * 4, 2.0)

    def close(self) -> None:
        """Close the store's connections; the backend is not used after."""
        self._read_threads.close()
        self._upload_threads.close()
        try:
            self.store.close()
        except Exception:  # noqa: BLE001 - closing is best effort: the process may be going anyway
            log.warning("closing %s failed", self.source, exc_info=True)

    async def stat(self, path: str) -> ObjectInfo:
        return await self._call("stat", path or "/", self.store.stat, path)

    async def check_name(self, path: str) -> ObjectInfo:
        """`stat` of a name that is probably not there: the store may ask faster for that."""
        return await self._call("stat", path or "/", self.store.check_name, path)

    async def list_dir(self, path: str) -> list[ObjectInfo]:
        return await self._call("list", path or "/", self.store.list_dir, path)

    async def fetch(self, obj: ObjectId, start: int, end: int) -> bytes:
        """Read bytes [start, end) of exactly this object version.

        Raises:
            ObjectChanged: the backend holds another version now.
            ValueError: not a non-empty range inside the object (a caller's bug; nothing is fetched).
        """
        if not 0 <= start < end <= obj.size:
            raise ValueError(f"{obj.path}: bad range [{start}, {end}) of an object of {obj.size} bytes")
        data = await self._call("get", f"{obj.path}[{start}:{end}]", self.store.fetch, obj, start, end)
        if len(data) != end - start:
            raise ObjectChanged(f"{obj.path}: short read at {start} ({len(data)} of {end - start} bytes)")
        metrics.BACKEND_READ_BYTES.inc(len(data))
        return data

    # -- changes (read-write datasets) --------------------------------------------

    async def _change(
        self, op: str, what: str, fn: Callable[..., T], *args, fn_async: Callable[..., Awaitable[T]] | None = None,
    ) -> T:
        """Run a change to the backend with bounded retries (see `_attempts`)."""
        return await self._attempts(op, what, fn, *args, change=True, fn_async=fn_async)

    def puts_from_trio(self, size: int) -> bool:
        """True if `upload` of a file of `size` bytes sends it from the trio thread (then
        it takes no `after_put`)."""
        return size <= ASYNC_PUT_MAX and getattr(self.store, "puts_async", False)

    @property
    def takes_parts(self) -> bool:
        """True if files above the part size go up as multipart uploads (S3)."""
        return bool(getattr(self.store, "is_s3", False))

    async def upload(
        self, path: str, staged: str, size: int, part_size: int, early: EarlyParts | None = None,
        after_put: Callable[[ObjectInfo], None] | None = None,
    ) -> Written:
        """Make `path` hold the bytes of local file `staged` (`size` bytes), whole or not
        at all: one PUT up to `part_size`, else a multipart upload (parts in parallel
        within the upload slots), which S3 shows only once completed. `early`: parts
        already sent while the file was written; those still true of its bytes are
        kept, the rest sent now. A file of at most ASYNC_PUT_MAX goes from the trio
        thread where the store can (`puts_from_trio`; not with `after_put`). Returns the
        new object's attributes (its version): from the PUT's answer when it holds an
        ETag (S3), else from a HEAD after, which may show another writer's object
        (`Written.ours` False), told apart by its ETag or its time where it can be.
        `after_put(info)`: run in the PUT's thread once a single PUT's answer named the
        version (blocking; an exception it raises is logged, never an upload's failure).

        Raises:
            BackendError: after bounded retries of a request; a multipart upload is aborted.
        """
        store = self.store
        count = -(-size // part_size)
        if early is not None and (size <= part_size or count > MAX_PARTS):
            await self.abort_parts(path, early)
            early = None
        if early is not None:
            async with early.starting:  # a part in flight may be starting the multipart upload
                pass
            if early.upload_id is None:
                await early.settled()  # a part not begun yet may still start one
            if early.upload_id is None:
                early = None  # none was sent
        if size <= part_size or not self.takes_parts:
            if after_put is None:
                put_async = store.put_file_async if self.puts_from_trio(size) else None
                info = await self._change("put", path, store.put_file, path, staged, fn_async=put_async)
            else:
                info = await self._change("put", path, _put_then, store.put_file, after_put, path, staged)
        else:
            if count > MAX_PARTS:
                part_size = -(-size // MAX_PARTS)
                count = -(-size // part_size)
            upload_id = early.upload_id if early is not None else None
            if upload_id is None:
                upload_id = await self._change("put", path, store.start_multipart, path)
            etags = [""] * count
            try:
                async def put_part(index: int) -> None:
                    etags[index] = await self.put_part(path, upload_id, index, part_size, staged, size)

                try:
                    async with trio.open_nursery() as nursery:
                        if early is None:
                            for index in range(count):
                                nursery.start_soon(put_part, index)
                        else:
                            # The parts never sent go at once, beside those still in flight (the
                            # last ones the writer left behind): waiting for those first held up
                            # every close by a part's time.
                            in_flight = set(early.sending)
                            for index in range(count):
                                if index not in early.etags and index not in in_flight:
                                    nursery.start_soon(put_part, index)
                            await early.settled()
                            for index in range(count):
                                if index in early.etags:
                                    etags[index] = early.etags[index]
                                elif index in in_flight:
                                    nursery.start_soon(put_part, index)  # failed, or written into since
                            early.forget()  # this upload completes or aborts it: no later attempt may reuse its parts
                except BaseExceptionGroup as group:
                    raise _one_error(group)  # a part's error as itself: its errno, not "unexpected"
                info = await self._change("put", path, store.finish_multipart, path, upload_id, etags, size)
            except BaseException:
                with trio.CancelScope(shield=True):
                    if early is not None:
                        early.forget()
                    await self._abort(path, upload_id)
                raise
        metrics.BACKEND_WRITTEN_BYTES.inc(size)
        if isinstance(info, ObjectInfo):
            return Written(info, ours=True)  # the answer named the version: no HEAD (a request, and a round trip, per file)
        seen = await self._change("stat", path, store.stat, path)
        if isinstance(info, Answered) and not info.could_be(seen, size):
            # Another writer's object landed between our PUT and this HEAD: it is the one
            # there (the last close won), and our bytes are not of its version.
            log.info("%s: replaced by another writer's object right after its upload", path)
            return Written(seen, ours=False)
        return Written(seen, ours=True)

    async def start_parts(self, path: str) -> str:
        """Begin a multipart upload of `path` (for parts sent before the file is closed)."""
        return await self._change("put", path, self.store.start_multipart, path)

    async def put_part(self, path: str, upload_id: str, index: int, part_size: int, staged: str, size: int) -> str:
        """Send part `index` (from 0) of a file of `size` bytes in `staged`; its ETag."""
        start = index * part_size
        end = min(start + part_size, size)
        return await self._change(
            "put", f"{path} part {index + 1}", self.store.put_part, path, upload_id, index + 1, staged, start, end
        )

    async def abort_parts(self, path: str, early: EarlyParts) -> None:
        """Drop the parts sent early (the file ended up small, or is gone)."""
        await early.settled()
        if early.upload_id is not None:
            upload_id = early.upload_id
            early.forget()
            await self._abort(path, upload_id)

    async def _abort(self, path: str, upload_id: str) -> None:
        try:
            await self._change("put", path, self.store.abort_multipart, path, upload_id)
        except BackendError as e:
            log.warning("could not abort the multipart upload of %s (the bucket's lifecycle rule "
                        "should clean it up): %s", path, e)

    async def delete(self, path: str) -> None:
        await self._change("delete", path, self.store.delete, path)

    async def make_dir(self, path: str) -> None:
        await self._change("mkdir", path, self.store.make_dir, path)

    async def remove_dir(self, path: str) -> None:
        await self._change("rmdir", path, self.store.remove_dir, path)

    async def rename(self, old: str, new: str, kind: Kind) -> Answered | None:
        """Rename `old` to `new`; what the answer said of the object made (an S3 copy), if anything."""
        return await self._change("rename", f"{old} -> {new}", self.store.rename, old, new, kind)

    @property
    def renames_keep_version(self) -> bool:
        """Whether a renamed file keeps its version (a local file keeps its size and mtime)."""
        return getattr(self.store, "renames_keep_version", False)

    @property
    def keeps_mtime(self) -> bool:
        """Whether `set_mtime` sets anything."""
        return getattr(self.store, "keeps_mtime", False)

    async def set_mtime(self, path: str, mtime: float) -> None:
        await self._change("setattr", path, self.store.set_mtime, path, mtime)

    async def fetch_into(self, obj: ObjectId, start: int, into: list[memoryview]) -> None:
        """Read bytes [start, start + the buffers' total length) of exactly this object
        version into the buffers `into`, in turn, with one request and without a buffer
        of our own (the S3 fast path receives straight into them).

        If this raises, a thread may still be writing into the buffers (one abandoned
        at the deadline): the caller must not reuse them.

        Raises:
            ObjectChanged: the backend holds another version now, or the read came short.
            ValueError: not a non-empty range inside the object (nothing is fetched).
        """
        end = start + sum(len(b) for b in into)
        if not 0 <= start < end <= obj.size:
            raise ValueError(f"{obj.path}: bad range [{start}, {end}) of an object of {obj.size} bytes")
        n = await self._call("get", f"{obj.path}[{start}:{end}]", _fetch_into, self.store, obj, start, end, into)
        if n != end - start:
            raise ObjectChanged(f"{obj.path}: short read at {start} ({n} of {end - start} bytes)")
        metrics.BACKEND_READ_BYTES.inc(n)
