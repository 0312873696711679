"""``overlay demo``: a local overlay whose exits are taken down while messages flow.

Starts N ``overlay run`` processes on loopback (some exits, some standby exits,
relays), a local SMTP sink, and a light client that sends a steady stream of
messages through the overlay. Exits are then taken down one after another —
alternately killed (SIGKILL) and frozen (SIGSTOP: every feed of the node goes
silent at once, as when its links are cut) — while the terminal shows nodes,
live exits, promotions, and messages sent / delivered / pending / lost. At the
end every process is stopped and a summary is printed (``--json`` for scripts).

However the demo ends, its node processes end too: SIGTERM, SIGHUP and SIGINT
stop the demo cleanly (``run_demo_until_signal``), and every node is started
with a parent-death signal (``overlay/cluster.py``), so even a SIGKILL of the
demo kills them, frozen ones included.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from .client import Client
from .cluster import Cluster
from .control import auth_headers
from .core.outbox import State


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- SMTP sink
class SmtpSink:
    """A real SMTP server on 127.0.0.1 that records which demo messages arrived."""

    TOKEN = re.compile(rb"hydra-demo-(\d+)-([0-9a-f]{8})")

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.message_ids: dict[str, set[str]] = {}
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd API
                data = envelope.original_content or envelope.content or b""
                m = sink.TOKEN.search(data)
                if m:
                    mid = re.search(rb"(?im)^message-id:\s*(\S+)", data)
                    with sink.lock:
                        key = m.group(0).decode()
                        sink.counts[key] = sink.counts.get(key, 0) + 1
                        ids = sink.message_ids.setdefault(key, set())
                        ids.add(mid.group(1).decode() if mid else "")
                return "250 OK"

        self.port = _free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def start(self) -> int:
        self.controller.start()
        return self.port

    def stop(self) -> None:
        self.controller.stop()

    def delivered(self) -> tuple[int, int]:
        """(distinct messages delivered, duplicate deliveries)."""
        with self.lock:
            return len(self.counts), sum(c - 1 for c in self.counts.values())


# ---------------------------------------------------------------- state
@dataclass
class Takedown:
    node: int
    peer_id: str
    how: str
    at: float
    new_exit_at: float | None = None  # first delivery through another exit after `at`
    target_at: float | None = None  # live exits back at target (entry node's view)

    def row(self, t0: float) -> list[str]:
        def since(t):
            return f"{t - self.at:.1f} s" if t else "…"

        return [
            f"{self.at - t0:5.1f} s",
            f"node{self.node:02d}",
            self.how,
            since(self.new_exit_at),
            since(self.target_at),
        ]


@dataclass
class DemoState:
    t0: float = 0.0
    sent: list[bytes] = field(default_factory=list)
    tokens: dict[bytes, str] = field(default_factory=dict)
    takedowns: list[Takedown] = field(default_factory=list)
    promotions: list[str] = field(default_factory=list)
    exits_view: dict = field(default_factory=dict)
    roles: dict[str, list[str]] = field(default_factory=dict)
    phase: str = "starting"


# ---------------------------------------------------------------- demo
def check_demo_args(nodes: int, exits: int, standby: int, duration: float) -> None:
    """Raise ``ValueError`` (a sentence for the user) for settings the demo cannot run."""
    if exits < 1:
        raise ValueError(f"--exits must be 1 or more, not {exits}")
    if standby < 0:
        raise ValueError(f"--standby must be 0 or more, not {standby}")
    if not duration > 0:
        raise ValueError(f"--duration must be more than 0 seconds, not {duration:g}")
    _roles(nodes, exits, standby)


def run_demo_until_signal(**kwargs) -> dict:
    """``run_demo`` that SIGTERM, SIGHUP or SIGINT end early: every node is stopped
    and ``{"ok": False, "stopped_by": NAME}`` returned."""
    stopped: dict = {}

    async def main() -> dict | None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as sigs:
            async with trio.open_nursery() as n:

                async def watch() -> None:
                    async for signum in sigs:
                        stopped["by"] = signal.Signals(signum).name
                        n.cancel_scope.cancel()
                        return

                n.start_soon(watch)
                summary = await run_demo(**kwargs)
                n.cancel_scope.cancel()
                return summary
        return None

    summary = trio.run(main)
    if summary is None or "by" in stopped:
        Console(stderr=True).print(
            f"demo stopped by {stopped.get('by', 'a signal')}; every node it started is stopped"
        )
        return {"ok": False, "stopped_by": stopped.get("by", "")}
    return summary


def _roles(nodes: int, exits: int, standby: int) -> list[list[str]]:
    if nodes < exits + standby + 2:
        raise ValueError(
            f"--nodes {nodes} is too few: need at least exits + standby + 2"
            f" = {exits + standby + 2} (an entry and a relay besides the exits)"
        )
    out = [["entry", "relay"]]
    out += [["exit", "relay"]] * exits
    out += [["standby-exit", "relay"]] * standby
    out += [["relay"]] * (nodes - 1 - exits - standby)
    return out


async def run_demo(
    *,
    nodes: int = 12,
    exits: int = 3,
    standby: int = 3,
    duration: float = 60.0,
    interval: float = 0.5,
    as_json: bool = False,
    console: Console | None = None,
) -> dict:
    console = console or Console(stderr=as_json)
    root = Path(tempfile.mkdtemp(prefix="hydra-demo-"))
    sink = SmtpSink()
    smtp_port = sink.start()
    state = DemoState(t0=time.time())
    settings = {
        "smtp_relay": f"127.0.0.1:{smtp_port}",
        "target_live_exits": exits,
        "target_peers": 6,
    }
    cluster = Cluster(root, _roles(nodes, exits, standby), settings=settings)
    try:
        console.print(f"starting {nodes} nodes and an SMTP sink on 127.0.0.1:{smtp_port} …")
        # abandoned on cancellation (a signal): cluster.stop() below stops what it started
        await trio.to_thread.run_sync(cluster.start, abandon_on_cancel=True)
        entry = cluster.nodes[0]
        async with Client(root / "client", via=[entry.addrs[0]]) as client:
            with Live(
                _render(state, cluster, client, sink),
                console=console,
                refresh_per_second=4,
                transient=as_json,
            ) as live:
                async with trio.open_nursery() as n:
                    n.start_soon(_watch, state, cluster, client)
                    n.start_soon(_refresh, live, state, cluster, client, sink)
                    await _traffic_and_takedowns(state, cluster, client, duration, interval, exits)
                    state.phase = "draining: waiting for the last acknowledgements"
                    with trio.move_on_after(45):
                        while client.pending():
                            await trio.sleep(0.2)
                    await trio.sleep(1.0)  # last SMTP transactions
                    n.cancel_scope.cancel()
                live.update(_render(state, cluster, client, sink))
            summary = _summary(state, client, sink, nodes, exits, standby, duration)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cluster.stop)  # continues frozen nodes first
        sink.stop()
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(console, summary)
    return summary


async def _traffic_and_takedowns(state, cluster, client, duration, interval, exits) -> None:
    start = time.time()
    warmup, drain = min(10.0, duration / 5), min(12.0, duration / 4)
    gap = (duration - warmup - drain) / max(1, exits)
    plan = [start + warmup + i * gap for i in range(exits)]
    state.phase = "sending"
    seq = 0
    while time.time() - start < duration:
        if plan and time.time() >= plan[0]:
            plan.pop(0)
            _take_down(
                state,
                cluster,
                client,
                how="killed" if len(state.takedowns) % 2 == 0 else "feeds cut",
            )
        token = f"hydra-demo-{seq}-{os.urandom(4).hex()}"
        body = f"Subject: Hydra demo {seq}\r\n\r\n{token}\r\n".encode()
        mid = await client.send("smtp:demo@example.org", body)
        state.sent.append(mid)
        state.tokens[mid] = token
        seq += 1
        await trio.sleep(interval)


def _take_down(state: DemoState, cluster: Cluster, client: Client, how: str) -> None:
    """Take down the exit the client used most recently (the most visible one)."""
    live_exits = {x["peer_id"] for x in state.exits_view.get("exits", []) if x["state"] != "dead"}
    candidates = [
        n for n in cluster.nodes if n.alive and n.peer_id in live_exits and n.killed_at is None
    ]
    if not candidates:
        return
    recent = [client.status(m) for m in reversed(state.sent[-20:])]
    used = [e.exit.peer_id() for e in recent if e is not None and e.exit is not None]
    victim = next((n for p in used for n in candidates if n.peer_id == p), candidates[0])
    cluster.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    victim.killed_at = time.time()
    state.takedowns.append(Takedown(victim.index, victim.peer_id, how, victim.killed_at))


async def _watch(state: DemoState, cluster: Cluster, client: Client) -> None:
    entry = cluster.nodes[0]
    headers = auth_headers(entry.home.path)
    async with httpx.AsyncClient(headers=headers, trust_env=False) as http:
        while True:
            try:
                view = (await http.get(entry.control + "/exits", timeout=2)).json()
                recs = (await http.get(entry.control + "/records", timeout=2)).json()
                state.exits_view = view
                for r in recs["records"]:
                    old = state.roles.get(r["peer_id"])
                    new = r.get("roles", [])
                    if old is not None and "exit" in new and "exit" not in old:
                        idx = next(
                            (n.index for n in cluster.nodes if n.peer_id == r["peer_id"]), "?"
                        )
                        state.promotions.append(
                            f"{time.time() - state.t0:5.1f} s  node{idx:02d} promoted itself to exit"
                        )
                    state.roles[r["peer_id"]] = new
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            _score_takedowns(state, client)
            await trio.sleep(0.25)


def _score_takedowns(state: DemoState, client: Client) -> None:
    live = [x for x in state.exits_view.get("exits", []) if x["state"] != "dead"]
    target = state.exits_view.get("target_live_exits", 0)
    gone = {t.peer_id for t in state.takedowns}
    for t in state.takedowns:
        if t.target_at is None and len([x for x in live if x["peer_id"] not in gone]) >= target:
            t.target_at = time.time()
        if t.new_exit_at is None:
            for mid in state.sent:
                e = client.status(mid)
                if (
                    e is not None
                    and e.state is State.DELIVERED
                    and e.finished_at
                    and e.finished_at > t.at
                    and e.exit is not None
                    and e.exit.peer_id() != t.peer_id
                ):
                    if t.new_exit_at is None or e.finished_at < t.new_exit_at:
                        t.new_exit_at = e.finished_at


async def _refresh(live, state, cluster, client, sink) -> None:
    while True:
        live.update(_render(state, cluster, client, sink))
        await trio.sleep(0.25)


def _counts(state: DemoState, client: Client, sink: SmtpSink) -> dict:
    delivered, dups = sink.delivered()
    pending = sum(
        1 for m in state.sent if (e := client.status(m)) is not None and not e.state.finished
    )
    failed = sum(
        1 for m in state.sent if (e := client.status(m)) is not None and e.state is State.FAILED
    )
    return {
        "sent": len(state.sent),
        "delivered": delivered,
        "duplicates": dups,
        "pending": pending,
        "failed": failed,
        "lost": max(0, len(state.sent) - delivered - pending),
    }


def _render(state: DemoState, cluster: Cluster, client: Client, sink: SmtpSink):
    exits_state = {x["peer_id"]: x for x in state.exits_view.get("exits", [])}
    nodes = Table(title="nodes", expand=False)
    for col in ("node", "roles", "process", "exit state"):
        nodes.add_column(col)
    for n in cluster.nodes:
        roles = state.roles.get(n.peer_id, n.roles)
        proc = "running" if n.killed_at is None else ("killed" if not n.alive else "frozen")
        x = exits_state.get(n.peer_id)
        style = "red" if n.killed_at else ("green" if "exit" in roles else "")
        nodes.add_row(
            f"node{n.index:02d}", ",".join(roles), proc, x["state"] if x else "", style=style
        )
    c = _counts(state, client, sink)
    live_exits = sum(1 for x in exits_state.values() if x["state"] != "dead")
    msgs = Table(title="messages", show_header=False)
    for k, v in c.items():
        msgs.add_row(k, str(v), style="bold red" if k == "lost" and v else None)
    msgs.add_row(
        "live exits", f"{live_exits} (target {state.exits_view.get('target_live_exits', '?')})"
    )
    downs = Table(title="takedowns")
    for col in ("at", "exit", "how", "next delivery via another exit", "live exits back at target"):
        downs.add_column(col)
    for t in state.takedowns:
        downs.add_row(*t.row(state.t0))
    events = "\n".join(state.promotions[-6:]) or "no promotions yet"
    return Group(
        f"[bold]Hydra demo[/bold] — {state.phase}, {time.time() - state.t0:.0f} s",
        nodes,
        msgs,
        downs,
        f"[bold]promotions[/bold]\n{events}",
    )


def _summary(state, client, sink, nodes, exits, standby, duration) -> dict:
    c = _counts(state, client, sink)
    return {
        "nodes": nodes,
        "exits": exits,
        "standby": standby,
        "duration_s": duration,
        **c,
        "promotions": len(state.promotions),
        "takedowns": [
            {
                "node": f"node{t.node:02d}",
                "how": t.how,
                "at_s": round(t.at - state.t0, 2),
                "next_delivery_via_other_exit_s": (
                    round(t.new_exit_at - t.at, 2) if t.new_exit_at else None
                ),
                "live_exits_back_at_target_s": (
                    round(t.target_at - t.at, 2) if t.target_at else None
                ),
            }
            for t in state.takedowns
        ],
        "ok": c["lost"] == 0 and c["pending"] == 0 and c["delivered"] == c["sent"],
    }


def _print_summary(console: Console, s: dict) -> None:
    verdict = (
        "[green]delivered = sent, lost = 0[/green]" if s["ok"] else "[red]NOT all delivered[/red]"
    )
    console.print(
        f"\n[bold]summary[/bold]: sent {s['sent']}, delivered {s['delivered']}, "
        f"duplicates {s['duplicates']}, pending {s['pending']}, lost {s['lost']} — {verdict}"
    )
    for t in s["takedowns"]:
        console.print(
            f"  {t['node']} {t['how']} at {t['at_s']} s: next delivery via another exit after "
            f"{t['next_delivery_via_other_exit_s']} s, live exits back at target after "
            f"{t['live_exits_back_at_target_s']} s"
        )
