"""Real mounts: bytes through cachefs equal the backend's, over a local directory
and a real S3 server (the JuiceFS gateway)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import mmap
import os
import random
import signal
import stat
import subprocess
import time

import pytest

pytestmark = pytest.mark.integration

CHUNK = 256 << 10
SMALL_CHUNKS = ("--chunk-size", "256K", "--mem-size", "64M", "--cache-size", "256M")


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _gets(mount) -> float:
    return mount.metric("cachefs_backend_requests_total", op="get", outcome="ok")


EDGE_SIZES = {
    "empty": 0,
    "one": 1,
    "chunk-1": CHUNK - 1,
    "chunk": CHUNK,
    "chunk+1": CHUNK + 1,
    "ragged": 5 * CHUNK + 12345,
}


@pytest.mark.fallback
def test_edge_sizes_read_byte_exact(source, cachefs_mount):
    files = {name: _data(size, i) for i, (name, size) in enumerate(EDGE_SIZES.items())}
    for name, data in files.items():
        source.write(f"sizes/{name}", data)
    m = cachefs_mount(source, *SMALL_CHUNKS)
    for name, data in files.items():
        path = os.path.join(m.mountpoint, "sizes", name)
        assert os.stat(path).st_size == len(data)
        with open(path, "rb") as f:
            assert f.read() == data, name


@pytest.mark.fallback
def test_random_preads_across_chunk_boundaries_and_eof(source, cachefs_mount):
    data = _data(7 * CHUNK + 999, 7)
    source.write("r.bin", data)
    m = cachefs_mount(source, *SMALL_CHUNKS)
    rng = random.Random(1)
    fd = os.open(os.path.join(m.mountpoint, "r.bin"), os.O_RDONLY)
    try:
        for _ in range(300):
            off = rng.randrange(0, len(data) + 10)
            size = rng.choice([1, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, rng.randrange(1, 2 * CHUNK)])
            assert os.pread(fd, size, off) == data[off : off + size], (off, size)
        # Reads that start exactly at, and beyond, EOF return nothing.
        assert os.pread(fd, 100, len(data)) == b""
        assert os.pread(fd, 100, len(data) + 1 << 20) == b""
        assert os.pread(fd, 100, len(data) - 10) == data[-10:]
    finally:
        os.close(fd)


def test_tree_listing_and_attributes(source, cachefs_mount):
    n = 1500  # more than one readdir buffer: the kernel pages through it
    for i in range(n):
        source.write(f"big/f{i:05d}", b"x" * (i % 7))
    source.write("a/b/c.txt", b"deep")
    m = cachefs_mount(source)
    names = os.listdir(os.path.join(m.mountpoint, "big"))
    assert len(names) == n and len(set(names)) == n
    assert sorted(names) == [f"f{i:05d}" for i in range(n)]
    st = os.stat(os.path.join(m.mountpoint, "big", "f00013"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 13 % 7
    assert stat.S_ISDIR(os.stat(os.path.join(m.mountpoint, "a", "b")).st_mode)
    with open(os.path.join(m.mountpoint, "a/b/c.txt"), "rb") as f:
        assert f.read() == b"deep"
    # Inode numbers are stable while the kernel holds them.
    first = os.stat(os.path.join(m.mountpoint, "a/b/c.txt")).st_ino
    os.listdir(os.path.join(m.mountpoint, "a/b"))
    assert os.stat(os.path.join(m.mountpoint, "a/b/c.txt")).st_ino == first
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(m.mountpoint, "a/nope"))
    statvfs = os.statvfs(m.mountpoint)
    assert statvfs.f_bsize > 0


def _drop_dentries() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")  # reclaimable slab: dentries and inodes, so the kernel sends FORGETs


def test_inodes_are_forgotten_when_the_kernel_drops_them(local_source, cachefs_mount):
    dirs, per_dir = 30, 100
    for d in range(dirs):
        for f in range(per_dir):
            local_source.write(f"t/d{d:02}/f{f:03}", b"x" * (f % 5))
    m = cachefs_mount(local_source, "--meta-cache-entries", "1000")
    held = os.path.join(m.mountpoint, "t/d00/f003")
    with open(held, "rb") as f:
        ino = os.fstat(f.fileno()).st_ino
        seen = 0
        for dirpath, _, files in os.walk(m.mountpoint):
            for name in files:
                assert os.stat(os.path.join(dirpath, name)).st_size == int(name[1:]) % 5
                seen += 1
        assert seen == dirs * per_dir
        peak = m.metric("cachefs_inodes")
        assert peak >= dirs * per_dir
        # The metadata cache stays within its bound although the kernel holds every inode.
        assert 0 < m.metric("cachefs_meta_cache_entries") <= 1000

        deadline = time.monotonic() + 30
        while (held_now := m.metric("cachefs_inodes")) >= 0.05 * peak:
            assert time.monotonic() < deadline, f"{held_now:.0f} of {peak:.0f} inodes still held after drop_caches"
            _drop_dentries()
            time.sleep(0.2)
        # The open file keeps its inode: the same number, still readable.
        assert os.fstat(f.fileno()).st_ino == ino
        assert os.stat(held).st_ino == ino
        assert f.read() == b"xxx"
    # A forgotten path is looked up afresh and served as before.
    assert os.stat(os.path.join(m.mountpoint, "t/d17/f042")).st_size == 2
    assert len(os.listdir(os.path.join(m.mountpoint, "t/d29"))) == per_dir


def test_symlinks_are_readable(local_source, cachefs_mount):
    local_source.write("target.txt", b"via link")
    os.symlink("target.txt", local_source.path("link"))
    m = cachefs_mount(local_source)
    link = os.path.join(m.mountpoint, "link")
    assert os.readlink(link) == "target.txt"
    assert stat.S_ISLNK(os.lstat(link).st_mode)
    with open(link, "rb") as f:
        assert f.read() == b"via link"


def test_writes_get_erofs(local_source, cachefs_mount):
    local_source.write("f", b"data")
    m = cachefs_mount(local_source)
    mp = m.mountpoint
    attempts = [
        lambda: open(os.path.join(mp, "f"), "r+b"),
        lambda: open(os.path.join(mp, "new"), "wb"),
        lambda: os.mkdir(os.path.join(mp, "d")),
        lambda: os.unlink(os.path.join(mp, "f")),
        lambda: os.rename(os.path.join(mp, "f"), os.path.join(mp, "g")),
        lambda: os.chmod(os.path.join(mp, "f"), 0o600),
        lambda: os.symlink("f", os.path.join(mp, "l")),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS
    assert local_source.read("f") == b"data"


def test_concurrent_readers_fetch_each_chunk_once(source, cachefs_mount):
    data = _data(16 * CHUNK, 3)
    source.write("hot.bin", data)
    m = cachefs_mount(source, *SMALL_CHUNKS)
    path = os.path.join(m.mountpoint, "hot.bin")

    def read_all(_):
        with open(path, "rb", buffering=0) as f:
            out = bytearray()
            while block := f.read(CHUNK // 2):
                out += block
            return bytes(out)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read_all, range(8)))
    assert all(r == data for r in results)
    assert _gets(m) == 16  # one backend GET per chunk, whatever the number of readers


@pytest.mark.fallback
def test_remount_is_warm_and_makes_no_backend_reads(source, cachefs_mount):
    files = {f"w/{i}": _data(3 * CHUNK + i, i) for i in range(4)}
    for name, data in files.items():
        source.write(name, data)
    first = cachefs_mount(source, *SMALL_CHUNKS)
    for name, data in files.items():
        with open(os.path.join(first.mountpoint, name), "rb") as f:
            assert f.read() == data
    assert _gets(first) == sum(-(-len(d) // CHUNK) for d in files.values())
    assert first.umount() == 0

    second = cachefs_mount(source, *SMALL_CHUNKS, cache_dir=first.cache_dir)
    for name, data in files.items():
        with open(os.path.join(second.mountpoint, name), "rb") as f:
            assert f.read() == data
    assert _gets(second) == 0
    total = sum(map(len, files.values()))
    # Read-ahead may have promoted chunks to MEM before the reader got there.
    assert second.metric("cachefs_read_bytes_total", source="disk") > 0
    assert second.metric("cachefs_read_bytes_total") == total
    assert second.metric("cachefs_read_bytes_total", source="backend") == 0
    assert second.metric("cachefs_backend_read_bytes_total") == 0


def _chunk_files(cache_dir: str) -> list[str]:
    root = os.path.join(cache_dir, "chunks")
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_cache_file_is_never_served(local_source, cachefs_mount, damage):
    data = _data(4 * CHUNK, 11)
    local_source.write("c.bin", data)
    first = cachefs_mount(local_source, *SMALL_CHUNKS)
    with open(os.path.join(first.mountpoint, "c.bin"), "rb") as f:
        assert f.read() == data
    assert first.umount() == 0
    files = _chunk_files(first.cache_dir)
    assert len(files) == 4
    for path in files:
        with open(path, "r+b") as f:
            if damage == "flip":
                f.seek(os.path.getsize(path) // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
            else:
                f.truncate(os.path.getsize(path) - 1)

    second = cachefs_mount(local_source, *SMALL_CHUNKS, cache_dir=first.cache_dir)
    with open(os.path.join(second.mountpoint, "c.bin"), "rb") as f:
        assert f.read() == data
    assert second.metric("cachefs_cache_errors_total", tier="disk", reason="corrupt") == 4
    assert _gets(second) == 4


def test_cache_caps_are_respected(local_source, cachefs_mount):
    data = _data(40 * CHUNK, 5)
    local_source.write("big.bin", data)
    cap = 8 * CHUNK
    mem = 2 * CHUNK
    m = cachefs_mount(local_source, "--chunk-size", "256K", "--mem-size", str(mem), "--cache-size", str(cap))
    with open(os.path.join(m.mountpoint, "big.bin"), "rb") as f:
        while f.read(CHUNK // 4):
            assert m.metric("cachefs_cache_used_bytes", tier="disk") <= cap
            assert m.metric("cachefs_cache_used_bytes", tier="mem") <= mem
    on_disk = sum(os.path.getsize(p) for p in _chunk_files(m.cache_dir))
    assert on_disk <= cap
    assert m.metric("cachefs_cache_evictions_total", tier="disk") > 0
    # The tail of the file is still cached and served without the backend.
    gets = _gets(m)
    with open(os.path.join(m.mountpoint, "big.bin"), "rb") as f:
        f.seek(len(data) - CHUNK)
        assert f.read() == data[-CHUNK:]
    assert _gets(m) == gets


# An open file while its object changes in the backend. Nothing may pass by luck:
# cachefs reads nothing ahead (--read-ahead 0) and MEM is off, so only the chunk
# read before the change is cached (on the SSD); every read is O_DIRECT, so the
# kernel's page cache and read-ahead serve none of them, each reaches cachefs at
# the offset asked.
STALE_ARGS = ("--chunk-size", "256K", "--read-ahead", "0", "--mem-size", "0", "--cache-size", "64M",
              "--entry-ttl", "3600", "--dir-ttl", "3600")
STALE_CHUNKS = 8  # the file: 2 MiB, 16 times the kernel's 128 KiB read-ahead

# What the object becomes while open: its new size, None if deleted.
CHANGES = {"same-size": STALE_CHUNKS * CHUNK, "larger": 11 * CHUNK + 7, "smaller": 3 * CHUNK - 5, "deleted": None}


def _direct_pread(fd: int, size: int, offset: int) -> bytes:
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    with buf:
        return buf[: os.preadv(fd, [buf], offset)]


def _change_object(source, rel: str, new: bytes | None, old_written: float) -> None:
    if new is None:
        source.delete(rel)
        return
    if source.kind == "s3-noetag":
        # Without ETags the version is size and whole-second mtime: a same-size
        # object written in the same second would be the same version.
        while int(time.time()) == int(old_written):
            time.sleep(0.05)
    source.write(rel, new)
    if source.kind == "local":
        os.utime(source.path(rel), ns=(1, 1))  # a sure mtime change, whatever the clock's resolution


@pytest.fixture(params=["local", "s3", "s3-noetag"])
def any_source(request):
    """`source`, and the gateway that serves no ETags (versions by size and mtime)."""
    src = request.getfixturevalue({"s3-noetag": "s3_source_noetag"}.get(request.param, f"{request.param}_source"))
    if request.param == "s3-noetag":
        src = dataclasses.replace(src, kind="s3-noetag")
    return src


# Every change with the kernel asking before each read (--attr-ttl 0); with long TTLs, the
# two that differ there (a kept size; a name the backend lost): 18 mounts, not 24.
@pytest.mark.parametrize(
    "change,attr_ttl", [(change, "0") for change in CHANGES] + [("same-size", "3600"), ("deleted", "3600")]
)
def test_an_open_file_keeps_its_version_or_fails_estale(any_source, cachefs_mount, change, attr_ttl):
    """docs/semantics.md: an open file reads the version it opened. The chunk it
    cached is served; every other read fails with ESTALE, deleted or replaced, never
    ENOENT and never bytes of another version. With --attr-ttl 0 the kernel asks for
    the attributes before each read: a deleted file's are the opened version's, and a
    smaller new version's size makes the kernel answer reads past it with EOF itself."""
    source = any_source
    old = _data(STALE_CHUNKS * CHUNK, 1)
    new = None if CHANGES[change] is None else _data(CHANGES[change], 2)
    source.write("v.bin", old)
    written = time.time()
    m = cachefs_mount(source, *STALE_ARGS, "--attr-ttl", attr_ttl)
    path = os.path.join(m.mountpoint, "v.bin")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert _direct_pread(fd, CHUNK, 0) == old[:CHUNK]
        _change_object(source, "v.bin", new, written)
        got = {}
        for i in [*range(1, STALE_CHUNKS), 0]:  # chunk 0 last: cached, still served after the failures
            try:
                data = _direct_pread(fd, CHUNK, i * CHUNK)
            except OSError as e:
                got[i] = errno.errorcode[e.errno]
            else:
                got[i] = "old" if data == old[i * CHUNK : (i + 1) * CHUNK] else f"{len(data)} other bytes"
        eof_at = len(new) if change == "smaller" and attr_ttl == "0" else len(old)
        expected = {i: "ESTALE" if i * CHUNK < eof_at else "0 other bytes" for i in range(1, STALE_CHUNKS)}
        assert got == {**expected, 0: "old"}
        if new is None:
            assert os.fstat(fd).st_size == len(old)  # the attributes of the version open, not ENOENT
    finally:
        os.close(fd)
    if new is None:
        with pytest.raises(FileNotFoundError):
            open(path, "rb")
    else:
        with open(path, "rb") as f:
            assert f.read() == new  # reopened: the new version, whole


def test_background_mode_and_umount_command(local_source, tmp_path, run_cachefs):
    local_source.write("x", b"background")
    mp = tmp_path / "bg"
    mp.mkdir()
    try:
        r = run_cachefs("mount", local_source.url, mp, "--cache-dir", tmp_path / "c", "-d", "--log-file", tmp_path / "bg.log")
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mp)
        assert (mp / "x").read_bytes() == b"background"
        daemons = _processes_mounting(mp)
        assert len(daemons) == 1, daemons
        r = run_cachefs("umount", mp)
        assert r.returncode == 0, r.stderr
        assert not os.path.ismount(mp)
        deadline = time.monotonic() + 10
        while _processes_mounting(mp):
            assert time.monotonic() < deadline, "the background daemon outlived its unmount"
            time.sleep(0.05)
    finally:
        if os.path.ismount(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        # The daemon detached from us: stop it by its pid, not only its mount.
        for pid in _processes_mounting(mp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _processes_mounting(mp) -> list[int]:
    """Pids of the `cachefs mount` processes whose command line names mount point `mp`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"mount" in args and os.fsencode(mp) in args:
            found.append(int(pid))
    return found
