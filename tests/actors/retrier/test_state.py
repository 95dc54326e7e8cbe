"""RetrierState: the outbox's pure decision logic, driven by events, checked by a model."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from villagemesh.actors.retrier.modes import NetworkMode
from villagemesh.actors.retrier.policy import RetryPolicy
from villagemesh.actors.retrier.state import (
    AckReceived,
    AttemptResult,
    Backoff,
    Decision,
    Delivered,
    Enqueue,
    Failed,
    FailReason,
    FairQueue,
    NextWakeup,
    Phase,
    RetrierState,
    Routes,
    Send,
    Tick,
    TransportLost,
    jitter_rand,
    max_picks_before,
)
from villagemesh.errors import ConfigError
from villagemesh.protocols.envelope import Priority

ALL = ("libp2p", "bitchat", "betanet", "websocket")


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def of(kind: type, decisions: list[Decision]) -> list:
    return [d for d in decisions if isinstance(d, kind)]


def fresh(**kwargs: object) -> RetrierState:
    state = RetrierState(**kwargs)  # type: ignore[arg-type]
    state.step(Routes("bob", ALL, now=0.0))
    return state


# --- scenarios --------------------------------------------------------------------------------


def test_enqueued_message_is_sent_at_once_on_the_modes_first_transport() -> None:
    """hybrid: libp2p first; the decision names the attempt and its ack deadline."""
    state = fresh(ack_timeout=10.0)
    out = state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=5.0))
    assert of(Send, out) == [Send(mid(1), "bob", "libp2p", 1, 15.0)]
    assert of(NextWakeup, out) == [NextWakeup(15.0)]


def test_ack_delivers_and_forgets_the_message() -> None:
    """An end-to-end ack → Delivered once; a second ack is ignored."""
    state = fresh()
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    assert state.step(AckReceived(mid(1), now=1.0)) == [Delivered(mid(1), 1, "libp2p")]
    assert state.step(AckReceived(mid(1), now=2.0)) == []
    assert len(state) == 0 and state.in_flight == 0


def test_refused_connection_fails_over_to_the_next_transport_at_once() -> None:
    """libp2p refuses (retryable): the same step sends attempt 2 on bitchat, hybrid's second."""
    state = fresh()
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    out = state.step(AttemptResult(mid(1), 1, "libp2p", "connection refused", now=0.5))
    assert of(Backoff, out) == [Backoff(mid(1), 1, 0.5, "libp2p: connection refused", ("libp2p",))]
    assert [(s.transport, s.attempt) for s in of(Send, out)] == [("bitchat", 2)]


def test_after_a_whole_round_failed_the_retry_backs_off() -> None:
    """Every transport refused: the next attempt waits the policy's delay, then restarts on libp2p."""
    policy = RetryPolicy(jitter=0.5, max_attempts=10)
    state = RetrierState(policy=policy)
    state.step(Routes("bob", ("libp2p", "websocket"), now=0.0))
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    state.step(AttemptResult(mid(1), 1, "libp2p", "refused", now=0.0))
    out = state.step(AttemptResult(mid(1), 2, "websocket", "refused", now=0.0))
    expected_at = policy.delay(2, jitter_rand(mid(1), 2))
    assert of(Backoff, out) == [Backoff(mid(1), 2, expected_at, "websocket: refused", ("libp2p", "websocket"))]
    assert of(Send, out) == [] and of(NextWakeup, out) == [NextWakeup(expected_at)]
    assert of(Send, state.step(Tick(expected_at - 0.01))) == []
    sends = of(Send, state.step(Tick(expected_at)))
    assert [(s.transport, s.attempt) for s in sends] == [("libp2p", 3)]
    assert state.view(mid(1)).failed == ()  # type: ignore[union-attr]


def test_error_after_the_peer_may_have_the_bytes_waits_for_the_ack() -> None:
    """Not retryable (reset mid-write): no resend; an ack still delivers; the deadline would fail it."""
    state = fresh(ack_timeout=10.0)
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    assert state.step(AttemptResult(mid(1), 1, "libp2p", "reset", now=1.0, retryable=False)) == []
    assert state.view(mid(1)).phase is Phase.IN_FLIGHT  # type: ignore[union-attr]
    assert state.step(AckReceived(mid(1), now=2.0)) == [Delivered(mid(1), 1, "libp2p")]


def test_missing_ack_counts_as_a_failed_attempt() -> None:
    """No ack by the deadline: the attempt failed with 'no ack', and is retried later."""
    state = fresh(ack_timeout=10.0)
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    assert state.step(AttemptResult(mid(1), 1, "libp2p", None, now=0.1)) == []
    out = state.step(Tick(10.0))
    (backoff,) = of(Backoff, out)
    assert "no ack within 10.0 s" in backoff.last_error
    assert state.view(mid(1)).phase is Phase.WAITING  # type: ignore[union-attr]


