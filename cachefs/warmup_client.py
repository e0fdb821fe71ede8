"""`cachefs warmup`: start a warm-up job in a mount's node and follow its progress.

The node does the work (cachefs/warmup.py); this side finds the mount a PATH is
in, starts the job over the control socket, asks its counters every POLL
seconds (or at once when it ends) and shows them: a progress bar on a terminal (rich), a plain line every
PLAIN_EVERY seconds otherwise, or one JSON object per line with --json, the last
one the summary. Ctrl-C cancels the job (exit 130); what was loaded stays
cached, so running the same command again resumes.

Exit codes: 0 all loaded (or --wait-ratio reached; the node goes on loading),
1 the job failed or some files failed (listed, at most 20, with their count),
2 a bad PATH or an unreachable mount, 130 interrupted.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Any, Callable, TextIO

from cachefs import control_client
from cachefs.errors import ConfigError

POLL = 0.5  # seconds between progress requests
PLAIN_EVERY = 5.0  # seconds between plain progress lines
RATE_WINDOW = 10.0  # seconds of history the rate (and so the ETA) is taken over
START_TIMEOUT = 120.0  # seconds the node may take to check the paths (a stat each, at the backend)
CALL_TIMEOUT = 30.0


def find_mount(target: str, timeout: float = 5) -> tuple[str, str]:
    return control_client.ask_mount(control_client.socket_above, target, timeout)


# -- output --------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Rate:
    """Loaded bytes per second over the last RATE_WINDOW seconds (already-cached bytes
    cost nothing and would make the rate and ETA lie), and the ETA it gives."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def update(self, p: dict) -> tuple[float, float | None]:
        now = self._clock()
        self._samples.append((now, p["bytes_loaded"]))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        rate = (p["bytes_loaded"] - b0) / (now - t0) if now > t0 else 0.0
        left = p["bytes_total"] - p["bytes_done"] - p["bytes_failed"]
        eta = 0.0 if left <= 0 else (left / rate if rate > 0 else None)
        return rate, eta


class PlainOutput:
    """A line now and then, for logs: stdout is not a terminal."""

    def __init__(self, out: TextIO):
        self.out = out
        self.rate = Rate()
        self._last = -PLAIN_EVERY

    def update(self, p: dict, final: bool = False) -> None:
        rate, eta = self.rate.update(p)
        now = time.monotonic()
        if not final and now - self._last < PLAIN_EVERY:
            return
        self._last = now
        total = p["bytes_total"]
        if p["state"] == "listing":
            line = f"listing the files to load ({p['files_total']} so far, {_mib(total)})"
        else:
            pct = 100 * p["bytes_done"] / total if total else 100.0
            line = (
                f"{p['files_done']}/{p['files_total']} files, {_mib(p['bytes_done'])}/{_mib(total)} ({pct:.0f}%), "
                f"{_mib(p['bytes_cached'])} already cached, {rate / (1 << 20):.1f} MiB/s, ETA {_duration(eta)}"
            )
            if p["failed_count"]:
                line += f", {p['failed_count']} failed"
        print(f"warmup {p['job']}: {line}", file=self.out, flush=True)

    def close(self) -> None:
        pass


class JsonOutput:
    """One JSON object per poll; `summary` prints the last one."""

    def __init__(self, out: TextIO):
        self.out = out
        self.rate = Rate()

    def update(self, p: dict, final: bool = False) -> None:
        rate, eta = self.rate.update(p)
        if not final:
            self._print({"type": "progress", **p, "bytes_per_second": round(rate), "eta_seconds": eta})

    def _print(self, obj: dict) -> None:
        print(json.dumps(obj, separators=(",", ":")), file=self.out, flush=True)

    def close(self) -> None:
        pass


class BarOutput:
    """A rich progress bar: files, bytes, MiB/s and ETA."""

    def __init__(self, out: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self.rate = Rate()
        self.progress = Progress(
            TextColumn("[bold]warmup {task.fields[job]}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[files]} files"),
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[note]}"),
            console=Console(file=out),
            transient=False,
        )
        self.progress.start()
        self.task = None

    def update(self, p: dict, final: bool = False) -> None:
        rate, eta = self.rate.update(p)
        fields = dict(
            job=p["job"],
            files=f"{p['files_done']}/{p['files_total']}",
            rate=f"{rate / (1 << 20):.1f} MiB/s",
            eta=_duration(eta),
            note=("listing…" if p["state"] == "listing" else f"[red]{p['failed_count']} failed" if p["failed_count"] else ""),
        )
        total = p["bytes_total"] if p["state"] != "listing" else None
        done = p["bytes_done"] + p["bytes_failed"]
        if self.task is None:
            self.task = self.progress.add_task("warmup", total=total, completed=done, **fields)
        else:
            self.progress.update(self.task, total=total, completed=done, **fields)

    def close(self) -> None:
        self.progress.stop()


def _summary(p: dict) -> str:
    elapsed = p["elapsed"] or 0.0
    rate = p["bytes_loaded"] / elapsed if elapsed else 0.0
    return (
        f"warmup {p['job']} {p['state']}: {p['files_done']}/{p['files_total']} files, "
        f"{_mib(p['bytes_done'])} of {_mib(p['bytes_total'])} cached ({_mib(p['bytes_loaded'])} loaded, "
        f"{_mib(p['bytes_cached'])} already cached) in {_duration(elapsed)}, {rate / (1 << 20):.1f} MiB/s"
    )


