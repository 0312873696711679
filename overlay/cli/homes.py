"""Commands on a node home that need no running node: ``init``, ``record``,
``config check`` and ``seeds forget``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import records
from ..config import HOME_LISTEN
from ..errors import LocalError, OverlayError, RemoteError
from ..home import Home, HomeLocked
from ..storage.files import write_atomic
from .util import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_USAGE,
    BadInput,
    HomeOpt,
    JsonOpt,
    check_listen,
    check_multiaddr,
    check_policy,
    check_roles,
    checked,
    err,
    fail,
    fail_for,
    one_line,
    open_home,
    out,
    parse_operators,
    print_summary,
)

record_app = typer.Typer(
    no_args_is_help=True, help="Inspect, export and verify membership records."
)
config_app = typer.Typer(no_args_is_help=True, help="Check a node home's config.toml.")
seeds_app = typer.Typer(no_args_is_help=True, help="The cached seed bundle of a home.")


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
    roles = checked(check_roles, role or ["relay"])
    listen = [checked(check_listen, a) for a in listen or HOME_LISTEN]
    if policy is not None:
        checked(check_policy, policy)
    h = open_home(home)
    try:
        from ..config import Config
        from ..records import EXIT_ROLES

        cfg = Config(roles=list(roles), listen=list(listen))
        if policy is not None:
            cfg.exit_policy = list(policy)
        elif cfg.role_flags & EXIT_ROLES:
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
    out.print(f"[green]created[/green] {h.path}")
    out.print(f"peer id   {key.node_id.peer_id()}")
    out.print(f"roles     {', '.join(roles)}")
    out.print(f"config    {h.config_path}")


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
    rec = _current_record(open_home(home))
    summary = rec.summary() | {"size": len(rec.encode())}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print_summary(summary)


@record_app.command("export")
def record_export(
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    home: HomeOpt = None,
) -> None:
    """Write this node's record (binary, canonical CBOR) to a file."""
    rec = _current_record(open_home(home))
    data = rec.encode()
    write_atomic(output, data, mode=0o644)
    out.print(f"wrote {len(data)} bytes to {output} (seq {rec.seq})")


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
    out.print(f"[green]valid[/green] {rec.kind.name.lower()} ({len(data)} bytes)")
    print_summary(rec.summary())


# ---------------------------------------------------------------- config
def check_join(h, cfg) -> None:
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

    h = open_home(home)
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
    check_join(h, cfg)
    settings: dict[str, dict] = {}
    for (section, key), attr in config_mod._MAP.items():
        settings.setdefault(section, {})[key] = getattr(cfg, attr)
    if as_json:
        print(json.dumps({"config": str(h.config_path), "ok": True, "settings": settings}))
        return
    if not h.exists():
        err.print(f"[yellow]note:[/yellow] no node key in {h.path} yet; run `overlay init`")
    out.print(f"# {h.config_path}: ok. Effective settings (defaults included):")
    for section, values in settings.items():
        out.print(f"\n\\[{section}]")
        for key, value in values.items():
            out.print(f"{key} = {escape(config_mod._toml(value))}")


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

    h = open_home(home)
    cache = h.path / SEEDS_CACHE
    if not cache.exists():
        out.print(f"no cached seed bundle in {h.path}")
        return
    with h.locked():  # HomeLocked: stop the node first
        cache.unlink(missing_ok=True)
    out.print(f"forgot the cached seed bundle {cache}")
