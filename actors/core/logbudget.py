"""A budget for repetitive warnings: the first few per key and window are logged, the rest counted.

A peer that floods us with bad input must not flood the log the dashboard reads. Pure
(the caller passes ``now``); the actor emits what :meth:`LogBudget.admit` allows and,
when a window with suppressed lines ends, one summary line with their count::

    admit(key, now) ──▶ True        log this one (the window has room)
                    └─▶ False       counted, not logged
    admit in a new window ──▶ summary(key) gives how many the last window swallowed

Keys are bounded too (``max_keys``; the oldest is forgotten, its suppressed count with it,
so a flood of distinct keys cannot grow the table).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from villagemesh.errors import ConfigError

__all__ = ["LogBudget"]


class LogBudget:
    """At most ``per_window`` lines per key in each ``window_s`` seconds."""

    def __init__(self, per_window: int = 10, window_s: float = 10.0, max_keys: int = 256) -> None:
        if not (isinstance(per_window, int) and per_window >= 1):
            raise ConfigError(f"per_window must be an integer >= 1, got {per_window!r}")
        if not (isinstance(window_s, int | float) and window_s > 0):
            raise ConfigError(f"window_s must be > 0 seconds, got {window_s!r}")
        self.per_window, self.window_s, self.max_keys = per_window, window_s, max_keys
        self._windows: OrderedDict[Hashable, list[float | int]] = OrderedDict()
        """key -> [window start, lines logged in it, lines suppressed in it]"""
        self.suppressed_total = 0

    def admit(self, key: Hashable, now: float) -> tuple[bool, int]:
        """Whether to log this line, and how many lines of ``key`` the window that just ended suppressed
        (nonzero once, on the first line of a new window: log a summary with it)."""
        window = self._windows.get(key)
        ended = 0
        if window is None or now - window[0] >= self.window_s:
            ended = int(window[2]) if window is not None else 0
            window = [now, 0, 0]
            self._windows[key] = window
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
        if window[1] < self.per_window:
            window[1] += 1
            return True, ended
        window[2] += 1
        self.suppressed_total += 1
        return False, ended
