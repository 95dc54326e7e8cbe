"""The Node API an orchestrator embeds: configuration, lifecycle, send/subscribe, asyncio, the CLI."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import WAIT
from villagemesh import DeliveryState, NetworkMode, create_network, message_id_for
from villagemesh.errors import ConfigError, DeliveryFailed
from villagemesh.node import NodeConfig, _priority, local_capabilities
from villagemesh.protocols.envelope import Priority

pytestmark = pytest.mark.slow


def make(tmp_path: Path, name: str, **settings):
    return create_network("hybrid", name=name, data_dir=tmp_path / name, lan=False, **settings)


@pytest.fixture
def pair(tmp_path):
    a = make(tmp_path, "a", discovery_interval=0.3, ack_timeout=2.0).start()
    b = make(tmp_path, "b", discovery_interval=0.3, ack_timeout=2.0, bootstrap=(a.acceptor_address,)).start()
    try:
        assert b.wait_for_peers(1, WAIT)
        yield a, b
    finally:
        b.stop()
        a.stop()


def test_create_network_validates_its_settings_naming_the_value(tmp_path):
    """Unknown modes, settings, ports and bootstrap entries are refused up front."""
    with pytest.raises(ConfigError, match="'ring'"):
        create_network("ring", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="data_dir"):
        create_network("mesh")
    with pytest.raises(ConfigError, match="colour"):
        create_network("mesh", data_dir=tmp_path, colour="red")
    with pytest.raises(ConfigError, match="70000"):
        NodeConfig(data_dir=tmp_path, port=70000)
    with pytest.raises(ConfigError, match="'nohost'"):
        NodeConfig(data_dir=tmp_path, bootstrap=("nohost",))
    with pytest.raises(ConfigError, match="discovery_interval"):
        NodeConfig(data_dir=tmp_path, discovery_interval=0)
    assert NodeConfig(data_dir=tmp_path, mode="MESH").mode is NetworkMode.MESH


def test_priorities_are_accepted_as_enum_name_or_number():
    """'high', Priority.HIGH and 1 mean the same; anything else names the allowed values."""
    assert _priority("high") is _priority(Priority.HIGH) is _priority(1) is Priority.HIGH
    with pytest.raises(ConfigError, match="critical, high"):
        _priority("urgent")
    with pytest.raises(ConfigError):
        _priority(True)


def test_local_capabilities_follow_the_seed_tiers():
    """The machine's capabilities are measured and classified; transports are listed."""
    caps = local_capabilities(("websocket",))
    assert caps.cpu_cores == os.cpu_count() and caps.ram_mb > 0
    assert caps.performance_tier in ("low", "medium", "high", "premium") and caps.transports == ("websocket",)


def test_two_nodes_discover_each_other_and_deliver_exactly_once_with_handles(pair):
    """b finds a through bootstrap; a's subscriber gets the message once; the handle ends delivered."""
    a, b = pair
    got = []
    unsubscribe = a.subscribe("DATA", got.append)
    status = b.send(a.node_id, b"hello", priority="high").result(WAIT)
    assert status.delivered and status.attempts >= 1
    deadline = threading.Event()
    for _ in range(100):
        if got:
            break
        deadline.wait(0.05)
    assert [m.payload for m in got] == [b"hello"] and got[0].sender == b.node_id
    assert got[0].priority is Priority.HIGH
    unsubscribe()
    peers = {p.peer_id: p for p in b.peers()}
    assert a.node_id in peers and peers[a.node_id].capabilities is not None
    status_b = b.network_status()
    assert status_b["transport_priority"] == ["libp2p", "bitchat", "betanet", "websocket"]
    assert {c["id"] for c in status_b["actors"]} >= {"registry", "retrier", "acceptor", "transports", "sweeper"}


def test_a_message_to_an_unknown_peer_fails_with_its_attempts_after_its_ttl(pair):
    """Nobody has that id: the retrier parks it, and at the TTL the handle fails with DeliveryFailed."""
    _, b = pair
    handle = b.send("f" * 32, b"lost", ttl=0.5)
    with pytest.raises(DeliveryFailed) as info:
        handle.result(WAIT)
    assert "ttl" in info.value.last_error.lower()


