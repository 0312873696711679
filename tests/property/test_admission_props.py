"""Property tests for the bounded membership view (admission)."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.core.admission import Admission, Limits, Refused
from overlay.core.membership import MembershipView
from overlay.crypto import SigningKey
from tests.recgen import NOW, exit_record

KEYS = [SigningKey(bytes([40 + i]) * 32) for i in range(8)]
RECORDS = {(k, s): exit_record(seq=s, key=KEYS[k]) for k in range(len(KEYS)) for s in range(1, 9)}


def bounded(confirmed=(), **limits) -> MembershipView:
    v = MembershipView(admission=Admission(Limits(**limits)))
    for k in confirmed:
        v.confirm(KEYS[k].node_id, NOW)
    return v


def offer(v: MembershipView, rec, now=NOW, peer=None) -> None:
    try:
        v.offer(rec.encode(), now, peer=peer)
    except Refused:
        pass
    except Exception:  # noqa: BLE001 - stale: fine for a merge
        pass


@given(seqs=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 8)), min_size=1, max_size=30))
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_merge_of_verified_records_is_commutative_idempotent_monotone(seqs):
    recs = [RECORDS[s] for s in seqs]
    members = {k for k, _ in seqs}
    # tight bounds: only verified members can be in; they always are
    a = bounded(members, max_unverified=0, burst=0, rate=0)
    b = bounded(members, max_unverified=0, burst=0, rate=0)
    for r in recs:
        offer(a, r)
    shuffled = recs[:]
    random.Random(len(recs)).shuffle(shuffled)
    for r in shuffled + shuffled:
        offer(b, r)
    assert a.digest() == b.digest()
    for k in members:
        assert a.seq_of(KEYS[k].node_id) == max(s for kk, s in seqs if kk == k)
        assert a.is_verified(KEYS[k].node_id)
    assert a.counts() == (len(members), 0)


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("offer"), st.integers(0, 7), st.integers(1, 8), st.integers(0, 3)),
            st.tuples(st.just("confirm"), st.integers(0, 7)),
            st.tuples(st.just("tick"), st.integers(1, 50)),  # < 1 h in all: no record expires
        ),
        max_size=60,
    )
)
@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
def test_bounds_hold_under_any_sequence(ops):
    v = bounded(max_unverified=3, max_members=5, burst=4, rate=0.01, peer_burst=2, peer_rate=0.01)
    adm = v.admission
    now = float(NOW)
    ever_verified = set()
    for op in ops:
        if op[0] == "offer":
            offer(v, RECORDS[(op[1], op[2])], now, peer=op[3])
        elif op[0] == "confirm":
            if v.confirm(KEYS[op[1]].node_id, now):
                ever_verified.add(KEYS[op[1]].node_id)
        else:
            now += op[1]
            v.expire(now)
        assert adm.unverified <= 3 and len(v) <= 5
        assert adm.unverified + adm.verified == len(v) == len(adm.entries)
        assert sum(1 for n in adm.entries if not adm.is_verified(n)) == adm.unverified
        # verified members are never evicted or dropped (their records outlive this test)
        assert all(n in v for n in ever_verified)
