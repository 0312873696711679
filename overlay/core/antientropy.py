"""Sans-I/O anti-entropy: bucketed digest exchange over a MembershipView.

Invariants:
- every reply is bounded by the caps in ``overlay.wire.sync``; a round moves at
  most ``MAX_WANT`` records, so a large gap closes over several rounds;
- the responder only ever sends records it holds as valid; the initiator
  offers each received record to its view, which validates it like gossip.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from ..crypto import NodeId
from ..wire import sync
from .membership import MembershipView


def bucket_hashes(digest: list[tuple[bytes, int]]) -> tuple[bytes, ...]:
    buckets: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
    for nid, seq in digest:
        buckets[sync.bucket_of(nid)].append((nid, seq))
    out = []
    for b in range(sync.BUCKETS):
        h = hashlib.blake2b(digest_size=sync.BUCKET_HASH, person=b"hydra-ae-bucket")
        for nid, seq in sorted(buckets.get(b, ())):
            h.update(nid + seq.to_bytes(8, "big"))
        out.append(h.digest())
    return tuple(out)


class AntiEntropy:
    """Both sides of a sync round for one membership view."""

    def __init__(self, view: MembershipView) -> None:
        self.view = view

    # initiator -------------------------------------------------------------
    def summary(self) -> sync.Summary:
        return sync.Summary(bucket_hashes(self.view.digest()))

    def want(self, entries: sync.Entries) -> sync.Want:
        ids = []
        for nid, seq in entries.entries:
            mine = self.view.seq_of(NodeId(nid))
            if mine is None or mine < seq:
                ids.append(nid)
        return sync.Want(tuple(ids[: sync.MAX_WANT]))

    # responder -------------------------------------------------------------
    def entries_for(self, summary: sync.Summary) -> sync.Entries:
        mine = self.view.digest()
        differing = [
            b
            for b, (a, c) in enumerate(zip(bucket_hashes(mine), summary.hashes, strict=True))
            if a != c
        ]
        by_bucket: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
        for nid, seq in mine:
            by_bucket[sync.bucket_of(nid)].append((nid, seq))
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
