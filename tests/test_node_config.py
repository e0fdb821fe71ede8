"""The node configuration: `--dataset` specs, the `--config` TOML file and flags
become one NodeConfig; every bad input is one line naming the flag, or the file
and key, and secrets never show in argv, repr or --print-config."""

from __future__ import annotations

import os
import textwrap
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.config import Credentials, DatasetConfig
from cachefs.errors import ConfigError
from cachefs.loader import format_dataset_spec, load_node, parse_dataset_spec, parse_duration, render

G = 1 << 30
SECRET = "s3cr3t-NEVER-SHOWN"
ACCESS = "AKIA-NEVER-SHOWN"


@pytest.fixture
def node_dir(tmp_path):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "access").write_text(ACCESS + "\n")
    (tmp_path / "peer-secret").write_text("peer-" + SECRET)
    for name in ("secret", "access", "peer-secret"):
        (tmp_path / name).chmod(0o600)  # cachefs refuses secrets others can read
    return tmp_path


def _flags(tmp_path, **more):
    return {"mountpoint": str(tmp_path / "mnt"), "cache_dir": str(tmp_path / "cache"), **more}


def _write(tmp_path, text: str, name: str = "node.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _refused(needle: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_node(**kwargs)
    message = str(info.value)
    assert "\n" not in message, "one line"
    assert needle in message, message
    assert info.value.exitcode != 0
    return message


# -- --dataset -------------------------------------------------------------------------------


def test_spec_with_every_option(tmp_path):
    d = parse_dataset_spec(
        f"feats=s3://bucket/a=b/c,ro,subdir=v2/x,quota=100G,endpoint=http://127.0.0.1:9000,"
        f"access-key-file={tmp_path}/a,secret_key_file={tmp_path}/s"
    )
    assert (d.name, d.url, d.read_only, d.subdir, d.quota) == ("feats", "s3://bucket/a=b/c", True, "v2/x", 100 * G)
    assert d.endpoint_url == "http://127.0.0.1:9000"
    assert d.credentials.access_key_file == f"{tmp_path}/a" and d.credentials.secret_key_file == f"{tmp_path}/s"
    assert d.source == "s3://bucket/a=b/c/v2/x"


def test_spec_defaults_read_only_and_environment_credentials():
    d = parse_dataset_spec("md=s3://bucket/market")
    assert d.read_only and d.quota is None and d.subdir == "" and d.credentials.source == "environment"
    assert parse_dataset_spec("md=s3://b,profile=team").credentials.source == "profile"


def test_spec_relative_paths_are_from_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = parse_dataset_spec("local=data,secret_key_file=s")
    assert d.url == str(tmp_path / "data")
    assert d.credentials.secret_key_file == str(tmp_path / "s")


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("feats", "expected NAME=URL"),
        ("=s3://b", "needs a name"),
        (".hidden=s3://b", "must not start with '.'"),
        ("a/b=s3://b", "must not contain '/'"),
        ("a b=s3://b", "must not contain ' '"),
        ("x" * 256 + "=s3://b", "longer than 255 bytes"),
        ("feats=", "url: must not be empty"),
        ("feats=s3://b,qouta=1G", "unknown option 'qouta'"),
        ("feats=s3://b/a,b", "unknown option 'b'"),
        ("feats=s3://b,", "empty option"),
        ("feats=s3://b,quota", "unknown option 'quota'"),
        ("feats=s3://b,quota=lots", "--dataset feats: quota: 'lots' is not a size"),
        ("feats=s3://b,quota=0", "quota: 0 must be positive"),
        ("feats=s3://b,quota=1G,quota=2G", "quota given twice"),
        ("feats=s3://b,ro,rw", "ro/rw given twice"),
        ("feats=s3://b,subdir=/abs", "must be relative"),
        ("feats=s3://b,subdir=a/../../etc", "'..'"),
        ("feats=s3://b,subdir=a//b", "empty"),
        ("feats=s3://b,endpoint=127.0.0.1:9000", "not an http:// or https:// URL"),
    ],
)
def test_bad_specs_name_the_problem(node_dir, spec, needle):
    message = _refused(needle, flags=_flags(node_dir), datasets=[spec])
    assert message.startswith("--dataset"), message


