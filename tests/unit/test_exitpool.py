"""Standby-exit policy.

``Overlay`` runs one ``ExitPool`` per node over a shared membership whose
changes reach each node after a seeded propagation delay, and per-node
liveness views in which a killed node turns DEAD after a seeded detection
delay (different at every node, as with the real failure detector). Every
``Announce`` becomes a new record (seq+1) that propagates the same way.
"""

from __future__ import annotations

import hashlib
import heapq
import random

import pytest

from overlay.core.effects import Announce
from overlay.core.exitpool import DEFICIT, PROMOTE, RESTORED, STEP_BACK, ExitPool
from overlay.core.liveness import ALIVE, DEAD, SUSPECT
from overlay.crypto import NodeId, SigningKey
from overlay.errors import LocalError
from overlay.records import Role, ValidRecord, make_record, make_tombstone
from tests.recgen import NOW, ONION
from tests.unit.test_liveness import IDS as LIVENESS_IDS
from tests.unit.test_liveness import Net

POLICY = ("smtp:*",)
EXIT = Role.EXIT | Role.RELAY
STANDBY = Role.STANDBY_EXIT | Role.RELAY
RELAY = Role.RELAY
KEYS = [SigningKey(hashlib.sha256(b"exitpool-node-%d" % i).digest()) for i in range(16)]


def record(key: SigningKey, roles: Role, seq: int = 1) -> ValidRecord:
    exitish = bool(roles & (Role.EXIT | Role.STANDBY_EXIT))
    return make_record(
        key,
        seq=seq,
        now=NOW,
        roles=roles,
        feeds=("/ip4/127.0.0.1/tcp/4001",),
        onion_key=ONION.public,
        onion_epoch=1,
        exit_policy=POLICY if exitish else (),
    )


class Overlay:
    def __init__(
        self,
        roles: list[Role],
        seed: int = 1,
        prop: tuple[float, float] = (0.05, 0.25),
        detect: tuple[float, float] = (0.8, 2.5),
        keys: list[SigningKey] = KEYS,
        **kw,
    ) -> None:
        self.keys = {k.node_id: k for k in keys[: len(roles)]}
        self.ids = [k.node_id for k in keys[: len(roles)]]
        self.rng = random.Random(seed)
        self.prop, self.detect = prop, detect
        self.truth = {
            nid: record(self.keys[nid], r) for nid, r in zip(self.ids, roles, strict=True)
        }
        self.views = {o: dict(self.truth) for o in self.ids}
        self.live = {o: {n: ALIVE for n in self.ids} for o in self.ids}
        self.pools = {
            nid: ExitPool(nid, r, random.Random(seed * 100 + i), **kw)
            for i, (nid, r) in enumerate(zip(self.ids, roles, strict=True))
        }
        self.crashed: set[NodeId] = set()
        self.queue: list = []
        self.seq = 0
        self.now = 0.0
        self.announces: list[tuple[float, NodeId, Announce]] = []
        self.changed = set(self.ids)

    def _later(self, observer, delay, what) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (self.now + delay, self.seq, observer, what))

    def publish(self, rec: ValidRecord) -> None:
        self.truth[rec.node_id] = rec
        for o in self.ids:
            if o == rec.node_id:
                self.views[o][rec.node_id] = rec
                self.changed.add(o)
            else:
                self._later(o, self.rng.uniform(*self.prop), ("record", rec))

    def kill(self, node: NodeId) -> None:
        self.crashed.add(node)
        for o in self.ids:
            if o != node:
                self._later(o, self.rng.uniform(*self.detect), ("state", node, DEAD))

    def revive(self, node: NodeId) -> None:
        self.crashed.discard(node)
        for o in self.ids:
            if o != node:
                self._later(o, self.rng.uniform(*self.prop), ("state", node, ALIVE))

    def withdraw(self, node: NodeId) -> None:
        rec = make_tombstone(self.keys[node], seq=self.truth[node].seq + 1, now=NOW)
        self.publish(rec)

    def run(self, until: float, step: float = 0.05) -> None:
        while self.now < until - 1e-9:
            self.now = round(self.now + step, 9)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, o, what = heapq.heappop(self.queue)
                if what[0] == "record":
                    rec = what[1]
                    if rec.seq > self.views[o][rec.node_id].seq:
                        self.views[o][rec.node_id] = rec
                else:
                    self.live[o][what[1]] = what[2]
                self.changed.add(o)
            for nid, pool in self.pools.items():
                if nid in self.crashed:
                    continue
                if nid in self.changed:
                    out = pool.update(self.views[nid].values(), self.live[nid], self.now)
                else:
                    out = pool.tick(self.now)
                for e in out:
                    assert isinstance(e, Announce)
                    self.announces.append((self.now, nid, e))
                    rec = self.truth[nid]
                    self.publish(record(self.keys[nid], Role.parse(e.roles), rec.seq + 1))
            self.changed.clear()

    # what happened ---------------------------------------------------------------
    def promotions(self) -> list[tuple[float, NodeId]]:
        return [(t, n) for t, n, a in self.announces if "exit" in a.roles]

    def step_backs(self) -> list[tuple[float, NodeId]]:
        return [(t, n) for t, n, a in self.announces if "exit" not in a.roles]

    def live_exits(self) -> list[NodeId]:
        return [
            n
            for n, r in self.truth.items()
            if not r.is_tombstone and Role.EXIT in r.roles and n not in self.crashed
        ]

    def by_rank(self, nodes) -> list[NodeId]:
        pool = next(iter(self.pools.values()))
        return sorted(nodes, key=pool.rank_key)


