"""``overlay-seeds``: create, co-sign, verify, serve, export and fetch seed bundles.

Exit codes: 0 success; 1 the bundle (or every source) was rejected, with the
reason printed; 2 usage or local errors (missing file, bad key, bad option).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from overlay.crypto import NodeId
from overlay.errors import DecodeError, LocalError, RemoteError
from overlay.storage.files import write_atomic

from . import bundle as bundle_mod
from .bundle import MAX_SIZE, Entry, SeedBundle, addr_problem, decode, strip_own_p2p
from .files import read_capped, read_key_file, write_key_file

app = typer.Typer(
    name="overlay-seeds",
    help="Hydra seed bundles: signed lists of entry peers, co-signed by k of n operators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_REJECTED = 1
EXIT_LOCAL = 2


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"overlay-seeds {version('hydra-overlay')}")
        except PackageNotFoundError:  # pragma: no cover - a bare source tree
            typer.echo("overlay-seeds unknown")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Hydra seed bundles: signed lists of entry peers, co-signed by k of n operators."""


def _fail(message: str, code: int = EXIT_LOCAL) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_operator(text: str) -> NodeId:
    """An operator public key: 64 hex digits, or a libp2p peer id (12D3KooW…)."""
    t = text.strip()
    try:
        if len(t) == 64:
            return NodeId(bytes.fromhex(t))
        return NodeId.from_peer_id(t)
    except ValueError:
        raise typer.BadParameter(f"not an Ed25519 public key (hex or peer id): {text!r}") from None


def _operators(values: list[str]) -> list[NodeId]:
    return [parse_operator(v) for v in values]


