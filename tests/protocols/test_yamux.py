"""yamux sessions, sans-I/O: streams both ways, flow control, pings, FIN/RST/GO_AWAY, bad frames.

No published byte vectors exist for yamux (the research notes say so); the frame layout
is checked against the spec's header (``>BBHII``) and the behaviour against the spec's
rules, and a real py-libp2p peer is the cross-check once the transport exists.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.protocols.shuttle import pump
from villagemesh.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from villagemesh.protocols import strategies as vst
from villagemesh.protocols.libp2p.yamux import (
    INITIAL_WINDOW,
    MAX_STREAMS,
    MAX_WINDOW,
    Data,
    Flag,
    GoAway,
    Pong,
    Session,
    StreamClosed,
    StreamOpened,
    StreamRefused,
    StreamReset,
    Type,
    encode_frame,
)


def pair() -> tuple[Session, Session]:
    return Session(client=True), Session(client=False)


def test_the_header_is_the_specs() -> None:
    assert encode_frame(Type.WINDOW_UPDATE, Flag.SYN, 1, 0) == bytes.fromhex("000100010000000100000000")


def test_a_stream_carries_data_both_ways_and_closes_from_both_ends() -> None:
    client, server = pair()
    sid = client.open_stream()
    assert sid == 1 and client.open_stream() == 3
    client.send(sid, b"hello")
    client.close(sid)
    _, at_server = pump(client, server)
    assert at_server == [StreamOpened(1), StreamOpened(3), Data(1, b"hello"), StreamClosed(1)]
    server.send(sid, b"world")
    server.close(sid)
    at_client, _ = pump(client, server)
    assert at_client == [Data(1, b"world"), StreamClosed(1)]
    assert client.open_streams() == [3] and server.open_streams() == [3]
    assert [client.is_open(s) for s in (1, 3)] == [False, True] and server.is_open(3)


def test_a_sender_never_exceeds_the_credit_and_the_rest_goes_as_it_is_granted() -> None:
    client, server = pair()
    sid = client.open_stream()
    client.send(sid, b"x" * (INITIAL_WINDOW + 1000))
    _, got = pump(client, server)
    assert sum(len(e.data) for e in got if isinstance(e, Data)) == INITIAL_WINDOW
    server.consumed(sid, 600)
    _, more = pump(client, server)
    assert sum(len(e.data) for e in more if isinstance(e, Data)) == 600
    server.consumed(sid, INITIAL_WINDOW)
    _, rest = pump(client, server)
    assert sum(len(e.data) for e in rest if isinstance(e, Data)) == 400
    with pytest.raises(LocalProtocolError, match="were given"):
        server.consumed(sid, 10**9)
    server.consumed(99, 1)  # a stream gone: nothing to grant, no error


def test_data_beyond_the_granted_credit_is_a_protocol_error() -> None:
    client, server = pair()
    sid = client.open_stream()
    server.receive_data(client.data_to_send())
    flood = encode_frame(Type.DATA, Flag.NONE, sid, INITIAL_WINDOW + 1)
    with pytest.raises(RemoteProtocolError, match="exceed the credit"):
        server.receive_data(flood)


def test_a_data_frame_for_no_open_stream_may_not_announce_more_than_a_window() -> None:
    """A header claiming gigabytes for a stream not open is refused at once, not buffered towards."""
    server = Session(client=False)
    with pytest.raises(RemoteProtocolError, match="exceed the credit"):
        server.receive_data(encode_frame(Type.DATA, Flag.SYN, 1, 2**32 - 1))


def test_queued_counts_what_waits_for_credit() -> None:
    client = Session(client=True)
    sid = client.open_stream()
    client.send(sid, b"z" * (INITIAL_WINDOW + 5))
    assert client.queued(sid) == 5 and client.queued(99) == 0


def test_a_ping_is_answered_with_its_opaque_value() -> None:
    client, server = pair()
    client.ping(0xDEADBEEF)
    at_client, at_server = pump(client, server)
    assert at_client == [Pong(0xDEADBEEF)] and at_server == []


def test_a_reset_stream_is_gone_on_both_sides_and_a_late_reset_is_harmless() -> None:
    client, server = pair()
    sid = client.open_stream()
    pump(client, server)
    client.reset(sid)
    _, at_server = pump(client, server)
    assert at_server == [StreamReset(sid)] and server.open_streams() == [] and client.open_streams() == []
    assert server.receive_data(encode_frame(Type.WINDOW_UPDATE, Flag.RST, sid, 0)) == []
    with pytest.raises(LocalProtocolError, match="not open"):
        client.reset(sid)


def test_frames_in_flight_for_a_stream_already_gone_are_discarded_not_fatal() -> None:
    """We reset the peer's stream 2 while its data was on the way: that data is dropped and counted."""
    client, server = pair()
    server_stream = server.open_stream()
    client.receive_data(server.data_to_send())
    client.reset(server_stream)
    assert client.receive_data(encode_frame(Type.DATA, Flag.NONE, server_stream, 3, b"abc")) == []
    assert client.discarded == 3
    ours = client.open_stream()
    client.reset(ours)
    assert client.receive_data(encode_frame(Type.WINDOW_UPDATE, Flag.ACK, ours, 0)) == []
    with pytest.raises(RemoteProtocolError, match="not its to open"):
        client.receive_data(encode_frame(Type.WINDOW_UPDATE, Flag.SYN, server_stream, 0))  # ids only grow