def layout(exits: int, standbys: int, relays: int) -> list[Role]:
    return [EXIT] * exits + [STANDBY] * standbys + [RELAY] * relays


# -- the pool against a deficit ----------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_kill_all_exits_promotes_exactly_the_deficit(seed):
    ov = Overlay(layout(3, 3, 4), seed=seed)
    ov.run(3.0)
    assert ov.announces == []
    for e in ov.ids[:3]:
        ov.kill(e)
    ov.run(20.0)
    promoted = ov.promotions()
    assert sorted(n for _, n in promoted) == sorted(ov.ids[3:6])  # each standby once
    assert ov.step_backs() == []
    assert len(ov.live_exits()) == 3
    # the last promotion comes soon after the last node noticed the deaths
    assert max(t for t, _ in promoted) - 3.0 <= ov.detect[1] + 0.2
    for _, _, a in ov.announces:
        assert set(a.roles) == {"relay", "exit", "standby-exit"}  # can step back later
        assert a.why.startswith("promote: live exits ")


@pytest.mark.parametrize("seed", range(8))
def test_more_standbys_than_needed_only_the_best_ranked_promote(seed):
    ov = Overlay(layout(3, 6, 3), seed=seed)
    ov.run(2.0)
    for e in ov.ids[:3]:
        ov.kill(e)
    ov.run(20.0)
    promoted = [n for _, n in ov.promotions()]
    assert len(promoted) == 3  # no overshoot: rank < deficit, re-checked
    assert sorted(promoted) == sorted(ov.by_rank(ov.ids[3:9])[:3])


def test_one_exit_at_a_time_one_promotion_each():
    ov = Overlay(layout(3, 4, 3), seed=3)
    ov.run(2.0)
    for k, e in enumerate(ov.ids[:3]):
        ov.kill(e)
        ov.run(2.0 + 5.0 * (k + 1))
        assert len(ov.promotions()) == k + 1
        assert len(ov.live_exits()) == 3
    assert [n for _, n in ov.promotions()] == ov.by_rank(ov.ids[3:7])[:3]


def test_silent_preferred_standby_is_bypassed_after_patience():
    ov = Overlay(layout(3, 3, 3), seed=4, patience=3.0)
    ov.run(2.0)
    best, second = ov.by_rank(ov.ids[3:6])[:2]
    ov.crashed.add(best)  # crashed, but nobody's liveness view knows yet
    ov.kill(ov.ids[0])
    ov.run(20.0)
    [(t, who)] = ov.promotions()
    assert who == second
    # it waited for the better standby for `patience` after noticing the deficit
    noticed = min(e.at for e in ov.pools[second].events if e.kind == DEFICIT)
    assert t - noticed >= 3.0
    assert t - noticed <= 3.0 + ov.pools[second].jitter + 0.06


def test_dead_preferred_standby_is_skipped_at_once():
    ov = Overlay(layout(3, 3, 3), seed=5)
    ov.run(2.0)
    best, second = ov.by_rank(ov.ids[3:6])[:2]
    ov.kill(best)
    ov.run(6.0)
    ov.kill(ov.ids[0])
    ov.run(15.0)
    [(t, who)] = ov.promotions()
    assert who == second and t - 6.0 <= ov.detect[1] + 0.2


