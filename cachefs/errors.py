"""Typed errors. Only fuse_ops translates these into errnos; cli into exit codes."""


class CachefsError(Exception):
    """Base class of every error cachefs raises on purpose."""


class ConfigError(CachefsError):
    """Bad user input: one sentence that says what to fix, no traceback."""

    def __init__(self, msg: str, exitcode: int = 2):
        super().__init__(msg)
        self.exitcode = exitcode


class CacheDirInUse(CachefsError):
    """Another process owns the SSD tier's directory; the message names it and, if known, the owner's pid."""


class ChunkCorrupt(CachefsError):
    """A cached chunk failed its header, length or checksum check; never serve it."""


class BackendError(CachefsError):
    """The backend failed after bounded retries (timeouts, 5xx, connection errors)."""


class BackendUnavailable(BackendError):
    """The backend could not be reached within the request timeout."""


class ObjectNotFound(BackendError):
    """The object or directory does not exist in the backend."""


class ObjectChanged(BackendError):
    """The object changed in the backend since it was opened (version mismatch)."""


class BackendPermissionDenied(BackendError):
    """The backend refused the credentials for this object or bucket."""


class PeerError(CachefsError):
    """A peer could not serve a chunk: unreachable, refused, timed out or sent bad data.

    Never reaches a reader: the peer tier turns it into a miss.
    """

    def __init__(self, msg: str, code: str = ""):
        super().__init__(msg)
        self.code = code


class BackendRefused(BackendError):
    """The backend refused a change for a reason POSIX has an errno for (a directory
    not empty, a name that exists, a rename it cannot do): `errno` says which."""

    def __init__(self, msg: str, errno: int):
        super().__init__(msg)
        self.errno = errno


class StagingFull(CachefsError):
    """The staging area is full of files still open for write: nothing being uploaded
    would make room (ENOSPC). Closed files never cause it: their writers wait."""