def test_spent_budget_fails_with_the_last_error() -> None:
    """Five refusals (the fifth back on libp2p after a full round) → Failed(ATTEMPTS_EXHAUSTED)."""
    state = fresh(policy=RetryPolicy(max_attempts=5))
    out = state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=10_000.0, now=0.0))
    now = 0.0
    transports = []
    for _ in range(5):
        sends = of(Send, out)
        if not sends:
            now = of(Backoff, out)[0].next_attempt_at
            sends = of(Send, state.step(Tick(now)))
        (send,) = sends
        transports.append(send.transport)
        out = state.step(AttemptResult(mid(1), send.attempt, send.transport, "boom", now=now))
    assert transports == ["libp2p", "bitchat", "betanet", "websocket", "libp2p"]
    assert of(Failed, out) == [Failed(mid(1), 5, "libp2p: boom", FailReason.ATTEMPTS_EXHAUSTED)]


def test_ttl_expiry_fails_even_a_message_in_flight() -> None:
    """At expires_at the message is Failed(TTL_EXPIRED), naming the last error."""
    state = fresh(ack_timeout=100.0)
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=50.0, now=0.0))
    (failed,) = of(Failed, state.step(Tick(50.0)))
    assert (failed.reason, failed.attempts) == (FailReason.TTL_EXPIRED, 1)
    assert "ttl expired at 50.0" in failed.last_error
    assert state.in_flight == 0 and len(state) == 0
    assert state.step(AckReceived(mid(1), now=51.0)) == []


def test_already_expired_message_fails_without_a_send() -> None:
    """Enqueued after its TTL: no attempt, Failed at once."""
    state = fresh()
    out = state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=5.0, now=6.0))
    assert [type(d) for d in out] == [Failed]


def test_recipient_without_transport_is_parked_until_routes_arrive() -> None:
    """No route spends no attempt; a Routes event sends it on the mesh mode's favourite."""
    state = RetrierState(mode=NetworkMode.MESH)
    out = state.step(Enqueue(mid(1), "carol", Priority.HIGH, expires_at=100.0, now=0.0))
    assert of(Send, out) == []
    assert state.view(mid(1)).phase is Phase.PARKED  # type: ignore[union-attr]
    out = state.step(Routes("carol", ("websocket", "libp2p", "bitchat"), now=1.0))
    assert [(s.transport, s.attempt) for s in of(Send, out)] == [("bitchat", 1)]


def test_a_recipient_with_no_route_fails_after_the_route_timeout_not_the_ttl() -> None:
    """An unknown peer is waited for ``route_timeout`` seconds (a few discovery rounds), then NO_ROUTE."""
    state = RetrierState(route_timeout=30.0)
    out = state.step(Enqueue(mid(1), "nobody", Priority.NORMAL, expires_at=86_400.0, now=0.0))
    assert of(NextWakeup, out) == [NextWakeup(30.0)]
    assert of(Failed, state.step(Tick(29.0))) == []
    [failed] = of(Failed, state.step(Tick(30.0)))
    assert failed.reason is FailReason.NO_ROUTE and failed.attempts == 0
    assert "no route to nobody within 30.0 s" in failed.last_error and len(state) == 0


def test_a_route_arriving_in_time_cancels_the_route_timeout() -> None:
    """Found before the bound: sent, and the old parking timer is stale."""
    state = RetrierState(route_timeout=30.0)
    state.step(Enqueue(mid(1), "carol", Priority.NORMAL, expires_at=1000.0, now=0.0))
    assert of(Send, state.step(Routes("carol", ("websocket",), now=10.0)))
    assert of(Failed, state.step(Tick(30.0))) == [] and mid(1) in state