def _read_bundle(path: Path):
    try:
        raw = read_capped(path, MAX_SIZE)
    except OSError as e:
        raise _fail(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return decode(raw)
    except DecodeError as e:
        raise _fail(f"{path}: {e}", EXIT_REJECTED) from None


OperatorOpt = Annotated[
    list[str],
    typer.Option("--operator", "-O", help="Pinned operator public key (hex or peer id); repeat."),
]
ThresholdOpt = Annotated[
    int, typer.Option("--threshold", "-k", min=1, help="Signatures required from those keys.")
]


@app.command()
def keygen(
    output: Annotated[Path, typer.Option("--output", "-o", help="Key file to write (0600).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Generate an operator signing key; print its public key (hex)."""
    from overlay.crypto import SigningKey

    key = SigningKey.generate()
    try:
        write_key_file(output, key, force=force)
    except (LocalError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(key.node_id.hex())
    err.print(f"wrote {output} (0600); peer-id form {key.node_id.peer_id()}")


def _parse_peer_addr(text: str) -> tuple[NodeId, str]:
    parts = text.strip().split("/")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] in ("p2p", "ipfs"):
            if i + 2 < len(parts):  # e.g. /p2p/RELAY/p2p-circuit without the target id
                break
            try:
                peer = NodeId.from_peer_id(parts[i + 1])
            except ValueError:
                break
            addr = strip_own_p2p(text.strip(), peer)
            problem = addr_problem(addr, peer)
            if problem:
                raise typer.BadParameter(f"{text}: {problem}")
            return peer, addr
    raise typer.BadParameter(f"{text}: a --peer multiaddr must end in /p2p/<peer id>")


def _records_from_node(url: str) -> list[dict]:
    import httpx

    try:
        with httpx.Client(timeout=10.0, trust_env=False) as client:
            resp = client.get(url.rstrip("/") + "/records")
            resp.raise_for_status()
            data = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise _fail(f"cannot read records from {url}: {e}") from None
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise _fail(f"{url}/records did not return {{'records': [...]}}")
    return records


@app.command()
def create(
    operator: OperatorOpt,
    threshold: ThresholdOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle file to write.")],
    peer: Annotated[
        list[str] | None,
        typer.Option("--peer", "-p", help="Entry multiaddr ending in /p2p/<peer id>; repeat."),
    ] = None,
    from_node: Annotated[
        str | None,
        typer.Option(help="Pick entries from a running node's control endpoint (GET URL/records)."),
    ] = None,
    max_peers: Annotated[int, typer.Option(min=1, max=bundle_mod.MAX_PEERS)] = 8,
    public_only: Annotated[
        bool, typer.Option(help="With --from-node: skip loopback/private addresses.")
    ] = False,
    seq: Annotated[
        int | None, typer.Option(min=0, help="Bundle sequence number (default: now, unix s).")
    ] = None,
    ttl_days: Annotated[float, typer.Option(min=0.001, max=400)] = 30.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Create an unsigned bundle; then each operator runs `sign`."""
    from .entries import choose_entries

    ops = _operators(operator)
    now = int(time.time())
    grouped: dict[NodeId, list[str]] = {}
    for text in peer or []:
        node, addr = _parse_peer_addr(text)
        if addr not in grouped.setdefault(node, []):
            grouped[node].append(addr)
    entries = [Entry(node, tuple(addrs)) for node, addrs in grouped.items()]
    if from_node:
        picked = choose_entries(
            _records_from_node(from_node),
            now=now,
            max_peers=max(0, max_peers - len(entries)),
            public_only=public_only,
        )
        entries += [e for e in picked if e.peer not in grouped]
        err.print(f"picked {len(picked)} entry peer(s) from {from_node}")
    if not entries:
        raise _fail("no entry peers: give --peer and/or --from-node")
    try:
        b = SeedBundle.create(
            seq=now if seq is None else seq,
            issued_at=now,
            expires_at=now + int(ttl_days * 86400),
            entries=entries,
            operators=ops,
            threshold=threshold,
        )
        write_atomic(output, b.encode(), mode=0o644, overwrite=force)
    except FileExistsError:
        raise _fail(f"{output} exists; use --force to replace it") from None
    except (LocalError, OSError) as e:
        raise _fail(str(e)) from None
    out.print(
        f"created {output}: seq {b.seq}, {len(b.entries)} peer(s), "
        f"{b.threshold}-of-{len(b.operators)} operators, expires {_iso(b.expires_at)}"
    )


def sign(
    bundle: Annotated[Path, typer.Argument(help="Bundle file, updated in place.")],
    key: Annotated[Path, typer.Option("--key", help="Operator key file (from keygen).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of in place.")
    ] = None,
) -> None:
    """Add this operator's signature; other operators' signatures stay valid."""
    unverified = _read_bundle(bundle)
    try:
        sk = read_key_file(key)
        signed = unverified.bundle.signed_by(sk)
        write_atomic(output or bundle, signed.encode(), mode=0o644)
    except (LocalError, OSError) as e:
        raise _fail(str(e)) from None
    good, _bad = signed.valid_signers()
    own = good & set(signed.operators)
    if sk.node_id not in signed.operators:
        err.print(
            "[yellow]note:[/yellow] this key is not in the bundle's operator set "
            "(fine for a rotation transition signature)"
        )
    state = "complete" if len(own) >= signed.threshold else "needs more"
    out.print(
        f"signed {output or bundle} as {sk.node_id.hex()}: {len(own)} of "
        f"{signed.threshold} operator signatures ({state})"
    )


app.command("sign")(sign)
app.command("cosign", help="Alias of sign: add another operator's signature.")(sign)


def _summary(v, title: str) -> None:
    out.print(f"[green]{title}[/green]: seq {v.seq}")
    out.print(f"  issued  {_iso(v.issued_at)}   expires {_iso(v.expires_at)}")
    ops = ", ".join(k.hex()[:16] for k in v.operators)
    out.print(f"  operators ({v.threshold}-of-{len(v.operators)}): {ops}")
    if hasattr(v, "signers"):
        out.print(f"  pinned signers: {', '.join(sorted(k.hex()[:16] for k in v.signers))}")
    out.print(f"  entry peers: {len(v.entries)}")
    for a in v.join_addrs():
        out.print(f"    {a}")


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument()],
    operator: OperatorOpt,
    threshold: ThresholdOpt,
    at: Annotated[
        float | None, typer.Option(help="Check freshness at this unix time (default: now).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check signatures against pinned operator keys and freshness; exit 1 with the reason."""
    ops = _operators(operator)
    unverified = _read_bundle(bundle)
    try:
        valid = unverified.verify(ops, threshold).check_valid_at(time.time() if at is None else at)
    except LocalError as e:
        raise _fail(str(e)) from None
    except RemoteError as e:
        if as_json:
            typer.echo(json.dumps({"ok": False, "reason": e.reason.value, "detail": e.detail}))
        else:
            err.print(f"[red]rejected[/red]: {e.reason.value}: {escape(e.detail)}")
        raise typer.Exit(EXIT_REJECTED) from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "seq": valid.seq,
                    "issued_at": valid.issued_at,
                    "expires_at": valid.expires_at,
                    "signers": sorted(k.hex() for k in valid.signers),
                    "join_addrs": valid.join_addrs(),
                }
            )
        )
    else:
        _summary(valid, "valid")


@app.command()
def show(bundle: Annotated[Path, typer.Argument()]) -> None:
    """Print a bundle's contents WITHOUT verifying it."""
    unverified = _read_bundle(bundle)
    _summary(unverified, "unverified bundle")
    good, bad = unverified.bundle.valid_signers()
    for k in sorted(unverified.bundle.signatures):
        mark = "ok" if k in good else "BAD"
        member = "operator" if k in unverified.operators else "not in operator set"
        out.print(f"  signature {k.hex()[:16]}… {mark} ({member})")


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument()],
    listen: Annotated[str, typer.Option(help="HOST:PORT ([v6]:PORT for IPv6).")] = "127.0.0.1:8080",
    max_age: Annotated[int, typer.Option(min=0, help="Cache-Control max-age, seconds.")] = 300,
) -> None:
    """Serve the bundle over HTTP at / and /seeds.cbor, reloading when the file changes."""
    import trio

    from .publish import serve as serve_bundle

    _read_bundle(bundle)  # fail early, before any server starts

    async def run() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(
                    partial(
                        serve_bundle, bundle, listen, max_age=max_age, shutdown_trigger=stop.wait
                    )
                )
                for b in binds:
                    out.print(f"serving {bundle} at {b}/seeds.cbor (Ctrl-C to stop)")
                sys.stdout.flush()
                async for _ in signals:
                    stop.set()
                    break

    try:
        trio.run(run)
    except (LocalError, OSError) as e:
        raise _fail(str(e)) from None
    except BaseExceptionGroup as group:
        match, _rest = group.split((LocalError, OSError))
        if match is None:
            raise
        raise _fail(str(_first_leaf(match))) from None


