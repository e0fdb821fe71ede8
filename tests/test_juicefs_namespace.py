"""A JuiceFS-backed namespace, served both through its mount path and through its
S3 gateway; and a gateway without ETags, where the version is size + mtime."""

from __future__ import annotations

import errno
import os
import time

import pytest

pytestmark = pytest.mark.integration


class _Dir:
    """A source given by path only (the JuiceFS mount)."""

    def __init__(self, path):
        self.url = str(path)
        self.mount_args: list[str] = []
        self.env: dict[str, str] = {}


def test_juicefs_mount_path_and_gateway_serve_the_same_bytes(juicefs_s3, tmp_path, cachefs_mount):
    import juicefs_backend

    data = {f"ns/part-{i}.parquet": os.urandom(1_000_000 + i * 77_777) for i in range(3)}
    fs = juicefs_s3.s3fs()
    for key, blob in data.items():
        fs.pipe_file(f"{juicefs_s3.bucket}/{key}", blob)

    jfs = juicefs_backend.JuicefsMount(juicefs_s3.workdir, tmp_path / "jfs")
    jfs.start()
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(tmp_path / "jfs" / "ns" / "part-2.parquet") and time.monotonic() < deadline:
            time.sleep(0.2)  # the JuiceFS mount caches attributes for a second
        via_path = cachefs_mount(_Dir(tmp_path / "jfs" / "ns"), "--chunk-size", "256K")

        class ViaGateway:
            url = f"s3://{juicefs_s3.bucket}/ns"
            mount_args = ["--endpoint-url", juicefs_s3.endpoint_url]
            env = juicefs_s3.env()

        via_s3 = cachefs_mount(ViaGateway, "--chunk-size", "256K")
        for key, blob in data.items():
            name = key.split("/", 1)[1]
            for m in (via_path, via_s3):
                with open(os.path.join(m.mountpoint, name), "rb") as f:
                    assert f.read() == blob, (m.mountpoint, name)
        assert sorted(os.listdir(via_path.mountpoint)) == sorted(os.listdir(via_s3.mountpoint))
        via_path.umount()
        via_s3.umount()
    finally:
        jfs.stop()


def test_gateway_without_etags_still_detects_changes(s3_source_noetag, cachefs_mount):
    src = s3_source_noetag
    old = os.urandom(600_000)
    src.write("v.bin", old)
    assert not src.info("v.bin").get("ETag", "").strip('"')  # this gateway really has no ETags
    m = cachefs_mount(src, "--chunk-size", "256K", "--attr-ttl", "0", "--entry-ttl", "0", "--dir-ttl", "0")
    path = os.path.join(m.mountpoint, "v.bin")
    with open(path, "rb") as f:
        assert f.read(1000) == old[:1000]
        time.sleep(1.1)  # a new whole-second mtime
        new = os.urandom(600_000)
        src.write("v.bin", new)
        try:
            rest = f.read()
        except OSError as e:
            assert e.errno == errno.ESTALE
        else:
            assert rest == old[1000:]
    with open(path, "rb") as f:
        assert f.read() == new
