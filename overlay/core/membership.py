"""Sans-I/O membership view: accept / supersede / expire records, digests for anti-entropy.

Invariants:
- a node's entry only ever moves to a strictly higher ``seq`` (merge is
  commutative, idempotent and seq-monotone);
- the signature of an offered record is checked only when its ``seq`` would
  win, so duplicates and stale gossip cost a decode, not a verify;
- a tombstone hides the node from ``live()`` and blocks every lower ``seq``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..crypto import NodeId
from ..errors import Stale
from ..records import CLOCK_SKEW, Role, ValidRecord, decode


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
    def __init__(self, skew: int = CLOCK_SKEW) -> None:
        self._records: dict[NodeId, ValidRecord] = {}
        self._skew = skew

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, node_id: NodeId) -> bool:
        return node_id in self._records

    def get(self, node_id: NodeId) -> ValidRecord | None:
        return self._records.get(node_id)

    def seq_of(self, node_id: NodeId) -> int | None:
        r = self._records.get(node_id)
        return None if r is None else r.seq

    def offer(self, data: bytes, now: float) -> tuple[Outcome, ValidRecord | None]:
        """Validate raw bytes against the view.

        Returns ``(ACCEPTED, record)`` when it superseded what we had, or
        ``(DUPLICATE, None)`` for the exact record we hold. Raises a
        ``RemoteError`` (decode, signature, freshness, stale) otherwise.
        """
        unverified = decode(data)
        known = self._records.get(unverified.node_id)
        if known is not None and unverified.seq <= known.seq:
            if unverified.seq == known.seq and unverified.signature == known.signature:
                return Outcome.DUPLICATE, None
            raise Stale(detail=f"seq {unverified.seq} <= known {known.seq}")
        rec = unverified.verify().check_valid_at(now, self._skew)
        self._records[rec.node_id] = rec
        return Outcome.ACCEPTED, rec

    def accept(self, rec: ValidRecord) -> bool:
        """Merge an already validated record; True if it superseded."""
        known = self._records.get(rec.node_id)
        if known is not None and rec.seq <= known.seq:
            return False
        self._records[rec.node_id] = rec
        return True

    def expire(self, now: float) -> list[NodeId]:
        gone = [nid for nid, r in self._records.items() if r.expires_at <= now]
        for nid in gone:
            del self._records[nid]
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
