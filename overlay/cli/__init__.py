"""``overlay`` command line: node and user commands.

Every command checks all of its input before it starts anything, and reports a
problem as one line (``error: ...``) with an exit code from the table in
``overlay/cli/util.py`` (docs/volunteer.md, "Exit codes"). ``overlay --debug``
adds tracebacks.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .. import records
from ..config import HOME_LISTEN, LOG_LEVELS
from ..errors import LocalError, OverlayError, RemoteError
from ..home import Home, HomeLocked, default_home
from ..storage.files import write_atomic
from .send import agent, check_seed_sources, outbox, seed_join_addrs, send
from .util import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    BadInput,
    check_listen,
    check_multiaddr,
    check_policy,
    check_roles,
    check_threshold,
    dialable,
    exit_code,
    fail,
    fail_for,
    human_time,
    one_line,
    parse_operators,
)
from .util import (
    console as make_console,
)

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Hydra overlay node and client.",
)
record_app = typer.Typer(
    no_args_is_help=True, help="Inspect, export and verify membership records."
)
config_app = typer.Typer(no_args_is_help=True, help="Check a node home's config.toml.")
seeds_app = typer.Typer(no_args_is_help=True, help="The cached seed bundle of a home.")
app.add_typer(record_app, name="record")
app.add_typer(config_app, name="config")
app.add_typer(seeds_app, name="seeds")

console = make_console()
err = make_console(stderr=True)
log = logging.getLogger("hydra.cli")

HomeOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional
    typer.Option("--home", help="Node home (default $HYDRA_HOME or ~/.hydra)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

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


def _home(path: Path | None) -> Home:
    return Home(path or default_home())


def _check(fn, *args, **kwargs):
    """Run an input check; a problem becomes a one-line error and exit 64."""
    try:
        return fn(*args, **kwargs)
    except OverlayError as e:
        raise fail_for(e) from None


# ---------------------------------------------------------------- init
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
    roles = _check(check_roles, role or ["relay"])
    listen = [_check(check_listen, a) for a in listen or HOME_LISTEN]
    if policy is not None:
        _check(check_policy, policy)
    h = _home(home)
    try:
        from ..config import Config
        from ..records import Role

        cfg = Config(roles=list(roles), listen=list(listen))
        if policy is not None:
            cfg.exit_policy = list(policy)
        elif cfg.role_flags & (Role.EXIT | Role.STANDBY_EXIT):
            cfg.exit_policy = ["maildir:*", "smtp:*"]
        cfg.validate()
    except OverlayError as e:
        raise fail(str(e), EXIT_USAGE) from None
    try:
        with h.locked():
            Home.init(h.path, roles=roles, listen=listen, exit_policy=policy, force=force)
    except OverlayError as e:
        raise fail_for(e) from None
    key = h.signing_key()
    console.print(f"[green]created[/green] {h.path}")
    console.print(f"peer id   {key.node_id.peer_id()}")
    console.print(f"roles     {', '.join(roles)}")
    console.print(f"config    {h.config_path}")


# ---------------------------------------------------------------- record
def _current_record(h: Home) -> records.ValidRecord:
    """The node's current record: the stored one if still valid, else a new one.

    While a node runs from the home (it holds the lock and keeps its record
    fresh) only the stored record is read.
    """
    from ..storage.records import RecordStore

    now = time.time()
    key = h.signing_key()
    try:
        with h.locked():
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
    except HomeLocked:
        rec = None
        if h.db_path.exists():
            with RecordStore(h.db_path) as st:
                rec = st.get(key.node_id, now)
        if rec is None or rec.is_tombstone:
            raise LocalError(
                f"the node running from {h.path} has not stored a record yet; try again"
            ) from None
        return rec


@record_app.command("show")
def record_show(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show this node's membership record."""
    rec = _current_record(_home(home))
    summary = rec.summary() | {"size": len(rec.encode())}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    """``key  value`` lines; lists one item per line; times in ISO 8601 and words."""
    width = max((len(k) for k in summary), default=0) + 2
    for k, v in summary.items():
        if isinstance(v, list):
            items = [str(x) for x in v] or ["-"]
        elif k in ("issued_at", "expires_at") and isinstance(v, int | float):
            items = [human_time(v)]
        else:
            items = ["-" if v is None else str(v)]
        console.print(f"[bold]{k:<{width}}[/bold]{escape(items[0])}")
        for item in items[1:]:
            console.print(" " * width + escape(item))