def test_a_dead_transport_fails_its_attempts_in_flight_at_once_and_fails_over() -> None:
    """TransportLost: no waiting for the ack deadline; the next transport is tried at once."""
    state = fresh(ack_timeout=30.0)
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    state.step(Enqueue(mid(2), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    out = state.step(TransportLost("libp2p", now=1.0))
    assert sorted((s.message_id, s.transport, s.attempt) for s in of(Send, out)) == [
        (mid(1), "bitchat", 2),
        (mid(2), "bitchat", 2),
    ]
    assert all("libp2p: the transport died" == b.last_error for b in of(Backoff, out))
    assert of(Send, state.step(TransportLost("websocket", now=2.0))) == []  # nothing in flight there


def test_a_dead_transport_on_the_last_attempt_fails_the_message() -> None:
    """With the budget spent, the transport's death ends the message with its reason."""
    state = fresh(ack_timeout=30.0, policy=RetryPolicy(max_attempts=1))
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    [failed] = of(Failed, state.step(TransportLost("libp2p", now=1.0)))
    assert failed.reason is FailReason.ATTEMPTS_EXHAUSTED and failed.last_error == "libp2p: the transport died"


def test_restored_message_keeps_its_counters_and_waits_for_its_next_attempt() -> None:
    """An outbox row replayed after a crash continues where it was: attempt 3 on the next transport."""
    state = fresh()
    out = state.step(
        Enqueue(
            mid(1),
            "bob",
            Priority.LOW,
            expires_at=1000.0,
            now=0.0,
            attempts=2,
            next_attempt_at=30.0,
            last_error="x",
            failed=("libp2p", "bitchat"),
        )
    )
    assert of(Send, out) == [] and of(NextWakeup, out) == [NextWakeup(30.0)]
    (send,) = of(Send, state.step(Tick(30.0)))
    assert (send.transport, send.attempt) == ("betanet", 3)


def test_restored_message_with_no_attempt_left_fails_when_due() -> None:
    """A crash cut off its last attempt: it fails with the stored error, no sixth send."""
    state = fresh()
    out = state.step(Enqueue(mid(1), "bob", Priority.LOW, expires_at=1000.0, now=0.0, attempts=5, last_error="x"))
    assert of(Failed, out) == [Failed(mid(1), 5, "x", FailReason.ATTEMPTS_EXHAUSTED)]


def test_window_limits_messages_in_flight_and_acks_free_slots() -> None:
    """max_in_flight=2: two sends; an ack lets the third go."""
    state = fresh(max_in_flight=2)
    sends = []
    for n in range(3):
        sends += of(Send, state.step(Enqueue(mid(n), "bob", Priority.NORMAL, expires_at=100.0, now=0.0)))
    assert [s.message_id for s in sends] == [mid(0), mid(1)]
    assert [s.message_id for s in of(Send, state.step(AckReceived(mid(0), now=1.0)))] == [mid(2)]


def test_a_batch_of_events_decides_what_the_same_events_one_by_one_decide() -> None:
    """step_many over enqueues and acks: the same Sends and Delivered as stepping one by one, the window kept."""
    events = [Enqueue(mid(n), "bob", Priority.NORMAL, expires_at=100.0, now=0.0) for n in range(8)]
    acks = [AckReceived(mid(n), now=1.0) for n in range(3)]
    one, many = fresh(max_in_flight=4), fresh(max_in_flight=4)
    singly = [d for e in events for d in one.step(e)] + [d for e in acks for d in one.step(e)]
    batched = many.step_many(events) + many.step_many(acks)
    assert sorted(s.message_id for s in of(Send, batched)) == sorted(s.message_id for s in of(Send, singly))
    assert [d.message_id for d in of(Delivered, batched)] == [d.message_id for d in of(Delivered, singly)]
    assert many.in_flight == one.in_flight == 4 and len(many) == len(one) == 5
    assert many.step_many([]) == []


def test_messages_enqueued_together_go_out_in_arrival_order_within_their_class() -> None:
    """FIFO within a class holds for a batch too: 30 enqueued at one instant leave in the order they came."""
    state = fresh(max_in_flight=1)
    ids = [os.urandom(16) for _ in range(30)]  # random ids: their order is not the arrival order
    sent = of(Send, state.step_many([Enqueue(i, "bob", Priority.NORMAL, expires_at=100.0, now=0.0) for i in ids]))
    for _ in range(29):
        sent += of(Send, state.step(AckReceived(sent[-1].message_id, now=1.0)))
    assert [s.message_id for s in sent] == ids


def test_within_a_batch_the_free_slots_go_by_priority() -> None:
    """Enqueued together, BULK first and CRITICAL last: the one free slot goes to CRITICAL."""
    state = fresh(max_in_flight=1)
    prios = (Priority.BULK, Priority.NORMAL, Priority.CRITICAL)
    batch = state.step_many([Enqueue(mid(n), "bob", p, expires_at=100.0, now=0.0) for n, p in enumerate(prios)])
    assert [s.message_id for s in of(Send, batch)] == [mid(2)]


def test_critical_goes_first_when_slots_are_scarce() -> None:
    """With one slot, queued CRITICAL beats earlier-queued BULK and NORMAL."""
    state = fresh(max_in_flight=1)
    state.step(Enqueue(mid(0), "bob", Priority.NORMAL, expires_at=100.0, now=0.0))
    for n, prio in ((1, Priority.BULK), (2, Priority.NORMAL), (3, Priority.CRITICAL)):
        state.step(Enqueue(mid(n), "bob", prio, expires_at=100.0, now=0.0))
    (send,) = of(Send, state.step(AckReceived(mid(0), now=1.0)))
    assert send.message_id == mid(3)


def test_stale_attempt_results_are_ignored() -> None:
    """An error for attempt 1 arriving after attempt 2 was sent changes nothing."""
    state = fresh(ack_timeout=1.0)
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    out = state.step(Tick(1.0))
    state.step(Tick(of(Backoff, out)[0].next_attempt_at))
    assert state.view(mid(1)).attempts == 2  # type: ignore[union-attr]
    assert state.step(AttemptResult(mid(1), 1, "libp2p", "late", now=2.5)) == []


def test_duplicate_enqueue_is_idempotent() -> None:
    """Enqueueing a pending id again does nothing."""
    state = fresh()
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    assert state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0)) == []


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"ack_timeout": 0}, "ack_timeout"), ({"max_in_flight": 0}, "max_in_flight")]
)
def test_invalid_settings_are_refused(kwargs: dict[str, object], name: str) -> None:
    """ConfigError names the setting."""
    with pytest.raises(ConfigError, match=name):
        RetrierState(**kwargs)  # type: ignore[arg-type]


