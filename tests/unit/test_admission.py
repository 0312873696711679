"""Admission of new members and the dial budget (pure cores, fake clock)."""

import pytest

from overlay.core.admission import (
    FAILED,
    OK,
    STARTED,
    Admission,
    DialBudget,
    DialLimits,
    Limits,
    Refused,
    addr_key,
)
from overlay.core.membership import MembershipView, Outcome, StrangerView
from overlay.crypto import SigningKey
from overlay.errors import Reason
from overlay.records import Role, make_record
from overlay.storage.records import RecordStore
from tests.recgen import NOW, ONION

PEERS = [SigningKey(bytes([200 + i]) * 32).node_id for i in range(10)]


def rec(key: SigningKey, seq: int = 1, now: float = NOW, roles: Role = Role.RELAY):
    return make_record(
        key,
        seq=seq,
        now=int(now),
        roles=roles,
        feeds=("/ip4/127.0.0.2/tcp/4001",),
        onion_key=ONION.public,
        onion_epoch=1,
        exit_policy=("smtp:*",) if roles & (Role.EXIT | Role.STANDBY_EXIT) else (),
    )


def keys(n: int, base: int = 0) -> list[SigningKey]:
    return [SigningKey((base + i).to_bytes(4, "big") * 8) for i in range(n)]


def view(**limits) -> MembershipView:
    me = SigningKey(b"\x01" * 32).node_id
    return MembershipView(admission=Admission(Limits(**limits), me=me))


def offer_all(v, recs, now, peer=None, bulk=False):
    ok, refused = 0, []
    for r in recs:
        try:
            v.offer(r.encode(), now, peer=peer, bulk=bulk)
            ok += 1
        except Refused as e:
            refused.append(e.reason)
    return ok, refused


def test_flood_from_one_source_is_bounded():
    v = view(max_unverified=50, burst=40, rate=2.0, peer_burst=1000, peer_rate=1000)
    flood = [rec(k) for k in keys(300)]
    ok, refused = offer_all(v, flood, NOW, peer=PEERS[0])
    assert ok == 40  # the global burst
    assert set(refused) == {Reason.ADMISSION_LIMIT}
    assert v.counts() == (0, 40)
    # time refills the bucket, the table bound then holds
    ok2, refused2 = offer_all(v, flood, NOW + 100, peer=PEERS[0])
    assert ok2 == 40 + 10 and v.counts() == (0, 50)  # 40 duplicates, 10 new
    assert Reason.TABLE_FULL in refused2
    assert len(v) == 50
    assert v.admission.rejected == len(refused) + len(refused2)


def test_flood_from_ten_sources_is_bounded_and_each_peer_has_its_own_bucket():
    v = view(max_unverified=100, burst=1000, rate=1000, peer_burst=8, peer_rate=0.5)
    ks = keys(10 * 50)
    total = 0
    for i, peer in enumerate(PEERS):
        ok, refused = offer_all(v, [rec(k) for k in ks[i * 50 : (i + 1) * 50]], NOW, peer=peer)
        assert ok == 8  # one forwarder cannot use more than its own burst
        total += ok
    assert v.counts() == (0, total) == (0, 80)
    for step in range(1, 12):  # much later, from everyone: the bound holds
        for i, peer in enumerate(PEERS):
            offer_all(v, [rec(k) for k in ks[i * 50 : (i + 1) * 50]], NOW + 100 * step, peer=peer)
    assert v.counts()[1] == 100
    assert len(v) == 100


def test_honest_updates_always_pass_a_full_table():
    v = view(max_unverified=5, burst=5, rate=0.0)
    ks = keys(5)
    offer_all(v, [rec(k) for k in ks], NOW)
    with pytest.raises(Refused):
        v.offer(rec(SigningKey(b"\x99" * 32)).encode(), NOW)
    for seq in range(2, 30):  # updates of members held are never limited
        for k in ks:
            assert v.offer(rec(k, seq=seq).encode(), NOW)[0] is Outcome.ACCEPTED
    assert all(v.seq_of(k.node_id) == 29 for k in ks)


