"""Fetch seed bundles from files, HTTP(S) URLs and DNS names, then resolve. trio adapter.

Source syntax (``parse_source``):

- ``http://…`` / ``https://…``: GET the URL (the body is the encoded bundle);
  the cached bundle's ETag is sent as ``If-None-Match``, and a 304 counts as
  the source confirming the cache. Redirects are followed (at most 3);
  proxy environment variables are ignored.
- ``dns:NAME`` or ``dns:NAME@HOST[:PORT]``: TXT records of
  ``_hydra-seeds.NAME`` (the ``hs1`` format of ``bootstrap.dnstxt``), asked
  of the system resolver, or of the name server at IP address ``HOST``
  (``[v6]`` in brackets; port 53 by default) over UDP with TCP fallback.
- ``file:PATH``, or anything containing a path separator, ending in
  ``.cbor`` or naming an existing file: read the file.
- any other string that looks like a domain name (``seeds.example.org``):
  same as ``dns:seeds.example.org``.

All sources are fetched concurrently, each under its own deadline; one
source failing (or hanging, or lying) never stops the others. The last
chosen bundle is cached on disk (atomic replace) and is what the client uses
when every source fails, as long as it has not expired.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from overlay.crypto import NodeId
from overlay.errors import DecodeError, LocalError, Reason
from overlay.storage.files import write_atomic

from .bundle import MAX_SIZE, MEDIA_TYPE, ValidBundle, VerifiedBundle, etag, pinned_set
from .dnstxt import decode_txt, normalize_domain, seeds_name
from .files import read_capped
from .resolve import (
    Failed,
    Fetched,
    NotModified,
    SourceError,
    SourceReport,
    SourceResult,
    resolve,
)

DEFAULT_TIMEOUT = 5.0
MAX_REDIRECTS = 3

# ---- sources -------------------------------------------------------------------


@dataclass(frozen=True)
class FileSource:
    path: Path


@dataclass(frozen=True)
class HttpSource:
    url: str


@dataclass(frozen=True)
class DnsSource:
    name: str  # base domain, e.g. "example.org" (TXT at _hydra-seeds.example.org)
    server: tuple[str, int] | None = None  # ask this name server instead of the system's


Source = FileSource | HttpSource | DnsSource

_DOMAIN_RE = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9_.-]+\.[A-Za-z0-9_-]+\.?$")


def _parse_server(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise LocalError(f"bad DNS server {text!r}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise LocalError(f"DNS server must be an IP address, got {host!r}") from None
    port = 53
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise LocalError(f"bad DNS server port {port_text!r}")
        port = int(port_text)
    return host, port


def parse_source(text: str) -> Source:
    """Classify a seed source string (see the module docstring). Raises ``LocalError``."""
    t = text.strip()
    if not t:
        raise LocalError("empty seed source")
    low = t.lower()
    if low.startswith(("http://", "https://")):
        return HttpSource(t)
    if low.startswith("dns:"):
        name, sep, server = t[4:].partition("@")
        return DnsSource(normalize_domain(name), _parse_server(server) if sep else None)
    if low.startswith("file:"):
        return FileSource(Path(t[5:]))
    if os.sep in t or "/" in t or low.endswith(".cbor") or os.path.exists(t):
        return FileSource(Path(t))
    if _DOMAIN_RE.match(t):
        return DnsSource(normalize_domain(t))
    return FileSource(Path(t))


# ---- fetching one source -------------------------------------------------------------


def _read_capped(path: Path) -> bytes:
    return read_capped(path, MAX_SIZE)


async def _fetch_file(src: FileSource) -> SourceResult:
    try:
        data = await trio.to_thread.run_sync(_read_capped, src.path)
    except FileNotFoundError:
        return Failed(SourceError.NOT_FOUND, f"no file {src.path}")
    except OSError as e:
        return Failed(SourceError.UNREACHABLE, f"{type(e).__name__}: {e}")
    if len(data) > MAX_SIZE:
        return Failed(Reason.OVERSIZED, f"file over {MAX_SIZE} bytes")
    return Fetched((data,))


async def _fetch_http(client: Any, src: HttpSource, cache_etag: str | None) -> SourceResult:
    import httpx

    headers = {"Accept": MEDIA_TYPE}
    if cache_etag:
        headers["If-None-Match"] = cache_etag
    try:
        async with client.stream("GET", src.url, headers=headers) as resp:
            if resp.status_code == 304:
                return NotModified()
            if resp.status_code == 404:
                return Failed(SourceError.NOT_FOUND, "HTTP 404")
            if resp.status_code != 200:
                return Failed(SourceError.HTTP_STATUS, f"HTTP {resp.status_code}")
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_SIZE:
                return Failed(Reason.OVERSIZED, f"Content-Length {length} > {MAX_SIZE}")
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                if len(buf) > MAX_SIZE:
                    return Failed(Reason.OVERSIZED, f"body over {MAX_SIZE} bytes")
            return Fetched((bytes(buf),))
    except httpx.TimeoutException:
        return Failed(SourceError.TIMEOUT, "HTTP timeout")
    except httpx.HTTPError as e:
        return Failed(SourceError.UNREACHABLE, f"{type(e).__name__}: {e}")


async def _fetch_dns(src: DnsSource, timeout: float) -> SourceResult:
    import dns.asyncquery
    import dns.asyncresolver
    import dns.exception
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.resolver

    qname = seeds_name(src.name) + "."
    try:
        if src.server is not None:
            host, port = src.server
            query = dns.message.make_query(qname, dns.rdatatype.TXT, use_edns=0, payload=1232)
            resp, _used_tcp = await dns.asyncquery.udp_with_fallback(
                query, host, timeout=timeout, port=port
            )
            rcode = resp.rcode()
            if rcode == dns.rcode.NXDOMAIN:
                return Failed(SourceError.NOT_FOUND, f"NXDOMAIN {qname}")
            if rcode != dns.rcode.NOERROR:
                return Failed(SourceError.UNREACHABLE, f"DNS {dns.rcode.to_text(rcode)}")
            rrsets = [r for r in resp.answer if r.rdtype == dns.rdatatype.TXT]
        else:
            resolver = dns.asyncresolver.Resolver()
            answer = await resolver.resolve(qname, "TXT", lifetime=timeout)
            rrsets = [answer.rrset] if answer.rrset is not None else []
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return Failed(SourceError.NOT_FOUND, f"no TXT records at {qname}")
    except dns.exception.Timeout:
        return Failed(SourceError.TIMEOUT, "DNS timeout")
    except (dns.exception.DNSException, OSError) as e:
        return Failed(SourceError.UNREACHABLE, f"{type(e).__name__}: {e}")
    strings = [b"".join(rd.strings) for rrset in rrsets for rd in rrset]
    if not strings:
        return Failed(SourceError.NOT_FOUND, f"no TXT records at {qname}")
    try:
        return Fetched(tuple(decode_txt(strings)))
    except DecodeError as e:
        return Failed(e.reason, e.detail)


async def fetch_source(
    source: str, *, timeout: float = DEFAULT_TIMEOUT, cache_etag: str | None = None, client=None
) -> SourceResult:
    """Fetch one source under ``timeout``. Never raises for a bad or dead source."""
    try:
        src = parse_source(source)
    except LocalError as e:
        return Failed(SourceError.INVALID_SOURCE, str(e))
    result: SourceResult = Failed(SourceError.TIMEOUT, f"no answer within {timeout:g} s")
    with trio.move_on_after(timeout):
        try:
            if isinstance(src, FileSource):
                result = await _fetch_file(src)
            elif isinstance(src, DnsSource):
                result = await _fetch_dns(src, timeout)
            elif client is not None:
                result = await _fetch_http(client, src, cache_etag)
            else:
                async with _http_client(timeout) as own:
                    result = await _fetch_http(own, src, cache_etag)
        except Exception as e:  # an adapter edge: a library bug must not sink the other sources
            result = Failed(SourceError.UNREACHABLE, f"{type(e).__name__}: {e}")
    return result


def _http_client(timeout: float):
    import httpx

    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=False,
        headers={"User-Agent": "hydra-overlay-seeds/1"},
    )


# ---- cache -----------------------------------------------------------------------------


def read_cache(path: Path) -> bytes | None:
    """The cached bundle's bytes, or None (missing, unreadable or oversized)."""
    try:
        data = _read_capped(path)
    except OSError:
        return None
    return data if 0 < len(data) <= MAX_SIZE else None


