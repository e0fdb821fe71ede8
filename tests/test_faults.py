"""The fault matrix: faults injected into real processes (docs/reliability.md).

Each test breaks one thing under a running mount or worker (the backend, a
peer, the cache disk, the process itself) and checks what a reader sees:
bytes equal to the backend's or a prompt EIO, never a hang or a wrong byte,
and recovery without a remount. Timings are printed (run with -s) and
recorded in docs/reliability.md.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest

from conftest import _load_proxy
from test_peers import CHUNK, _read

pytestmark = pytest.mark.integration

SMALL = ("--chunk-size", "256K")
TcpProxy = _load_proxy().TcpProxy


def _read_uncached(path: str) -> bytes:
    """Read a file through the mount, not from the kernel's page cache of it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while data := os.read(fd, CHUNK):
            out += data
        return bytes(out)
    finally:
        os.close(fd)


def _wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what}")
        time.sleep(interval)


def _chunk_files(cache_dir: str) -> set[str]:
    root = os.path.join(cache_dir, "chunks")
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp" not in f}


def _temp_files(cache_dir: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(cache_dir) for f in fs if ".tmp" in f]


# -- row 1: the backend fails ------------------------------------------------------

BACKEND_TIMEOUT = 2.0
BACKEND_RETRIES = 2


@pytest.mark.parametrize("fault", ["503", "500", "slow:30", "truncate", "reset"])
def test_backend_faults_fail_misses_in_bounded_time_and_recover(s3_behind_proxy, cachefs_mount, fault):
    """A sick backend: a miss gets EIO within --backend-timeout after bounded
    retries, cached chunks keep being served, and once the backend is well the
    same miss reads without a remount."""
    src, proxy = s3_behind_proxy, s3_behind_proxy.proxy
    cached, missed = os.urandom(2 * CHUNK), os.urandom(2 * CHUNK + 7)
    src.write("cached.bin", cached)
    src.write("missed.bin", missed)
    m = cachefs_mount(src, *SMALL, "--read-ahead", "0", "--backend-timeout", str(BACKEND_TIMEOUT),
                      "--backend-retries", str(BACKEND_RETRIES))
    cached_path, missed_path = (os.path.join(m.mountpoint, n) for n in ("cached.bin", "missed.bin"))
    assert _read(cached_path) == cached
    os.stat(missed_path)  # attributes cached: only the data GETs meet the fault

    proxy.fault = fault
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            with open(missed_path, "rb", buffering=0) as f:
                f.read(CHUNK)
        failed_after = time.monotonic() - t0
        assert exc.value.errno == errno.EIO
        assert failed_after < BACKEND_TIMEOUT + 1.0, failed_after
        # Bounded retries: at most retries + 1 attempts per request; the kernel
        # may ask twice (its read-ahead, then the one page).
        assert 1 <= proxy.faults[fault] <= 2 * (BACKEND_RETRIES + 1), proxy.faults

        before = m.metric("cachefs_read_bytes_total", source="mem") + m.metric("cachefs_read_bytes_total", source="disk")
        t0 = time.monotonic()
        assert _read_uncached(cached_path) == cached
        cached_after = time.monotonic() - t0
        after = m.metric("cachefs_read_bytes_total", source="mem") + m.metric("cachefs_read_bytes_total", source="disk")
        assert after - before == len(cached)  # served by the cache, not the kernel's pages
        assert cached_after < 1.0, cached_after
        assert m.is_mounted()
    finally:
        proxy.fault = None
    t0 = time.monotonic()

    def recovered() -> bool:
        try:
            return _read(missed_path) == missed
        except OSError as e:
            assert e.errno == errno.EIO
            return False

    _wait_for(recovered, 10, "the miss reads again once the backend is well", interval=0.2)
    recovered_after = time.monotonic() - t0
    print(f"\n[{fault}] EIO after {failed_after:.2f}s ({proxy.faults[fault]} faulted GETs), "
          f"cached read {cached_after:.3f}s, recovered {recovered_after:.2f}s after the fault ended")


# -- row 2: a peer hangs or is cut off --------------------------------------------

PEER_TIMEOUT = 1.0


