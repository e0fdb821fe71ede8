"""One node, many datasets: real mounts serving several datasets at
MOUNTPOINT/NAME, changed at run time through the control socket."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import hermetic_env

pytestmark = pytest.mark.integration

CHUNK = 256 << 10
SMALL = ("--chunk-size", "256K", "--mem-size", "32M", "--cache-size", "128M")


def _keys_files(tmp_path, gateway, name: str) -> list[str]:
    """access_key_file=…,secret_key_file=… options for `gateway`, in files only root can read."""
    out = []
    for option, value in (("access_key_file", gateway.access_key), ("secret_key_file", gateway.secret_key)):
        path = tmp_path / f"{name}-{option}"
        path.write_text(value)
        path.chmod(0o600)
        out.append(f"{option}={path}")
    return out


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "cachefs"]


def _control(mountpoint: str, op: str, **args):
    """One request to the mount's control socket, in-process (the CLI costs a Python start-up)."""
    from cachefs import control_client

    return control_client.request(control_client.socket_for(mountpoint), op, args)


def _fds_and_threads(pid: int) -> tuple[list[str], int]:
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return sorted(fds), len(os.listdir(f"/proc/{pid}/task"))


def _settled(pid: int) -> tuple[list[str], int]:
    """The process's open files and thread count once they stop changing: trio's idle
    worker threads exit a few seconds after their last job."""
    last = _fds_and_threads(pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(2)
        now = _fds_and_threads(pid)
        if now == last:
            return now
        last = now
    return last


def test_two_datasets_with_their_own_credentials(tmp_path, local_source, s3_source, s3_source_noetag, cachefs_mount, run_cachefs):
    """A local dataset and two S3 datasets on two servers with different keys, one
    from key files and one from an AWS profile, none in the environment, side by
    side under one mount."""
    local_data, a_data, b_data = os.urandom(3 * CHUNK + 7), os.urandom(2 * CHUNK), os.urandom(CHUNK + 1)
    local_source.write("dir/l.bin", local_data)
    s3_source.write("x/a.bin", a_data)
    s3_source_noetag.write("b.bin", b_data)
    ga, gb = s3_source.backend, s3_source_noetag.backend
    assert ga.secret_key != gb.secret_key
    specs = [
        f"local={local_source.url}",
        ",".join([f"feats={s3_source.url}", "subdir=x", f"endpoint={ga.endpoint_url}", *_keys_files(tmp_path, ga, "a")]),
        f"other={s3_source_noetag.url},endpoint={gb.endpoint_url},profile=team-b",
    ]
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(f"[team-b]\naws_access_key_id = {gb.access_key}\naws_secret_access_key = {gb.secret_key}\n")
    credentials.chmod(0o600)
    m = cachefs_mount(None, *SMALL, *(arg for spec in specs for arg in ("--dataset", spec)),
                      env={"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_CONFIG_FILE": os.devnull})
    assert sorted(os.listdir(m.mountpoint)) == ["feats", "local", "other"]
    assert os.listdir(os.path.join(m.mountpoint, "feats")) == ["a.bin"]  # the subdir, nothing beside it
    for path, data in (("local/dir/l.bin", local_data), ("feats/a.bin", a_data), ("other/b.bin", b_data)):
        with open(os.path.join(m.mountpoint, path), "rb") as f:
            assert f.read() == data
        assert os.getxattr(os.path.join(m.mountpoint, path), "user.cachefs.dataset") == path.split("/")[0].encode()
    for path in ("local/new", "feats/a.bin"):
        with pytest.raises(OSError) as e:
            open(os.path.join(m.mountpoint, path), "wb")
        assert e.value.errno == errno.EROFS
    # No secret in the process table or the log.
    with open(f"/proc/{m.proc.pid}/cmdline", "rb") as f:
        cmdline = f.read()
    for secret in (ga.secret_key, gb.secret_key):
        assert secret.encode() not in cmdline
        assert secret not in m.log_path.read_text()

    status = run_cachefs("status", m.mountpoint, "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    print("\ncachefs status MOUNTPOINT --json:\n" + json.dumps(doc, indent=2))
    assert sorted(d["name"] for d in doc["datasets"]) == ["feats", "local", "other"]
    assert all(secret not in status.stdout for secret in (ga.secret_key, gb.secret_key))


def test_datasets_come_and_go_without_disturbing_a_reader(tmp_path, local_source, cachefs_mount, run_cachefs):
    data = os.urandom(16 * CHUNK)
    local_source.write("stream.bin", data)
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.txt").write_bytes(b"other dataset")
    m = cachefs_mount(None, *SMALL, "--dataset", f"main={local_source.url}")

    errors: list[BaseException] = []
    longest_pause = [0.0]
    passes = [0]
    stop = threading.Event()

    def stream() -> None:
        try:
            while not stop.is_set():
                got = bytearray()
                with open(os.path.join(m.mountpoint, "main", "stream.bin"), "rb", buffering=0) as f:
                    last = time.monotonic()
                    while block := f.read(64 << 10):
                        got += block
                        now = time.monotonic()
                        longest_pause[0] = max(longest_pause[0], now - last)
                        last = now
                assert bytes(got) == data
                passes[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        res = run_cachefs("dataset", "add", m.mountpoint, f"extra={other}")  # once through the CLI
        assert res.returncode == 0, res.stderr
        assert run_cachefs("dataset", "remove", m.mountpoint, "extra").returncode == 0
        for _ in range(20):
            _control(m.mountpoint, "dataset.add", spec=f"extra={other}")
            assert Path(m.mountpoint, "extra", "o.txt").read_bytes() == b"other dataset"
            _control(m.mountpoint, "dataset.remove", name="extra")
    finally:
        stop.set()
        reader.join(60)
    assert not errors, errors
    assert passes[0] >= 1
    print(f"\nreader passes: {passes[0]}, longest pause between reads: {longest_pause[0] * 1000:.0f} ms")
    assert longest_pause[0] < 1.0
    assert sorted(os.listdir(m.mountpoint)) == ["main"]


# 0: the kernel asks getattr before every read (and gets ESTALE there); 3600: the read itself gets it.
@pytest.mark.parametrize("attr_ttl", ["0", "3600"])
def test_a_dataset_with_open_files_is_removed_only_with_force(tmp_path, local_source, cachefs_mount, run_cachefs, attr_ttl):
    local_source.write("f.txt", b"held open")
    m = cachefs_mount(None, *SMALL, "--attr-ttl", attr_ttl, "--dataset", f"d={local_source.url}")
    with open(os.path.join(m.mountpoint, "d", "f.txt"), "rb") as f:
        res = run_cachefs("dataset", "remove", m.mountpoint, "d")
        assert res.returncode != 0
        assert "open" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        listing = json.loads(run_cachefs("dataset", "list", m.mountpoint, "--json").stdout)
        assert [(d["name"], d["open_files"]) for d in listing] == [("d", 1)]
        res = run_cachefs("dataset", "remove", m.mountpoint, "d", "--force")
        assert res.returncode == 0, res.stderr
        with pytest.raises(OSError) as e:
            os.pread(f.fileno(), 4, 0)
        assert e.value.errno == errno.ESTALE
    assert os.listdir(m.mountpoint) == []


def test_adding_and_removing_a_dataset_50_times_leaks_no_fd_or_thread(tmp_path, local_source, cachefs_mount):
    local_source.write("f.txt", b"x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "g.txt").write_bytes(b"g")
    m = cachefs_mount(None, *SMALL, "--dataset", f"main={local_source.url}")

    def cycle() -> None:
        _control(m.mountpoint, "dataset.add", spec=f"extra={other}")
        assert Path(m.mountpoint, "extra", "g.txt").read_bytes() == b"g"
        _control(m.mountpoint, "dataset.remove", name="extra")

    cycle()  # the first one starts what stays: the kernel's caches, the SSD tier's kept files
    before = _settled(m.proc.pid)
    for _ in range(50):
        cycle()
    after = _settled(m.proc.pid)
    print(f"\nopen files, threads before: {len(before[0])}, {before[1]}; after 50 add/remove: {len(after[0])}, {after[1]}")
    assert after == before


def test_symlinks_and_names_never_lead_out_of_a_dataset(tmp_path, cachefs_mount):
    root = tmp_path / "bucket"
    (root / "ds" / "sub").mkdir(parents=True)
    (root / "secret.txt").write_bytes(b"outside the dataset")
    (root / "ds" / "sub" / "in.txt").write_bytes(b"inside")
    os.symlink("sub/in.txt", root / "ds" / "inside-link")
    os.symlink("../secret.txt", root / "ds" / "up-link")
    os.symlink(str(root / "secret.txt"), root / "ds" / "abs-link")
    os.symlink("../../ds/sub/in.txt", root / "ds" / "sub" / "roundabout")  # up and back in: stays inside
    m = cachefs_mount(None, *SMALL, "--dataset", f"d={root},subdir=ds")
    d = os.path.join(m.mountpoint, "d")
    assert sorted(os.listdir(d)) == ["abs-link", "inside-link", "sub", "up-link"]
    assert Path(d, "inside-link").read_bytes() == b"inside"
    for name in ("up-link", "abs-link"):
        with pytest.raises(OSError) as e:
            os.readlink(os.path.join(d, name))
        assert e.value.errno == errno.EACCES
        with pytest.raises(OSError):
            open(os.path.join(d, name), "rb")
    with pytest.raises(OSError) as e:
        os.stat(os.path.join(d, "x" * 256))
    assert e.value.errno == errno.ENAMETOOLONG
    for name in ("..", "%2e%2e", "..%2fsecret.txt"):
        path = os.path.join(d, name, "secret.txt")
        assert not os.path.exists(path) or Path(path).read_bytes() != b"outside the dataset"


def test_a_node_that_fails_to_start_leaves_nothing_behind(tmp_path, local_source, run_cachefs):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    res = run_cachefs("mount", mnt, "--cache-dir", cache, "--dataset", f"good={local_source.url}",
                      "--dataset", f"bad={tmp_path / 'missing'}")
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("cachefs: error:")]
    assert len(errors) == 1 and "missing: no such bucket, prefix or directory" in errors[0]
    assert not os.path.ismount(mnt)
    assert not list((cache / "run").glob("*.sock")) if (cache / "run").exists() else True
    # And the cache dir is free: a second node can take it at once.
    res = subprocess.run(["flock", "-n", str(cache / "lock"), "true"], capture_output=True, env=hermetic_env())
    assert res.returncode == 0


def test_a_dataset_quota_bounds_its_ssd_bytes(tmp_path, local_source, cachefs_mount):
    data = os.urandom(12 * CHUNK)
    local_source.write("big.bin", data)
    free = tmp_path / "free"
    free.mkdir()
    (free / "f.bin").write_bytes(data)
    m = cachefs_mount(None, *SMALL, "--dataset", f"capped={local_source.url},quota=1M", "--dataset", f"free={free}")
    for name in ("capped/big.bin", "free/f.bin"):
        assert Path(m.mountpoint, name).read_bytes() == data
    held = {name: m.metric("cachefs_source_cached_bytes", source=name, tier="disk") for name in ("capped", "free")}
    print(f"\nSSD bytes held per dataset after reading 3 MiB of each, capped at 1M: {held}")
    assert 0 < held["capped"] <= 1 << 20
    assert held["free"] > 3 << 20  # 12 chunks with their headers


def test_residency_of_a_file_and_a_directory_through_getxattr(local_source, cachefs_mount):
    data = os.urandom(8 * CHUNK)
    local_source.write("d/f.bin", data)
    local_source.write("d/small.txt", b"x" * 1000)
    m = cachefs_mount(None, *SMALL, "--read-ahead", "0", "--dataset", f"ds={local_source.url}")
    f = Path(m.mountpoint, "ds", "d", "f.bin")

    def cached(path: Path) -> dict:
        return json.loads(os.getxattr(path, "user.cachefs.cached"))

    first = cached(f)
    assert list(first.pop("nodes").values()) == [0] and first.pop("unanswered") == []  # this mount alone, no peers
    assert first == {"files": 1, "bytes": len(data), "cached_bytes": 0, "ratio": 0.0, "chunks": 8, "cached_chunks": 0}
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)  # no kernel read-ahead: chunks 0-2 only
    try:
        buf = mmap.mmap(-1, 3 * CHUNK)  # page-aligned, as O_DIRECT wants
        assert os.preadv(fd, [buf], 0) == 3 * CHUNK
    finally:
        os.close(fd)
    got = cached(f)
    print(f"\ngetfattr -n user.cachefs.cached after reading 3 of 8 chunks: {got}")
    assert (got["cached_bytes"], got["cached_chunks"], got["ratio"]) == (3 * CHUNK, 3, 0.375)
    assert list(got["nodes"].values()) == [3 * CHUNK]
    assert f.read_bytes() == data
    assert cached(f)["ratio"] == 1.0
    folder = cached(f.parent)
    assert (folder["files"], folder["bytes"], folder["cached_bytes"]) == (2, len(data) + 1000, len(data))
    out = subprocess.run(["getfattr", "--only-values", "-n", "user.cachefs.cached", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ratio"] == 1.0
    rows = json.loads(subprocess.run([*_cli(), "dataset", "list", m.mountpoint, "--json"], capture_output=True,
                                     text=True, env=hermetic_env()).stdout)
    assert rows[0]["cached_bytes"]["disk"] > len(data)  # with chunk headers
    # The whole subtree of a path, and of the mount with --deep, from one walk.
    sub = json.loads(subprocess.run([*_cli(), "status", str(Path(m.mountpoint, "ds")), "--json"], capture_output=True,
                                    text=True, env=hermetic_env()).stdout)["path"]
    assert (sub["path"], sub["files"], sub["bytes"], sub["cached_bytes"]) == ("ds", 2, len(data) + 1000, len(data))
    out = subprocess.run([*_cli(), "status", m.mountpoint, "--deep"], capture_output=True, text=True, env=hermetic_env())
    assert out.returncode == 0, out.stderr
    assert "    ds: 2 files, 2.0M of 2.0M cached (100.0%)" in out.stdout, out.stdout
    # How its reads were served since start: f.bin's 8 chunks came from the backend the first
    # time (3, then 5), the whole-file read found 3 in MEM; nothing was evicted.
    deep = json.loads(subprocess.run([*_cli(), "status", m.mountpoint, "--deep", "--json"], capture_output=True,
                                     text=True, env=hermetic_env()).stdout)
    (ds,) = deep["datasets"]
    assert ds["chunk_reads"]["backend"] == 8 and ds["chunk_reads"]["mem"] >= 3, ds
    assert ds["hit_ratio"]["backend"] == round(8 / sum(ds["chunk_reads"].values()), 4)
    assert set(ds["evictions"].values()) == {0}
    assert (ds["residency"]["bytes"], ds["residency"]["cached_bytes"]) == (len(data) + 1000, len(data))
    assert "chunk reads served by mem" in out.stdout and "evicted chunks: mem 0, disk 0" in out.stdout, out.stdout


def test_a_dataset_directory_has_one_inode_however_it_is_reached(local_source, cachefs_mount):
    local_source.write("sub/f.txt", b"f")
    m = cachefs_mount(None, *SMALL, "--dataset", f"ds={local_source.url}")
    top = os.stat(Path(m.mountpoint, "ds")).st_ino
    assert os.stat(Path(m.mountpoint, "ds", "sub", "..")).st_ino == top
    assert os.stat(Path(m.mountpoint, "ds", ".")).st_ino == top
    assert os.getxattr(Path(m.mountpoint, "ds"), "user.cachefs.path") == b"ds"


def test_status_text_shows_each_datasets_reads_evictions_and_holders():
    from cachefs.status import render_node

    row = {"name": "ds", "url": "s3://b/ds", "read_only": True, "open_files": 0,
           "chunk_reads": {"mem": 3, "peer": 1, "backend": 0}, "hit_ratio": {"mem": 0.75, "peer": 0.25, "backend": 0.0},
           "evictions": {"mem": 2, "disk": 0},
           "residency": {"files": 2, "bytes": 8 << 20, "cached_bytes": 6 << 20, "ratio": 0.75, "chunks": 2,
                         "cached_chunks": 2, "nodes": {"mount:a:1": 2 << 20, "10.0.0.5:7070": 4 << 20},
                         "unanswered": ["10.0.0.6:7070"]}}
    fresh = {"name": "new", "url": "/data", "read_only": False, "open_files": 0,
             "chunk_reads": {"mem": 0, "backend": 0}, "hit_ratio": {"mem": None, "backend": None}, "evictions": {"mem": 0}}
    text = render_node("/mnt", {"version": "x", "datasets": [row, fresh]})
    assert "  ds: 4 chunk reads served by mem 75.0%, peer 25.0%, backend 0.0%; evicted chunks: mem 2, disk 0" in text
    assert "    ds: 2 files, 6.0M of 8.0M cached (75.0%), 2/2 chunks" in text
    assert "      held by: 10.0.0.5:7070 4.0M, mount:a:1 2.0M" in text
    assert "no answer from: 10.0.0.6:7070 (counted as holding none)" in text
    assert "  new: 0 chunk reads; evicted chunks: mem 0" in text
