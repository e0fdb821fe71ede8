#!/usr/bin/env bash
# Full test suite: setup, then every test on the native hot path, then the
# tests marked `fallback` again on the pure-Python hot path.
# Extra arguments go to the first pytest run (e.g. -x, -k NAME).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

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
