#!/usr/bin/env bash
# Full test suite: setup, then every test on the native hot path, then the
# tests marked `fallback` again on the pure-Python hot path.
# Extra arguments go to the first pytest run (e.g. -x, -k NAME).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

# The native hot path must have been built: without it the first pass would
# quietly test the fallback twice.
if ! .venv/bin/python -c 'import sys, cachefs.hotpath as h; sys.exit(h.IMPLEMENTATION != "native")'; then
    echo "test.sh: the native extension (cachefs._native) was not built; see the pip output of scripts/setup.sh" >&2
    exit 1
fi

status=0
.venv/bin/python -m pytest tests "$@" || status=$?

echo "=== fallback pass: CACHEFS_PUREPYTHON=1 pytest -m fallback"
fallback=0
CACHEFS_PUREPYTHON=1 .venv/bin/python -m pytest tests -m fallback -q || fallback=$?
if ((fallback == 5)); then
    # pytest's "no tests collected": the fallback hot path would go untested.
    echo "test.sh: no tests are marked 'fallback'" >&2
fi
if ((status == 0)); then status=$fallback; fi

exit "$status"