@record_app.command("export")
def record_export(
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    home: HomeOpt = None,
) -> None:
    """Write this node's record (binary, canonical CBOR) to a file."""
    rec = _current_record(_home(home))
    data = rec.encode()
    write_atomic(output, data, mode=0o644)
    console.print(f"wrote {len(data)} bytes to {output} (seq {rec.seq})")


@record_app.command("verify")
def record_verify(
    file: Annotated[Path, typer.Argument(help="Binary record file.")],
    as_json: JsonOpt = False,
) -> None:
    """Check a record file: exit 0 and a summary when valid, 1 and the reason when not."""
    try:
        data = file.read_bytes()[: records.MAX_SIZE + 1]
    except OSError as e:
        raise fail(f"cannot read {file}: {e.strerror}", EXIT_USAGE) from None
    try:
        rec = records.validate(data, time.time())
    except RemoteError as e:
        if as_json:
            print(json.dumps({"valid": False, "reason": e.reason.value, "detail": e.detail}))
        else:
            err.print(
                f"[red]invalid[/red]: {e.reason.value}"
                + (f" ({escape(one_line(e.detail))})" if e.detail else "")
            )
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        print(json.dumps({"valid": True} | rec.summary()))
        return
    console.print(f"[green]valid[/green] {rec.kind.name.lower()} ({len(data)} bytes)")
    _print_summary(rec.summary())


# ---------------------------------------------------------------- config
def _check_join(h, cfg) -> None:
    """Every ``[network] join`` address is a multiaddr ending in /p2p/<id> (exit 78)."""
    for a in cfg.join:
        try:
            check_multiaddr(a, "[network] join", peer=True)
        except BadInput as e:
            raise fail(f"{h.config_path}: {e}", EXIT_CONFIG) from None