def test_go_away_stops_new_streams_on_both_sides() -> None:
    client, server = pair()
    server.go_away(2)
    at_client, _ = pump(client, server)
    assert at_client == [GoAway(2)]
    with pytest.raises(LocalProtocolError, match="going away"):
        client.open_stream()
    assert server.receive_data(encode_frame(Type.WINDOW_UPDATE, Flag.SYN, 5, 0)) == [StreamRefused(5)]  # RST back
    assert server.data_to_send() == encode_frame(Type.WINDOW_UPDATE, Flag.RST, 5, 0)


def test_a_peer_opening_too_many_streams_gets_resets() -> None:
    client, server = pair()
    for _ in range(MAX_STREAMS):
        client.open_stream()
    with pytest.raises(LocalProtocolError, match=f"{MAX_STREAMS} streams"):
        client.open_stream()
    pump(client, server)
    extra = encode_frame(Type.DATA, Flag.SYN, 2 * MAX_STREAMS + 1, 3, b"abc")
    assert server.receive_data(extra) == [StreamRefused(2 * MAX_STREAMS + 1)]
    assert server.data_to_send() == encode_frame(Type.WINDOW_UPDATE, Flag.RST, 2 * MAX_STREAMS + 1, 0)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (bytes([1]) + bytes(11), "version 1"),
        (encode_frame(Type.DATA, Flag.NONE, 0, 0)[:1] + bytes([9]) + bytes(10), "frame type 9"),
        (encode_frame(Type.DATA, Flag.NONE, 0, 0), "on stream 0"),
        (encode_frame(Type.DATA, Flag.NONE, 7, 1, b"x"), "never existed"),
        (encode_frame(Type.WINDOW_UPDATE, Flag.SYN, 2, 0), "not its to open"),
    ],
)
def test_a_peer_breaking_the_rules_is_a_remote_protocol_error(frame: bytes, match: str) -> None:
    _, server = pair()
    with pytest.raises(RemoteProtocolError, match=match):
        server.receive_data(frame)


def test_a_stream_opened_twice_or_data_after_its_fin_is_refused() -> None:
    client, server = pair()
    sid = client.open_stream()
    client.close(sid)
    pump(client, server)
    with pytest.raises(RemoteProtocolError, match="data from the peer on stream 1, which is closed by the peer"):
        server.receive_data(encode_frame(Type.DATA, Flag.NONE, sid, 1, b"x"))
    _, again = pair()
    again.receive_data(encode_frame(Type.WINDOW_UPDATE, Flag.SYN, 1, 0))
    with pytest.raises(RemoteProtocolError, match="not its to open"):
        again.receive_data(encode_frame(Type.WINDOW_UPDATE, Flag.SYN, 1, 0))


def test_our_own_misuse_is_a_local_protocol_error() -> None:
    client, server = pair()
    with pytest.raises(LocalProtocolError, match="not open"):
        client.send(9, b"x")
    sid = client.open_stream()
    client.close(sid)
    with pytest.raises(LocalProtocolError, match="our data on stream 1, which is closed by us"):
        client.send(sid, b"after our FIN")
    with pytest.raises(LocalProtocolError, match="our FIN on stream 1, which is closed by us"):
        client.close(sid)
    pump(client, server)
    server.send(sid, b"the peer may still send")
    server.close(sid)
    pump(client, server)
    assert client.open_streams() == [] and server.open_streams() == []


