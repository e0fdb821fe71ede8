"""The control socket: protocol, server, client and the CLI commands that use it.

Real unix sockets under a short temp dir (sun_path holds 107 bytes), a fake node
in-process. End-to-end through a real mount comes with the Node.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import tempfile

import pytest
import trio
import trio.testing

from cachefs import control, control_client
from cachefs.config import DatasetConfig
from cachefs.control import ControlLimits, call, serve_control
from cachefs.control_client import request, socket_for
from cachefs.errors import ConfigError


class FakeNode:
    """Satisfies control.NodeControl; `open_files[name]` makes a dataset busy."""

    def __init__(self) -> None:
        self.datasets: dict[str, DatasetConfig] = {}
        self.open_files: dict[str, int] = {}
        self.fail_with: Exception | None = None

    async def add_dataset(self, dataset: DatasetConfig) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_with:
            raise self.fail_with
        if dataset.name in self.datasets:
            raise ConfigError(f"dataset {dataset.name!r} is served already")
        self.datasets[dataset.name] = dataset

    async def remove_dataset(self, name: str, force: bool) -> None:
        await trio.lowlevel.checkpoint()
        if name not in self.datasets:
            raise ConfigError(f"no dataset {name!r}")
        if self.open_files.get(name) and not force:
            raise ConfigError(f"dataset {name!r}: {self.open_files[name]} files open; close them or use --force")
        del self.datasets[name]

    def list_datasets(self) -> list[dict]:
        return [
            {"name": d.name, "url": d.url, "read_only": d.read_only, "subdir": d.subdir, "quota": d.quota,
             "open_files": self.open_files.get(d.name, 0)}
            for d in self.datasets.values()
        ]

    def status(self) -> dict:
        return {
            "version": "9.9", "hot_path": "native", "pid": 42,
            "tiers": [{"name": "mem", "used_bytes": 1 << 20, "capacity_bytes": 1 << 30, "chunks": 1}],
            "datasets": self.list_datasets(),
            "peers": [{"node": "10.0.0.2:7000", "up": False}],
        }


@pytest.fixture
def run_dir():
    top = tempfile.mkdtemp(prefix="cfs", dir="/tmp")
    yield os.path.join(top, "run")
    shutil.rmtree(top)


@pytest.fixture
def sock(run_dir):
    return os.path.join(run_dir, "c.sock")


@pytest.fixture
def node():
    return FakeNode()


@pytest.fixture
async def served(nursery, node, sock):
    await nursery.start(serve_control, node, sock)
    return sock


async def raw(path: str, data: bytes, replies: int = 1, eof: bool = False) -> list[dict]:
    """Send `data` as is; the first `replies` reply lines. With `eof`, check the server then closes."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(data)
        buf = b""
        while buf.count(b"\n") < replies:
            chunk = await stream.receive_some()
            assert chunk, f"EOF after {buf!r}"
            buf += chunk
        if eof:
            with trio.fail_after(5):
                while chunk := await stream.receive_some():
                    buf += chunk
        lines = buf.split(b"\n")
        assert lines[replies:] == [b""], "more than the replies"
        return [json.loads(line) for line in lines[:replies]]


def req(op: str, args=None, v=1) -> bytes:
    return json.dumps({"v": v, "op": op, "args": args or {}}).encode() + b"\n"


# -- ops ----------------------------------------------------------------------------------


@pytest.mark.trio
async def test_every_op_round_trips(served, node):
    hello = await call(served, "hello")
    assert hello["protocol"] == 1 and "dataset.add" in hello["ops"]

    assert await call(served, "dataset.add", {"spec": "feats=s3://bkt/feats,subdir=v2,quota=1G"}) is None
    d = node.datasets["feats"]
    assert (d.url, d.subdir, d.quota, d.read_only) == ("s3://bkt/feats", "v2", 1 << 30, True)

    rows = await call(served, "dataset.list")
    assert rows == [{"name": "feats", "url": "s3://bkt/feats", "read_only": True, "subdir": "v2",
                     "quota": 1 << 30, "open_files": 0}]
    status = await call(served, "status")
    assert status["version"] == "9.9" and status["datasets"] == rows

    assert await call(served, "dataset.remove", {"name": "feats", "force": False}) is None
    assert await call(served, "dataset.list") == []