def test_withdrawn_exit_is_replaced():
    ov = Overlay(layout(3, 2, 3), seed=6)
    ov.run(2.0)
    ov.withdraw(ov.ids[1])  # a signed tombstone: the exit is gone
    ov.run(6.0)
    assert [n for _, n in ov.promotions()] == ov.by_rank(ov.ids[3:5])[:1]
    assert len(ov.live_exits()) == 3


def test_step_back_after_hysteresis_when_clearly_too_many():
    ov = Overlay(layout(3, 3, 3), seed=7, hysteresis=10.0, surplus=1)
    ov.run(2.0)
    for e in ov.ids[:3]:
        ov.kill(e)
    ov.run(10.0)
    assert len(ov.promotions()) == 3
    for e in ov.ids[:3]:
        ov.revive(e)  # the old exits come back: 6 live > target 3 + surplus 1
    ov.run(40.0)
    backs = ov.step_backs()
    ranked = ov.by_rank(ov.ids[3:6])
    assert [n for _, n in backs] == [ranked[2], ranked[1]]  # least preferred first
    assert backs[0][0] - 10.0 >= 10.0  # not before the hysteresis elapsed
    assert len(ov.live_exits()) == 4  # stops at target + surplus
    assert ov.pools[ranked[0]].promoted and not ov.pools[ranked[2]].promoted
    assert [e.kind for e in ov.pools[ranked[2]].events if e.kind in (PROMOTE, STEP_BACK)] == [
        PROMOTE,
        STEP_BACK,
    ]


def test_short_surplus_does_not_step_back():
    ov = Overlay(layout(3, 3, 3), seed=8, hysteresis=10.0)
    ov.run(2.0)
    for e in ov.ids[:3]:
        ov.kill(e)
    ov.run(10.0)
    for e in ov.ids[:3]:
        ov.revive(e)
    ov.run(15.0)
    ov.kill(ov.ids[0])  # surplus ends before the hysteresis elapsed
    ov.kill(ov.ids[1])
    ov.run(40.0)
    assert ov.step_backs() == []


def test_original_exits_never_step_back():
    ov = Overlay(layout(6, 1, 2), seed=9, hysteresis=1.0)
    ov.run(10.0)
    assert ov.announces == []


def test_stepped_back_standby_promotes_again_when_needed():
    ov = Overlay(layout(3, 3, 3), seed=10, hysteresis=2.0)
    ov.run(1.0)
    for e in ov.ids[:3]:
        ov.kill(e)
    ov.run(6.0)
    for e in ov.ids[:3]:
        ov.revive(e)
    ov.run(14.0)
    assert len(ov.step_backs()) == 2
    for e in ov.ids[:3]:
        ov.kill(e)
    ov.run(24.0)
    assert len(ov.live_exits()) == 3
    assert len(ov.promotions()) == 5


# -- chain mode ----------------------------------------------------------------------


def test_chain_mode_one_public_exit_next_in_rank_order():
    ov = Overlay(layout(1, 4, 3), seed=11, mode="chain")
    ov.run(2.0)
    order = ov.by_rank(ov.ids[1:5])
    current = ov.ids[0]
    t = 2.0
    for k in range(4):
        ov.kill(current)
        t += 6.0
        ov.run(t)
        assert [n for _, n in ov.promotions()] == order[: k + 1]
        assert ov.live_exits() == [order[k]]  # exactly one public exit
        current = order[k]


def test_chain_mode_returning_exit_makes_promoted_step_back():
    ov = Overlay(layout(1, 2, 2), seed=12, mode="chain", hysteresis=3.0)
    ov.run(1.0)
    ov.kill(ov.ids[0])
    ov.run(6.0)
    assert len(ov.promotions()) == 1
    ov.revive(ov.ids[0])
    ov.run(12.0)
    assert len(ov.step_backs()) == 1
    assert ov.live_exits() == [ov.ids[0]]


# -- one pool, by hand ---------------------------------------------------------------


def pool_and_records(n_exits=3, n_standby=2, **kw):
    recs = [record(KEYS[i], EXIT) for i in range(n_exits)]
    recs += [record(KEYS[n_exits + i], STANDBY) for i in range(n_standby)]
    me = KEYS[n_exits].node_id
    return ExitPool(me, STANDBY, random.Random(0), **kw), recs


def test_parameters_are_checked():
    with pytest.raises(LocalError):
        ExitPool(KEYS[0].node_id, STANDBY, random.Random(0), mode="random")
    with pytest.raises(LocalError):
        ExitPool(KEYS[0].node_id, STANDBY, random.Random(0), target_live_exits=0)