def _failures(p: dict) -> list[str]:
    lines = [f"  {f['path']}: {f['error']}" for f in p["failures"]]
    if p["failed_count"] > len(p["failures"]):
        lines.append(f"  (and {p['failed_count'] - len(p['failures'])} more)")
    return lines


# -- the command ------------------------------------------------------------------------


def run(
    paths: list[str],
    *,
    recursive: bool,
    concurrency: int,
    wait_ratio: float | None,
    as_json: bool,
    pin: tuple[float, str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """`cachefs warmup`; returns the exit code. With `pin` = (ttl, owner), the paths are
    pinned first, so each chunk is kept from eviction from the moment it arrives.

    Raises:
        ConfigError: a bad PATH or option, or the mount cannot be reached (one line).
    """
    if wait_ratio is not None and not 0 < wait_ratio <= 1:
        raise ConfigError(f"--wait-ratio must be in (0, 1], not {wait_ratio:g}")
    located = [find_mount(p) for p in paths]
    sockets = {sock for sock, _ in located}
    if len(sockets) > 1:
        raise ConfigError("the PATHs are in different mounts; warm up one mount at a time")
    sock = sockets.pop()
    label = paths[0] if len(paths) == 1 else os.path.commonpath([os.path.abspath(p) for p in paths])
    args = {"paths": [rel for _, rel in located], "recursive": recursive, "concurrency": concurrency}
    if pin is not None:
        ttl, owner = pin
        lease = control_client.request(sock, "pin.add", {"paths": args["paths"], "ttl": ttl, "owner": owner}, label=label)
        print(f"cachefs: pinned {_mib(lease['bytes'])} for {ttl:g} s (lease {lease['id']}, owner {owner})",
              file=err if as_json else out)
    if as_json:
        output: Any = JsonOutput(out)
    elif out.isatty():
        output = BarOutput(out)
    else:
        output = PlainOutput(out)
    try:
        final, early = follow(sock, label, args, wait_ratio, output.update)
    except Interrupted as e:
        output.close()
        if as_json and e.progress is not None:
            output._print({"type": "summary", **e.progress, "exit": 130})
        print("cachefs: warmup interrupted; loaded chunks stay cached, so running it again resumes", file=err)
        return 130
    output.close()
    return _report(final, early, wait_ratio, as_json, output, out, err)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while following a warm-up: the job was cancelled at the node, and
    `progress` is its counters then (None if the node could not be told: gone)."""

    def __init__(self, progress: dict | None):
        super().__init__()
        self.progress = progress


def follow(sock: str, label: str, args: dict, wait_ratio: float | None, on_progress: Callable[[dict], Any]):
    """Start the job (`warmup.start` with `args`) and follow it until it ends, or until
    `wait_ratio` of its bytes are cached, calling `on_progress(p)` with each progress.

    Returns:
        (the last progress, whether we left early at the ratio).
    Raises:
        Interrupted: KeyboardInterrupt once the job ran: it is cancelled first (a job
            nobody follows must not go on loading); chunks loaded so far stay cached.
    """
    p = control_client.request(sock, "warmup.start", args, START_TIMEOUT, label=label)
    job = p["job"]
    try:
        while True:
            on_progress(p)
            if p["state"] in ("done", "failed", "cancelled"):
                return p, False
            if wait_ratio is not None and p["ratio"] is not None and p["ratio"] >= wait_ratio:
                return p, True
            # Answered when the job ends, or after POLL seconds with the counters then.
            p = control_client.request(sock, "warmup.progress", {"job": job, "wait": POLL}, CALL_TIMEOUT, label=label)
    except KeyboardInterrupt:
        try:
            cancelled = control_client.request(sock, "warmup.cancel", {"job": job}, timeout=5, label=label)
        except ConfigError:
            cancelled = None  # the mount is gone: so is its job
        raise Interrupted(cancelled) from None


def _report(p: dict, early: bool, wait_ratio: float | None, as_json: bool, output, out: TextIO, err: TextIO) -> int:
    if early:
        code, line = 0, (
            f"warmup {p['job']}: {p['ratio']:.0%} of {_mib(p['bytes_total'])} cached (--wait-ratio {wait_ratio:g}); "
            "the mount goes on loading the rest"
        )
    elif p["state"] == "failed":
        code, line = 1, f"warmup {p['job']} failed: {p['error']}"
    elif p["state"] == "cancelled":
        code, line = 1, f"warmup {p['job']} was cancelled"
    elif p["failed_count"]:
        code, line = 1, f"warmup {p['job']}: {p['failed_count']} file(s) failed; " + _summary(p)
    else:
        code, line = 0, _summary(p)
    if as_json:
        output.update(p, final=True)
        output._print({"type": "summary", **p, "early": early, "exit": code})
        if code:
            print(f"cachefs: error: {line}", file=err)
        return code
    if code:
        print(f"cachefs: error: {line}", file=err)
        for failure in _failures(p):
            print(failure, file=err)
    else:
        if isinstance(output, PlainOutput):
            output.update(p, final=True)
        print(f"cachefs: {line}", file=out)
    return code