@pytest.mark.trio
async def test_node_refusals_are_error_replies(served, node):
    await call(served, "dataset.add", {"spec": "a=/data/a"})
    with pytest.raises(ConfigError, match="served already") as e:
        await call(served, "dataset.add", {"spec": "a=/data/a"})
    assert e.value.exitcode == 1
    node.open_files["a"] = 3
    with pytest.raises(ConfigError, match="3 files open; close them or use --force"):
        await call(served, "dataset.remove", {"name": "a"})
    await call(served, "dataset.remove", {"name": "a", "force": True})
    with pytest.raises(ConfigError, match="no dataset 'b'"):
        await call(served, "dataset.remove", {"name": "b"})


@pytest.mark.trio
@pytest.mark.parametrize(
    "spec, message",
    [
        ("feats=/data,bogus=1", "unknown option 'bogus'"),
        ("feats=relative/dir", "must be absolute over the control socket"),
        ("feats=/data,secret_key_file=key", "secret_key_file 'key' must be an absolute path"),
        ("feats=/data,secret_key=hunter2", "secrets are read from files only"),
        ("=/data", "needs a name"),
        ("feats=s3://b/f,access_key=AK,secret_key_file=/nonexistent/key", "secret_key_file /nonexistent/key: No such file"),
    ],
)
async def test_bad_specs_are_error_replies(served, node, spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        await call(served, "dataset.add", {"spec": spec})
    assert e.value.exitcode == 1 and "\n" not in str(e.value)
    assert "hunter2" not in str(e.value)
    assert node.datasets == {}


# -- bad requests ------------------------------------------------------------------------------


@pytest.mark.trio
@pytest.mark.parametrize(
    "line, message",
    [
        (req("nope"), "unknown op 'nope'"),
        (req("hello", v=2), "protocol version 2 is not supported"),
        (b'{"v": true, "op": "hello"}\n', 'no integer "v"'),
        (b'{"op": "hello"}\n', 'no integer "v"'),
        (b'{"v": 1, "op": 7}\n', 'no string "op"'),
        (b'{"v": 1, "op": "status", "args": []}\n', '"args" must be an object'),
        (b'[1, 2]\n', "JSON list, not an object"),
        (req("dataset.add"), "args.spec: missing"),
        (req("dataset.add", {"spec": 5}), "args.spec: expected str, not int"),
        (req("dataset.remove", {"name": "a", "force": "yes"}), "args.force: expected bool, not str"),
        (req("dataset.remove", {"name": True}), "args.name: expected str, not bool"),
    ],
)
async def test_bad_request_gets_error_and_connection_goes_on(served, line, message):
    replies = await raw(served, line + req("hello"), replies=2)
    assert replies[0]["v"] == 1 and replies[0]["ok"] is False and message in replies[0]["error"]
    assert replies[1]["ok"] is True  # the same connection still serves


@pytest.mark.trio
@pytest.mark.parametrize(
    "data, message",
    [
        (b"not json\n", "not valid JSON"),
        (b"\xff\xfe\n", "not valid JSON"),
        (b"x" * (control.MAX_LINE + 10), "request longer than 65536 bytes"),
        (b'{"v": 1, "op": "hello"', "not terminated by a newline"),
    ],
)
async def test_garbage_gets_error_and_close(served, data, message):
    stream = await trio.open_unix_socket(served)
    async with stream:
        await stream.send_all(data)
        if data.endswith(b'"hello"'):
            await stream.send_eof()
        buf = b""
        while chunk := await stream.receive_some():  # ends: the server closes
            buf += chunk
    reply = json.loads(buf)
    assert reply["ok"] is False and message in reply["error"]
    assert (await call(served, "hello"))["protocol"] == 1  # and keeps serving


@pytest.mark.trio
async def test_unknown_fields_are_ignored(served):
    line = json.dumps({"v": 1, "op": "hello", "args": {"later": 1}, "id": "x"}).encode() + b"\n"
    replies = await raw(served, line)
    assert replies[0]["ok"] is True


@pytest.mark.trio
async def test_node_bug_fails_the_request_not_the_server(served, node, caplog):
    node.fail_with = RuntimeError("boom\nsecond line")
    with pytest.raises(ConfigError, match="internal error: RuntimeError: boom second line"):
        await call(served, "dataset.add", {"spec": "a=/data/a"})
    assert "control request" in caplog.text
    node.fail_with = None
    await call(served, "dataset.add", {"spec": "a=/data/a"})


@pytest.mark.trio
async def test_silent_client_is_closed_after_the_request_timeout(served, autojump_clock):
    stream = await trio.open_unix_socket(served)
    async with stream:
        await stream.send_all(b'{"v": 1, "op"')
        with trio.fail_after(ControlLimits().request_timeout + 1):
            assert await stream.receive_some() == b""
    assert trio.current_time() >= ControlLimits().request_timeout


@pytest.mark.trio
async def test_connections_are_capped(served):
    idle = [await trio.open_unix_socket(served) for _ in range(ControlLimits().max_connections)]
    try:
        await trio.testing.wait_all_tasks_blocked()
        replies = await raw(served, req("hello"), eof=True)
        assert "too many control connections" in replies[0]["error"]
    finally:
        for s in idle:
            await s.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert (await call(served, "hello"))["protocol"] == 1


# -- the socket file ------------------------------------------------------------------------------


@pytest.mark.trio
async def test_modes_and_removal_on_cancel(nursery, node, sock, run_dir):
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(serve_control, node, sock)
            assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
            st = os.lstat(sock)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            scope.cancel()
    assert not os.path.exists(sock)


@pytest.mark.trio
async def test_stale_socket_is_replaced(node, sock, run_dir, nursery):
    os.makedirs(run_dir)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock)  # bound, never listening, closed: what a killed node leaves
    dead.close()
    with pytest.raises(ConfigError, match="is stale"):
        await call(sock, "hello")
    await nursery.start(serve_control, node, sock)
    assert (await call(sock, "hello"))["protocol"] == 1


