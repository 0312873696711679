"""overlay.core.paths: pure path selection (seeded rng, fixed keys)."""

import random
from collections import Counter

import pytest

from overlay.core.paths import (
    DIVERSITY_PENALTY,
    NoPath,
    exits_for,
    select_path,
    select_return_path,
)
from overlay.crypto import SigningKey
from overlay.errors import LocalError
from overlay.records import Role, make_record, make_tombstone
from tests.recgen import NOW, ONION

DEST = "smtp:alice@example.org"


def key(i: int) -> SigningKey:
    return SigningKey(bytes([i + 1]) * 32)


def rec(i: int, roles=Role.RELAY, net: str = "10.0", policy=(), seq: int = 1):
    return make_record(
        key(i),
        seq=seq,
        now=NOW,
        roles=roles,
        feeds=(f"/ip4/{net}.0.{i + 1}/tcp/4001",),
        onion_key=ONION.public,
        onion_epoch=ONION.epoch,
        exit_policy=policy,
    )


def exit_rec(i: int, policy=("smtp:*",), net: str = "10.0", roles=Role.EXIT):
    return rec(i, roles, net, policy)


def ids(path):
    return [r.node_id for r in path.hops]


@pytest.fixture
def members():
    # 0 = entry, 1..5 relays, 6..7 exits
    return [rec(0, Role.ENTRY)] + [rec(i) for i in range(1, 6)] + [exit_rec(6), exit_rec(7)]


def test_three_hops_entry_relay_exit(members):
    entry = key(0).node_id
    for seed in range(50):
        p = select_path(members, random.Random(seed), destination=DEST, entry=entry)
        assert len(p) == 3 and p.first.node_id == entry
        assert Role.EXIT in p.last.roles and Role.RELAY in p.middle[0].roles
        assert len(set(ids(p))) == 3
        assert len(p.sphinx_hops()) == 3 and p.sphinx_hops()[0].node == entry


@pytest.mark.parametrize("hops", [2, 3, 4, 5])
def test_hop_count_counts_entry_and_exit(members, hops):
    p = select_path(members, random.Random(1), destination=DEST, entry=key(0).node_id, hops=hops)
    assert len(p) == hops and len(set(ids(p))) == hops


def test_without_entry_the_first_hop_is_a_relay(members):
    p = select_path(members, random.Random(3), destination=DEST, hops=3)
    assert len(p) == 3 and all(Role.RELAY in r.roles for r in p.hops[:-1])


def test_hop_bounds():
    with pytest.raises(LocalError):
        select_path([], random.Random(), destination=DEST, hops=1)
    with pytest.raises(LocalError):
        select_path([], random.Random(), destination=DEST, hops=6)


def test_exit_policy_decides():
    recs = [
        rec(0, Role.ENTRY),
        rec(1),
        exit_rec(2, ("smtp:*@example.org",)),
        exit_rec(3, ("maildir:*",)),
        exit_rec(4, ("https:hooks.example.net",)),
    ]
    entry = key(0).node_id
    p = select_path(recs, random.Random(1), destination=DEST, entry=entry)
    assert p.last.node_id == key(2).node_id
    p = select_path(recs, random.Random(1), destination="maildir:inbox", entry=entry)
    assert p.last.node_id == key(3).node_id
    p = select_path(recs, random.Random(1), destination="https://hooks.example.net/x", entry=entry)
    assert p.last.node_id == key(4).node_id
    with pytest.raises(NoPath) as e:
        select_path(recs, random.Random(1), destination="smtp:bob@other.org", entry=entry)
    assert e.value.reason == "no_exit"
    assert [r.node_id for r in exits_for(recs, DEST)] == [key(2).node_id]


def test_standby_exits_and_tombstones_are_not_exits():
    tomb = make_tombstone(key(7), seq=2, now=NOW)
    recs = [rec(0, Role.ENTRY), rec(1), exit_rec(6, roles=Role.STANDBY_EXIT), tomb]
    with pytest.raises(NoPath):
        select_path(recs, random.Random(1), destination=DEST, entry=key(0).node_id)


def test_exit_hint_used_when_it_qualifies(members):
    entry, hint = key(0).node_id, key(7).node_id
    for seed in range(20):
        p = select_path(members, random.Random(seed), destination=DEST, entry=entry, exit_hint=hint)
        assert p.last.node_id == hint
    # an excluded hint is ignored
    p = select_path(
        members,
        random.Random(1),
        destination=DEST,
        entry=entry,
        exit_hint=hint,
        exclude={hint},
    )
    assert p.last.node_id == key(6).node_id