# ---- the whole fetch ---------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    """``bundle`` is verified and fresh, or None; ``outcomes`` follow ``sources``' order."""

    bundle: ValidBundle | None
    from_cache: bool
    outcomes: tuple[SourceReport, ...]
    cache_status: str
    expired_cache: VerifiedBundle | None = None
    cache_written: bool = False

    def join_addrs(self) -> list[str]:
        return self.bundle.join_addrs() if self.bundle is not None else []

    def to_json(self) -> dict[str, Any]:
        b = self.bundle
        return {
            "ok": b is not None,
            "from_cache": self.from_cache,
            "cache": self.cache_status,
            "cache_written": self.cache_written,
            "bundle": None
            if b is None
            else {
                "seq": b.seq,
                "issued_at": b.issued_at,
                "expires_at": b.expires_at,
                "signers": sorted(k.hex() for k in b.signers),
                "join_addrs": b.join_addrs(),
            },
            "sources": [
                {
                    "source": o.source,
                    "ok": o.ok,
                    "chosen": o.chosen,
                    "reason": o.reason_text,
                    "detail": o.detail,
                    "seq": o.seq,
                }
                for o in self.outcomes
            ],
        }


async def fetch_bundle(
    sources: Iterable[str],
    operators: Iterable[bytes | NodeId],
    threshold: int,
    cache_path: Path | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    now: float | None = None,
) -> FetchResult:
    """Fetch every source concurrently, keep the newest bundle that >= ``threshold``
    of the pinned ``operators`` signed, fall back to the on-disk cache.

    Raises ``LocalError`` only for a bad pinned configuration; every source
    problem is reported in ``outcomes``.
    """
    sources = list(sources)
    operators = list(operators)
    pinned_set(operators, threshold)  # fail early on a bad configuration
    cache = await trio.to_thread.run_sync(read_cache, cache_path) if cache_path else None
    cache_etag = etag(cache) if cache is not None else None
    results: list[SourceResult] = [Failed(SourceError.TIMEOUT)] * len(sources)

    async with _http_client(timeout) as client:

        async def one(i: int, source: str) -> None:
            results[i] = await fetch_source(
                source, timeout=timeout, cache_etag=cache_etag, client=client
            )

        async with trio.open_nursery() as nursery:
            for i, source in enumerate(sources):
                nursery.start_soon(one, i, source)

    res = resolve(
        list(zip(sources, results, strict=True)),
        operators,
        threshold,
        cache,
        time.time() if now is None else now,
    )
    written = False
    if res.write_cache and cache_path is not None and res.bundle is not None:
        try:
            await trio.to_thread.run_sync(
                functools.partial(write_atomic, cache_path, res.bundle.raw, mode=0o644)
            )
            written = True
        except OSError:
            written = False
    return FetchResult(
        bundle=res.bundle,
        from_cache=res.from_cache,
        outcomes=res.outcomes,
        cache_status=res.cache_status,
        expired_cache=res.expired_cache,
        cache_written=written,
    )
