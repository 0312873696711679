"""Sans-I/O admission of new members and the budget for dialling what records claim.

A valid self-signed record costs its author nothing, so the membership table
cannot take every one it is offered. Members are *verified* or *unverified*:

- **verified**: our own record, and every node that authenticated to us itself
  (a libp2p connection whose peer id is the record's node id: it connected,
  we connected to it, it answered a probe, it served or asked for a sync
  round). The runtime reports these with ``confirm(node, now)``; a confirmation
  that arrives before the record is remembered (bounded) and applied when the
  record comes. Verification survives restarts (the store keeps the flag).
- **unverified**: a record we were merely handed. A new identity is admitted
  as unverified only within a global token bucket of new identities, a bucket
  per forwarding peer, and ``max_unverified``; beyond them it is refused
  (``Reason.ADMISSION_LIMIT`` / ``Reason.TABLE_FULL``) and the forwarder is not
  blamed (honest peers forward what they admitted). An unverified member that
  is not confirmed within ``unverified_ttl`` is dropped.

Updates (higher ``seq``) of a member already held are not new identities and
are never limited here. A ``bulk`` admission (the membership pull of a node
that is joining) skips the rate buckets but never the table bounds.

``DialBudget`` bounds the dials a node makes to addresses it has no reason to
trust: at most ``rate`` new unverified targets per second (burst ``burst``),
no ``host:port`` dialled for an unverified target if it was dialled within
``addr_interval``, and no address redialled within ``failed_interval`` of a
failed dial, whoever the target.

Invariants:
- ``unverified <= max_unverified`` and ``len(entries) <= max_members`` at all
  times (refusal, or eviction of the newest unverified member to make room
  for a verified one);
- a verified member is never evicted or dropped here (only its record's own
  expiry or a tombstone's removes it);
- every map is bounded (``max_pending``, ``max_refused``, ``max_peer_buckets``,
  ``DialBudget.max_addrs``);
- pure: time is a parameter, no I/O, no randomness.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..crypto import NodeId
from ..errors import Reason, RemoteError
from .feedhealth import is_relay_feed


class Refused(RemoteError):
    """A valid record for a new identity that the bounds do not let in (not the
    forwarder's fault: it is not penalised, and the record is not forwarded)."""

    default_reason = Reason.ADMISSION_LIMIT


REFUSALS = (Reason.ADMISSION_LIMIT, Reason.TABLE_FULL)


@dataclass(frozen=True, slots=True)
class Limits:
    """Admission bounds (``[admission]`` in config.toml).

    Defaults: 2 new identities/s with a burst of 512 lets 200 nodes join within
    a minute; 1 per forwarding peer per second (burst 256) keeps one peer from
    taking the whole global burst; 1,024 unverified members and 16,384 in all
    (the simulator runs 10,000 nodes); 30 minutes to be confirmed.
    """

    rate: float = 2.0
    burst: float = 512.0
    peer_rate: float = 1.0
    peer_burst: float = 256.0
    max_unverified: int = 1024
    max_members: int = 16384
    unverified_ttl: float = 1800.0
    max_pending: int = 4096  # confirmations waiting for their record
    pending_ttl: float = 600.0
    max_refused: int = 8192  # ids refused lately: anti-entropy does not ask for them
    refused_ttl: float = 300.0
    max_peer_buckets: int = 1024


class Bucket:
    """A token bucket that can be checked without taking (so invalid input costs nothing)."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens: float = burst
        self.updated: float | None = None

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self.tokens

    def can(self, now: float, n: float = 1.0) -> bool:
        return self.available(now) >= n

    def take(self, now: float, n: float = 1.0) -> bool:
        if not self.can(now, n):
            return False
        self.tokens -= n
        return True


@dataclass(slots=True)
class Entry:
    """What admission knows about one member."""

    first_seen: float
    verified_since: float | None = None

    @property
    def verified(self) -> bool:
        return self.verified_since is not None


class Admission:
    """Bounds on the membership table. See the module docstring.

    ``MembershipView`` drives it: ``check`` before verifying a new identity's
    signature (nothing is spent on a record that would be refused), ``admit``
    once it is valid, ``forget`` when a record leaves the view.
    """

    def __init__(self, limits: Limits | None = None, me: NodeId | None = None) -> None:
        self.limits = lim = limits or Limits()
        if lim.max_unverified < 0 or lim.max_members < 1 or lim.rate < 0 or lim.burst < 0:
            raise ValueError("admission limits must be non-negative")
        self.me = me
        self.entries: dict[NodeId, Entry] = {}
        self.unverified = 0
        self.rejected = 0
        self.version = 0  # bumped whenever the set of verified members changes
        self._global = Bucket(lim.rate, lim.burst)
        self._peers: OrderedDict[Hashable, Bucket] = OrderedDict()
        self._pending: OrderedDict[NodeId, float] = OrderedDict()  # confirmed, record unknown
        self._refused: OrderedDict[NodeId, float] = OrderedDict()

    # -- queries ----------------------------------------------------------------

    def verified_since(self, node: NodeId) -> float | None:
        e = self.entries.get(node)
        return None if e is None else e.verified_since

    def is_verified(self, node: NodeId) -> bool:
        e = self.entries.get(node)
        return e is not None and e.verified_since is not None

    @property
    def verified(self) -> int:
        return len(self.entries) - self.unverified

    def refused_recently(self, node: NodeId, now: float) -> bool:
        t = self._refused.get(node)
        return t is not None and now - t < self.limits.refused_ttl

    # -- admission ----------------------------------------------------------------

    def check(self, node: NodeId, peer: Hashable | None, now: float, bulk: bool = False) -> bool:
        """May ``node`` (not in the table) be admitted now? True if it would be
        verified at once. Raises ``Refused``; takes nothing (see ``admit``)."""
        if self._confirmed_before(node, now):
            if len(self.entries) >= self.limits.max_members and not self.unverified:
                self._refuse(node, now, Reason.TABLE_FULL, "membership table full")
            return True
        lim = self.limits
        if self.unverified >= lim.max_unverified or len(self.entries) >= lim.max_members:
            self._refuse(node, now, Reason.TABLE_FULL, f"{self.unverified} unverified members")
        if not bulk:
            if not self._global.can(now):
                self._refuse(node, now, Reason.ADMISSION_LIMIT, "new identities arrive too fast")
            if peer is not None:
                b = self._peers.get(peer)
                if b is not None and not b.can(now):
                    self._refuse(node, now, Reason.ADMISSION_LIMIT, "too many new identities")
        return False

    def admit(
        self, node: NodeId, peer: Hashable | None, now: float, bulk: bool = False
    ) -> list[NodeId]:
        """Enter ``node`` (after ``check`` and signature checks passed). Returns the
        members evicted to make room (to be removed from the view and store)."""
        if node in self.entries:
            return []
        evicted: list[NodeId] = []
        verified = self._confirmed_before(node, now)
        self._pending.pop(node, None)
        self._refused.pop(node, None)
        if verified:
            while len(self.entries) >= self.limits.max_members:
                victim = self._newest_unverified()
                if victim is None:
                    break
                self.forget(victim)
                evicted.append(victim)
            self.entries[node] = Entry(now, now)
            self.version += 1
            return evicted
        if not bulk:
            self._global.take(now)
            if peer is not None:
                self._peer_bucket(peer, now).take(now)
        self.entries[node] = Entry(now)
        self.unverified += 1
        return evicted

    def restore(self, node: NodeId, first_seen: float, verified_since: float | None) -> bool:
        """Enter a member loaded from the store; False (not entered) beyond the bounds."""
        if node in self.entries:
            return True
        if node == self.me and verified_since is None:
            verified_since = first_seen
        lim = self.limits
        if len(self.entries) >= lim.max_members:
            return False
        if verified_since is None:
            if self.unverified >= lim.max_unverified:
                return False
            self.unverified += 1
        else:
            self.version += 1
        self.entries[node] = Entry(first_seen, verified_since)
        return True

    def confirm(self, node: NodeId, now: float) -> bool:
        """``node`` authenticated to us itself. True if a member became verified."""
        e = self.entries.get(node)
        if e is None:
            self._refused.pop(node, None)
            self._pending[node] = now
            self._pending.move_to_end(node)
            while len(self._pending) > self.limits.max_pending:
                self._pending.popitem(last=False)
            return False
        if e.verified_since is not None:
            return False
        e.verified_since = now
        self.unverified -= 1
        self.version += 1
        return True

    def forget(self, node: NodeId) -> None:
        """The record of ``node`` left the view."""
        e = self.entries.pop(node, None)
        if e is None:
            return
        if e.verified_since is None:
            self.unverified -= 1
        else:
            self.version += 1

    def stale_unverified(self, now: float) -> list[NodeId]:
        """Unverified members not confirmed within ``unverified_ttl`` (to drop)."""
        ttl = self.limits.unverified_ttl
        out = [
            n
            for n, e in self.entries.items()
            if e.verified_since is None and now - e.first_seen >= ttl
        ]
        for n in out:
            self._note_refused(n, now)
        return out

    def prune(self, now: float) -> None:
        """Forget old pending confirmations, refusals and idle peer buckets."""
        lim = self.limits
        while self._pending and now - next(iter(self._pending.values())) >= lim.pending_ttl:
            self._pending.popitem(last=False)
        while self._refused and now - next(iter(self._refused.values())) >= lim.refused_ttl:
            self._refused.popitem(last=False)
        for peer in [p for p, b in self._peers.items() if b.available(now) >= b.burst]:
            del self._peers[peer]

    # -- internals ----------------------------------------------------------------

    def _confirmed_before(self, node: NodeId, now: float) -> bool:
        if node == self.me:
            return True
        t = self._pending.get(node)
        return t is not None and now - t < self.limits.pending_ttl

    def _refuse(self, node: NodeId, now: float, reason: Reason, detail: str) -> None:
        self.rejected += 1
        self._note_refused(node, now)
        raise Refused(reason, detail)

    def _note_refused(self, node: NodeId, now: float) -> None:
        self._refused[node] = now
        self._refused.move_to_end(node)
        while len(self._refused) > self.limits.max_refused:
            self._refused.popitem(last=False)

    def _peer_bucket(self, peer: Hashable, now: float) -> Bucket:
        b = self._peers.get(peer)
        if b is None:
            b = self._peers[peer] = Bucket(self.limits.peer_rate, self.limits.peer_burst)
            while len(self._peers) > self.limits.max_peer_buckets:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        return b

    def _newest_unverified(self) -> NodeId | None:
        best, best_t = None, -math.inf
        for n, e in self.entries.items():
            if e.verified_since is None and e.first_seen >= best_t:
                best, best_t = n, e.first_seen
        return best


# ---------------------------------------------------------------------- dialling


def addr_key(feed: str) -> str:
    """The network endpoint a feed multiaddr dials: ``host:port/transport`` for a
    direct feed, the relay's address for a circuit feed (the part before
    ``/p2p-circuit``, peer ids dropped)."""
    base = feed.split("/p2p-circuit")[0]
    parts = [p for p in base.split("/") if p]
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "p2p":
            i += 2
            continue
        out.append(parts[i])
        i += 1
    return "/".join(out)


STARTED, OK, FAILED = "started", "ok", "failed"


@dataclass(frozen=True, slots=True)
class DialLimits:
    """``[admission]`` dial settings: new unverified targets per second (burst);
    the least time between two dials of one address for an unverified target;
    and how long an address whose dial failed is not dialled for anyone."""

    rate: float = 1.0
    burst: float = 8.0
    addr_interval: float = 60.0
    failed_interval: float = 10.0
    max_addrs: int = 8192


class DialBudget:
    """Which feeds of a record we may dial now. See the module docstring."""

    def __init__(self, limits: DialLimits | None = None) -> None:
        self.limits = limits or DialLimits()
        self._bucket = Bucket(self.limits.rate, self.limits.burst)
        self._addrs: OrderedDict[str, tuple[float, str]] = OrderedDict()  # key -> (at, outcome)
        self.denied = 0

    def tokens(self, now: float) -> float:
        return self._bucket.available(now)

    def permit(self, feeds: Sequence[str], verified: bool, now: float) -> list[str]:
        """The feeds that may be dialled now (in the given order); ``[]`` if none.

        A verified target may be dialled through any feed whose address did not
        fail within ``failed_interval``; an unverified one only through feeds
        whose address was not dialled at all within ``addr_interval``, and only
        if the bucket of new unverified targets has a token (taken here). An
        unverified target whose direct address was dialled within
        ``addr_interval`` without failing (a dial on its way, or just done) gets
        no relay feeds either: a circuit is not a second way to the same dial.
        The direct feeds returned count as dialled from now on (``STARTED``);
        relay feeds, which are tried only after the direct ones failed, when
        they are dialled (their address is the relay's, whose own direct dials
        they must not hold back).
        """
        lim = self.limits
        ok = []
        direct_pending = False
        for f in feeds:
            last = self._addrs.get(addr_key(f))
            if last is not None:
                at, outcome = last
                if not verified and now - at < lim.addr_interval:
                    direct_pending |= outcome != FAILED and not is_relay_feed(f)
                    continue
                if outcome == FAILED and now - at < lim.failed_interval:
                    continue
            ok.append(f)
        if direct_pending:
            ok = [f for f in ok if not is_relay_feed(f)]
        if ok and not verified and not self._bucket.take(now):
            ok = []
        if not ok:
            self.denied += 1
        for f in ok:  # reserved now: concurrent dials of the same address see it
            if not is_relay_feed(f):
                self.dialled(f, STARTED, now)
        return ok

    def dialled(self, feed: str, outcome: str, now: float) -> None:
        """Report a dial: ``STARTED``, then ``OK`` or ``FAILED``."""
        key = addr_key(feed)
        self._addrs[key] = (now, outcome)
        self._addrs.move_to_end(key)
        while len(self._addrs) > self.limits.max_addrs:
            self._addrs.popitem(last=False)
