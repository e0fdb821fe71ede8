"""Bad input gets one clear line and leaves no mount behind; a dead backend turns
misses into EIO in bounded time while cached files keep reading."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _no_cachefs_mounts() -> bool:
    with open("/proc/mounts") as f:
        return "fuse.cachefs" not in f.read()


@pytest.fixture
def mp(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        os.system(f"fusermount3 -u -z {path}")


def _check_refused(result, *needles: str) -> None:
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("cachefs: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--cache-size", "lots"], ["--cache-size", "not a size"]),
        (["--mem-size", "12Q"], ["--mem-size"]),
        (["--chunk-size", "3M"], ["--chunk-size", "power of two"]),
        (["--mem-size", "1M"], ["--mem-size", "two chunks"]),
        (["--free-space-ratio", "1.5"], ["--free-space-ratio"]),
        (["--attr-ttl", "-1"], ["--attr-ttl"]),
        (["--metrics", "nohost"], ["--metrics", "HOST:PORT"]),
    ],
)
def test_nonsense_options_are_refused(local_source, mp, tmp_path, run_cachefs, args, needles):
    r = run_cachefs("mount", local_source.url, mp, "--cache-dir", tmp_path / "c", *args)
    _check_refused(r, *needles)
    assert not os.path.ismount(mp)


def test_bad_mountpoints_are_refused(local_source, tmp_path, run_cachefs, cachefs_mount):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    r = run_cachefs("mount", local_source.url, a_file, "--cache-dir", tmp_path / "c")
    _check_refused(r, "not a directory")
    r = run_cachefs("mount", local_source.url, tmp_path / "missing", "--cache-dir", tmp_path / "c")
    _check_refused(r, "No such file")
    busy = cachefs_mount(local_source)
    r = run_cachefs("mount", local_source.url, busy.mountpoint, "--cache-dir", tmp_path / "c")
    _check_refused(r, "already mounted")


def test_unwritable_cache_dir_is_refused(local_source, mp, tmp_path, run_cachefs):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    r = run_cachefs("mount", local_source.url, mp, "--cache-dir", blocker / "cache")
    _check_refused(r, "--cache-dir", "not writable")
    assert _no_cachefs_mounts() or not os.path.ismount(mp)


def test_bad_sources_are_refused(juicefs_s3, mp, tmp_path, run_cachefs):
    cache = ["--cache-dir", str(tmp_path / "c"), "--backend-timeout", "5"]
    r = run_cachefs("mount", "nosuchscheme://x/y", mp, *cache)
    _check_refused(r, "nosuchscheme://x/y", "unsupported source")
    r = run_cachefs("mount", tmp_path / "does-not-exist", mp, *cache)
    _check_refused(r, "no such bucket, prefix or directory")

    ep = ["--endpoint-url", juicefs_s3.endpoint_url]
    r = run_cachefs("mount", "s3://no-such-bucket/x", mp, *cache, *ep, env=juicefs_s3.env())
    _check_refused(r, "s3://no-such-bucket/x")
    bad_creds = {**juicefs_s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-key"}
    r = run_cachefs("mount", f"s3://{juicefs_s3.bucket}", mp, *cache, *ep, env=bad_creds)
    _check_refused(r, "access denied")
    # A closed port on loopback: nothing listens there.
    from conftest import free_port

    dead = ["--endpoint-url", f"http://127.0.0.1:{free_port()}"]
    t0 = time.monotonic()
    r = run_cachefs("mount", f"s3://{juicefs_s3.bucket}", mp, *cache, *dead, env=juicefs_s3.env())
    _check_refused(r, "cannot reach the backend")
    assert time.monotonic() - t0 < 30
    assert not os.path.ismount(mp)


def test_background_mount_reports_the_reason(local_source, mp, tmp_path, run_cachefs):
    r = run_cachefs("mount", tmp_path / "nope", mp, "--cache-dir", tmp_path / "c", "-d")
    _check_refused(r, "no such bucket, prefix or directory")
    assert not os.path.ismount(mp)
    # The log it names is in cachefs's own directory (conftest points XDG_STATE_HOME at
    # the session's temp tree), and says the same.
    log = Path(r.stderr.rsplit("(log ", 1)[1].rstrip().rstrip(")"))
    assert log.parent == Path(os.environ["XDG_STATE_HOME"]) / "cachefs"
    assert "no such bucket, prefix or directory" in log.read_text()


def test_background_logs_never_go_to_the_shared_temp_dir(tmp_path, monkeypatch):
    """Root appending to a predictable name in /tmp would follow a symlink put there first."""
    from cachefs.cli import default_log_file

    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    path = Path(default_log_file("/mnt/data sets/a"))
    assert path == tmp_path / "home/.local/state/cachefs/mnt-data-sets-a.log"
    assert path.parent.stat().st_mode & 0o777 == 0o700
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    made = []
    monkeypatch.setattr(os, "makedirs", lambda path, mode, exist_ok: made.append((path, mode)))
    assert default_log_file("/mnt/a") == "/var/log/cachefs/mnt-a.log"
    assert made == [("/var/log/cachefs", 0o700)]
    monkeypatch.undo()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert Path(default_log_file("/mnt/a")) == tmp_path / "state/cachefs/mnt-a.log"


def test_backend_down_fails_misses_fast_and_serves_cached(tmp_path, cachefs_mount):
    """Freeze the S3 server mid-mount: a miss fails with EIO within the configured
    timeout, while a file already cached still reads, and the mount stays up."""
    import juicefs_backend

    gateway = juicefs_backend.JuicefsS3(tmp_path / "frozen")
    gateway.start()
    try:
        fs = gateway.s3fs()
        cached_data, missing_data = os.urandom(300_000), os.urandom(300_000)
        fs.pipe_file(f"{gateway.bucket}/d/cached", cached_data)
        fs.pipe_file(f"{gateway.bucket}/d/missing", missing_data)

        class Src:
            url = f"s3://{gateway.bucket}/d"
            mount_args = ["--endpoint-url", gateway.endpoint_url]
            env = gateway.env()

        m = cachefs_mount(Src, "--backend-timeout", "2", "--backend-retries", "2", "--attr-ttl", "0.5", "--dir-ttl", "0.5")
        names = sorted(os.listdir(m.mountpoint))
        assert names == ["cached", "missing"]
        with open(os.path.join(m.mountpoint, "cached"), "rb") as f:
            assert f.read() == cached_data

        gateway.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1)  # let the attribute TTLs run out
            t0 = time.monotonic()
            with pytest.raises(OSError) as exc:
                with open(os.path.join(m.mountpoint, "missing"), "rb") as f:
                    f.read()
            elapsed = time.monotonic() - t0
            assert exc.value.errno == errno.EIO
            assert elapsed < 2 * 2 + 1.5, elapsed  # open's stat is served stale; only the GET waits
            t0 = time.monotonic()
            with open(os.path.join(m.mountpoint, "cached"), "rb") as f:
                assert f.read() == cached_data
            assert time.monotonic() - t0 < 3
            assert m.is_mounted()
        finally:
            gateway.proc.send_signal(signal.SIGCONT)
        # Once the backend is back, the miss reads (after the breaker's cool-down).
        time.sleep(2.5)
        with open(os.path.join(m.mountpoint, "missing"), "rb") as f:
            assert f.read() == missing_data
    finally:
        gateway.stop()


def test_credentials_from_flags(s3_source, tmp_path, cachefs_mount, run_cachefs):
    s3_source.write("k", b"key from a flag")
    secret = tmp_path / "secret"
    secret.write_text(s3_source.backend.secret_key + "\n")
    secret.chmod(0o600)
    creds = ["--access-key", s3_source.backend.access_key, "--secret-key-file", str(secret)]

    class NoEnv:  # the same source, with no credentials in the environment
        url = s3_source.url
        mount_args = s3_source.mount_args
        env: dict[str, str] = {}

    m = cachefs_mount(NoEnv, *creds)
    with open(os.path.join(m.mountpoint, "k"), "rb") as f:
        assert f.read() == b"key from a flag"
    mp = tmp_path / "other"
    mp.mkdir()
    r = run_cachefs("mount", s3_source.url, mp, *s3_source.mount_args, "--access-key", "x", "--secret-key-file", tmp_path / "missing")
    _check_refused(r, "--secret-key-file", "No such file")


def test_a_cache_dir_has_one_owner(local_source, mp, tmp_path, cachefs_mount, run_cachefs):
    """A second mount or worker on a cache directory in use is refused with exit 2
    and one line naming the directory and its owner; the owner keeps working. The
    owner's start removes temp files a crashed owner left behind."""
    data = os.urandom(3 << 20)
    local_source.write("f", data)
    cache = tmp_path / "shared-cache"
    stale = cache / "chunks" / "ab" / f"{'ab' * 16}.tmp4242"  # a writer that crashed before its rename
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a chunk")

    owner = cachefs_mount(local_source, cache_dir=cache)
    assert not stale.exists(), "stale temp file survived the start"
    with open(os.path.join(owner.mountpoint, "f"), "rb") as f:
        assert f.read() == data

    r = run_cachefs("mount", local_source.url, mp, "--cache-dir", cache)
    _check_refused(r, f"--cache-dir {cache}: in use", f"pid {owner.proc.pid}")
    assert r.returncode == 2
    assert not os.path.ismount(mp)
    from conftest import free_port

    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    r = run_cachefs("worker", "--listen", f"127.0.0.1:{free_port()}", "--source", f"src={local_source.url}",
                    "--secret-file", secret, "--cache-dir", cache)
    _check_refused(r, f"--cache-dir {cache}: in use")
    assert r.returncode == 2

    assert owner.is_mounted()
    with open(os.path.join(owner.mountpoint, "f"), "rb") as f:
        assert f.read() == data
    assert owner.umount() == 0
    # Gone with its owner: the next mount takes the directory, warm.
    again = cachefs_mount(local_source, cache_dir=cache)
    with open(os.path.join(again.mountpoint, "f"), "rb") as f:
        assert f.read() == data
    assert again.metric("cachefs_read_bytes_total", source="backend") == 0
