"""Sans-I/O membership view: accept / supersede / expire records, digests for anti-entropy.

Invariants:
- a node's entry only ever moves to a strictly higher ``seq`` (merge is
  commutative, idempotent and seq-monotone);
- the signature of an offered record is checked only when its ``seq`` would
  win, so duplicates and stale gossip cost a decode, not a verify;
- a tombstone hides the node from ``live()`` and blocks every lower ``seq``;
- with an ``Admission`` (``overlay.core.admission``) the table is bounded: a
  record of a new identity is checked against the admission bounds *before*
  its signature (a refused record costs a decode), members are verified or
  unverified, and updates of a member held are never limited. Without one
  (light clients, the simulator) every member counts as verified, and
  ``max_records`` alone bounds the table: a new identity beyond it is refused
  (``TABLE_FULL``) before its signature is checked.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..crypto import NodeId
from ..errors import Reason, Stale
from ..records import CLOCK_SKEW, EXIT_ROLES, Role, ValidRecord, decode
from .admission import Admission, Refused


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the membership at one moment."""

    records: Mapping[NodeId, ValidRecord]
    taken_at: float

    def live(self) -> list[ValidRecord]:
        return [r for r in self.records.values() if not r.is_tombstone]

    def with_role(self, role: Role) -> list[ValidRecord]:
        return [r for r in self.live() if role in r.roles]

    def get(self, node_id: NodeId) -> ValidRecord | None:
        return self.records.get(node_id)