@app.command("export-dns")
def export_dns(
    bundle: Annotated[Path, typer.Argument()],
    domain: Annotated[str, typer.Option(help="Base domain D (records at _hydra-seeds.D).")],
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    ttl: Annotated[int, typer.Option(min=1, max=86400)] = 300,
) -> None:
    """Write zone-file TXT lines: the signed bundle in chunks, plus dnsaddr records."""
    from .publish import export_dns as export

    unverified = _read_bundle(bundle)
    try:
        text = export(unverified.raw, domain, ttl=ttl)
        if output is None:
            sys.stdout.write(text)
        else:
            write_atomic(output, text.encode("ascii"), mode=0o644)
            err.print(f"wrote {output}")
    except (LocalError, OSError) as e:
        raise _fail(str(e)) from None


@app.command()
def fetch(
    sources: Annotated[
        list[str], typer.Argument(help="Files, http(s) URLs, dns:NAME[@IP[:PORT]].")
    ],
    operator: OperatorOpt,
    threshold: ThresholdOpt,
    cache: Annotated[Path | None, typer.Option(help="Last-good bundle cache file.")] = None,
    timeout: Annotated[float, typer.Option(min=0.1)] = 5.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Fetch from several sources as a node would, and report each source's outcome."""
    import trio

    from .fetch import fetch_bundle

    ops = _operators(operator)
    try:
        result = trio.run(
            lambda: fetch_bundle(
                sources, [bytes(k) for k in ops], threshold, cache, timeout=timeout
            )
        )
    except LocalError as e:
        raise _fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        table = Table("source", "result", "seq", "detail")
        for o in result.outcomes:
            res = (
                "[green]chosen[/green]"
                if o.chosen
                else ("ok" if o.ok else f"[red]{o.reason_text}[/red]")
            )
            seq = "" if o.seq is None else str(o.seq)
            table.add_row(Text(o.source), res, seq, Text(o.detail))  # Text: no markup
        out.print(table)
        out.print(f"cache: {result.cache_status}" + (" (updated)" if result.cache_written else ""))
        if result.bundle is not None:
            _summary(result.bundle, "using cached bundle" if result.from_cache else "using bundle")
        else:
            err.print("[red]no valid bundle from any source[/red]")
    if result.bundle is None:
        raise typer.Exit(EXIT_REJECTED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
