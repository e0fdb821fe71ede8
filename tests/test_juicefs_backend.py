"""The test backend itself: juicefs gateway as S3, juicefs mount, and the source fixtures."""

import hashlib
import os
import socket
import subprocess
import sys

import pytest
import s3fs

import juicefs_backend  # registered by conftest (scripts/juicefs_backend.py)

MiB = 1024 * 1024


def test_s3_write_list_read(s3_source):
    fs = s3_source.fs
    small = os.urandom(1000)
    big = os.urandom(5 * MiB + 123)
    s3_source.write("dir/small.bin", small)
    s3_source.write("dir/sub/big.bin", big)
    s3_source.write("top.txt", b"")

    listing = fs.ls(s3_source.prefix, detail=True)
    by_name = {entry["name"].rsplit("/", 1)[1]: entry for entry in listing}
    assert sorted(by_name) == ["dir", "top.txt"]
    assert by_name["dir"]["type"] == "directory"
    assert by_name["top.txt"]["size"] == 0
    assert sorted(fs.find(s3_source.prefix)) == [
        s3_source.key("dir/small.bin"), s3_source.key("dir/sub/big.bin"), s3_source.key("top.txt"),
    ]
    assert s3_source.info("dir/sub/big.bin")["size"] == len(big)

    assert s3_source.read("dir/small.bin") == small
    assert s3_source.read("dir/sub/big.bin") == big
    assert s3_source.read("top.txt") == b""


def test_s3_ranged_reads(s3_source):
    data = os.urandom(5 * MiB)
    s3_source.write("big.bin", data)
    key = s3_source.key("big.bin")
    fs = s3_source.fs
    # s3fs's third positional argument is version_id, so start/end go by keyword.
    assert fs.cat_file(key, start=0, end=1) == data[:1]
    assert fs.cat_file(key, start=MiB - 7, end=3 * MiB + 11) == data[MiB - 7:3 * MiB + 11]
    assert fs.cat_file(key, start=len(data) - 100, end=len(data)) == data[-100:]
    # A range past the end is clipped, as on S3.
    assert fs.cat_file(key, start=len(data) - 10, end=len(data) + 1000) == data[-10:]


def test_s3_etags(s3_source, s3_source_noetag):
    first, second = b"a" * 100, b"b" * 100
    s3_source.write("obj", first)
    etag1 = s3_source.info("obj")["ETag"]
    s3_source.write("obj", second)
    etag2 = s3_source.info("obj")["ETag"]
    print(f"--keep-etag: {etag1!r} then {etag2!r} after overwrite")
    assert etag1 == f'"{hashlib.md5(first).hexdigest()}"'
    assert etag2 != etag1

    # Multipart upload: S3-style "<md5 of part md5s>-<parts>".
    s3_source.fs.pipe_file(s3_source.key("multi"), os.urandom(12 * MiB), chunksize=5 * MiB)
    multi = s3_source.info("multi")["ETag"]
    print(f"--keep-etag multipart: {multi!r}")
    assert multi.strip('"').endswith("-3")

    s3_source_noetag.write("obj", first)
    empty = s3_source_noetag.info("obj")["ETag"]
    s3_source_noetag.write("obj", second)
    print(f"no --keep-etag: {empty!r}, after overwrite {s3_source_noetag.info('obj')['ETag']!r}")
    assert empty == ""
    assert s3_source_noetag.info("obj")["ETag"] == ""
    assert s3_source_noetag.read("obj") == second


def test_s3_delete(s3_source):
    s3_source.write("a/x", b"1")
    s3_source.write("a/y", b"2")
    s3_source.delete("a/x")
    assert s3_source.fs.find(s3_source.prefix) == [s3_source.key("a/y")]
    with pytest.raises(FileNotFoundError):
        s3_source.read("a/x")


