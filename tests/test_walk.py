"""Directory walks (cachefs/walk.py): a reader opening a directory's files in
listing order gets the next ones loaded ahead, bounded, and nothing when it
jumps, stops or is alone in a directory nobody listed."""

from __future__ import annotations

import os
import time

import pytest

from cachefs.objects import ObjectInfo
from cachefs.walk import WALK_AHEAD, DirectoryWalks

pytest_integration = pytest.mark.integration


class Listings:
    """A namespace with cached listings only."""

    def __init__(self, listings: dict[str, dict[str, ObjectInfo]]):
        self.listings = listings

    def cached_listing(self, path: str):
        return self.listings.get(path)


class Loads:
    """A reader that records what it is asked to load ahead, with room for `room` loads."""

    read_ahead = 8

    def __init__(self, room: int = 1 << 30):
        self.room = room
        self.asked: list[str] = []

    def load_ahead(self, obj, index: int = 0) -> bool:
        assert index == 0
        if len(self.asked) >= self.room:
            return False
        self.asked.append(obj.path)
        return True


def listing(parent: str, n: int, size: int = 1000) -> dict[str, ObjectInfo]:
    names = [f"f{i:03d}" for i in range(n)]
    return {name: ObjectInfo(f"{parent}/{name}" if parent else name, "file", size, 0.0, f"etag:{name}") for name in names}


def walks(n: int = 50, room: int = 1 << 30, parent: str = "d") -> tuple[DirectoryWalks, Loads]:
    loads = Loads(room)
    return DirectoryWalks("s3://b/p", Listings({parent: listing(parent, n)}), loads), loads


def test_a_walk_in_listing_order_loads_the_next_files_once_each():
    w, loads = walks()
    assert w.opened("d/f000") == 0  # one open is not a walk
    assert w.opened("d/f001") == WALK_AHEAD
    assert loads.asked == [f"d/f{i:03d}" for i in range(2, 2 + WALK_AHEAD)]
    for i in range(2, 20):
        assert w.opened(f"d/f{i:03d}") == 1  # one more each, never one twice
    assert loads.asked == [f"d/f{i:03d}" for i in range(2, 20 + WALK_AHEAD)]
    assert len(set(loads.asked)) == len(loads.asked)


def test_threads_sharing_a_walk_open_out_of_order_and_still_walk():
    # Four readers, each taking every fourth file (bench: read_small_files).
    w, loads = walks(60)
    order = [0, 2, 1, 3, 4, 6, 5, 7, 9, 8, 10, 11]
    for i in order:
        w.opened(f"d/f{i:03d}")
    assert loads.asked == [f"d/f{i:03d}" for i in range(3, 12 + WALK_AHEAD)]  # each once, in order


def test_jumps_start_nothing_and_the_end_of_the_directory_bounds_it():
    w, loads = walks(100)
    for i in (0, 30, 60, 90, 20, 50):
        assert w.opened(f"d/f{i:03d}") == 0
    assert loads.asked == []
    w, loads = walks(12)
    w.opened("d/f009")
    assert w.opened("d/f010") == 1  # only f011 is left
    assert loads.asked == ["d/f011"]


def test_a_walk_started_over_loads_again_and_no_room_defers():
    w, loads = walks(30, room=3)
    w.opened("d/f000")
    assert w.opened("d/f001") == 3  # no room for more: the next open tries again
    loads.room = 100
    assert w.opened("d/f002") == WALK_AHEAD - 2  # f005 .. f010
    assert loads.asked == [f"d/f{i:03d}" for i in range(2, 3 + WALK_AHEAD)]
    for i in range(3, 30):
        w.opened(f"d/f{i:03d}")
    loads.asked.clear()
    w.opened("d/f000")  # a second epoch over the directory
    assert w.opened("d/f001") == WALK_AHEAD
    assert loads.asked == [f"d/f{i:03d}" for i in range(2, 2 + WALK_AHEAD)]


def test_only_files_with_bytes_in_listed_directories_and_not_without_read_ahead():
    lst = listing("d", 6)
    lst["f002"] = ObjectInfo("d/f002", "dir", 0, 0.0, "dir")
    lst["f003"] = ObjectInfo("d/f003", "file", 0, 0.0, "etag:e")
    loads = Loads()
    w = DirectoryWalks("s3://b/p", Listings({"d": lst}), loads)
    w.opened("d/f000")
    w.opened("d/f001")
    assert loads.asked == ["d/f004", "d/f005"]
    assert w.opened("e/x") == 0 and w.opened("e/y") == 0  # never listed: nothing asked, nothing listed
    off = Loads()
    off.read_ahead = 0
    w = DirectoryWalks("s3://b/p", Listings({"d": listing("d", 6)}), off)
    w.opened("d/f000")
    assert w.opened("d/f001") == 0 and off.asked == []


def _gets_by_file(proxy, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for (path, _), n in proxy.gets.items():
        if path.startswith(f"/{prefix}/"):
            name = path.rsplit("/", 1)[1]
            out[name] = out.get(name, 0) + n
    return out


def _wait_for(condition, seconds: float = 20.0) -> None:
    """Loads ahead run in the daemon: wait until it has made them (a bound, not a pace)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the daemon did not get there in time"
        time.sleep(0.02)


@pytest_integration
@pytest.mark.parametrize("read_ahead", ["8", "0"])
def test_a_walk_through_a_mount_finds_the_next_files_loaded(s3_behind_proxy, cachefs_mount, read_ahead):
    """Small files read in listing order through a real mount: the files after the
    last one read are fetched before they are opened, each file is fetched once
    (one GET, no HEAD), at most WALK_AHEAD ahead, and the bytes are the backend's.
    --read-ahead 0 turns it off."""
    src, proxy = s3_behind_proxy, s3_behind_proxy.proxy
    files = {f"s{i:03d}.bin": os.urandom(20_000 + i) for i in range(30)}
    for name, data in files.items():
        src.write(f"shards/{name}", data)
    # Listings and attributes trusted for the whole test: a HEAD below would then mean
    # a file opened without its listing's size and version, not a slow machine
    # outliving the 1 s defaults.
    m = cachefs_mount(src, "--read-ahead", read_ahead, "--attr-ttl", "600", "--dir-ttl", "600")
    root = os.path.join(m.mountpoint, "shards")
    names = sorted(os.listdir(root))
    assert names == sorted(files)
    heads = proxy.requests["HEAD"]
    for name in names[:10]:
        with open(os.path.join(root, name), "rb") as f:
            assert f.read() == files[name]
    expected = set(names[: 10 + WALK_AHEAD]) if read_ahead != "0" else set(names[:10])
    _wait_for(lambda: set(_gets_by_file(proxy, src.prefix)) >= expected)
    got = _gets_by_file(proxy, src.prefix)
    assert set(got) == expected  # loaded ahead, and no further
    assert all(n == 1 for n in got.values()), got
    for name in names[10:]:
        with open(os.path.join(root, name), "rb") as f:
            assert f.read() == files[name]
    got = _gets_by_file(proxy, src.prefix)
    assert set(got) == set(names) and all(n == 1 for n in got.values()), got
    assert proxy.requests["HEAD"] == heads  # the listing had sizes and versions
