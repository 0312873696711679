"""What the ``overlay`` commands share: exit codes, consoles, input checks, human output.

Exit codes (docs/volunteer.md, "Exit codes"), the same for every command:

====  ==========================================================================
0     done (``overlay run``: stopped by SIGTERM or SIGINT)
1     did not work this time: no ack yet, could not join, no running node, a
      port in use, the home in use by another process, an invalid record file
2     rejected for good (``overlay send``: the exit or destination refused)
64    bad command line: unknown option, a value that is not valid
70    internal error (a bug: ``overlay --debug ...`` shows the traceback)
78    bad configuration: config.toml invalid, no node home
====  ==========================================================================
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import ConfigError, LocalError, OverlayError
from ..home import Home, default_home

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REJECTED = 2
EXIT_USAGE = 64
EXIT_SOFTWARE = 70
EXIT_CONFIG = 78


class BadInput(LocalError):
    """A command-line value that cannot be used (exit 64)."""


def exit_code(e: BaseException) -> int:
    if isinstance(e, BadInput):
        return EXIT_USAGE
    if isinstance(e, ConfigError):
        return EXIT_CONFIG
    return EXIT_FAILED


def console(stderr: bool = False) -> Console:
    """A console that never wraps a line: when the output is not a terminal
    (a pipe, a file, the journal), lines are as long as their content."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return Console(stderr=stderr, soft_wrap=True, highlight=False, width=None if tty else 4096)


out = console()
err = console(stderr=True)


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print ``error: message`` (one line) and return the ``typer.Exit`` to raise."""
    err.print(f"[red]error:[/red] {escape(one_line(message))}")
    return typer.Exit(code)


def fail_for(e: OverlayError) -> typer.Exit:
    return fail(str(e), exit_code(e))


_REPR = re.compile(r"\b[A-Z]\w*(?:Error|Exception|Timeout)\((['\"])(.*?)\1\)")


def one_line(text: str) -> str:
    """``text`` on one line, with exception reprs (``SwarmException('x')``) as plain ``x``."""
    return _REPR.sub(r"\2", " ".join(str(text).split()))


# ---------------------------------------------------------------- input checks
def check_multiaddr(value: str, option: str, *, peer: bool = False) -> str:
    """A parseable multiaddr; with ``peer``, one that names a peer (``/p2p/<id>`` last)."""
    import multiaddr

    from ..crypto import NodeId

    example = "/ip4/203.0.113.5/tcp/4001/p2p/12D3KooW..." if peer else "/ip4/0.0.0.0/tcp/4001"
    try:
        multiaddr.Multiaddr(value)
    except Exception:  # noqa: BLE001 - multiaddr raises several types
        raise BadInput(f"{option} {value!r} is not a multiaddr (like {example})") from None
    if peer:
        head, sep, last = value.rstrip("/").rpartition("/p2p/")
        try:
            if not sep or "/" in last:
                raise ValueError
            NodeId.from_peer_id(last)
        except ValueError:
            raise BadInput(
                f"{option} {value!r} must end in /p2p/<peer id> (like {example})"
            ) from None
    return value


def check_listen(value: str, option: str = "--listen") -> str:
    from ..net.bindcheck import split_listen

    check_multiaddr(value, option)
    try:
        parts = split_listen(value)
    except ConfigError as e:
        raise BadInput(f"{option}: {e}") from None
    if parts is None:
        raise BadInput(
            f"{option} {value!r} must be /ip4/ADDR or /ip6/ADDR with /tcp/PORT or /udp/PORT"
        )
    return value


def check_roles(values: list[str]) -> list[str]:
    from ..records import Role

    try:
        Role.parse(values)
    except ValueError as e:
        raise BadInput(f"--role: {e}") from None
    return values


def check_policy(values: list[str]) -> list[str]:
    from ..records import check_rule

    for rule in values:
        try:
            check_rule(rule)
        except Exception:  # noqa: BLE001 - any rejection means the same to the user
            raise BadInput(
                f"--policy {rule!r} is not an exit policy rule (KIND:GLOB, kind smtp, maildir,"
                " http or https, e.g. smtp:*@example.org)"
            ) from None
    return values


def parse_operators(values: list[str]) -> list[bytes]:
    """Pinned operator keys: 64 hex digits or a peer id (12D3KooW...)."""
    from ..crypto import NodeId

    keys = []
    for v in values:
        t = v.strip()
        try:
            keys.append(bytes(NodeId(bytes.fromhex(t)) if len(t) == 64 else NodeId.from_peer_id(t)))
        except ValueError:
            raise BadInput(
                f"--operator {v!r} is not an Ed25519 public key (64 hex digits or a peer id)"
            ) from None
    return keys


def check_threshold(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise BadInput(f"--threshold must be 1 or more, not {value}")
    return value


# ---------------------------------------------------------------- human output
def ago(delta: float) -> str:
    """A duration in words: "in 3 days" for the future, "5 min ago" for the past."""
    future, d = delta > 0, abs(delta)
    if d < 1:
        return "now"
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min"), (1, "s")):
        if d >= size:
            n = int(d // size)
            text = f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    return "now"  # pragma: no cover


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def human_time(t: float, now: float | None = None) -> str:
    """ISO 8601 (UTC) and how far from now: ``2026-01-02T03:04:05Z (in 3 days)``."""
    return f"{iso(t)} ({ago(t - (time.time() if now is None else now))})"


# ---------------------------------------------------------------- options and helpers of the commands
HomeOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional
    typer.Option("--home", help="Node home (default $HYDRA_HOME or ~/.hydra)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def open_home(path: Path | None) -> Home:
    return Home(path or default_home())


def checked(fn, *args, **kwargs):
    """Run an input check; a problem becomes a one-line error and exit 64."""
    try:
        return fn(*args, **kwargs)
    except OverlayError as e:
        raise fail_for(e) from None


def print_summary(summary: dict) -> None:
    """``key  value`` lines; lists one item per line; times in ISO 8601 and words."""
    width = max((len(k) for k in summary), default=0) + 2
    for k, v in summary.items():
        if isinstance(v, list):
            items = [str(x) for x in v] or ["-"]
        elif k in ("issued_at", "expires_at") and isinstance(v, int | float):
            items = [human_time(v)]
        else:
            items = ["-" if v is None else str(v)]
        out.print(f"[bold]{k:<{width}}[/bold]{escape(items[0])}")
        for item in items[1:]:
            out.print(" " * width + escape(item))


def cell(v) -> str:
    return "-" if v is None or v == "" else str(v)