@pytest.mark.trio
async def test_live_socket_is_refused_and_left_alone(served, node):
    with pytest.raises(ConfigError, match="is in use by another cachefs"):
        await serve_control(FakeNode(), served)
    assert (await call(served, "hello"))["protocol"] == 1


@pytest.mark.trio
async def test_other_file_at_the_path_is_refused(node, sock, run_dir):
    os.makedirs(run_dir)
    open(sock, "w").close()
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await serve_control(node, sock)
    assert os.path.isfile(sock)


@pytest.mark.trio
async def test_a_path_longer_than_sun_path_still_works(node, run_dir, nursery):
    """sun_path holds 107 bytes; a deep run dir is reached through a descriptor of it."""
    deep = os.path.join(run_dir, *["d" * 50] * 3)
    path = os.path.join(deep, "node.sock")
    assert len(path) > 107
    await nursery.start(serve_control, node, path)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert (await call(path, "hello"))["protocol"] == 1


@pytest.mark.trio
async def test_a_replaced_socket_is_not_removed(node, sock, nursery):
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(serve_control, node, sock)
            os.unlink(sock)
            other = socket.socket(socket.AF_UNIX)
            other.bind(sock)  # a successor's
            scope.cancel()
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    other.close()


def test_socket_path_is_short_and_distinct():
    a = control.socket_path("/run/cachefs", "/mnt/" + "x" * 200)
    b = control.socket_path("/run/cachefs", "/mnt/" + "x" * 199)
    assert a != b and len(a) <= 107 and a.endswith(".sock")


# -- client errors -----------------------------------------------------------------------------


@pytest.mark.trio
async def test_no_socket_is_one_line(run_dir):
    with pytest.raises(ConfigError) as e:
        await call(os.path.join(run_dir, "c.sock"), "hello", label="/mnt/x")
    assert str(e.value) == "/mnt/x: no cachefs control socket (is it a cachefs mount?)" and e.value.exitcode == 2


def test_permission_denied_names_root():
    e = control_client.connect_error(PermissionError(errno.EACCES, "Permission denied"), "/r/c.sock", "/mnt/x")
    assert str(e) == "/mnt/x: permission denied: only root can use the control socket /r/c.sock"