@pytest.mark.parametrize("fault", ["sigstop", "partition"])
def test_hung_or_partitioned_worker_costs_one_timeout_and_rejoins(
    s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount, fault
):
    src = s3_behind_proxy
    files = {f"f{i}.bin": os.urandom(8 * CHUNK) for i in range(12)}
    for name, data in files.items():
        src.write(name, data)
    workers = [cachefs_worker(src) for _ in range(2)]
    links = [TcpProxy(w.addr).start() for w in workers]
    try:
        m = cachefs_mount(src, *SMALL, "--mem-size", "64M", "--cache-size", "256M",
                          "--peers", ",".join(link.addr for link in links), "--secret-file", str(secret_file),
                          "--peer-timeout", str(PEER_TIMEOUT))
        names = iter(files)
        name = next(names)
        assert _read(os.path.join(m.mountpoint, name)) == files[name]
        # The victim: a worker that owns a share of the chunks (with 8 chunks of 2 owners,
        # now and then all 8 are one worker's: CI once picked the other and failed here).
        served_first = [w.metric("cachefs_peer_served_total", outcome="ok") for w in workers]
        assert max(served_first) > 0, "no worker served the mount"
        owner = max(range(len(workers)), key=served_first.__getitem__)
        victim, link = workers[owner], links[owner]

        if fault == "sigstop":
            victim.proc.send_signal(signal.SIGSTOP)
        else:
            link.blackhole = True
        try:
            slowest = 0.0
            t0 = time.monotonic()
            for _ in range(2):
                name = next(names)
                out = bytearray()
                with open(os.path.join(m.mountpoint, name), "rb", buffering=0) as f:
                    while True:
                        t1 = time.monotonic()
                        block = f.read(CHUNK)
                        slowest = max(slowest, time.monotonic() - t1)
                        if not block:
                            break
                        out += block
                assert bytes(out) == files[name]
            during = time.monotonic() - t0
            # One --peer-timeout for the first request that meets the hung peer
            # (plus the backend fetch); the breaker skips it after that.
            assert slowest < PEER_TIMEOUT + 1.5, slowest
            assert during < 4 * PEER_TIMEOUT + 4, during
            assert m.metric("cachefs_peer_requests_total", outcome="timeout") >= 1
        finally:
            if fault == "sigstop":
                victim.proc.send_signal(signal.SIGCONT)
            else:
                link.restore()
        served = victim.metric("cachefs_peer_served_total", outcome="ok")
        t0 = time.monotonic()

        def served_again() -> bool:
            name = next(names, None)
            if name is None:
                pytest.fail("ran out of files before the worker was asked again")
            assert _read(os.path.join(m.mountpoint, name)) == files[name]
            return victim.metric("cachefs_peer_served_total", outcome="ok") > served

        _wait_for(served_again, 30, "the worker serves the mount again", interval=0.5)
        print(f"\n[{fault}] slowest read {slowest:.2f}s, 16 chunks in {during:.2f}s while hung; "
              f"rejoined {time.monotonic() - t0:.2f}s after it was back")
    finally:
        for link in links:
            link.stop()


# -- row 3: the cache disk fills up ------------------------------------------------


