#!/usr/bin/env bash
# End-to-end demo on one machine, as root:
#
#   1. scripts/setup.sh (Debian packages, .venv, cachefs install)
#   2. an S3 endpoint on 127.0.0.1 (juicefs gateway, scripts/juicefs_backend.py)
#   3. a generated dataset written through S3
#   4. `cachefs mount s3://BUCKET/data` in the background
#   5. a cold read, a page-cache drop, a warm read; throughput, the cache hit
#      ratio from cachefs's own metrics, and a sha256 check of every file
#   6. `cachefs umount`; everything is removed on exit
#
# Knobs (environment):
#   DEMO_MB=64          size of each large file in MiB
#   DEMO_LARGE=8        number of large files
#   DEMO_SMALL=200      number of small files
#   DEMO_SMALL_KB=64    size of each small file in KiB
#   DEMO_READERS=4      parallel reader threads
#   DEMO_MOUNT_ARGS=""  extra `cachefs mount` arguments (e.g. "--cache-size 2G")
#   DEMO_WORKDIR=       parent of the temporary work directory (default: $TMPDIR or /tmp)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PY="$REPO/.venv/bin/python"

export DEMO_MB=${DEMO_MB:-64} DEMO_LARGE=${DEMO_LARGE:-8} DEMO_SMALL=${DEMO_SMALL:-200}
export DEMO_SMALL_KB=${DEMO_SMALL_KB:-64} DEMO_READERS=${DEMO_READERS:-4}
DEMO_MOUNT_ARGS=${DEMO_MOUNT_ARGS:-}

step() { printf '\n== %s\n' "$*"; }

step "setup"
bash scripts/setup.sh

WORK=$(realpath "$(mktemp -d "${DEMO_WORKDIR:-${TMPDIR:-/tmp}}/cachefs-demo.XXXXXX")")
MP="$WORK/mnt"
BACKEND_PID=
mkdir -p "$MP"

# From the mount table, not stat(): stat() of a hung FUSE mount never returns.
is_mounted() { awk -v mp="$1" '$5 == mp { found = 1 } END { exit !found }' /proc/self/mountinfo; }