def test_node_id_peers_and_pending_messages_survive_a_restart(tmp_path):
    """A node restarted on its data dir has the same id and still knows its peers."""
    a = make(tmp_path, "a").start()
    b = make(tmp_path, "b", bootstrap=(a.acceptor_address,), discovery_interval=0.3).start()
    assert b.wait_for_peers(1, WAIT)
    b_id = b.node_id
    b.stop()
    b2 = make(tmp_path, "b").start()
    try:
        assert b2.node_id == b_id
        assert [p.peer_id for p in b2.peers()] == [a.node_id]
    finally:
        b2.stop()
        a.stop()


def test_a_started_node_freezes_the_collectors_start_up_objects_unless_told_not_to(tmp_path):
    """freeze_gc (default True) moves what start-up left alive out of full collections, and says so in the log."""
    gc.unfreeze()
    a = make(tmp_path, "a").start()
    try:
        frozen = [json.loads(line) for line in a.log_path.read_text().splitlines() if '"gc_frozen"' in line]
        assert len(frozen) == 1 and frozen[0]["objects"] > 0 and gc.get_freeze_count() > 0
    finally:
        a.stop()
    gc.unfreeze()
    b = make(tmp_path, "b", freeze_gc=False).start()
    try:
        assert gc.get_freeze_count() == 0 and '"gc_frozen"' not in b.log_path.read_text()
    finally:
        b.stop()
    with pytest.raises(ConfigError, match=r"freeze_gc.*'yes'"):
        NodeConfig(data_dir=tmp_path, freeze_gc="yes")


def test_one_data_dir_serves_one_running_node(tmp_path):
    """A second node on a running node's data dir is refused: they would share one outbox."""
    a = make(tmp_path, "a").start()
    try:
        with pytest.raises(ConfigError, match="in use"):
            make(tmp_path, "a").start()
    finally:
        a.stop()
    make(tmp_path, "a").start().stop()  # free again once stopped


def test_the_api_works_from_asyncio(tmp_path):
    """async with, asend, apeers, awaiting a handle and an async subscriber, all on one loop."""

    async def main() -> bytes:
        async with make(tmp_path, "a", discovery_interval=0.3) as a:
            async with make(tmp_path, "b", discovery_interval=0.3, bootstrap=(a.acceptor_address,)) as b:
                got: asyncio.Queue[bytes] = asyncio.Queue()

                async def on_data(message):
                    await got.put(message.payload)

                a.subscribe("DATA", on_data)
                for _ in range(200):
                    if await b.apeers():
                        break
                    await asyncio.sleep(0.05)
                handle = await b.asend(a.node_id, b"async hello")
                status = await asyncio.wait_for(handle, WAIT)
                assert status.delivered
                return await asyncio.wait_for(got.get(), WAIT)

    assert asyncio.run(main()) == b"async hello"


class Collect:
    """A subscriber that counts payloads and sets an event at a target count."""

    def __init__(self, target: int) -> None:
        self.payloads: list[bytes] = []
        self.target = target
        self.done = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, message) -> None:
        with self.lock:
            self.payloads.append(message.payload)
            if len(self.payloads) >= self.target:
                self.done.set()


def test_send_many_stores_every_message_in_one_call_and_each_handle_ends_delivered(pair):
    """send_many: 300 messages in one call (one commit per chunk); each is handled once; an invalid
    message is refused before anything is stored."""
    a, b = pair
    inbox = Collect(300)
    a.subscribe("DATA", inbox)
    handles = b.send_many([(a.node_id, b"m%d" % i) for i in range(300)])
    assert len(handles) == 300 and all(h.result(WAIT).delivered for h in handles)
    assert inbox.done.wait(WAIT) and sorted(inbox.payloads) == sorted(b"m%d" % i for i in range(300))
    with pytest.raises(ConfigError, match="kind"):
        b.send_many([(a.node_id, b"x")], kind="")