def test_rw_datasets_and_write_options_load(node_dir):
    node = load_node(flags=_flags(node_dir, writeback=True, stage_size="1G", umask="027", uid=1000),
                     datasets=["feats=s3://b,rw", "md=s3://m"])
    assert [d.read_only for d in node.datasets] == [False, True]
    assert node.writeback and node.stage_limit == 1 << 30 and node.umask == 0o027 and node.uid == 1000
    assert not node.unsigned_payload
    assert load_node(flags=_flags(node_dir, unsigned_payload=True), datasets=["feats=s3://b,rw"]).unsigned_payload
    _refused("--stage-size 32M: staged files count against --cache-size", flags=_flags(node_dir, cache_size="16M", stage_size="32M"),
             datasets=["feats=s3://b,rw"])


@pytest.mark.parametrize("option", ["secret_key", "secret-key", "secret", "aws_secret_access_key"])
def test_a_secret_as_a_value_is_refused_without_echoing_it(node_dir, option):
    message = _refused("secret_key_file", flags=_flags(node_dir), datasets=[f"feats=s3://b,{option}={SECRET}"])
    assert SECRET not in message


def test_endpoint_and_credentials_are_for_s3_only(node_dir):
    _refused("only S3 datasets", flags=_flags(node_dir), datasets=[f"l={node_dir},endpoint=http://h:1"])
    _refused("only S3 datasets", flags=_flags(node_dir), datasets=[f"l={node_dir},profile=p"])


def test_profile_and_keys_are_exclusive(node_dir):
    spec = f"feats=s3://b,profile=p,access_key_file={node_dir}/access,secret_key_file={node_dir}/secret"
    _refused("not both", flags=_flags(node_dir), datasets=[spec])
    _refused("go together", flags=_flags(node_dir), datasets=[f"feats=s3://b,access_key_file={node_dir}/access"])


def test_duplicate_dataset_flags_are_refused(node_dir):
    _refused("--dataset a: given twice", flags=_flags(node_dir), datasets=["a=s3://b", "a=s3://c"])


_name = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,30}", fullmatch=True)
_word = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)
_url = st.builds(lambda bucket, path: f"s3://{bucket}/{path}", _word, st.from_regex(r"[A-Za-z0-9_.=/-]{0,30}", fullmatch=True))
_subdir = st.lists(_word.filter(lambda p: p not in (".", "..")), max_size=4).map("/".join)


@given(
    name=_name,
    url=_url,
    subdir=_subdir,
    quota=st.none() | st.integers(1, 1 << 60),
    endpoint=st.none() | _word.map(lambda h: f"http://{h}:9000"),
    creds=st.sampled_from(["environment", "profile", "keys"]),
    # Also a key file's name: "." or ".." there names another path ("/k/." is "/k"), which
    # the parser writes normalized.
    profile=_word.filter(lambda p: p not in (".", "..")),
)
@settings(max_examples=200, deadline=None)
def test_spec_round_trips(name, url, subdir, quota, endpoint, creds, profile):
    credentials = {
        "environment": Credentials(),
        "profile": Credentials(profile=profile),
        "keys": Credentials(access_key_file=f"/k/{profile}", secret_key_file=f"/s/{profile}"),
    }[creds]
    d = DatasetConfig(name=name, url=url, subdir=subdir, quota=quota, endpoint_url=endpoint, credentials=credentials)
    parsed = parse_dataset_spec(format_dataset_spec(d))
    assert parsed == d
    parsed.check()


# -- the TOML file ----------------------------------------------------------------------------