def test_suspect_or_unknown_exits_still_count():
    pool, recs = pool_and_records()
    states = {recs[0].node_id: SUSPECT, recs[1].node_id: (SUSPECT, 1.0)}
    assert pool.update(recs, states, 1.0) == []
    assert pool.tick(50.0) == [] and pool.live_exits == 3 and pool.next_wakeup() is None


def test_promotion_fires_at_next_wakeup_and_logs_events():
    pool, recs = pool_and_records(jitter=0.1)
    me_rank = pool.rank()
    assert me_rank in (0, 1)
    dead = {recs[0].node_id: DEAD}
    out = pool.update(recs, dead, 10.0)
    t = pool.next_wakeup()
    if me_rank == 0:
        assert 10.0 <= t <= 10.1
    else:
        assert t >= 10.0 + pool.patience
    if out == []:
        assert pool.tick(t - 1e-6) == []
        out = pool.tick(t)
    [a] = out
    assert a.roles == ("relay", "exit", "standby-exit") and pool.promoted
    assert pool.next_wakeup() is None
    pool.update(recs, dead, t + 1)
    assert [e.kind for e in pool.events] == [DEFICIT, PROMOTE, RESTORED]
    assert pool.events[1].live == 2 and pool.events[1].target == 3


def test_enough_exits_appearing_cancels_a_pending_promotion():
    pool, recs = pool_and_records(n_standby=3)
    extra = record(KEYS[10], EXIT)
    dead = {recs[0].node_id: DEAD}
    pool.update(recs, dead, 1.0)
    if pool.promoted:
        pytest.skip("this seed's node is rank 0 and fired at once")
    assert pool.next_wakeup() is not None
    assert pool.update([*recs, extra], dead, 1.05) == []
    assert pool.next_wakeup() is None
    assert pool.tick(100.0) == []


def test_non_standby_nodes_never_act():
    recs = [record(KEYS[i], EXIT) for i in range(3)]
    for roles in (RELAY, EXIT, Role.ENTRY | Role.RELAY):
        pool = ExitPool(KEYS[12].node_id, roles, random.Random(0))
        dead = {r.node_id: DEAD for r in recs}
        assert pool.update(recs, dead, 1.0) == []
        assert pool.tick(100.0) == [] and pool.rank() is None


def test_ranking_is_the_same_on_every_node_and_salted():
    a = ExitPool(KEYS[0].node_id, RELAY, random.Random(1))
    b = ExitPool(KEYS[1].node_id, STANDBY, random.Random(2))
    c = ExitPool(KEYS[1].node_id, STANDBY, random.Random(2), rank_salt=b"epoch-2")
    ids = [k.node_id for k in KEYS]
    assert sorted(ids, key=a.rank_key) == sorted(ids, key=b.rank_key)
    assert sorted(ids, key=a.rank_key) != sorted(ids, key=c.rank_key)


# -- with the real failure detector ---------------------------------------------------


def test_with_real_liveness_cores_killing_all_exits_promotes_three_of_five():
    """Liveness cores on an in-memory network feed each node's ExitPool; the
    promoted standbys' records reach the others 50-250 ms later. Each node
    detects the deaths at its own time, yet exactly the three best-ranked of
    five standbys promote."""
    n = 10
    net = Net(n, seed=2)
    ids = net.ids
    keys = {nid: net.keys[nid] for nid in ids}
    roles = layout(3, 5, 2)
    truth = {nid: record(keys[nid], r) for nid, r in zip(ids, roles, strict=True)}
    views = {o: dict(truth) for o in ids}
    pools = {
        nid: ExitPool(nid, r, random.Random(i))
        for i, (nid, r) in enumerate(zip(ids, roles, strict=True))
    }
    rng = random.Random(99)
    arrivals: list = []
    promotions = []

    def drive(net: Net) -> None:
        while arrivals and arrivals[0][0] <= net.now:
            _, _, o, rec = heapq.heappop(arrivals)
            views[o][rec.node_id] = rec
        for nid in ids:
            if nid in net.down:
                continue
            for e in pools[nid].update(views[nid].values(), net.cores[nid].states(), net.now):
                promotions.append((net.now, nid))
                rec = record(keys[nid], Role.parse(e.roles), truth[nid].seq + 1)
                truth[nid] = views[nid][nid] = rec
                for o in ids:
                    if o != nid:
                        heapq.heappush(
                            arrivals,
                            (
                                net.now + rng.uniform(0.05, 0.25),
                                len(promotions) * 100 + ids.index(o),
                                o,
                                rec,
                            ),
                        )

    net.hooks.append(drive)
    net.run(3.0, step=0.02)
    for e in ids[:3]:
        net.down.add(e)
    net.run(15.0, step=0.02)
    promoted = [nid for _, nid in promotions]
    assert sorted(promoted) == sorted(sorted(ids[3:8], key=pools[ids[0]].rank_key)[:3])
    assert max(t for t, _ in promotions) - 3.0 < 4.0
    for o in ids[3:]:
        live = [
            r
            for r in views[o].values()
            if Role.EXIT in r.roles and net.cores[o].states().get(r.node_id) != DEAD
        ]
        assert len([r for r in live if r.node_id not in net.down]) == 3
    assert LIVENESS_IDS[:n] == ids