def test_enqueue_with_impossible_attempts_is_refused() -> None:
    """A corrupt outbox row cannot smuggle in attempts above the budget."""
    with pytest.raises(ConfigError, match="attempts"):
        fresh().step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=9.0, now=0.0, attempts=9))


# --- unreachable peers (rule 8) -----------------------------------------------------------


def down(state: RetrierState, message_id: bytes, now: float) -> list[Decision]:
    """Refuse (retryably) every transport of ``message_id``'s round, one attempt after another."""
    out: list[Decision] = []
    view = state.view(message_id)
    while view is not None and view.phase is Phase.IN_FLIGHT and view.transport is not None:
        step = state.step(AttemptResult(message_id, view.attempts, view.transport, "refused", now=now))
        out += step
        view = state.view(message_id)
        if of(Backoff, step) and not of(Send, step):
            break  # the round is over
    return out


def dark_bob(**kwargs: object) -> RetrierState:
    """bob on libp2p and websocket; m0's whole round refused at t=0: bob is unreachable."""
    policy = RetryPolicy(max_attempts=10, backoff_base=1.0, backoff_max=8.0)
    state = RetrierState(policy=policy, **kwargs)  # type: ignore[arg-type]
    state.step(Routes("bob", ("libp2p", "websocket"), now=0.0))
    state.step(Enqueue(mid(0), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    down(state, mid(0), now=0.0)
    return state


def test_a_round_refused_on_every_transport_makes_the_peer_unreachable_and_holds_its_messages() -> None:
    """No attempt, no Backoff (no write), no Send for the messages that come while bob is unreachable."""
    state = dark_bob()
    [peer] = state.unreachable()
    assert (peer.recipient, peer.rounds, peer.probe, peer.held) == ("bob", 1, None, 0)
    assert peer.probe_at == RetryPolicy(backoff_base=1.0).delay(1, jitter_rand(b"bob", 1))
    out = state.step_many([Enqueue(mid(n), "bob", Priority.NORMAL, expires_at=1000.0, now=0.1) for n in (1, 2, 3)])
    assert of(Send, out) == [] and of(Backoff, out) == []
    assert {state.view(mid(n)).phase for n in (1, 2, 3)} == {Phase.HELD}  # type: ignore[union-attr]
    assert [state.view(mid(n)).attempts for n in (1, 2, 3)] == [0, 0, 0]  # type: ignore[union-attr]
    assert state.held == 3 and state.in_flight == 0
    assert of(NextWakeup, out) == [NextWakeup(peer.probe_at)]


def test_refused_probe_rounds_count_against_the_held_messages_budget_so_max_attempts_still_ends_them() -> None:
    """With max_attempts 3, a held message fails once three probe rounds were refused while it waited,
    though it never was sent: max_attempts bounds the wait for a down peer as it did before rule 8."""
    policy = RetryPolicy(max_attempts=3, backoff_base=1.0, backoff_max=8.0)
    state = RetrierState(policy=policy)
    state.step(Routes("bob", ("libp2p",), now=0.0))
    state.step(Enqueue(mid(0), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))
    down(state, mid(0), now=0.0)  # m0's round: bob is unreachable
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.1))
    failed: list[Failed] = []
    for _ in range(10):
        [peer] = state.unreachable()
        out = state.step(Tick(peer.probe_at))
        [send] = of(Send, out)
        failed += of(Failed, out + down(state, send.message_id, now=peer.probe_at))
        if state.view(mid(1)) is None:
            break
    assert sorted(f.message_id for f in failed) == [mid(0), mid(1)], failed
    assert {f.reason for f in failed} == {FailReason.ATTEMPTS_EXHAUSTED}
    by_held = [f for f in failed if "probe round(s) while held" in (f.last_error or "")]
    assert by_held and all(f.attempts < 3 for f in by_held), failed  # sent fewer times than its budget
    assert by_held[0].last_error is not None and by_held[0].last_error.endswith("last: libp2p: refused")


def test_when_the_peer_backoff_is_over_one_probe_goes_the_most_urgent_oldest() -> None:
    """At the backoff's end exactly one message is attempted: HIGH before NORMAL, then the older one."""
    state = dark_bob()
    prios = (Priority.NORMAL, Priority.HIGH, Priority.HIGH, Priority.BULK)
    state.step_many([Enqueue(mid(n), "bob", p, expires_at=1000.0, now=0.1) for n, p in enumerate(prios, start=1)])
    [peer] = state.unreachable()
    assert of(Send, state.step(Tick(peer.probe_at - 0.001))) == []
    [send] = of(Send, state.step(Tick(peer.probe_at)))
    assert (send.message_id, send.transport, send.attempt) == (mid(2), "libp2p", 1)
    assert state.unreachable()[0].probe == mid(2) and state.held == 3


