"""Pins with leases: pinned chunks survive a scan larger than the cache, the
pin quota is enforced with numbers, leases survive a restart and expire."""

from __future__ import annotations

import json
import re
import socket
import os
import time
from pathlib import Path

import pytest

from cachefs.cache.policy import SegmentedLRU
from cachefs.pins import PinRegistry

CHUNK = 256 << 10
# MEM off and an SSD tier of ~7 chunks: whatever is not pinned is evicted by a scan.
TIERS = ("--chunk-size", "256K", "--mem-size", "0", "--cache-size", "2M", "--pin-quota", "1M",
         "--free-space-ratio", "0", "--read-ahead", "0")


def test_pinned_entries_are_never_victims():
    lru = SegmentedLRU(100)
    for key in (b"a", b"b", b"c"):
        lru.add(key, 10)
    assert lru.pin(b"a") and not lru.pin(b"zz")
    assert [lru.pop_victim()[0] for _ in range(2)] == [b"b", b"c"]
    with pytest.raises(KeyError):
        lru.pop_victim()  # only the pinned one is left
    assert b"a" in lru and lru.pinned_bytes == 10
    lru.unpin(b"a")
    assert lru.pop_victim() == (b"a", 10) and lru.pinned_bytes == 0


def test_leases_expire_and_survive_a_reload(tmp_path):
    now = [1000.0]
    path = str(tmp_path / "pins.json")
    reg = PinRegistry(path, clock=lambda: now[0])
    short = reg.new("job-1", ["ds/a"], 60, [b"\x01" * 16], {"ds": 100})
    reg.new("job-2", ["ds/b"], 3600, [b"\x02" * 16], {"ds": 50})
    reg.save()
    assert reg.pinned() == 150 and reg.next_expiry() == 1060
    now[0] = 1061
    assert [lease.id for lease in reg.take_expired()] == [short.id]
    again = PinRegistry(path, clock=lambda: now[0])
    assert [lease.owner for lease in again.load()] == ["job-2"]  # job-1 ran out while "down"
    assert again.leases[next(iter(again.leases))].digests == [b"\x02" * 16]
    (tmp_path / "pins.json").write_text("{not json")
    assert PinRegistry(path).load() == [] and (tmp_path / "pins.json.bad").exists()


@pytest.mark.integration
def test_pins_keep_chunks_through_a_scan_and_a_restart(tmp_path, local_source, cachefs_mount, run_cachefs):
    hot, big = os.urandom(3 * CHUNK), os.urandom(16 * CHUNK)
    local_source.write("hot.bin", hot)
    local_source.write("big.bin", big)
    cache = tmp_path / "cache"
    m = cachefs_mount(local_source, *TIERS, cache_dir=cache)
    res = run_cachefs("pin", Path(m.mountpoint, "hot.bin"), "--ttl", "1h", "--owner", "job-7")
    assert res.returncode == 0, res.stderr
    assert "pinned 768K" in res.stdout and "owner job-7" in res.stdout

    # Over the quota: refused with the numbers, nothing pinned.
    res = run_cachefs("pin", Path(m.mountpoint, "big.bin"), "--ttl", "1h")
    assert res.returncode != 0
    assert res.stderr.strip() == ("cachefs: error: pinning 4M more would pin 4864K, over the pin quota of 1M "
                                  "(768K pinned now); unpin something or raise --pin-quota")

    assert Path(m.mountpoint, "hot.bin").read_bytes() == hot  # loads the pinned chunks
    for _ in range(2):  # a scan eight times the SSD tier's size
        assert Path(m.mountpoint, "big.bin").read_bytes() == big
    before = m.metric("cachefs_backend_read_bytes_total")
    assert Path(m.mountpoint, "hot.bin").read_bytes() == hot
    assert m.metric("cachefs_backend_read_bytes_total") == before  # every pinned chunk was still there
    assert m.metric("cachefs_cache_used_bytes", tier="disk") <= 2 << 20

    m.umount()
    m2 = cachefs_mount(local_source, *TIERS, cache_dir=cache)
    status = json.loads(run_cachefs("status", "--json", m2.mountpoint).stdout)
    assert [(p["owner"], p["bytes"]) for p in status["pins"]] == [("job-7", 3 * CHUNK)]
    assert Path(m2.mountpoint, "hot.bin").read_bytes() == hot
    assert m2.metric("cachefs_backend_read_bytes_total") == 0  # pinned across the restart

    res = run_cachefs("unpin", m2.mountpoint, "--owner", "job-7")
    assert res.returncode == 0 and "ended 1 lease(s), 768K unpinned" in res.stdout
    assert json.loads(run_cachefs("status", "--json", m2.mountpoint).stdout)["pins"] == []