def test_send_many_checks_every_message_before_sending_any_and_makes_them_as_send_would(tmp_path):
    """A bad peer anywhere in the batch (malformed, unhashable, this node's own id) is refused by name
    before anything is sent; the messages it makes are what ``envelope`` makes, each with its own id."""
    node = make(tmp_path, "solo")  # not started: every check comes before the retrier is asked
    peer = "ab" * 16
    for bad, match in (("nothex", "nothex"), (["a", "list"], "list"), (node.node_id, "own id")):
        with pytest.raises(ConfigError, match=match):
            node.send_many([(peer, b"ok"), (bad, b"x"), (peer, b"ok")])
    with pytest.raises(ConfigError, match="ttl"):
        node.send_many([(peer, b"x")], ttl=0)
    key = message_id_for("k")
    built = node._envelopes(
        [(peer, b"a"), (peer, b"b"), (peer, b"c")],
        kind="DATA",
        priority=2,
        ttl=5.0,
        correlation_id=None,
        ids=[None, key, None],
    )
    alone = node.envelope(peer, b"a", ttl=5.0)
    assert built[1].id == bytes.fromhex(key) and len({m.id for m in built}) == 3
    assert [(m.payload, m.recipient, m.sender, m.kind, m.priority, m.ttl) for m in built] == [
        (p, peer, node.node_id, "DATA", Priority.NORMAL, 5.0) for p in (b"a", b"b", b"c")
    ]
    assert (alone.recipient, alone.kind, alone.ttl, len(alone.id)) == (peer, "DATA", 5.0, 16)


def test_a_send_again_with_the_same_message_id_stores_and_handles_it_once(tmp_path):
    """The idempotent resend: while the first copy is pending, the same id returns its handle and stores
    nothing; once it was handled, a copy is dropped by the recipient (its handle ends UNCONFIRMED)."""
    a = make(tmp_path, "a", discovery_interval=0.3, outcome_timeout=1.0).start()
    b = make(tmp_path, "b", discovery_interval=0.3, outcome_timeout=1.0, bootstrap=(a.acceptor_address,)).start()
    try:
        assert b.wait_for_peers(1, WAIT)
        inbox = Collect(1)
        a.subscribe("DATA", inbox)
        absent, key = "f" * 32, message_id_for("job-7:absent:0")
        first = b.send(absent, b"parked", message_id=key)
        assert b.send(absent, b"parked", message_id=key) is first and first.message_id == key
        assert b.network_status()["outbox"]["messages"] == 1
        mid = message_id_for("job-7:a:0")
        assert b.send(a.node_id, b"once", message_id=mid).result(WAIT).delivered
        copy = b.send(a.node_id, b"once", message_id=mid)
        assert copy.wait(WAIT).state is DeliveryState.UNCONFIRMED and copy.status.acked
        ids = [message_id_for(f"job-7:a:{i}") for i in range(1, 4)]
        handles = b.send_many([(a.node_id, b"m%d" % i) for i in range(1, 4)], message_ids=ids)
        assert [h.message_id for h in handles] == ids and all(h.result(WAIT).delivered for h in handles)
        b.send_many([(a.node_id, b"m%d" % i) for i in range(1, 4)], message_ids=ids)
        time.sleep(1.0)  # room for a wrong second delivery to show
        assert sorted(inbox.payloads) == [b"m1", b"m2", b"m3", b"once"]
        with pytest.raises(ConfigError, match="message_id must be 32 hex characters"):
            b.send(a.node_id, b"x", message_id="nothex" * 6)
        with pytest.raises(ConfigError, match="2 message_ids given for 1 messages"):
            b.send_many([(a.node_id, b"x")], message_ids=ids[:2])
        with pytest.raises(ConfigError, match="non-empty"):
            message_id_for("")
        assert message_id_for("k") == message_id_for(b"k") != message_id_for("k2")
    finally:
        b.stop()
        a.stop()