@config_app.command("check")
def config_check(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Validate HOME/config.toml and print the effective settings (defaults included)."""
    from .. import config as config_mod

    h = _home(home)
    cfg = h.config()  # ConfigError: one line, exit 78
    for addr in cfg.listen:
        try:
            check_listen(addr, "[node] listen")
        except BadInput as e:
            raise fail(f"{h.config_path}: {e}", EXIT_CONFIG) from None
    try:
        parse_operators(cfg.seed_operators)
    except BadInput as e:
        raise fail(f"{h.config_path}: [seeds] operators: {e}", EXIT_CONFIG) from None
    _check_join(h, cfg)
    settings: dict[str, dict] = {}
    for (section, key), attr in config_mod._MAP.items():
        settings.setdefault(section, {})[key] = getattr(cfg, attr)
    if as_json:
        print(json.dumps({"config": str(h.config_path), "ok": True, "settings": settings}))
        return
    if not h.exists():
        err.print(f"[yellow]note:[/yellow] no node key in {h.path} yet; run `overlay init`")
    console.print(f"# {h.config_path}: ok. Effective settings (defaults included):")
    for section, values in settings.items():
        console.print(f"\n\\[{section}]")
        for key, value in values.items():
            console.print(f"{key} = {escape(config_mod._toml(value))}")


# ---------------------------------------------------------------- seeds
@seeds_app.command("forget")
def seeds_forget(home: HomeOpt = None) -> None:
    """Delete the home's cached seed bundle (HOME/seeds-cache.cbor).

    A cached bundle blocks every bundle with a lower seq, even after it has
    expired (so an old bundle cannot be replayed). If the seed operators
    restarted their numbering, forget the cache; the next `overlay run
    --seeds` or `overlay send --seeds` accepts the newest valid bundle.
    """
    from .send import SEEDS_CACHE

    h = _home(home)
    cache = h.path / SEEDS_CACHE
    if not cache.exists():
        console.print(f"no cached seed bundle in {h.path}")
        return
    with h.locked():  # HomeLocked: stop the node first
        cache.unlink(missing_ok=True)
    console.print(f"forgot the cached seed bundle {cache}")


# ---------------------------------------------------------------- logging
LIBRARY_LOGGERS = ("libp2p", "multiaddr", "hypercorn", "async_service", "aioquic", "websockets")
LIBRARY_BURST = 5  # library lines per message kind and minute shown at --log-level debug


class LogFilter(logging.Filter):
    """The node's log filter: the level (changeable by SIGHUP) and library noise.

    py-libp2p logs the routine failures of a churning overlay (a peer closing a
    relay stream: "Error reading from hop stream"; dial races) at WARNING and
    ERROR. Library lines below CRITICAL are demoted to DEBUG, so a volunteer's
    log holds only Hydra's own warnings, which say what to do; at debug level
    each kind of library line is still rate-limited to ``LIBRARY_BURST`` a
    minute, with a count of the lines left out.
    """

    def __init__(self, level: int, clock=time.monotonic) -> None:
        super().__init__()
        self.level = level
        self.clock = clock
        self._seen: dict[tuple[str, str], list] = {}  # kind -> [window start, shown, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        library = record.name.split(".")[0] in LIBRARY_LOGGERS
        if library and record.levelno < logging.CRITICAL:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if record.levelno < self.level:
            return False
        if not library:
            return True
        kind = (record.name, str(record.msg)[:40])
        now = self.clock()
        window = self._seen.get(kind)
        if window is None or now - window[0] >= 60.0:
            if len(self._seen) > 1000:
                self._seen.clear()
            dropped = window[2] if window else 0
            window = self._seen[kind] = [now, 0, 0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar lines left out in the last minute)"
        if window[1] >= LIBRARY_BURST:
            window[2] += 1
            return False
        window[1] += 1
        return True


def _setup_logging(level: str, as_json: bool, log_file: Path | None = None) -> LogFilter:
    """Log to stderr (or ``log_file``, reopened when rotated) at ``level``; returns
    the filter, whose ``level`` a SIGHUP changes."""

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

    handler: logging.Handler
    if log_file is not None:
        handler = logging.handlers.WatchedFileHandler(log_file)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    filt = LogFilter(logging.getLevelName(level.upper()))
    handler.addFilter(filt)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # py-libp2p gives its loggers no handler and stops propagation (so its lines
    # reached stderr through logging's last-resort handler); send them through ours
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.NOTSET)
    _set_library_levels(filt.level)
    return filt


def _set_library_levels(level: int) -> None:
    # below debug nothing of theirs is shown: do not even format it
    lib_level = logging.DEBUG if level <= logging.DEBUG else logging.CRITICAL
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(lib_level)


def _check_log_file(path: Path) -> Path:
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise BadInput(f"--log-file {path}: {e.strerror}") from None
    return path


# ---------------------------------------------------------------- run
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
    _set_library_levels(filt.level)
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
    join_addrs = [_check(check_multiaddr, a, "--join", peer=True) for a in join or []]
    seed_sources = _check(check_seed_sources, list(seeds or []))
    pinned = _check(parse_operators, list(operator or []))
    _check(check_threshold, threshold)
    if threshold is not None and pinned and threshold > len(pinned):
        raise fail(
            f"--threshold {threshold} is more than the {len(pinned)} --operator key(s)",
            EXIT_USAGE,
        )
    if log_file is not None:
        _check(_check_log_file, log_file)
    h = _home(home)
    cfg = h.config()  # ConfigError: exit 78
    h.signing_key()  # no identity: exit 78
    if not seed_sources and not join_addrs and cfg.seed_sources:
        seed_sources = list(cfg.seed_sources)
    if seed_sources and not pinned:
        try:
            parse_operators(cfg.seed_operators)
        except BadInput as e:
            raise fail(f"{h.config_path}: [seeds] operators: {e}", EXIT_CONFIG) from None
    _check_join(h, cfg)

    # 2. one node per home; listen addresses free
    from ..net.bindcheck import check_bindable
    from ..runtime import Node  # noqa: F401 - imports py-libp2p, which sets up its loggers first

    with h.locked():
        check_bindable(cfg.listen)
        filt = _setup_logging(log_level or cfg.log_level, log_json, log_file)
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


def _get(home: Path | None, route: str) -> dict:
    """GET a route of the running node's control endpoint, with the token from its home."""
    from ..control import control_get

    return control_get(_home(home).path, route)


def _cell(v) -> str:
    return "-" if v is None or v == "" else str(v)


@app.command()
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
            run_watch(_home(home).path, refresh, console)
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
    _print_summary(summary)
    t = Table(title="feeds")
    t.add_column("feed", no_wrap=True, overflow="ignore")
    for col in ("network", "state", "last ok (s ago)", "conns", "bytes in", "bytes out"):
        t.add_column(col)
    for f in feeds:
        t.add_row(
            f["addr"],
            _cell(f.get("network")),
            _cell(f.get("state")),
            _cell(f.get("last_ok")),
            _cell(f.get("conns")),
            _cell(f.get("bytes_in")),
            _cell(f.get("bytes_out")),
        )
    console.print(t)
    if isinstance(st.get("limits"), dict):
        console.print(_limits_table(st["limits"]))


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
        f"{_cell(bw.get('bytes_per_s'))} B/s (10 s)",
        f"{_cell(bw.get('dropped_packets'))} packets dropped",
    )
    t.add_row(
        "bandwidth_burst (B)",
        cap(bw.get("burst")),
        "-" if bw.get("available") is None else f"{bw['available']} B available",
        "",
    )
    t.add_row(
        "max_connections",
        _cell(conns.get("max_connections")),
        f"{_cell(conns.get('total'))} ({_cell(conns.get('outbound'))} outbound)",
        f"{_cell(refused.get('max_connections'))} refused",
    )
    t.add_row(
        "max_inbound",
        _cell(conns.get("max_inbound")),
        _cell(conns.get("inbound")),
        f"{_cell(refused.get('max_inbound'))} refused",
    )
    waiting = ex.get("waiting") or 0
    t.add_row(
        "exit_deliveries_per_minute",
        cap(ex.get("per_minute")),
        f"{_cell(ex.get('last_minute'))} in the last minute",
        (f"OVER CAP: {waiting} waiting; " if waiting else "")
        + f"{_cell(ex.get('delayed'))} held so far",
    )
    return t


