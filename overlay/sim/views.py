"""Membership views that share storage, so 10,000 full views fit in memory.

Every Hydra node holds every record. A simulator of N nodes would hold N²
view entries (10⁸ at 10,000 nodes); most of them are the same record objects
in the same places. ``SimView`` is the real ``MembershipView`` (offer, accept,
expire, digest, diff, snapshot run unchanged) whose storage is a
``LayeredRecords``: an immutable ``Base`` shared by many views plus a small
per-view ``delta`` of the entries where this view differs from the base.

``SimAntiEntropy`` is the real ``AntiEntropy`` (summary, entries_for, want,
records_for run unchanged); it only overrides the two overridable digest hooks
(``bucket_hashes``, ``bucket_entries``) with a computation of the same values
from the layered storage: a bucket whose delta is empty takes the base's hash
(computed once per base), other buckets are recomputed when they change, and
identical deltas share one computation. A test checks both against the
plain computation on random views.

``rebase`` moves a group of views onto a newer base (the latest published
records), so deltas stay small while records change; after a rebase onto the
truth, ``len(delta)`` is exactly the number of records a view lacks or holds
in an older version.

Records are ``SimRecord``: a ``ValidRecord`` that caches its encoding, made
once per (node, seq) and shared by all views (signature checks are measured
in the benchmarks, not repeated here; ``registry`` maps the encoding back to
the shared object for records that travel inside sync frames).

Invariants: a view's contents (as a mapping) never depend on which base it
sits on; ``Base`` objects are never mutated after construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from ..core.antientropy import AntiEntropy, bucket_hash
from ..core.membership import MembershipView
from ..crypto import NodeId
from ..records import ValidRecord
from ..wire import sync

_GONE = object()  # delta marker: the view lacks a record its base has
_MISSING = object()
_NB = sync.BUCKETS


def bucket_of_id(nid: NodeId) -> int:
    return sync.bucket_of(bytes(nid))


class SimRecord(ValidRecord):
    """A validated record that caches its canonical encoding."""

    __slots__ = ("raw",)

    def encode(self) -> bytes:
        return self.raw


def sim_record(rec: ValidRecord) -> SimRecord:
    fields = {f.name: getattr(rec, f.name) for f in dataclasses.fields(ValidRecord)}
    out = SimRecord(**fields)
    object.__setattr__(out, "raw", ValidRecord.encode(rec))
    return out


class Base:
    """An immutable record set shared by many views; per-bucket digests computed lazily."""

    __slots__ = ("records", "gen", "_pairs", "_hashes")

    def __init__(self, records: dict[NodeId, ValidRecord], gen: int) -> None:
        self.records = records
        self.gen = gen
        self._pairs: list[dict[bytes, int]] | None = None
        self._hashes: tuple[bytes, ...] | None = None

    def pairs(self) -> list[dict[bytes, int]]:
        """Per bucket: node id bytes -> seq, in node id order."""
        if self._pairs is None:
            pairs: list[dict[bytes, int]] = [{} for _ in range(_NB)]
            for nid in sorted(self.records):
                raw = bytes(nid)
                pairs[sync.bucket_of(raw)][raw] = self.records[nid].seq
            self._pairs = pairs
        return self._pairs

    def hashes(self) -> tuple[bytes, ...]:
        if self._hashes is None:
            self._hashes = tuple(bucket_hash(list(p.items())) for p in self.pairs())
        return self._hashes


EMPTY_BASE = Base({}, 0)


class LayeredRecords:
    """The mapping ``MembershipView`` stores its records in: base + delta.

    Supports what ``MembershipView`` uses: ``get``, ``[]``, ``[]=``, ``del``,
    ``in``, ``len``, ``items``, ``keys``, iteration.
    """

    __slots__ = ("base", "delta", "_n", "_own", "_dirty", "_hashes", "memo")

    def __init__(self, base: Base, memo: dict | None = None) -> None:
        self.base = base
        self.delta: dict[NodeId, object] = {}
        self._n = len(base.records)
        self._own: dict[int, bytes] = {}  # bucket -> hash, where the delta touches it
        self._dirty: set[int] = set()
        self._hashes: tuple[bytes, ...] | None = None
        self.memo = memo if memo is not None else {}

    # mapping protocol --------------------------------------------------------
    def get(self, key: NodeId, default=None):
        v = self.delta.get(key, _MISSING)
        if v is _MISSING:
            return self.base.records.get(key, default)
        return default if v is _GONE else v

    def __getitem__(self, key: NodeId):
        v = self.get(key, _MISSING)
        if v is _MISSING:
            raise KeyError(key)
        return v

    def __contains__(self, key: object) -> bool:
        v = self.delta.get(key, _MISSING)
        if v is _MISSING:
            return key in self.base.records
        return v is not _GONE

    def __setitem__(self, key: NodeId, value: ValidRecord) -> None:
        if key not in self:
            self._n += 1
        if self.base.records.get(key) is value:
            self.delta.pop(key, None)
        else:
            self.delta[key] = value
        self._touch(key)

    def __delitem__(self, key: NodeId) -> None:
        if key not in self:
            raise KeyError(key)
        self._n -= 1
        if key in self.base.records:
            self.delta[key] = _GONE
        else:
            del self.delta[key]
        self._touch(key)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[NodeId]:
        for k, _ in self.items():
            yield k

    def keys(self) -> Iterator[NodeId]:
        return iter(self)

    def items(self) -> Iterator[tuple[NodeId, ValidRecord]]:
        d = self.delta
        for k, v in self.base.records.items():
            dv = d.get(k, _MISSING)
            if dv is _MISSING:
                yield k, v
            elif dv is not _GONE:
                yield k, dv
        for k, v in d.items():
            if v is not _GONE and k not in self.base.records:
                yield k, v

    # digest by bucket ---------------------------------------------------------
    def _touch(self, key: NodeId) -> None:
        self._dirty.add(bucket_of_id(key))
        self._hashes = None

    def _delta_by_bucket(self, buckets: set[int]) -> dict[int, list]:
        out: dict[int, list] = {b: [] for b in buckets}
        for k, v in self.delta.items():
            lst = out.get(bucket_of_id(k))
            if lst is not None:
                lst.append((bytes(k), -1 if v is _GONE else v.seq))
        return out

    def bucket_hashes(self) -> tuple[bytes, ...]:
        if self._hashes is not None:
            return self._hashes
        if self._dirty:
            dirty = self._dirty
            self._dirty = set()
            by_b = self._delta_by_bucket(dirty)
            pairs = None
            for b in sorted(dirty):
                changes = by_b[b]
                if not changes:
                    self._own.pop(b, None)
                    continue
                changes.sort()
                key = (self.base.gen, b, tuple(changes))
                h = self.memo.get(key)
                if h is None:
                    if pairs is None:
                        pairs = self.base.pairs()
                    items = dict(pairs[b])
                    for raw, seq in changes:
                        if seq < 0:
                            items.pop(raw, None)
                        else:
                            items[raw] = seq
                    h = bucket_hash(list(items.items()))
                    self.memo[key] = h
                self._own[b] = h
        base = self.base.hashes()
        if not self._own:
            self._hashes = base
        else:
            hs = list(base)
            for b, h in self._own.items():
                hs[b] = h
            self._hashes = tuple(hs)
        return self._hashes

    def bucket_entries(self, buckets: Iterable[int]) -> dict[int, list[tuple[bytes, int]]]:
        wanted = set(buckets)
        by_b = self._delta_by_bucket(wanted)
        pairs = self.base.pairs()
        out = {}
        for b in wanted:
            changes = by_b[b]
            if not changes:
                out[b] = list(pairs[b].items())
                continue
            items = dict(pairs[b])
            for raw, seq in changes:
                if seq < 0:
                    items.pop(raw, None)
                else:
                    items[raw] = seq
            out[b] = sorted(items.items())
        return out

    # moving to a newer base ---------------------------------------------------
    def rebase(self, new: Base, changed: Iterable[NodeId]) -> None:
        """Sit on ``new`` instead of the current base; ``changed``: every id whose
        record differs between the two bases. The view's contents do not change."""
        old = self.base.records
        newr = new.records
        d = self.delta
        nd: dict[NodeId, object] = {}
        for k, v in d.items():
            nv = newr.get(k)
            if v is _GONE:
                if nv is not None:
                    nd[k] = _GONE
            elif v is not nv:
                nd[k] = v
        for k in changed:
            if k in d:
                continue
            ov = old.get(k)
            if ov is newr.get(k):
                continue
            nd[k] = _GONE if ov is None else ov
        self.base = new
        self.delta = nd
        self._own = {}
        self._dirty = {bucket_of_id(k) for k in nd}
        self._hashes = None


class SimView(MembershipView):
    """The real ``MembershipView`` on layered storage."""

    def __init__(self, base: Base = EMPTY_BASE, memo: dict | None = None) -> None:
        super().__init__()
        self._records = LayeredRecords(base, memo)  # type: ignore[assignment]

    @property
    def store(self) -> LayeredRecords:
        return self._records  # type: ignore[return-value]


class SimAntiEntropy(AntiEntropy):
    """The real ``AntiEntropy`` with the digest hooks served from layered storage."""

    view: SimView

    def bucket_hashes(self) -> tuple[bytes, ...]:
        return self.view.store.bucket_hashes()

    def bucket_entries(self, buckets: list[int]) -> dict[int, list[tuple[bytes, int]]]:
        return self.view.store.bucket_entries(buckets)


def changed_ids(old: Base, new: Base) -> list[NodeId]:
    """Ids whose record differs between two bases, in a deterministic order."""
    o, n = old.records, new.records
    out = [k for k, v in n.items() if o.get(k) is not v]
    out += [k for k in o if k not in n]
    return out
