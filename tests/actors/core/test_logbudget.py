"""The kit's log budget: a few lines per key and window, the rest counted and summed up once."""

from __future__ import annotations

import pytest

from villagemesh.actors.core.logbudget import LogBudget
from villagemesh.errors import ConfigError


def test_the_first_lines_of_a_window_are_logged_the_rest_counted_and_summed_up_when_the_next_opens() -> None:
    budget = LogBudget(per_window=2, window_s=10.0)
    assert [budget.admit("k", t) for t in (0.0, 1.0, 2.0, 3.0)] == [(True, 0), (True, 0), (False, 0), (False, 0)]
    assert budget.admit("other", 3.0) == (True, 0)  # keys have budgets of their own
    assert budget.admit("k", 10.0) == (True, 2)  # a new window: the last one swallowed two
    assert budget.admit("k", 11.0) == (True, 0)
    assert budget.suppressed_total == 2


def test_keys_are_bounded_and_bad_settings_refused() -> None:
    budget = LogBudget(per_window=1, window_s=10.0, max_keys=2)
    for key in "abc":
        budget.admit(key, 0.0)
    assert budget.admit("a", 1.0) == (True, 0)  # "a" was forgotten, so it has a fresh window
    with pytest.raises(ConfigError, match="per_window"):
        LogBudget(per_window=0)
    with pytest.raises(ConfigError, match="window_s"):
        LogBudget(window_s=0)