def test_a_probe_refused_again_backs_the_peer_off_longer_and_the_oldest_held_probes_next() -> None:
    """The probe fails over within its round (one at a time), then bob's rounds go to 2: a longer wait."""
    state = dark_bob()
    state.step_many([Enqueue(mid(n), "bob", Priority.NORMAL, expires_at=1000.0, now=0.1) for n in (1, 2)])
    first = state.unreachable()[0].probe_at
    state.step(Tick(first))
    out = down(state, mid(1), now=first)
    assert [(s.message_id, s.transport) for s in of(Send, out)] == [(mid(1), "websocket")]
    [peer] = state.unreachable()
    assert (peer.rounds, peer.probe) == (2, None)
    assert peer.probe_at == first + RetryPolicy(backoff_base=1.0).delay(2, jitter_rand(b"bob", 2))
    [send] = of(Send, state.step(Tick(peer.probe_at)))
    # m1 waits for its own backoff; m0, due again since t≈2.5 (and held), is the oldest: it probes.
    assert send.message_id == mid(0) and state.view(mid(1)).phase is Phase.WAITING  # type: ignore[union-attr]


def test_a_probe_that_is_acked_ends_the_unreachability_and_the_held_messages_go() -> None:
    """The peer answers: every held message goes out at once, in arrival order, within the window."""
    state = dark_bob(max_in_flight=3)
    state.step_many([Enqueue(mid(n), "bob", Priority.NORMAL, expires_at=1000.0, now=0.1) for n in range(1, 6)])
    state.step(Tick(state.unreachable()[0].probe_at))
    out = state.step(AckReceived(mid(1), now=2.0))
    assert of(Delivered, out) == [Delivered(mid(1), 1, "libp2p")]
    assert [s.message_id for s in of(Send, out)] == [mid(2), mid(3), mid(4)]
    assert state.unreachable() == [] and state.held == 0


@pytest.mark.parametrize("answer", ["non-retryable error", "no ack by the deadline"])
def test_a_probe_that_may_have_reached_the_peer_ends_the_unreachability(answer: str) -> None:
    """A reset mid-write, or bytes taken and no ack: not a refused connection, so the peer is tried again."""
    state = dark_bob()
    state.step_many([Enqueue(mid(n), "bob", Priority.NORMAL, expires_at=1000.0, now=0.1) for n in (1, 2)])
    at = state.unreachable()[0].probe_at
    [probe] = of(Send, state.step(Tick(at)))
    if answer == "non-retryable error":
        out = state.step(AttemptResult(probe.message_id, 1, "libp2p", "reset", now=at, retryable=False))
    else:
        out = state.step(Tick(probe.deadline))
    assert state.unreachable() == []
    assert mid(2) in {s.message_id for s in of(Send, out)}


def test_an_ack_of_any_message_to_the_peer_ends_the_unreachability() -> None:
    """A late ack for a message sent before bob went down: bob is up, its held messages go."""
    state = dark_bob()
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.1))
    out = state.step(AckReceived(mid(0), now=0.2))
    assert of(Delivered, out) and [s.message_id for s in of(Send, out)] == [mid(1)]


@pytest.mark.parametrize(
    "event",
    [Routes("bob", ("libp2p", "websocket", "betanet"), now=0.2), TransportLost("websocket", now=0.2)],
    ids=["new routes", "a transport restarts"],
)
def test_new_routes_or_a_lost_transport_end_the_unreachability(event: Routes | TransportLost) -> None:
    """A new address, or a transport that comes back new, may work: the held messages go."""
    state = dark_bob()
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.1))
    out = state.step(event)
    assert state.unreachable() == [] and [s.message_id for s in of(Send, out)] == [mid(1)]


def test_a_held_message_fails_at_its_ttl_without_an_attempt() -> None:
    """TTL is TTL: HELD is no exception, and nothing was spent on it."""
    state = dark_bob()
    state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=0.5, now=0.1))
    [failed] = of(Failed, state.step(Tick(0.5)))
    assert (failed.message_id, failed.reason, failed.attempts) == (mid(1), FailReason.TTL_EXPIRED, 0)
    assert state.held == 0


def test_a_probe_that_expires_hands_the_probe_to_the_next_held_message() -> None:
    """The probe gone before its round ended: the next held one probes, not nobody."""
    state = dark_bob(ack_timeout=100.0)
    state.step(Enqueue(mid(1), "bob", Priority.CRITICAL, expires_at=5.0, now=0.1))
    state.step(Enqueue(mid(2), "bob", Priority.HIGH, expires_at=1000.0, now=0.1))  # before m0 (NORMAL)
    state.step(Tick(state.unreachable()[0].probe_at))
    assert state.unreachable()[0].probe == mid(1)
    out = state.step(Tick(5.0))
    assert [f.message_id for f in of(Failed, out)] == [mid(1)]
    assert [s.message_id for s in of(Send, out)] == [mid(2)]


