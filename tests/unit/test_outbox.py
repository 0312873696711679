"""overlay.core.outbox (sans-I/O, fake clock) and overlay.storage.outbox (SQLite)."""

import os
import random
import stat

import pytest

from overlay.core.outbox import Attempt, Entry, Finished, Outbox, Persist, State
from overlay.crypto import SigningKey
from overlay.errors import LocalError
from overlay.storage.outbox import KIND_FINAL, KIND_QUEUED, OutboxStore, StoredSurb
from overlay.wire.delivery import AckStatus

N = [SigningKey(bytes([i + 1]) * 32).node_id for i in range(10)]
ENTRY, R1, R2, R3, X1, X2, X3 = N[0], N[1], N[2], N[3], N[7], N[8], N[9]
MID = b"m" * 16
DEST = "smtp:alice@example.org"


def attempts(decisions):
    return [d for d in decisions if isinstance(d, Attempt)]


def persisted(decisions):
    return [d.entry for d in decisions if isinstance(d, Persist)]


def finished(decisions):
    return [d for d in decisions if isinstance(d, Finished)]


def test_first_attempt_at_once_then_resend_after_timeout():
    ob = Outbox(timeout=3.0, backoff=2.0, max_timeout=10.0, same_exit_attempts=2)
    out = ob.add(MID, DEST, b"hi", now=100.0)
    assert persisted(out)[0].state is State.PENDING
    (a,) = attempts(out)
    assert a.message_id == MID and a.exit_hint is None and not a.refresh
    ob.sent(MID, [ENTRY, R1, X1], X1, now=100.0)
    assert ob.get(MID).next_at == 103.0 and ob.get(MID).in_flight
    assert ob.tick(102.9) == []
    (a,) = attempts(ob.tick(103.0))
    # same exit once more, through other relays
    assert a.exit_hint == X1 and R1 in a.avoid and X1 not in a.avoid
    ob.sent(MID, [ENTRY, R2, X1], X1, now=103.0)
    assert ob.get(MID).next_at == 103.0 + 6.0  # backoff
    (a,) = attempts(ob.tick(109.0))
    # two unanswered attempts through X1: another exit now
    assert a.exit_hint is None and {X1, R1, R2} <= a.avoid
    assert ob.get(MID).exits_failed == (X1,)
    ob.sent(MID, [ENTRY, R3, X2], X2, now=109.0)
    assert ob.get(MID).next_at == 119.0  # capped at max_timeout
    assert ob.get(MID).attempts == 3


def test_timeouts_grow_and_cap():
    ob = Outbox(timeout=3.0, backoff=1.5, max_timeout=30.0)
    assert [round(ob.timeout_for(n), 2) for n in (1, 2, 3, 4)] == [3.0, 4.5, 6.75, 10.12]
    assert ob.timeout_for(20) == 30.0
    with pytest.raises(LocalError):
        Outbox(timeout=0)


def test_timeout_adapts_to_slow_acks_karn_style():
    ob = Outbox(timeout=1.0, backoff=2.0, max_timeout=30.0)
    assert ob.rto() == 1.0
    for i in range(8):  # acks after 2 s, each on the first attempt
        mid = bytes([i]) * 16
        ob.add(mid, DEST, b"x", now=10.0 * i)
        ob.sent(mid, [ENTRY, R1, X1], X1, now=10.0 * i)
        ob.on_ack(mid, AckStatus.QUEUED, "", X1, now=10.0 * i + 2.0)
    assert 2.0 <= ob.rto() < 4.0 and ob.timeout_for(2) == 2 * ob.rto()
    # an ack after a resend is ambiguous and is not sampled
    before = (ob.srtt, ob.rttvar)
    ob.add(MID, DEST, b"x", now=100.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=100.0)
    ob.tick(100.0 + ob.rto())
    ob.sent(MID, [ENTRY, R2, X1], X1, now=104.0)
    ob.on_ack(MID, AckStatus.QUEUED, "", X1, now=125.0)
    assert (ob.srtt, ob.rttvar) == before


def test_only_new_messages_are_saved_durably():
    ob = Outbox()
    out = ob.add(MID, DEST, b"hi", now=0.0)
    assert [p.durable for p in out if isinstance(p, Persist)] == [True, False]
    out = ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    assert [p.durable for p in out if isinstance(p, Persist)] == [False]


