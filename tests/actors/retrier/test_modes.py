"""Network modes: the transport order per mode and failover along it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.actors.retrier.modes import TRANSPORT_ORDER, NetworkMode, Transport, next_transport, transport_order
from villagemesh.errors import ConfigError

ALL = [t.value for t in Transport]
transports = st.lists(st.sampled_from([*ALL, "lan", "ble"]), unique=True)


def test_orders_are_exactly_the_issues() -> None:
    """hybrid, mesh, anonymous and direct order the four transports as the issue says."""
    assert {mode.value: [t.value for t in order] for mode, order in TRANSPORT_ORDER.items()} == {
        "hybrid": ["libp2p", "bitchat", "betanet", "websocket"],
        "mesh": ["bitchat", "libp2p", "websocket", "betanet"],
        "anonymous": ["betanet", "libp2p", "bitchat", "websocket"],
        "direct": ["libp2p", "websocket", "bitchat", "betanet"],
    }


def test_mode_names_parse_case_insensitively_and_unknown_ones_are_refused() -> None:
    """ "MESH" is MESH; "carrier-pigeon" is a ConfigError naming it."""
    assert NetworkMode.parse("MESH") is NetworkMode.MESH
    assert NetworkMode.parse(NetworkMode.DIRECT) is NetworkMode.DIRECT
    with pytest.raises(ConfigError, match="carrier-pigeon"):
        NetworkMode.parse("carrier-pigeon")


def test_transports_unknown_to_the_mode_come_last_in_name_order() -> None:
    """A LAN transport is still used, after the ordered ones."""
    assert transport_order(NetworkMode.MESH, ["lan", "websocket", "ble", "libp2p"]) == (
        "libp2p",
        "websocket",
        "ble",
        "lan",
    )


@given(st.sampled_from(NetworkMode), transports, st.lists(st.sampled_from([*ALL, "lan", "ble"])))
def test_next_transport_is_the_first_unfailed_one_or_restarts_the_round(
    mode: NetworkMode, available: list[str], failed: list[str]
) -> None:
    """The pick is available; it is unfailed unless every transport failed, then it is the favourite."""
    pick = next_transport(mode, available, failed)
    order = transport_order(mode, available)
    if not available:
        assert pick is None
        return
    assert pick in available
    unfailed = [t for t in order if t not in failed]
    assert pick == (unfailed[0] if unfailed else order[0])


def test_failover_walks_the_hybrid_order() -> None:
    """libp2p fails → bitchat; then betanet; then websocket; then the round restarts."""
    available = ALL
    failed: list[str] = []
    seen = []
    for _ in range(5):
        pick = next_transport(NetworkMode.HYBRID, available, failed)
        assert pick is not None
        seen.append(pick)
        failed = [] if pick in failed else [*failed, pick]
    assert seen == ["libp2p", "bitchat", "betanet", "websocket", "libp2p"]