def test_messages_in_flight_when_the_peer_went_down_do_not_fail_over_but_wait() -> None:
    """Sent before bob was known down: their retries are held, not sent on the next transport."""
    state = RetrierState(policy=RetryPolicy(max_attempts=10))
    state.step(Routes("bob", ("libp2p", "websocket"), now=0.0))
    state.step_many([Enqueue(mid(n), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0) for n in range(3)])
    down(state, mid(0), now=0.0)
    out = state.step(AttemptResult(mid(1), 1, "libp2p", "refused", now=0.0))
    assert of(Send, out) == [] and state.view(mid(1)).phase is Phase.HELD  # type: ignore[union-attr]
    assert state.view(mid(1)).failed == ("libp2p",)  # type: ignore[union-attr]


def test_an_unreachable_peer_takes_no_slot_from_a_reachable_one() -> None:
    """One slot: with bob down and 5 held, carol's messages still go one after another."""
    state = dark_bob(max_in_flight=1)
    state.step(Routes("carol", ("websocket",), now=0.0))
    state.step_many([Enqueue(mid(n), "bob", Priority.CRITICAL, expires_at=1000.0, now=0.1) for n in range(1, 6)])
    sent = of(Send, state.step(Enqueue(mid(10), "carol", Priority.BULK, expires_at=1000.0, now=0.1)))
    assert [s.message_id for s in sent] == [mid(10)]
    state.step(Enqueue(mid(11), "carol", Priority.BULK, expires_at=1000.0, now=0.1))
    assert [s.message_id for s in of(Send, state.step(AckReceived(mid(10), now=0.2)))] == [mid(11)]


def test_a_restart_starts_with_every_peer_reachable() -> None:
    """Unreachability is not persisted: the outbox's rows replayed go out at once."""
    state = RetrierState()
    state.step(Routes("bob", ("libp2p", "websocket"), now=0.0))
    out = state.step_many(
        [Enqueue(mid(n), "bob", Priority.NORMAL, expires_at=1000.0, now=9.0, attempts=4, next_attempt_at=9.0)
         for n in range(3)]
    )
    assert len(of(Send, out)) == 3 and state.unreachable() == []


# --- the fair queue ---------------------------------------------------------------------------


def test_bounds_are_as_documented() -> None:
    """CRITICAL within 5 picks, HIGH 7, NORMAL 11, LOW 19, BULK 35."""
    assert [max_picks_before(p) for p in Priority] == [5, 7, 11, 19, 35]


def test_fair_queue_shares_picks_by_weight_when_all_are_busy() -> None:
    """Over 31·k picks with every class backlogged, class c gets weight_c·k of them."""
    queue: FairQueue[int] = FairQueue(lambda _: True)
    for prio in Priority:
        for n in range(200):
            queue.push(prio, n)
    counts = dict.fromkeys(Priority, 0)
    for _ in range(31 * 5):
        picked = queue.pop()
        assert picked is not None
        counts[picked[0]] += 1
    assert [counts[p] for p in Priority] == [80, 40, 20, 10, 5]


@settings(max_examples=200)
@given(
    prio=st.sampled_from(Priority),
    ahead=st.integers(0, 3),
    script=st.lists(st.lists(st.sampled_from(Priority), max_size=8), min_size=1, max_size=200),
)
def test_queued_item_is_picked_within_its_bound_while_others_keep_arriving(
    prio: Priority, ahead: int, script: list[list[Priority]]
) -> None:
    """An item with k items ahead in its class is out within (k + 1) · max_picks_before(class) picks."""
    queue: FairQueue[object] = FairQueue(lambda _: True)
    for p in Priority:  # some history, so passes are not all zero
        queue.push(p, "old")
    while queue:
        queue.pop()
    for _ in range(ahead):
        queue.push(prio, "ahead")
    target = object()
    queue.push(prio, target)
    limit = (ahead + 1) * max_picks_before(prio)
    for picks, arrivals in enumerate(itertools.chain(script, itertools.repeat([])), start=1):
        for p in arrivals:  # any number of new arrivals between picks, of any class
            queue.push(p, "new")
        picked = queue.pop()
        assert picked is not None
        if picked[1] is target:
            break
        assert picks < limit
    assert picks <= limit


def test_stale_items_are_skipped_and_do_not_count() -> None:
    """Dead items never come out and an all-dead queue is empty."""
    dead = {1, 2}
    queue: FairQueue[int] = FairQueue(lambda n: n not in dead)
    for n in (1, 2, 3):
        queue.push(Priority.LOW, n)
    assert queue.pop() == (Priority.LOW, 3)
    queue.push(Priority.HIGH, 1)
    assert not queue and queue.pop() is None


# --- the model-checked state machine ----------------------------------------------------------


