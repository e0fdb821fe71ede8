"""The Python API as a researcher calls it: `with cachefs.mount(...) as m:` in a
real process, against real sources; the mount is gone afterwards, whatever ended
the block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, hermetic_env, is_mounted

pytestmark = pytest.mark.integration


def _run(code: str, tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` as a user's script would: its own interpreter, cachefs imported as a package."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=hermetic_env(env, {"PYTHONPATH": str(REPO)}))


def test_mount_read_change_datasets_and_status(tmp_path, local_source, s3_source):
    data = os.urandom(300_000)
    local_source.write("a/x.bin", data)
    s3_source.write("y.txt", b"from s3")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = _run(f"""
        import cachefs, json
        with cachefs.mount({str(mnt)!r}, datasets={{"loc": {local_source.url!r}}},
                           cache_dir={str(tmp_path / "cache")!r}, mem_size="64M", cache_size="256M",
                           options=["--endpoint-url", {s3_source.backend.endpoint_url!r}]) as m:
            assert open(m.mountpoint + "/loc/a/x.bin", "rb").read() == {data!r}
            m.add_dataset("s3", {s3_source.url!r})
            assert open(m.mountpoint + "/s3/y.txt", "rb").read() == b"from s3"
            status = m.status()
            assert isinstance(status, cachefs.NodeStatus) and status.hot_path in ("native", "purepy")
            assert sorted(d.name for d in status.datasets) == ["loc", "s3"]
            assert {{t.name for t in status.tiers}} == {{"mem", "disk"}}
            r = m.residency("loc/a/x.bin")
            assert isinstance(r, cachefs.Residency) and r.ratio == 1.0 and r.bytes == {len(data)}
            assert m.refresh("loc", recursive=True) == {{"changed": 0, "gone": 0}}
            lease = m.pin("loc/a", ttl=3600, owner="nb")
            assert lease["bytes"] == {len(data)} and [p["owner"] for p in m.status().pins] == ["nb"]
            assert [g["id"] for g in m.unpin(owner="nb")] == [lease["id"]]
            seen = []
            done = m.warmup("loc", on_progress=seen.append)
            assert done["state"] == "done" and done["bytes_total"] == {len(data)} == done["bytes_done"]
            assert seen and seen[-1]["bytes_done"] == {len(data)} and all(p["job"] == done["job"] for p in seen)
            try:
                m.warmup("loc/no-such-dir")
            except cachefs.errors.ConfigError as e:
                assert "no such file or directory" in str(e).lower(), e
            else:
                raise AssertionError("a warm-up of a missing path did not raise")
            m.remove_dataset("s3")
            assert [d.name for d in m.datasets()] == ["loc"]
            print("pid", m.process.pid)
        print("done")
    """, tmp_path, env=s3_source.env)  # the S3 keys, as a user's environment has them
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "done"
    assert not is_mounted(str(mnt))
    pid = int(res.stdout.split()[1])
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("ending", ["raise ValueError('a bug in the notebook')", "raise KeyboardInterrupt"])
def test_leaving_the_block_unmounts_whatever_ends_it(tmp_path, local_source, ending):
    local_source.write("f", b"x")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = _run(f"""
        import cachefs
        with cachefs.mount({str(mnt)!r}, {local_source.url!r}, cache_dir={str(tmp_path / "cache")!r}) as m:
            assert open(m.mountpoint + "/f", "rb").read() == b"x"
            {ending}
    """, tmp_path)
    assert res.returncode != 0
    assert not is_mounted(str(mnt))


def test_a_mount_that_cannot_start_raises_one_line_and_leaves_nothing(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = _run(f"""
        import cachefs
        from cachefs.errors import ConfigError
        try:
            cachefs.mount({str(mnt)!r}, {str(tmp_path / "missing")!r}, cache_dir={str(tmp_path / "cache")!r})
        except ConfigError as e:
            print("ConfigError:", e)
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ConfigError: mount ") and "no such bucket, prefix or directory" in res.stdout
    assert len(res.stdout.strip().splitlines()) == 1
    assert not is_mounted(str(mnt))


def test_a_warmup_interrupted_from_python_is_cancelled_at_the_node_and_resumes(tmp_path, s3_behind_proxy):
    # Ctrl-C in a notebook raises KeyboardInterrupt wherever the script is: here in the
    # progress callback, while every ranged GET waits 0.3 s at the proxy (the job cannot
    # end first). The node must not go on loading a job nobody follows; a second warm-up
    # loads only what the first did not.
    files = {f"d/f{i:02d}.bin": os.urandom(200_000) for i in range(12)}
    for name, data in files.items():
        s3_behind_proxy.write(name, data)
    total = sum(map(len, files.values()))
    proxy = s3_behind_proxy.proxy
    proxy.fault = "slow:0.3"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = _run(f"""
        import cachefs, json
        with cachefs.mount({str(mnt)!r}, datasets={{"s3": {s3_behind_proxy.url!r}}},
                           cache_dir={str(tmp_path / "cache")!r}, mem_size="64M", cache_size="256M",
                           options={s3_behind_proxy.mount_args!r}) as m:
            seen = []
            def interrupt(p):
                seen.append(p)
                if p["state"] == "running":
                    raise KeyboardInterrupt
            try:
                m.warmup("s3/d", concurrency=1, on_progress=interrupt)
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("the interrupt did not reach the caller")
            job = seen[-1]["job"]
            after = m._call("warmup.progress", job=job, wait=10)
            print(json.dumps({{"state": after["state"], "done": after["bytes_done"]}}))
            again = m.warmup("s3/d")
            print(json.dumps({{"state": again["state"], "cached": again["bytes_cached"],
                              "loaded": again["bytes_loaded"], "total": again["bytes_total"]}}))
        print("done")
    """, tmp_path, env=s3_behind_proxy.env)
    proxy.fault = None
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "done"
    first, second = (json.loads(line) for line in lines[-3:-1])
    assert first["state"] == "cancelled" and first["done"] < total
    assert second["state"] == "done" and second["total"] == total
    assert second["cached"] + second["loaded"] == total and second["loaded"] < total
    assert not is_mounted(str(mnt))
