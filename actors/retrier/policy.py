"""The retry policy as a value (urllib3's ``Retry``): capped exponential backoff with jitter.

A :class:`RetryPolicy` is immutable. It holds the limits *and* how many
attempts were made so far; :meth:`RetryPolicy.increment` returns a new policy
with one more attempt and the error it ended with, as urllib3's ``Retry`` does.
Nothing here sleeps or reads a clock: the retrier computes a delay and schedules
a timer message, and the random number behind the jitter is a parameter.

Backoff, with ``n`` the number of attempts made so far (n ≥ 1)::

    raw(n)   = min(backoff_max, backoff_base · 2^(n−1))     1, 2, 4, 8, ... 300 s
    delay(n) = raw(n) · (1 + jitter · rand),   rand ∈ [0, 1)

so ``raw`` is non-decreasing and capped, and the delay never exceeds
``backoff_max · (1 + jitter)``. The jitter is added on top of the cap rather
than cut by it, so that messages that all reached the cap still spread out
instead of retrying in lock-step. ``delay(0) == 0``: the first attempt goes at once.

Defaults are the replaced system's numbers: 5 attempts, 1 s · 2^n capped at
300 s plus jitter, and a message TTL of 24 hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from villagemesh.errors import ConfigError

__all__ = ["DEFAULT_TTL", "RetryPolicy"]

DEFAULT_TTL = 24 * 3600.0
"""A message is given up on 24 h after it was made (the replaced system's TTL)."""

_MAX_EXPONENT = 1023
"""2**1023 is the largest power of two a float holds; beyond it the cap applies anyway."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a message is retried; immutable.

    Attributes:
        max_attempts: sends allowed per message, the first included (≥ 1).
        backoff_base: seconds to wait after the first failed attempt (> 0).
        backoff_max: cap on the exponential part of the wait (≥ backoff_base).
        jitter: at most this fraction of the wait is added at random (0 ≤ jitter ≤ 1).
        ttl: seconds a message stays deliverable after it was made (> 0).
        attempts: sends made so far.
        last_error: what the last failed attempt said, if any.
    """

    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    jitter: float = 0.25
    ttl: float = DEFAULT_TTL
    attempts: int = 0
    last_error: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be an int ≥ 1, got {self.max_attempts!r}")
        if not _positive(self.backoff_base):
            raise ConfigError(f"backoff_base must be a finite number of seconds > 0, got {self.backoff_base!r}")
        if not _positive(self.backoff_max) or self.backoff_max < self.backoff_base:
            raise ConfigError(
                f"backoff_max must be finite and ≥ backoff_base ({self.backoff_base}), got {self.backoff_max!r}"
            )
        if not (_number(self.jitter) and 0.0 <= self.jitter <= 1.0):
            raise ConfigError(f"jitter must be a fraction in [0, 1], got {self.jitter!r}")
        if not _positive(self.ttl):
            raise ConfigError(f"ttl must be a finite number of seconds > 0, got {self.ttl!r}")
        if (
            isinstance(self.attempts, bool)
            or not isinstance(self.attempts, int)
            or not (0 <= self.attempts <= self.max_attempts)
        ):
            raise ConfigError(
                f"attempts must be an int in [0, max_attempts={self.max_attempts}], got {self.attempts!r}"
            )

    # -- pure computations ------------------------------------------------------------------

    def raw_delay(self, attempt: int) -> float:
        """The capped exponential wait after ``attempt`` attempts, before jitter (0 for 0)."""
        if attempt <= 0:
            return 0.0
        exponent = min(attempt - 1, _MAX_EXPONENT)
        return min(self.backoff_max, self.backoff_base * math.ldexp(1.0, exponent))

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait after ``attempt`` attempts; ``rand`` ∈ [0, 1) is the caller's random number."""
        if not (_number(rand) and 0.0 <= rand < 1.0):
            raise ConfigError(f"rand must be in [0, 1), got {rand!r}")
        return self.raw_delay(attempt) * (1.0 + self.jitter * rand)

    @property
    def max_delay(self) -> float:
        """The longest wait :meth:`delay` can return: the cap plus its whole jitter."""
        return self.backoff_max * (1.0 + self.jitter)

    # -- the attempt counter -----------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        """True when no attempt is left."""
        return self.attempts >= self.max_attempts

    @property
    def remaining(self) -> int:
        """Attempts still allowed."""
        return self.max_attempts - self.attempts

    def increment(self, error: str | None = None) -> RetryPolicy:
        """A new policy with one more attempt made (and ``error`` if it failed).

        Raises :class:`ConfigError` when the budget is already spent: the
        caller must check :attr:`exhausted` first, so attempts never exceed it.
        """
        if self.exhausted:
            raise ConfigError(
                f"retry budget spent: {self.attempts} of {self.max_attempts} attempts made"
                f" (last error: {self.last_error})"
            )
        return replace(self, attempts=self.attempts + 1, last_error=error if error is not None else self.last_error)

    def next_delay(self, rand: float) -> float:
        """The wait before the next attempt, given the attempts made so far."""
        return self.delay(self.attempts, rand)

    def expires_at(self, created_at: float) -> float:
        """When a message made at ``created_at`` is given up on."""
        return created_at + self.ttl


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _number(value) and value > 0  # type: ignore[operator]
