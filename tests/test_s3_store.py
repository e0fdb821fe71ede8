"""FsspecStore's S3 fast path against the real S3 gateway: what it lists must
be exactly what s3fs lists, names and versions included, with and without ETags."""

from __future__ import annotations

import pytest

from cachefs.backend import FsspecStore, open_store
from cachefs.objects import ObjectId

pytestmark = pytest.mark.integration

# Names that URL-encoding and XML escaping must carry through unchanged.
NAMES = ["plain", "with space", "plus+sign", "per%cent", "amp&lt<gt>", "quote\"'", "é-ü-日本", "tilde~"]


@pytest.fixture
def stores():
    made: list[FsspecStore] = []
    yield made
    for store in made:
        store.fast.close()  # the test's thread holds their keep-alive connections


def store_for(src, stores) -> FsspecStore:
    env = src.env
    store = open_store(
        f"s3://{src.prefix}",
        endpoint_url=src.backend.endpoint_url,
        timeout=10,
        credentials=(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]),
    )
    assert isinstance(store, FsspecStore) and store.fast is not None
    stores.append(store)
    return store


def both_listings(store: FsspecStore, path: str):
    fast = sorted(store.list_dir(path), key=lambda e: e.path)
    assert store.fast_list, "the fast path fell back to s3fs"
    store.fast_list = False
    try:
        slow = sorted(store.list_dir(path), key=lambda e: e.path)
    finally:
        store.fast_list = True
    return fast, slow


def _tree(request, etags: str):
    """The test's S3 source (with or without ETags) holding d/NAME for each of NAMES and d/sub/deeper/x."""
    src = request.getfixturevalue("s3_source" if etags == "etag" else "s3_source_noetag")
    for n, name in enumerate(NAMES):
        src.write(f"d/{name}", bytes([n]) * (n + 1))
    src.write("d/sub/deeper/x", b"x")
    return src


@pytest.mark.parametrize("etags", ["etag", "noetag"])
def test_fast_listing_equals_s3fs_listing(request, etags, stores):
    src = _tree(request, etags)
    src.write("d/sub2/y", b"yy")
    src.write("top", b"t")
    store = store_for(src, stores)

    fast, slow = both_listings(store, "d")
    assert fast == slow
    assert {e.name for e in fast} == {*NAMES, "sub", "sub2"}
    by_name = {e.name: e for e in fast}
    assert by_name["sub"].kind == "dir" and by_name["with space"].size == 2
    assert by_name["plain"].path == "d/plain"
    if etags == "etag":
        assert by_name["plain"].version.startswith("etag:")

    fast, slow = both_listings(store, "")
    assert fast == slow and {e.name for e in fast} == {"d", "top"}

    # What a listing says is what a read gets: the version matches a GET's.
    entry = by_name["é-ü-日本"]
    obj = ObjectId(store.url, entry.path, entry.version, entry.size)
    assert store.fetch(obj, 0, entry.size) == bytes([NAMES.index("é-ü-日本")]) * entry.size


def test_fast_listing_follows_pages(s3_source, stores):
    for i in range(7):
        s3_source.write(f"many/f{i}", b"z")
    s3_source.write("many/sub/a", b"z")
    store = store_for(s3_source, stores)
    bucket, _, prefix = s3_source.prefix.partition("/")
    paged = store.fast.list(bucket, f"{prefix}/many/", max_keys=3)
    assert sorted(d["name"].rpartition("/")[2] for d in paged) == [*(f"f{i}" for i in range(7)), "sub"]
    fast, slow = both_listings(store, "many")
    assert fast == slow


def test_fast_listing_of_a_missing_directory_is_not_found(s3_source, stores):
    s3_source.write("present", b"p")
    store = store_for(s3_source, stores)
    with pytest.raises(FileNotFoundError):
        store.list_dir("absent")
    store.fast_list = False
    with pytest.raises(FileNotFoundError):
        store.list_dir("absent")


@pytest.mark.parametrize("etags", ["etag", "noetag"])
def test_fast_stat_equals_s3fs_stat(request, etags, stores):
    """A HEAD, then a LIST of one key under NAME/ for a directory: what s3fs's info says."""
    src = _tree(request, etags)
    src.fs.pipe_file(src.key("marked/"), b"")  # an empty directory's marker (mkdir)
    store = store_for(src, stores)

    def both(path):
        fast = store.stat(path)
        store.fast_list = False
        try:
            slow = store.stat(path)
        finally:
            store.fast_list = True
        return fast, slow

    for path in [*(f"d/{name}" for name in NAMES), "d", "d/sub", "d/sub/deeper", "marked"]:
        fast, slow = both(path)
        assert fast == slow, path
    assert store.stat("d/with space").size == 2 and store.stat("d/sub").kind == "dir"
    for missing in ("absent", "d/su", "d/sub/deep", "d/plain/x"):
        with pytest.raises(FileNotFoundError):
            store.stat(missing)
        store.fast_list = False
        with pytest.raises(FileNotFoundError):
            store.stat(missing)
        store.fast_list = True
    # What a stat says is what a listing says (its mtime in whole seconds, as s3fs's).
    for entry in store.list_dir("d"):
        info = store.stat(entry.path)
        assert (info.kind, info.size, info.version) == (entry.kind, entry.size, entry.version), entry.path