@pytest.mark.integration
def test_a_lease_ends_on_its_own(tmp_path, local_source, cachefs_mount, run_cachefs):
    local_source.write("f.bin", os.urandom(CHUNK))
    m = cachefs_mount(local_source, *TIERS)
    assert run_cachefs("pin", Path(m.mountpoint, "f.bin"), "--ttl", "1s").returncode == 0
    deadline = time.monotonic() + 15
    while json.loads(run_cachefs("status", "--json", m.mountpoint).stdout)["pins"]:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.3)
    assert json.loads(run_cachefs("status", "--json", m.mountpoint).stdout)["pinned_bytes"] == 0


@pytest.mark.integration
def test_warmup_with_pin_loads_and_pins(tmp_path, local_source, cachefs_mount, run_cachefs):
    hot, big = os.urandom(3 * CHUNK), os.urandom(16 * CHUNK)
    local_source.write("hot/a.bin", hot)
    local_source.write("big.bin", big)
    m = cachefs_mount(local_source, *TIERS)
    res = run_cachefs("warmup", Path(m.mountpoint, "hot"), "-r", "--pin", "--ttl", "1h", "--owner", "job-9")
    assert res.returncode == 0, res.stderr
    assert "owner job-9" in res.stdout
    assert m.metric("cachefs_warmup_bytes_total", outcome="loaded") == len(hot)
    assert m.metric("cachefs_warmup_files_total", outcome="done") == 1
    assert m.metric("cachefs_pin_lease_bytes") == len(hot)
    assert m.metric("cachefs_pinned_bytes") > len(hot)  # the chunk files, with their headers
    assert Path(m.mountpoint, "big.bin").read_bytes() == big  # a scan larger than the SSD tier
    before = m.metric("cachefs_backend_read_bytes_total")
    assert Path(m.mountpoint, "hot", "a.bin").read_bytes() == hot
    assert m.metric("cachefs_backend_read_bytes_total") == before  # loaded by the warm-up, kept by the pin
    res = run_cachefs("warmup", Path(m.mountpoint, "hot"), "--pin")
    assert res.returncode != 0 and "--pin and --ttl go together" in res.stderr


@pytest.mark.integration
def test_a_dataset_pin_quota_is_its_own_limit(tmp_path, local_source, cachefs_mount, run_cachefs):
    local_source.write("a.bin", os.urandom(3 * CHUNK))
    m = cachefs_mount(None, *TIERS, "--dataset", f"ds={local_source.url},pin_quota=512K")
    res = run_cachefs("pin", Path(m.mountpoint, "ds", "a.bin"), "--ttl", "1h")
    assert res.returncode != 0
    assert "over dataset ds's pin quota of 512K (0 pinned now); unpin something or raise its pin_quota" in res.stderr


# -- with peers: the pin goes to each chunk's owner on the ring ---------------------------------------

SMALL_CHUNK = 64 << 10
# Workers whose SSD tier holds ~15 chunks, half of it pinnable, and admits every chunk: a scan
# evicts whatever is not pinned.
WORKER_TIERS = ("--chunk-size", "64K", "--mem-size", "0", "--cache-size", "1M", "--pin-quota", "512K", "--admission", "lru",
                "--free-space-ratio", "0")
# Mounts that keep nothing themselves: every read is asked of the chunk's owner.
BARE = ("--chunk-size", "64K", "--mem-size", "0", "--cache-size", "0", "--read-ahead", "0")


def _data_gets(proxy, prefix: str) -> int:
    return sum(n for (path, _), n in proxy.gets.items() if path.startswith(f"/{prefix}/"))


def _read_through(path: Path) -> bytes:
    """The file's bytes, read through the mount (its pages dropped from the kernel's
    cache after: a mount keeps them across opens of an unchanged file)."""
    with open(path, "rb") as f:
        data = f.read()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return data


