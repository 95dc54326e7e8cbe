"""Child and supervisor specs are validated up front, with errors that name the value."""

from __future__ import annotations

import pytest

from villagemesh.actors.core.base import Actor
from villagemesh.errors import ChildSpecError
from villagemesh.supervision.spec import Backoff, ChildSpec, Isolation, Restart, Strategy, SupervisorSpec


class Worker(Actor):
    """A do-nothing actor for specs."""


def test_strings_are_accepted_for_enum_fields():
    """'transient' and 'process' mean the enum members; the spec keeps members."""
    spec = ChildSpec("w", Worker, restart="transient", isolation="process")
    assert spec.restart is Restart.TRANSIENT and spec.isolation is Isolation.PROCESS
    assert spec.target == f"{__name__}:Worker"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"restart": "sometimes"}, "'sometimes'"),
        ({"isolation": "vm"}, "'vm'"),
        ({"shutdown": 0}, "0"),
        ({"shutdown": float("inf")}, "inf"),
        ({"factory": object}, "object"),
        ({"id": ""}, "''"),
        ({"id": "_hidden"}, "'_hidden'"),
        ({"id": "a/b"}, "'a/b'"),
        ({"backoff": 3}, "3"),
        ({"config": [1]}, "list"),
        ({"name": "_x"}, "name"),
    ],
)
def test_invalid_child_specs_are_rejected_naming_the_value(kwargs, needle):
    """Each bad field raises ChildSpecError whose message shows the offending value."""
    args = {"id": "w", "factory": Worker, **kwargs}
    with pytest.raises(ChildSpecError) as info:
        ChildSpec(**args)
    assert needle in str(info.value)


def test_process_child_needs_an_importable_factory():
    """A class defined inside a function cannot be found by a child process: refused up front."""

    class Local(Actor):
        pass

    with pytest.raises(ChildSpecError, match="importable"):
        ChildSpec("p", Local, isolation="process")


def test_process_child_config_must_cross_without_pickle():
    """A config value msgpack cannot carry is refused before anything starts."""
    with pytest.raises(ChildSpecError, match="process boundary"):
        ChildSpec("p", Worker, isolation="process", config={"x": object()})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"initial": -1}, "-1"),
        ({"initial": 2, "maximum": 1}, "1"),
        ({"multiplier": 0.5}, "0.5"),
        ({"jitter": 2}, "2"),
    ],
)
def test_invalid_backoff_is_rejected(kwargs, needle):
    """Backoff values are checked with the value in the message."""
    with pytest.raises(ChildSpecError) as info:
        Backoff(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"strategy": "all_for_none"}, "'all_for_none'"),
        ({"intensity": -1}, "-1"),
        ({"intensity": True}, "True"),
        ({"period": 0}, "0"),
        ({"shutdown": -2}, "-2"),
        ({"children": [ChildSpec("a", Worker), ChildSpec("a", Worker)]}, "['a']"),
        ({"children": ["nope"]}, "'nope'"),
        ({"id": "x/y"}, "'x/y'"),
    ],
)
def test_invalid_supervisor_specs_are_rejected(kwargs, needle):
    """Supervisor specs are validated like child specs."""
    args = {"id": "s", "children": [], **kwargs}
    with pytest.raises(ChildSpecError) as info:
        SupervisorSpec(**args)
    assert needle in str(info.value)


def test_supervisor_spec_defaults_are_otps():
    """Defaults: one_for_one, 1 restart in 5 s, permanent, thread."""
    spec = SupervisorSpec("s", [])
    assert (spec.strategy, spec.intensity, spec.period) == (Strategy.ONE_FOR_ONE, 1, 5.0)
    assert spec.restart is Restart.PERMANENT and spec.isolation is Isolation.THREAD and spec.backoff is None