GOOD = """\
    log_level = "debug"

    [cache]
    size = "100G"
    mem_size = 2147483648
    chunk_size = "4M"
    read_ahead = 4

    [metadata]
    attr_ttl = "5m"
    dir_ttl = 30

    [backend]
    timeout = "10s"

    [peers]
    ring = ["127.0.0.1:7001", "127.0.0.1:7002@2"]
    secret_file = "{dir}/peer-secret"
    timeout = "500ms"

    [metrics]
    listen = "127.0.0.1:9100"

    [datasets.feats]
    url = "s3://bucket/feats"
    subdir = "v2"
    quota = "50G"
    endpoint = "http://127.0.0.1:9000"
    access_key_file = "{dir}/access"
    secret_key_file = "{dir}/secret"

    [datasets.ticks]
    url = "{dir}"
    read_only = true
"""


def test_a_full_file_loads(node_dir):
    path = _write(node_dir, GOOD.format(dir=node_dir))
    node = load_node(flags=_flags(node_dir), config_file=path)
    assert node.log_level == "DEBUG"
    assert (node.cache_size, node.mem_size, node.read_ahead) == (100 * G, 2 * G, 4)
    assert (node.attr_ttl, node.dir_ttl, node.backend_timeout, node.peer_timeout) == (300, 30, 10, 0.5)
    assert node.peers == "127.0.0.1:7001,127.0.0.1:7002@2"
    assert node.peer_secret == b"peer-" + SECRET.encode()
    assert node.metrics == ("127.0.0.1", 9100)
    feats, ticks = node.datasets
    assert feats.name == "feats" and feats.quota == 50 * G and feats.source == "s3://bucket/feats/v2"
    assert feats.credentials.key_pair() == (ACCESS, SECRET)
    assert ticks.url == str(node_dir) and ticks.credentials.source == "environment"
    assert node.run_dir == os.path.join(node.cache_dir, "run")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[datasets.feats]\nurl = 's3://b'\nquota = 'lots'\n", "node.toml: datasets.feats.quota: 'lots' is not a size"),
        ("[datasets.feats]\nurl = 's3://b'\nqouta = '1G'\n", "node.toml: datasets.feats.qouta: unknown key"),
        ("[cache]\nsise = '1G'\n", "node.toml: cache.sise: unknown key"),
        ("color = 'blue'\n", "node.toml: color: unknown key"),
        ("[cache]\nread_ahead = '8'\n", "node.toml: cache.read_ahead: expected an integer, not a string '8'"),
        ("[cache]\nfree_space_ratio = true\n", "node.toml: cache.free_space_ratio: expected a number"),
        ("cache = 5\n", "node.toml: cache: expected a table"),
        ("[metadata]\nattr_ttl = '5 parsecs'\n", "node.toml: metadata.attr_ttl: '5 parsecs' is not a duration"),
        ("[metrics]\nlisten = 'nohost'\n", "node.toml: metrics.listen: 'nohost' is not HOST:PORT"),
        ("log_level = 'loud'\n", "node.toml: log_level: 'loud' is not one of"),
        ("[datasets.feats]\nurl = 's3://b'\n[datasets.feats]\nurl = 's3://c'\n", "node.toml: datasets.feats: dataset 'feats' is given twice"),
        ("[datasets.'a/b']\nurl = 's3://b'\n", "node.toml: datasets.a/b: dataset name 'a/b' must not contain '/'"),
        ("[datasets.'.x']\nurl = 's3://b'\n", "must not start with '.'"),
        ("[datasets.feats]\nsubdir = 'x'\n", "node.toml: datasets.feats.url: a dataset needs a URL"),
        ("[datasets.feats]\nurl = 'relative/dir'\n", "neither a URL"),
        ("[datasets.feats]\nurl = 's3://b'\nsecret_key = 'hunter2'\n", "use secret_key_file"),
        ("[datasets.feats]\nurl = 's3://b'\nsecret_key_file = '/nonexistent/s'\n", "datasets.feats.secret_key_file /nonexistent/s: No such file"),
        ("[datasets]\nfeats = 's3://b'\n", "node.toml: datasets.feats: expected a table"),
        ("[cache]\nmem_size = '1M'\n", "node.toml: cache.mem_size 1M: must be 0 (off) or at least two chunks"),
        ("[cache]\ndir = 'relative'\n", "node.toml: cache.dir: 'relative' must be an absolute path"),
        ("[peers]\nring = '127.0.0.1:7001'\n", "node.toml: peers.ring needs --secret-file"),
        ("[backend]\ntimeout = 0\n", "node.toml: backend.timeout must be positive"),
        ("this is = not toml = at all\n", "node.toml: not valid TOML"),
    ],
)
def test_bad_files_name_the_file_and_key(node_dir, text, needle):
    path = _write(node_dir, text)
    message = _refused(needle, flags=_flags(node_dir), config_file=path, datasets=[] if "datasets" in text else ["x=s3://b"])
    assert message.startswith(path) or message.startswith("--"), message
    assert "hunter2" not in message