class MembershipView:
    def __init__(
        self,
        skew: int = CLOCK_SKEW,
        admission: Admission | None = None,
        max_records: int | None = None,
    ) -> None:
        self._records: dict[NodeId, ValidRecord] = {}
        self.max_records = max_records
        self._skew = skew
        self.admission = admission
        self._dropped: list[NodeId] = []

    def __len__(self) -> int:
        return len(self._records)

    def _full(self) -> bool:
        return self.max_records is not None and len(self._records) >= self.max_records

    def __contains__(self, node_id: NodeId) -> bool:
        return node_id in self._records

    def get(self, node_id: NodeId) -> ValidRecord | None:
        return self._records.get(node_id)

    def seq_of(self, node_id: NodeId) -> int | None:
        r = self._records.get(node_id)
        return None if r is None else r.seq

    # -- verification ---------------------------------------------------------

    def is_verified(self, node_id: NodeId) -> bool:
        """We hold the node's record and it authenticated to us (always, without admission)."""
        if self.admission is None:
            return node_id in self._records
        return self.admission.is_verified(node_id)

    def verified_since(self, node_id: NodeId) -> float | None:
        """When the member was first verified here (``-inf`` without admission)."""
        if self.admission is None:
            return -float("inf") if node_id in self._records else None
        return self.admission.verified_since(node_id)

    def first_seen(self, node_id: NodeId) -> float | None:
        """When the member entered the view (``None`` without admission or record)."""
        if self.admission is None:
            return None
        e = self.admission.entries.get(node_id)
        return None if e is None else e.first_seen

    def confirm(self, node_id: NodeId, now: float) -> bool:
        """``node_id`` authenticated to us itself; True if a member became verified."""
        if self.admission is None:
            return False
        return self.admission.confirm(node_id, now)

    def refused_recently(self, node_id: NodeId, now: float) -> bool:
        """A new identity refused lately (anti-entropy need not ask for it again)."""
        return self.admission is not None and self.admission.refused_recently(node_id, now)

    def counts(self) -> tuple[int, int]:
        """``(verified, unverified)`` members."""
        if self.admission is None:
            return len(self._records), 0
        return self.admission.verified, self.admission.unverified

    def take_dropped(self) -> list[NodeId]:
        """Members evicted or dropped by admission since the last call (for the store)."""
        out, self._dropped = self._dropped, []
        return out

    # -- merging ----------------------------------------------------------------

    def offer(
        self, data: bytes, now: float, *, peer: object | None = None, bulk: bool = False
    ) -> tuple[Outcome, ValidRecord | None]:
        """Validate raw bytes against the view.

        Returns ``(ACCEPTED, record)`` when it superseded what we had, or
        ``(DUPLICATE, None)`` for the exact record we hold. Raises a
        ``RemoteError`` (decode, signature, freshness, stale) otherwise, and
        ``admission.Refused`` for a new identity beyond the admission bounds
        (``peer`` is the forwarder, whose own bucket applies; ``bulk`` is a
        joining node's pull, which skips the rate buckets but not the bounds).
        """
        unverified = decode(data)
        known = self._records.get(unverified.node_id)
        self.prior_seq = None if known is None else known.seq
        if known is not None and unverified.seq <= known.seq:
            if unverified.seq == known.seq and unverified.signature == known.signature:
                return Outcome.DUPLICATE, None
            raise Stale(detail=f"seq {unverified.seq} <= known {known.seq}")
        adm = self.admission
        if known is None and adm is not None:
            adm.check(unverified.node_id, peer, now, bulk)
        elif known is None and self._full():
            raise Refused(Reason.TABLE_FULL, f"{len(self._records)} members held")
        rec = unverified.verify().check_valid_at(now, self._skew)
        if known is None and adm is not None:
            for gone in adm.admit(rec.node_id, peer, now, bulk):
                self._records.pop(gone, None)
                self._dropped.append(gone)
        self._records[rec.node_id] = rec
        return Outcome.ACCEPTED, rec

    def accept(self, rec: ValidRecord, now: float | None = None) -> bool:
        """Merge an already validated record; True if it superseded.

        With admission a new identity enters as a bulk, unverified admission
        (False if the bounds refuse it); use ``restore`` for stored members.
        """
        known = self._records.get(rec.node_id)
        if known is not None and rec.seq <= known.seq:
            return False
        if known is None and self.admission is None and self._full():
            return False
        if known is None and self.admission is not None:
            t = rec.issued_at if now is None else now
            try:
                self.admission.check(rec.node_id, None, t, bulk=True)
            except Refused:
                return False
            for gone in self.admission.admit(rec.node_id, None, t, bulk=True):
                self._records.pop(gone, None)
                self._dropped.append(gone)
        self._records[rec.node_id] = rec
        return True

    def restore(self, rec: ValidRecord, first_seen: float, verified_since: float | None) -> bool:
        """Enter a member loaded from the store with its admission state. False if the
        bounds refuse it (load verified members first, then the newest unverified)."""
        known = self._records.get(rec.node_id)
        if known is not None and rec.seq <= known.seq:
            return False
        if known is None and self.admission is not None:
            if not self.admission.restore(rec.node_id, first_seen, verified_since):
                return False
        self._records[rec.node_id] = rec
        return True

    def _remove(self, nid: NodeId) -> None:
        del self._records[nid]
        if self.admission is not None:
            self.admission.forget(nid)

    def expire(self, now: float) -> list[NodeId]:
        """Drop expired records, and unverified members not confirmed in time."""
        gone = [nid for nid, r in self._records.items() if r.expires_at <= now]
        for nid in gone:
            self._remove(nid)
        if self.admission is not None:
            stale = self.admission.stale_unverified(now)
            for nid in stale:
                if nid in self._records:
                    self._remove(nid)
                else:
                    self.admission.forget(nid)
            gone += stale
            self.admission.prune(now)
        return gone

    def digest(self) -> list[tuple[bytes, int]]:
        return sorted((bytes(nid), r.seq) for nid, r in self._records.items())

    def diff(self, remote: Iterable[tuple[bytes, int]]) -> tuple[list[bytes], list[bytes]]:
        """Compare a peer's digest with ours.

        Returns ``(want, offer)``: node ids whose record the peer has newer (or we
        lack), and node ids whose record we have newer (or the peer lacks).
        """
        theirs = dict(remote)
        want = []
        for nid, seq in theirs.items():
            mine = self._records.get(NodeId(nid)) if len(nid) == 32 else None
            if mine is None or mine.seq < seq:
                want.append(nid)
        offer = [
            bytes(nid) for nid, r in self._records.items() if theirs.get(bytes(nid), -1) < r.seq
        ]
        return want, offer

    def snapshot(self, now: float) -> Snapshot:
        return Snapshot(MappingProxyType(dict(self._records)), now)


class StrangerView:
    """What anti-entropy serves to a peer that holds no record here (a light
    client, or a node in its first pull): every record except those of exit
    roles (EXIT or STANDBY_EXIT) this node has not verified. A light client
    chooses its exits from what its entry serves, so it only ever sees exits
    the entry vouches for; a joining node still gets the whole membership
    otherwise, and the rest from its next rounds.

    Offers what ``AntiEntropy`` reads: ``digest``, ``get``, ``seq_of`` (and
    ``refused_recently``, always False: this view never asks for records).
    """

    HIDDEN_ROLES = EXIT_ROLES

    def __init__(self, view: MembershipView) -> None:
        self.view = view

    def _shown(self, rec: ValidRecord) -> bool:
        return not rec.roles & self.HIDDEN_ROLES or self.view.is_verified(rec.node_id)

    def get(self, node_id: NodeId) -> ValidRecord | None:
        r = self.view.get(node_id)
        return r if r is not None and self._shown(r) else None

    def seq_of(self, node_id: NodeId) -> int | None:
        r = self.get(node_id)
        return None if r is None else r.seq

    def refused_recently(self, node_id: NodeId, now: float) -> bool:
        return False

    def digest(self) -> list[tuple[bytes, int]]:
        return sorted((bytes(n), r.seq) for n, r in self.view._records.items() if self._shown(r))