def test_a_fin_waits_behind_queued_data_until_credit_lets_it_out() -> None:
    client, server = pair()
    sid = client.open_stream()
    client.send(sid, b"y" * (INITIAL_WINDOW + 10))
    client.close(sid)
    with pytest.raises(LocalProtocolError, match="not open"):
        client.send(sid, b"after close() was asked")
    _, first = pump(client, server)
    assert StreamClosed(sid) not in first
    server.consumed(sid, INITIAL_WINDOW)
    _, second = pump(client, server)
    assert second == [Data(sid, b"y" * 10), StreamClosed(sid)]


@given(st.lists(st.binary(max_size=3000), max_size=6), st.data())
@settings(max_examples=40)
def test_any_chunking_gives_the_same_events(chunks_sent: list[bytes], data: Any) -> None:
    client = Session(client=True)
    sid = client.open_stream()
    for chunk in chunks_sent:
        client.send(sid, chunk)
    client.close(sid)
    wire = client.data_to_send()
    whole = Session(client=False).receive_data(wire)
    server, split = Session(client=False), []
    for piece in data.draw(vst.chunkings(wire)):
        split += server.receive_data(piece)
    assert split == whole
    assert b"".join(e.data for e in whole if isinstance(e, Data)) == b"".join(chunks_sent)


@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_a_protocol_error(data: bytes) -> None:
    try:
        Session(client=False).receive_data(data)
    except ProtocolError:
        pass


def test_a_larger_window_is_granted_with_the_syn_and_the_ack() -> None:
    big = 4 * INITIAL_WINDOW
    client, server = Session(client=True, window=big), Session(client=False, window=big)
    sid = client.open_stream()
    client.send(sid, b"a" * big)
    _, at_server = pump(client, server)  # the server's ACK granted the extra credit: all of it went
    assert sum(len(e.data) for e in at_server if isinstance(e, Data)) == big
    server.send(sid, b"b" * big)
    at_client, _ = pump(client, server)  # and the client's SYN did the same the other way
    assert sum(len(e.data) for e in at_client if isinstance(e, Data)) == big
    with pytest.raises(LocalProtocolError, match="receive window"):
        Session(client=True, window=MAX_WINDOW + 1)


def test_frames_go_out_one_by_one_each_at_most_frame_data_long_taken_across_writes() -> None:
    client, server = Session(client=True, frame_data=100), Session(client=False)
    sid = client.open_stream()
    client.send(sid, b"a" * 150)
    client.send(sid, b"")  # nothing to send: no frame
    client.send(sid, memoryview(b"b" * 70))
    frames = client.frames_to_send()
    assert [len(f) for f in frames] == [12, 12 + 100, 12 + 50, 12 + 70]  # each write as it came
    assert client.frames_to_send() == []
    events = server.receive_data(b"".join(frames))
    client.send(sid, b"c" * (INITIAL_WINDOW - 220 - 30))  # all but 30 bytes of the credit
    client.send(sid, b"d" * 120)
    client.send(sid, b"e" * 60)  # these wait for credit ...
    events += server.receive_data(client.data_to_send())
    server.consumed(sid, INITIAL_WINDOW)
    client.receive_data(server.data_to_send())
    queued = client.frames_to_send()
    assert [len(f) for f in queued] == [12 + 100, 12 + 50]  # ... and go as full frames across them
    events += server.receive_data(b"".join(queued))
    sent = b"a" * 150 + b"b" * 70 + b"c" * (INITIAL_WINDOW - 250) + b"d" * 120 + b"e" * 60
    assert b"".join(e.data for e in events if isinstance(e, Data)) == sent
    with pytest.raises(LocalProtocolError, match="at least 1 byte"):
        Session(client=True, frame_data=0)


def test_an_empty_data_frame_with_fin_only_closes() -> None:
    client, server = pair()
    sid = client.open_stream()
    pump(client, server)
    assert server.receive_data(encode_frame(Type.DATA, Flag.FIN, sid, 0)) == [StreamClosed(sid)]