def test_missing_file(node_dir):
    _refused("nope.toml: No such file", flags=_flags(node_dir), config_file=str(node_dir / "nope.toml"))


def test_flags_override_the_file(node_dir):
    path = _write(node_dir, GOOD.format(dir=node_dir))
    node = load_node(
        flags=_flags(node_dir, cache_size="20G", attr_ttl=1.5, metrics="127.0.0.1:9200", log_level="warning"),
        config_file=path,
        datasets=["feats=s3://other/x,quota=1G", "extra=s3://more"],
    )
    assert (node.cache_size, node.attr_ttl, node.metrics, node.log_level) == (20 * G, 1.5, ("127.0.0.1", 9200), "WARNING")
    assert node.mem_size == 2 * G, "what no flag sets stays as the file says"
    assert [d.name for d in node.datasets] == ["feats", "ticks", "extra"]
    feats = node.datasets[0]
    assert (feats.url, feats.quota, feats.subdir) == ("s3://other/x", G, ""), "--dataset replaces the file's dataset whole"
    assert feats.credentials.source == "environment"


def test_a_bad_flag_over_a_file_is_named_by_its_flag(node_dir):
    path = _write(node_dir, GOOD.format(dir=node_dir))
    _refused("--mem-size 1M", flags=_flags(node_dir, mem_size="1M"), config_file=path)


def test_node_credential_flags_are_defaults_for_s3_datasets(node_dir):
    flags = _flags(node_dir, endpoint_url="http://127.0.0.1:9000", access_key="AK", secret_key_file=str(node_dir / "secret"))
    node = load_node(flags=flags, datasets=["a=s3://a", "b=s3://b,profile=team,endpoint=http://h:1", f"l={node_dir}"])
    a, b, local = node.datasets
    assert a.endpoint_url == "http://127.0.0.1:9000" and a.credentials.key_pair() == ("AK", SECRET)
    assert b.endpoint_url == "http://h:1" and b.credentials.source == "profile"
    assert local.endpoint_url is None and local.credentials.source == "environment"


def test_the_one_source_form_is_a_root_dataset(node_dir):
    node = load_node(flags=_flags(node_dir, endpoint_url="http://h:1"), source="s3://bucket/p")
    assert node.root_dataset is not None and node.root_dataset.at_root
    root = node.root_dataset
    assert (root.source, node.mountpoint, root.endpoint_url) == ("s3://bucket/p", str(node_dir / "mnt"), "http://h:1")


def test_source_and_datasets_do_not_mix(node_dir):
    _refused("cannot be combined with datasets", flags=_flags(node_dir), source="s3://b", datasets=["a=s3://c"])


def test_nothing_to_mount(node_dir):
    _refused("nothing to mount", flags=_flags(node_dir))


def test_print_config_skips_the_machine_checks(tmp_path):
    node = load_node(flags={"mountpoint": str(tmp_path / "not-yet")}, datasets=["a=s3://c"], environment=False)
    assert node.mountpoint == str(tmp_path / "not-yet")
    _refused("No such file", flags={"mountpoint": str(tmp_path / "not-yet")}, datasets=["a=s3://c"])


@pytest.mark.parametrize("text", ["30", "30s", "30.0s", "30000ms", "0.5m"])
def test_durations(text):
    assert parse_duration(text, "x") == 30.0


# -- secrets --------------------------------------------------------------------------------


