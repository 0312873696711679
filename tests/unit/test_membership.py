import pytest

from overlay.core.membership import MembershipView, Outcome
from overlay.crypto import SigningKey
from overlay.errors import BadSignature, Stale
from overlay.records import Role, make_tombstone
from tests.recgen import KEY, NOW, exit_record, relay_record


def test_accept_supersede_duplicate_stale():
    v = MembershipView()
    assert v.offer(exit_record(seq=2).encode(), NOW)[0] is Outcome.ACCEPTED
    assert v.offer(exit_record(seq=2).encode(), NOW) == (Outcome.DUPLICATE, None)
    with pytest.raises(Stale):
        v.offer(exit_record(seq=1).encode(), NOW)
    assert v.offer(exit_record(seq=3).encode(), NOW)[0] is Outcome.ACCEPTED
    assert v.seq_of(KEY.node_id) == 3


def test_forged_higher_seq_rejected_and_not_stored():
    v = MembershipView()
    v.offer(exit_record(seq=1).encode(), NOW)
    forged = bytearray(exit_record(seq=5).encode())
    forged[-3] ^= 0xFF  # inside the signature
    with pytest.raises(BadSignature):
        v.offer(bytes(forged), NOW)
    assert v.seq_of(KEY.node_id) == 1


def test_tombstone_hides_node():
    v = MembershipView()
    v.offer(exit_record(seq=1).encode(), NOW)
    v.offer(make_tombstone(KEY, seq=2, now=NOW).encode(), NOW)
    snap = v.snapshot(NOW)
    assert snap.live() == []
    assert snap.with_role(Role.EXIT) == []


def test_expire():
    v = MembershipView()
    r = relay_record()
    v.accept(r)
    assert v.expire(r.expires_at - 1) == []
    assert v.expire(r.expires_at) == [r.node_id]
    assert len(v) == 0


def test_diff_two_views_converge():
    a, b = MembershipView(), MembershipView()
    keys = [SigningKey.generate() for _ in range(6)]
    for i, k in enumerate(keys):
        a.accept(relay_record(seq=1, key=k))
        if i % 2:
            b.accept(relay_record(seq=2, key=k))
    want, offer = a.diff(b.digest())
    assert sorted(want) == sorted(bytes(k.node_id) for k in keys[1::2])
    assert sorted(offer) == sorted(bytes(k.node_id) for k in keys[::2])
    # wire the two views together without I/O (wsproto style)
    for nid in want:
        a.accept(b.get(_nid(nid)))
    for nid in offer:
        b.accept(a.get(_nid(nid)))
    assert a.digest() == b.digest()
    assert a.diff(b.digest()) == ([], [])


def _nid(raw):
    from overlay.crypto import NodeId

    return NodeId(raw)


def test_a_view_without_admission_is_bounded_by_max_records():
    """A light client's view (no admission): a new identity beyond ``max_records``
    is refused before its signature is checked; members held still update."""
    from overlay.core.admission import Refused
    from overlay.errors import Reason

    v = MembershipView(max_records=3)
    keys = [SigningKey.generate() for _ in range(3)]
    for k in keys:
        v.offer(relay_record(seq=1, key=k).encode(), NOW)
    with pytest.raises(Refused) as e:
        v.offer(relay_record(seq=1, key=SigningKey.generate()).encode(), NOW)
    assert e.value.reason is Reason.TABLE_FULL
    forged = bytearray(relay_record(seq=1, key=SigningKey.generate()).encode())
    forged[-3] ^= 0xFF  # refused for the bound, before the (bad) signature is looked at
    with pytest.raises(Refused):
        v.offer(bytes(forged), NOW)
    assert not v.accept(relay_record(seq=1, key=SigningKey.generate()))
    assert v.offer(relay_record(seq=2, key=keys[0]).encode(), NOW)[0] is Outcome.ACCEPTED
    assert len(v) == 3 and v.seq_of(keys[0].node_id) == 2


def test_a_light_clients_view_is_bounded(tmp_path):
    from overlay.client import Client
    from overlay.core.admission import Limits

    c = Client(tmp_path, via=["/ip4/127.0.0.1/tcp/1/p2p/x"])
    assert c.view.max_records == Limits().max_members
