"""``overlay`` command line: node and user commands.

This module holds the app, registers the commands and reports errors; the
commands live by group: ``homes`` (init, record, config, seeds), ``node``
(run) with ``logs`` (its log), ``status`` (status, peers, exits, console:
questions to a running node), ``send`` (send, outbox, agent); ``util`` holds
what they share.

Every command checks all of its input before it starts anything, and reports a
problem as one line (``error: ...``) with an exit code from the table in
``overlay/cli/util.py`` (docs/volunteer.md, "Exit codes"). ``overlay --debug``
adds tracebacks.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import OverlayError
from ..sim.cli import sim_command
from .homes import config_app, init, record_app, seeds_app
from .logs import LIBRARY_BURST, LogFilter
from .node import run
from .send import agent, outbox, send
from .status import console_command, exits, peers, status
from .util import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    JsonOpt,
    err,
    exit_code,
    fail,
    one_line,
)

__all__ = ["LIBRARY_BURST", "LogFilter", "app", "main", "version"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Hydra overlay node and client.",
)
app.add_typer(record_app, name="record")
app.add_typer(config_app, name="config")
app.add_typer(seeds_app, name="seeds")

_debug = False


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("hydra-overlay")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        print(f"overlay {version()}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of errors (for bug reports).")
    ] = False,
) -> None:
    global _debug
    _debug = debug


# ---------------------------------------------------------------- demo
def demo(
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes in the local overlay.")] = 12,
    exits: Annotated[int, typer.Option("--exits", help="Exits at the start.")] = 3,
    standby: Annotated[int, typer.Option("--standby", help="Standby exits.")] = 3,
    duration: Annotated[float, typer.Option("--duration", help="Seconds of traffic.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a local overlay, take its exits down while messages flow, show what happens.

    SIGTERM, SIGHUP or SIGINT end the demo early and stop every node it started.
    """
    from ..devtools.demo import check_demo_args, run_demo_until_signal

    try:
        check_demo_args(nodes, exits, standby, duration)
    except ValueError as e:
        raise fail(str(e), EXIT_USAGE) from None
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    summary = run_demo_until_signal(
        nodes=nodes, exits=exits, standby=standby, duration=duration, as_json=as_json
    )
    raise typer.Exit(EXIT_OK if summary["ok"] else EXIT_FAILED)


# ---------------------------------------------------------------- the commands
# in the order `overlay --help` lists them (the groups record, config, seeds follow)
app.command()(init)
app.command()(run)
app.command()(status)
app.command()(peers)
app.command()(exits)
app.command()(demo)
app.command()(send)
app.command()(outbox)
app.command("console")(console_command)
app.command()(agent)
app.command("sim")(sim_command)


# ---------------------------------------------------------------- entry point
def _leaf(e: BaseException) -> BaseException:
    """The exception to report: an OverlayError inside (nested) exception groups if any."""
    while isinstance(e, BaseExceptionGroup):
        inner = [x for x in e.exceptions if not isinstance(x, KeyboardInterrupt)] or list(
            e.exceptions
        )
        e = next((x for x in inner if isinstance(_leaf(x), OverlayError)), inner[0])
    return e


def main(argv: list[str] | None = None) -> None:
    from typer import Abort
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="overlay")
        code = rv if isinstance(rv, int) else EXIT_OK
    except NoArgsIsHelpError as e:
        print(e.format_message())
        code = EXIT_OK
    except UsageError as e:
        path = e.ctx.command_path if e.ctx is not None else "overlay"
        err.print(
            f"[red]error:[/red] {escape(one_line(e.format_message()))}"
            f" (see `{escape(path)} --help`)"
        )
        code = EXIT_USAGE
    except ClickException as e:
        err.print(f"[red]error:[/red] {escape(one_line(e.format_message()))}")
        code = e.exit_code if e.exit_code not in (0, 2) else EXIT_USAGE
    except (Abort, KeyboardInterrupt):
        err.print("interrupted")
        code = 130
    except BaseException as e:  # noqa: BLE001 - the one place every error is reported
        leaf = _leaf(e)
        if isinstance(leaf, SystemExit):
            raise leaf from None
        if isinstance(leaf, KeyboardInterrupt):
            err.print("interrupted")
            code = 130
        elif isinstance(leaf, OverlayError):
            if _debug:
                traceback.print_exception(e)
            err.print(f"[red]error:[/red] {escape(one_line(str(leaf)))}")
            code = exit_code(leaf)
        elif isinstance(leaf, OSError) and leaf.strerror:
            # the machine said no (permissions, a full disk, a missing directory)
            if _debug:
                traceback.print_exception(e)
            where = f"{leaf.filename}: " if leaf.filename else ""
            err.print(f"[red]error:[/red] {escape(where + leaf.strerror)}")
            code = EXIT_FAILED
        else:
            if _debug:
                traceback.print_exception(e)
            err.print(
                f"[red]internal error:[/red] {escape(type(leaf).__name__)}:"
                f" {escape(one_line(str(leaf)))} (`overlay --debug ...` shows the traceback;"
                " please report it)"
            )
            code = EXIT_SOFTWARE
    sys.exit(code)
