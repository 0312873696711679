"""``overlay demo``: a local overlay whose exits are taken down while messages flow.

Starts N ``overlay run`` processes on loopback (some exits, some standby exits,
relays), a local SMTP sink, and a light client that sends a steady stream of
messages through the overlay. Exits are then taken down one after another —
alternately killed (SIGKILL) and frozen (SIGSTOP: every feed of the node goes
silent at once, as when its links are cut) — while the terminal shows, as they
happen, the nodes and their roles, live exits, messages sent / delivered /
pending / lost and which exit delivered them, and a timeline: takedowns, the
entry node seeing an exit die, standbys promoting themselves, the first
delivery through each exit. At the end every process is stopped and a summary
is printed (``--json`` for scripts).

Promotions are read from the promoting nodes themselves (the event ring each
node serves at ``/console/state``), not inferred from role changes between two
reads of a record list, which missed every promotion made before the demo's
first read (standbys promote during start-up, while the exits are not yet
verified) and showed "no promotions yet" while the nodes logged
``exit pool: promote``.

However the demo ends, its node processes end too: SIGTERM, SIGHUP and SIGINT
stop the demo cleanly (``run_demo_until_signal``), and every node is started
with a parent-death signal (``overlay/devtools/cluster.py``), so even a SIGKILL of the
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
from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..client import Client
from ..control import auth_headers
from ..core.outbox import State
from .cluster import Cluster


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
class Promotion:
    node: int
    at: float
    why: str


@dataclass
class DemoState:
    t0: float = 0.0
    sent: list[bytes] = field(default_factory=list)
    tokens: dict[bytes, str] = field(default_factory=dict)
    takedowns: list[Takedown] = field(default_factory=list)
    promotions: list[Promotion] = field(default_factory=list)
    exits_view: dict = field(default_factory=dict)
    roles: dict[str, list[str]] = field(default_factory=dict)
    phase: str = "starting"
    # (at, style, text), oldest first: what the terminal's timeline shows
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    event_seq: dict[int, int] = field(default_factory=dict)  # node index -> last event seen
    exit_states: dict[str, str] = field(default_factory=dict)  # exit peer id -> as last shown
    delivered_via: dict[str, int] = field(default_factory=dict)  # exit peer id -> deliveries
    counted: set[bytes] = field(default_factory=set)  # message ids counted in delivered_via

    def note(self, at: float, style: str, text: str) -> None:
        self.timeline.append((at, style, text))
        del self.timeline[:-200]


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
                # the nodes' last events (a node copies its exit pool's decisions
                # into its event ring once a second): the summary counts them all
                await trio.sleep(1.2)
                with trio.move_on_after(10):
                    await _poll_events(state, cluster)
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
    state.note(victim.killed_at, "bold red", f"takedown: node{victim.index:02d} (exit) {how}")


# what the timeline shows of the entry node's events (kind -> style); promotions
# come from the promoting nodes themselves
ENTRY_EVENTS = {
    "dead": "red",
    "alive": "green",
    "leave": "red",
    "deficit": "yellow",
    "restored": "green",
    "stepped-back": "yellow",
}


def _name(cluster: Cluster, peer_id: str) -> str:
    n = next((n for n in cluster.nodes if n.peer_id == peer_id), None)
    return f"node{n.index:02d}" if n is not None else "…" + peer_id[-8:]


async def _events(http, state: DemoState, cluster: Cluster, node) -> list[dict]:
    """New events of a running node (its ``/console/state``), at most once each."""
    since = state.event_seq.get(node.index, 0)
    r = await http.get(
        node.control + "/console/state",
        params={"since": since},
        headers=auth_headers(node.home.path),
        timeout=2,
    )
    snap = r.json()
    state.event_seq[node.index] = snap["last_seq"]
    return snap["events"]


def _entry_event(state: DemoState, cluster: Cluster, ev: dict) -> None:
    kind = ev["kind"]
    style = ENTRY_EVENTS.get(kind)
    if style is None:
        return
    if kind in ("dead", "alive", "leave"):
        if ev.get("role") not in ("exit", "standby"):
            return  # relays coming and going on a busy machine: noise here
        peer = ev.get("peer", "")
        before = state.exit_states.get(peer)
        state.exit_states[peer] = kind
        if kind == "alive" and before != "dead":
            return  # a suspicion refuted, not a death undone
    if kind in ("dead", "alive", "leave"):
        what = {"dead": "is dead", "alive": "is alive again", "leave": "left"}[kind]
        text = f"entry sees {_name(cluster, ev.get('peer', ''))} ({ev['role']}) {what}"
    else:
        text = "entry: " + ev["text"]
    state.note(ev["at"], style, text)


async def _poll_events(state: DemoState, cluster: Cluster, http=None) -> None:
    """New events of the entry node (deaths, the pool) and of every standby exit
    that still answers (its own promotions and step-backs)."""
    if http is None:
        async with httpx.AsyncClient(trust_env=False) as http:
            return await _poll_events(state, cluster, http)
    entry = cluster.nodes[0]
    for node in [entry] + [n for n in cluster.nodes if "standby-exit" in n.roles]:
        if node.killed_at is not None or not node.alive:
            continue  # a frozen node would not answer
        try:
            for ev in await _events(http, state, cluster, node):
                if node is entry:
                    _entry_event(state, cluster, ev)
                elif ev["kind"] in ("promote", "step-back"):
                    _own_pool_event(state, node, ev)
        except (httpx.HTTPError, ValueError, KeyError):
            pass


async def _watch(state: DemoState, cluster: Cluster, client: Client) -> None:
    entry = cluster.nodes[0]
    headers = auth_headers(entry.home.path)
    rounds = 0
    async with httpx.AsyncClient(headers=headers, trust_env=False) as http:
        while True:
            rounds += 1
            try:
                view = (await http.get(entry.control + "/exits", timeout=2)).json()
                recs = (await http.get(entry.control + "/records", timeout=2)).json()
                state.exits_view = view
                for r in recs["records"]:
                    state.roles[r["peer_id"]] = r.get("roles", [])
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if rounds % 4 == 1:  # events once a second: the nodes are busy enough
                await _poll_events(state, cluster, http)
            _score_takedowns(state, client)
            _count_deliveries(state, cluster, client)
            await trio.sleep(0.25)


def _own_pool_event(state: DemoState, node, ev: dict) -> None:
    why = ev["text"].partition("(")[2].rstrip(")") or ev["text"]
    if ev["kind"] == "promote":
        state.promotions.append(Promotion(node.index, ev["at"], why))
        state.note(ev["at"], "bold green", f"node{node.index:02d} promoted itself to exit ({why})")
    else:
        state.note(ev["at"], "yellow", f"node{node.index:02d} stepped back to standby ({why})")


def _count_deliveries(state: DemoState, cluster: Cluster, client: Client) -> None:
    """Deliveries per exit; the first delivery through each exit goes on the timeline."""
    for mid in state.sent:
        if mid in state.counted:
            continue
        e = client.status(mid)
        if e is None or e.state is not State.DELIVERED or e.exit is None:
            continue
        state.counted.add(mid)
        pid = e.exit.peer_id()
        n = state.delivered_via.get(pid, 0)
        state.delivered_via[pid] = n + 1
        if n == 0:
            state.note(
                e.finished_at or time.time(),
                "cyan",
                f"first delivery via {_name(cluster, pid)}",
            )


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


def _missing(state: DemoState, client: Client, sink: SmtpSink) -> list[dict]:
    """The messages the SMTP sink never got, with what the client knows of each."""
    with sink.lock:
        got = set(sink.counts)
    out = []
    for m in state.sent:
        if state.tokens.get(m) in got:
            continue
        e = client.status(m)
        out.append(
            {
                "message_id": m.hex(),
                "state": e.state.name.lower() if e is not None else "unknown",
                "reason": e.reason if e is not None else "",
                "exit": e.exit.peer_id() if e is not None and e.exit is not None else None,
            }
        )
    return out


def _render(state: DemoState, cluster: Cluster, client: Client, sink: SmtpSink):
    exits_state = {x["peer_id"]: x for x in state.exits_view.get("exits", [])}
    nodes = Table(title="nodes", expand=False)
    for col in ("node", "roles", "process", "exit state", "delivered"):
        nodes.add_column(col)
    for n in cluster.nodes:
        roles = state.roles.get(n.peer_id, n.roles)
        proc = "running" if n.killed_at is None else ("killed" if not n.alive else "frozen")
        x = exits_state.get(n.peer_id)
        style = "red" if n.killed_at else ("green" if "exit" in roles else "")
        via = state.delivered_via.get(n.peer_id)
        nodes.add_row(
            f"node{n.index:02d}",
            ",".join(roles),
            proc,
            x["state"] if x else "",
            str(via) if via else "",
            style=style,
        )
    c = _counts(state, client, sink)
    live_exits = sum(1 for x in exits_state.values() if x["state"] != "dead")
    msgs = Table(title="messages", show_header=False)
    for k, v in c.items():
        msgs.add_row(k, str(v), style="bold red" if k == "lost" and v else None)
    msgs.add_row(
        "live exits", f"{live_exits} (target {state.exits_view.get('target_live_exits', '?')})"
    )
    msgs.add_row("promotions", str(len(state.promotions)))
    downs = Table(title="takedowns")
    for col in ("at", "exit", "how", "next delivery via another exit", "live exits back at target"):
        downs.add_column(col)
    for t in state.takedowns:
        downs.add_row(*t.row(state.t0))
    timeline = Text()
    for at, style, text in sorted(state.timeline)[-12:]:
        timeline.append(f"{at - state.t0:6.1f} s  ", style="dim")
        timeline.append(text + "\n", style=style)
    if not state.timeline:
        timeline.append("nothing yet", style="dim")
    return Group(
        f"[bold]Hydra demo[/bold] — {state.phase}, {time.time() - state.t0:.0f} s",
        Columns([nodes, Group(msgs, downs)]),
        "[bold]timeline[/bold] (newest last)",
        timeline,
    )


def _summary(state, client, sink, nodes, exits, standby, duration) -> dict:
    c = _counts(state, client, sink)
    return {
        "nodes": nodes,
        "exits": exits,
        "standby": standby,
        "duration_s": duration,
        **c,
        "not_delivered": _missing(state, client, sink),
        "promotions": len(state.promotions),
        "promoted": [
            {"node": f"node{p.node:02d}", "at_s": round(p.at - state.t0, 2), "why": p.why}
            for p in sorted(state.promotions, key=lambda p: p.at)
        ],
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
    for m in s["not_delivered"]:
        console.print(
            f"  [red]not at the sink[/red]: {m['message_id'][:8]} ({m['state']}"
            + (f": {m['reason']}" if m["reason"] else "")
            + ")"
        )
    if not s["promoted"]:
        console.print("  promotions: none (no standby exit promoted itself)")
    for p in s["promoted"]:
        console.print(f"  {p['node']} promoted itself to exit at {p['at_s']} s ({p['why']})")
