"""libp2p's wire basics: uvarints, multistream-select both ways, peer ids (spec vectors), multiaddrs.

External vectors used: the multistream-select spec's ``na`` message (``0x036e610a``), the
peer-ids spec's Ed25519 key and its text forms (``12D3KooWD3eck…``), and its example of one
hashed peer id in base58btc and in CIDv1 (``QmYyQSo1…`` = ``bafzbeie5745…``).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.framing import NEED_DATA
from villagemesh.protocols.libp2p.multistream import (
    HEADER,
    MAX_REFUSALS,
    Agreed,
    Negotiation,
    NoProtocol,
    Refused,
    message,
)
from villagemesh.protocols.libp2p.peerid import Multiaddr, PeerId, b58decode, b58encode
from villagemesh.protocols.libp2p.varint import UvarintFramer, decode_uvarint, encode_uvarint, frame

# -- uvarints ---------------------------------------------------------------------------------


@given(st.integers(0, 2**63 - 1))
def test_a_uvarint_round_trips_and_is_minimal(n: int) -> None:
    data = encode_uvarint(n)
    assert decode_uvarint(data) == (n, len(data)) and len(data) <= 9
    assert decode_uvarint(data[:-1]) is NEED_DATA


def test_uvarints_of_the_spec_and_bad_ones() -> None:
    assert encode_uvarint(1) == b"\x01" and encode_uvarint(127) == b"\x7f" and encode_uvarint(300) == b"\xac\x02"
    with pytest.raises(RemoteProtocolError, match="not minimal"):
        decode_uvarint(b"\x81\x00")
    with pytest.raises(RemoteProtocolError, match="longer than 9"):
        decode_uvarint(b"\xff" * 9)
    for bad in (-1, 2**63, True, "1"):
        with pytest.raises(LocalProtocolError, match="uvarint is an int"):
            encode_uvarint(bad)  # type: ignore[arg-type]


@given(st.binary(max_size=30))
def test_random_bytes_decode_or_raise_a_protocol_error(data: bytes) -> None:
    try:
        decode_uvarint(data)
    except ProtocolError:
        pass


def test_the_framer_refuses_an_oversized_frame_from_its_prefix_and_keeps_what_follows() -> None:
    framer = UvarintFramer(max_frame=4)
    framer.receive_data(frame(b"abc") + frame(b"d")[:1])
    assert framer.next_frame() == b"abc" and framer.next_frame() is NEED_DATA
    framer.receive_data(b"d")
    assert framer.next_frame() == b"d"
    framer.receive_data(b"rest")
    assert framer.rest() == b"rest" and framer.rest() == b""
    framer.receive_data(encode_uvarint(5))
    with pytest.raises(RemoteProtocolError, match="5 bytes is above the 4"):
        framer.next_frame()


# -- multistream-select --------------------------------------------------------------------------


def run(dialer: Negotiation, listener: Negotiation) -> list[Any]:
    """Shuttle bytes until neither side has any to send; every event, tagged by side."""
    events: list[Any] = []
    while True:
        to_listener, to_dialer = dialer.data_to_send(), listener.data_to_send()
        if not to_listener and not to_dialer:
            return events
        if to_listener:
            events += [("listener", e) for e in listener.receive_data(to_listener)]
        if to_dialer:
            events += [("dialer", e) for e in dialer.receive_data(to_dialer)]


def test_the_spec_na_message() -> None:
    assert message("na") == bytes.fromhex("036e610a")
    assert message(HEADER) == b"\x13/multistream/1.0.0\n"


def test_the_first_protocol_both_speak_is_agreed_after_refusals() -> None:
    dialer = Negotiation.dialer(["/noise", "/tls/1.0.0", "/plaintext/2.0.0"])
    listener = Negotiation.listener(["/plaintext/2.0.0", "/tls/1.0.0"])
    events = run(dialer, listener)
    assert events == [
        ("dialer", Refused("/noise")),
        ("listener", Agreed("/tls/1.0.0")),
        ("dialer", Agreed("/tls/1.0.0")),
    ]
    assert dialer.agreed == listener.agreed == "/tls/1.0.0"


def test_a_dialer_whose_every_proposal_is_refused_ends_with_no_protocol() -> None:
    dialer = Negotiation.dialer(["/a", "/b"])
    events = run(dialer, Negotiation.listener(["/c"]))
    assert [e for side, e in events if side == "dialer"] == [Refused("/a"), Refused("/b"), NoProtocol(("/a", "/b"))]
    with pytest.raises(LocalProtocolError, match="failed"):
        dialer.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="no agreement"):
        dialer.rest  # noqa: B018


@given(st.data())
def test_any_chunking_gives_the_same_events_and_no_byte_after_agreement_is_lost(data: Any) -> None:
    listener = Negotiation.listener(["/yamux/1.0.0"])
    dialer = Negotiation.dialer(["/mplex/6.7.0", "/yamux/1.0.0"])
    events = listener.receive_data(dialer.data_to_send())
    dialer.receive_data(listener.data_to_send())
    stream = dialer.data_to_send() + b"\x00\x01yamux bytes"
    got = []
    for chunk in data.draw(vst.chunkings(stream)):
        got += listener.receive_data(chunk)
    assert events == [] and got == [Agreed("/yamux/1.0.0")]
    assert listener.rest == b"\x00\x01yamux bytes"


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (message("/multistream/2.0.0"), "expected the header"),
        (message(HEADER) + message("/something-else"), "the listener said"),
        (message(HEADER) + frame(b"/noise"), "newline"),
        (message(HEADER) + frame(b"\n"), "printable"),
        (message(HEADER) + frame(b"/n oise\n"), "printable"),
        (message(HEADER) + message(HEADER), "the listener said"),
        (b"\xff" * 10, "longer than 9"),
        (encode_uvarint(5000), "above the 1024"),
    ],
)
def test_a_listener_breaking_the_rules_fails_the_dialer_with_a_remote_protocol_error(wire: bytes, match: str) -> None:
    dialer = Negotiation.dialer(["/noise"])
    with pytest.raises(RemoteProtocolError, match=match):
        dialer.receive_data(wire)
    with pytest.raises(LocalProtocolError, match="failed"):
        dialer.receive_data(b"")


def test_a_listener_answers_ls_and_unknown_protocols_with_na_then_gives_up_on_a_guesser() -> None:
    listener = Negotiation.listener(["/noise"])
    assert listener.receive_data(message(HEADER) + message("ls") + message("/x")) == []
    assert listener.data_to_send() == message(HEADER) + message("na") * 2
    with pytest.raises(RemoteProtocolError, match=f"more than {MAX_REFUSALS}"):
        listener.receive_data(b"".join(message(f"/guess/{n}") for n in range(MAX_REFUSALS)))


def test_a_step_missing_from_the_transition_table_is_refused() -> None:
    """The rule behind the table: a (state, input) pair it does not list fails the negotiation."""
    dialer = Negotiation.dialer(["/noise"])
    dialer._table = {}  # every pair missing
    with pytest.raises(RemoteProtocolError, match="is not expected await header"):
        dialer.receive_data(message(HEADER))


def test_a_listener_refuses_a_header_repeated_as_a_proposal_politely() -> None:
    listener = Negotiation.listener(["/noise"])
    listener.receive_data(message(HEADER) + message(HEADER))
    assert listener.data_to_send().endswith(message("na"))


@pytest.mark.parametrize(
    ("protocols", "match"), [([], "at least one"), (["/" + "x" * 2000], "at most 1024")]
)
def test_a_negotiation_of_unusable_protocols_is_refused_when_made(protocols: list[str], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        Negotiation.dialer(protocols)


@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_a_protocol_error(data: bytes) -> None:
    for side in (Negotiation.dialer(["/noise"]), Negotiation.listener(["/noise"])):
        try:
            side.receive_data(data)
        except ProtocolError:
            pass


# -- peer ids ------------------------------------------------------------------------------------

SPEC_ED25519_PUBLIC_PROTO = bytes.fromhex("080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
SPEC_ID = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
SPEC_HASHED = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
SPEC_HASHED_CID = "bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe"


def test_the_spec_vectors() -> None:
    ed = PeerId.from_ed25519(SPEC_ED25519_PUBLIC_PROTO[4:])
    assert ed.multihash == b"\x00\x24" + SPEC_ED25519_PUBLIC_PROTO
    assert ed.ed25519_public_key() == SPEC_ED25519_PUBLIC_PROTO[4:]
    assert str(PeerId.from_text(SPEC_ID)) == SPEC_ID and PeerId.from_text(SPEC_ID).ed25519_public_key() is not None
    hashed = PeerId.from_text(SPEC_HASHED)
    assert PeerId.from_text(SPEC_HASHED_CID) == hashed and hashed.to_cid() == SPEC_HASHED_CID
    assert hashed.ed25519_public_key() is None and hashed.multihash[:2] == b"\x12\x20"


@given(vst.libp2p_peer_ids())
def test_a_peer_id_round_trips_through_both_text_forms(peer: PeerId) -> None:
    assert PeerId.from_text(peer.to_base58()) == peer == PeerId.from_text(peer.to_cid())


@given(st.binary(max_size=60))
def test_base58_round_trips_leading_zeros_included(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("12D3KooW0", "not a base58btc"),
        ("1" * 300, "longer than"),
        ("", "expected text"),
        ("b!!!", "not base32"),
        ("b" + "a" * 300, "longer than"),
        ("bafkqaaa", "libp2p-key"),
        ("2", "at least 2 bytes"),
        (b58encode(b"\x00\x05abc"), "identity"),
        (b58encode(b"\x13\x20" + bytes(32)), "sha256"),
    ],
)
def test_a_malformed_peer_id_is_a_remote_protocol_error_naming_it(text: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        PeerId.from_text(text)


def test_a_peer_id_from_a_wrong_ed25519_key_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        PeerId.from_ed25519(b"short")
    assert PeerId.from_public_key_proto(bytes(50)).multihash[:2] == b"\x12\x20"
    assert PeerId(b"\x00\x02\x08\x02").ed25519_public_key() is None


# -- multiaddrs ----------------------------------------------------------------------------------


@given(vst.libp2p_multiaddrs())
def test_a_multiaddr_round_trips_through_text_and_bytes(addr: Multiaddr) -> None:
    assert Multiaddr.parse(str(addr)) == addr == Multiaddr.from_bytes(addr.to_bytes())


def test_a_dialable_multiaddr_names_its_host_port_and_peer() -> None:
    addr = Multiaddr.parse(f"/ip4/10.0.0.1/tcp/4001/p2p/{SPEC_ID}")
    assert (addr.value("ip4"), addr.value("tcp"), str(addr.peer_id())) == ("10.0.0.1", "4001", SPEC_ID)
    assert addr.to_bytes()[:7].hex() == "040a000001060fa1"[:14]
    local = Multiaddr.parse("/ip6/::1/tcp/1")
    assert local.peer_id() is None and local.value("ip4") is None
    cid = Multiaddr.parse(f"/ip4/1.2.3.4/tcp/1/p2p/{SPEC_HASHED_CID}")
    assert cid.value("p2p") == SPEC_HASHED  # kept canonical


def test_a_parsed_text_is_remembered_and_a_refused_one_refused_every_time() -> None:
    """Parsing is memoised by text (a multiaddr is immutable); a text that fails is not remembered."""
    text = f"/ip4/10.9.9.9/tcp/4001/p2p/{SPEC_ID}"
    first = Multiaddr.parse(text)
    assert Multiaddr.parse(text) is first
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="not an ip4 address"):
            Multiaddr.parse("/ip4/10.9.9.999/tcp/4001")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("ip4/1.2.3.4", "is not '/proto"),
        ("/ip4/1.2.3.4/tcp", "without its value"),
        ("/ip4/1.2.3.999", "not an ip4"),
        ("/ip6/nope", "not an ip6"),
        ("/ip4/1.2.3.4/tcp/65536", "tcp port"),
        ("/ip4/1.2.3.4/tcp/01", "tcp port"),
        ("/udp/1", "not one of"),
        ("/", "without its value"),
    ],
)
def test_a_malformed_multiaddr_text_is_refused_naming_it(text: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        Multiaddr.parse(text)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x04\x01\x02", "needs 4 bytes"),
        (b"\x11\x00", "code 17"),
        (b"\x80", "cut inside a protocol code"),
        (b"\xa5\x03", "cut inside a p2p length"),
        (b"\xa5\x03\x05ab", "needs 5 bytes"),
    ],
)
def test_malformed_multiaddr_bytes_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        Multiaddr.from_bytes(data)


def test_an_empty_multiaddr_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="no parts"):
        Multiaddr(())


@given(st.binary(max_size=80))
def test_random_multiaddr_bytes_only_ever_raise_a_protocol_error(data: bytes) -> None:
    try:
        Multiaddr.from_bytes(data)
    except ProtocolError:
        pass
