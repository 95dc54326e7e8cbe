"""Discovery v1: signed JSON announces, the legacy format, and the sans-I/O connection."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.signing import SigningKey

from villagemesh.errors import LocalProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.discovery import (
    MAX_DISCOVERY_FRAME,
    NEED_DATA,
    PROTOCOL_VERSION,
    Announce,
    Capabilities,
    DiscoveryConnection,
    DiscoveryEvent,
    DiscoveryRequest,
    DiscoveryResponse,
    LegacyPeerDiscovery,
    decode_discovery,
    encode_discovery,
    node_id_from_public_key,
    sign_announce,
    sign_response,
    verify,
)
from villagemesh.protocols.sniff import DISCOVERY_MAX_LENGTH, Sniffed, sniff

KEY = SigningKey(bytes(range(32)))
OTHER_KEY = SigningKey(bytes(range(1, 33)))
CAPS = Capabilities(
    cpu_cores=4,
    ram_mb=8192,
    battery_percent=None,
    network_type="wifi",
    device_type="laptop",
    performance_tier="high",
    evolution_capacity=0.7,
    available_for_evolution=True,
    transports=("libp2p", "websocket"),
)
ADDRS = (
    "libp2p://127.0.0.1:4001",
    "websocket://[::1]:8080",
    "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA",
)

LEGACY_REQUEST = {
    "type": "PEER_DISCOVERY",
    "sender_id": "node-7f3a",
    "sender_port": 9000,
    "timestamp": 1700000000.25,
    "capabilities": {
        "cpu_cores": 2,
        "ram_mb": 3072,
        "battery_percent": 64,
        "network_type": "wifi",
        "device_type": "phone",
        "performance_tier": "low",
        "evolution_capacity": 0.4,
        "available_for_evolution": False,
    },
    "protocol_version": "1.0",
}


def announce(**changes: Any) -> Announce:
    event = sign_announce(KEY, addresses=ADDRS, capabilities=CAPS, timestamp=1700000000.0)
    return dataclasses.replace(event, **changes) if changes else event


def framed(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def receive_all(conn: DiscoveryConnection, data: bytes) -> list[DiscoveryEvent]:
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


@given(vst.discovery_events(legacy=True))
def test_every_event_round_trips_through_the_codec(event: DiscoveryEvent) -> None:
    """decode(encode(e)) == e for requests, signed responses and announces, and legacy messages."""
    assert decode_discovery(encode_discovery(event), allow_unsigned_legacy=True) == event


@given(st.lists(vst.discovery_events(legacy=True), max_size=3), st.data())
def test_any_chunking_of_a_stream_gives_the_same_events(events: list[DiscoveryEvent], data: st.DataObject) -> None:
    """The connection yields the same verified events however the bytes are split."""
    sender = DiscoveryConnection(allow_unsigned_legacy=True)
    stream = b"".join(sender.send(e) for e in events)
    receiver = DiscoveryConnection(allow_unsigned_legacy=True)
    received: list[DiscoveryEvent] = []
    for chunk in data.draw(vst.chunkings(stream)):
        received.extend(receive_all(receiver, chunk))
    assert received == events
    assert receiver.pending == 0


@given(st.binary(max_size=300), st.data())
def test_random_streams_raise_only_remote_protocol_errors(raw: bytes, data: st.DataObject) -> None:
    """Arbitrary bytes give events or RemoteProtocolError, never another exception."""
    conn = DiscoveryConnection(allow_unsigned_legacy=data.draw(st.booleans()))
    try:
        for chunk in data.draw(vst.chunkings(raw)):
            receive_all(conn, chunk)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError, match="already failed"):
            conn.next_event()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


TAMPER_KEYS = [*sorted(LEGACY_REQUEST), "node_id", "addresses", "public_key", "signature"]


@given(vst.discovery_events(legacy=True), st.sampled_from(TAMPER_KEYS), json_values)
def test_tampered_json_is_rejected_or_still_valid(event: DiscoveryEvent, key: str, value: Any) -> None:
    """Replacing any field with any JSON value decodes to a valid event or raises RemoteProtocolError."""
    obj = json.loads(encode_discovery(event))
    obj[key] = value
    try:
        decoded = decode_discovery(json.dumps(obj).encode(), allow_unsigned_legacy=True)
    except RemoteProtocolError:
        return
    assert type(decoded) is type(event)


@given(vst.announces(signing_key=KEY), st.sampled_from(["addresses", "capabilities", "timestamp", "node_id"]))
def test_changing_any_signed_field_breaks_the_signature(event: Announce, field: str) -> None:
    """A forwarder cannot alter an announce without the registry noticing."""
    other = {
        "addresses": ("tcp://10.0.0.1:1",),
        "capabilities": dataclasses.replace(CAPS, cpu_cores=CAPS.cpu_cores + 1),
        "timestamp": 12.5,
        "node_id": node_id_from_public_key(bytes(OTHER_KEY.verify_key)),
    }[field]
    if getattr(event, field) == other:
        return
    with pytest.raises(RemoteProtocolError):
        verify(dataclasses.replace(event, **{field: other}))


def test_announce_from_another_key_is_rejected() -> None:
    """Swapping in someone else's key and node id does not make the signature valid."""
    public_key = bytes(OTHER_KEY.verify_key)
    forged = announce(public_key=public_key, node_id=node_id_from_public_key(public_key))
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(forged)