def test_a_retrier_that_crashes_during_a_send_is_asked_again_and_stores_each_message_once(pair, monkeypatch):
    """The ask's outcome is unknown when the retrier crashes during it: send and send_many hand the same
    envelopes over again, so a crash after the commit (simulated: the reply lost) doubles nothing; and real
    crashes of the retrier every 30 ms during a stream of sends lose and double nothing either."""
    import villagemesh.actors.retrier.actor as retrier_actor
    from villagemesh.errors import ActorCrashed

    a, b = pair
    inbox = Collect(10_000)
    a.subscribe("DATA", inbox)
    real = retrier_actor.send_envelopes
    calls = []

    def committed_then_crashed(client, envelopes, **kwargs):
        calls.append(len(envelopes))
        reply = real(client, envelopes, **kwargs)
        if len(calls) == 1:
            raise ActorCrashed("retrier", "InjectedCrash", "after its commit (simulated)")
        return reply

    monkeypatch.setattr(retrier_actor, "send_envelopes", committed_then_crashed)
    handles = b.send_many([(a.node_id, b"c%d" % i) for i in range(20)])
    assert calls == [20, 20] and b.hand_overs_retried == 1
    assert all(h.result(WAIT).delivered for h in handles)
    monkeypatch.setattr(retrier_actor, "send_envelopes", real)

    stop = threading.Event()

    def crash_retrier():  # six crashes: under its supervisor's restart intensity (10 in 10 s), however slow the run
        for _ in range(6):
            if stop.wait(0.03):
                return
            b.crash("retrier")

    crasher = threading.Thread(target=crash_retrier)
    crasher.start()
    try:
        sent = []
        for batch in range(40):
            payloads = [b"r%d.%d" % (batch, i) for i in range(5)]
            b.send_many([(a.node_id, p) for p in payloads])
            sent.extend(payloads)
            sent.append(b"s%d" % batch)
            b.send(a.node_id, sent[-1])
    finally:
        stop.set()
        crasher.join()
    expected = sorted(sent + [b"c%d" % i for i in range(20)])
    deadline = time.monotonic() + 3 * WAIT
    while len(inbox.payloads) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # room for a wrong second delivery to show
    assert sorted(inbox.payloads) == expected


def test_gathered_asends_reach_the_retrier_together_from_one_thread(pair):
    """200 asend calls awaited at once: all delivered, every hand-over made from the loop's one thread."""
    a, b = pair
    inbox = Collect(200)
    a.subscribe("DATA", inbox)
    callers: set[str] = set()
    original = b._client

    def spy():
        callers.add(threading.current_thread().name)
        return original()

    b._client = spy

    async def main():
        handles = await asyncio.gather(*(b.asend(a.node_id, b"g%d" % i) for i in range(200)))
        return await asyncio.wait_for(asyncio.gather(*handles), WAIT)

    statuses = asyncio.run(main())
    assert all(s.delivered for s in statuses) and inbox.done.wait(WAIT)
    assert callers == {threading.current_thread().name}


def test_full_durability_is_a_setting_and_delivers_the_same(tmp_path):
    """synchronous=FULL (an fsync per commit) is accepted and delivers; anything else is refused by name."""
    with pytest.raises(ConfigError, match="synchronous"):
        make(tmp_path, "x", synchronous="OFF")
    a = make(tmp_path, "a", discovery_interval=0.3, synchronous="FULL")
    a.subscribe("DATA", lambda message: None)
    a.start()
    b = make(tmp_path, "b", discovery_interval=0.3, synchronous="FULL", bootstrap=(a.acceptor_address,)).start()
    try:
        assert b.wait_for_peers(1, WAIT)
        assert all(h.result(WAIT).delivered for h in b.send_many([(a.node_id, b"durable")] * 3))
    finally:
        b.stop()
        a.stop()


def test_crashing_the_websocket_transport_restarts_it_alone(pair):
    """Fault injection through the API: only the transport restarts; the node keeps delivering."""
    a, b = pair
    a.subscribe("DATA", lambda message: None)
    b.crash("websocket")
    assert b.send(a.node_id, b"after the crash").result(WAIT).delivered
    events = [json.loads(line) for line in b.log_path.read_text().splitlines()]
    crashed = [e["child_id"] for e in events if e["event"] == "child_crashed"]
    assert crashed == ["websocket"]


def test_the_cli_runs_a_node_lists_its_peers_and_sends_through_it(tmp_path):
    """`villagemesh node` prints LISTEN; `villagemesh send` reaches it; `villagemesh peers` lists the sender."""
    cli = [sys.executable, "-m", "villagemesh.cli"]
    node = subprocess.Popen(
        [*cli, "node", "--data-dir", str(tmp_path / "server"), "--quiet"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = node.stdout.readline().split()
        assert line[0] == "LISTEN"
        node_id, address = line[1], line[2]
        sent = subprocess.run(
            [*cli, "send", "--to", node_id, "--via", address, "--data-dir", str(tmp_path / "client"), "hi there"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert "delivered" in sent.stdout
        listed = subprocess.run(
            [*cli, "peers", "--data-dir", str(tmp_path / "client")], capture_output=True, text=True, timeout=60
        )
        assert node_id in listed.stdout
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(WAIT) == 0