@app.command()
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
    console.print(t)


@app.command()
def exits(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Exits and standbys a running node knows, live count against target, pool decisions."""
    data = _get(home, "/exits")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    now = time.time()
    live, target = data.get("live_exits"), data.get("target_live_exits")
    mode = data.get("mode", "")
    console.print(
        f"live exits [bold]{_cell(live)}[/bold] of target {_cell(target)}"
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
    console.print(t)
    events = data.get("events", [])
    if not events:
        console.print("pool decisions: none yet")
        return
    console.print("pool decisions (oldest first):")
    for ev in events:
        console.print(
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

    from ..control import TICKET_TTL, auth_headers, control_url

    h = _home(home)
    url = control_url(h.path)
    try:
        r = httpx.post(
            url + "/console/ticket", headers=auth_headers(h.path), timeout=5, trust_env=False
        )
    except httpx.HTTPError as e:
        raise LocalError(f"control endpoint {url} did not answer: {e}") from None
    if r.status_code == 401:
        raise LocalError(f"control endpoint {url} refused the token")
    if r.status_code == 404:
        raise LocalError(f"the node at {url} has no console (an older version?)")
    r.raise_for_status()
    link = url + r.json()["path"]
    print(link)
    err.print(f"one-time link, valid {TICKET_TTL:.0f} s; the browser then keeps a session cookie")
    if open_browser:
        import webbrowser

        if not webbrowser.open(link):
            err.print("no browser found here: open the link above by hand")


# ---------------------------------------------------------------- demo
@app.command()
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


from ..sim.cli import sim_command  # noqa: E402

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
