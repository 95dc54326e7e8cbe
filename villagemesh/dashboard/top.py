"""``villagemesh top``: the dashboard's view in a terminal (rich), redrawn live.

The same :class:`~.sources.Sources` and :class:`~.view.MeshView` as the web
page, drawn as tables: the supervision tree (state, isolation and pid,
restarts, the intensity window, the last crash), the actors' figures, the
transports, the outbox, the peers, the last timeline events, and the message
rate and restarts of the last ten minutes as sparklines. ``--once`` draws one
frame and exits (for scripts); otherwise it runs until Ctrl-C.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from villagemesh.dashboard.sources import Sources
from villagemesh.dashboard.view import MeshView

__all__ = ["frame", "run", "sparkline"]

BARS = "▁▂▃▄▅▆▇█"
STATE_STYLE = {
    "running": "green",
    "restarting": "yellow",
    "backing off": "yellow",
    "stopped": "dim",
    "escalated": "bold red",
}


def sparkline(values: Iterable[float | None], width: int = 60) -> str:
    """Values as block characters, the last ``width`` of them (a gap for None)."""
    kept = list(values)[-width:]
    top = max((v for v in kept if v), default=0) or 1
    return "".join(" " if v is None else BARS[min(len(BARS) - 1, int(v / top * (len(BARS) - 1)))] for v in kept)


def _ago(at: float | None, now: float) -> str:
    if not at:
        return ""
    seconds = max(0.0, now - at)
    return f"{seconds:.0f}s ago" if seconds < 60 else f"{seconds / 60:.0f}m ago"


def _num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tree_rows(table: Table, sup: dict[str, Any], depth: int, now: float) -> None:
    indent = "  " * depth
    state = sup["state"]
    escalated = f"  escalated {sup['escalations']}x" if sup["escalations"] else ""
    table.add_row(
        Text(f"{indent}{sup['id']}/", style="bold"),
        Text(state, style=STATE_STYLE.get(state, "")),
        sup.get("strategy") or "",
        "",
        f"{sup['restarts_in_window']}/{sup['intensity'] if sup['intensity'] is not None else '?'}",
        Text(escalated.strip(), style="red"),
    )
    for child in sup["children"]:
        crash = child.get("last_crash")
        last = f"{crash['exc_type']}: {crash['exc_message']} ({_ago(crash['at'], now)})" if crash else ""
        isolation = child["isolation"] + (f" pid {child['pid']}" if child["isolation"] == "process" else "")
        if child.get("supervisor") is not None:
            _tree_rows(table, child["supervisor"], depth + 1, now)
            continue
        table.add_row(
            f"{indent}  {child['id']}",
            Text(child["state"], style=STATE_STYLE.get(child["state"], "")),
            isolation,
            str(child["restart_count"]),
            f"{child['restarts_in_window']}/{child['intensity'] if child['intensity'] is not None else '?'}",
            Text(last, style="red"),
        )


def frame(snapshot: dict[str, Any], timeline: list[dict[str, Any]], *, lines: int = 8) -> Group:
    """One screen of the view."""
    now = snapshot["now"]
    parts: list[Any] = []
    for node in snapshot["nodes"]:
        tree = Table(title=f"{node['name']} ({node['state']}) {node.get('address') or ''}", expand=True)
        for column in ("supervision tree", "state", "isolation", "restarts", "window", "last crash"):
            tree.add_column(column)
        for sup in node["tree"]:
            _tree_rows(tree, sup, 0, now)
        parts.append(tree)
        actors = Table(title="actors", expand=True)
        for column in ("actor", "in/s", "out/s", "mailbox", "ask p50 ms", "ask p99 ms", "transmit failed"):
            actors.add_column(column, justify="left" if column == "actor" else "right")
        for a in node["actors"]:
            actors.add_row(
                a["name"],
                _num(a.get("in_per_s"), 1),
                _num(a.get("out_per_s"), 1),
                str(a.get("depth", 0)),
                _num(a.get("ask_p50_ms"), 3),
                _num(a.get("ask_p99_ms"), 3),
                str(a.get("transmit_failed", "")),
            )
        if node["actors"]:
            parts.append(actors)
        outbox = node.get("outbox")
        if outbox:
            by = ", ".join(f"{k} {v}" for k, v in outbox.get("pending_by_priority", {}).items())
            parts.append(
                Text(
                    f"outbox: {outbox['pending']} pending ({by}); retries {outbox['retried']}, "
                    f"delivered {outbox['delivered']}, failed {outbox['failed']}, poisoned {node['poisoned']}; "
                    f"unreachable peers {outbox.get('unreachable_peers', 0)} (held {outbox.get('held', 0)})"
                )
            )
        for t in node.get("transfers", []):
            share = 100.0 if not t["size"] else 100.0 * t["done"] / t["size"]
            arrow = "→" if t["direction"] == "out" else "←"
            what = f"{t['name']} ({t['kind']}): {share:5.1f} % of {t['size']} B, {t['state']}"
            parts.append(Text(f"transfer {arrow} {t['peer_id'][:16]} {what}"))
        if node.get("peers"):
            peers = Table(title="peers", expand=True)
            for column in ("peer", "addresses", "last seen", "evolution priority"):
                peers.add_column(column)
            for p in node["peers"]:
                addresses = "; ".join(f"{t} {', '.join(a)}" for t, a in p["addresses"].items())
                peers.add_row(p["peer_id"][:16], addresses, _ago(p["last_seen"], now), _num(p["evolution_priority"], 3))
            parts.append(peers)
    chart = snapshot["chart"]
    parts.append(Text(f"msg/s    {sparkline(chart['msg_rate'])}", style="blue"))
    parts.append(Text(f"restarts {sparkline(chart['restarts'])}", style="red"))
    events = Table(title="timeline", expand=True)
    for column in ("time", "node", "event", "supervisor", "child", "detail"):
        events.add_column(column)
    for e in timeline[-lines:]:
        detail = e.get("exc_type") or e.get("reason") or ""
        events.add_row(
            time.strftime("%H:%M:%S", time.localtime(e["at"])),
            e["node"],
            e["event"],
            str(e.get("supervisor") or ""),
            str(e.get("child_id") or ""),
            str(detail),
        )
    parts.append(events)
    for source, error in snapshot.get("errors", {}).items():
        parts.append(Text(f"{source}: {error}", style="red"))
    if not snapshot["nodes"]:
        parts.insert(0, Text("waiting for the log...", style="dim"))
    return Group(*parts)


def run(
    sources: Sources,
    *,
    once: bool = False,
    interval: float = 0.5,
    status_every: float = 1.0,
    console: Console | None = None,
) -> int:
    """Draw the view (once, or live until Ctrl-C)."""
    console = console or Console()
    view = MeshView()
    errors = sources.errors

    def snapshot() -> dict[str, Any]:
        snap = view.snapshot(time.time())
        snap["errors"] = dict(errors)
        return snap

    sources.poll_logs(view, 64 * 1024 * 1024)
    sources.fetch_status(view)
    if once:
        console.print(frame(snapshot(), view.timeline_since(0)))
        return 0
    fetched = time.monotonic()
    try:
        with Live(frame(snapshot(), view.timeline_since(0)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                sources.poll_logs(view)
                if time.monotonic() - fetched >= status_every:
                    sources.fetch_status(view)
                    fetched = time.monotonic()
                live.update(frame(snapshot(), view.timeline_since(0)), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        sources.close()
