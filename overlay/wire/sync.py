"""Anti-entropy frames (stream protocol ``/hydra/sync/1``).

One round, initiator A and responder B, one stream:

    A -> B  SUMMARY  64 bucket hashes of A's (node id, seq) pairs
    B -> A  ENTRIES  B's (node id, seq) pairs in the buckets whose hash differs
    A -> B  WANT     node ids for which B holds a newer record (or A holds none)
    B -> A  RECORDS  those records, raw

Every frame is a canonical CBOR map ``{0: type, 1: body}``; caps below bound
each frame so a peer cannot make us allocate more than ``MAX_SIZE``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DecodeError, Reason
from ..records import MAX_SIZE as RECORD_MAX
from . import cbor

VERSION = 1
BUCKETS = 64
BUCKET_HASH = 8
MAX_ENTRIES = 4096
MAX_WANT = 512
MAX_RECORDS = 256
MAX_SIZE = MAX_RECORDS * (RECORD_MAX + 8) + 64

T_SUMMARY, T_ENTRIES, T_WANT, T_RECORDS = 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class Summary:
    hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Entries:
    entries: tuple[tuple[bytes, int], ...]
    buckets: tuple[int, ...]  # buckets these entries cover (complete listings)


@dataclass(frozen=True, slots=True)
class Want:
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Records:
    records: tuple[bytes, ...]


Frame = Summary | Entries | Want | Records


def bucket_of(node_id: bytes) -> int:
    return node_id[0] * BUCKETS // 256


def encode(frame: Frame) -> bytes:
    if isinstance(frame, Summary):
        body = list(frame.hashes)
        t = T_SUMMARY
    elif isinstance(frame, Entries):
        body = [[list(e) for e in frame.entries], list(frame.buckets)]
        t = T_ENTRIES
    elif isinstance(frame, Want):
        body, t = list(frame.ids), T_WANT
    else:
        body, t = list(frame.records), T_RECORDS
    return cbor.dumps({0: VERSION, 1: t, 2: body})


def decode(data: bytes) -> Frame:
    m = cbor.expect_map(cbor.loads_canonical(data, MAX_SIZE), {0, 1, 2})
    if m[0] != VERSION:
        raise DecodeError(Reason.UNKNOWN_VERSION, f"sync version {m[0]!r}")
    t, body = m[1], m[2]
    if t == T_SUMMARY:
        hashes = cbor.array(body, "summary", BUCKETS)
        if len(hashes) != BUCKETS:
            raise DecodeError(Reason.MALFORMED, "summary needs one hash per bucket")
        return Summary(tuple(cbor.bstr(h, "bucket hash", BUCKET_HASH) for h in hashes))
    if t == T_ENTRIES:
        pair = cbor.array(body, "entries", 2)
        if len(pair) != 2:
            raise DecodeError(Reason.MALFORMED, "entries body")
        raw_entries = cbor.array(pair[0], "entries", MAX_ENTRIES)
        entries = []
        for e in raw_entries:
            e = cbor.array(e, "entry", 2)
            if len(e) != 2:
                raise DecodeError(Reason.MALFORMED, "entry must be [id, seq]")
            entries.append((cbor.bstr(e[0], "node id", 32), cbor.uint(e[1], "seq")))
        buckets = tuple(cbor.uint(b, "bucket", 8) for b in cbor.array(pair[1], "buckets", BUCKETS))
        if any(b >= BUCKETS for b in buckets):
            raise DecodeError(Reason.MALFORMED, "bucket index out of range")
        return Entries(tuple(entries), buckets)
    if t == T_WANT:
        ids = cbor.array(body, "want", MAX_WANT)
        return Want(tuple(cbor.bstr(i, "node id", 32) for i in ids))
    if t == T_RECORDS:
        recs = cbor.array(body, "records", MAX_RECORDS)
        return Records(tuple(cbor.bstr(r, "record", max_size=RECORD_MAX) for r in recs))
    raise DecodeError(Reason.MALFORMED, f"unknown sync frame type {t!r}")
