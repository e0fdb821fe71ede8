"""`cachefs fluid-mount`: the FUSE container of a Fluid ThinRuntime, run as Fluid runs it:
a config.json, secret files under a secrets directory, MOUNT_OPTIONS, a real S3 gateway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, hermetic_env, is_mounted, stop_process

pytestmark = pytest.mark.integration

CHUNK = 256 << 10


def _fstype(path: str) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                return line.split(" - ", 1)[1].split()[0]
    return None


def _write_config(path: Path, doc: dict) -> None:
    # As the kubelet updates a ConfigMap volume: a new file swapped in, not one rewritten in place.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _secrets(tmp_path: Path, gateway) -> dict[str, str]:
    """The Dataset's encryptOptions as Fluid mounts them: /etc/fluid/secrets/<secret>/<key>."""
    d = tmp_path / "etc-fluid" / "secrets" / "s3-cred"
    d.mkdir(parents=True)
    out = {}
    for key, value in (("access-key", gateway.access_key), ("secret-key", gateway.secret_key)):
        (d / key).write_text(value)
        (d / key).chmod(0o644)  # what the kubelet writes: Fluid's secret volume sets no defaultMode
        out[key] = str(d / key)
    return out


def _mount(url: str, name: str, endpoint: str, secrets: dict[str, str]) -> dict:
    return {"mountPoint": url, "name": name, "path": f"/{name}", "options": {"endpoint": endpoint, **secrets}}


def _fluid_mount(config: Path, log: Path, mount_options: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cachefs", "fluid-mount", "--fluid-config", str(config)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            # No AWS_* keys: the secret files must be what the mount uses.
            env=hermetic_env({"MOUNT_OPTIONS": mount_options}),
        )