@pytest.mark.trio
async def test_no_reply_times_out(sock, run_dir, autojump_clock):
    os.makedirs(run_dir)
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(sock)
    mute.listen(1)  # accepts (in the kernel), never answers
    with trio.move_on_after(10) as scope:
        await call(sock, "hello")
    assert scope.cancelled_caught
    mute.close()


def test_request_timeout_is_one_line(sock, run_dir):
    os.makedirs(run_dir)
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(sock)
    mute.listen(1)
    with pytest.raises(ConfigError, match=r"c\.sock: no reply from the node within 0 s"):
        request(sock, "hello", timeout=0)
    mute.close()


def test_socket_for(sock, run_dir, tmp_path):
    os.makedirs(run_dir)
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock)
    assert socket_for(sock) == sock
    s.close()
    with pytest.raises(ConfigError, match=r"^.*/nowhere: No such file or directory$"):
        socket_for(str(tmp_path / "nowhere"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=r"/d: not in a cachefs mount$"):
        socket_for(str(tmp_path / "d"))


def test_socket_for_asks_the_xattr_up_to_the_mount_root(tmp_path, sock):
    root = tmp_path / "mnt"
    (root / "feats" / "a").mkdir(parents=True)
    try:
        os.setxattr(root, control_client.XATTR, sock.encode())
    except OSError as e:
        pytest.skip(f"no user xattrs here ({e.strerror})")
    assert socket_for(str(root)) == sock
    assert socket_for(str(root / "feats" / "a")) == sock


def test_socket_for_gives_up_on_a_hung_mount(monkeypatch, tmp_path):
    import threading

    release = threading.Event()
    monkeypatch.setattr(control_client, "_locate", lambda target: release.wait())
    try:
        with pytest.raises(ConfigError, match=r"/mnt: no answer within 0.05 s \(a hung mount\?\)"):
            socket_for(str(tmp_path / "mnt"), timeout=0.05)
    finally:
        release.set()


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_unreachable_is_one_line_exit_2(run_cachefs, tmp_path):
    r = run_cachefs("dataset", "list", "/nonexistent")
    assert r.returncode == 2 and r.stderr == "cachefs: error: /nonexistent: No such file or directory\n"
    r = run_cachefs("status", str(tmp_path))
    assert r.returncode == 2 and r.stderr == f"cachefs: error: {tmp_path}: not in a cachefs mount\n"
    r = run_cachefs("dataset", "add", str(tmp_path), "x=/data,bogus=1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown option 'bogus'" in r.stderr
    r = run_cachefs("status", "--json", "127.0.0.1:9")
    assert r.returncode == 2 and "--json takes one MOUNTPOINT" in r.stderr


@pytest.mark.trio
async def test_cli_through_the_socket(served, node, run_cachefs, tmp_path):
    async def cli(*args):
        return await trio.to_thread.run_sync(lambda: run_cachefs(*args))

    data = tmp_path / "data"
    r = await cli("dataset", "add", served, f"feats={data},quota=2G")
    assert r.returncode == 0 and r.stdout == f"cachefs: {served}: added dataset feats\n", r.stderr
    assert node.datasets["feats"].url == str(data)  # made absolute by the CLI
    r = await cli("dataset", "list", served)
    assert r.returncode == 0
    assert r.stdout.splitlines()[0].split() == ["NAME", "URL", "MODE", "SUBDIR", "QUOTA", "OPEN", "FILES"]
    assert r.stdout.splitlines()[1].split() == ["feats", str(data), "ro", "-", "2G", "0"]
    r = await cli("dataset", "list", served, "--json")
    assert json.loads(r.stdout)[0]["name"] == "feats"

    node.open_files["feats"] = 1
    r = await cli("dataset", "remove", served, "feats")
    assert r.returncode == 1 and r.stderr == "cachefs: error: dataset 'feats': 1 files open; close them or use --force\n"
    r = await cli("dataset", "remove", served, "feats", "--force")
    assert r.returncode == 0 and node.datasets == {}

    r = await cli("status", served)
    assert r.returncode == 0 and "cachefs 9.9 (hot path: native), pid 42" in r.stdout
    assert "peers 1; down: 10.0.0.2:7000" in r.stdout
    r = await cli("status", "--json", served)
    assert r.returncode == 0 and json.loads(r.stdout)["pid"] == 42
