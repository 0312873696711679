"""``overlay`` command line: node and user commands."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import records
from .config import HOME_LISTEN
from .errors import LocalError, OverlayError, RemoteError
from .home import Home, default_home, write_atomic

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Hydra overlay node and client.")
record_app = typer.Typer(
    no_args_is_help=True, help="Inspect, export and verify membership records."
)
app.add_typer(record_app, name="record")

console = Console()
err = Console(stderr=True)

HomeOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional
    typer.Option("--home", help="Node home (default $HYDRA_HOME or ~/.hydra)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _home(path: Path | None) -> Home:
    return Home(path or default_home())


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # one line, unwrapped
    return typer.Exit(code)


@app.command()
def init(
    home: HomeOpt = None,
    role: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--role", help="entry, relay, exit or standby-exit (repeatable)."),
    ] = None,
    listen: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--listen", help="Listen multiaddr (repeatable)."),
    ] = None,
    policy: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--policy", help="Exit policy rule kind:glob (repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing identity.")] = False,
) -> None:
    """Create a node home: Ed25519 node key, X25519 onion key, config.toml."""
    h = _home(home)
    try:
        Home.init(
            h.path,
            roles=role or ["relay"],
            listen=listen or list(HOME_LISTEN),
            exit_policy=policy,
            force=force,
        )
    except OverlayError as e:
        raise _fail(str(e)) from None
    key = h.signing_key()
    console.print(f"[green]created[/green] {h.path}")
    console.print(f"peer id   {key.node_id.peer_id()}")
    console.print(f"roles     {', '.join(role or ['relay'])}")
    console.print(f"config    {h.config_path}")


def _current_record(h: Home) -> records.ValidRecord:
    """The node's current record: the stored one if still valid, else a new one."""
    from .store import RecordStore

    now = time.time()
    key = h.signing_key()
    rec = None
    if h.db_path.exists():
        with RecordStore(h.db_path) as st:
            rec = st.get(key.node_id, now)
        if rec is not None and not rec.is_tombstone and rec.expires_at - now > 60:
            return rec
    rec = h.make_record(now=now, above=rec.seq if rec is not None else 0)
    with RecordStore(h.db_path) as st:
        st.put(rec)
    return rec


@record_app.command("show")
def record_show(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show this node's membership record."""
    try:
        rec = _current_record(_home(home))
    except OverlayError as e:
        raise _fail(str(e)) from None
    summary = rec.summary() | {"size": len(rec.encode())}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    t = Table(show_header=False, box=None)
    for k, v in summary.items():
        if isinstance(v, list):
            v = "\n".join(v) if v else "-"
        elif k in ("issued_at", "expires_at"):
            v = f"{v} ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(v))} UTC)"
        t.add_row(f"[bold]{k}[/bold]", str(v))
    console.print(t)


@record_app.command("export")
def record_export(
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    home: HomeOpt = None,
) -> None:
    """Write this node's record (binary, canonical CBOR) to a file."""
    try:
        rec = _current_record(_home(home))
    except OverlayError as e:
        raise _fail(str(e)) from None
    data = rec.encode()
    write_atomic(output, data, 0o644)
    console.print(f"wrote {len(data)} bytes to {output} (seq {rec.seq})")


@record_app.command("verify")
def record_verify(
    file: Annotated[Path, typer.Argument(help="Binary record file.")],
    as_json: JsonOpt = False,
) -> None:
    """Check a record file: exit 0 and a summary when valid, non-zero and the reason when not."""
    try:
        data = file.read_bytes()[: records.MAX_SIZE + 1]
    except OSError as e:
        raise _fail(f"cannot read {file}: {e.strerror}", 2) from None
    try:
        rec = records.validate(data, time.time())
    except RemoteError as e:
        if as_json:
            print(json.dumps({"valid": False, "reason": e.reason.value, "detail": e.detail}))
        else:
            err.print(
                f"[red]invalid[/red]: {e.reason.value}" + (f" ({e.detail})" if e.detail else "")
            )
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps({"valid": True} | rec.summary()))
        return
    console.print(f"[green]valid[/green] {rec.kind.name.lower()} ({len(data)} bytes)")
    _print_summary(rec.summary())


def _setup_logging(level: str, as_json: bool) -> None:
    import logging

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps(
                {
                    "ts": round(record.created, 3),
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "msg": record.getMessage(),
                }
            )

    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # py-libp2p logs routine dial failures as warnings; keep them out of a volunteer's log
    for noisy in ("libp2p", "multiaddr", "hypercorn"):
        logging.getLogger(noisy).setLevel(
            logging.ERROR if level.upper() != "DEBUG" else logging.DEBUG
        )


