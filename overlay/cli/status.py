"""Commands that ask a running node through its control endpoint: ``status``,
``peers``, ``exits`` and ``console`` (a link to the web console)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..home import dialable
from .util import (
    EXIT_USAGE,
    HomeOpt,
    JsonOpt,
    cell,
    err,
    fail,
    human_time,
    open_home,
    out,
    print_summary,
)


def _get(home: Path | None, route: str) -> dict:
    """GET a route of the running node's control endpoint, with the token from its home."""
    from ..control import control_get

    return control_get(open_home(home).path, route)


def status(
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Live view (q or Ctrl-C quits); plain lines when not on a terminal.",
        ),
    ] = False,
    refresh: Annotated[
        float, typer.Option("--refresh", help="Seconds between two updates of --watch.")
    ] = 1.0,
) -> None:
    """Show a running node's state and the addresses others can dial."""
    if watch:
        if as_json:
            raise fail("--watch and --json do not go together", EXIT_USAGE)
        if not 0.1 <= refresh <= 60:
            raise fail(f"--refresh {refresh:g}: choose 0.1 to 60 seconds", EXIT_USAGE)
        from ..console.watch import watch as run_watch

        try:
            run_watch(open_home(home).path, refresh, out)
        except KeyboardInterrupt:
            pass
        return
    st = _get(home, "/status")
    feeds = st.get("feeds", [])
    addresses = dialable(
        list(st.get("listen", []))
        + [f["addr"] for f in feeds if f.get("state", "up") == "up" and f.get("announced", True)],
        st["peer_id"],
    )
    if as_json:
        print(json.dumps(st | {"addresses": addresses}, indent=2))
        return
    summary = {
        k: v for k, v in st.items() if k not in ("feeds", "listen") and not isinstance(v, dict)
    }
    if isinstance(summary.get("uptime"), int | float):
        summary["uptime"] = f"{summary['uptime']:.0f} s"
    summary["addresses"] = addresses
    print_summary(summary)
    t = Table(title="feeds")
    t.add_column("feed", no_wrap=True, overflow="ignore")
    for col in ("network", "state", "last ok (s ago)", "conns", "bytes in", "bytes out"):
        t.add_column(col)
    for f in feeds:
        t.add_row(
            f["addr"],
            cell(f.get("network")),
            cell(f.get("state")),
            cell(f.get("last_ok")),
            cell(f.get("conns")),
            cell(f.get("bytes_in")),
            cell(f.get("bytes_out")),
        )
    out.print(t)
    if isinstance(st.get("limits"), dict):
        out.print(_limits_table(st["limits"]))


def _limits_table(lim: dict) -> Table:
    """``[limits]`` caps: configured value, current use, what they refused or held."""

    def cap(v) -> str:
        return "no cap" if not v else str(v)

    bw = lim.get("bandwidth", {})
    conns = lim.get("connections", {})
    ex = lim.get("exit_deliveries", {})
    refused = conns.get("refused", {})
    t = Table(title="limits")
    t.add_column("limit", no_wrap=True)
    for col in ("configured", "in use", "refused / held"):
        t.add_column(col)
    t.add_row(
        "bandwidth_rate (B/s)",
        cap(bw.get("rate")),
        f"{cell(bw.get('bytes_per_s'))} B/s (10 s)",
        f"{cell(bw.get('dropped_packets'))} packets dropped",
    )
    t.add_row(
        "bandwidth_burst (B)",
        cap(bw.get("burst")),
        "-" if bw.get("available") is None else f"{bw['available']} B available",
        "",
    )
    t.add_row(
        "max_connections",
        cell(conns.get("max_connections")),
        f"{cell(conns.get('total'))} ({cell(conns.get('outbound'))} outbound)",
        f"{cell(refused.get('max_connections'))} refused",
    )
    t.add_row(
        "max_inbound",
        cell(conns.get("max_inbound")),
        cell(conns.get("inbound")),
        f"{cell(refused.get('max_inbound'))} refused",
    )
    waiting = ex.get("waiting") or 0
    t.add_row(
        "exit_deliveries_per_minute",
        cap(ex.get("per_minute")),
        f"{cell(ex.get('last_minute'))} in the last minute",
        (f"OVER CAP: {waiting} waiting; " if waiting else "")
        + f"{cell(ex.get('delayed'))} held so far",
    )
    return t


def peers(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List a running node's connected peers."""
    data = _get(home, "/peers")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    t = Table()
    t.add_column("peer id", no_wrap=True, overflow="ignore")
    t.add_column("roles")
    t.add_column("address", no_wrap=True, overflow="ignore")
    for col in ("connected (s)", "sync ok/failed", "score"):
        t.add_column(col)
    for p in data["peers"]:
        t.add_row(
            p["peer_id"],
            ",".join(p["roles"]),
            p["address"],
            str(p["connected_for"]),
            f"{p['sync_ok']}/{p['sync_failed']}",
            str(p["score"]),
        )
    out.print(t)


def exits(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Exits and standbys a running node knows, live count against target, pool decisions."""
    data = _get(home, "/exits")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    now = time.time()
    live, target = data.get("live_exits"), data.get("target_live_exits")
    mode = data.get("mode", "")
    out.print(
        f"live exits [bold]{cell(live)}[/bold] of target {cell(target)}"
        + (f" (mode {mode})" if mode else "")
    )
    t = Table()
    t.add_column("peer id", no_wrap=True, overflow="ignore")
    for col in ("role", "state", "since", "seq", "policy"):
        t.add_column(col)
    for role, rows in (("exit", data.get("exits", [])), ("standby", data.get("standby", []))):
        for x in rows:
            t.add_row(
                x["peer_id"],
                role,
                x["state"],
                human_time(x["since"], now),
                str(x["seq"]),
                " ".join(x["policy"]),
            )
    out.print(t)
    events = data.get("events", [])
    if not events:
        out.print("pool decisions: none yet")
        return
    out.print("pool decisions (oldest first):")
    for ev in events:
        out.print(
            f"  {human_time(ev['at'], now)}  {ev['kind']:<9} live {ev['live']}  {escape(ev['why'])}"
        )


# ---------------------------------------------------------------- console
def console_command(
    home: HomeOpt = None,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the link in this machine's web browser.")
    ] = False,
) -> None:
    """Print a one-time link that opens the node's web console in a browser.

    The link holds a ticket valid for 60 s and one use; the browser trades it
    for a session cookie (HttpOnly, 12 h). The console is served on the node's
    loopback control endpoint only: from another machine, forward the same port
    (ssh -L PORT:127.0.0.1:PORT).
    """
    import httpx

    from ..control import TICKET_TTL, auth_headers, control_answer, control_url

    h = open_home(home)
    url = control_url(h.path)
    headers = auth_headers(h.path)
    route = "/console/ticket"
    answer = control_answer(
        url,
        route,
        lambda: httpx.post(url + route, headers=headers, timeout=5, trust_env=False),
        h.path,
    )
    link = url + answer["path"]
    print(link)
    err.print(f"one-time link, valid {TICKET_TTL:.0f} s; the browser then keeps a session cookie")
    if open_browser:
        import webbrowser

        if not webbrowser.open(link):
            err.print("no browser found here: open the link above by hand")
