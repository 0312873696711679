"""DNS TXT format for seed bundles ("hs1") and the zone-file export. Pure, no I/O.

Under a domain ``D`` an operator publishes two RRsets (see docs/operator.md):

``_hydra-seeds.D. TTL IN TXT "hs1 <digest8> <i>/<n> <chunk>"`` (n records)
    The whole signed bundle, so a client can verify operator signatures from
    DNS alone. The encoded bundle is base64 (RFC 4648 alphabet, padded) and cut
    into ``n`` chunks of at most ``CHUNK`` characters; record ``i`` (0-based)
    holds chunk ``i``. ``digest8`` is the first 8 hex digits of
    ``bundle.digest(raw)``: it ties the chunks of one bundle together, so two
    bundles may be published side by side during a change-over and a reader
    reassembles each complete set separately. Every record is one
    character-string of at most 255 bytes.

``_dnsaddr.D. TTL IN TXT "dnsaddr=<multiaddr>/p2p/<peer id>"`` (one per address)
    The libp2p ``dnsaddr`` convention, so other libp2p implementations can
    dial ``/dnsaddr/D``. These records are NOT signed: Hydra's fetcher ignores
    them and trusts only the ``_hydra-seeds`` bundle.

Invariant: ``decode_txt(encode_txt(raw)) == [raw]``, whatever the record order;
``decode_txt`` raises only ``DecodeError``.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterable

from overlay.errors import DecodeError, LocalError, Reason

from .bundle import MAX_SIZE, SeedBundle, digest

PREFIX = "hs1"
CHUNK = 200
SEEDS_LABEL = "_hydra-seeds"
DNSADDR_LABEL = "_dnsaddr"
MAX_CHUNKS = (MAX_SIZE * 4 // 3 + 4) // CHUNK + 1
MAX_STRINGS = 4 * MAX_CHUNKS
DEFAULT_TTL = 300

_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_HEX8_RE = re.compile(r"^[0-9a-f]{8}$")


def normalize_domain(domain: str) -> str:
    """Lower-case, without the trailing dot. Raises ``LocalError`` if not a DNS name."""
    d = domain.strip().rstrip(".").lower()
    labels = d.split(".")
    if not d or len(d) > 253 - len(SEEDS_LABEL) - 1 or not all(_LABEL_RE.match(x) for x in labels):
        raise LocalError(f"not a DNS domain name: {domain!r}")
    return d


def seeds_name(domain: str) -> str:
    """The owner name of the bundle's TXT records (no trailing dot)."""
    d = normalize_domain(domain)
    if d.split(".")[0] == SEEDS_LABEL:
        return d
    return f"{SEEDS_LABEL}.{d}"


def encode_txt(raw: bytes) -> list[str]:
    """The ``_hydra-seeds`` TXT strings carrying ``raw`` (one string per record)."""
    if len(raw) > MAX_SIZE:
        raise LocalError("bundle over MAX_SIZE")
    b64 = base64.b64encode(raw).decode("ascii")
    chunks = [b64[i : i + CHUNK] for i in range(0, len(b64), CHUNK)] or [""]
    d8 = digest(raw)[:4].hex()
    n = len(chunks)
    return [f"{PREFIX} {d8} {i}/{n} {c}" for i, c in enumerate(chunks)]


def decode_txt(strings: Iterable[bytes | str]) -> list[bytes]:
    """Every complete bundle found among TXT strings (other strings are ignored).

    Raises ``DecodeError`` (reason ``malformed``) if none is complete, or
    (``oversized``) if there are more than ``MAX_STRINGS`` strings.
    """
    groups: dict[tuple[str, int], dict[int, str]] = {}
    poisoned: set[tuple[str, int]] = set()
    count = 0
    for s in strings:
        count += 1
        if count > MAX_STRINGS:
            raise DecodeError(Reason.OVERSIZED, f"more than {MAX_STRINGS} TXT strings")
        if isinstance(s, bytes | bytearray | memoryview):
            try:
                s = bytes(s).decode("ascii")
            except UnicodeDecodeError:
                continue
        elif not isinstance(s, str):
            continue
        parts = s.split(" ")
        if len(parts) != 4 or parts[0] != PREFIX or not _HEX8_RE.match(parts[1]):
            continue
        i_text, _, n_text = parts[2].partition("/")
        if not (i_text.isdigit() and n_text.isdigit()) or len(i_text) > 4 or len(n_text) > 4:
            continue
        i, n = int(i_text), int(n_text)
        if not 0 <= i < n <= MAX_CHUNKS or len(parts[3]) > CHUNK:
            continue
        key = (parts[1], n)
        have = groups.setdefault(key, {})
        if have.get(i, parts[3]) != parts[3]:
            poisoned.add(key)
        have[i] = parts[3]
    found: list[bytes] = []
    for (d8, n), chunks in sorted(groups.items()):
        if (d8, n) in poisoned or len(chunks) != n:
            continue
        try:
            raw = base64.b64decode("".join(chunks[i] for i in range(n)), validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) > MAX_SIZE or digest(raw)[:4].hex() != d8:
            continue
        found.append(raw)
    if not found:
        raise DecodeError(Reason.MALFORMED, "no complete hs1 bundle in the TXT records")
    return found


def _quote(text: str) -> str:
    # encode_txt output and validated multiaddrs never hold '"', '\\' or non-ASCII
    return f'"{text}"'


def zone_lines(
    bundle: SeedBundle, raw: bytes, domain: str, *, ttl: int = DEFAULT_TTL, dnsaddr: bool = True
) -> list[str]:
    """Zone-file lines (absolute owner names) publishing ``raw`` under ``domain``."""
    d = normalize_domain(domain)
    if d.split(".")[0] == SEEDS_LABEL:
        raise LocalError("give the base domain, not the _hydra-seeds name")
    if not 0 < ttl <= 86400:
        raise LocalError("ttl must be 1..86400 seconds")
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bundle.expires_at))
    lines = [
        f"; Hydra seed bundle for {d}: seq {bundle.seq}, expires {expires},"
        f" {bundle.threshold}-of-{len(bundle.operators)} operators,"
        f" {len(bundle.signatures)} signature(s)",
        "; generated by `overlay-seeds export-dns`; see docs/operator.md",
    ]
    if dnsaddr:
        lines.append("; libp2p dnsaddr records (unsigned; for other libp2p implementations)")
        for addr in bundle.join_addrs():
            lines.append(f"{DNSADDR_LABEL}.{d}. {ttl} IN TXT {_quote('dnsaddr=' + addr)}")
    lines.append(f'; the signed bundle, base64 in chunks: "{PREFIX} <digest8> <i>/<n> <base64>"')
    for s in encode_txt(raw):
        lines.append(f"{SEEDS_LABEL}.{d}. {ttl} IN TXT {_quote(s)}")
    return lines


def zone_text(bundle: SeedBundle, raw: bytes, domain: str, *, ttl: int = DEFAULT_TTL) -> str:
    return "\n".join(zone_lines(bundle, raw, domain, ttl=ttl)) + "\n"
