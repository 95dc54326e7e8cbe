"""The dashboard's view: a node's tree, states and crashes folded from its log records."""

from __future__ import annotations

import datetime

from villagemesh.dashboard.view import BUCKET_S, MeshView, parse_time

T0 = 1_800_000_000.0


def stamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")


def rec(event: str, at: float, **fields: object) -> dict:
    return {"event": event, "node": "n1", "level": "info", "timestamp": stamp(at), **fields}


def boot(view: MeshView) -> None:
    view.add(
        rec("supervisor_started", T0, supervisor="root", parent=None, strategy="one_for_one", intensity=20, period_s=10)
    )
    view.add(
        rec(
            "supervisor_started",
            T0,
            supervisor="transports",
            parent="root",
            strategy="one_for_one",
            intensity=3,
            period_s=10,
        )
    )
    view.add(
        rec(
            "child_started",
            T0,
            supervisor="transports",
            child_id="websocket",
            instance="a" * 12,
            isolation="thread",
            restart_count=0,
            pid=None,
        )
    )
    view.add(
        rec(
            "child_started",
            T0,
            supervisor="root",
            child_id="transports",
            instance="b" * 12,
            isolation="thread",
            restart_count=0,
            pid=None,
        )
    )
    view.add(
        rec(
            "child_started",
            T0,
            supervisor="root",
            child_id="ble",
            instance="c" * 12,
            isolation="process",
            restart_count=0,
            pid=4242,
        )
    )


def tree(view: MeshView, now: float) -> dict:
    (node,) = view.snapshot(now)["nodes"]
    (root,) = node["tree"]
    return root


def child(row: dict, child_id: str) -> dict:
    return next(c for c in row["children"] if c["id"] == child_id)


def test_the_tree_nests_supervisors_under_their_parent_with_isolation_and_pid() -> None:
    view = MeshView()
    boot(view)
    root = tree(view, T0)
    assert root["id"] == "root" and root["intensity"] == 20
    transports = child(root, "transports")
    assert transports["kind"] == "supervisor"
    assert child(transports["supervisor"], "websocket")["state"] == "running"
    ble = child(root, "ble")
    assert (ble["isolation"], ble["pid"], ble["state"]) == ("process", 4242, "running")


def test_a_crash_shows_restarting_with_its_exception_then_running_after_the_restart() -> None:
    view = MeshView()
    boot(view)
    view.add(
        rec(
            "child_crashed",
            T0 + 1,
            supervisor="transports",
            child_id="websocket",
            instance="a" * 12,
            exc_type="CrashInjected",
            exc_message="boom",
            traceback="Traceback...\nCrashInjected: boom",
        )
    )
    ws = child(child(tree(view, T0 + 1), "transports")["supervisor"], "websocket")
    assert ws["state"] == "restarting"
    assert ws["last_crash"]["exc_type"] == "CrashInjected" and "Traceback" in ws["last_crash"]["traceback"]
    view.add(
        rec(
            "child_started",
            T0 + 1,
            supervisor="transports",
            child_id="websocket",
            instance="d" * 12,
            isolation="thread",
            restart_count=1,
            pid=None,
        )
    )
    view.add(
        rec(
            "child_restarted",
            T0 + 1,
            supervisor="transports",
            child_id="websocket",
            instance="d" * 12,
            restart_count=1,
            backoff_s=0.0,
        )
    )
    transports = child(tree(view, T0 + 2), "transports")["supervisor"]
    ws = child(transports, "websocket")
    assert (ws["state"], ws["restart_count"], ws["restarts_in_window"]) == ("running", 1, 1)
    assert transports["restarts_in_window"] == 1 and ws["intensity"] == 3
    assert child(child(tree(view, T0 + 20), "transports")["supervisor"], "websocket")["restarts_in_window"] == 0


def test_a_scheduled_restart_shows_backing_off() -> None:
    view = MeshView()
    boot(view)
    view.add(
        rec(
            "child_crashed",
            T0 + 1,
            supervisor="root",
            child_id="ble",
            instance="c" * 12,
            exc_type="ChildProcessDied",
            exc_message="was killed by SIGKILL",
            traceback=None,
        )
    )
    view.add(rec("child_restart_scheduled", T0 + 1, supervisor="root", child_id="ble", backoff_s=2.0))
    assert child(tree(view, T0 + 1), "ble")["state"] == "backing off"