def test_a_body_verified_once_is_remembered_and_a_forged_one_refused_every_time() -> None:
    """The same bytes decode to the same event (its signature checked once); a body whose
    signature fails is never remembered: each decode refuses it again."""
    body = encode_discovery(announce())
    first = decode_discovery(body)
    assert decode_discovery(bytearray(body)) is first
    tampered = body.replace(b'"timestamp":1700000000.0', b'"timestamp":1700000001.0')
    assert tampered != body
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="bad signature"):
            decode_discovery(tampered)


def test_node_id_that_does_not_match_the_key_is_rejected() -> None:
    """A peer cannot claim a node id that is not derived from its key."""
    with pytest.raises(RemoteProtocolError, match="does not belong"):
        verify(announce(node_id="f" * 32))


def test_signed_types_without_a_signature_are_rejected_on_the_wire() -> None:
    """An ANNOUNCE or DISCOVERY_RESPONSE missing its signature never decodes."""
    obj = json.loads(encode_discovery(announce()))
    del obj["signature"]
    with pytest.raises(RemoteProtocolError, match="expected"):
        decode_discovery(json.dumps(obj).encode())
    obj["signature"] = "00" * 64
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        decode_discovery(json.dumps(obj).encode())


def test_verify_refuses_unsigned_events() -> None:
    """verify() on a request says it has no signature instead of passing it."""
    request = DiscoveryRequest(node_id="n", addresses=(), capabilities=CAPS, timestamp=0)
    with pytest.raises(RemoteProtocolError, match="no signature"):
        verify(request)  # type: ignore[arg-type]


def test_sending_a_forged_announce_is_a_local_error() -> None:
    """We refuse to put an unverifiable signed event on the wire."""
    with pytest.raises(LocalProtocolError, match="unverifiable"):
        DiscoveryConnection().send(announce(timestamp=1.0))


def test_response_signature_is_not_valid_as_an_announce() -> None:
    """The type is signed: a response cannot be replayed as an announce."""
    response = sign_response(KEY, addresses=ADDRS, capabilities=CAPS, timestamp=5.0)
    assert isinstance(response, DiscoveryResponse)
    as_announce = Announce(**{f.name: getattr(response, f.name) for f in dataclasses.fields(response)})
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(as_announce)


def test_node_id_is_derived_from_the_public_key() -> None:
    """node_id_from_public_key is 32 hex chars of SHA-256 and sign_announce uses it."""
    node_id = node_id_from_public_key(bytes(KEY.verify_key))
    assert len(node_id) == 32 and int(node_id, 16) >= 0
    assert announce().node_id == node_id
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        node_id_from_public_key(b"short")


def test_legacy_peer_discovery_is_refused_unless_configured() -> None:
    """The replaced system's unsigned message is a protocol error by default."""
    with pytest.raises(RemoteProtocolError, match="allow_unsigned_legacy"):
        receive_all(DiscoveryConnection(), framed(LEGACY_REQUEST))
    with pytest.raises(LocalProtocolError, match="allow_unsigned_legacy"):
        DiscoveryConnection().send(decode_discovery(json.dumps(LEGACY_REQUEST).encode(), allow_unsigned_legacy=True))


def test_legacy_peer_discovery_decodes_when_configured() -> None:
    """With allow_unsigned_legacy the exact legacy JSON decodes, extra keys tolerated."""
    obj = dict(LEGACY_REQUEST, extra="ignored", capabilities=dict(LEGACY_REQUEST["capabilities"], trust_score=0.5))
    [event] = receive_all(DiscoveryConnection(allow_unsigned_legacy=True), framed(obj))
    assert isinstance(event, LegacyPeerDiscovery)
    assert (event.sender_id, event.sender_port, event.timestamp) == ("node-7f3a", 9000, 1700000000.25)
    assert event.capabilities.battery_percent == 64 and event.capabilities.transports == ()
    assert event.capabilities.can_evolve and event.capabilities.thermal_state == "normal"


