"""Seed bundle codec: round trip, canonical form, every rejection reason."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap import bundle as bm
from bootstrap.bundle import MAX_SIZE, Entry, SeedBundle, decode
from overlay.errors import (
    BadSignature,
    DecodeError,
    Expired,
    InvalidRecord,
    LocalError,
    Reason,
)

from .helpers import ATTACKER, NOW, OPS, PINNED, entry, key, make_bundle


def test_round_trip_and_three_steps():
    b = make_bundle()
    raw = b.encode()
    u = decode(raw)
    assert u.bundle == b
    assert u.raw == raw
    v = u.verify(PINNED, 2)
    assert v.signers == {OPS[0].node_id, OPS[1].node_id}
    ok = v.check_valid_at(NOW + 10)
    assert ok.seq == 10 and ok.threshold == 2 and len(ok.entries) == 2
    assert b.encode() == decode(raw).bundle.encode()


def test_join_addrs_add_p2p_once():
    peer = key(100).node_id
    pid = peer.peer_id()
    e = Entry(peer, ("/ip4/1.2.3.4/tcp/1", f"/ip4/5.6.7.8/tcp/2/p2p/{pid}"))
    assert e.join_addrs() == [f"/ip4/1.2.3.4/tcp/1/p2p/{pid}", f"/ip4/5.6.7.8/tcp/2/p2p/{pid}"]
    b = SeedBundle.create(
        seq=1, issued_at=NOW, expires_at=NOW + 60, entries=[e], operators=PINNED, threshold=1
    )
    # the stored form drops the peer's own /p2p/ suffix; join_addrs puts it back
    assert b.entries[0].addrs == ("/ip4/1.2.3.4/tcp/1", "/ip4/5.6.7.8/tcp/2")
    assert b.join_addrs() == e.join_addrs()
    relay = key(101).node_id.peer_id()
    e2 = Entry(peer, (f"/ip4/9.9.9.9/tcp/1/p2p/{relay}/p2p-circuit",))
    assert e2.join_addrs() == [f"/ip4/9.9.9.9/tcp/1/p2p/{relay}/p2p-circuit/p2p/{pid}"]


def test_cosigning_keeps_other_signatures_valid():
    b = make_bundle(signers=())
    b1 = b.signed_by(OPS[0])
    b2 = decode(b1.encode()).bundle.signed_by(OPS[2])
    good, bad = b2.valid_signers()
    assert good == {OPS[0].node_id, OPS[2].node_id} and not bad
    decode(b2.encode()).verify(PINNED, 2)
    # re-signing with the same key is idempotent
    assert b2.signed_by(OPS[0]).encode() == b2.encode()


def test_signature_covers_domain_and_body():
    b = make_bundle()
    assert b.signing_message().startswith(bm.SIGNING_DOMAIN)
    assert bm.K_SIGS not in cbor2.loads(b.signing_message()[len(bm.SIGNING_DOMAIN) :])


# ---- rejection reasons ------------------------------------------------------------------


def reason_of(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), info.value.reason


def test_under_signed():
    raw = make_bundle(signers=(0,)).encode()
    assert reason_of(lambda: decode(raw).verify(PINNED, 2)) == (BadSignature, Reason.UNDER_SIGNED)
    raw = make_bundle(signers=()).encode()
    assert reason_of(lambda: decode(raw).verify(PINNED, 2)) == (BadSignature, Reason.UNDER_SIGNED)


def test_own_threshold_is_required_too():
    # two pinned signatures satisfy the client's k=2, but the bundle says its operators need 3
    raw = make_bundle(signers=(0, 1), threshold=3).encode()
    assert reason_of(lambda: decode(raw).verify(PINNED, 2)) == (BadSignature, Reason.UNDER_SIGNED)
    decode(make_bundle(signers=(0, 1, 2), threshold=3).encode()).verify(PINNED, 2)


def test_unknown_operator():
    forged = make_bundle(ops=ATTACKER, signers=(0, 1)).encode()
    assert reason_of(lambda: decode(forged).verify(PINNED, 2)) == (
        BadSignature,
        Reason.UNKNOWN_OPERATOR,
    )


def test_tampered_body_is_bad_signature():
    good = make_bundle()
    forged = SeedBundle(
        seq=good.seq + 100,
        issued_at=good.issued_at,
        expires_at=good.expires_at,
        entries=(entry(9, "/ip4/6.6.6.6/tcp/1"),),
        operators=good.operators,
        threshold=good.threshold,
        signatures=good.signatures,
    ).encode()
    assert reason_of(lambda: decode(forged).verify(PINNED, 2)) == (
        BadSignature,
        Reason.BAD_SIGNATURE,
    )


def test_expired_and_future():
    v = decode(make_bundle(ttl=100).encode()).verify(PINNED, 2)
    v.check_valid_at(NOW + 99)
    assert reason_of(lambda: v.check_valid_at(NOW + 100)) == (Expired, Reason.EXPIRED)
    assert reason_of(lambda: v.check_valid_at(NOW - 1000)) == (InvalidRecord, Reason.FUTURE)
    v.check_valid_at(NOW - 100)  # within the clock-skew allowance


def test_oversized_checked_before_parsing():
    assert reason_of(lambda: decode(b"\xa0" * (MAX_SIZE + 1))) == (DecodeError, Reason.OVERSIZED)
    # a bundle too big to encode is refused locally
    big = make_bundle(signers=())
    with pytest.raises(LocalError):
        SeedBundle.create(
            seq=1,
            issued_at=NOW,
            expires_at=NOW + 1,
            entries=[
                entry(i, *[f"/dns4/{'x' * 150}{j}.example/tcp/{j}" for j in range(8)])
                for i in range(64)
            ],
            operators=big.operators,
            threshold=1,
        ).encode()


def test_unknown_version_and_keys_and_non_canonical():
    body = cbor2.loads(make_bundle().encode())
    body[bm.K_VERSION] = 2
    assert reason_of(lambda: decode(cbor2.dumps(body, canonical=True))) == (
        DecodeError,
        Reason.UNKNOWN_VERSION,
    )
    body[bm.K_VERSION] = 1
    body[99] = 0
    assert reason_of(lambda: decode(cbor2.dumps(body, canonical=True))) == (
        DecodeError,
        Reason.MALFORMED,
    )
    del body[99]
    reordered = dict(sorted(body.items(), reverse=True))
    assert reason_of(lambda: decode(cbor2.dumps(reordered))) == (DecodeError, Reason.NON_CANONICAL)
    # a uint in a longer form than needed
    raw = make_bundle().encode()
    assert raw[:4] == bytes([0xA8, 0x00, 0x01, 0x01])  # {0: 1, 1: ...
    longer = raw[:3] + b"\x18\x01" + raw[4:]
    assert reason_of(lambda: decode(longer)) == (DecodeError, Reason.NON_CANONICAL)
    assert reason_of(lambda: decode(raw + b"\x00")) == (DecodeError, Reason.MALFORMED)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.__setitem__(bm.K_OPERATORS, list(reversed(b[bm.K_OPERATORS]))),
        lambda b: b.__setitem__(bm.K_THRESHOLD, 4),
        lambda b: b.__setitem__(bm.K_THRESHOLD, 0),
        lambda b: b.__setitem__(bm.K_EXPIRES, b[bm.K_ISSUED]),
        lambda b: b.__setitem__(bm.K_PEERS, []),
        lambda b: b.__setitem__(bm.K_PEERS, b[bm.K_PEERS] * 2),
        lambda b: b[bm.K_PEERS][0].__setitem__(1, ['/ip4/1.2.3.4/tcp/1"; rm -rf']),
        lambda b: b[bm.K_PEERS][0].__setitem__(1, ["/ip4/1.2.3.4/tcp/1"] * 2),
        lambda b: b[bm.K_PEERS][0].__setitem__(
            1, ["/ip4/1.2.3.4/tcp/1/p2p/" + key(9).node_id.peer_id()]
        ),
        lambda b: b.__setitem__(bm.K_SEQ, -1),
        lambda b: b.__setitem__(bm.K_SEQ, True),
        lambda b: b.__setitem__(bm.K_SEQ, 2**64),
        lambda b: b.__setitem__(bm.K_SIGS, {bytes(32): b"x" * 63}),
        lambda b: b.__setitem__(bm.K_OPERATORS, [b"\x01" * 31]),
    ],
)
def test_structural_rules(mutate):
    body = cbor2.loads(make_bundle().encode())
    mutate(body)
    try:
        data = cbor2.dumps(body, canonical=True)
    except Exception:
        pytest.skip("not encodable")
    with pytest.raises(DecodeError):
        decode(data)


# ---- fuzzing ------------------------------------------------------------------------------

EXACT = make_bundle(signers=(0, 1)).encode()  # exactly k signatures: any change must fail
EXACT_MSG = decode(EXACT).bundle.signing_message()


def decode_verify(data: bytes) -> None:
    """Must raise DecodeError or BadSignature, or verify the very same signed body."""
    try:
        v = decode(data).verify(PINNED, 2)
    except (DecodeError, BadSignature):
        return
    assert v.bundle.signing_message() == EXACT_MSG


def test_every_truncation_rejected():
    for n in range(len(EXACT)):
        with pytest.raises(DecodeError):
            decode(EXACT[:n])


def test_every_byte_position_mutated():
    for i in range(len(EXACT)):
        for x in (0x01, 0x80, 0xFF):
            data = bytearray(EXACT)
            data[i] ^= x
            decode_verify(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_single_byte_mutations(data):
    i = data.draw(st.integers(0, len(EXACT) - 1))
    v = data.draw(st.integers(0, 255).filter(lambda v: v != EXACT[i]))
    mutated = bytearray(EXACT)
    mutated[i] = v
    decode_verify(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_decode_error(blob):
    try:
        decode(blob)
    except DecodeError:
        pass


addr_st = st.builds(
    lambda a, b, p, t: f"/ip4/{a}.{b}.0.1/{t}/{p}",
    st.integers(1, 254),
    st.integers(0, 255),
    st.integers(1, 65535),
    st.sampled_from(["tcp", "udp"]),
)


@settings(max_examples=60, deadline=None)
@given(
    seq=st.integers(0, 2**64 - 1),
    issued=st.integers(0, 2**40),
    ttl=st.integers(1, bm.MAX_VALIDITY),
    peers=st.lists(
        st.tuples(st.integers(100, 200), st.lists(addr_st, min_size=1, max_size=4, unique=True)),
        min_size=1,
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    nops=st.integers(1, 4),
    data=st.data(),
)
def test_generated_bundles_round_trip_canonically(seq, issued, ttl, peers, nops, data):
    ops = [key(1 + i) for i in range(nops)]
    k = data.draw(st.integers(1, nops))
    b = SeedBundle.create(
        seq=seq,
        issued_at=issued,
        expires_at=issued + ttl,
        entries=[Entry(key(n).node_id, tuple(a)) for n, a in peers],
        operators=[o.node_id for o in reversed(ops)],
        threshold=k,
    )
    for o in ops[:k]:
        b = b.signed_by(o)
    raw = b.encode()
    again = decode(raw)
    assert again.bundle == b and again.bundle.encode() == raw
    # one value, one encoding: the same content built in another order encodes identically
    b2 = SeedBundle.create(
        seq=seq,
        issued_at=issued,
        expires_at=issued + ttl,
        entries=[Entry(key(n).node_id, tuple(a)) for n, a in peers],
        operators=[o.node_id for o in ops],
        threshold=k,
    )
    for o in reversed(ops[:k]):
        b2 = b2.signed_by(o)
    assert b2.encode() == raw
    assert again.verify([bytes(o.node_id) for o in ops], k).seq == seq


def test_rotation_transition_bundle_satisfies_old_and_new_pins():
    """Operators {1,2,3} hand over to {4,5,6}: the new set signs as operators, two
    old keys add transition signatures, so clients pinned to either set accept it."""
    old, new = OPS, [key(4), key(5), key(6)]
    b = make_bundle(ops=new, signers=(0, 1), extra_signers=(old[0], old[1]))
    u = decode(b.encode())
    assert u.verify(PINNED, 2).signers == {old[0].node_id, old[1].node_id}
    assert u.verify([bytes(k.node_id) for k in new], 2).signers == {new[0].node_id, new[1].node_id}
    # without the new set's own signatures the bundle is refused, whoever pins what
    only_old = make_bundle(ops=new, signers=(), extra_signers=(old[0], old[1]))
    assert reason_of(lambda: decode(only_old.encode()).verify(PINNED, 2)) == (
        BadSignature,
        Reason.UNDER_SIGNED,
    )


# The example decoded byte by byte in docs/operator.md: pins the wire format.
GOLDEN = (
    "a800010107021a6b49d200031a6b715f000481a20058202bc2800b3316e009209ffd757dab19ccf0ae84bc"
    "7ae90654e1e81712d270f653018178192f6970342f3230332e302e3131332e352f7463702f343030310581"
    "58208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c060107a158208a88e3"
    "dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c5840c466b27dff84a724428467ce"
    "d3ef220891d41a23f729827199e2308422dc3f1a814262764b1a71f796ff4f75b66e09ebb1d7aea1738a6c"
    "708c6e30736e736206"
)


def test_golden_vector():
    op = key(1)
    b = SeedBundle.create(
        seq=7,
        issued_at=1_800_000_000,
        expires_at=1_802_592_000,
        entries=[Entry(key(100).node_id, ("/ip4/203.0.113.5/tcp/4001",))],
        operators=[op.node_id],
        threshold=1,
    ).signed_by(op)
    assert b.encode().hex() == GOLDEN
    v = decode(bytes.fromhex(GOLDEN)).verify([bytes(op.node_id)], 1).check_valid_at(1_800_000_001)
    assert v.join_addrs() == ["/ip4/203.0.113.5/tcp/4001/p2p/" + key(100).node_id.peer_id()]
