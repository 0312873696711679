import dataclasses

import pytest

from overlay import records
from overlay.crypto import SigningKey
from overlay.errors import BadSignature, DecodeError, Expired, InvalidRecord, Reason, Stale
from overlay.records import Role, decode, make_record, make_tombstone, validate
from overlay.wire import cbor
from tests.recgen import FEEDS, KEY, NOW, ONION, exit_record


def test_round_trip_and_three_steps():
    rec = exit_record()
    raw = rec.encode()
    assert len(raw) <= records.MAX_SIZE
    un = decode(raw)
    assert type(un) is records.UnverifiedRecord
    signed = un.verify()
    assert type(signed) is records.SignedRecord
    valid = signed.check_valid_at(NOW + 10)
    assert type(valid) is records.ValidRecord
    assert valid == rec
    assert valid.encode() == raw


def _resign(rec, key=KEY, **changes):
    un = dataclasses.replace(rec, **changes)
    return dataclasses.replace(un, signature=key.sign(un.signing_input())).encode()


def _raw_map(rec) -> dict:
    m = rec.body_map()
    m[records.K_SIG] = rec.signature
    return m


def reason_of(data: bytes, now=NOW, **kw) -> Reason:
    with pytest.raises(Exception) as ei:
        validate(data, now, **kw)
    return ei.value.reason


def test_bad_signature():
    rec = exit_record()
    other = SigningKey(bytes(32))
    assert reason_of(_resign(rec, key=other)) is Reason.BAD_SIGNATURE
    with pytest.raises(BadSignature):
        validate(_resign(rec, key=other), NOW)


def test_expired_and_future():
    rec = exit_record()
    with pytest.raises(Expired):
        validate(rec.encode(), rec.expires_at)
    with pytest.raises(InvalidRecord) as ei:
        validate(rec.encode(), NOW - records.CLOCK_SKEW - 5)
    assert ei.value.reason is Reason.FUTURE
    # inside the skew allowance is fine
    validate(rec.encode(), NOW - records.CLOCK_SKEW + 5)


def test_stale_seq():
    rec = exit_record(seq=5)
    with pytest.raises(Stale):
        validate(rec.encode(), NOW, known_seq=5)
    validate(rec.encode(), NOW, known_seq=4)


def test_oversized_checked_before_parsing():
    assert reason_of(b"\xa0" + b"\x00" * records.MAX_SIZE) is Reason.OVERSIZED


def test_unknown_version():
    rec = exit_record()
    m = _raw_map(rec)
    m[records.K_VERSION] = 2
    assert reason_of(cbor.dumps(m)) is Reason.UNKNOWN_VERSION


def test_too_many_feeds():
    rec = exit_record()
    feeds = tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(9))
    assert reason_of(_resign(rec, feeds=feeds)) is Reason.TOO_MANY_FEEDS


@pytest.mark.parametrize(
    "feed",
    ["not-a-multiaddr", "/ip4/1.2.3.4", "/ip4/1.2.3.4/tcp/99999", "/ip4/01.2.3.4/tcp/1", "x" * 200],
)
def test_invalid_multiaddr(feed):
    rec = exit_record()
    assert reason_of(_resign(rec, feeds=(feed,))) is Reason.INVALID_MULTIADDR


def test_relay_feed_may_name_relay_peer():
    relay = SigningKey(bytes([9]) * 32).node_id.peer_id()
    feed = f"/ip4/192.0.2.1/tcp/4001/p2p/{relay}/p2p-circuit"
    rec = exit_record(feeds=(feed,))
    assert validate(rec.encode(), NOW).feeds == (feed,)


def test_role_policy_mismatch():
    rec = exit_record()
    assert reason_of(_resign(rec, exit_policy=())) is Reason.ROLE_POLICY_MISMATCH
    assert (
        reason_of(_resign(rec, roles=Role.RELAY, exit_policy=("smtp:*",)))
        is Reason.ROLE_POLICY_MISMATCH
    )
    with pytest.raises(DecodeError):
        make_record(
            KEY, seq=1, now=NOW, roles=Role.EXIT, feeds=FEEDS, onion_key=ONION.public, onion_epoch=0
        )


def test_non_canonical_rejected():
    rec = exit_record()
    raw = rec.encode()
    # re-encode the same map non-canonically (definite lengths but unsorted keys)
    import cbor2

    m = _raw_map(rec)
    shuffled = dict(reversed(list(m.items())))
    alt = cbor2.dumps(shuffled)
    assert alt != raw
    assert reason_of(alt) is Reason.NON_CANONICAL
    assert reason_of(raw + b"\x00") is Reason.MALFORMED


def test_unknown_keys_and_types_rejected():
    rec = exit_record()
    m = _raw_map(rec)
    m[99] = 1
    assert reason_of(cbor.dumps(m)) is Reason.MALFORMED
    m = _raw_map(rec)
    m[records.K_SEQ] = True
    assert reason_of(cbor.dumps(m)) is Reason.UNSUPPORTED_TYPE  # no wire format uses booleans
    m = _raw_map(rec)
    m[records.K_SEQ] = -1
    assert reason_of(cbor.dumps(m)) is Reason.MALFORMED


def test_tombstone():
    t = make_tombstone(KEY, seq=9, now=NOW)
    v = validate(t.encode(), NOW)
    assert v.is_tombstone and v.seq == 9 and not v.feeds
    assert v.supersedes(exit_record(seq=8))


def test_policy_allows():
    pol = ("http:hooks.example.org", "smtp:*@example.org")
    assert records.policy_allows(pol, "smtp", "Bob@Example.org")
    assert not records.policy_allows(pol, "smtp", "bob@evil.org")
    assert records.policy_allows(pol, "http", "hooks.example.org")
    assert not records.policy_allows(pol, "https", "hooks.example.org")


def test_role_names():
    assert Role.parse(["standby-exit", "relay"]).names() == ["relay", "standby-exit"]
    with pytest.raises(ValueError):
        Role.parse(["boss"])
