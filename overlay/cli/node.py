"""``overlay run``: check every input, hold the home, run the node until a signal;
SIGHUP re-reads config.toml."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..config import LOG_LEVELS
from ..errors import OverlayError
from ..home import Home, dialable
from .homes import check_join
from .logs import LogFilter, check_log_file, set_library_levels, setup_logging
from .send import check_seed_sources, seed_join_addrs
from .util import (
    EXIT_CONFIG,
    EXIT_USAGE,
    BadInput,
    HomeOpt,
    check_multiaddr,
    check_threshold,
    checked,
    err,
    fail,
    open_home,
    parse_operators,
)

log = logging.getLogger("hydra.cli")


RELOADABLE = (
    "log_level",
    "target_peers",
    "sync_interval",
    "sync_idle_interval",
    # [limits] caps, applied through node.caps (new connections only for the bounds)
    "max_inbound",
    "max_inbound_per_ip",
    "max_handshakes_per_ip",
    "max_connections",
    "bandwidth_rate",
    "bandwidth_burst",
    "exit_deliveries_per_minute",
)


def _setting_name(attr: str) -> str:
    from ..config import _MAP

    for (section, key), a in _MAP.items():
        if a == attr:
            return f"[{section}] {key}"
    return attr


def _reload(node, h: Home, filt: LogFilter, fixed_level: str | None) -> None:
    """SIGHUP: re-read config.toml, apply what can change while running, name the rest."""
    import dataclasses

    try:
        new = h.config()
    except OverlayError as e:
        log.warning("SIGHUP: config.toml not reloaded, the node keeps its settings: %s", e)
        return
    applied, restart = [], []
    for f in dataclasses.fields(new):
        old, value = getattr(node.config, f.name), getattr(new, f.name)
        if old == value:
            continue
        if f.name in RELOADABLE:
            setattr(node.config, f.name, value)
            applied.append(f"{_setting_name(f.name)} = {value}")
        else:
            restart.append(_setting_name(f.name))
    caps = getattr(node, "caps", None)
    if caps is not None:
        caps.apply(node.config)
    level = fixed_level or node.config.log_level
    filt.level = logging.getLevelName(level.upper())
    set_library_levels(filt.level)
    note = " (fixed by --log-level)" if fixed_level else ""
    log.info(
        "SIGHUP: reloaded %s; log level %s%s; %s",
        h.config_path,
        level,
        note,
        ("applied " + ", ".join(applied)) if applied else "no other change applied",
    )
    log.debug(
        "SIGHUP: reloadable settings now %s",
        ", ".join(f"{_setting_name(a)} = {getattr(node.config, a)}" for a in RELOADABLE),
    )
    if restart:
        log.warning(
            "SIGHUP: %s changed; restart the node to apply (e.g. systemctl restart hydra-node)",
            ", ".join(restart),
        )


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
    operator: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--operator",
            help="Pinned seed operator key (hex or peer id, repeatable); default [seeds] operators.",
        ),
    ] = None,
    threshold: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--threshold", help="Operator signatures a bundle needs (default: config)."),
    ] = None,
    log_level: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--log-level", help="debug, info, warning or error (default: [log] level)."),
    ] = None,
    log_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--log-file", help="Append the log here instead of stderr (reopened if rotated)."
        ),
    ] = None,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="One JSON object per log line.")
    ] = False,
) -> None:
    """Run the node until SIGTERM or SIGINT (Ctrl-C); SIGHUP re-reads config.toml."""
    # 1. every input, before anything starts or is written
    if log_level is not None and log_level.lower() not in LOG_LEVELS:
        raise fail(f"--log-level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}", EXIT_USAGE)
    join_addrs = [checked(check_multiaddr, a, "--join", peer=True) for a in join or []]
    seed_sources = checked(check_seed_sources, list(seeds or []))
    pinned = checked(parse_operators, list(operator or []))
    checked(check_threshold, threshold)
    if threshold is not None and pinned and threshold > len(pinned):
        raise fail(
            f"--threshold {threshold} is more than the {len(pinned)} --operator key(s)",
            EXIT_USAGE,
        )
    if log_file is not None:
        checked(check_log_file, log_file)
    h = open_home(home)
    cfg = h.config()  # ConfigError: exit 78
    h.signing_key()  # no identity: exit 78
    if not seed_sources and not join_addrs and cfg.seed_sources:
        seed_sources = list(cfg.seed_sources)
    if seed_sources and not pinned:
        try:
            parse_operators(cfg.seed_operators)
        except BadInput as e:
            raise fail(f"{h.config_path}: [seeds] operators: {e}", EXIT_CONFIG) from None
    check_join(h, cfg)

    # 2. one node per home; listen addresses free
    from ..net.bindcheck import check_bindable
    from ..runtime import Node  # noqa: F401 - imports py-libp2p, which sets up its loggers first

    with h.locked():
        check_bindable(cfg.listen)
        filt = setup_logging(log_level or cfg.log_level, log_json, log_file)
        stopped_by = _run_node(h, cfg, join_addrs, seed_sources, pinned, threshold, filt, log_level)
    err.print(f"stopped ({stopped_by})")


def _run_node(h, cfg, join_addrs, seed_sources, pinned, threshold, filt, fixed_level) -> str:
    """Run until SIGTERM/SIGINT; returns the signal's name. A planned stop withdraws
    the node's record (a tombstone), so the overlay forgets it at once instead of
    suspecting it; a second signal stops at once."""
    import trio

    from ..runtime import Node

    stopped_by = {"signal": ""}

    async def main() -> None:
        stop = trio.Event()
        running: dict = {}
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async with trio.open_nursery() as outer:
                body = trio.CancelScope()

                async def watch_signals() -> None:
                    async for signum in sigs:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            if "node" in running:
                                try:
                                    _reload(running["node"], h, filt, fixed_level)
                                except Exception as e:  # noqa: BLE001 - keep the node running
                                    log.warning(
                                        "SIGHUP: reload failed (%s: %s); the node keeps its "
                                        "settings; `overlay config check` shows the problem",
                                        type(e).__name__,
                                        e,
                                    )
                            else:
                                log.warning(
                                    "SIGHUP while the node is starting: ignored; send it "
                                    "again once `overlay status` answers"
                                )
                            continue
                        if stop.is_set() or "node" not in running:
                            log.warning("%s: stopping at once, without leaving cleanly", name)
                            stopped_by["signal"] = stopped_by["signal"] or name
                            body.cancel()
                        else:
                            log.info("%s: leaving the overlay and stopping", name)
                            stopped_by["signal"] = name
                            stop.set()

                outer.start_soon(watch_signals)
                with body:
                    addrs = list(join_addrs)
                    if seed_sources:
                        addrs += await seed_join_addrs(
                            h,
                            cfg,
                            seed_sources,
                            pinned,
                            threshold,
                            report=lambda line: err.print(f"  seeds     {escape(line)}"),
                        )
                    async with Node(h, cfg, join=addrs) as node:
                        running["node"] = node
                        pid = node.node_id.peer_id()
                        err.print(f"[green]running[/green] {pid}")
                        shown: set[str] = set()
                        own_feeds = list(node.own.feeds) if node.own else []
                        for a in dialable(node.host.listen_addrs() + own_feeds, pid):
                            err.print(f"  address   {a}")
                            shown.add(a)
                        err.print(f"  control   {node.control_url}")
                        if node.joined_via:
                            err.print(f"  joined via {node.joined_via}; {len(node.view)} records")
                        async with trio.open_nursery() as n:
                            n.start_soon(_show_new_addresses, node, shown)
                            await stop.wait()
                            n.cancel_scope.cancel()
                        with trio.move_on_after(5):
                            try:
                                tomb = await node.withdraw()
                                log.info("withdrew the record (tombstone seq %d)", tomb.seq)
                                await trio.sleep(0.5)  # let the tombstone's gossip leave
                            except (OverlayError, OSError) as e:
                                log.info(
                                    "could not withdraw the record (%s); the overlay will "
                                    "notice the node is gone by itself",
                                    e,
                                )
                outer.cancel_scope.cancel()

    trio.run(main)
    return stopped_by["signal"] or "stopped"


async def _show_new_addresses(node, shown: set[str]) -> None:
    """Print addresses that appear later (relay reservations, a new interface)."""
    import trio

    pid = node.node_id.peer_id()
    while True:
        await trio.sleep(1.0)
        own = node.own
        if own is None or own.is_tombstone:
            continue
        for a in dialable(list(own.feeds), pid):
            if a not in shown:
                shown.add(a)
                err.print(f"  address   {a}")