def test_queued_then_delivered():
    ob = Outbox(timeout=3.0, queued_refresh=60.0, queued_refresh_max=100.0)
    ob.add(MID, DEST, b"hi", now=0.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    out = ob.on_ack(MID, AckStatus.QUEUED, "", X1, now=0.5)
    e = persisted(out)[0]
    assert e.state is State.QUEUED and e.queued_at == X1 and not e.in_flight
    # no resend while the exit that holds it is live, however long it takes
    assert attempts(ob.tick(30.0, live={ENTRY, R1, X1})) == []
    # a periodic refresh goes to the same exit
    (a,) = attempts(ob.tick(60.5, live={ENTRY, R1, X1}))
    assert a.refresh and a.exit_hint == X1
    ob.sent(MID, [ENTRY, R2, X1], X1, now=60.5)
    assert ob.get(MID).state is State.QUEUED
    assert ob.get(MID).next_at == 60.5 + 100.0  # doubled, capped
    out = ob.on_ack(MID, AckStatus.DELIVERED, "", X1, now=70.0)
    assert finished(out) == [Finished(MID, State.DELIVERED, "delivered")]
    assert ob.get(MID).state is State.DELIVERED
    assert ob.tick(1000.0) == []
    # late acks change nothing
    assert ob.on_ack(MID, AckStatus.QUEUED, "", X2, now=1001.0) == []
    assert ob.on_ack(b"?" * 16, AckStatus.DELIVERED, "", X2, now=1001.0) == []


def test_queued_exit_leaving_the_membership_means_resend_elsewhere():
    ob = Outbox()
    ob.add(MID, DEST, b"hi", now=0.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    ob.on_ack(MID, AckStatus.QUEUED, "", X1, now=0.2)
    out = ob.tick(5.0, live={ENTRY, R1, R2, X2})
    (a,) = attempts(out)
    assert a.exit_hint is None and X1 in a.avoid
    e = ob.get(MID)
    assert e.state is State.PENDING and e.exits_failed == (X1,)
    ob.sent(MID, [ENTRY, R2, X2], X2, now=5.0)
    out = ob.on_ack(MID, AckStatus.DELIVERED, "", X2, now=5.5)
    assert finished(out)[0].state is State.DELIVERED


def test_delivered_ack_without_queued_first():
    ob = Outbox()
    ob.add(MID, DEST, b"hi", now=0.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    assert finished(ob.on_ack(MID, AckStatus.DELIVERED, "", X1, 1.0))[0].state is State.DELIVERED


def test_rejections():
    ob = Outbox()
    ob.add(MID, DEST, b"hi", now=0.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    out = ob.on_ack(MID, AckStatus.REJECTED, "not_exit", X1, now=0.3)
    assert finished(out) == [] and ob.get(MID).exits_failed == (X1,)
    (a,) = attempts(ob.tick(0.3))
    assert a.exit_hint is None and X1 in a.avoid
    ob.sent(MID, [ENTRY, R1, X2], X2, now=0.3)
    out = ob.on_ack(MID, AckStatus.REJECTED, "queue_full: 4096 messages pending", X2, now=0.4)
    assert finished(out) == [] and set(ob.get(MID).exits_failed) == {X1, X2}
    ob.tick(0.4)
    ob.sent(MID, [ENTRY, R1, X3], X3, now=0.4)
    out = ob.on_ack(MID, AckStatus.REJECTED, "smtp_550: no such user", X3, now=0.5)
    assert finished(out) == [Finished(MID, State.FAILED, "smtp_550: no such user")]


def test_exit_that_left_is_not_hinted():
    ob = Outbox(timeout=1.0)
    ob.add(MID, DEST, b"hi", now=0.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    (a,) = attempts(ob.tick(1.0, live={ENTRY, R1, R2, X2}))
    assert a.exit_hint is None and X1 in a.avoid


def test_in_flight_attempt_to_an_exit_that_dies_is_resent_at_once():
    ob = Outbox(timeout=3.0)
    ob.add(MID, DEST, b"hi", now=0.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    assert attempts(ob.tick(0.5, live={ENTRY, R1, X1, X2})) == []
    (a,) = attempts(ob.tick(0.6, live={ENTRY, R1, X2}))  # X1 declared dead
    assert a.exit_hint is None and X1 in a.avoid and X1 in ob.get(MID).exits_failed


def test_suspects_are_avoided_by_other_messages_and_forgiven():
    ob = Outbox(timeout=1.0, suspect_for=10.0)
    ob.add(MID, DEST, b"a", now=0.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    ob.tick(1.0)  # times out: R1 and X1 suspected (the entry never is)
    (a,) = attempts(ob.add(b"n" * 16, DEST, b"b", now=2.0))
    assert {R1, X1} <= a.avoid and ENTRY not in a.avoid
    (a,) = attempts(ob.add(b"o" * 16, DEST, b"c", now=11.5))
    assert not a.avoid
    # an ack from an exit clears its suspicion at once
    ob.sent(b"n" * 16, [ENTRY, R2, X2], X2, now=2.0)
    ob.tick(3.0)
    assert X2 in ob.avoid_now(3.0)
    ob.on_ack(b"n" * 16, AckStatus.QUEUED, "", X2, now=3.1)
    assert X2 not in ob.avoid_now(3.1)


def test_send_failed_retries_soon_and_old_messages_fail():
    ob = Outbox(retry_soon=0.5, max_age=100.0)
    ob.add(MID, DEST, b"hi", now=0.0)
    ob.send_failed(MID, "no path: no_exit", now=0.0)
    e = ob.get(MID)
    assert e.attempts == 0 and e.next_at == 0.5 and e.reason.startswith("no path")
    assert len(attempts(ob.tick(0.5))) == 1
    out = ob.tick(100.5)
    assert finished(out) == [Finished(MID, State.FAILED, "expired")]


def test_retry_waiting_makes_only_failed_sends_due_at_once():
    ob = Outbox(retry_soon=5.0)
    other = b"o" * 16
    ob.add(MID, DEST, b"no exit yet", now=0.0)
    ob.send_failed(MID, "no path: no_exit", now=0.0)
    ob.add(other, DEST, b"in flight", now=0.0)
    ob.sent(other, [ENTRY, R1, X1], X1, now=0.0)
    assert attempts(ob.tick(1.0)) == []
    ob.retry_waiting(1.0)  # a new exit appeared in the membership
    (a,) = attempts(ob.tick(1.0))
    assert a.message_id == MID  # the in-flight one keeps its timeout
    assert ob.get(other).in_flight and ob.get(other).next_at > 1.0


def test_persisted_entries_are_copies_and_ids_unique():
    ob = Outbox()
    e = persisted(ob.add(MID, DEST, b"hi", now=0.0))[0]
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    assert e.attempts == 0 and ob.get(MID).attempts == 1
    with pytest.raises(LocalError):
        ob.add(MID, DEST, b"again", now=1.0)


def test_restart_resumes_an_attempt_in_flight():
    ob = Outbox(timeout=2.0)
    ob.add(MID, DEST, b"hi", now=0.0)
    (e,) = persisted(ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0))
    again = Outbox(timeout=2.0)
    again.load([e])
    assert attempts(again.tick(1.0)) == []
    (a,) = attempts(again.tick(2.0))
    assert a.exit_hint == X1


def test_simulated_lossy_network_delivers_everything_once_per_exit():
    """Wire the core to a fake overlay: 30% of packets and 30% of acks are lost,
    exit X1 is dead. Every message ends DELIVERED; each live exit delivers an id once."""
    rng = random.Random(7)
    ob = Outbox(timeout=1.0, backoff=1.5, max_timeout=4.0, queued_refresh=2.0)
    exits = {X1: None, X2: set(), X3: set()}  # X1 dead; others remember delivered ids
    mids = [bytes([i]) * 16 for i in range(40)]
    now = 0.0
    pending: list[tuple[float, bytes, AckStatus, object]] = []  # acks in transit
    for m in mids:
        for d in ob.add(m, DEST, b"x", now):
            if isinstance(d, Attempt):
                pending += _fake_send(ob, d, now, rng, exits)
    while now < 200 and ob.unfinished():
        now += 0.1
        due = [p for p in pending if p[0] <= now]
        pending = [p for p in pending if p[0] > now]
        for _, m, status, ex in due:
            ob.on_ack(m, status, "", ex, now)
        for d in ob.tick(now, live={ENTRY, R1, R2, X1, X2, X3}):
            if isinstance(d, Attempt):
                pending += _fake_send(ob, d, now, rng, exits)
    assert not ob.unfinished()
    assert all(ob.get(m).state is State.DELIVERED for m in mids)
    delivered = [m for ex in (X2, X3) for m in exits[ex]]
    assert sorted(set(delivered)) == sorted(mids)


def _fake_send(ob, a, now, rng, exits):
    live_exits = [x for x in (X1, X2, X3) if x not in a.avoid or x == a.exit_hint]
    ex = a.exit_hint or rng.choice(live_exits or [X1, X2, X3])
    ob.sent(a.message_id, [ENTRY, rng.choice([R1, R2]), ex], ex, now)
    if exits[ex] is None or rng.random() < 0.3:  # dead exit, or the packet was lost
        return []
    exits[ex].add(a.message_id)
    acks = []
    for status in (AckStatus.QUEUED, AckStatus.DELIVERED):
        if rng.random() >= 0.3:
            acks.append((now + 0.2, a.message_id, status, ex))
    return acks


# ---- store ----------------------------------------------------------------------------


def test_store_round_trip_and_mode(tmp_path):
    with OutboxStore.in_home(tmp_path / "home") as st:
        ob = Outbox()
        for d in ob.add(MID, DEST, b"body", now=10.0):
            if isinstance(d, Persist):
                st.save(d.entry)
        (e,) = persisted(ob.sent(MID, [ENTRY, R1, X1], X1, now=11.0))
        e.exits_failed = (X2, X3)
        e.avoid = (R2,)
        st.save(e)
        assert st.load() == [e]
        assert st.get(MID) == e
    mode = stat.S_IMODE(os.stat(tmp_path / "home" / "outbox.db").st_mode)
    assert mode == 0o600


def test_store_finished_rows_are_final_and_forget_secrets(tmp_path):
    st = OutboxStore(tmp_path / "o.db")
    e = Entry(MID, DEST, b"body", 1.0)
    st.save(e)
    surbs = [
        StoredSurb(b"a" * 16, MID, KIND_FINAL, X1, ENTRY, 1.0, b"secret-a"),
        StoredSurb(b"b" * 16, MID, KIND_QUEUED, X1, ENTRY, 1.0, b"secret-b"),
    ]
    st.add_surbs(surbs)
    assert st.surb(b"a" * 16) == surbs[0]
    assert [s.surb_id for s in st.surbs_for_entry(ENTRY)] == [b"a" * 16, b"b" * 16]
    st.drop_surb(b"a" * 16)
    assert st.surb(b"a" * 16) is None
    done = Entry(MID, DEST, b"body", 1.0, state=State.DELIVERED, finished_at=5.0)
    st.save(done)
    assert st.surb(b"b" * 16) is None
    # another process with a stale view cannot un-finish it
    st.save(Entry(MID, DEST, b"body", 1.0, state=State.QUEUED, attempts=9))
    got = st.get(MID)
    assert got.state is State.DELIVERED and got.body == b""  # the body is erased
    assert st.load() == [] and len(st.load(unfinished_only=False)) == 1
    assert st.purge(before=6.0) == 1 and st.load(unfinished_only=False) == []
    st.close()


def test_every_exit_left_behind_is_named_to_the_next_one():
    """A resend through another exit names the exits that may still hold a copy
    (``ExitMessage.earlier``), also when path selection, not a timeout, switched."""
    from overlay.client import earlier_exits

    ob = Outbox(timeout=3.0, same_exit_attempts=3)
    ob.add(MID, DEST, b"hi", now=0.0)
    ob.sent(MID, [ENTRY, R1, X1], X1, now=0.0)
    assert earlier_exits(ob.get(MID), X1) == ()
    assert earlier_exits(ob.get(MID), X2) == (bytes(X1),)  # the attempt about to go to X2
    ob.sent(MID, [ENTRY, R2, X2], X2, now=1.0)  # X1 still qualified, yet X2 was chosen
    assert X1 in ob.get(MID).exits_failed
    ob.sent(MID, [ENTRY, R1, X2], X2, now=2.0)  # a plain resend to X2 still names X1
    assert earlier_exits(ob.get(MID), X2) == (bytes(X1),)
    ob.sent(MID, [ENTRY, R1, X3], X3, now=3.0)
    assert earlier_exits(ob.get(MID), N[6]) == (bytes(X1), bytes(X2), bytes(X3))
    ob.sent(MID, [ENTRY, R1, N[6]], N[6], now=4.0)
    assert earlier_exits(ob.get(MID), N[5]) == (bytes(X2), bytes(X3), bytes(N[6]))  # newest 3
