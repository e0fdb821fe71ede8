"""Backend changes behind a mount with long TTLs: `cachefs refresh` and
--meta-refresh make them visible, with no mix of old and new bytes."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

LONG_TTLS = ("--attr-ttl", "3600", "--dir-ttl", "3600", "--entry-ttl", "3600", "--chunk-size", "256K")


def _change(path: Path, data: bytes) -> None:
    """Replace a local file's bytes and move its mtime, as a new upload would."""
    path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_refresh_shows_changes_and_deletions_at_once(local_source, cachefs_mount, run_cachefs):
    old, new = os.urandom(600_000), os.urandom(600_000)
    local_source.write("d/f.bin", old)
    local_source.write("d/gone.txt", b"soon deleted")
    local_source.write("d/stays.txt", b"unchanged")
    m = cachefs_mount(None, *LONG_TTLS, "--dataset", f"ds={local_source.url}")
    f = Path(m.mountpoint, "ds", "d", "f.bin")
    assert f.read_bytes() == old
    assert sorted(os.listdir(f.parent)) == ["f.bin", "gone.txt", "stays.txt"]

    _change(local_source.path("d/f.bin"), new)
    local_source.delete("d/gone.txt")
    assert f.read_bytes() == old  # the TTLs are long: still the version the mount knows, whole

    res = run_cachefs("refresh", "--recursive", Path(m.mountpoint, "ds", "d"))
    assert res.returncode == 0, res.stderr
    assert "2 changed, 1 gone" in res.stdout  # f.bin, and d itself: its mtime moved when gone.txt went
    assert f.read_bytes() == new  # not a mix: the kernel's pages of the old version are gone too
    assert sorted(os.listdir(f.parent)) == ["f.bin", "stays.txt"]
    with pytest.raises(OSError) as e:
        os.stat(Path(m.mountpoint, "ds", "d", "gone.txt"))
    assert e.value.errno == errno.ENOENT
    assert Path(m.mountpoint, "ds", "d", "stays.txt").read_bytes() == b"unchanged"


def test_refresh_of_a_path_outside_any_mount_is_one_line(tmp_path, run_cachefs):
    res = run_cachefs("refresh", tmp_path)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [f"cachefs: error: {tmp_path}: not in a cachefs mount"]


def test_meta_refresh_finds_changes_in_the_background(local_source, cachefs_mount):
    old, new = b"version one", b"version two!"
    local_source.write("f.txt", old)
    m = cachefs_mount(local_source, *LONG_TTLS, "--meta-refresh", "0.5")
    f = Path(m.mountpoint, "f.txt")
    assert f.read_bytes() == old
    _change(local_source.path("f.txt"), new)
    deadline = time.monotonic() + 20
    while (got := f.read_bytes()) != new:
        assert got == old, got  # one version or the other, never a mix
        assert time.monotonic() < deadline, "the background refresh never showed the new version"
        time.sleep(0.2)
