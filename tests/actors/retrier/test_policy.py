"""RetryPolicy: a value with capped exponential backoff, jitter on top, and a hard attempt budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.retrier.policy import DEFAULT_TTL, RetryPolicy
from villagemesh.errors import ConfigError

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 50),
    backoff_base=st.floats(0.001, 100.0),
    backoff_max=st.floats(100.0, 10_000.0),
    jitter=st.floats(0.0, 1.0),
)
rands = st.floats(0.0, 1.0, exclude_max=True)


def test_defaults_are_the_replaced_systems_numbers() -> None:
    """5 attempts, 1 s doubling, a 300 s cap and a 24 h TTL."""
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.backoff_base, policy.backoff_max, policy.ttl) == (5, 1.0, 300.0, DEFAULT_TTL)
    assert [policy.raw_delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert policy.raw_delay(20) == 300.0
    assert policy.expires_at(100.0) == 100.0 + 24 * 3600


def test_first_attempt_goes_at_once() -> None:
    """No attempt made yet means no wait, whatever the jitter."""
    assert RetryPolicy(jitter=1.0).delay(0, 0.99) == 0.0


@given(policies, st.integers(1, 2000), rands)
def test_delays_are_monotone_before_jitter_and_never_exceed_cap_plus_jitter(
    policy: RetryPolicy, attempt: int, rand: float
) -> None:
    """raw(n) ≤ raw(n+1) ≤ cap, and raw(n) ≤ delay(n) ≤ cap · (1 + jitter)."""
    assert policy.raw_delay(attempt) <= policy.raw_delay(attempt + 1) <= policy.backoff_max
    delay = policy.delay(attempt, rand)
    assert policy.raw_delay(attempt) <= delay <= policy.max_delay


@given(policies, st.lists(st.text(max_size=5), max_size=60))
def test_attempts_never_exceed_the_budget(policy: RetryPolicy, errors: list[str]) -> None:
    """increment() counts up to max_attempts and refuses to go past it."""
    for error in errors:
        if policy.exhausted:
            with pytest.raises(ConfigError, match="retry budget spent"):
                policy.increment(error)
            break
        before = policy
        policy = policy.increment(error)
        assert policy.attempts == before.attempts + 1
        assert policy.last_error == error
        assert before.attempts == policy.attempts - 1  # the old value is untouched
    assert 0 <= policy.attempts <= policy.max_attempts
    assert policy.remaining == policy.max_attempts - policy.attempts


def test_increment_without_error_keeps_the_last_one() -> None:
    """A successful-but-unacked attempt does not erase what the previous failure said."""
    policy = RetryPolicy().increment("refused").increment()
    assert (policy.attempts, policy.last_error) == (2, "refused")


def test_next_delay_uses_the_attempts_made() -> None:
    """next_delay is delay(attempts)."""
    policy = RetryPolicy(jitter=0.5).increment("x").increment("y")
    assert policy.next_delay(0.5) == 2.0 * 1.25


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    """2**n would overflow a float; the cap applies first."""
    assert RetryPolicy(max_attempts=10**6).raw_delay(10**6) == 300.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"backoff_base": 0}, "backoff_base"),
        ({"backoff_base": float("nan")}, "backoff_base"),
        ({"backoff_max": 0.5}, "backoff_max"),
        ({"jitter": 1.5}, "jitter"),
        ({"ttl": -1}, "ttl"),
        ({"attempts": 6}, "attempts"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(kwargs: dict[str, object], name: str) -> None:
    """Every bad setting is a ConfigError that names it."""
    with pytest.raises(ConfigError, match=name):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("rand", [-0.1, 1.0, float("nan")])
def test_rand_outside_unit_interval_is_refused(rand: float) -> None:
    """The caller's random number must be in [0, 1)."""
    with pytest.raises(ConfigError, match="rand"):
        RetryPolicy().delay(1, rand)