cleanup() {
    local rc=$?
    set +e
    if is_mounted "$MP"; then
        timeout 30 "$REPO/.venv/bin/cachefs" umount "$MP" 2>/dev/null || fusermount3 -u -z "$MP"
    fi
    # The daemon exits once unmounted; make sure of it (`cachefs mount -d` prints "(pid N, ...)").
    local daemon
    daemon=$(sed -n 's/.*(pid \([0-9][0-9]*\).*/\1/p' "$WORK/mount.out" 2>/dev/null | head -n 1)
    if [[ -n "$daemon" ]]; then
        for _ in $(seq 100); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$daemon" 2>/dev/null && echo "cachefs daemon $daemon did not exit after unmount; killed it" >&2
    fi
    if [[ -n "$BACKEND_PID" ]]; then
        kill -TERM "$BACKEND_PID" 2>/dev/null
        wait "$BACKEND_PID" 2>/dev/null
    fi
    if ((rc != 0)); then
        echo "demo failed (exit $rc); last lines of the logs:" >&2
        for f in "$WORK/backend.err" "$WORK/backend/gateway.log" "$WORK/mount.out" "$WORK/cachefs.log"; do
            [[ -s "$f" ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "S3 backend (juicefs gateway on 127.0.0.1)"
"$PY" scripts/juicefs_backend.py serve --dir "$WORK/backend" >"$WORK/backend.out" 2>"$WORK/backend.err" &
BACKEND_PID=$!
for _ in $(seq 600); do
    grep -q '^endpoint=' "$WORK/backend.out" && break
    kill -0 "$BACKEND_PID" 2>/dev/null || { echo "backend exited:" >&2; cat "$WORK/backend.err" >&2; exit 1; }
    sleep 0.1
done
grep -q '^endpoint=' "$WORK/backend.out" || { echo "backend did not start within 60 s" >&2; exit 1; }
# endpoint=URL bucket=NAME access_key=KEY secret_key=SECRET
read -r ENDPOINT BUCKET ACCESS_KEY SECRET_KEY < <(sed -n 's/^endpoint=\(\S*\) bucket=\(\S*\) access_key=\(\S*\) secret_key=\(\S*\)$/\1 \2 \3 \4/p' "$WORK/backend.out" | head -n 1)
export ENDPOINT BUCKET ACCESS_KEY SECRET_KEY WORK
echo "endpoint $ENDPOINT, bucket $BUCKET"

step "dataset: $DEMO_LARGE x $DEMO_MB MiB + $DEMO_SMALL x $DEMO_SMALL_KB KiB, written through S3"
"$PY" - <<'PY'
import hashlib, json, os, random, time
import s3fs

fs = s3fs.S3FileSystem(key=os.environ["ACCESS_KEY"], secret=os.environ["SECRET_KEY"],
                       client_kwargs={"endpoint_url": os.environ["ENDPOINT"], "region_name": "us-east-1"},
                       use_listings_cache=False)
prefix = f"{os.environ['BUCKET']}/data"
rng = random.Random(20240601)
manifest = {}
t0 = time.monotonic()
for i in range(int(os.environ["DEMO_LARGE"])):
    name = f"large/file-{i:03d}.bin"
    data = rng.randbytes(int(os.environ["DEMO_MB"]) << 20)
    fs.pipe_file(f"{prefix}/{name}", data)
    manifest[name] = hashlib.sha256(data).hexdigest()
small = {}
for i in range(int(os.environ["DEMO_SMALL"])):
    name = f"small/{i // 50:02d}/file-{i:04d}.bin"
    data = rng.randbytes(int(os.environ["DEMO_SMALL_KB"]) << 10)
    small[f"{prefix}/{name}"] = data
    manifest[name] = hashlib.sha256(data).hexdigest()
if small:
    fs.pipe(small)  # concurrent PUTs
print(f"wrote {len(manifest)} objects in {time.monotonic() - t0:.1f} s")
with open(os.path.join(os.environ["WORK"], "manifest.json"), "w") as f:
    json.dump(manifest, f)
PY

METRICS_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export METRICS_URL="http://127.0.0.1:$METRICS_PORT/metrics" MP

step "mount s3://$BUCKET/data at $MP"
# shellcheck disable=SC2086  # DEMO_MOUNT_ARGS is split on purpose
# -d returns once the mount is ready; the daemon logs to --log-file.
AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY AWS_DEFAULT_REGION=us-east-1 \
    timeout 120 "$REPO/.venv/bin/cachefs" mount "s3://$BUCKET/data" "$MP" \
    --endpoint-url "$ENDPOINT" \
    --cache-dir "$WORK/cache" \
    --metrics "127.0.0.1:$METRICS_PORT" \
    --log-file "$WORK/cachefs.log" \
    $DEMO_MOUNT_ARGS \
    -d >"$WORK/mount.out" 2>&1 || { echo "cachefs mount failed:" >&2; cat "$WORK/mount.out" >&2; exit 1; }
is_mounted "$MP" || { echo "cachefs mount -d returned but $MP is not mounted" >&2; exit 1; }
cat "$WORK/mount.out"
ls "$MP"

drop_page_cache() {
    sync
    # Without this the warm pass would be served by the kernel, not by cachefs.
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null ||
        echo "warning: cannot drop the page cache (not root, or /proc/sys read-only): the warm pass measures the kernel page cache" >&2
}

# Reads every file in the manifest through the mount with 1 MiB reads and
# prints throughput and the change in cachefs metrics; with --verify, hashes
# and compares instead.
cat >"$WORK/reader.py" <<'PY'
import hashlib, json, os, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
from prometheus_client.parser import text_string_to_metric_families

MiB = 1 << 20
work, mp = os.environ["WORK"], os.environ["MP"]
manifest = json.load(open(os.path.join(work, "manifest.json")))


def scrape():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(os.environ["METRICS_URL"], timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(snapshot, name, **labels):
    want = set(labels.items())
    return sum(v for (n, l), v in snapshot.items() if n == name and want <= set(l))


def read(name, verify=False):
    h = hashlib.sha256() if verify else None
    buf = bytearray(MiB)
    n = 0
    with open(os.path.join(mp, name), "rb", buffering=0) as f:
        while got := f.readinto(buf):
            n += got
            if h:
                h.update(memoryview(buf)[:got])
    return name, n, h.hexdigest() if h else None


label, verify = sys.argv[1], "--verify" in sys.argv
names = sorted(manifest, key=lambda n: (not n.startswith("large/"), n))
before = scrape()
t0 = time.monotonic()
with ThreadPoolExecutor(int(os.environ["DEMO_READERS"])) as pool:
    results = list(pool.map(lambda n: read(n, verify), names))
elapsed = time.monotonic() - t0
after = scrape()

if verify:
    bad = [n for n, _, digest in results if digest != manifest[n]]
    if bad:
        sys.exit(f"MISMATCH: {len(bad)} files differ from what was written, e.g. {bad[:3]}")
    print(f"verified: all {len(results)} files match the sha256 of the data written")
    sys.exit(0)

nbytes = sum(n for _, n, _ in results)
delta = lambda name, **l: total(after, name, **l) - total(before, name, **l)
src = {s: delta("cachefs_read_bytes_total", source=s) for s in ("mem", "disk", "peer", "backend")}
served = sum(src.values())
# Read bytes count where they came from the first time they are read (read-ahead
# from the backend counts as backend), so the hit ratio is what the caches held.
hits = served - src["backend"]
requests = delta("cachefs_backend_requests_total")
gets = delta("cachefs_backend_requests_total", op="get")
ratio = f"{100 * hits / served:.1f}%" if served else "n/a (no reads reached cachefs)"
print(f"{label}: {nbytes / MiB:.1f} MiB in {elapsed:.2f} s = {nbytes / MiB / elapsed:.1f} MiB/s "
      f"({len(results)} files, {os.environ['DEMO_READERS']} readers)")
print(f"{label}: hit ratio {ratio}; bytes by source: "
      + ", ".join(f"{s} {v / MiB:.1f} MiB" for s, v in src.items())
      + f"; backend requests {requests:.0f} ({gets:.0f} GETs)")
PY

step "cold read (every byte comes from S3)"
drop_page_cache
"$PY" "$WORK/reader.py" cold

step "warm read (page cache dropped; served by cachefs)"
drop_page_cache
"$PY" "$WORK/reader.py" warm

step "verify"
drop_page_cache
"$PY" "$WORK/reader.py" verify --verify
# And the mount agrees with S3 itself, not only with what this script meant to write.
"$PY" - <<'PY'
import hashlib, json, os
import s3fs

fs = s3fs.S3FileSystem(key=os.environ["ACCESS_KEY"], secret=os.environ["SECRET_KEY"],
                       client_kwargs={"endpoint_url": os.environ["ENDPOINT"], "region_name": "us-east-1"},
                       use_listings_cache=False)
manifest = json.load(open(os.path.join(os.environ["WORK"], "manifest.json")))
for name in (sorted(manifest)[0], sorted(manifest)[-1]):
    s3 = hashlib.sha256(fs.cat_file(f"{os.environ['BUCKET']}/data/{name}")).hexdigest()
    with open(os.path.join(os.environ["MP"], name), "rb") as f:
        mounted = hashlib.sha256(f.read()).hexdigest()
    if not (s3 == mounted == manifest[name]):
        raise SystemExit(f"MISMATCH for {name}: s3 {s3}, mount {mounted}, written {manifest[name]}")
    print(f"{name}: sha256 {s3[:16]}... identical in S3 and through cachefs")
PY

step "unmount"
timeout 60 "$REPO/.venv/bin/cachefs" umount "$MP"
for _ in $(seq 100); do is_mounted "$MP" || break; sleep 0.1; done
if is_mounted "$MP"; then echo "$MP is still mounted after cachefs umount" >&2; exit 1; fi
echo "demo finished"
