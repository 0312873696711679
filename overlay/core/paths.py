"""Sans-I/O path selection: which nodes a packet (or a reply) travels through.

A *forward path* is ``entry, relay..., exit`` and ``hops`` counts every node
that processes the packet, the entry and the exit included (the sender itself
is not a hop: a light client hands the packet to its entry, which is the first
hop). The default ``hops = 3`` is entry, one relay, exit; ``hops`` may be
2..5 (``SMALL.max_hops``). A *return path* (for a SURB) is ``relay..., last``
with ``hops`` nodes, ``last`` being where the reply is delivered (a light
client's entry node).

Rules, in order of priority:
- every node of a path is distinct, live (no tombstone) and has weight > 0;
  ``exclude`` is never used;
- the exit has the EXIT role and its published policy allows the
  destination (``policy_allows`` on ``Destination.policy_subject``); a given
  ``exit_hint`` is used when it qualifies;
- middle hops have the RELAY role; the entry (when given) may have any role;
- nodes in ``avoid`` (e.g. nodes that failed recently) are chosen only when
  no other node can fill a position;
- among the rest, each position is a weighted random choice: weight from
  ``weights`` (a number, or a liveness state name: alive/unknown 1, suspect
  0.25, dead 0; missing means 1), times ``DIVERSITY_PENALTY`` when the node
  shares a feed network (``feed_network``) with a hop already chosen, so
  paths spread over different networks when the membership allows it.

Invariants: pure (no I/O, no clock); all randomness from ``rng``; the result
for a given input and rng state does not depend on the order of ``records``.
Failure raises ``NoPath`` (a ``LocalError``) with a stable ``reason``:
``entry_unknown``, ``no_exit``, ``not_enough_relays``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..crypto import NodeId
from ..errors import LocalError
from ..onion.params import SMALL, Hop
from ..records import Role, ValidRecord, policy_allows
from ..wire.delivery import Destination, parse_destination
from .peering import feed_network

DEFAULT_HOPS = 3
MAX_HOPS = SMALL.max_hops
DIVERSITY_PENALTY = 0.1
STATE_WEIGHTS = {"alive": 1.0, "unknown": 1.0, "suspect": 0.25, "dead": 0.0}

Weights = Mapping[NodeId, float | str]


class NoPath(LocalError):
    """No path satisfies the rules with the current membership."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True, slots=True)
class Path:
    """Records of the hops, first hop first."""

    hops: tuple[ValidRecord, ...]

    @property
    def first(self) -> ValidRecord:
        return self.hops[0]

    @property
    def last(self) -> ValidRecord:
        return self.hops[-1]

    @property
    def middle(self) -> tuple[ValidRecord, ...]:
        return self.hops[1:-1]

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        return tuple(r.node_id for r in self.hops)

    def sphinx_hops(self) -> list[Hop]:
        return [Hop(r.node_id, r.onion_key, r.onion_epoch) for r in self.hops]

    def __len__(self) -> int:
        return len(self.hops)


def weight_of(weights: Weights | None, node: NodeId) -> float:
    if weights is None:
        return 1.0
    w = weights.get(node, 1.0)
    if isinstance(w, str):
        return STATE_WEIGHTS.get(w, 1.0)
    return max(0.0, float(w))


def _networks(rec: ValidRecord) -> frozenset[str]:
    return frozenset(feed_network(f) for f in rec.feeds)


def exits_for(records: Iterable[ValidRecord], destination: str | Destination) -> list[ValidRecord]:
    """Live exits whose policy serves ``destination``, sorted by node id."""
    dest = parse_destination(destination) if isinstance(destination, str) else destination
    return sorted(
        (
            r
            for r in records
            if not r.is_tombstone
            and Role.EXIT in r.roles
            and policy_allows(r.exit_policy, dest.kind, dest.policy_subject)
        ),
        key=lambda r: bytes(r.node_id),
    )


def _usable(records: Iterable[ValidRecord], exclude: Collection[NodeId], weights) -> list:
    out = {}
    for r in records:
        if r.is_tombstone or r.node_id in exclude or weight_of(weights, r.node_id) <= 0:
            continue
        out[r.node_id] = r
    return sorted(out.values(), key=lambda r: bytes(r.node_id))


