"""``overlay`` command line: node and user commands."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
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
    err.print(f"[red]error:[/red] {message}")
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
    if h.db_path.exists():
        with RecordStore(h.db_path) as st:
            rec = st.get(key.node_id, now)
        if rec is not None and not rec.is_tombstone and rec.expires_at - now > 60:
            return rec
    rec = h.make_record(now=now)
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


@app.command()
def demo() -> None:
    """Run a local demonstration with no set-up."""
    from .demo import run_record_demo

    raise typer.Exit(run_record_demo(console))


def main() -> None:
    try:
        app()
    except LocalError as e:  # pragma: no cover - last resort for unexpected local errors
        err.print(f"[red]error:[/red] {e}")
        sys.exit(1)
