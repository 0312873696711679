"""A real DNS server on 127.0.0.1 (dnslib, in threads, UDP + TCP) serving the zone
that `overlay-seeds export-dns` wrote; the fetcher gets a verified bundle from it."""

from __future__ import annotations

import contextlib

import dns.message
import dns.query
import pytest
from typer.testing import CliRunner

from bootstrap.cli import app
from bootstrap.fetch import DnsSource, FileSource, HttpSource, fetch_bundle, parse_source
from bootstrap.resolve import SourceError
from overlay.errors import LocalError, Reason
from tests.ports import free_udp_and_tcp_port

from .helpers import ATTACKER, OPS, PINNED, forged_copy, wall_bundle

dnslib_server = pytest.importorskip("dnslib.server")
zoneresolver = pytest.importorskip("dnslib.zoneresolver")


class Handler(dnslib_server.DNSHandler):
    udplen = 512  # classic limit: bigger answers are truncated, the client retries over TCP


@contextlib.contextmanager
def dns_server(zone_text: str):
    resolver = zoneresolver.ZoneResolver(zone_text)
    logger = dnslib_server.DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda s: None)
    port = free_udp_and_tcp_port()
    servers = [
        dnslib_server.DNSServer(
            resolver, port=port, address="127.0.0.1", logger=logger, handler=Handler
        ),
        dnslib_server.DNSServer(
            resolver, port=port, address="127.0.0.1", logger=logger, handler=Handler, tcp=True
        ),
    ]
    for s in servers:
        s.start_thread()
    try:
        yield port
    finally:
        for s in servers:
            s.stop()


def export_zone(tmp_path, bundle, name="zone.txt"):
    path = tmp_path / "bundle.cbor"
    path.write_bytes(bundle.encode())
    out = tmp_path / name
    r = CliRunner().invoke(
        app, ["export-dns", str(path), "--domain", "seeds.hydra.test", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    return out.read_text()


async def test_fetch_from_dns_name(tmp_path):
    good = wall_bundle(12, peers=6, signers=(0, 1, 2))  # > 512 bytes: TCP fallback
    assert len(good.encode()) > 900
    zone = export_zone(tmp_path, good)
    with dns_server(zone) as port:
        # the UDP answer really is truncated, so the fetch below had to use TCP
        query = dns.message.make_query("_hydra-seeds.seeds.hydra.test.", "TXT")
        with pytest.raises(dns.message.Truncated):
            dns.query.udp(query, "127.0.0.1", port=port, timeout=3, raise_on_truncation=True)
        result = await fetch_bundle(
            [f"dns:seeds.hydra.test@127.0.0.1:{port}"], PINNED, 2, tmp_path / "cache", timeout=3
        )
        assert result.bundle is not None, result.outcomes
        assert result.bundle.raw == good.encode()
        assert result.join_addrs() == good.join_addrs()
        assert result.outcomes[0].chosen
        # a missing name and an unknown domain
        missing = await fetch_bundle(
            [f"dns:nothing.hydra.test@127.0.0.1:{port}"], PINNED, 2, None, timeout=3
        )
        assert missing.outcomes[0].reason is SourceError.NOT_FOUND


async def test_dns_change_over_and_forgeries(tmp_path):
    """Two bundles published side by side plus a forged one: the newest valid one wins."""
    old, new = wall_bundle(20), wall_bundle(21)
    zone = export_zone(tmp_path, old, "a") + export_zone(tmp_path, new, "b")
    zone += export_zone(tmp_path, forged_copy(new), "c")
    zone += export_zone(tmp_path, wall_bundle(99, ops=ATTACKER), "d")
    with dns_server(zone) as port:
        result = await fetch_bundle([f"dns:seeds.hydra.test@127.0.0.1:{port}"], PINNED, 2, None)
    assert result.bundle.seq == 21


async def test_dns_with_only_forged_bundle(tmp_path):
    zone = export_zone(tmp_path, forged_copy(wall_bundle(5)))
    with dns_server(zone) as port:
        result = await fetch_bundle([f"dns:seeds.hydra.test@127.0.0.1:{port}"], PINNED, 2, None)
    assert result.bundle is None
    assert result.outcomes[0].reason is Reason.BAD_SIGNATURE


def test_parse_source():
    assert parse_source("https://seeds.example.org/seeds.cbor") == HttpSource(
        "https://seeds.example.org/seeds.cbor"
    )
    assert parse_source("dns:Example.org") == DnsSource("example.org")
    assert parse_source("dns:example.org@127.0.0.1:5353") == DnsSource(
        "example.org", ("127.0.0.1", 5353)
    )
    assert parse_source("dns:example.org@[::1]:53") == DnsSource("example.org", ("::1", 53))
    assert parse_source("dns:example.org@9.9.9.9") == DnsSource("example.org", ("9.9.9.9", 53))
    assert parse_source("seeds.example.org") == DnsSource("seeds.example.org")
    assert parse_source("./seeds.example.org") == FileSource(
        __import__("pathlib").Path("./seeds.example.org")
    )
    assert isinstance(parse_source("bundle.cbor"), FileSource)
    assert isinstance(parse_source("file:x"), FileSource)
    for bad in (
        "",
        "dns:",
        "dns:a b",
        "dns:example.org@resolver.example:53",
        "dns:x.org@1.2.3.4:0",
    ):
        with pytest.raises(LocalError):
            parse_source(bad)


async def test_invalid_source_reported_not_raised():
    result = await fetch_bundle(["dns:"], PINNED, 2, None)
    assert result.outcomes[0].reason is SourceError.INVALID_SOURCE
    assert OPS  # keys are deterministic fixtures
