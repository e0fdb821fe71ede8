"""Benchmarks of cachefs side by side with JuiceFS, rclone, a minimal pyfuse3 filesystem and tmpfs.

Run ``bash scripts/bench.sh`` (or ``.venv/bin/python -m bench --help``); see bench/README.md.
"""