@app.command()
def run(
    home: HomeOpt = None,
    join: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--join", help="Multiaddr of a peer to join through (repeatable, tried in turn)."
        ),
    ] = None,
    seeds: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--seeds", help="Seed bundle source: file, URL or dns:NAME (repeatable)."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning")] = "info",
    log_json: Annotated[
        bool, typer.Option("--log-json", help="One JSON object per log line.")
    ] = False,
) -> None:
    """Run the node until interrupted (Ctrl-C)."""
    import trio

    from .runtime import Node

    _setup_logging(log_level, log_json)
    h = _home(home)
    try:
        cfg = h.config()
    except OverlayError as e:
        raise _fail(str(e)) from None

    async def main() -> None:
        join_addrs = list(join or [])
        if seeds or (not join_addrs and cfg.seed_sources):
            join_addrs += await _seed_addrs(h, cfg, list(seeds or cfg.seed_sources))
        async with Node(h, cfg, join=join_addrs) as node:
            err.print(f"[green]running[/green] {node.node_id.peer_id()}")
            for a in node.host.listen_addrs():
                err.print(f"  listening {a}")
            err.print(f"  control   {node.control_url}")
            if node.joined_via:
                err.print(f"  joined via {node.joined_via}; {len(node.view)} records")
            await trio.sleep_forever()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        err.print("stopped")
    except OverlayError as e:
        raise _fail(str(e)) from None


async def _seed_addrs(h: Home, cfg, sources: list[str]) -> list[str]:
    """Join addresses from the first verified seed bundle (see docs/operator.md)."""
    from bootstrap.fetch import fetch_bundle

    operators = [bytes.fromhex(k) for k in cfg.seed_operators]
    if not operators:
        raise LocalError(
            "seed sources need [seeds] operators (pinned operator keys) in config.toml"
        )
    result = await fetch_bundle(sources, operators, cfg.seed_threshold, h.path / "seeds-cache.cbor")
    for o in result.outcomes:  # a bad source is reported and skipped; others still count
        err.print(f"  seeds {o}", markup=False, highlight=False, soft_wrap=True)
    if result.bundle is None:
        raise LocalError("no valid seed bundle from any source and no cached bundle")
    return result.bundle.join_addrs()


def _get(home: Path | None, route: str) -> dict:
    """GET a route of the running node's control endpoint, with the token from its home."""
    from .control import control_get

    return control_get(_home(home).path, route)


@app.command()
def status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show a running node's state."""
    try:
        st = _get(home, "/status")
    except OverlayError as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps(st, indent=2))
        return
    feeds = st.pop("feeds", [])
    _print_summary({k: v for k, v in st.items() if not isinstance(v, dict)})
    t = Table(title="feeds")
    for col in ("feed", "network", "state", "last ok (s ago)", "conns", "bytes in", "bytes out"):
        t.add_column(col)

    def cell(v) -> str:
        return "-" if v is None or v == "" else str(v)

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
    console.print(t)


@app.command()
def peers(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List a running node's connected peers."""
    try:
        data = _get(home, "/peers")
    except OverlayError as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps(data, indent=2))
        return
    t = Table()
    for col in ("peer id", "roles", "address", "connected (s)", "sync ok/failed", "score"):
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
    console.print(t)


@app.command()
def exits(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List the exits a running node knows, with their liveness state."""
    try:
        data = _get(home, "/exits")
    except OverlayError as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps(data, indent=2))
        return
    t = Table()
    for col in ("peer id", "state", "since", "seq", "roles", "policy"):
        t.add_column(col)
    for x in data["exits"]:
        since = time.strftime("%H:%M:%S", time.localtime(x["since"]))
        t.add_row(
            x["peer_id"],
            x["state"],
            since,
            str(x["seq"]),
            ",".join(x["roles"]),
            " ".join(x["policy"]),
        )
    console.print(t)


@app.command()
def demo(
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes in the local overlay.")] = 12,
    exits: Annotated[int, typer.Option("--exits", help="Exits at the start.")] = 3,
    standby: Annotated[int, typer.Option("--standby", help="Standby exits.")] = 3,
    duration: Annotated[float, typer.Option("--duration", help="Seconds of traffic.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a local overlay, take its exits down while messages flow, show what happens."""
    import trio

    from .demo import run_demo

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    try:
        summary = trio.run(
            lambda: run_demo(
                nodes=nodes, exits=exits, standby=standby, duration=duration, as_json=as_json
            )
        )
    except ValueError as e:
        raise _fail(str(e), 2) from None
    raise typer.Exit(0 if summary["ok"] else 1)


from .cli_send import outbox, send  # noqa: E402 - commands defined in their own module
from .sim.cli import sim_command  # noqa: E402

app.command()(send)
app.command()(outbox)
app.command("sim")(sim_command)


def main() -> None:
    try:
        app()
    except LocalError as e:  # pragma: no cover - last resort for unexpected local errors
        err.print(f"[red]error:[/red] {e}")
        sys.exit(1)