@contextmanager
def _tmpfs(path, size: str):
    os.makedirs(path, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_a_full_cache_disk_costs_hits_not_reads(local_source, cachefs_mount, tmp_path, ratio):
    data = os.urandom(48 * CHUNK)  # 12 MiB through an 8 MiB cache disk
    local_source.write("big.bin", data)
    with _tmpfs(tmp_path / "small-disk", "8m") as disk:
        m = cachefs_mount(local_source, *SMALL, "--mem-size", "512K", "--cache-size", "64M",
                          "--free-space-ratio", str(ratio), cache_dir=disk)
        least_free = 1.0
        out = bytearray()
        with open(os.path.join(m.mountpoint, "big.bin"), "rb", buffering=0) as f:
            while block := f.read(CHUNK):
                out += block
                st = os.statvfs(disk)
                least_free = min(least_free, st.f_bavail / st.f_blocks)
        assert bytes(out) == data
        assert _read_uncached(os.path.join(m.mountpoint, "big.bin")) == data  # and again, partly from the disk
        assert m.is_mounted() and m.proc.poll() is None
        errors = m.metric("cachefs_cache_errors_total", tier="disk", reason="write")
        log = m.log_path.read_text()
        if ratio:
            # Room is made by evicting before a write, counting the writes in flight.
            assert least_free >= ratio, least_free
            assert m.metric("cachefs_cache_evictions_total", tier="disk") > 0
            assert errors == 0
        else:
            assert errors > 0
            assert "cannot write chunk" in log  # ENOSPC, or a short write when the last pages run out
        assert not _temp_files(disk)
        print(f"\n[ratio {ratio}] least free {least_free:.1%}, write errors {errors:g}")
        assert m.umount() == 0


# -- row 4: damaged, foreign or vanished cache files --------------------------------


def _flip(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def test_damaged_and_foreign_cache_files_are_never_served_while_mounted(local_source, cachefs_mount):
    """Damage the SSD files of a live mount: each damaged chunk is dropped, counted
    and fetched again, and the bytes through the mount stay the backend's."""
    victim, other = os.urandom(5 * CHUNK), os.urandom(4 * CHUNK)
    local_source.write("victim.bin", victim)
    local_source.write("other.bin", other)
    m = cachefs_mount(local_source, *SMALL, "--mem-size", "0", "--read-ahead", "0")  # every read meets the SSD
    assert _read(os.path.join(m.mountpoint, "victim.bin")) == victim
    victim_files = sorted(_wait_for(lambda: len(_chunk_files(m.cache_dir)) == 5 and _chunk_files(m.cache_dir),
                                    10, "5 chunk files"))
    assert _read(os.path.join(m.mountpoint, "other.bin")) == other
    other_files = sorted(_wait_for(lambda: len(_chunk_files(m.cache_dir)) == 9 and _chunk_files(m.cache_dir) - set(victim_files),
                                   10, "9 chunk files"))
    with open(other_files[0], "rb") as f:
        foreign = f.read()  # a valid chunk file, of another chunk

    def overwrite(path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    damages = [
        _flip,
        _truncate,
        lambda p: overwrite(p, b""),
        lambda p: overwrite(p, os.urandom(os.path.getsize(p))),  # garbage of the right size
        lambda p: overwrite(p, foreign),
    ]
    for path, damage in zip(victim_files, damages):
        damage(path)
    # Files the cache did not make, where it looks: ignored while mounted.
    stray_dir = os.path.dirname(victim_files[0])
    with open(os.path.join(stray_dir, "notes.txt"), "w") as f:
        f.write("not a chunk")
    backend_before = m.metric("cachefs_backend_read_bytes_total")
    assert _read_uncached(os.path.join(m.mountpoint, "victim.bin")) == victim
    assert m.metric("cachefs_cache_errors_total", tier="disk", reason="corrupt") == 5
    assert m.metric("cachefs_backend_read_bytes_total") - backend_before == len(victim)
    # Fetched again and cached again: the next read needs the backend for nothing.
    _wait_for(lambda: len(_chunk_files(m.cache_dir) - {os.path.join(stray_dir, "notes.txt")}) == 9, 10,
              "the 5 chunks cached again")
    backend_before = m.metric("cachefs_backend_read_bytes_total")
    assert _read_uncached(os.path.join(m.mountpoint, "victim.bin")) == victim
    assert m.metric("cachefs_backend_read_bytes_total") == backend_before
    assert m.umount() == 0
    # The next owner's start removes what it did not make.
    again = cachefs_mount(local_source, *SMALL, cache_dir=m.cache_dir)
    assert not os.path.exists(os.path.join(stray_dir, "notes.txt"))
    assert _read(os.path.join(again.mountpoint, "victim.bin")) == victim
    assert again.metric("cachefs_backend_read_bytes_total") == 0


def test_cache_dir_deleted_while_mounted(local_source, cachefs_mount):
    """rm -rf of a live mount's --cache-dir: reads stay exact, the directory is
    made again and the cache fills it again."""
    data = os.urandom(6 * CHUNK)
    local_source.write("d.bin", data)
    m = cachefs_mount(local_source, *SMALL, "--mem-size", "0", "--read-ahead", "0")
    path = os.path.join(m.mountpoint, "d.bin")
    assert _read(path) == data
    _wait_for(lambda: len(_chunk_files(m.cache_dir)) == 6, 10, "6 chunk files")
    shutil.rmtree(m.cache_dir)
    backend_before = m.metric("cachefs_backend_read_bytes_total")
    assert _read_uncached(path) == data
    refetched = (m.metric("cachefs_backend_read_bytes_total") - backend_before) / CHUNK
    # The cache keeps working: the chunks are written again and served from there.
    _wait_for(lambda: len(_chunk_files(m.cache_dir)) == 6, 10, "chunks written to the re-created directory")
    backend_before = m.metric("cachefs_backend_read_bytes_total")
    assert _read_uncached(path) == data
    assert m.metric("cachefs_backend_read_bytes_total") == backend_before
    assert m.is_mounted()
    print(f"\nafter rm -rf: {refetched:g} of 6 chunks fetched again, "
          f"{m.metric('cachefs_cache_errors_total', tier='disk'):g} cache errors counted")
    assert m.umount() == 0


# -- row 5: kill -9 during a burst of SSD writes -------------------------------------


def test_kill_9_during_ssd_writes_keeps_the_warm_cache_and_serves_no_torn_chunk(local_source, cachefs_mount):
    n = 64
    data = os.urandom(n * CHUNK)
    local_source.write("burst.bin", data)
    m = cachefs_mount(local_source, *SMALL, "--mem-size", "64M", "--read-ahead", "16")
    reader = concurrent.futures.ThreadPoolExecutor(1)

    def read_all() -> None:
        try:
            _read(os.path.join(m.mountpoint, "burst.bin"))
        except OSError:
            pass  # the mount died under it

    future = reader.submit(read_all)
    _wait_for(lambda: len(_chunk_files(m.cache_dir)) >= 8, 20, "8 chunks written")
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(10)
    subprocess.run(["fusermount3", "-u", "-z", m.mountpoint], capture_output=True)
    future.result(timeout=20)
    reader.shutdown()
    complete = _chunk_files(m.cache_dir)
    torn = _temp_files(m.cache_dir)
    print(f"\nkilled with {len(complete)} of {n} chunks complete and {len(torn)} temp files")
    assert len(complete) < n, "the burst was over before the kill; nothing tested"

    again = cachefs_mount(local_source, *SMALL, "--mem-size", "64M", "--read-ahead", "16", cache_dir=m.cache_dir)
    assert not _temp_files(m.cache_dir)  # half-written files removed at start
    assert _read(os.path.join(again.mountpoint, "burst.bin")) == data
    # Index rebuilt: every chunk that was complete is a hit; only the rest are fetched.
    assert again.metric("cachefs_backend_read_bytes_total") == (n - len(complete)) * CHUNK
    assert again.metric("cachefs_cache_errors_total", tier="disk") == 0


# -- row 6: shutdown with reads in flight ----------------------------------------------


def _session_processes(sid: int) -> list[int]:
    """Pids of live processes in session `sid` (the mount was started as a session leader)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _in_proc_mounts(mountpoint: str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mountpoint for line in f)


@pytest.mark.parametrize("how", ["umount", "sigterm", "sigint-twice"])
def test_shutdown_with_reads_in_flight_is_clean_and_bounded(s3_behind_proxy, cachefs_mount, how):
    src, proxy = s3_behind_proxy, s3_behind_proxy.proxy
    data = os.urandom(8 * CHUNK)
    src.write("s.bin", data)
    m = cachefs_mount(src, *SMALL, "--read-ahead", "4", "--backend-timeout", "20")
    path = os.path.join(m.mountpoint, "s.bin")
    os.stat(path)
    proxy.fault = "slow:1"  # every data GET takes a second: reads stay in flight
    result: dict[str, object] = {}

    def reader() -> None:
        try:
            result["data"] = _read(path)
        except OSError as e:
            result["errno"] = e.errno

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    _wait_for(lambda: proxy.faults["slow:1"] >= 1, 10, "a GET in flight")
    t0 = time.monotonic()
    if how == "umount":
        # Busy (a file is open): a plain unmount is refused, a lazy one detaches now
        # and the daemon exits once the last file is closed.
        res = subprocess.run(["fusermount3", "-u", m.mountpoint], capture_output=True, text=True)
        assert res.returncode != 0 and "busy" in res.stderr, res.stderr
        subprocess.run(["fusermount3", "-u", "-z", m.mountpoint], check=True)
    elif how == "sigterm":
        m.proc.send_signal(signal.SIGTERM)
    else:
        m.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)  # the second ^C of an impatient user, not a test of timing
        m.proc.send_signal(signal.SIGINT)
    thread.join(30)
    assert not thread.is_alive(), "the reader hangs"
    code = m.proc.wait(30)
    took = time.monotonic() - t0
    proxy.fault = None
    if how == "umount":
        assert result.get("data") == data  # the reads in flight complete
    else:
        assert result.get("data") == data or result.get("errno") in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED), result
    # A signal waits out at most the GET in flight (1 s here); a lazy unmount, the reader.
    assert took < (10 if how == "umount" else 5), took
    assert not _in_proc_mounts(m.mountpoint)
    assert not _session_processes(m.proc.pid)
    assert not _temp_files(m.cache_dir)
    assert "Traceback" not in m.log_path.read_text()
    print(f"\n[{how}] exit {code} after {took:.2f}s; reader got "
          f"{'all bytes' if 'data' in result else errno.errorcode[result['errno']]}")
    assert code == 0 or (how == "sigint-twice" and code == 130), code
