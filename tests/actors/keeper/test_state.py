"""The keeper's pure core: a store is due for a checkpoint exactly when its log changed since the last one."""

from __future__ import annotations

from villagemesh.actors.keeper.state import KeeperState


def test_a_store_never_checkpointed_is_due():
    assert KeeperState().due({"a": None, "b": (10, 1)}) == ["a", "b"]


def test_an_unchanged_log_is_not_due_and_a_grown_or_vanished_one_is():
    state = KeeperState()
    state.checkpointed("a", (4152, 1))
    state.checkpointed("b", None)
    assert state.due({"a": (4152, 1), "b": None}) == []
    assert state.due({"a": (8272, 2), "b": None}) == ["a"]
    assert state.due({"a": None, "b": (4152, 3)}) == ["a", "b"]