def test_refusal_costs_no_signature_check_and_no_token():
    v = view(max_unverified=10, burst=1, rate=0.0)
    forged = bytearray(rec(SigningKey(b"\x42" * 32)).encode())
    forged[-3] ^= 0xFF
    from overlay.errors import BadSignature

    with pytest.raises(BadSignature):
        v.offer(bytes(forged), NOW)
    # the invalid record did not take the only token
    assert v.offer(rec(SigningKey(b"\x43" * 32)).encode(), NOW)[0] is Outcome.ACCEPTED


def test_join_pull_skips_the_rate_not_the_bound():
    v = view(max_unverified=100, burst=2, rate=0.0)
    ok, _ = offer_all(v, [rec(k) for k in keys(150)], NOW, peer=PEERS[0], bulk=True)
    assert ok == 100


def test_confirmed_members_are_verified_survive_ttl_and_eviction():
    v = view(max_unverified=3, max_members=5, burst=100, rate=100, unverified_ttl=60)
    a, b, c = keys(3)
    for k in (a, b, c):
        v.offer(rec(k).encode(), NOW)
    assert v.confirm(a.node_id, NOW + 1)
    assert not v.confirm(a.node_id, NOW + 2)  # once
    assert v.is_verified(a.node_id) and not v.is_verified(b.node_id)
    assert v.verified_since(a.node_id) == NOW + 1
    # confirmed before its record arrives: verified on arrival, beyond the unverified bound
    d, e = keys(2, base=100)
    v.confirm(d.node_id, NOW + 3)
    v.offer(rec(d).encode(), NOW + 4)
    assert v.is_verified(d.node_id)
    v.confirm(e.node_id, NOW + 3)
    v.offer(rec(e).encode(), NOW + 4)
    assert len(v) == 5 and v.is_verified(e.node_id)
    f = SigningKey(b"\x77" * 32)
    v.confirm(f.node_id, NOW + 5)
    v.offer(rec(f).encode(), NOW + 6)  # the table (5) is full: the newest unverified goes
    assert len(v) == 5
    assert v.take_dropped() == [c.node_id]
    assert v.counts() == (4, 1)
    # unconfirmed members go after the TTL, verified ones stay
    gone = v.expire(NOW + 100)
    assert len(gone) == 1 and v.counts() == (4, 0)
    assert v.refused_recently(gone[0], NOW + 100)
    assert all(v.is_verified(k.node_id) for k in (a, d, e, f))


def test_own_record_is_verified():
    me = SigningKey(b"\x01" * 32)
    v = view(max_unverified=0, burst=0, rate=0)
    v.offer(rec(me).encode(), NOW)
    assert v.is_verified(me.node_id)


def test_strangers_are_served_no_unverified_exit():
    v = view()
    a, b, c = keys(3)
    v.offer(rec(a, roles=Role.EXIT | Role.RELAY).encode(), NOW)
    v.offer(rec(b, roles=Role.STANDBY_EXIT | Role.RELAY).encode(), NOW)
    v.offer(rec(c).encode(), NOW)
    sv = StrangerView(v)
    assert sv.digest() == [(bytes(c.node_id), 1)]
    assert sv.get(a.node_id) is None and sv.seq_of(b.node_id) is None
    v.confirm(a.node_id, NOW)
    assert sorted(sv.digest()) == sorted([(bytes(c.node_id), 1), (bytes(a.node_id), 1)])
    assert sv.get(a.node_id) is not None