# -- exits that have earned it (admission: verified at this node) ------------------


FAKE_KEYS = [SigningKey(hashlib.sha256(b"exitpool-fake-%d" % i).digest()) for i in range(100)]


def test_a_hundred_unverified_fake_exits_never_make_a_standby_step_back():
    """The promoted standby sees 100 extra exit records nobody verified: they count
    for nothing, however long they stay, while the honest exits still count."""
    honest = record(KEYS[0], EXIT)
    me = KEYS[1].node_id
    pool = ExitPool(me, STANDBY, random.Random(1), target_live_exits=2, hysteresis=10.0)
    verified = {honest.node_id: 0.0, me: 0.0}
    mine = [honest, record(KEYS[1], STANDBY)]
    for t in range(0, 20):
        for e in pool.update(mine, {}, float(t), verified.get):
            pool_roles = Role.parse(e.roles)
            mine[1] = record(KEYS[1], pool_roles, mine[1].seq + 1)
    assert pool.promoted and pool.live_exits == 2
    fakes = [record(k, EXIT) for k in FAKE_KEYS]
    for t in range(20, 400):
        assert pool.update(mine + fakes, {}, float(t), verified.get) == []
    assert pool.promoted and pool.live_exits == 2
    assert [e.kind for e in pool.events if e.kind in (PROMOTE, STEP_BACK)] == [PROMOTE]
    # without the verification map every record counts: the old behaviour steps back
    old = ExitPool(me, STANDBY | Role.EXIT, random.Random(1), target_live_exits=2)
    out = []
    for t in range(0, 30):
        out += old.update(mine + fakes, {}, float(t))
    assert [e.roles for e in out] == [tuple(STANDBY.names())]


def test_verified_exits_count_and_surplus_needs_seasoned_exits():
    me = KEYS[0].node_id
    exits = [record(k, EXIT) for k in KEYS[1:5]]
    pool = ExitPool(me, STANDBY | Role.EXIT, random.Random(2), target_live_exits=2, hysteresis=5.0)
    verified = {exits[0].node_id: 0.0}
    assert pool.update(exits, {}, 100.0, verified.get) == []
    assert pool.live_exits == 2  # the verified one and us
    # three more exits, verified only now: live, but not yet seasoned for a step back
    for e in exits[1:]:
        verified[e.node_id] = 100.0
    out = []
    for t in range(100, 160):
        out += pool.update(exits, {}, float(t), verified.get)
    assert pool.live_exits == 5 and out == []
    assert pool.seasoned_exits == 2
    assert pool.next_update() == 160.0  # when the three become seasoned: look again then
    for t in range(160, 170):
        out += pool.update(exits, {}, float(t), verified.get)
    assert [Role.EXIT in Role.parse(e.roles) for e in out] == [False]  # then it steps back
    assert pool.next_update() is None  # every live exit is seasoned: only new inputs matter
    # a dead verified exit does not count either
    pool2 = ExitPool(me, STANDBY, random.Random(3), target_live_exits=1)
    pool2.update(exits[:1], {exits[0].node_id: DEAD}, 0.0, {exits[0].node_id: 0.0}.get)
    assert pool2.live_exits == 0


def test_unverified_standbys_do_not_take_better_ranks():
    me = KEYS[0].node_id
    fakes = [record(k, STANDBY) for k in FAKE_KEYS[:50]]
    pool = ExitPool(me, STANDBY, random.Random(4), target_live_exits=1)
    pool.update(fakes, {}, 0.0, {}.get)
    assert pool.rank() == 0
    out = pool.update(fakes, {}, 1.0, {}.get)
    assert out and Role.EXIT in Role.parse(out[0].roles)