def test_an_escalation_marks_the_supervisor_and_is_counted() -> None:
    view = MeshView()
    boot(view)
    view.add(
        rec(
            "restart_intensity_exceeded",
            T0 + 2,
            supervisor="transports",
            child_id="websocket",
            intensity=3,
            period_s=10,
            restarts=4,
        )
    )
    view.add(
        rec(
            "child_stopped", T0 + 2, supervisor="transports", child_id="websocket", instance="a" * 12, reason="shutdown"
        )
    )
    view.add(rec("supervisor_escalated", T0 + 2, supervisor="transports", parent="root", reason="too many"))
    transports = child(tree(view, T0 + 2), "transports")["supervisor"]
    assert (transports["state"], transports["escalations"]) == ("escalated", 1)
    assert child(transports, "websocket")["state"] == "stopped"
    view.add(
        rec(
            "supervisor_started",
            T0 + 3,
            supervisor="transports",
            parent="root",
            strategy="one_for_one",
            intensity=3,
            period_s=10,
        )
    )
    transports = child(tree(view, T0 + 3), "transports")["supervisor"]
    assert (transports["state"], transports["escalations"]) == ("running", 1)


def test_the_timeline_keeps_supervision_events_in_order_without_tracebacks() -> None:
    view = MeshView()
    boot(view)
    view.add(rec("message_delivered", T0, peer="x"))  # not a timeline event
    view.add(
        rec(
            "child_crashed",
            T0 + 1,
            supervisor="root",
            child_id="ble",
            instance="c" * 12,
            exc_type="E",
            exc_message="m",
            traceback="tb",
        )
    )
    entries = view.timeline_since(0)
    assert [e["event"] for e in entries][-1] == "child_crashed"
    assert "traceback" not in entries[-1] and entries[-1]["has_traceback"]
    assert view.timeline_since(entries[-1]["seq"]) == []


def test_status_samples_give_rates_and_the_chart_counts_restarts() -> None:
    view = MeshView()
    boot(view)
    view.add_status("n1", {"actors": {"retrier": {"in": 100, "out": 50, "depth": 3}}}, T0)
    view.add_status("n1", {"actors": {"retrier": {"in": 300, "out": 150, "depth": 1}}}, T0 + 2)
    view.add(
        rec(
            "child_restarted",
            T0 + 2,
            supervisor="root",
            child_id="ble",
            instance="e" * 12,
            restart_count=1,
            backoff_s=0.0,
        )
    )
    snap = view.snapshot(T0 + 2)
    (retrier,) = snap["nodes"][0]["actors"]
    assert (retrier["in_per_s"], retrier["out_per_s"], retrier["depth"]) == (100.0, 50.0, 1)
    assert snap["chart"]["restarts"][-1] == 1 and snap["chart"]["msg_rate"][-1] == 100.0
    assert snap["chart"]["bucket_s"] == BUCKET_S


def test_records_without_an_event_or_node_are_ignored_and_bad_timestamps_read_as_zero() -> None:
    view = MeshView()
    assert view.add({"event": "child_started"}) is None
    assert view.snapshot(T0)["nodes"] == []
    assert parse_time("yesterday") == 0.0 and parse_time(None) == 0.0


def test_a_transfer_in_a_status_sample_is_in_the_snapshot_and_top_draws_its_share() -> None:
    from rich.console import Console

    from villagemesh.dashboard.top import frame

    row = {
        "transfer_id": "ab" * 16,
        "peer_id": "c" * 32,
        "direction": "out",
        "name": "weights.bin",
        "kind": "model",
        "size": 4096,
        "done": 1024,
        "state": "sending",
        "detail": "",
    }
    view = MeshView()
    boot(view)
    view.add_status("n1", {"actors": {}, "transfers": [row]}, T0)
    snap = view.snapshot(T0)
    assert snap["nodes"][0]["transfers"] == [row]
    console = Console(width=160, record=True, color_system=None)
    console.print(frame(snap, []))
    assert "transfer → cccccccccccccccc weights.bin (model):  25.0 % of 4096 B, sending" in console.export_text()