def test_persistence_round_trip(tmp_path):
    v = view(max_unverified=4, burst=100, rate=100)
    ks = keys(6)
    store = RecordStore(tmp_path / "records.db")
    for i, k in enumerate(ks):
        try:
            _, r = v.offer(rec(k).encode(), NOW + i)
        except Refused:
            continue
        store.put(r, first_seen=NOW + i, verified_at=None)
    v.confirm(ks[1].node_id, NOW + 10)
    store.set_verified(ks[1].node_id, NOW + 10)
    assert store.count() == 4 and store.count_unverified() == 3
    store.close()
    # reload into a view with a smaller bound: verified first, then the newest unverified
    with RecordStore(tmp_path / "records.db") as store:
        members = store.members(NOW + 20)
        assert members[0][0].node_id == ks[1].node_id and members[0][2] == NOW + 10
        w = view(max_unverified=2)
        kept = [r.node_id for r, fs, va in members if w.restore(r, fs, va)]
        assert w.is_verified(ks[1].node_id)
        assert kept == [ks[1].node_id, ks[3].node_id, ks[2].node_id]
        assert w.verified_since(ks[1].node_id) == NOW + 10
        # a newer record of a stored node keeps its admission state
        assert store.put(rec(ks[1], seq=2), first_seen=NOW + 30)
        assert store.members(NOW + 30)[0][1:] == (NOW + 1, NOW + 10)
        assert store.delete([ks[0].node_id, ks[2].node_id]) == 2 and store.count() == 2


def test_old_store_files_are_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "records.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE records (node_id BLOB PRIMARY KEY, seq INTEGER NOT NULL, "
        "tombstone INTEGER NOT NULL, expires_at INTEGER NOT NULL, raw BLOB NOT NULL);"
        "CREATE TABLE record_roles (node_id BLOB NOT NULL, role TEXT NOT NULL, "
        "PRIMARY KEY (node_id, role));"
    )
    r = rec(SigningKey(b"\x05" * 32))
    db.execute(
        "INSERT INTO records VALUES (?, ?, 0, ?, ?)",
        (bytes(r.node_id), r.seq - (1 << 63), r.expires_at, r.encode()),
    )
    db.commit()
    db.close()
    with RecordStore(path) as store:
        assert store.members(NOW) == [(r, None, None)]
        assert store.count_unverified() == 1
        assert store.set_verified(r.node_id, NOW)
        assert store.count_unverified() == 0


def test_dial_budget_rate_and_address_interval():
    b = DialBudget(DialLimits(rate=1.0, burst=2.0, addr_interval=60.0, failed_interval=10.0))
    feeds = ["/ip4/127.0.0.2/tcp/5000"]
    t = 1000.0
    assert b.permit(feeds, False, t) == feeds
    b.dialled(feeds[0], STARTED, t)
    b.dialled(feeds[0], FAILED, t)
    # the same address again within a minute: refused, for an unverified target
    assert b.permit(feeds, False, t + 30) == []
    assert b.permit(feeds, False, t + 61) == feeds
    # new targets: the burst, then one per second
    others = [[f"/ip4/127.0.0.2/tcp/{6000 + i}"] for i in range(10)]
    allowed = sum(bool(b.permit(f, False, t + 61)) for f in others)
    assert allowed == 1  # burst of 2, one already used at t+61
    assert b.permit(others[5], False, t + 62) == others[5]
    # verified targets: no token, only a recent failure blocks
    v = ["/ip4/127.0.0.1/tcp/7000"]
    for _ in range(20):
        assert b.permit(v, True, t + 62) == v
    b.dialled(v[0], FAILED, t + 62)
    assert b.permit(v, True, t + 65) == []
    assert b.permit(v, True, t + 73) == v
    b.dialled(v[0], OK, t + 73)
    assert b.permit(v, True, t + 74) == v


