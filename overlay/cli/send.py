"""``overlay send`` and ``overlay outbox``: user commands around ``overlay.client``.

Plain functions with typer options; ``overlay/cli/__init__.py`` registers them with
``app.command()(send)`` and ``app.command()(outbox)``.

Exit codes of ``send``: 0 acknowledged (delivered, or durably queued at an
exit when ``--timeout`` ran out first), 1 no ack yet (the message stays in
the outbox and is resent by the next ``send`` or ``outbox --flush``) or a
local error, 2 rejected for good, 64 a bad option value (overlay/cli/util.py).
``outbox --flush``: 0 nothing left unfinished, 1 some messages still waiting
(listed).

The seed-bundle helpers here (``check_seed_sources``, ``seed_join_addrs``)
serve ``overlay run`` too: only the command line imports ``bootstrap``.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import LocalError, OverlayError, Reason
from ..home import Home, default_home
from .util import (
    EXIT_REJECTED,
    EXIT_USAGE,
    BadInput,
    check_multiaddr,
    check_threshold,
    fail,
    fail_for,
    parse_operators,
)
from .util import (
    console as make_console,
)

console = make_console()
err = make_console(stderr=True)

HomeOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional
    typer.Option("--home", help="Directory of the outbox (default $HYDRA_HOME or ~/.hydra)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ViaOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--via", help="Multiaddr (…/p2p/<peer id>) of an entry peer (repeatable)."),
]
SeedsOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--seeds", help="Seed bundle source: file, URL or dns:NAME (repeatable)."),
]
OperatorOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option(
        "--operator",
        help="Pinned seed operator key (hex, repeatable); default: seeds.operators of HOME.",
    ),
]
ThresholdOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--threshold", help="Operator signatures a bundle needs (default: config or 1)."),
]


def _entry_options(via, seeds, operator, threshold) -> tuple[list[str], list]:
    """Check --via, --seeds, --operator and --threshold before anything starts."""
    try:
        via_addrs = [check_multiaddr(v, "--via", peer=True) for v in via or []]
        pinned = parse_operators(list(operator or []))
        check_threshold(threshold)
        check_seed_sources(list(seeds or []))
    except OverlayError as e:
        raise fail_for(e) from None
    return via_addrs, pinned


def _quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("libp2p", "multiaddr", "hypercorn", "async_service", "aioquic"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


SEEDS_CACHE = "seeds-cache.cbor"


def check_seed_sources(values: list[str]) -> list[str]:
    from bootstrap.fetch import parse_source

    for v in values:
        try:
            parse_source(v)
        except LocalError as e:
            raise BadInput(f"--seeds {v!r}: {e}") from None
    return values


def describe_source(o) -> str:
    """One line for a seed source's outcome (bootstrap.resolve.SourceReport)."""
    return str(o)


async def seed_join_addrs(
    h: Home,
    cfg,
    sources: list[str],
    operators: list[bytes],
    threshold: int | None,
    report=None,
) -> list[str]:
    """Join addresses from the newest verified seed bundle (docs/operator.md).

    ``operators``/``threshold`` come from the command line, else from
    ``[seeds]`` in config.toml. The last good bundle is cached in
    HOME/seeds-cache.cbor; ``overlay seeds forget`` removes it.
    """
    from bootstrap.fetch import fetch_bundle

    keys = operators or parse_operators(cfg.seed_operators if cfg else [])
    if not keys:
        raise BadInput(
            "seed sources need pinned operator keys: --operator KEY or [seeds] operators"
            " in HOME/config.toml"
        )
    need = threshold or (cfg.seed_threshold if cfg else 1)
    if need > len(keys):
        raise BadInput(f"--threshold {need} is more than the {len(keys)} pinned operator key(s)")
    result = await fetch_bundle(sources, keys, need, h.path / SEEDS_CACHE)
    for o in result.outcomes:
        if report is not None:
            report(describe_source(o))
    if result.bundle is None:
        reasons = "; ".join(describe_source(o) for o in result.outcomes)
        old = result.expired_cache
        if old is not None and any(o.reason is Reason.ROLLED_BACK for o in result.outcomes):
            raise LocalError(
                f"the cached seed bundle (seq {old.seq}) has expired and every source offers an"
                f" older seq ({reasons}); if the operators really restarted their numbering, run"
                f" `overlay seeds forget --home {h.path}` and start again"
            )
        raise LocalError(f"no valid seed bundle from any source and no usable cache ({reasons})")
    return result.join_addrs()


