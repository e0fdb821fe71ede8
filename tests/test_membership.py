"""--peers specs: static lists, DNS names re-resolved, files re-read on change."""

from __future__ import annotations

import os

import pytest
import trio

from cachefs.errors import ConfigError
from cachefs.peer import membership
from cachefs.peer.membership import Membership, parse_node_list


def test_static_lists_with_weights():
    assert parse_node_list("10.0.0.5:7070, 10.0.0.6:7070@2", "--peers") == {"10.0.0.5:7070": 1.0, "10.0.0.6:7070": 2.0}
    ring = Membership("127.0.0.1:1,127.0.0.1:2@3").ring
    assert ring.nodes == {"127.0.0.1:1", "127.0.0.1:2"} and ring.weight("127.0.0.1:2") == 3.0


@pytest.mark.parametrize("spec", ["nohost", "h:0", "h:1@-1", "h:1@x", "h:1@nan", ""])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ConfigError, match="--peers"):
        Membership(spec)


@pytest.mark.trio
async def test_dns_names_resolve_to_every_address(monkeypatch):
    monkeypatch.setattr(membership, "DNS_INTERVAL", 0.01)
    m = Membership("dns+localhost:7070")
    assert len(m.ring) == 0  # nothing until the first resolution
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.run)
            while not len(m.ring):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert "127.0.0.1:7070" in m.ring.nodes


@pytest.mark.trio
async def test_a_peers_file_is_reread_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(membership, "FILE_INTERVAL", 0.01)
    path = tmp_path / "peers"
    path.write_text("127.0.0.1:7001\n# a comment\n127.0.0.1:7002@2\n")
    m = Membership(f"file:{path}")
    assert m.ring.nodes == {"127.0.0.1:7001", "127.0.0.1:7002"}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.run)
            path.write_text("127.0.0.1:7001\n127.0.0.1:7003\n")
            os.utime(path, ns=(1, 1))  # a sure mtime change
            while "127.0.0.1:7003" not in m.ring.nodes:
                await trio.sleep(0.01)
            # A broken file keeps the last good ring.
            path.write_text("not an address\n")
            os.utime(path, ns=(2, 2))
            await trio.sleep(0.1)
            assert m.ring.nodes == {"127.0.0.1:7001", "127.0.0.1:7003"}
            nursery.cancel_scope.cancel()
