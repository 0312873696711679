"""Shared-storage views behave exactly like plain ones, and the cached digests are the real ones."""

import random

from overlay.core.antientropy import AntiEntropy, bucket_hashes
from overlay.core.membership import MembershipView
from overlay.crypto import SigningKey, hash32
from overlay.records import Role, make_record
from overlay.sim.views import Base, SimAntiEntropy, SimView, changed_ids, sim_record
from overlay.wire import sync
from tests.recgen import NOW, ONION

KEYS = [SigningKey(hash32(b"views-%d" % i)) for i in range(120)]


def rec(i: int, seq: int):
    return sim_record(
        make_record(
            KEYS[i],
            seq=seq,
            now=NOW,
            roles=Role.RELAY,
            feeds=("/ip4/10.0.0.1/tcp/4001",),
            onion_key=ONION.public,
            onion_epoch=1,
        )
    )


RECS = {(i, s): rec(i, s) for i in range(120) for s in (1, 2, 3)}


def test_sim_record_encodes_like_a_record():
    r = RECS[(0, 1)]
    assert (
        r.encode()
        == make_record(
            KEYS[0],
            seq=1,
            now=NOW,
            roles=Role.RELAY,
            feeds=("/ip4/10.0.0.1/tcp/4001",),
            onion_key=ONION.public,
            onion_epoch=1,
        ).encode()
    )


def _random_ops(seed: int):
    rng = random.Random(seed)
    base_recs = {RECS[(i, 1)].node_id: RECS[(i, 1)] for i in range(0, 120, 2)}
    base = Base(base_recs, 7)
    memo: dict = {}
    sim, plain = SimView(base, memo), MembershipView()
    for r in base_recs.values():
        plain.accept(r)
    for _ in range(300):
        op = rng.random()
        i = rng.randrange(120)
        if op < 0.8:
            r = RECS[(i, rng.choice((1, 2, 3)))]
            assert sim.accept(r) == plain.accept(r)
        else:  # expire = delete through the real expire() path
            nid = KEYS[i].node_id
            if nid in plain:
                del plain._records[nid]
                del sim._records[nid]
        assert len(sim) == len(plain)
    return sim, plain, memo


def test_layered_view_matches_plain_view():
    for seed in range(5):
        sim, plain, _ = _random_ops(seed)
        assert sim.digest() == plain.digest()
        for k in KEYS:
            assert sim.get(k.node_id) is plain.get(k.node_id)
            assert (k.node_id in sim) == (k.node_id in plain)
        a, b = SimAntiEntropy(sim), AntiEntropy(plain)
        assert a.bucket_hashes() == bucket_hashes(plain.digest())
        assert a.summary() == b.summary()
        every = list(range(sync.BUCKETS))
        assert a.bucket_entries(every) == b.bucket_entries(every)


def test_sync_frames_are_identical_to_the_plain_core():
    sim, plain, _ = _random_ops(11)
    other = MembershipView()
    for i in range(0, 120, 3):
        other.accept(RECS[(i, 2)])
    o = AntiEntropy(other)
    s_sim, s_plain = SimAntiEntropy(sim), AntiEntropy(plain)
    summ = o.summary()
    assert s_sim.entries_for(summ) == s_plain.entries_for(summ)
    ent = o.entries_for(s_plain.summary())
    assert s_sim.want(ent) == s_plain.want(ent)
    want = s_plain.want(ent)
    assert o.records_for(want) == o.records_for(s_sim.want(ent))
    ent = s_plain.entries_for(o.summary())
    assert s_sim.push_for(o.entries_for(s_sim.summary())) == s_plain.push_for(
        o.entries_for(s_plain.summary())
    )
    assert o.push_for(ent).records  # the plain side has records the other lacks


def test_simulator_uses_the_runtime_constants():
    from overlay.services import peers, resilience, sync
    from overlay.sim import sim

    assert sim.SYNC_TIMEOUT is sync.SYNC_TIMEOUT
    assert sim.JOIN_ROUNDS is peers.JOIN_ROUNDS
    assert sim.SETTLE is resilience.SETTLE


def test_rebase_keeps_contents_and_shrinks_delta():
    sim, plain, memo = _random_ops(3)
    before = sim.digest()
    truth = {}
    for (_i, s), r in RECS.items():
        if s == 3:
            truth[r.node_id] = r
    new = Base(truth, 8)
    sim.store.rebase(new, changed_ids(sim.store.base, new))
    memo.clear()
    assert sim.digest() == before
    assert SimAntiEntropy(sim).bucket_hashes() == bucket_hashes(plain.digest())
    # after a rebase onto the truth, the delta is what the view lacks or holds older
    lag = sum(1 for nid, r in truth.items() if sim.seq_of(nid) != r.seq)
    assert len(sim.store.delta) == lag
    # a view that holds everything of the new base has an empty delta
    full = SimView(new, {})
    assert len(full.store.delta) == 0 and len(full) == len(truth)