def test_legacy_bytes_we_send_are_the_legacy_format() -> None:
    """Answering a legacy peer produces the field names it knows."""
    event = decode_discovery(json.dumps(LEGACY_REQUEST).encode(), allow_unsigned_legacy=True)
    wire = DiscoveryConnection(allow_unsigned_legacy=True).send(event)
    obj = json.loads(wire[4:])
    assert set(obj) == set(LEGACY_REQUEST) and obj["protocol_version"] == PROTOCOL_VERSION
    assert sniff(wire) is Sniffed.DISCOVERY_JSON


def test_oversized_frame_is_rejected_before_allocation() -> None:
    """A length prefix over MAX_DISCOVERY_FRAME fails as soon as its four bytes arrive."""
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        receive_all(DiscoveryConnection(), struct.pack(">I", MAX_DISCOVERY_FRAME + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds MAX_DISCOVERY_FRAME"):
        decode_discovery(b" " * (MAX_DISCOVERY_FRAME + 1))


def test_the_largest_possible_event_still_fits_in_a_frame() -> None:
    """Every field at its limit, with characters JSON escapes to six bytes, stays under MAX_DISCOVERY_FRAME."""
    worst = "\x00" * 255
    caps = dataclasses.replace(CAPS, network_type=worst, device_type=worst, transports=(worst,) * 16)
    address = "a://" + "\x00" * 249 + ":1"
    request = DiscoveryRequest(node_id=worst, addresses=(address,) * 16, capabilities=caps, timestamp=-(2**53))
    body = encode_discovery(request)
    assert len(address) == 255 and 50_000 < len(body) < MAX_DISCOVERY_FRAME
    assert decode_discovery(body) == request


def test_sniffer_and_discovery_share_the_frame_bound() -> None:
    """The sniffer's discovery length bound is MAX_DISCOVERY_FRAME."""
    assert DISCOVERY_MAX_LENGTH == MAX_DISCOVERY_FRAME
    assert sniff(DiscoveryConnection().send(announce())) is Sniffed.DISCOVERY_JSON


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff{}", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (b"[" * 100_000, None),
        (b'{"type": "ANNOUNCE", "type": "ANNOUNCE"}', "duplicate"),
        (b'{"type": NaN}', "NaN"),
        (b'{"type": ["x"]}', "unknown discovery message type"),
        (b'{"type": "HELLO"}', "unknown discovery message type"),
        (b'{"type": "ANNOUNCE", "protocol_version": "2.0"}', "protocol_version"),
    ],
)
def test_malformed_bodies_are_remote_errors_with_a_reason(body: bytes, reason: str | None) -> None:
    """Each way a body can be malformed is named in the RemoteProtocolError."""
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_discovery(body)


def _request_json(**changes: Any) -> bytes:
    obj = json.loads(encode_discovery(DiscoveryRequest(node_id="n", addresses=ADDRS, capabilities=CAPS, timestamp=1)))
    for key, value in changes.items():
        if key.startswith("cap_"):
            obj["capabilities"][key[4:]] = value
        else:
            obj[key] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_request_json(extra=1), "keys"),
        (_request_json(addresses="tcp://h:1"), "addresses"),
        (_request_json(addresses=["h:1"]), "transport://host:port"),
        (_request_json(addresses=["tcp://h:99999"]), "transport://host:port"),
        (_request_json(addresses=["tcp://a b:1"]), "transport://host:port"),
        (_request_json(addresses=["betanet://h:1/a key"]), "transport://host:port"),
        (_request_json(addresses=["/ip4/1.2.3.4/udp/1"]), "not a multiaddr"),
        (_request_json(timestamp=True), "timestamp"),
        (_request_json(timestamp=10**20), "timestamp"),
        (_request_json(capabilities=[]), "JSON object"),
        (_request_json(cap_extra=1), "unknown keys"),
        (_request_json(cap_cpu_cores=None), "cpu_cores"),
        (_request_json(cap_cpu_cores=0), "cpu_cores"),
        (_request_json(cap_ram_mb=True), "ram_mb"),
        (_request_json(cap_battery_percent=101), "battery_percent"),
        (_request_json(cap_battery_percent="full"), "battery_percent"),
        (_request_json(cap_performance_tier="ultra"), "performance_tier"),
        (_request_json(cap_thermal_state="melting"), "thermal_state"),
        (_request_json(cap_evolution_capacity=1.5), "evolution_capacity"),
        (_request_json(cap_can_evolve=1), "can_evolve"),
        (_request_json(cap_transports="tcp"), "transports"),
        (_request_json(cap_transports=[""]), "transport name"),
        (_request_json(cap_device_type="\udc80"), None),
        (_request_json(node_id=""), "node_id"),
    ],
)
def test_invalid_fields_are_remote_errors_naming_the_field(body: bytes, reason: str | None) -> None:
    """A request with one bad field is rejected and the error names it."""
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_discovery(body)


