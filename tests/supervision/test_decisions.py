"""The supervisor's pure decisions: intensity window, restart plans, restart types, backoff."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from villagemesh.supervision.decisions import add_restart, backoff_delay, plan, should_restart
from villagemesh.supervision.spec import Backoff, Restart, Strategy

times = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), max_size=30).map(sorted)


@given(times, st.integers(min_value=0, max_value=10), st.floats(min_value=0.001, max_value=1e3))
def test_window_keeps_only_restarts_within_the_period(history, intensity, period):
    """Whatever the history, the window holds exactly the restarts younger than the period, newest last."""
    now = (history[-1] if history else 0.0) + 1.0
    window, exceeded = add_restart(tuple(history), now, intensity, period)
    assert window[-1] == now
    assert all(now - t < period for t in window)
    assert len(window) == 1 + sum(1 for t in history if now - t < period)
    assert exceeded == (len(window) > intensity)


@given(st.integers(min_value=0, max_value=20), st.floats(min_value=0.01, max_value=100))
def test_exceeding_happens_exactly_at_intensity_plus_one_restarts_in_a_burst(intensity, period):
    """A burst of restarts at one instant is tolerated `intensity` times, not once more."""
    window: tuple[float, ...] = ()
    results = []
    for _ in range(intensity + 1):
        window, exceeded = add_restart(window, 10.0, intensity, period)
        results.append(exceeded)
    assert results == [False] * intensity + [True]


def test_otp_default_allows_one_restart_in_five_seconds():
    """OTP's default (1 in 5 s): a second restart within 5 s escalates, one after 5 s does not."""
    w, first = add_restart((), 0.0, 1, 5.0)
    assert not first
    assert add_restart(w, 4.9, 1, 5.0)[1]
    assert not add_restart(w, 5.0, 1, 5.0)[1]


children = st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=3), min_size=1, max_size=8, unique=True)


@given(children, st.data())
def test_one_for_one_touches_only_the_failed_child(order, data):
    """one_for_one restarts the failed child and stops nobody."""
    failed = data.draw(st.sampled_from(order))
    p = plan(Strategy.ONE_FOR_ONE, order, failed)
    assert p.stop == () and p.start == (failed,)


@given(children, st.data())
def test_one_for_all_stops_all_others_in_reverse_and_starts_all_in_order(order, data):
    """one_for_all stops every sibling in reverse start order, then starts all in start order."""
    failed = data.draw(st.sampled_from(order))
    p = plan(Strategy.ONE_FOR_ALL, order, failed)
    assert p.start == tuple(order)
    assert p.stop == tuple(reversed([c for c in order if c != failed]))


@given(children, st.data())
def test_rest_for_one_restarts_the_failed_child_and_those_after_it(order, data):
    """rest_for_one affects the failed child and every child started after it, nobody before."""
    failed = data.draw(st.sampled_from(order))
    i = order.index(failed)
    p = plan(Strategy.REST_FOR_ONE, order, failed)
    assert p.start == tuple(order[i:])
    assert p.stop == tuple(reversed(order[i + 1 :]))


def test_plan_for_an_unknown_child_names_it():
    """Asking for a plan about a child that is not there is a bug, reported with the name."""
    try:
        plan(Strategy.ONE_FOR_ONE, ["a"], "zz")
    except ValueError as exc:
        assert "'zz'" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_restart_types_follow_otp():
    """permanent always, transient only after a crash, temporary never."""
    assert should_restart(Restart.PERMANENT, crashed=False) and should_restart(Restart.PERMANENT, crashed=True)
    assert should_restart(Restart.TRANSIENT, crashed=True) and not should_restart(Restart.TRANSIENT, crashed=False)
    assert not should_restart(Restart.TEMPORARY, crashed=True) and not should_restart(Restart.TEMPORARY, crashed=False)


backoffs = st.builds(
    lambda i, extra, m, j: Backoff(initial=i, maximum=i + extra, multiplier=m, jitter=j),
    st.floats(min_value=0, max_value=10),
    st.floats(min_value=0, max_value=100),
    st.floats(min_value=1, max_value=4),
    st.floats(min_value=0, max_value=1),
)


@given(backoffs, st.integers(min_value=0, max_value=200), st.floats(min_value=0, max_value=0.999999))
def test_backoff_is_capped_and_jitter_only_shortens(backoff, n, rand):
    """The delay never exceeds the cap and jitter removes at most its fraction."""
    d = backoff_delay(backoff, n, rand)
    base = min(backoff.maximum, backoff.initial * backoff.multiplier ** min(n, 64))
    assert 0 <= d <= backoff.maximum
    assert base * (1 - backoff.jitter) - 1e-9 <= d <= base + 1e-9


@given(backoffs, st.integers(min_value=0, max_value=100))
def test_backoff_without_jitter_never_decreases(backoff, n):
    """Consecutive restarts wait at least as long as the one before (before jitter)."""
    assert backoff_delay(backoff, n + 1, 0.0) >= backoff_delay(backoff, n, 0.0)


def test_no_backoff_means_restart_at_once():
    """A spec without backoff restarts immediately."""
    assert backoff_delay(None, 5, 0.5) == 0.0