@pytest.mark.parametrize("etags", ["etag", "noetag"])
def test_check_name_answers_as_stat_also_when_its_kept_connections_died(request, etags, stores):
    """The lookup before a create sends its HEAD and its LIST together (the LIST on the
    thread's spare connection): the answers are stat's, and a connection the server
    closed meanwhile is asked again, not reported."""
    import socket

    src = _tree(request, etags)
    store = store_for(src, stores)
    paths = [*(f"d/{name}" for name in NAMES), "d", "d/sub", "d/sub/deeper"]
    missing = ["absent", "d/su", "d/sub/deep", "d/plain/x"]
    for dead in (False, True):
        for path in paths:
            if dead:
                for conn in store.fast._local.conns.values():
                    if conn.sock is not None:
                        conn.sock.shutdown(socket.SHUT_RDWR)  # as a server closing idle connections
            assert store.check_name(path) == store.stat(path), path
        for path in missing:
            with pytest.raises(FileNotFoundError):
                store.check_name(path)
    assert store.fast_list, "the fast path fell back to s3fs"


def test_puts_carry_a_checked_hash_of_their_body(s3_source, stores, monkeypatch, tmp_path):
    """Objects and parts go up signed over their body's SHA-256: what lands is the
    bytes sent, and a body that is not the one hashed (damaged on the way) is refused
    by the server, nothing stored."""
    from cachefs.backend import _FallBack, _Presigner

    store = store_for(s3_source, stores)
    body = bytearray(b"0123456789abcdef" * 65536)  # 1 MiB
    staged = tmp_path / "staged"
    staged.write_bytes(body)
    store.put_file("whole", str(staged))
    assert s3_source.read("whole") == body
    upload = store.start_multipart("parts")
    etags = [store.put_part("parts", upload, 1, str(staged), 0, len(body))]
    store.finish_multipart("parts", upload, etags, len(body))
    assert s3_source.read("parts") == body

    sign = _Presigner.sign
    monkeypatch.setattr(_Presigner, "sign", lambda self, op, params, method, data, now=None:
                        sign(self, op, params, method, bytes(data[:-1]) + b"!", now))
    bucket, key = store._key("damaged")
    with pytest.raises(_FallBack, match="HTTP 400"):  # the fast path hands a 400 to botocore
        store.fast.put(bucket, key, body, {})
    upload = store.start_multipart("damaged-parts")
    with pytest.raises(_FallBack, match="HTTP 400"):
        store.fast.put(bucket, f"{key}-parts", body, {"UploadId": upload, "PartNumber": 1})
    store.abort_multipart("damaged-parts", upload)
    names = {info.path.rpartition("/")[2] for info in store.list_dir("")}
    assert names == {"whole", "parts"}



def test_parts_go_from_the_staged_file_at_any_offset(s3_source, stores, monkeypatch, tmp_path):
    """put_part sends a part straight from the staged file (mapped and hashed, then
    sendfile): parts that begin off a page boundary land byte-exact; a body whose bytes
    are not the ones hashed is refused by the server; a file shorter than the part is
    an error before anything is sent."""
    import os
    import random

    from cachefs.backend import _FallBack, _Presigner

    store = store_for(s3_source, stores)
    body = random.Random(7).randbytes(3 * 1000_003)  # parts of an odd size: offsets off the page
    staged = tmp_path / "staged"
    staged.write_bytes(body)
    upload = store.start_multipart("odd")
    cuts = [0, 1000_003, 2000_006, len(body)]
    etags = [store.put_part("odd", upload, n, str(staged), start, end)
             for n, (start, end) in enumerate(zip(cuts, cuts[1:]), 1)]
    store.finish_multipart("odd", upload, etags, len(body))
    assert s3_source.read("odd") == body

    upload = store.start_multipart("short")
    with pytest.raises(OSError, match="short read"):
        store.put_part("short", upload, 1, str(staged), len(body) - 10, len(body) + 10)

    sign = _Presigner.sign
    monkeypatch.setattr(_Presigner, "sign", lambda self, op, params, method, data, now=None:
                        sign(self, op, params, method, bytes(data[:-1]) + b"!", now))
    bucket, key = store._key("short")
    fd = os.open(staged, os.O_RDONLY)
    try:
        with pytest.raises(_FallBack, match="HTTP 400"):
            store.fast.put(bucket, key, memoryview(body)[5:1000_005], {"UploadId": upload, "PartNumber": 1},
                           source=(fd, 5))
    finally:
        os.close(fd)
    store.abort_multipart("short", upload)
    assert {info.path.rpartition("/")[2] for info in store.list_dir("")} == {"odd"}