def test_s3_env_has_only_credentials(juicefs_s3):
    env = juicefs_s3.env()
    assert env == {
        "AWS_ACCESS_KEY_ID": juicefs_s3.access_key,
        "AWS_SECRET_ACCESS_KEY": juicefs_s3.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    assert juicefs_s3.endpoint_url.startswith("http://127.0.0.1:")


def test_local_source_write_read_delete(local_source):
    data = os.urandom(3 * MiB + 1)
    local_source.write("d/e/f.bin", data)
    assert os.path.isabs(local_source.url)
    assert local_source.read("d/e/f.bin") == data
    assert (local_source.root / "d" / "e" / "f.bin").read_bytes() == data
    assert local_source.mount_args == [] and local_source.env == {}
    local_source.delete("d/e/f.bin")
    assert not (local_source.root / "d" / "e" / "f.bin").exists()


def test_source_param(source):
    source.write("p/q", b"both")
    assert source.read("p/q") == b"both"
    assert source.kind in ("local", "s3")


def test_gateway_restart_keeps_data(tmp_path):
    data = os.urandom(100_000)
    with juicefs_backend.JuicefsS3(tmp_path / "gw") as gw:
        first_port = gw.port
        gw.s3fs().pipe_file(f"{gw.bucket}/k", data)
    assert gw.proc is None
    with juicefs_backend.JuicefsS3(tmp_path / "gw") as gw:
        assert gw.s3fs().cat_file(f"{gw.bucket}/k") == data
    print(f"ports {first_port} then {gw.port}")


def test_gateway_start_failure_reports_log(tmp_path):
    with juicefs_backend.JuicefsS3(tmp_path / "a") as running:
        clash = juicefs_backend.JuicefsS3(tmp_path / "b", port=running.port, startup_timeout=15)
        try:
            with pytest.raises(juicefs_backend.JuicefsError, match="already in use"):
                clash.start()
            assert clash.proc is None
        finally:
            clash.stop()


def test_serve_cli(tmp_path):
    cmd = [sys.executable, juicefs_backend.__file__, "serve", "--dir", str(tmp_path / "srv")]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            line = proc.stdout.readline()
            fields = dict(item.split("=", 1) for item in line.split())
            assert set(fields) == {"endpoint", "bucket", "access_key", "secret_key"}, line
            fs = s3fs.S3FileSystem(
                key=fields["access_key"], secret=fields["secret_key"], skip_instance_cache=True,
                client_kwargs={"endpoint_url": fields["endpoint"], "region_name": "us-east-1"},
            )
            fs.pipe_file(f"{fields['bucket']}/hello", b"world")
            assert fs.cat_file(f"{fields['bucket']}/hello") == b"world"
            proc.terminate()
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # The gateway went down with the CLI.
    port = int(fields["endpoint"].rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.integration
def test_juicefs_mount_reads_gateway_data(juicefs_s3, tmp_path):
    data = os.urandom(9 * MiB + 5)  # more than two 4 MiB JuiceFS blocks
    prefix = f"mount-{os.getpid()}"
    fs = juicefs_s3.s3fs()
    fs.pipe_file(f"{juicefs_s3.bucket}/{prefix}/sub/file.bin", data)
    fs.pipe_file(f"{juicefs_s3.bucket}/{prefix}/small", b"tiny")
    mount = juicefs_backend.JuicefsMount(juicefs_s3.workdir, tmp_path / "mnt", cache_dir=tmp_path / "jcache")
    with mount:
        root = tmp_path / "mnt" / prefix
        assert sorted(os.listdir(root)) == ["small", "sub"]
        assert (root / "sub" / "file.bin").read_bytes() == data
        assert (root / "small").read_bytes() == b"tiny"
        with open(root / "sub" / "file.bin", "rb") as f:
            f.seek(4 * MiB - 3)
            assert f.read(10) == data[4 * MiB - 3:4 * MiB + 7]
        assert juicefs_backend._mounted(tmp_path / "mnt")
    assert not juicefs_backend._mounted(tmp_path / "mnt")
    assert mount.proc is None
    for key in fs.find(f"{juicefs_s3.bucket}/{prefix}"):
        fs.rm_file(key)