def test_dial_budget_relay_feeds_are_no_second_way_to_a_direct_dial():
    b = DialBudget(DialLimits(rate=100.0, burst=100.0, addr_interval=60.0, failed_interval=10.0))
    relay_addr = "/ip4/127.0.0.3/tcp/4001"
    direct = "/ip4/127.0.0.2/tcp/5000"
    circuit = f"{relay_addr}/p2p/12D3KooRelay/p2p-circuit"
    t = 1000.0
    assert b.permit([direct, circuit], False, t) == [direct, circuit]
    # only the direct feed counts as dialled: the relay member's own address is
    # still free to dial (a circuit over a connection to it dials nothing)
    assert b.permit([relay_addr], False, t) == [relay_addr]
    # the direct dial is on its way: a second caller gets no circuit instead
    assert b.permit([direct, circuit], False, t + 1) == []
    b.dialled(direct, OK, t + 2)
    assert b.permit([direct, circuit], False, t + 3) == []
    # a direct feed that failed: the relay feed is the way (its address is the
    # relay's, dialled above, so an unverified target waits for the interval)
    b.dialled(direct, FAILED, t + 4)
    assert b.permit([direct, circuit], False, t + 5) == []
    assert b.permit([direct, circuit], False, t + 61) == [circuit]
    # a circuit attempt is counted when it is made
    b.dialled(circuit, STARTED, t + 61)
    assert b.permit([relay_addr], False, t + 62) == []
    # verified targets: only failures hold a feed back
    assert b.permit([direct, circuit], True, t + 62) == [direct, circuit]


def test_dial_budget_over_a_long_flood():
    b = DialBudget(DialLimits(rate=1.0, burst=8.0, addr_interval=60.0))
    dials = 0
    same_addr = 0
    for step in range(800):  # 80 s, a fresh target every 0.1 s, all on one address
        now = 1000.0 + step * 0.1
        feed = [f"/ip4/127.0.0.9/tcp/{4000 + step % 50}"]
        if b.permit(feed, False, now):
            dials += 1
            b.dialled(feed[0], STARTED, now)
            if feed[0].endswith("/4000"):
                same_addr += 1
    assert dials <= 8 + 80 and same_addr <= 2


def test_addr_key():
    assert addr_key("/ip4/1.2.3.4/tcp/4001") == "ip4/1.2.3.4/tcp/4001"
    assert addr_key("/ip4/1.2.3.4/tcp/4001/p2p/12D3Koo") == "ip4/1.2.3.4/tcp/4001"
    relay = "/ip4/1.2.3.4/tcp/4001/p2p/12D3KooRelay/p2p-circuit"
    assert addr_key(relay) == "ip4/1.2.3.4/tcp/4001"


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Admission(Limits(max_members=0))


def test_choose_dials_prefers_verified_and_caps_the_others():
    import random

    from overlay.core.peering import choose_dials

    recs = [rec(k) for k in keys(12)]
    verified = {r.node_id for r in recs[:3]}
    me = SigningKey(b"\x01" * 32).node_id
    chosen = choose_dials(
        recs, set(), me, 8, random.Random(1), prefer=verified.__contains__, max_other=2
    )
    assert {r.node_id for r in chosen[:3]} == verified
    assert len(chosen) == 5  # 3 verified + at most 2 others
    only = choose_dials(
        recs, set(), me, 8, random.Random(1), prefer=verified.__contains__, max_other=0
    )
    assert {r.node_id for r in only} == verified
    none = choose_dials(recs, set(), me, 8, random.Random(1), prefer=lambda n: False, max_other=0)
    assert none == []


def test_anti_entropy_does_not_ask_again_for_refused_identities():
    from overlay.core.antientropy import AntiEntropy

    full = view(max_unverified=2, burst=100, rate=100)
    other = MembershipView()
    ks = keys(5)
    for k in ks:
        other.accept(rec(k))
    ae_full, ae_other = AntiEntropy(full), AntiEntropy(other)
    entries = ae_other.entries_for(ae_full.summary())
    pulled = ae_other.records_for(ae_full.want(entries, NOW))
    ok, refused = 0, 0
    for raw in pulled.records:
        try:
            full.offer(raw, NOW)
            ok += 1
        except Refused:
            refused += 1
    assert (ok, refused) == (2, 3)
    entries = ae_other.entries_for(ae_full.summary())
    assert ae_full.want(entries, NOW).ids == ()  # the refused three are not asked for
    assert len(ae_full.want(entries).ids) == 3  # (without a clock: as before)
    assert len(ae_full.want(entries, NOW + 3600).ids) == 3  # refusals are forgotten
