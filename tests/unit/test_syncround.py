"""The anti-entropy round's two state machines (``overlay.core.syncround``): honest
rounds converge in both directions, every other frame order is a typed
rejection, truncation is told apart from a round without a push, and a peer
that lies about its summary or its answers gets nothing it did not earn."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.core.antientropy import AntiEntropy
from overlay.core.membership import MembershipView
from overlay.core.syncround import Initiator, Responder, RoundAborted
from overlay.crypto import SigningKey
from overlay.errors import DecodeError
from overlay.wire import sync
from tests.recgen import NOW, relay_record

KEYS = [SigningKey(bytes([i]) * 32) for i in range(1, 25)]


def wire(frame):
    """Every frame crosses the wire format."""
    return sync.decode(sync.encode(frame))


def run_round(a: MembershipView, b: MembershipView, *, push: bool = True, close_after=None):
    """One round a -> b; returns (initiator, responder) after offering what moved."""
    ini = Initiator(AntiEntropy(a), now=NOW, push=push)
    resp = Responder(AntiEntropy(b))
    to_b = [wire(ini.start())]
    while to_b:
        to_a = []
        for f in to_b:
            to_a += [wire(x) for x in resp.receive(f)]
        to_b = []
        for f in to_a:
            to_b += [wire(x) for x in ini.receive(f)]
    assert ini.done
    if not resp.done:
        assert resp.end() == []  # the initiator closes: a round without a push
    assert resp.done
    for raw in ini.records:
        a.offer(raw, NOW)
    for raw in resp.pushed:
        b.offer(raw, NOW)
    return ini, resp


views = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=len(KEYS), max_size=len(KEYS)
)


@given(views)
@settings(max_examples=60, deadline=None)
def test_one_push_pull_round_makes_two_views_equal(seqs):
    """Seq 0 = no record. After one round both sides hold the newer of each."""
    a, b = MembershipView(), MembershipView()
    for k, (sa, sb) in zip(KEYS, seqs, strict=True):
        if sa:
            a.accept(relay_record(seq=sa, key=k))
        if sb:
            b.accept(relay_record(seq=sb, key=k))
    ini, _ = run_round(a, b)
    assert sorted(a.digest()) == sorted(b.digest())
    assert ini.differed == (any(sa != sb for sa, sb in seqs))
    ini, resp = run_round(a, b)
    assert not ini.differed and ini.records == () and resp.pushed == ()


def test_a_kept_stream_ends_each_round_with_a_push_even_an_empty_one():
    """``always_push``: the initiator ends every round with a push, so the responder
    is done without the stream closing and the next round can follow on it."""
    a, b = MembershipView(), MembershipView()
    a.accept(relay_record(seq=1, key=KEYS[0]))
    b.accept(relay_record(seq=1, key=KEYS[1]))
    for round_ in range(2):  # the first round moves records, the second finds none
        ini = Initiator(AntiEntropy(a), now=NOW, always_push=True)
        resp = Responder(AntiEntropy(b))
        to_b = [wire(ini.start())]
        frames_to_b = 1
        while to_b:
            to_a = [wire(x) for f in to_b for x in resp.receive(f)]
            to_b = [wire(x) for f in to_a for x in ini.receive(f)]
            frames_to_b += len(to_b)
        assert ini.done and resp.done  # no end of stream needed
        assert frames_to_b == 3  # summary, want, push
        for raw in ini.records:
            a.offer(raw, NOW)
        for raw in resp.pushed:
            b.offer(raw, NOW)
        assert ini.differed == (round_ == 0)
    assert sorted(a.digest()) == sorted(b.digest())


def test_a_light_client_pulls_and_never_pushes():
    a, b = MembershipView(), MembershipView()
    a.accept(relay_record(seq=1, key=KEYS[0]))
    b.accept(relay_record(seq=1, key=KEYS[1]))
    ini, resp = run_round(a, b, push=False)
    assert ini.pushed == 0 and resp.pushed == ()
    assert a.seq_of(KEYS[1].node_id) == 1 and b.seq_of(KEYS[0].node_id) is None


ID0 = bytes(KEYS[0].node_id)
FRAMES = st.sampled_from(
    [
        sync.Summary((b"\0" * sync.BUCKET_HASH,) * sync.BUCKETS),
        sync.Entries((), ()),
        sync.Entries(((ID0, 3),), (sync.bucket_of(ID0),)),
        sync.Want(()),
        sync.Want((bytes(KEYS[1].node_id),)),
        sync.Records(()),
        sync.Records((relay_record(seq=1, key=KEYS[2]).encode(),)),
    ]
)


@given(st.lists(FRAMES, max_size=6))
@settings(max_examples=300, deadline=None)
def test_any_frame_order_is_answered_or_rejected_with_a_decode_error(frames):
    """Whatever a peer sends, in whatever order, each machine answers with frames
    or raises DecodeError; after the round, every further frame is rejected."""
    v = MembershipView()
    v.accept(relay_record(seq=2, key=KEYS[0]))
    ini = Initiator(AntiEntropy(v), now=NOW)
    ini.start()
    resp = Responder(AntiEntropy(v))
    for machine in (ini, resp):
        for f in frames:
            try:
                out = machine.receive(f)
            except DecodeError:
                break
            assert all(
                isinstance(x, sync.Summary | sync.Entries | sync.Want | sync.Records) for x in out
            )
    for machine in (ini, resp):
        if machine.done:
            with pytest.raises(DecodeError):
                machine.receive(sync.Want(()))


def test_the_initiator_rejects_frames_out_of_order():
    ini = Initiator(AntiEntropy(MembershipView()))
    ini.start()
    for bad in (sync.Summary((b"\0" * 8,) * 64), sync.Want(()), sync.Records(())):
        with pytest.raises(DecodeError):
            Initiator(AntiEntropy(MembershipView())).receive(bad)  # before start
        with pytest.raises(DecodeError):
            ini.receive(bad)
    with pytest.raises(RuntimeError):
        ini.start()


def test_truncation_is_an_abort_except_where_the_push_may_be_absent():
    v = MembershipView()
    v.accept(relay_record(seq=1, key=KEYS[0]))
    resp = Responder(AntiEntropy(v))
    with pytest.raises(RoundAborted):
        resp.end()  # nothing yet
    resp.receive(Initiator(AntiEntropy(MembershipView())).start())
    with pytest.raises(RoundAborted):
        resp.end()  # after the summary, before the want
    resp.receive(sync.Want(()))
    assert resp.end() == [] and resp.done  # the want, then a close: no push


def test_a_peer_cannot_answer_more_records_than_were_wanted():
    a, b = MembershipView(), MembershipView()
    b.accept(relay_record(seq=1, key=KEYS[0]))
    ini = Initiator(AntiEntropy(a), now=NOW)
    resp = Responder(AntiEntropy(b))
    (entries,) = resp.receive(ini.start())
    (want,) = ini.receive(entries)
    assert len(want.ids) == 1
    extra = sync.Records(tuple(relay_record(seq=1, key=k).encode() for k in KEYS[:3]))
    with pytest.raises(DecodeError):
        ini.receive(extra)


@given(st.lists(st.binary(min_size=8, max_size=8), min_size=64, max_size=64))
@settings(max_examples=50, deadline=None)
def test_a_lying_summary_gets_only_real_entries_within_the_cap(hashes):
    v = MembershipView()
    for k in KEYS:
        v.accept(relay_record(seq=1, key=k))
    resp = Responder(AntiEntropy(v))
    (entries,) = resp.receive(sync.Summary(tuple(hashes)))
    assert len(entries.entries) <= sync.MAX_ENTRIES
    assert set(entries.entries) <= set(v.digest())
    # whatever it then wants, it gets at most the records it named that we hold
    (recs,) = resp.receive(sync.Want(tuple(bytes(k.node_id) for k in KEYS[:3]) + (b"x" * 32,)))
    assert len(recs.records) == 3