def _report_skipped(line: str) -> None:
    """`overlay send` names only the seed sources it had to skip."""
    if ": skipped: " in line:
        err.print(line, markup=False, highlight=False, soft_wrap=True)


async def _entry_addrs(
    h: Home,
    via: list[str],
    seeds: list[str],
    operators: list[bytes],
    threshold: int | None,
) -> list[str]:
    """Where to enter the overlay: --via, else --seeds, else the home's running node or join list."""
    if via:
        return via
    cfg = h.config() if h.config_path.exists() else None
    if seeds:
        return await seed_join_addrs(h, cfg, seeds, operators, threshold, report=_report_skipped)
    addrs = _running_node_addrs(h)
    if not addrs and cfg is not None:
        addrs = list(cfg.join)
    if not addrs:
        raise LocalError("say where to enter the overlay: --via MULTIADDR or --seeds SOURCE")
    return addrs


def _running_node_addrs(h: Home) -> list[str]:
    """Listen addresses of the node running from this home, if any (wildcards -> loopback)."""
    from ..control import control_get

    try:
        listen = control_get(h.path, "/status", timeout=3).get("listen", [])
    except (LocalError, AttributeError):
        return []
    return [a.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/", 1) for a in listen]


def _client_settings(h: Home) -> dict:
    """Overlay-wide settings a client must share (``[onion]``) from the home's config."""
    if not h.config_path.exists():
        return {}
    cfg = h.config()
    return {"mix_delay": cfg.mix_delay, "epoch_length": cfg.onion_epoch_length}


AGENT_FILE = "agent.json"


def _running_agent(h: Home) -> int | None:
    """The pid of the ``overlay agent`` running on this home, if one is."""
    import os

    try:
        pid = int(json.loads((h.path / AGENT_FILE).read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


def _handoff(h: Home, to: str, body: bytes, timeout: float, until: str):
    """Put the message in the outbox a running agent serves, then follow its state."""
    from ..client import queue_message
    from ..core.outbox import State
    from ..storage.outbox import OutboxStore

    with OutboxStore.in_home(h.path) as store:
        mid = queue_message(store, to, body, time.time())
        deadline = time.monotonic() + timeout
        while True:
            e = store.get(mid)
            if e.state.finished or (until == "queued" and e.state is State.QUEUED):
                return e
            if time.monotonic() >= deadline:
                return e
            time.sleep(0.2)


def agent(
    home: HomeOpt = None,
    via: ViaOpt = None,
    seeds: SeedsOpt = None,
    hops: Annotated[
        int, typer.Option("--hops", help="Nodes per path, entry and exit included.")
    ] = 3,
    rate: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--rate", help="Packets per second (default [cover] rate)."),
    ] = None,
    loop_rate: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--loop-rate", help="Loop-cover packets per second ([cover] loop_rate)."),
    ] = None,
    report: Annotated[
        float, typer.Option("--report", help="Seconds between status lines (0: none).")
    ] = 60.0,
    operator: OperatorOpt = None,
    threshold: ThresholdOpt = None,
) -> None:
    """Run a long-lived client that sends cover traffic; `overlay send` hands it messages.

    It sends at Poisson rate --rate: a waiting message if there is one, else a
    drop-cover packet, and loop-cover packets that come back through its entry.
    Runs until Ctrl-C; prints what it sent (bytes per second) and lost loops.
    """
    import os

    import trio

    from ..client import Client
    from ..config import Config

    _quiet_logging()
    via_addrs, pinned = _entry_options(via, seeds, operator, threshold)
    if not 2 <= hops <= 5:
        raise fail(f"--hops must be 2 to 5, not {hops}", EXIT_USAGE)
    h = Home(home or default_home())
    try:
        cfg = h.config() if h.config_path.exists() else Config()
    except OverlayError as e:
        raise fail_for(e) from None
    rate = cfg.cover_rate if rate is None else rate
    loop_rate = cfg.cover_loop_rate if loop_rate is None else loop_rate
    if not (0 < rate <= 100 and 0 <= loop_rate <= 100):
        raise fail("--rate must be in (0, 100] and --loop-rate in [0, 100]", EXIT_USAGE)
    if _running_agent(h) is not None:
        raise fail(f"an agent already runs on {h.path}")

    async def main():
        addrs = await _entry_addrs(h, via_addrs, list(seeds or []), pinned, threshold)
        h.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker = h.path / AGENT_FILE
        async with Client(
            h.path, addrs, hops=hops, cover_rate=rate, loop_rate=loop_rate, **_client_settings(h)
        ) as c:
            marker.write_text(json.dumps({"pid": os.getpid()}))
            try:
                err.print(f"agent on {h.path}: {rate:g} packets/s, {loop_rate:g} loops/s")
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async with trio.open_nursery() as n:

                        async def status_lines():
                            while report > 0:
                                await trio.sleep(report)
                                print(json.dumps(c.cover_status()), flush=True)

                        n.start_soon(status_lines)
                        async for _ in sigs:
                            break
                        n.cancel_scope.cancel()
                print(json.dumps(c.cover_status()), flush=True)
            finally:
                marker.unlink(missing_ok=True)

    try:
        trio.run(main)
    except OverlayError as e:
        raise fail_for(e) from None


def _entry_json(e) -> dict:
    now = time.time()
    return {
        "message_id": e.message_id.hex(),
        "state": e.state.name.lower(),
        "destination": e.destination,
        "attempts": e.attempts,
        "age": round(now - e.created_at, 1),
        "exit": e.exit.peer_id() if e.exit else None,
        "queued_at": e.queued_at.peer_id() if e.queued_at else None,
        "reason": e.reason,
    }


def send(
    to: Annotated[
        str,
        typer.Option("--to", help="Destination: smtp:user@host[:port], maildir:PATH, http(s)://…"),
    ],
    home: HomeOpt = None,
    via: ViaOpt = None,
    seeds: SeedsOpt = None,
    file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--file", "-f", help="Message file (default: read stdin)."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for acks.")] = 30.0,
    until: Annotated[
        str, typer.Option("--until", help="Wait for 'delivered' (default) or only 'queued'.")
    ] = "delivered",
    hops: Annotated[
        int, typer.Option("--hops", help="Nodes per path, entry and exit included.")
    ] = 3,
    operator: OperatorOpt = None,
    threshold: ThresholdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send a message through the overlay (runs no node); exit 0 once an exit acknowledged it.

    With an `overlay agent` running on the same home (and no --via/--seeds), the
    message goes into its outbox and the agent sends it in its next slot.
    """
    import trio

    from ..client import AckTimeout, Client, State
    from ..wire.delivery import parse_destination

    _quiet_logging()
    if until not in ("queued", "delivered"):
        raise fail(f"--until must be 'queued' or 'delivered', not {until!r}", EXIT_USAGE)
    try:
        parse_destination(to)
    except OverlayError as e:
        raise fail(
            f"--to {to!r}: {getattr(e, 'detail', '') or e}"
            " (smtp:user@host[:port], maildir:PATH or an http(s):// URL)",
            EXIT_USAGE,
        ) from None
    if not 2 <= hops <= 5:
        raise fail(f"--hops must be 2 to 5, not {hops}", EXIT_USAGE)
    if not timeout > 0:
        raise fail(f"--timeout must be more than 0 seconds, not {timeout:g}", EXIT_USAGE)
    via_addrs, pinned = _entry_options(via, seeds, operator, threshold)
    try:
        body = file.read_bytes() if file is not None else sys.stdin.buffer.read()
    except OSError as e:
        raise fail(f"cannot read {file}: {e.strerror}", EXIT_USAGE) from None
    h = Home(home or default_home())

    async def main():
        addrs = await _entry_addrs(h, via_addrs, list(seeds or []), pinned, threshold)
        async with Client(h.path, addrs, hops=hops, **_client_settings(h)) as c:
            mid = await c.send(to, body)
            try:
                return await c.wait_acked(mid, timeout, until=until)
            except AckTimeout as e:
                return e.entry

    try:
        if _running_agent(h) is not None and not via_addrs and not seeds:
            entry = _handoff(h, to, body, timeout, until)  # the agent sends it
        else:
            entry = trio.run(main)
    except OverlayError as e:
        raise fail_for(e) from None
    info = _entry_json(entry)
    if as_json:
        print(json.dumps(info))
    elif entry.state is State.DELIVERED:
        console.print(
            f"[green]delivered[/green] {info['message_id']} ({entry.attempts} attempt(s))"
        )
    elif entry.state is State.QUEUED:
        console.print(
            f"[green]queued[/green] {info['message_id']} at exit {info['queued_at']}:"
            " the exit holds it and keeps trying; it stays in the outbox until delivered"
        )
    elif entry.state is State.FAILED:
        err.print(f"[red]rejected[/red] {info['message_id']}: {escape(str(entry.reason))}")
    else:
        err.print(
            f"[yellow]no ack yet[/yellow] {info['message_id']} after {entry.attempts} attempt(s)"
            f" ({entry.reason}); kept in the outbox, resent by the next `overlay send`"
            " or `overlay outbox --flush`"
        )
    if entry.state is State.FAILED:
        raise typer.Exit(EXIT_REJECTED)
    if entry.state is State.PENDING:
        raise typer.Exit(1)


def outbox(
    home: HomeOpt = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list delivered and failed messages.")
    ] = False,
    flush: Annotated[
        bool,
        typer.Option(
            "--flush",
            help="Connect and drive every unfinished message to a final state: resend"
            " those whose exit is gone, collect the final acks of the others.",
        ),
    ] = False,
    wait: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--wait", help="With --flush: seconds to wait for final acks (default 30)."),
    ] = None,
    drop: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--drop", help="Remove this message (id or unique id prefix) and give up."),
    ] = None,
    via: ViaOpt = None,
    seeds: SeedsOpt = None,
    timeout: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--timeout", help="Same as --wait."),
    ] = None,
    operator: OperatorOpt = None,
    threshold: ThresholdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the messages waiting in the outbox, with attempts and age.

    With --flush: exit 0 once nothing is left unfinished, 1 (and the list) if
    some messages are still waiting when --wait runs out.
    """
    from ..storage.outbox import FILENAME, OutboxStore

    h = Home(home or default_home())
    if drop:
        _drop(h, drop, as_json)
        if not flush:
            return
    if flush:
        import trio

        from ..client import Client

        _quiet_logging()
        seconds = wait if wait is not None else timeout if timeout is not None else 30.0
        if not seconds > 0:
            raise fail(f"--wait must be more than 0 seconds, not {seconds:g}", EXIT_USAGE)
        via_addrs, pinned = _entry_options(via, seeds, operator, threshold)
        if (h.path / FILENAME).exists():
            with OutboxStore(h.path / FILENAME) as st:
                nothing = not st.load(unfinished_only=True)
        else:
            nothing = True

        async def run_flush():
            addrs = await _entry_addrs(h, via_addrs, list(seeds or []), pinned, threshold)
            async with Client(h.path, addrs, **_client_settings(h)) as c:
                c.flush()
                with trio.move_on_after(seconds):
                    while c.pending():
                        await trio.sleep(0.2)

        try:
            if not nothing:
                trio.run(run_flush)
            elif h.config_path.exists():
                h.config()  # nothing to send; a broken config is still reported
        except OverlayError as e:
            raise fail_for(e) from None
    if not (h.path / FILENAME).exists():
        entries = []
    else:
        try:
            with OutboxStore(h.path / FILENAME) as st:
                entries = st.load(unfinished_only=not show_all)
        except OverlayError as e:
            raise fail_for(e) from None
    rows = [_entry_json(e) for e in entries]
    unfinished = [r for r in rows if r["state"] in ("pending", "queued")]
    if as_json:
        print(json.dumps({"messages": rows}, indent=2))
    elif not rows:
        console.print("outbox empty")
    else:
        t = Table()
        for col in ("message id", "state", "destination", "attempts", "age (s)", "exit", "reason"):
            t.add_column(col)
        for r in rows:
            t.add_row(
                r["message_id"][:16],
                r["state"],
                r["destination"],
                str(r["attempts"]),
                str(r["age"]),
                (r["queued_at"] or r["exit"] or "-")[-12:],
                r["reason"],
            )
        console.print(t)
    if flush and unfinished:
        if not as_json:
            err.print(
                f"[yellow]{len(unfinished)} message(s) still unfinished[/yellow]: they stay in"
                " the outbox; flush again later, or give up on one with `overlay outbox --drop ID`"
            )
        raise typer.Exit(1)


def _drop(h: Home, ids: list[str], as_json: bool) -> None:
    """``overlay outbox --drop ID``: forget messages the user gives up on."""
    from ..storage.outbox import FILENAME, OutboxStore

    if not (h.path / FILENAME).exists():
        raise fail(f"no outbox in {h.path}", EXIT_USAGE)
    with OutboxStore(h.path / FILENAME) as st:
        chosen = []
        for text in ids:
            t = text.strip().lower()
            if len(t) < 8 or not all(c in "0123456789abcdef" for c in t):
                raise fail(
                    f"--drop {text!r}: give at least 8 hex digits of a message id", EXIT_USAGE
                )
            found = st.find(t)
            if len(found) != 1:
                what = "no message" if not found else f"{len(found)} messages"
                raise fail(f"--drop {text!r}: {what} with that id", EXIT_USAGE)
            chosen.append(found[0])
        for mid in chosen:
            st.drop(mid)
    if not as_json:
        for mid in chosen:
            console.print(f"dropped {mid.hex()}")
