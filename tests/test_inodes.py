"""The inode table: lookup counts, forget, open handles (pyfuse3 passthroughfs semantics).

The real-mount side (the kernel forgets after drop_caches) is in test_mount.py.
"""

from __future__ import annotations

import pytest

from cachefs.inodes import ROOT_INODE, InodeTable


def test_inode_is_stable_while_looked_up():
    t = InodeTable()
    a = t.lookup("d/a")
    assert a != ROOT_INODE
    assert t.lookup("d/a") == a
    assert t.lookup_count(a) == 2
    assert t.path(a) == "d/a"
    assert not t.forget(a, 1), "one lookup is still held"
    assert t.lookup("d/a") == a, "still held by the kernel: the same number"
    assert len(t) == 2  # the root and d/a


def test_forget_to_zero_drops_the_inode_and_its_path():
    t = InodeTable()
    a = t.lookup("d/a")
    t.lookup("d/a")
    assert t.forget(a, 2)
    assert len(t) == 1, "only the root is left"
    with pytest.raises(KeyError):
        t.path(a)
    b = t.lookup("d/a")
    assert b != a and b > a, "a forgotten path gets a new number, never a reused one"


def test_numbers_are_never_reused():
    t = InodeTable()
    seen = set()
    for i in range(100):
        ino = t.lookup(f"f{i % 3}")
        assert ino not in seen or t.lookup_count(ino) > 1
        seen.add(ino)
        t.forget(ino, t.lookup_count(ino))
    assert len(seen) == 100
    assert len(t) == 1


def test_the_root_is_never_dropped():
    t = InodeTable()
    t.lookup("")
    assert not t.forget(ROOT_INODE, 1)
    assert not t.forget(ROOT_INODE, 5), "more than looked up: still kept"
    assert t.path(ROOT_INODE) == ""


def test_an_open_inode_outlives_its_lookups():
    t = InodeTable()
    a = t.lookup("f")
    t.opened(a)
    t.opened(a)
    assert not t.forget(a, 1), "open: kept although the kernel forgot it"
    assert t.path(a) == "f"
    assert not t.closed(a)
    assert t.closed(a), "the last handle closed with no lookups left: dropped"
    with pytest.raises(KeyError):
        t.path(a)


def test_closing_keeps_an_inode_the_kernel_still_holds():
    t = InodeTable()
    a = t.lookup("f")
    t.opened(a)
    assert not t.closed(a)
    assert t.path(a) == "f"
    assert t.forget(a, 1)


def test_forgetting_an_unknown_inode_is_harmless():
    t = InodeTable()
    assert not t.forget(12345, 1)
    assert len(t) == 1


@pytest.mark.trio
async def test_forget_drops_what_fuse_ops_keeps_per_inode():
    from cachefs.fuse_ops import Operations

    from types import SimpleNamespace

    node = SimpleNamespace(datasets={}, on_removed=None, config=None)  # forget needs none of the node
    ops = Operations(node, entry_ttl=1.0, attr_ttl=1.0, block_size=4096)
    ino = ops.inodes.lookup("f")
    ops._opened_versions[ino] = "etag:1"
    assert _gauge("cachefs_inodes") == 2
    await ops.forget([(ino, 1)])
    assert ino not in ops._opened_versions
    assert _gauge("cachefs_inodes") == 1


def _gauge(name: str) -> float:
    import prometheus_client as prom

    return prom.REGISTRY.get_sample_value(name)
