#!/usr/bin/env bash
# The side-by-side benchmark of issue 5, in one command, as root:
#
#   bash scripts/bench.sh            # full run (~35 min): medians of 3 repeats, random jobs 20 s once
#   bash scripts/bench.sh --quick    # smoke run (< 3 min): smaller dataset, 1 repeat
#
# Sets up the machine (scripts/setup.sh, plus rclone from Debian), then runs
# `.venv/bin/python -m bench "$@"`, which writes bench/results/<UTC time>-<host>.md
# and .json and prints the table. `.venv/bin/python -m bench --help` lists the options.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

if ! command -v rclone >/dev/null 2>&1; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bench.sh: rclone is missing; run as root or: sudo apt-get install rclone" >&2
        exit 1
    fi
    echo "bench.sh: installing rclone" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rclone >/dev/null
fi

exec .venv/bin/python -m bench "$@"
