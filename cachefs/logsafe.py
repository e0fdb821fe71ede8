"""Logging what a remote party controls: its strings and how often it makes us log.

A peer's strings (its node name, a path it asks for) are logged through
`loggable`, so a newline cannot forge a log line. A peer that fails its
handshake in a loop, or a flood of malformed frames, must not fill the disk:
`LogLimiter` logs the first warning of a kind, counts the repeats within its
interval, and the next line it logs says how many were held back.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

# Remote strings are cut to this length in logs.
LOGGED_STR = 120


def loggable(text: str) -> str:
    """A remote party's string, safe to log: repr() (no newline or escape gets through), cut short."""
    return repr(text[:LOGGED_STR]) + ("..." if len(text) > LOGGED_STR else "")


class LogLimiter:
    """Logs each kind of warning (a `key` the caller picks) at most once per `interval` seconds.

    Args:
        logger: where the lines go.
        interval: seconds between two lines of one key.
        clock: seconds, monotonic (tests pass a fake one).
    """

    MAX_KEYS = 1024  # keys are few kinds of event; a flood of new keys only resets the counts

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless a line of `key` went out within the interval.

        Returns:
            Whether the line was logged (False: it was counted for the next one).
        """
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if len(self._last) >= self.MAX_KEYS and key not in self._last:
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more like it in the last %.0fs)"
            args = (*args, held, now - last if last is not None else self.interval)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