def test_exclude_is_hard_avoid_is_soft(members):
    entry = key(0).node_id
    relays = {key(i).node_id for i in range(1, 6)}
    keep = key(3).node_id
    for seed in range(30):
        p = select_path(
            members, random.Random(seed), destination=DEST, entry=entry, exclude=relays - {keep}
        )
        assert p.middle[0].node_id == keep
    # avoid: not used while others are available ...
    for seed in range(30):
        p = select_path(members, random.Random(seed), destination=DEST, entry=entry, avoid={keep})
        assert p.middle[0].node_id != keep
    # ... but used when it is the only one left
    p = select_path(
        members,
        random.Random(1),
        destination=DEST,
        entry=entry,
        exclude=relays - {keep},
        avoid={keep},
    )
    assert p.middle[0].node_id == keep
    # an avoided exit is used only when no other exit qualifies
    p = select_path(
        members,
        random.Random(1),
        destination=DEST,
        entry=entry,
        avoid={key(6).node_id, key(7).node_id},
    )
    assert p.last.node_id in {key(6).node_id, key(7).node_id}


def test_weights_and_liveness_states(members):
    entry = key(0).node_id
    dead = {key(i).node_id: "dead" for i in (1, 2, 3, 4)}
    for seed in range(20):
        p = select_path(members, random.Random(seed), destination=DEST, entry=entry, weights=dead)
        assert p.middle[0].node_id == key(5).node_id
    with pytest.raises(NoPath) as e:
        select_path(
            members,
            random.Random(1),
            destination=DEST,
            entry=entry,
            weights={key(6).node_id: 0, key(7).node_id: "dead"},
        )
    assert e.value.reason == "no_exit"
    heavy = {key(6).node_id: 50.0}
    got = Counter(
        select_path(
            members, random.Random(s), destination=DEST, entry=entry, weights=heavy
        ).last.node_id
        for s in range(300)
    )
    assert got[key(6).node_id] > 250


def test_prefers_different_feed_networks():
    # entry on 10.1/16, exit on 10.2/16; relay 1 shares the entry's network, relay 2 does not
    recs = [
        rec(0, Role.ENTRY, net="10.1"),
        rec(1, net="10.1"),
        rec(2, net="10.3"),
        exit_rec(6, net="10.2"),
    ]
    got = Counter(
        select_path(recs, random.Random(s), destination=DEST, entry=key(0).node_id)
        .middle[0]
        .node_id
        for s in range(400)
    )
    expected_same = DIVERSITY_PENALTY / (1 + DIVERSITY_PENALTY)  # ~0.09
    assert got[key(1).node_id] / 400 < expected_same + 0.05
    assert got[key(2).node_id] > got[key(1).node_id] * 5


def test_typed_failures():
    with pytest.raises(NoPath) as e:
        select_path([rec(1), exit_rec(6)], random.Random(), destination=DEST, entry=key(0).node_id)
    assert e.value.reason == "entry_unknown"
    with pytest.raises(NoPath) as e:
        select_path(
            [rec(0, Role.ENTRY), exit_rec(6)],
            random.Random(),
            destination=DEST,
            entry=key(0).node_id,
            hops=3,
        )
    assert e.value.reason == "not_enough_relays"
    # the entry itself is never also the exit
    with pytest.raises(NoPath) as e:
        select_path(
            [exit_rec(0), rec(1)], random.Random(), destination=DEST, entry=key(0).node_id, hops=2
        )
    assert e.value.reason == "no_exit"


def test_deterministic_and_order_independent(members):
    entry = key(0).node_id
    a = select_path(members, random.Random(42), destination=DEST, entry=entry, hops=4)
    b = select_path(
        list(reversed(members)), random.Random(42), destination=DEST, entry=entry, hops=4
    )
    assert ids(a) == ids(b)


def test_return_path_ends_at_entry(members):
    entry, exit_id = key(0).node_id, key(6).node_id
    for seed in range(30):
        p = select_return_path(members, random.Random(seed), last=entry, hops=3, avoid={exit_id})
        assert len(p) == 3 and p.last.node_id == entry and len(set(ids(p))) == 3
        assert exit_id not in ids(p)
        assert all(Role.RELAY in r.roles for r in p.hops[:-1])
    with pytest.raises(NoPath):
        select_return_path(members, random.Random(1), last=key(9).node_id)
    with pytest.raises(NoPath):
        select_return_path(members[:2], random.Random(1), last=entry, hops=3)
