from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.core.antientropy import AntiEntropy
from overlay.core.membership import MembershipView
from overlay.crypto import SigningKey
from overlay.errors import DecodeError
from overlay.wire import sync
from tests.recgen import NOW, ONION, relay_record

KEYS = [SigningKey(bytes([i]) * 32) for i in range(1, 41)]


def _round(a: AntiEntropy, b: AntiEntropy) -> int:
    """One sync round a <- b, every frame through encode/decode (no I/O)."""
    summary = sync.decode(sync.encode(a.summary()))
    entries = sync.decode(sync.encode(b.entries_for(summary)))
    want = sync.decode(sync.encode(a.want(entries)))
    recs = sync.decode(sync.encode(b.records_for(want)))
    for raw in recs.records:
        a.view.offer(raw, NOW)
    return len(recs.records)


def test_pull_only_what_is_missing_or_older():
    va, vb = MembershipView(), MembershipView()
    for i, k in enumerate(KEYS):
        vb.accept(relay_record(seq=2, key=k))
        if i % 3 == 0:
            va.accept(relay_record(seq=2, key=k))  # same
        elif i % 3 == 1:
            va.accept(relay_record(seq=1, key=k))  # older
    a, b = AntiEntropy(va), AntiEntropy(vb)
    moved = _round(a, b)
    assert moved == len(KEYS) - len(KEYS[::3])
    assert va.digest() == vb.digest()
    assert _round(a, b) == 0  # nothing left to pull; equal summaries


def test_identical_views_exchange_no_entries():
    va, vb = MembershipView(), MembershipView()
    for k in KEYS[:5]:
        va.accept(relay_record(key=k))
        vb.accept(relay_record(key=k))
    a, b = AntiEntropy(va), AntiEntropy(vb)
    assert b.entries_for(a.summary()).entries == ()


def test_newer_local_records_are_not_downgraded():
    va, vb = MembershipView(), MembershipView()
    va.accept(relay_record(seq=5, key=KEYS[0]))
    vb.accept(relay_record(seq=3, key=KEYS[0]))
    _round(AntiEntropy(va), AntiEntropy(vb))
    assert va.seq_of(KEYS[0].node_id) == 5


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_decode_arbitrary_bytes_only_decode_error(data):
    try:
        sync.decode(data)
    except DecodeError:
        pass


def test_oversized_frame_rejected():
    try:
        sync.decode(b"\x00" * (sync.MAX_SIZE + 1))
    except DecodeError as e:
        assert e.reason.value == "oversized"
    else:
        raise AssertionError


def test_choose_dials_prefers_new_networks():
    import random

    from overlay.core.peering import choose_dials, feed_network
    from overlay.records import Role, make_record

    def rec(k, feed):
        return make_record(
            k,
            seq=1,
            now=NOW,
            roles=Role.RELAY,
            feeds=(feed,),
            onion_key=ONION.public,
            onion_epoch=0,
        )

    recs = [rec(KEYS[i], f"/ip4/10.0.{i % 2}.{i}/tcp/1") for i in range(2, 8)]
    recs += [rec(KEYS[10], "/ip4/10.9.0.1/tcp/1")]
    assert feed_network("/ip4/10.9.0.1/tcp/1") == "ip4:10.9"
    connected = {recs[0].node_id}  # on 10.0.x
    chosen = choose_dials(recs, connected, KEYS[1].node_id, 2, random.Random(1))
    assert len(chosen) == 1
    assert chosen[0].node_id == KEYS[10].node_id  # the only peer on a new network


def test_push_pull_round_converges_both_sides():
    va, vb = MembershipView(), MembershipView()
    for i, k in enumerate(KEYS[:12]):
        (va if i % 2 else vb).accept(relay_record(seq=1, key=k))
    va.accept(relay_record(seq=3, key=KEYS[20]))
    vb.accept(relay_record(seq=2, key=KEYS[20]))
    a, b = AntiEntropy(va), AntiEntropy(vb)
    entries = sync.decode(sync.encode(b.entries_for(a.summary())))
    for raw in b.records_for(a.want(entries)).records:
        va.offer(raw, NOW)
    push = sync.decode(sync.encode(a.push_for(entries)))
    for raw in push.records:
        vb.offer(raw, NOW)
    assert va.digest() == vb.digest()
    assert vb.seq_of(KEYS[20].node_id) == 3