class RetrierMachine(RuleBasedStateMachine):
    """Random events against a RetrierState; a model checks every decision it makes."""

    ids = Bundle("ids")

    @initialize(
        max_attempts=st.integers(1, 4),
        window=st.integers(1, 4),
        mode=st.sampled_from(NetworkMode),
        bob=st.lists(st.sampled_from(ALL), unique=True),
    )
    def setup(self, max_attempts: int, window: int, mode: NetworkMode, bob: list[str]) -> None:
        self.policy = RetryPolicy(max_attempts=max_attempts, backoff_base=1.0, backoff_max=8.0, jitter=0.5)
        self.state = RetrierState(policy=self.policy, mode=mode, ack_timeout=5.0, max_in_flight=window)
        self.now = 0.0
        self.counter = itertools.count()
        self.enqueued: set[bytes] = set()
        self.delivered: set[bytes] = set()
        self.failed: set[bytes] = set()
        self.outstanding: dict[bytes, Send] = {}
        self.sends: dict[bytes, int] = {}
        self.wakeup: float | None = None
        self.routes: dict[str, tuple[str, ...]] = {}
        self.probes: dict[bytes, str] = {}
        """Outstanding sends decided while their recipient was unreachable (rule 8), and to whom."""
        if bob:
            self.routes_change("bob", bob)

    def apply(self, event: object) -> list[Decision]:
        held_before = {v.message_id for v in self.state.pending() if v.phase is Phase.HELD}
        out = self.state.step(event)  # type: ignore[arg-type]
        dark = {peer.recipient: peer for peer in self.state.unreachable()}
        for d in out:
            if isinstance(d, Send) and d.recipient in dark:
                assert d.message_id == dark[d.recipient].probe, "a send to an unreachable peer that is not its probe"
                self.probes[d.message_id] = d.recipient
            if isinstance(d, Backoff):
                assert d.message_id not in held_before, "a held message's attempt failed: it had none"
            if isinstance(d, Send):
                assert d.message_id not in self.outstanding, "two sends of one id outstanding"
                assert d.message_id in self.enqueued and d.message_id not in self.delivered | self.failed
                assert d.attempt <= self.policy.max_attempts
                assert d.attempt == self.sends.get(d.message_id, 0) + 1
                assert d.transport in self.routes.get(d.recipient, ())
                self.outstanding[d.message_id] = d
                self.sends[d.message_id] = d.attempt
            elif isinstance(d, Backoff):
                assert d.message_id in self.outstanding
                del self.outstanding[d.message_id]
                assert d.next_attempt_at >= self.now
            elif isinstance(d, Delivered):
                assert d.message_id not in self.delivered | self.failed
                self.delivered.add(d.message_id)
                self.outstanding.pop(d.message_id, None)
            elif isinstance(d, Failed):
                assert d.message_id not in self.delivered | self.failed
                assert d.attempts <= self.policy.max_attempts
                self.failed.add(d.message_id)
                self.outstanding.pop(d.message_id, None)
            elif isinstance(d, NextWakeup):
                self.wakeup = d.at
        self.probes = {m: r for m, r in self.probes.items() if r in dark and m in self.outstanding}
        return out

    @rule(
        target=ids,
        recipient=st.sampled_from(["bob", "carol"]),
        prio=st.sampled_from(Priority),
        ttl=st.floats(0.5, 100.0),
    )
    def enqueue(self, recipient: str, prio: Priority, ttl: float) -> bytes:
        message_id = mid(next(self.counter))
        self.enqueued.add(message_id)
        self.apply(Enqueue(message_id, recipient, prio, expires_at=self.now + ttl, now=self.now))
        return message_id

    @rule(recipient=st.sampled_from(["bob", "carol"]), transports=st.lists(st.sampled_from(ALL), unique=True))
    def routes_change(self, recipient: str, transports: list[str]) -> None:
        self.routes[recipient] = tuple(transports)
        self.apply(Routes(recipient, tuple(transports), now=self.now))

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), error=st.one_of(st.none(), st.sampled_from(["refused", "reset"])), retryable=st.booleans())
    def transport_answers(self, data: st.DataObject, error: str | None, retryable: bool) -> None:
        send = data.draw(st.sampled_from(sorted(self.outstanding.values(), key=lambda s: s.message_id)))
        self.apply(AttemptResult(send.message_id, send.attempt, send.transport, error, self.now, retryable))

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def peer_refuses(self, data: st.DataObject) -> None:
        """The common case of a peer that is down: the connection is refused (retryable)."""
        send = data.draw(st.sampled_from(sorted(self.outstanding.values(), key=lambda s: s.message_id)))
        self.apply(AttemptResult(send.message_id, send.attempt, send.transport, "refused", self.now))

    @precondition(lambda self: self.outstanding)
    @rule(recipient=st.sampled_from(["bob", "carol"]))
    def peer_is_down(self, recipient: str) -> None:
        """Every attempt outstanding to ``recipient`` is refused, failovers included, until none is left."""
        for _ in range(4 * len(self.outstanding) + 4):
            sends = sorted(
                (s for s in self.outstanding.values() if s.recipient == recipient), key=lambda s: s.message_id
            )
            if not sends:
                return
            self.apply(AttemptResult(sends[0].message_id, sends[0].attempt, sends[0].transport, "refused", self.now))

    @rule(transport=st.sampled_from(ALL))
    def transport_dies(self, transport: str) -> None:
        lost = {m for m, send in self.outstanding.items() if send.transport == transport}
        self.apply(TransportLost(transport, now=self.now))
        assert lost.isdisjoint(self.outstanding) or all(
            self.outstanding[m].transport != transport for m in lost & set(self.outstanding)
        ), "an attempt on a dead transport is still outstanding"

    @rule(message_id=ids)
    def ack(self, message_id: bytes) -> None:
        # Acks may come for anything: duplicates, late ones, ones for never-sent ids are ignored.
        sent = message_id in self.sends
        out = self.apply(AckReceived(message_id, now=self.now))
        if not sent:
            assert not [d for d in out if isinstance(d, Delivered)], "an ack for a message never sent delivered it"

    @rule(dt=st.floats(0.0, 20.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.apply(Tick(self.now))

    @precondition(lambda self: self.wakeup is not None)
    @rule()
    def timer_fires(self) -> None:
        assert self.wakeup is not None
        self.now = max(self.now, self.wakeup)
        self.wakeup = None
        self.apply(Tick(self.now))

    @invariant()
    def nothing_is_lost(self) -> None:
        if not hasattr(self, "state"):
            return
        pending = {v.message_id for v in self.state.pending()}
        assert self.delivered.isdisjoint(self.failed)
        assert pending.isdisjoint(self.delivered | self.failed)
        assert pending | self.delivered | self.failed == self.enqueued

    @invariant()
    def attempts_within_budget_and_window_respected(self) -> None:
        if not hasattr(self, "state"):
            return
        assert all(v.attempts <= self.policy.max_attempts for v in self.state.pending())
        in_flight = [v for v in self.state.pending() if v.phase is Phase.IN_FLIGHT]
        assert len(in_flight) == self.state.in_flight == len(self.outstanding) <= self.state.max_in_flight

    @invariant()
    def something_pending_means_a_wakeup_or_an_outside_event(self) -> None:
        if not hasattr(self, "state"):
            return
        for view in self.state.pending():
            if view.phase in (Phase.WAITING, Phase.IN_FLIGHT, Phase.HELD):
                assert self.wakeup is not None and self.wakeup <= max(view.expires_at, self.now)
            if view.phase is Phase.READY:
                assert self.state.in_flight == self.state.max_in_flight
        for peer in self.state.unreachable():
            if peer.held and peer.probe is None:  # the end of its backoff is asked for
                assert self.wakeup is not None and self.wakeup <= max(peer.probe_at, self.now)

    @invariant()
    def at_most_one_probe_in_flight_per_unreachable_peer(self) -> None:
        if not hasattr(self, "state"):
            return
        for peer in self.state.unreachable():
            probing = [m for m, r in self.probes.items() if r == peer.recipient]
            assert len(probing) <= 1, f"{len(probing)} attempts at once to unreachable {peer.recipient}"

    @invariant()
    def held_messages_spend_nothing_and_belong_to_unreachable_peers(self) -> None:
        if not hasattr(self, "state"):
            return
        dark = {peer.recipient: peer for peer in self.state.unreachable()}
        held = [v for v in self.state.pending() if v.phase is Phase.HELD]
        for view in held:
            assert view.recipient in dark and dark[view.recipient].probe != view.message_id
            assert view.message_id not in self.outstanding and view.attempts == self.sends.get(view.message_id, 0)
        assert {r: p.held for r, p in dark.items()} == {r: sum(v.recipient == r for v in held) for r in dark}
        assert self.state.held == len(held)

    @invariant()
    def parked_only_without_a_route(self) -> None:
        if not hasattr(self, "state"):
            return
        for view in self.state.pending():
            if view.phase is Phase.PARKED:
                assert not self.routes.get(view.recipient)


TestRetrierMachine = RetrierMachine.TestCase
TestRetrierMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@given(st.binary(min_size=16, max_size=16), st.integers(0, 10**6))
def test_jitter_rand_is_in_the_unit_interval(message_id: bytes, attempt: int) -> None:
    """The hash-derived random number is a valid rand for RetryPolicy.delay."""
    assert 0.0 <= jitter_rand(message_id, attempt) < 1.0


def test_a_tick_always_re_requests_the_next_wakeup() -> None:
    """A timer that fires a hair early (clock skew) gets its wake-up asked for again, so nothing stalls."""
    state = fresh(ack_timeout=10.0)
    assert of(NextWakeup, state.step(Enqueue(mid(1), "bob", Priority.NORMAL, expires_at=1000.0, now=0.0))) == [
        NextWakeup(10.0)
    ]
    assert of(NextWakeup, state.step(Tick(9.999))) == [NextWakeup(10.0)]
