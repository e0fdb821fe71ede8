"""Configuration: parse_size and NodeConfig.check reject nonsense with one
sentence that names the flag, and accept every sensible value unchanged."""

from __future__ import annotations

import dataclasses
import math
import os
import stat

import pytest

from cachefs.config import DatasetConfig, NodeConfig, format_size, parse_addr, parse_size
from cachefs.errors import ConfigError

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


# -- parse_size ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4M", 4 * M),
        ("100G", 100 * G),
        ("4MiB", 4 * M),
        ("512k", 512 * K),
        ("512K", 512 * K),
        ("0", 0),
        ("4096", 4096),
        ("4mb", 4 * M),
        ("2T", 2 * T),
        ("1P", 1 << 50),
        ("1.5G", 3 * G // 2),
        (" 8 G ", 8 * G),
        ("64KiB", 64 * K),
        ("10B", 10),
    ],
)
def test_parse_size_values(text, expected):
    assert parse_size(text, "--cache-size") == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "4X", "4MM", "1e3", "G", "4MiBB", "0x10", "4 M B", "+4M"])
@pytest.mark.parametrize("flag", ["--cache-size", "--mem-size", "--chunk-size"])
def test_parse_size_rejects_nonsense_naming_the_flag(text, flag):
    with pytest.raises(ConfigError) as info:
        parse_size(text, flag)
    message = str(info.value)
    assert message.startswith(flag), message
    assert repr(text) in message
    assert info.value.exitcode == 2


def test_parse_size_huge_number_is_a_config_error():
    with pytest.raises(ConfigError, match="--cache-size"):
        parse_size("9" * 400, "--cache-size")


@pytest.mark.parametrize("n", [0, 1, 1000, 4 * K, 64 * K, 3 * M, 512 * M, 10 * G, 5 * T, (1 << 50) * 3, 4 * M + 1])
def test_format_size_round_trips(n):
    assert parse_size(format_size(n), "--x") == n


def test_parse_addr():
    assert parse_addr("127.0.0.1:9100", "--metrics") == ("127.0.0.1", 9100)
    assert parse_addr("[::1]:80", "--metrics") == ("::1", 80)
    for bad in ("nohost", ":80", "host:", "host:0", "host:65536", "host:http"):
        with pytest.raises(ConfigError, match="--metrics"):
            parse_addr(bad, "--metrics")


# -- NodeConfig.check ---------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> NodeConfig:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    return NodeConfig(
        datasets=[DatasetConfig(name="", url=str(tmp_path / "src"))],
        mountpoint=str(mountpoint),
        cache_dir=str(tmp_path / "cache"),
        cache_size=1 * G,
        mem_size=64 * M,
        chunk_size=4 * M,
    )


def test_good_config_passes_and_creates_the_cache_dir(good):
    good.check()
    st = os.stat(good.cache_dir)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert os.listdir(good.cache_dir) == [], "the write probe is cleaned up"


@pytest.mark.parametrize(
    "changes",
    [
        dict(chunk_size=64 * K, mem_size=128 * K, cache_size=128 * K),
        dict(chunk_size=64 * M, mem_size=128 * M),
        dict(mem_size=0),
        dict(mem_size=8 * M),  # exactly two chunks
        dict(cache_size=8 * M),
        dict(free_space_ratio=0.0),
        dict(free_space_ratio=0.99),
        dict(attr_ttl=0, entry_ttl=0, dir_ttl=0),
        dict(read_ahead=0, backend_retries=0),
    ],
)
def test_sensible_edges_are_accepted_unchanged(good, changes):
    config = dataclasses.replace(good, **changes)
    before = dataclasses.asdict(config)
    config.check()
    assert dataclasses.asdict(config) == before, "check() must not clamp anything"


def test_no_ssd_tier_skips_the_cache_dir(good, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    dataclasses.replace(good, cache_size=0, cache_dir=str(a_file / "cache")).check()


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(chunk_size=3 * M), "--chunk-size"),
        (dict(chunk_size=4 * M + 1), "--chunk-size"),
        (dict(chunk_size=32 * K), "--chunk-size"),
        (dict(chunk_size=128 * M), "--chunk-size"),
        (dict(chunk_size=0), "--chunk-size"),
        (dict(mem_size=8 * M - 1), "--mem-size"),
        (dict(mem_size=1 * M), "--mem-size"),
        (dict(mem_size=-1), "--mem-size"),
        (dict(cache_size=4 * M), "--cache-size"),
        (dict(cache_size=-1), "--cache-size"),
        (dict(free_space_ratio=1.0), "--free-space-ratio"),
        (dict(free_space_ratio=1.5), "--free-space-ratio"),
        (dict(free_space_ratio=-0.1), "--free-space-ratio"),
        (dict(free_space_ratio=math.nan), "--free-space-ratio"),
        (dict(attr_ttl=-1), "--attr-ttl"),
        (dict(entry_ttl=-0.5), "--entry-ttl"),
        (dict(dir_ttl=-1), "--dir-ttl"),
        (dict(meta_cache_entries=0), "--meta-cache-entries"),
        (dict(read_ahead=-1), "--read-ahead"),
        (dict(backend_concurrency=0), "--backend-concurrency"),
        (dict(backend_timeout=0), "--backend-timeout"),
        (dict(backend_timeout=-1), "--backend-timeout"),
        (dict(backend_retries=-1), "--backend-retries"),
    ],
)
def test_nonsense_is_rejected_naming_the_flag(good, changes, needle):
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(good, **changes).check()
    assert needle in str(info.value)
    assert "\n" not in str(info.value), "one sentence"


@pytest.mark.parametrize("field", ["backend_timeout", "attr_ttl", "entry_ttl", "dir_ttl"])
def test_nan_durations_are_rejected(good, field):
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}"):
        dataclasses.replace(good, **{field: math.nan}).check()


def test_missing_mountpoint_is_rejected(good, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(good, mountpoint=str(missing)).check()
    assert str(info.value).startswith(f"mountpoint {missing}")
    assert "No such file or directory" in str(info.value)


def test_mountpoint_that_is_a_file_is_rejected(good, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a directory"):
        dataclasses.replace(good, mountpoint=str(a_file)).check()


def test_mountpoint_under_a_file_is_rejected(good, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(ConfigError, match="mountpoint"):
        dataclasses.replace(good, mountpoint=str(a_file / "mnt")).check()


def test_unwritable_cache_dir_is_rejected(good, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    bad = a_file / "cache"
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(good, cache_dir=str(bad)).check()
    assert str(info.value).startswith(f"--cache-dir {bad}: not writable")


def test_cache_dir_that_is_a_file_is_rejected(good, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(ConfigError, match="--cache-dir"):
        dataclasses.replace(good, cache_dir=str(a_file)).check()