def _wait(what: str, ok, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc.poll() is not None:
            pytest.fail(f"fluid-mount exited with {proc.returncode} before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def _stop(target, *procs: subprocess.Popen | None) -> None:
    """Whatever failed: no mount and no process of a test outlives it."""
    if is_mounted(str(target)):
        subprocess.run(["fusermount3", "-uz", str(target)], capture_output=True)
    for proc in procs:
        stop_process(proc, timeout=10)


def _sh(cmd: str) -> str:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def fluid_env(tmp_path, s3_source):
    gw = s3_source.backend
    files = {
        "a/one.bin": os.urandom(3 * CHUNK + 11),
        "a/sub/two.bin": os.urandom(CHUNK),
        "b/three.bin": os.urandom(777),
        "c/four.bin": os.urandom(2 * CHUNK + 1),
    }
    for path, data in files.items():
        s3_source.write(path, data)
    secrets = _secrets(tmp_path, gw)
    target = tmp_path / "runtime-mnt" / "thin" / "default" / "imagenet" / "thin-fuse"  # does not exist yet
    doc = {
        "mounts": [_mount(f"{s3_source.url}/{n}", n, gw.endpoint_url, secrets) for n in ("a", "b")],
        "targetPath": str(target),
        "runtimeOptions": {"cache-dir": str(tmp_path / "cache"), "cache-size": "128M", "chunk-size": "256K"},
        "persistentVolumeAttrs": {}, "persistentVolumeMountOptions": {},
        "accessModes": ["ReadOnlyMany"],
    }
    config = tmp_path / "etc-fluid" / "config" / "config.json"
    config.parent.mkdir(parents=True)
    _write_config(config, doc)
    return {"files": files, "doc": doc, "config": config, "target": str(target), "secrets": secrets,
            "s3": s3_source, "tmp": tmp_path}


def test_fluid_mount_serves_follows_config_and_unmounts(fluid_env, run_cachefs):
    env = fluid_env
    files, doc, config, target = env["files"], env["doc"], env["config"], env["target"]
    log = env["tmp"] / "fluid.log"
    proc = _fluid_mount(config, log, "ro,mem-size=32M,log-level=debug")
    try:
        _wait("mount at targetPath", lambda: _fstype(target) == "fuse.cachefs", proc, log)
        assert sorted(os.listdir(target)) == ["a", "b"]
        for path in ("a/one.bin", "a/sub/two.bin", "b/three.bin"):
            with open(os.path.join(target, path), "rb") as f:
                assert f.read() == files[path], path

        # What Fluid's controller runs in the container (pkg/ddc/thin/operations/base.go).
        df = _sh(f"df --block-size=1 | grep {target}")
        count = _sh(f"ls -lR {target} | grep ^- | wc -l")
        print(f"\ndf --block-size=1 | grep targetPath:\n{df}ls -lR targetPath | grep ^- | wc -l: {count}")
        used = int(df.split()[2])
        expected = sum(len(d) for p, d in files.items() if p[0] in "ab")
        assert used == expected
        assert int(count) == 3

        # Fluid rewrites config.json: b goes, c comes.
        doc["mounts"] = [m for m in doc["mounts"] if m["name"] != "b"]
        doc["mounts"].append(_mount(f"{env['s3'].url}/c", "c", env["s3"].backend.endpoint_url, env["secrets"]))
        _write_config(config, doc)
        _wait("dataset c after the config change", lambda: sorted(os.listdir(target)) == ["a", "c"], proc, log)
        with open(os.path.join(target, "c/four.bin"), "rb") as f:
            assert f.read() == files["c/four.bin"]
        _wait("df to count c, not b", lambda: int(_sh(f"df --block-size=1 | grep {target}").split()[2])
              == len(files["a/one.bin"]) + len(files["a/sub/two.bin"]) + len(files["c/four.bin"]), proc, log,
              timeout=90)
        print("after the change:\n" + _sh(f"df --block-size=1 | grep {target}"))

        # A second fluid-mount on the same targetPath: busy, one line, nothing more mounted.
        again = run_cachefs("fluid-mount", "--fluid-config", config)
        assert again.returncode != 0
        assert again.stderr.strip().count("\n") == 0, again.stderr
        assert "targetPath" in again.stderr and "busy" in again.stderr, again.stderr
        with open("/proc/self/mountinfo") as f:
            assert sum(line.split()[4] == target for line in f) == 1

        gw = env["s3"].backend
        for secret in (gw.secret_key,):  # the access key is "cachefs", in every log line
            assert secret not in log.read_text()
            assert secret not in Path(f"/proc/{proc.pid}/cmdline").read_text()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-4000:]
        assert not is_mounted(target)
    finally:
        _stop(target, proc)


def test_prestop_umount_then_sigterm(fluid_env):
    """The preStop `umount` and the SIGTERM that follows it: both fire, the second finds nothing to do."""
    env = fluid_env
    log = env["tmp"] / "fluid.log"
    proc = _fluid_mount(env["config"], log, "")
    try:
        _wait("mount", lambda: _fstype(env["target"]) == "fuse.cachefs", proc, log)
        subprocess.run(["umount", env["target"]], check=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()[-4000:]
        assert not is_mounted(env["target"])
    finally:
        stop_process(proc, timeout=10)


def test_stale_mount_is_cleaned(fluid_env):
    """A fuse pod killed with SIGKILL leaves a dead mount; the next one cleans it and mounts."""
    env = fluid_env
    log = env["tmp"] / "fluid.log"
    first = _fluid_mount(env["config"], log, "")
    second = None
    try:
        _wait("first mount", lambda: _fstype(env["target"]) == "fuse.cachefs", first, log)
        first.kill()
        first.wait()
        second = _fluid_mount(env["config"], log, "")
        _wait("second mount", lambda: os.path.exists(os.path.join(env["target"], "a", "one.bin")), second, log)
        assert "stale mount" in log.read_text()
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0, log.read_text()[-4000:]
    finally:
        _stop(env["target"], first, second)


def _bad(tmp_path: Path, doc: dict | str | None) -> Path:
    config = tmp_path / "config.json"
    if doc is not None:
        config.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return config


def _doc(tmp_path: Path, **mount) -> dict:
    base = {"mountPoint": f"local://{tmp_path / 'src'}", "name": "data"}
    (tmp_path / "src").mkdir(exist_ok=True)
    return {"mounts": [{**base, **mount}], "targetPath": str(tmp_path / "target"),
            "runtimeOptions": {"cache-dir": str(tmp_path / "cache")}}


@pytest.mark.parametrize("case", ["missing", "malformed", "no-mounts", "scheme", "secret-missing",
                                  "secret-open", "secret-empty", "option", "peer-secret-open"])
def test_bad_input_is_one_line_and_mounts_nothing(tmp_path, run_cachefs, case):
    sk = tmp_path / "sk"
    sk.write_text("secret")
    sk.chmod(0o666 if case == "secret-open" else 0o600)
    ak = tmp_path / "ak"
    ak.write_text("key")
    ak.chmod(0o600)
    doc = _doc(tmp_path)
    env = {}
    want = {
        "missing": "config.json: No such file or directory",
        "malformed": "config.json: not valid JSON",
        "no-mounts": "mounts: expected a non-empty array",
        "scheme": "mountPoint: unknown scheme 'nosuch'",
        "secret-missing": "options.access-key",
        "secret-open": "options.secret-key",
        "secret-empty": "the file is empty",
        "peer-secret-open": "secret-file",
        "option": "MOUNT_OPTIONS: cache-sise: unknown option",
    }[case]
    if case == "missing":
        doc = None
    elif case == "malformed":
        doc = '{"mounts": ['
    elif case == "no-mounts":
        doc["mounts"] = []
    elif case == "scheme":
        doc["mounts"][0]["mountPoint"] = "nosuch://bucket/x"
    elif case in ("secret-missing", "secret-open", "secret-empty"):
        if case == "secret-empty":
            ak.write_text("\n")
        doc["mounts"][0].update(mountPoint="s3://bucket/x", options={
            "endpoint": "http://127.0.0.1:1",
            "access-key": str(tmp_path / "nope" if case == "secret-missing" else ak), "secret-key": str(sk)})
    elif case == "peer-secret-open":
        # The peer secret is a volume of the profile, which can set defaultMode 0400: the strict check.
        peer = tmp_path / "peer"
        peer.write_text("s")
        peer.chmod(0o644)
        doc["runtimeOptions"].update({"secret-file": str(peer), "peers": "127.0.0.1:7070"})
    elif case == "option":
        env["MOUNT_OPTIONS"] = "ro,cache-sise=1G"
    config = _bad(tmp_path, doc)
    result = run_cachefs("fluid-mount", "--fluid-config", config, env=env)
    print(f"{case}: exit {result.returncode}: {result.stderr.strip()}")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert want in result.stderr, result.stderr
    assert not (tmp_path / "target").exists() or not is_mounted(str(tmp_path / "target"))


def test_options_become_the_node_configuration(tmp_path):
    from cachefs.fluid import load_fluid

    secrets = tmp_path / "s"
    secrets.mkdir()
    for k in ("ak", "sk"):
        (secrets / k).write_text(f"value-{k}\n")
        (secrets / k).chmod(0o400)
    doc = {
        "mounts": [
            {"mountPoint": "s3://bkt/train", "name": "train", "readOnly": True,
             "options": {"endpoint": "http://s3.local:9000", "access-key": str(secrets / "ak"),
                         "secret-key": str(secrets / "sk"), "quota": "10G", "subdir": "v2"}},
            {"mountPoint": "local:///data/val", "name": "val"},
        ],
        "targetPath": "/runtime-mnt/thin/ns/ds/thin-fuse",
        "runtimeOptions": {"cache-size": "20G", "read-ahead": "4", "attr-ttl": "30s"},
    }
    config = tmp_path / "config.json"
    config.write_text(json.dumps(doc))
    node = load_fluid(str(config), {"MOUNT_OPTIONS": "ro,cache-size=5G,mem-size=1G,free-space-ratio=0.2"})
    assert node.mountpoint == "/runtime-mnt/thin/ns/ds/thin-fuse"
    assert node.cache_size == 20 << 30  # runtimeOptions over MOUNT_OPTIONS
    assert node.mem_size == 1 << 30 and node.free_space_ratio == 0.2 and node.read_ahead == 4 and node.attr_ttl == 30
    train, val = node.datasets
    assert (train.name, train.url, train.subdir, train.quota, train.endpoint_url) == (
        "train", "s3://bkt/train", "v2", 10 << 30, "http://s3.local:9000")
    assert train.credentials.key_pair() == ("value-ak", "value-sk")
    assert (val.name, val.url, val.read_only) == ("val", "/data/val", True)

    doc["mounts"] = doc["mounts"][1:]  # one mount: at the root
    config.write_text(json.dumps(doc))
    assert load_fluid(str(config), {}).root_dataset.url == "/data/val"


def test_config_change_waits_for_open_files_and_survives_bad_json(tmp_path):
    """A removed mount whose files are open stays until they are closed; a config.json Fluid
    is half-way through writing (not JSON) changes nothing."""
    for name in ("a", "b", "c"):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / f"{name}.txt").write_text(name * 100)
    target = str(tmp_path / "target")
    doc = {"mounts": [{"mountPoint": f"local://{tmp_path / 'src' / n}", "name": n} for n in ("a", "b")],
           "targetPath": target, "runtimeOptions": {"cache-dir": str(tmp_path / "cache"), "cache-size": "64M"}}
    config = tmp_path / "config.json"
    _write_config(config, doc)
    log = tmp_path / "fluid.log"
    proc = _fluid_mount(config, log, "log-level=debug")
    try:
        _wait("mount", lambda: _fstype(target) == "fuse.cachefs", proc, log)
        held = open(os.path.join(target, "b", "b.txt"))
        config.write_text('{"mounts": [')
        time.sleep(2.5)
        assert sorted(os.listdir(target)) == ["a", "b"]
        assert "not valid JSON" in log.read_text()

        doc["mounts"] = [doc["mounts"][0], {"mountPoint": f"local://{tmp_path / 'src' / 'c'}", "name": "c"}]
        _write_config(config, doc)
        _wait("c", lambda: "c" in os.listdir(target), proc, log)
        time.sleep(2.5)
        assert sorted(os.listdir(target)) == ["a", "b", "c"]  # b: a file of it is open
        assert held.read() == "b" * 100
        held.close()
        _wait("b to go once closed", lambda: sorted(os.listdir(target)) == ["a", "c"], proc, log)
        assert log.read_text().count("removing it once they are closed") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not is_mounted(target)
    finally:
        _stop(target, proc)


def test_read_write_access_modes_make_read_write_datasets(tmp_path):
    from cachefs.fluid import load_fluid

    doc = {
        "mounts": [{"mountPoint": f"local://{tmp_path}", "name": "out"}],
        "targetPath": str(tmp_path / "target"),
        "accessModes": ["ReadWriteMany"],
    }
    config = tmp_path / "config.json"
    config.write_text(json.dumps(doc))
    node = load_fluid(str(config), {"MOUNT_OPTIONS": "rw,cache-size=1G"})
    assert [d.read_only for d in node.datasets] == [False]
    doc["accessModes"] = ["ReadOnlyMany"]
    config.write_text(json.dumps(doc))
    assert [d.read_only for d in load_fluid(str(config), {"MOUNT_OPTIONS": "ro"}).datasets] == [True]


@pytest.mark.trio
async def test_df_of_a_read_write_dataset_still_reports_its_bytes_as_used():
    from types import SimpleNamespace

    from cachefs.fuse_ops import Operations

    rw = SimpleNamespace(config=SimpleNamespace(read_only=False))
    ops = Operations(SimpleNamespace(datasets={"out": rw}, config=None), entry_ttl=1.0, attr_ttl=1.0, block_size=4096)
    plain = await ops.statfs(None)
    assert plain.f_bavail == plain.f_blocks // 2  # room to write, for tools that look first
    # Files too: with no free inodes, `df -i` read 100 % used, and "out of inodes" alerts
    # on node_exporter's figures fired for every read-write mount.
    assert plain.f_favail == plain.f_ffree == plain.f_files // 2

    async def usage():
        return 1_049_364, 3

    ops.usage = usage  # cachefs fluid-mount: Fluid reads used bytes from df
    fluid = await ops.statfs(None)
    assert (fluid.f_frsize, fluid.f_blocks, fluid.f_bfree, fluid.f_bavail, fluid.f_files) == (1, 1_049_364, 0, 0, 3)
    assert fluid.f_ffree == fluid.f_favail == 0  # full: never more free than in all


@pytest.mark.parametrize("options,runtime", [
    ("rw,unsigned-payload=true", {}),
    ("rw,unsigned-payload", {}),
    ("rw", {"unsigned-payload": True}),
    ("rw", {"unsigned-payload": "true"}),
    ("rw,writeback", {}),
])
def test_fluid_unsigned_payload_can_be_set(tmp_path, options, runtime):
    """--unsigned-payload (and --writeback) as Fluid passes node options (MOUNT_OPTIONS or
    runtimeOptions): every spelling was refused ("expected true or false", "needs a value"),
    boolean options being parsed from strings as numbers are (helper-50's review, its test)."""
    from cachefs.fluid import load_fluid

    doc = {
        "mounts": [{"mountPoint": f"local://{tmp_path}", "name": "out"}],
        "targetPath": str(tmp_path / "target"),
        "accessModes": ["ReadWriteMany"],
        "runtimeOptions": runtime,
    }
    config = tmp_path / "config.json"
    config.write_text(json.dumps(doc))
    node = load_fluid(str(config), {"MOUNT_OPTIONS": options})
    assert node.unsigned_payload is ("unsigned-payload" in options or bool(runtime))
    assert node.writeback is ("writeback" in options)
