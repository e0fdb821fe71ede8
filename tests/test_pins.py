"""Pins with leases: pinned chunks survive a scan larger than the cache, the
pin quota is enforced with numbers, leases survive a restart and expire."""

from __future__ import annotations

import json
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