def test_secrets_are_not_in_repr_or_print_config_and_the_file_round_trips(node_dir):
    path = _write(node_dir, GOOD.format(dir=node_dir))
    node = load_node(flags=_flags(node_dir), config_file=path)
    for text in (repr(node), repr(node.datasets[0]), repr(node.datasets[0].credentials), render(node)):
        assert SECRET not in text and ACCESS not in text, text
    shown = render(node)
    assert "***" in shown and f"{node_dir}/secret" in shown and "access key and secret key file" in shown
    again = load_node(flags=_flags(node_dir), config_file=_write(node_dir, shown, "again.toml"))
    assert render(again) == shown
    assert again.datasets == node.datasets
    tomllib.loads(shown)


def test_print_config_shows_where_credentials_come_from(node_dir):
    node = load_node(flags=_flags(node_dir, access_key=ACCESS, secret_key_file=str(node_dir / "secret")),
                     datasets=["a=s3://a", "b=s3://b,profile=team", f"l={node_dir}"])
    shown = render(node)
    assert ACCESS not in shown and SECRET not in shown
    assert ACCESS not in repr(node) and SECRET not in repr(node)
    assert 'access_key = "***"' in shown and "AWS profile team" in shown


def _check_refused(result, *needles):
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("cachefs: error: "), err
    for needle in needles:
        assert needle in err, err


def test_cli_refuses_bad_input_in_one_line(node_dir, run_cachefs):
    mnt = node_dir / "mnt"
    _check_refused(run_cachefs("mount", mnt, "--dataset", "feats=s3://b,quota=lots"), "--dataset feats: quota: 'lots' is not a size")
    _check_refused(run_cachefs("mount", mnt, "--dataset", ".x=s3://b"), "must not start with '.'")
    _check_refused(run_cachefs("mount", mnt, "--dataset", "feats=s3://b,rw", "--stage-size", "1K"), "--stage-size 1K: must be at least 1M")
    path = _write(node_dir, "[datasets.feats]\nurl = 's3://b'\nquota = 'lots'\n")
    _check_refused(run_cachefs("mount", mnt, "--config", path), f"{path}: datasets.feats.quota: 'lots' is not a size")
    _check_refused(run_cachefs("mount", mnt), "nothing to mount")


def test_cli_print_config(node_dir, run_cachefs):
    path = _write(node_dir, GOOD.format(dir=node_dir))
    argv = ["mount", node_dir / "mnt", "--config", path, "--cache-size", "20G", "--print-config",
            "--dataset", f"more=s3://more,access_key_file={node_dir}/access,secret_key_file={node_dir}/secret"]
    assert not any(SECRET in str(a) or ACCESS in str(a) for a in argv), "ps shows argv: it holds paths only"
    r = run_cachefs(*argv)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout and ACCESS not in r.stdout and SECRET not in r.stderr
    shown = tomllib.loads(r.stdout)
    assert shown["cache"]["size"] == "20G" and shown["cache"]["mem_size"] == "2G"
    assert set(shown["datasets"]) == {"feats", "ticks", "more"}
    assert shown["datasets"]["more"]["secret_key_file"] == f"{node_dir}/secret"
    assert not os.path.ismount(node_dir / "mnt")


def test_cli_mountpoint_after_options(node_dir, run_cachefs):
    r = run_cachefs("mount", "--dataset", "a=s3://b", "--print-config", node_dir / "mnt")
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["mountpoint"] == str(node_dir / "mnt")
    r = run_cachefs("mount", "src", "--print-config", node_dir / "mnt")
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["source"]["url"] == "src"


def test_the_documented_example_loads(node_dir):
    """docs/configuration.md's node file is a working file (mountpoint-s3 semantics_doc_test)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    for secret in re.findall(r'"(/etc/cachefs/[^"]+)"', example):
        example = example.replace(secret, str(node_dir / "secret"))
    node = load_node(flags={}, config_file=_write(node_dir, example), environment=False)
    assert [d.name for d in node.datasets] == ["feats", "ticks"]
    assert node.datasets[0].credentials.source == "keys" and node.datasets[1].credentials.source == "environment"
    assert node.peers and node.metrics and node.cache_size == 100 * G
