"""The acceptor's pure core: the routing table and the connection limiter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from villagemesh.actors.acceptor.state import (
    ROUTES,
    AcceptorLimits,
    ConnectionLimiter,
    Reject,
    Route,
    route_for,
)
from villagemesh.errors import ConfigError
from villagemesh.protocols.sniff import MAX_SNIFF_BYTES, Sniffed


def test_every_verdict_has_a_routing_decision() -> None:
    """The table covers the whole Sniffed enum: no verdict falls through."""
    assert set(ROUTES) == set(Sniffed)


def test_unknown_is_rejected_with_a_reason() -> None:
    """UNKNOWN maps to a Reject carrying a loggable reason."""
    decision = route_for(Sniffed.UNKNOWN, buffered=3, max_sniff_bytes=MAX_SNIFF_BYTES)
    assert isinstance(decision, Reject) and decision.reason == "unknown protocol"


def test_undecided_full_buffer_is_rejected() -> None:
    """NEED_MORE with a full sniff buffer is a rejection, not an endless wait."""
    assert route_for(Sniffed.NEED_MORE, buffered=4, max_sniff_bytes=20) is None
    decision = route_for(Sniffed.NEED_MORE, buffered=20, max_sniff_bytes=20)
    assert isinstance(decision, Reject) and "20 bytes" in decision.reason


@pytest.mark.parametrize(
    ("verdict", "route"),
    [
        (Sniffed.DISCOVERY_JSON, Route.DISCOVERY),
        (Sniffed.SECURE, Route.SECURE),
        (Sniffed.LIBP2P_MULTISTREAM, Route.LIBP2P),
        (Sniffed.HTTP, Route.HTTP),
        (Sniffed.TLS, Route.TLS),
    ],
)
def test_each_protocol_verdict_maps_to_its_route(verdict: Sniffed, route: Route) -> None:
    """Every known protocol has its own route."""
    assert route_for(verdict, buffered=MAX_SNIFF_BYTES, max_sniff_bytes=MAX_SNIFF_BYTES) is route


@pytest.mark.parametrize(
    "kwargs",
    [{"sniff_timeout_s": 0}, {"max_per_source": 0}, {"max_per_source": 10, "max_total": 5}],
)
def test_unusable_limits_are_refused_naming_the_value(kwargs: dict[str, float]) -> None:
    """AcceptorLimits validates eagerly with ConfigError."""
    with pytest.raises(ConfigError):
        AcceptorLimits(**kwargs)  # type: ignore[arg-type]


def test_closing_a_connection_never_opened_is_an_error() -> None:
    """close() without try_open is a bug and says so."""
    with pytest.raises(ConfigError, match=r"10\.0\.0\.9"):
        ConnectionLimiter(2, 4).close("10.0.0.9")


SOURCES = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1"])


class LimiterMachine(RuleBasedStateMachine):
    """The limiter against a model: counts match, caps hold, empty sources are forgotten."""

    def __init__(self) -> None:
        super().__init__()
        self.limiter = ConnectionLimiter(max_per_source=3, max_total=7)
        self.model: dict[str, int] = {}

    @rule(src=SOURCES)
    def open(self, src: str) -> None:
        expected = self.model.get(src, 0) < 3 and sum(self.model.values()) < 7
        assert (self.limiter.refusal(src) is None) == expected
        assert self.limiter.try_open(src) == expected
        if expected:
            self.model[src] = self.model.get(src, 0) + 1

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        src = data.draw(st.sampled_from(sorted(self.model)))
        self.limiter.close(src)
        self.model[src] -= 1
        if self.model[src] == 0:
            del self.model[src]

    @invariant()
    def counts_match_the_model(self) -> None:
        assert self.limiter.total == sum(self.model.values())
        for src in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1"]:
            assert self.limiter.count(src) == self.model.get(src, 0)
        assert len(self.limiter._open) == len(self.model)


TestLimiterMachine = LimiterMachine.TestCase
TestLimiterMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@given(st.lists(SOURCES, max_size=40))
def test_limiter_never_exceeds_its_caps(sources: list[str]) -> None:
    """Whatever opens, no source passes its cap and the total never passes the total cap."""
    limiter = ConnectionLimiter(max_per_source=2, max_total=5)
    for src in sources:
        limiter.try_open(src)
        assert limiter.count(src) <= 2 and limiter.total <= 5