@pytest.mark.parametrize("etags", ["etag", "noetag"])
def test_small_files_go_up_from_the_trio_thread_byte_exact(request, etags, stores, tmp_path):
    """Through Backend.upload: small files (the empty one too) are PUT from the trio
    thread, never by an upload thread; what lands is their bytes, under the version a
    stat reports: the answer's ETag once a stat showed that the store's HEADs name them
    (a HEAD after the first PUT), else the version a HEAD after each PUT reports (the
    gateway without ETags in HEADs still names them in PUT answers)."""
    import random

    import trio

    from cachefs.backend import Backend

    src = request.getfixturevalue("s3_source" if etags == "etag" else "s3_source_noetag")
    store = store_for(src, stores)
    assert store.puts_async
    backend = Backend(store, concurrency=2, timeout=10, retries=0)

    real_run = backend._upload_threads.run
    heads = []

    async def no_put_in_a_thread(timed, clock, fn, *args, **kwargs):
        if fn != store.stat:
            raise AssertionError(f"an upload thread was asked to {fn.__name__}")
        heads.append(args[0])
        return await real_run(timed, clock, fn, *args, **kwargs)

    backend._upload_threads.run = no_put_in_a_thread
    bodies = {"empty": b"", "one": b"1", "small": random.Random(3).randbytes(65536), "dir/big": b"b" * (256 << 10)}

    async def main():
        infos = {}
        for name, body in bodies.items():
            staged = tmp_path / name.replace("/", "_")
            staged.write_bytes(body)
            written = await backend.upload(name, str(staged), len(body), 8 << 20)
            assert written.ours, name
            infos[name] = written.info
        return infos

    infos = trio.run(main)
    assert heads == (["empty"] if etags == "etag" else list(bodies))
    for name, body in bodies.items():
        assert src.read(name) == body
        assert infos[name].size == len(body)
        assert infos[name].version == store.stat(name).version, name
    backend.close()


def test_a_put_the_trio_thread_cannot_read_goes_through_the_thread_path(s3_source, stores, monkeypatch, tmp_path):
    """A body the server refuses (signed over other bytes: HTTP 400) is handed from the
    trio thread to the thread path, which hands it to botocore: the file lands whole."""
    import trio

    from cachefs.async_put import AsyncPutter
    from cachefs.backend import Backend, _Presigner

    store = store_for(s3_source, stores)
    backend = Backend(store, concurrency=2, timeout=10, retries=0)
    sign = _Presigner.sign
    monkeypatch.setattr(_Presigner, "sign", lambda self, op, params, method, data, now=None:
                        sign(self, op, params, method, bytes(data[:-1]) + b"!", now))
    sent = []
    put = AsyncPutter.put

    async def counted(self, *args):
        sent.append(args[0])
        return await put(self, *args)

    monkeypatch.setattr(AsyncPutter, "put", counted)
    staged = tmp_path / "staged"
    staged.write_bytes(b"the real bytes")
    info, ours = trio.run(backend.upload, "refused", str(staged), 14, 8 << 20)
    assert sent and s3_source.read("refused") == b"the real bytes" and info.size == 14 and ours
    assert store.puts_async  # a 400 is about that request, not the store
    backend.close()


def test_unsigned_payload_uploads_land_whole_and_unhashed(s3_source, stores, tmp_path, monkeypatch):
    """`--unsigned-payload`: PUTs and parts go as UNSIGNED-PAYLOAD (their bodies never
    hashed), and the real gateway takes them: a small file and a multipart one land
    byte-exact."""
    import hashlib
    import random

    import trio

    from cachefs.backend import Backend

    env = s3_source.env
    store = open_store(f"s3://{s3_source.prefix}", endpoint_url=s3_source.backend.endpoint_url, timeout=10,
                       credentials=(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]), unsigned_payload=True)
    stores.append(store)
    signed = store.fast.signer.sign("put_object", {"Bucket": "b", "Key": "k"}, "PUT", b"body")
    assert signed[3]["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    hashed = []
    sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda data=b"", **kw: (hashed.append(len(data)), sha256(data, **kw))[1])
    backend = Backend(store, concurrency=2, timeout=10, retries=0)
    bodies = {"small": random.Random(1).randbytes(70000), "big": random.Random(2).randbytes((5 << 20) * 2 + 123)}

    async def main():
        for name, body in bodies.items():
            staged = tmp_path / name
            staged.write_bytes(body)
            written = await backend.upload(name, str(staged), len(body), 5 << 20)
            assert written.ours and written.info.size == len(body)

    trio.run(main)
    backend.close()
    for name, body in bodies.items():
        assert s3_source.read(name) == body
    assert not [n for n in hashed if n >= 70000], "a body was hashed"
