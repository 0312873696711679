"""Sans-I/O choice of which peers to keep connections to.

Goal: ``target`` connections, spread over as many different feed networks
(address prefix + transport) as the membership offers, so that losing one
network or provider does not partition the node. Members this node verified
(``prefer``) come first; others (whose addresses are only claimed) are chosen
only to make up the rest, at most ``max_other`` of them (the dial budget).

Connections opened for one errand (a DHT store at the members closest to a
key, the verification of a member we were only told about) are *transient*:
``choose_trims`` says which of them to close once they have lingered idle,
so that a node's connections stay near ``target`` instead of growing with
every record it stores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from ..crypto import NodeId
from ..records import ValidRecord


def feed_network(feed: str) -> str:
    """A coarse label for the network a feed lives on: /16 for IPv4, /32 for IPv6, name for DNS."""
    parts = feed.split("/")
    kind, host = parts[1], parts[2] if len(parts) > 2 else ""
    if "p2p-circuit" in parts:
        return "relay:" + (parts[parts.index("p2p") + 1] if "p2p" in parts else host)
    if kind == "ip4":
        return "ip4:" + ".".join(host.split(".")[:2])
    if kind == "ip6":
        return "ip6:" + ":".join(host.split(":")[:2])
    return f"{kind}:{host}"


def choose_dials(
    candidates: Iterable[ValidRecord],
    connected: set[NodeId],
    me: NodeId,
    target: int,
    rng: random.Random,
    exclude: set[NodeId] = frozenset(),
    prefer: Callable[[NodeId], bool] | None = None,
    max_other: int | None = None,
) -> list[ValidRecord]:
    """Records of peers to dial so that connections reach ``target``: preferred
    (verified) members first, most diverse first within each tier; at most
    ``max_other`` members that are not preferred."""
    need = target - len(connected)
    if need <= 0:
        return []
    candidates = list(candidates)
    pool = [
        r
        for r in candidates
        if not r.is_tombstone
        and r.node_id != me
        and r.node_id not in connected
        and r.node_id not in exclude
    ]
    rng.shuffle(pool)
    # networks we already reach count as covered; prefer peers on new networks
    covered: dict[str, int] = {}
    for r in candidates:
        if r.node_id in connected and not r.is_tombstone:
            for f in r.feeds:
                covered[feed_network(f)] = covered.get(feed_network(f), 0) + 1

    def tier(r: ValidRecord) -> int:
        return 0 if prefer is None or prefer(r.node_id) else 1

    tiers = {r.node_id: tier(r) for r in pool}
    if max_other is not None:
        pool = [r for r in pool if tiers[r.node_id] == 0] + [
            r for r in pool if tiers[r.node_id] == 1
        ][: max(0, max_other)]

    def rank(r: ValidRecord) -> tuple[int, int]:
        return tiers[r.node_id], -len({feed_network(f) for f in r.feeds} - set(covered))

    chosen: list[ValidRecord] = []
    while pool and len(chosen) < need:
        pool.sort(key=rank)
        best = pool.pop(0)
        chosen.append(best)
        for f in best.feeds:
            covered[feed_network(f)] = covered.get(feed_network(f), 0) + 1
    return chosen


def choose_trims(
    transient: dict[NodeId, float],
    connected: set[NodeId],
    *,
    keep: set[NodeId],
    busy: Callable[[NodeId], bool],
    target: int,
    now: float,
    linger: float,
) -> tuple[list[NodeId], list[NodeId]]:
    """Which transient connections to close now, and which to stop tracking.

    ``transient`` maps each member we dialled for an errand to when we did.
    One is forgotten (never closed by this) when the connection is gone, when
    the member is one to ``keep`` (an exit, a relay we use), or when closing it
    would leave fewer than ``target`` connections (it now serves as a peer).
    It is closed once ``linger`` seconds have passed and ``busy`` (streams of
    an errand still open on it) is false; the oldest go first.
    """
    trim: list[NodeId] = []
    forget: list[NodeId] = []
    left = len(connected)
    for peer, since in sorted(transient.items(), key=lambda kv: (kv[1], bytes(kv[0]))):
        if peer not in connected or peer in keep:
            forget.append(peer)
        elif now - since < linger or busy(peer):
            continue
        elif left <= target:
            forget.append(peer)
        else:
            trim.append(peer)
            forget.append(peer)
            left -= 1
    return trim, forget