def _pick(
    pool: Sequence[ValidRecord],
    rng: random.Random,
    taken: set[NodeId],
    used_nets: set[str],
    avoid: Collection[NodeId],
    weights: Weights | None,
) -> ValidRecord | None:
    """One weighted choice from ``pool`` minus ``taken``; non-avoided nodes first."""
    free = [r for r in pool if r.node_id not in taken]
    preferred = [r for r in free if r.node_id not in avoid]
    tier = preferred or free
    if not tier:
        return None
    scores = []
    for r in tier:
        w = weight_of(weights, r.node_id)
        if _networks(r) & used_nets:
            w *= DIVERSITY_PENALTY
        scores.append(w)
    total = sum(scores)
    x = rng.random() * total
    for r, s in zip(tier, scores, strict=True):
        x -= s
        if x < 0:
            return r
    return tier[-1]


def _check_hops(hops: int) -> None:
    if not 2 <= hops <= MAX_HOPS:
        raise LocalError(f"hops must be in 2..{MAX_HOPS}")


def select_path(
    records: Iterable[ValidRecord],
    rng: random.Random,
    *,
    destination: str | Destination,
    hops: int = DEFAULT_HOPS,
    entry: NodeId | None = None,
    exit_hint: NodeId | None = None,
    exclude: Collection[NodeId] = frozenset(),
    avoid: Collection[NodeId] = frozenset(),
    weights: Weights | None = None,
) -> Path:
    """A forward path ``entry, relays..., exit`` of ``hops`` nodes for ``destination``.

    Without ``entry`` the first hop is a relay like the middle ones (a node
    sending on its own behalf). Raises ``NoPath``.
    """
    _check_hops(hops)
    records = list(records)
    usable = _usable(records, exclude, weights)
    by_id = {r.node_id: r for r in usable}
    taken: set[NodeId] = set()
    nets: set[str] = set()
    first: ValidRecord | None = None
    if entry is not None:
        first = by_id.get(entry)
        if first is None:
            raise NoPath("entry_unknown", f"entry {entry.short()} not in the live membership")
        taken.add(entry)
        nets |= _networks(first)

    exits = [r for r in exits_for(usable, destination) if r.node_id not in taken]
    if not exits:
        raise NoPath("no_exit", f"no live exit allows {destination}")
    exit_rec = None
    if exit_hint is not None:
        exit_rec = next((r for r in exits if r.node_id == exit_hint), None)
    if exit_rec is None:
        exit_rec = _pick(exits, rng, taken, nets, avoid, weights)
    if exit_rec is None:  # pragma: no cover - exits is non-empty and none of it is taken
        raise NoPath("no_exit", "no exit left")
    taken.add(exit_rec.node_id)
    nets |= _networks(exit_rec)

    relays = [r for r in usable if Role.RELAY in r.roles]
    middle: list[ValidRecord] = []
    need = hops - 2 if first is not None else hops - 1
    for _ in range(need):
        r = _pick(relays, rng, taken, nets, avoid, weights)
        if r is None:
            raise NoPath("not_enough_relays", f"need {need} relays besides entry and exit")
        middle.append(r)
        taken.add(r.node_id)
        nets |= _networks(r)
    head = [first] if first is not None else []
    return Path((*head, *middle, exit_rec))


def select_return_path(
    records: Iterable[ValidRecord],
    rng: random.Random,
    *,
    last: NodeId,
    hops: int = DEFAULT_HOPS,
    exclude: Collection[NodeId] = frozenset(),
    avoid: Collection[NodeId] = frozenset(),
    weights: Weights | None = None,
) -> Path:
    """A SURB return path ``relays..., last`` of ``hops`` nodes. Raises ``NoPath``."""
    _check_hops(hops)
    usable = _usable(records, exclude, weights)
    end = next((r for r in usable if r.node_id == last), None)
    if end is None:
        raise NoPath("entry_unknown", f"{last.short()} not in the live membership")
    taken = {last}
    nets = set(_networks(end))
    relays = [r for r in usable if Role.RELAY in r.roles]
    chosen: list[ValidRecord] = []
    for _ in range(hops - 1):
        r = _pick(relays, rng, taken, nets, avoid, weights)
        if r is None:
            raise NoPath("not_enough_relays", f"need {hops - 1} relays for the return path")
        chosen.append(r)
        taken.add(r.node_id)
        nets |= _networks(r)
    return Path((*chosen, end))
