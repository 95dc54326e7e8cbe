"""Hypothesis strategies for peer records (shared by the registry's tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from villagemesh.actors.registry.state import MAX_TRUST, MIN_TRUST, PeerRecord
from villagemesh.protocols import strategies as vst

TRANSPORTS = ["libp2p", "bitchat", "betanet", "websocket", "lan"]

address_maps = st.dictionaries(
    st.sampled_from(TRANSPORTS), st.lists(st.sampled_from(["a:1", "b:2", "c:3", "[::1]:4"]), max_size=3), max_size=3
)


def records(peer_ids: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[PeerRecord]:
    """Valid PeerRecords (small alphabets, so merges meet overlapping values)."""
    return st.builds(
        PeerRecord,
        peer_id=peer_ids if peer_ids is not None else st.sampled_from(["p1", "p2", "p3"]) | vst.node_ids(),
        addresses=address_maps,
        capabilities=st.none() | vst.capabilities(),
        public_key=st.none() | st.just(b"k" * 32),
        last_seen=st.floats(0.0, 1e6),
        trust=st.floats(MIN_TRUST, MAX_TRUST),
        latency_ms=st.none() | st.floats(0.0, 1000.0),
        source=st.none() | st.sampled_from(TRANSPORTS),
    )
