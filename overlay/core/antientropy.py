"""Sans-I/O anti-entropy: bucketed digest exchange over a MembershipView.

Invariants:
- every reply is bounded by the caps in ``overlay.wire.sync``; a round moves at
  most ``MAX_WANT`` records, so a large gap closes over several rounds;
- the responder only ever sends records it holds as valid; the initiator
  offers each received record to its view, which validates it like gossip.
- the frames depend only on the view's (node id, seq) pairs: ``bucket_hashes``
  and ``bucket_entries`` compute them from ``view.digest()``; a subclass may
  override the two with a cached or incremental computation of the same values
  (the simulator does, ``overlay.sim.views``), the protocol logic stays here.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from ..crypto import NodeId
from ..wire import sync
from .membership import MembershipView


def bucket_hash(items: list[tuple[bytes, int]]) -> bytes:
    """The hash of one bucket: its (node id, seq) pairs, sorted by node id."""
    h = hashlib.blake2b(digest_size=sync.BUCKET_HASH, person=b"hydra-ae-bucket")
    for nid, seq in sorted(items):
        h.update(nid + seq.to_bytes(8, "big"))
    return h.digest()


def bucket_hashes(digest: list[tuple[bytes, int]]) -> tuple[bytes, ...]:
    buckets: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
    for nid, seq in digest:
        buckets[sync.bucket_of(nid)].append((nid, seq))
    return tuple(bucket_hash(buckets.get(b, [])) for b in range(sync.BUCKETS))


class AntiEntropy:
    """Both sides of a sync round for one membership view."""

    def __init__(self, view: MembershipView) -> None:
        self.view = view

    # the view's digest, by bucket (overridable: see the module docstring) ----
    def bucket_hashes(self) -> tuple[bytes, ...]:
        """The ``sync.BUCKETS`` bucket hashes of the view's (node id, seq) pairs."""
        return bucket_hashes(self.view.digest())

    def bucket_entries(self, buckets: list[int]) -> dict[int, list[tuple[bytes, int]]]:
        """The view's (node id, seq) pairs in each of ``buckets``, sorted by node id."""
        out: dict[int, list[tuple[bytes, int]]] = {b: [] for b in buckets}
        for nid, seq in self.view.digest():
            items = out.get(sync.bucket_of(nid))
            if items is not None:
                items.append((nid, seq))
        return out

    # initiator -------------------------------------------------------------
    def summary(self) -> sync.Summary:
        return sync.Summary(self.bucket_hashes())

    def want(self, entries: sync.Entries, now: float | None = None) -> sync.Want:
        """Ids whose record the peer has newer; with ``now``, not the new identities
        our admission refused lately (asking again would only be refused again)."""
        ids = []
        for nid, seq in entries.entries:
            node = NodeId(nid)
            mine = self.view.seq_of(node)
            if mine is None and now is not None and self.view.refused_recently(node, now):
                continue
            if mine is None or mine < seq:
                ids.append(nid)
        return sync.Want(tuple(ids[: sync.MAX_WANT]))

    def push_for(self, entries: sync.Entries) -> sync.Records:
        """Records the peer lacks or holds older, within the buckets its entries list.

        Sent after the pull, this makes each round push-pull: a node that has a
        new record hands it to the peers it syncs with, not only to those who
        ask.
        """
        theirs = dict(entries.entries)
        covered = sorted(set(entries.buckets))
        by_bucket = self.bucket_entries(covered) if covered else {}
        out = []
        for b in covered:  # buckets in order: the same order as the sorted digest
            for nid, seq in by_bucket[b]:
                if theirs.get(nid, -1) < seq:
                    rec = self.view.get(NodeId(nid))
                    if rec is not None:
                        out.append(rec.encode())
                    if len(out) >= sync.MAX_RECORDS:
                        return sync.Records(tuple(out))
        return sync.Records(tuple(out))

    # responder -------------------------------------------------------------
    def entries_for(self, summary: sync.Summary) -> sync.Entries:
        mine = self.bucket_hashes()
        if mine == summary.hashes:  # the common case once converged: nothing differs
            return sync.Entries((), ())
        differing = [b for b, (a, c) in enumerate(zip(mine, summary.hashes, strict=True)) if a != c]
        by_bucket = self.bucket_entries(differing) if differing else {}
        entries: list[tuple[bytes, int]] = []
        covered = []
        for b in differing:
            items = by_bucket.get(b, [])
            if len(entries) + len(items) > sync.MAX_ENTRIES:
                break
            entries.extend(items)
            covered.append(b)
        return sync.Entries(tuple(entries), tuple(covered))

    def records_for(self, want: sync.Want) -> sync.Records:
        out = []
        for nid in want.ids[: sync.MAX_RECORDS]:
            rec = self.view.get(NodeId(nid))
            if rec is not None:
                out.append(rec.encode())
        return sync.Records(tuple(out))