def test_missing_capability_keys_are_remote_errors() -> None:
    """Capabilities without a required key are rejected."""
    obj = json.loads(_request_json())
    del obj["capabilities"]["cpu_cores"]
    with pytest.raises(RemoteProtocolError, match="missing"):
        decode_discovery(json.dumps(obj).encode())


@pytest.mark.parametrize("value", ["AB" * 32, "zz" * 32, "0" * 63, 5])
def test_keys_must_be_lower_case_hex(value: object) -> None:
    """public_key and signature accept only canonical lower-case hex."""
    obj = json.loads(encode_discovery(announce()))
    obj["public_key"] = value
    with pytest.raises(RemoteProtocolError, match="hex"):
        decode_discovery(json.dumps(obj).encode())


def test_invalid_ed25519_public_key_is_a_remote_error() -> None:
    """A public key that is not a curve point fails verification cleanly."""
    bogus = bytes.fromhex("ff" * 32)
    with pytest.raises(RemoteProtocolError):
        verify(announce(public_key=bogus, node_id=node_id_from_public_key(bogus)))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"cpu_cores": 0}, "cpu_cores"),
        ({"ram_mb": 2**41}, "ram_mb"),
        ({"battery_percent": float("nan")}, "battery_percent"),
        ({"network_type": ""}, "network_type"),
        ({"device_type": "x" * 256}, "device_type"),
        ({"available_for_evolution": None}, "available_for_evolution"),
        ({"current_evolution_load": -0.1}, "current_evolution_load"),
        ({"transports": ["tcp"]}, "transports"),
        ({"transports": ("t",) * 17}, "transports"),
        ({"node_name": ""}, "node_name"),
    ],
)
def test_invalid_capabilities_raise_local_protocol_error(changes: dict[str, Any], named: str) -> None:
    """Building bad Capabilities is our mistake, named."""
    with pytest.raises(LocalProtocolError, match=named):
        dataclasses.replace(CAPS, **changes)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"addresses": ["tcp://h:1"]}, "addresses"),
        ({"addresses": ("tcp://h:1",) * 17}, "addresses"),
        ({"capabilities": {}}, "capabilities"),
        ({"timestamp": float("inf")}, "timestamp"),
        ({"signature": b"x"}, "signature"),
        ({"public_key": "k"}, "public_key"),
    ],
)
def test_invalid_announces_raise_local_protocol_error(changes: dict[str, Any], named: str) -> None:
    """Building a bad announce is our mistake, named."""
    with pytest.raises(LocalProtocolError, match=named):
        announce(**changes)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"sender_port": 0}, "sender_port"),
        ({"sender_port": "80"}, "sender_port"),
        ({"timestamp": None}, "timestamp"),
        ({"capabilities": None}, "capabilities"),
        ({"sender_id": ""}, "sender_id"),
    ],
)
def test_invalid_legacy_messages_raise_local_protocol_error(changes: dict[str, Any], named: str) -> None:
    """Building a bad legacy message is our mistake, named."""
    fields: dict[str, Any] = {"sender_id": "s", "sender_port": 1, "timestamp": 0.0, "capabilities": CAPS}
    with pytest.raises(LocalProtocolError, match=named):
        LegacyPeerDiscovery(**(fields | changes))


def test_signing_needs_a_signing_key() -> None:
    """sign_announce refuses raw bytes in place of a SigningKey."""
    with pytest.raises(LocalProtocolError, match="SigningKey"):
        sign_announce(bytes(32), addresses=(), capabilities=CAPS, timestamp=0)  # type: ignore[arg-type]


def test_encoding_something_else_is_a_local_error() -> None:
    """Only discovery events can be encoded."""
    with pytest.raises(LocalProtocolError, match="not a discovery event"):
        encode_discovery("hello")  # type: ignore[arg-type]


def test_message_strategy_refuses_an_impossible_payload_size() -> None:
    """strategies.messages() validates its argument instead of drawing invalid messages."""
    with pytest.raises(ValueError, match="max_payload"):
        vst.messages(max_payload=-1)


def test_need_data_has_a_readable_repr() -> None:
    """NEED_DATA prints as its name."""
    assert repr(NEED_DATA) == "NEED_DATA"
