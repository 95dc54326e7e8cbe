"""Peer exchange: PEER_LIST_REQUEST / PEER_LIST, relayed announces verified only when decoded."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from tests.protocols.test_discovery import ADDRS, CAPS, KEY, OTHER_KEY, announce, receive_all
from villagemesh.errors import LocalProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.discovery import (
    MAX_DISCOVERY_FRAME,
    MAX_PEER_LIST,
    PROTOCOL_VERSION,
    Announce,
    DiscoveryConnection,
    DiscoveryResponse,
    PeerList,
    PeerListRequest,
    RelayedPeer,
    decode_discovery,
    encode_discovery,
    peer_list,
    relay,
    sign_announce,
    sign_response,
)

LIST = {"type": "PEER_LIST", "protocol_version": "1.0", "book": "", "version": 0}
REQUEST = {"type": "PEER_LIST_REQUEST", "protocol_version": "1.0", "book": "", "since": 0}


def body_of(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def relayed(key: SigningKey = KEY, **changes: Any) -> RelayedPeer:
    return relay(encode_discovery(announce() if key is KEY else sign_announce(key, **_fields(changes))))


def _fields(changes: dict[str, Any]) -> dict[str, Any]:
    return {"addresses": ADDRS, "capabilities": CAPS, "timestamp": 1700000000.0, **changes}


@given(vst.peer_lists())
def test_every_relayed_entry_decodes_to_the_event_its_signer_made(listing: PeerList) -> None:
    """Each entry's body is the signer's event, byte for byte canonical: decoding verifies it."""
    assert decode_discovery(encode_discovery(listing)) == listing
    for entry in listing.peers:
        event = decode_discovery(entry.body)
        assert isinstance(event, Announce | DiscoveryResponse)
        assert (event.node_id, event.timestamp) == (entry.node_id, entry.timestamp)
        assert encode_discovery(event) == entry.body


@given(vst.peer_list_requests(), vst.peer_lists(), st.data())
def test_request_and_list_survive_any_chunking_on_one_connection(
    request: PeerListRequest, listing: PeerList, data: st.DataObject
) -> None:
    """The exchange as it runs after a DISCOVERY_REQUEST: the same events however the bytes are split."""
    stream = DiscoveryConnection().send(request) + DiscoveryConnection().send(listing)
    receiver = DiscoveryConnection()
    got = []
    for chunk in data.draw(vst.chunkings(stream)):
        got.extend(receive_all(receiver, chunk))
    assert got == [request, listing]


def test_a_tampered_entry_still_decodes_as_a_list_but_never_as_a_peer() -> None:
    """The relay is not trusted: an altered entry passes the list's shape check and fails verification."""
    forged = json.loads(encode_discovery(announce()))
    forged["addresses"] = ["ws://10.6.6.6:666"]
    entry = [forged["node_id"], forged["timestamp"], json.dumps(forged)]
    listing = decode_discovery(body_of({**LIST, "peers": [entry]}))
    assert isinstance(listing, PeerList) and listing.peers[0].node_id == announce().node_id
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        decode_discovery(listing.peers[0].body)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({**REQUEST, "limit": 0}, "limit must be an int within 1..64"),
        ({**REQUEST, "limit": True}, "limit must be an int"),
        ({"type": "PEER_LIST_REQUEST", "protocol_version": "1.0", "limit": 1}, "expected"),
        ({**REQUEST, "limit": 1, "since": -1}, "version must be an int"),
        ({**REQUEST, "limit": 1, "book": 7}, "book must be a str"),
        ({**LIST, "peers": [], "book": "x" * 33}, "book must be a str of at most 32"),
        ({**LIST, "peers": [], "version": 1.5}, "version must be an int"),
        ({**LIST, "peers": {}}, "must be a list of at most 64"),
        ({**LIST, "peers": [None] * 65}, "must be a list of at most 64"),
        ({**LIST, "peers": [3]}, r"is \[node_id, timestamp, body text\]"),
        ({**LIST, "peers": [["a", 1, {}]]}, "body text"),
        ({**LIST, "peers": [["a", 1]]}, "body text"),
        ({**LIST, "peers": [["", 1, "{}"]]}, "node_id must be"),
        ({**LIST, "peers": [["a", "1", "{}"]]}, "timestamp must be a finite"),
        ({**LIST, "peers": [["a", 1, ""]]}, "body must be non-empty"),
        ({**LIST, "peers": [["a", 1, "\ud800"]]}, "not UTF-8 text"),
        ({**LIST, "peers": [], "extra": 1}, "expected"),
    ],
)
def test_malformed_exchange_messages_are_remote_errors_naming_the_fault(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_discovery(body_of(obj))


def test_relay_refuses_what_is_not_a_signed_announce() -> None:
    with pytest.raises(RemoteProtocolError, match="not JSON"):
        relay(b"{")
    request = {"type": "DISCOVERY_REQUEST", "node_id": "n"}
    with pytest.raises(RemoteProtocolError, match="only a signed ANNOUNCE or DISCOVERY_RESPONSE is relayed"):
        relay(body_of(request))
    with pytest.raises(RemoteProtocolError, match="invalid peer list entry: node_id must be"):
        relay(body_of({"type": "ANNOUNCE", "timestamp": 1}))


def test_relay_keeps_responses_and_announces_alike() -> None:
    response = sign_response(OTHER_KEY, addresses=ADDRS, capabilities=CAPS, timestamp=5)
    entry = relay(encode_discovery(response))
    assert (entry.node_id, entry.timestamp) == (response.node_id, 5)
    assert decode_discovery(entry.body) == response


def test_a_body_that_is_not_utf8_cannot_be_sent() -> None:
    with pytest.raises(LocalProtocolError, match="must be UTF-8 JSON"):
        encode_discovery(PeerList((RelayedPeer("n", 1.0, b"\xff"),)))


def test_the_claims_travel_as_given_and_verification_tells_the_truth() -> None:
    """A relay may lie in the claims (to have an entry skipped or re-checked); the body decides."""
    honest = relayed()
    lying = dataclasses.replace(honest, timestamp=honest.timestamp + 1000)
    (received,) = decode_discovery(encode_discovery(PeerList((lying,)))).peers  # type: ignore[union-attr]
    assert received.timestamp == honest.timestamp + 1000
    assert decode_discovery(received.body).timestamp == honest.timestamp  # type: ignore[union-attr]


def test_peer_list_takes_what_fits_in_order() -> None:
    """At most ``limit`` entries, and a big entry is skipped where a smaller later one still fits."""
    worst = "\x00" * 255
    caps = dataclasses.replace(CAPS, network_type=worst, device_type=worst, transports=(worst,) * 16)
    big = [
        relay(
            encode_discovery(
                sign_announce(
                    SigningKey.generate(),
                    addresses=("a://" + "\x00" * 249 + ":1",) * 16,
                    capabilities=caps,
                    timestamp=1,
                )
            )
        )
        for _ in range(2)
    ]
    small = [relayed(SigningKey.generate()) for _ in range(3)]
    assert len(big[0].body) > MAX_DISCOVERY_FRAME // 2
    listing = peer_list([big[0], big[1], *small])
    assert listing.peers == (big[0], *small)
    assert len(encode_discovery(listing)) <= MAX_DISCOVERY_FRAME
    assert peer_list(small, limit=2).peers == tuple(small[:2])
    many = [relayed(SigningKey.generate()) for _ in range(MAX_PEER_LIST + 1)]
    assert len(peer_list(many, limit=1000).peers) == MAX_PEER_LIST


def test_a_hand_built_list_over_the_frame_is_a_local_error() -> None:
    worst = "\x00" * 255
    caps = dataclasses.replace(CAPS, network_type=worst, device_type=worst, transports=(worst,) * 16)
    address = "a://" + "\x00" * 249 + ":1"
    big = [
        relay(
            encode_discovery(
                sign_announce(SigningKey.generate(), addresses=(address,) * 16, capabilities=caps, timestamp=1)
            )
        )
        for _ in range(2)
    ]
    with pytest.raises(LocalProtocolError, match="exceeds MAX_DISCOVERY_FRAME"):
        encode_discovery(PeerList(tuple(big)))


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: PeerListRequest(MAX_PEER_LIST + 1), "limit must be"),
        (lambda: PeerList([]), "must be a tuple"),  # type: ignore[arg-type]
        (lambda: PeerList((announce(),)), "RelayedPeer values"),  # type: ignore[arg-type]
        (lambda: PeerList((relayed(),) * (MAX_PEER_LIST + 1)), "at most 64"),
        (lambda: RelayedPeer("", 1.0, b"{}"), "node_id must be"),
        (lambda: RelayedPeer("n", float("nan"), b"{}"), "timestamp must be"),
        (lambda: RelayedPeer("n", 1.0, b""), "body must be non-empty bytes"),
        (lambda: RelayedPeer("n", 1.0, b" " * (MAX_DISCOVERY_FRAME + 1)), "within MAX_DISCOVERY_FRAME"),
    ],
)
def test_invalid_exchange_values_raise_local_protocol_error(build: Any, reason: str) -> None:
    with pytest.raises(LocalProtocolError, match=reason):
        build()


def test_wire_form_of_the_exchange() -> None:
    """What another implementation needs: plain JSON objects, entries as their signers made them."""
    assert json.loads(encode_discovery(PeerListRequest(8, "ab12", 7))) == {
        "type": "PEER_LIST_REQUEST",
        "protocol_version": PROTOCOL_VERSION,
        "limit": 8,
        "book": "ab12",
        "since": 7,
    }
    wire = json.loads(encode_discovery(PeerList((relayed(),), "ab12", 9)))
    assert (wire["book"], wire["version"]) == ("ab12", 9)
    event = announce()
    assert wire["type"] == "PEER_LIST"
    assert wire["peers"] == [[event.node_id, event.timestamp, encode_discovery(event).decode()]]


@given(st.lists(vst.discovery_events(), min_size=1, max_size=3))
def test_the_connection_keeps_the_body_of_the_last_event(events: list[Any]) -> None:
    """``last_body`` is what came on the wire for the event just returned: it decodes to that event."""
    sender, receiver = DiscoveryConnection(), DiscoveryConnection()
    receiver.receive_data(b"".join(sender.send(e) for e in events))
    for event in events:
        assert receiver.next_event() == event
        assert receiver.last_body == encode_discovery(event)