def _read_tree(root: str, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert _read_through(Path(root, path)) == data, path


def _worker_pins(run_cachefs, worker_cache: Path) -> list[dict]:
    [sock] = (worker_cache / "run").glob("*.sock")
    res = run_cachefs("status", sock, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["pins"]


@pytest.mark.integration
def test_a_pin_on_a_mount_with_peers_keeps_the_chunks_at_their_owners(
    tmp_path, s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount, run_cachefs
):
    from conftest import stop_process

    src = s3_behind_proxy
    hot = {f"hot/{i}.bin": os.urandom(SMALL_CHUNK) for i in range(5)} | {"hot/two.bin": os.urandom(2 * SMALL_CHUNK - 5)}
    cold = {f"cold/{i}.bin": os.urandom(SMALL_CHUNK) for i in range(6)}
    big = os.urandom(128 * SMALL_CHUNK)  # 8 MiB: four times both workers' SSD tiers together
    for path, data in {**hot, **cold, "big.bin": big}.items():
        src.write(path, data)
    workers = [cachefs_worker(src, *WORKER_TIERS) for _ in range(2)]
    caches = [tmp_path / f"wcache{i}" for i in range(2)]
    peers = ("--peers", ",".join(w.addr for w in workers), "--secret-file", str(secret_file))
    m1 = cachefs_mount(src, *BARE, *peers)
    m2 = cachefs_mount(src, *BARE, *peers)
    hot_bytes = sum(map(len, hot.values()))

    res = run_cachefs("warmup", Path(m1.mountpoint, "hot"), "-r", "--pin", "--ttl", "1h", "--owner", "job-7")
    assert res.returncode == 0, res.stderr
    assert run_cachefs("warmup", Path(m1.mountpoint, "cold"), "-r").returncode == 0  # loaded, not pinned
    [lease] = json.loads(run_cachefs("status", "--json", m1.mountpoint).stdout)["pins"]
    assert (lease["owner"], lease["bytes"], sum(lease["peers"].values())) == ("job-7", hot_bytes, hot_bytes)
    # Each owner keeps its part under the same lease id; the mount pins nothing itself.
    for w, cache in zip(workers, caches):
        held = _worker_pins(run_cachefs, cache)
        assert [(p["id"], p["owner"], p["bytes"]) for p in held] == (
            [(lease["id"], "job-7", lease["peers"][w.addr])] if w.addr in lease["peers"] else []
        )
    assert sum(w.metric("cachefs_pin_lease_bytes") for w in workers) == hot_bytes

    def scan_then_gets(files: dict[str, bytes]) -> int:
        """Read `big` through the other mount, then `files`: the backend GETs `files` took."""
        assert _read_through(Path(m2.mountpoint, "big.bin")) == big
        src.proxy.reset()
        _read_tree(m2.mountpoint, files)
        return _data_gets(src.proxy, src.prefix)

    assert scan_then_gets(hot) == 0  # the pinned tree stayed at its owners...
    assert scan_then_gets(cold) > 0  # ...while what was not pinned made room for the scan
    assert sum(w.metric("cachefs_cache_evictions_total", tier="disk") for w in workers) > 0

    # Over an owner's quota: one line with its numbers, and nothing pinned anywhere, also at the
    # owners that had said yes. A third worker that may pin nothing owns a share of m3's ring.
    w3 = cachefs_worker(src, *WORKER_TIERS, "--pin-quota", "0")
    m3 = cachefs_mount(src, *BARE, "--peers", ",".join(w.addr for w in [*workers, w3]), "--secret-file", str(secret_file))
    for i in range(24):  # one-chunk files: ~8 at each owner, and the two that may pin have room
        src.write(f"many/{i}.bin", os.urandom(1000))
    res = run_cachefs("pin", Path(m3.mountpoint, "many"), "--ttl", "1h", "--owner", "job-8")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert re.fullmatch(
        r"cachefs: error: pinning \S+ more at owner 127\.0\.0\.1:\d+ would pin \S+, over its pin quota of \S+ "
        r"\(\S+ pinned now\); unpin something or raise that node's --pin-quota( \(and \d more owners refused\))?",
        res.stderr.strip(),
    ), res.stderr
    assert f"at owner {w3.addr} would pin" in res.stderr or "more owners refused" in res.stderr
    assert json.loads(run_cachefs("status", "--json", m3.mountpoint).stdout)["pins"] == []
    assert [p["owner"] for cache in caches for p in _worker_pins(run_cachefs, cache)] == ["job-7"] * len(lease["peers"])
    assert _worker_pins(run_cachefs, tmp_path / "wcache2") == []
    assert any("ended by their origin" in w.log_path.read_text() for w in workers)  # they had said yes

    # A worker restart keeps its leases and the pinned chunks.
    restarted = max(workers, key=lambda w: lease["peers"].get(w.addr, 0))
    n = workers.index(restarted)
    stop_process(restarted.proc, timeout=10)
    workers[n] = cachefs_worker(src, *WORKER_TIERS, "--cache-dir", str(caches[n]), port=int(restarted.addr.rsplit(":", 1)[1]))
    assert [p["id"] for p in _worker_pins(run_cachefs, caches[n])] == [lease["id"]]
    assert scan_then_gets(hot) == 0

    # Unpinned at the mount, unpinned at the owners: the next scan evicts those chunks too.
    res = run_cachefs("unpin", m1.mountpoint, "--owner", "job-7")
    assert res.returncode == 0 and "ended 1 lease(s)" in res.stdout and res.stderr == "", res
    assert [_worker_pins(run_cachefs, cache) for cache in caches] == [[], []]
    assert sum(w.metric("cachefs_pinned_bytes") for w in workers) == 0
    assert scan_then_gets(hot) > 0


@pytest.mark.integration
def test_a_lease_at_the_owners_ends_with_its_ttl_also_at_an_owner_that_was_down(
    tmp_path, s3_behind_proxy, secret_file, cachefs_worker, cachefs_mount, run_cachefs
):
    """A lease at the owners runs out with the mount's; an owner that was down then
    drops it when it starts again, as expired."""
    from conftest import stop_process

    src = s3_behind_proxy
    for i in range(16):
        src.write(f"hot/{i}.bin", os.urandom(1000))
    workers = [cachefs_worker(src, *WORKER_TIERS) for _ in range(2)]
    caches = [tmp_path / f"wcache{i}" for i in range(2)]
    m = cachefs_mount(src, *BARE, "--peers", ",".join(w.addr for w in workers), "--secret-file", str(secret_file))
    res = run_cachefs("pin", Path(m.mountpoint, "hot"), "--ttl", "5s", "--json")
    assert res.returncode == 0, res.stderr
    lease = json.loads(res.stdout)
    assert sorted(lease["peers"]) == sorted(w.addr for w in workers)  # 16 chunks: both own some
    stop_process(workers[0].proc, timeout=10)  # down while the lease runs out
    assert time.time() < lease["expires"], "too slow to stop the worker before the lease ran out"
    saved = json.loads((caches[0] / "pins.json").read_text())
    origin = f"mount:{socket.gethostname()}:{m.proc.pid}"  # how a mount that does not serve names itself
    assert [(d["id"], d["origin"], d["bytes"]) for d in saved] == [(lease["id"], origin, lease["peers"][workers[0].addr])]
    deadline = time.monotonic() + 30
    while json.loads(run_cachefs("status", "--json", m.mountpoint).stdout)["pins"]:
        assert time.monotonic() < deadline, "the mount's lease never expired"
        time.sleep(0.2)
    assert time.time() > lease["expires"]
    # The owner that was up ended it too (by its own clock, or told by the mount: whichever came first)...
    while _worker_pins(run_cachefs, caches[1]):
        assert time.monotonic() < deadline, "the owner that was up kept the lease"
        time.sleep(0.2)
    assert workers[1].metric("cachefs_pinned_bytes") == 0
    # ...and the one that was down drops it as it loads its leases.
    again = cachefs_worker(src, *WORKER_TIERS, "--cache-dir", str(caches[0]), port=int(workers[0].addr.rsplit(":", 1)[1]))
    assert _worker_pins(run_cachefs, caches[0]) == []
    assert again.metric("cachefs_pin_lease_bytes") == 0
