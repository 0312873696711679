"""Choose healthy, diverse entry peers from a node's membership view. Pure.

Input is the JSON a running node's control endpoint returns at ``/records``::

    {"records": [{"peer_id": "12D3…", "node_id": hex, "seq": int, "roles": [...],
                  "feeds": [multiaddr, ...], "expires_at": int, "live": bool}, ...]}

Healthy: ``live`` is true and the record does not expire within
``min_remaining`` seconds. Diverse: peers are picked greedily, each time the
one adding the most network groups (IPv4 /16, IPv6 /32, DNS name, relay) not
yet covered, then the most new transports (tcp, tcp/ws, udp/quic-v1,
p2p-circuit, …); ties go to peers with the ``entry`` role, then to the
longest-lived record, then the peer id. So a
takedown of one hosting network, or a block of one transport, leaves other
bundle entries reachable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from overlay.crypto import NodeId

from .bundle import MAX_ADDRS, Entry, addr_problem, strip_own_p2p

_VALUED = {
    "ip4",
    "ip6",
    "ip6zone",
    "dns",
    "dns4",
    "dns6",
    "dnsaddr",
    "tcp",
    "udp",
    "p2p",
    "ipfs",
    "certhash",
    "sni",
    "garlic32",
    "garlic64",
    "onion3",
}
_NAMES = {"ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr"}
_MAX_PEER_ID = 64  # an Ed25519 peer id is 52 characters


def components(addr: str) -> list[tuple[str, str | None]]:
    """Split a multiaddr string into (protocol, value) pairs (heuristic, for ranking)."""
    parts = addr.split("/")[1:]
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(parts):
        name = parts[i]
        if name in _VALUED and i + 1 < len(parts):
            out.append((name, parts[i + 1]))
            i += 2
        else:
            out.append((name, None))
            i += 1
    return out


def network_group(addr: str) -> str:
    """A coarse "who could take this down" key: IPv4 /16, IPv6 /32 or a DNS name."""
    for name, value in components(addr):
        if name in _NAMES and value:
            if name == "ip4":
                try:
                    net = ipaddress.ip_network(f"{value}/16", strict=False)
                    return f"ip4:{net}"
                except ValueError:
                    return f"ip4:{value}"
            if name == "ip6":
                try:
                    net = ipaddress.ip_network(f"{value}/32", strict=False)
                    return f"ip6:{net}"
                except ValueError:
                    return f"ip6:{value}"
            return "dns:" + ".".join(value.lower().split(".")[-2:])
    return "other"


def transport(addr: str) -> str:
    comps = components(addr)
    if any(name == "p2p-circuit" for name, _ in comps):
        return "p2p-circuit"
    names = [n for n, _ in comps if n not in _NAMES and n not in ("p2p", "ipfs", "certhash")]
    return "/".join(names) or "unknown"


def is_public(addr: str) -> bool:
    """False for loopback, private, link-local or unspecified IP addresses."""
    for name, value in components(addr):
        if name in ("ip4", "ip6") and value:
            try:
                ip = ipaddress.ip_address(value)
            except ValueError:
                return False
            return ip.is_global
    return True


@dataclass(frozen=True)
class Candidate:
    entry: Entry
    groups: frozenset[str]
    transports: frozenset[str]
    expires_at: int
    peer_id: str
    entry_role: bool = False


def _pick_addrs(peer: NodeId, feeds: Iterable[Any], public_only: bool) -> list[str]:
    addrs: list[str] = []
    for raw in feeds:
        if not isinstance(raw, str):
            continue
        a = strip_own_p2p(raw, peer)
        if a in addrs or addr_problem(a, peer) or (public_only and not is_public(a)):
            continue
        addrs.append(a)
    # one address per transport first, then the rest, up to MAX_ADDRS
    first: list[str] = []
    seen: set[str] = set()
    for a in addrs:
        if transport(a) not in seen:
            seen.add(transport(a))
            first.append(a)
    rest = [a for a in addrs if a not in first]
    return (first + rest)[:MAX_ADDRS]


def candidates(
    records: Iterable[Mapping[str, Any]], *, now: float, min_remaining: int, public_only: bool
) -> list[Candidate]:
    out: list[Candidate] = []
    seen: set[NodeId] = set()
    for rec in records:
        if not isinstance(rec, Mapping) or rec.get("live") is not True:
            continue
        expires = rec.get("expires_at")
        if type(expires) is not int or expires < now + min_remaining:
            continue
        peer_id = rec.get("peer_id")
        if not isinstance(peer_id, str) or len(peer_id) > _MAX_PEER_ID:
            continue  # (base58 decoding is quadratic in the length)
        try:
            peer = NodeId.from_peer_id(peer_id)
        except ValueError:
            continue
        if peer in seen:
            continue
        feeds = rec.get("feeds")
        if not isinstance(feeds, list):
            continue
        addrs = _pick_addrs(peer, feeds, public_only)
        if not addrs:
            continue
        seen.add(peer)
        out.append(
            Candidate(
                Entry(peer, tuple(addrs)),
                frozenset(network_group(a) for a in addrs),
                frozenset(transport(a) for a in addrs),
                expires,
                peer.peer_id(),
                isinstance(rec.get("roles"), list) and "entry" in rec["roles"],
            )
        )
    return out


def _score(c: Candidate, groups: set[str], transports: set[str]) -> tuple[int, int, bool, int, str]:
    return (
        len(c.groups - groups),
        len(c.transports - transports),
        c.entry_role,
        c.expires_at,
        c.peer_id,
    )


def choose_entries(
    records: Iterable[Mapping[str, Any]],
    *,
    now: float,
    max_peers: int = 8,
    min_remaining: int = 600,
    public_only: bool = False,
) -> list[Entry]:
    """Up to ``max_peers`` healthy entries, greedily maximising network and transport spread."""
    pool = candidates(records, now=now, min_remaining=min_remaining, public_only=public_only)
    chosen: list[Entry] = []
    groups: set[str] = set()
    transports: set[str] = set()
    while pool and len(chosen) < max_peers:
        best = max(pool, key=lambda c: _score(c, groups, transports))
        pool.remove(best)
        chosen.append(best.entry)
        groups |= best.groups
        transports |= best.transports
    return chosen
