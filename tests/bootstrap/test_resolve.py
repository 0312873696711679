"""Sans-I/O choice of the bundle: highest valid seq, rollback, cache fallback."""

from __future__ import annotations

import pytest

from bootstrap.resolve import Failed, Fetched, NotModified, SourceError, resolve
from overlay.errors import LocalError, Reason

from .helpers import ATTACKER, NOW, PINNED, make_bundle


def raw(seq, **kw):
    return make_bundle(seq, **kw).encode()


def by_source(res):
    return {o.source: o for o in res.outcomes}


def test_picks_highest_valid_seq_and_reports_each_source():
    results = [
        ("down", Failed(SourceError.UNREACHABLE, "refused")),
        ("forged", Fetched((raw(99, ops=ATTACKER),))),
        ("under", Fetched((raw(50, signers=(2,)),))),
        ("old", Fetched((raw(8, signers=(0, 2)),))),
        ("good", Fetched((raw(10),))),
        ("same", Fetched((raw(10),))),
        ("expired", Fetched((raw(70, issued_at=NOW - 10_000, ttl=100),))),
    ]
    res = resolve(results, PINNED, 2, None, NOW)
    assert res.bundle is not None and res.bundle.seq == 10
    assert not res.from_cache and res.write_cache
    out = by_source(res)
    assert out["down"].reason is SourceError.UNREACHABLE
    assert out["forged"].reason is Reason.UNKNOWN_OPERATOR
    assert out["under"].reason is Reason.UNDER_SIGNED
    assert out["old"].reason is Reason.ROLLED_BACK and not out["old"].ok
    assert out["good"].chosen and out["same"].chosen and out["good"].ok
    assert out["expired"].reason is Reason.EXPIRED and out["expired"].seq == 70


def test_rollback_below_cache_rejected_and_cache_used():
    cache = raw(20)
    res = resolve([("a", Fetched((raw(10),)))], PINNED, 2, cache, NOW)
    assert res.bundle.seq == 20 and res.from_cache and not res.write_cache
    assert res.outcomes[0].reason is Reason.ROLLED_BACK


def test_newer_source_replaces_cache():
    res = resolve([("a", Fetched((raw(21),)))], PINNED, 2, raw(20), NOW)
    assert res.bundle.seq == 21 and not res.from_cache and res.write_cache


def test_more_cosignatures_at_same_seq_replace_cache():
    two, three = raw(20), raw(20, signers=(0, 1, 2))
    res = resolve([("a", Fetched((three,)))], PINNED, 2, two, NOW)
    assert res.bundle.raw == three and res.write_cache
    res = resolve([("a", Fetched((two,)))], PINNED, 2, three, NOW)
    assert res.bundle.raw == three and res.from_cache


def test_all_failed_uses_valid_cache_else_offers_expired_one():
    fails = [("a", Failed(SourceError.TIMEOUT)), ("b", Failed(SourceError.NOT_FOUND))]
    res = resolve(fails, PINNED, 2, raw(5), NOW)
    assert res.bundle.seq == 5 and res.from_cache and res.cache_status == "valid"
    res = resolve(fails, PINNED, 2, raw(5), NOW + 10**6)
    assert res.bundle is None and res.cache_status == "expired"
    assert res.expired_cache.seq == 5
    # an expired cache still sets the rollback floor
    res = resolve(
        [("a", Fetched((raw(4, issued_at=NOW + 10**6),)))], PINNED, 2, raw(5), NOW + 10**6
    )
    assert res.bundle is None and res.outcomes[0].reason is Reason.ROLLED_BACK


def test_cache_is_reverified():
    res = resolve([], PINNED, 2, raw(5, ops=ATTACKER), NOW)
    assert res.bundle is None and res.cache_status == "unknown_operator"
    res = resolve([], PINNED, 2, b"garbage", NOW)
    assert res.bundle is None and res.cache_status == "malformed"


def test_not_modified_means_cached_bundle():
    res = resolve([("a", NotModified())], PINNED, 2, raw(5), NOW)
    assert res.bundle.seq == 5 and not res.from_cache and res.outcomes[0].chosen
    res = resolve([("a", NotModified())], PINNED, 2, None, NOW)
    assert res.bundle is None and not res.outcomes[0].ok


def test_source_with_several_blobs_keeps_its_best():
    res = resolve([("dns", Fetched((raw(3), b"junk", raw(4))))], PINNED, 2, None, NOW)
    assert res.bundle.seq == 4 and res.outcomes[0].ok


def test_bad_pinned_configuration_is_local_error():
    with pytest.raises(LocalError):
        resolve([], PINNED, 4, None, NOW)
    with pytest.raises(LocalError):
        resolve([], [], 1, None, NOW)
