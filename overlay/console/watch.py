"""``overlay status --watch``: the node's live view in a terminal, or plain lines.

Reads ``/console/state`` of the running node once per refresh (the same snapshot
the web console shows) and draws it with ``rich.live.Live``: roles and dialable
addresses, peers and records, feeds with their health and traffic, the exit
pool, relayed packets and bytes per second, the delivery queue, and the latest
events with their times. ``q`` or Ctrl-C quits.

When stdout is not a terminal it prints plain lines instead: every new event as
it comes, and a one-line summary every ``PLAIN_SUMMARY_EVERY`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..control import auth_headers, control_answer, control_url
from ..errors import LocalError

PLAIN_SUMMARY_EVERY = 10.0
EVENT_LINES = 12
STATE_STYLE = {
    "up": "green",
    "alive": "green",
    "suspect": "yellow",
    "probing": "yellow",
    "degraded": "yellow",
    "down": "red",
    "dead": "red",
}
KIND_STYLE = {
    "dead": "red",
    "peer-down": "red",
    "leave": "red",
    "suspect": "yellow",
    "deficit": "yellow",
    "feed": "yellow",
    "promote": "green",
    "promoted": "green",
    "restored": "green",
    "alive": "green",
    "join": "green",
    "joined": "green",
    "peer-up": "green",
}


def hhmmss(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for prefix in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{prefix}{unit}" if not prefix else f"{n:.1f}{prefix}{unit}"
        n /= 1000
    return f"{n:.1f}T{unit}"


def short(peer_id: str) -> str:
    return "…" + peer_id[-8:] if peer_id else ""


def event_line(e: dict) -> str:
    return f"{hhmmss(e['at'])}  {e['kind']:<12} {e['text']}"


def summary_line(s: dict) -> str:
    c, pool, relay = s["counts"], s.get("pool") or {}, s["relay"]
    q = s.get("delivery_queue")
    feeds = " ".join(f"{f['state']}" for f in s["feeds"]) or "-"
    return (
        f"{hhmmss(s['now'])}  peers {c['peers']}  members {c['members']}  records {c['records']}"
        f"  exits {pool.get('live', '-')}/{pool.get('target', '-')}"
        f" (suspect {pool.get('suspect', 0)}, dead {pool.get('dead', 0)},"
        f" standby {pool.get('standby', 0)})  feeds {feeds}"
        f"  relay {relay['packets_in_per_s']:.1f} pkt/s {human(relay['bytes_out_per_s'], 'B')}/s"
        + (f"  queue {q['pending']}" if q else "")
    )


def render(s: dict, events: list[dict], *, error: str = "", height: int = 50):
    """The live view of one snapshot (a rich renderable)."""
    c, pool, relay = s["counts"], s.get("pool") or {}, s["relay"]
    head = Text.assemble(
        ("Hydra node ", "bold"),
        (s["peer_id"], "cyan"),
        f"  roles {', '.join(s['roles'])}  up {s['uptime']:.0f} s  ",
        (f"{hhmmss(s['now'])}", "dim"),
        ("   q quits", "dim"),
    )
    parts: list = [head]
    if error:
        parts.append(Text(f"node not answering: {error}", style="bold red"))
    for a in s["addresses"][:4]:
        parts.append(Text(f"  address  {a}", style="dim"))
    q = s.get("delivery_queue")
    t = s["traffic"]
    facts = Table.grid(padding=(0, 3))
    facts.add_row(
        f"peers [bold]{c['peers']}[/bold]",
        f"members [bold]{c['members']}[/bold]",
        f"records [bold]{c['records']}[/bold]",
        f"unverified {c['unverified']}",
    )
    facts.add_row(
        f"relayed [bold]{relay['packets_in_per_s']:.1f}[/bold] pkt/s in,"
        f" {relay['packets_out_per_s']:.1f} out",
        f"[bold]{human(relay['bytes_out_per_s'], 'B')}[/bold]/s out",
        "delivery queue "
        + (f"[bold]{q['pending']}[/bold] pending, {q['in_flight']} in flight" if q else "-"),
        f"traffic gossip {human(t['gossip'], 'B')}/s sync {human(t['sync'], 'B')}/s",
    )
    parts.append(facts)
    feeds = Table(title="feeds", title_justify="left", expand=False)
    for col in ("feed", "network", "state", "conns", "in", "out"):
        feeds.add_column(col, no_wrap=col == "feed", overflow="ellipsis", max_width=48)
    for f in s["feeds"]:
        feeds.add_row(
            f["addr"],
            str(f.get("network") or "-"),
            Text(str(f["state"]), style=STATE_STYLE.get(f["state"], "")),
            str(f.get("conns", "-")),
            human(f.get("bytes_in"), "B"),
            human(f.get("bytes_out"), "B"),
        )
    ex = Table(
        title=(
            f"exit pool: live [bold]{pool.get('live', '-')}[/bold] of target"
            f" {pool.get('target', '-')}, suspect {pool.get('suspect', 0)},"
            f" dead {pool.get('dead', 0)}, standby {pool.get('standby', 0)}"
        ),
        title_justify="left",
    )
    for col in ("peer", "role", "state", "since"):
        ex.add_column(col)
    for m in pool.get("members", []):
        ex.add_row(
            short(m["peer_id"]),
            "exit (promoted)" if m.get("promoted") else m["role"],
            Text(m["state"], style=STATE_STYLE.get(m["state"], "")),
            hhmmss(m["since"]),
        )
    parts += [feeds, ex]
    ev = Table(title="events", title_justify="left", show_header=False, pad_edge=False, box=None)
    ev.add_column("at", style="dim")
    ev.add_column("kind")
    ev.add_column("what", overflow="fold")
    room = max(4, min(EVENT_LINES, height - 16 - len(s["feeds"]) - len(pool.get("members", []))))
    for e in list(events)[-room:][::-1]:
        ev.add_row(
            hhmmss(e["at"]), Text(e["kind"], style=KIND_STYLE.get(e["kind"], "")), escape(e["text"])
        )
    if not events:
        ev.add_row("", "", "no events yet")
    parts.append(ev)
    return Group(*parts)


class Source:
    """The running node's ``/console/state``, asked with the home's token."""

    def __init__(self, home: Path, timeout: float = 3.0) -> None:
        self.home = home
        self.url = control_url(home)
        self.http = httpx.Client(
            base_url=self.url, headers=auth_headers(home), timeout=timeout, trust_env=False
        )
        self.seq = 0
        self.events: deque[dict] = deque(maxlen=200)

    def fetch(self) -> dict:
        s = self._state(self.seq)
        if s["last_seq"] < self.seq:  # the node restarted: its numbering too
            self.seq, s = 0, self._state(0)
        self.events.extend(s["events"])
        self.seq = s["last_seq"]
        return s

    def _state(self, since: int) -> dict:
        route = "/console/state"
        return control_answer(
            self.url, route, lambda: self.http.get(route, params={"since": since}), self.home
        )

    def close(self) -> None:
        self.http.close()


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], bool]]:
    """``wait(timeout) -> True if q was pressed``; stdin in cbreak mode meanwhile."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield lambda timeout: time.sleep(timeout) or False
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(timeout: float) -> bool:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                ch = os.read(fd, 32)
                if not ch:  # stdin closed
                    time.sleep(max(0.0, end - time.monotonic()))
                    return False
                if b"q" in ch.lower():
                    return True
        return False

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def watch(home: Path, refresh: float = 1.0, console: Console | None = None) -> None:
    """Run the live view until q or Ctrl-C (KeyboardInterrupt is the caller's)."""
    console = console or Console()
    src = Source(home)
    try:
        s = src.fetch()
        if not console.is_terminal:
            _plain(src, s, refresh, console)
            return
        with (
            _keys() as wait,
            Live(
                render(s, list(src.events), height=console.height),
                console=console,
                auto_refresh=False,
                screen=True,
                redirect_stderr=False,
            ) as live,
        ):
            while not wait(refresh):
                error = ""
                try:
                    s = src.fetch()
                except LocalError as e:
                    error = str(e)
                live.update(render(s, list(src.events), error=error, height=console.height))
                live.refresh()
    finally:
        src.close()


def _plain(src: Source, s: dict, refresh: float, console: Console) -> None:
    out = console.file

    def emit(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    emit(summary_line(s))
    for e in s["events"][-20:]:
        emit(event_line(e))
    last_summary = time.monotonic()
    while True:
        time.sleep(refresh)
        try:
            s = src.fetch()
        except LocalError as e:
            emit(f"{hhmmss(time.time())}  node not answering: {e}")
            continue
        for e in s["events"]:
            emit(event_line(e))
        if time.monotonic() - last_summary >= PLAIN_SUMMARY_EVERY:
            emit(summary_line(s))
            last_summary = time.monotonic()
