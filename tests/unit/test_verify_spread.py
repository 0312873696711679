"""When the peer manager dials members it was only told about (verification).

A node that joins learns the whole membership at once; if it dialled every
unverified member as soon as ``VERIFY_AFTER`` had passed, it would connect to
the whole overlay within minutes (one dial per peer-loop round). Non-exit
members are instead due at random times up to half of ``unverified_ttl``.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from overlay.config import Config
from overlay.crypto import SigningKey
from overlay.records import Role
from overlay.services.peers import VERIFY_AFTER, PeerManager

T0 = 1000.0  # when the node learnt of every member (its join)


class _View:
    def __init__(self, first_seen: dict) -> None:
        self._first = first_seen
        self.verified: set = set()

    def is_verified(self, nid) -> bool:
        return nid in self.verified

    def first_seen(self, nid):
        return self._first.get(nid)

    def __contains__(self, nid) -> bool:
        return nid in self._first


def _manager(members: int, roles: Role = Role.RELAY, seed: int = 1):
    me = SigningKey.generate().node_id
    recs = [
        SimpleNamespace(node_id=SigningKey.generate().node_id, roles=roles) for _ in range(members)
    ]
    view = _View({r.node_id: T0 for r in recs})
    node = SimpleNamespace(node_id=me, view=view, config=Config(), rng=random.Random(seed))
    return PeerManager(node, sync=None), recs, view


def _due_times(pm: PeerManager, recs, view, *, step: float, until: float) -> dict:
    """Call the verification step every ``step`` seconds with room for everybody;
    a member is verified as soon as it is dialled. Returns member -> dial time
    (seconds after the join)."""
    dialled = {}
    t = 0.0
    while t <= until:
        for r in pm._verification_dials(recs, set(), len(recs), T0 + t, exits=False):
            dialled[r.node_id] = t
            view.verified.add(r.node_id)
        t += step
    return dialled


def test_verification_of_a_whole_membership_is_spread_up_to_half_the_ttl() -> None:
    pm, recs, view = _manager(200)
    half = Config().unverified_ttl / 2
    dialled = _due_times(pm, recs, view, step=5.0, until=half + 10)
    assert len(dialled) == 200  # every member is verified before half its TTL
    times = sorted(dialled.values())
    assert times[0] >= VERIFY_AFTER  # nobody before VERIFY_AFTER
    assert times[-1] <= half + 5.0
    # spread: no tenth of the window holds more than a quarter of the dials (all
    # at VERIFY_AFTER, as before, would put every one of them in the first tenth)
    width = (half - VERIFY_AFTER) / 10
    for k in range(10):
        lo = VERIFY_AFTER + k * width
        assert sum(1 for t in times if lo <= t < lo + width) <= 50


def test_exits_are_verified_at_once_and_the_spread_is_per_node() -> None:
    pm, recs, view = _manager(20, roles=Role.EXIT)
    assert len(pm._verification_dials(recs, set(), 20, T0, exits=True)) == 20
    a, recs_a, view_a = _manager(50, seed=1)
    b, _, view_b = _manager(50, seed=2)
    # the same members, two nodes: their dials do not fall at the same times
    view_b._first = dict(view_a._first)
    da = _due_times(a, recs_a, view_a, step=5.0, until=1000)
    db = _due_times(b, recs_a, view_b, step=5.0, until=1000)
    assert da.keys() == db.keys() and len(da) == 50
    assert sum(1 for n in da if da[n] == db[n]) < 10


def test_the_tried_table_stays_bounded() -> None:
    pm, recs, view = _manager(300)
    pm.node.config.max_unverified = 10  # the table is cleaned beyond 2 * 10 + 64 entries
    _due_times(pm, recs, view, step=30.0, until=Config().unverified_ttl / 2 + 30)
    assert len(pm._verify_tried) <= 2 * 10 + 64 + 1
