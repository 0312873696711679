"""Liveness core and its wire format.

Multi-node tests wire several ``Liveness`` cores together with no I/O: a
``Net`` routes their ``Send``/``Broadcast`` effects with a fake clock, seeded
loss and latency, and nodes that can be crashed or paused (a paused node
neither ticks nor reads, like SIGSTOP).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.core.effects import Broadcast, Penalize, Send, StateChanged
from overlay.core.liveness import ALIVE, DEAD, SUSPECT, UNKNOWN, Liveness
from overlay.crypto import NodeId, SigningKey
from overlay.errors import DecodeError, LocalError, Reason
from overlay.wire import cbor
from overlay.wire import liveness as wire

KEYS = [SigningKey(hashlib.sha256(b"liveness-node-%d" % i).digest()) for i in range(16)]
IDS = [k.node_id for k in KEYS]


class Net:
    """An in-memory network of Liveness cores driven by a fake clock."""

    def __init__(
        self, n: int, seed: int = 1, latency: float = 0.005, heard: bool = False, **params
    ) -> None:
        self.ids = IDS[:n]
        self.keys = dict(zip(self.ids, KEYS[:n], strict=True))
        self.rng = random.Random(seed)
        # frames delivered to each node from each other node: the transport's
        # count of what it read from a peer (``Liveness(heard=...)``)
        self.rx: dict[tuple[NodeId, NodeId], int] = {}
        self.cores = {
            nid: Liveness(
                nid,
                KEYS[i].sign,
                random.Random(seed * 1000 + i),
                heard=(lambda peer, me=nid: self.rx.get((me, peer))) if heard else None,
                **params,
            )
            for i, nid in enumerate(self.ids)
        }
        for c in self.cores.values():
            c.set_members(self.ids, 0.0)
        self.latency = latency
        self.now = 0.0
        self.queue: list = []
        self.seq = 0
        self.loss: dict[NodeId, float] = {}
        self.down: set[NodeId] = set()  # crashed or paused
        self.slow: dict[NodeId, float] = {}  # extra delay of everything a node sends
        self.partition: list[set[NodeId]] = []  # traffic crosses no group boundary
        self.penalties: list[tuple[NodeId, Penalize]] = []
        self.changes: list[tuple[float, NodeId, NodeId, str]] = []  # (t, observer, node, state)
        self.sent = 0
        self.broadcasts = 0
        self.hooks: list = []  # extra per-step callbacks (attackers)

    # effects -------------------------------------------------------------------
    def dispatch(self, src: NodeId, effects) -> None:
        for e in effects:
            if isinstance(e, Send):
                self._enqueue(src, e.peer, e.frame)
            elif isinstance(e, Broadcast):
                self.broadcasts += 1
                for dst in self.ids:
                    if dst != src:
                        self._enqueue(src, dst, e.data)
            elif isinstance(e, Penalize):
                self.penalties.append((src, e))
            elif isinstance(e, StateChanged):
                self.changes.append((self.now, src, e.node, e.state))

    def _enqueue(self, src: NodeId, dst: NodeId, frame: bytes) -> None:
        if src in self.down:
            return
        if any((src in g) != (dst in g) for g in self.partition):
            return
        self.sent += 1
        p = 1 - (1 - self.loss.get(src, 0.0)) * (1 - self.loss.get(dst, 0.0))
        if p and self.rng.random() < p:
            return
        self.seq += 1
        at = self.now + self.latency * (1 + self.rng.random()) + self.slow.get(src, 0.0)
        heapq.heappush(self.queue, (at, self.seq, src, dst, frame))

    # time ------------------------------------------------------------------------
    def run(self, until: float, step: float | None = None, check_wakeups: bool = False) -> None:
        """Advance to ``until``: in fixed steps, or (step=None) from event to event
        using each core's ``next_wakeup`` — as the simulator will."""
        stuck = 0
        while True:
            if step is not None:
                t = self.now + step
            else:
                t = min(
                    [self.queue[0][0]] if self.queue else [math.inf],
                    default=math.inf,
                )
                for nid, c in self.cores.items():
                    if nid not in self.down:
                        w = c.next_wakeup()
                        t = min(t, self.now if w is None else w)
            if t > until:
                self.now = until
                return
            stuck = stuck + 1 if t <= self.now else 0
            assert stuck < 1000, "next_wakeup does not make progress"
            self.now = max(self.now, t)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, src, dst, frame = heapq.heappop(self.queue)
                if dst not in self.down:
                    self.rx[(dst, src)] = self.rx.get((dst, src), 0) + 1
                    self.dispatch(dst, self.cores[dst].receive(src, frame, self.now))
            for hook in self.hooks:
                hook(self)
            for nid, c in self.cores.items():
                if nid in self.down:
                    continue
                due = c.next_wakeup()
                effects = c.tick(self.now)
                if check_wakeups and due is not None and self.now < due:
                    assert effects == [], "tick before next_wakeup did something"
                self.dispatch(nid, effects)

    # views -----------------------------------------------------------------------
    def state_at(self, observer: NodeId, node: NodeId) -> str:
        return self.cores[observer].state(node)[0]

    def ever(self, node: NodeId, state: str, since: float = 0.0) -> set[NodeId]:
        """Observers that put ``node`` in ``state`` at or after ``since``."""
        return {o for t, o, n, s in self.changes if n == node and s == state and t >= since}

    def first(self, node: NodeId, state: str, observer: NodeId, since: float = 0.0) -> float:
        return min(
            (
                t
                for t, o, n, s in self.changes
                if (o, n, s) == (observer, node, state) and t >= since
            ),
            default=math.inf,
        )


def others(net: Net, node: NodeId) -> list[NodeId]:
    return [n for n in net.ids if n != node]


# -- wire format -----------------------------------------------------------------

A, B, C = IDS[0], IDS[1], IDS[2]
KA, KB = KEYS[0], KEYS[1]
SIGNED = [
    wire.Suspect(A, 3, B, 1234).signed_with(KB.sign),
    wire.Dead(A, 3, B, 1299).signed_with(KB.sign),
    wire.Alive(A, 4, 1300).signed_with(KA.sign),
]
FRAMES = [
    wire.Ping(7),
    wire.Ack(2**64 - 1),
    wire.Nack(3),
    wire.PingReq(C, 0),
    wire.DeadReq(),
    *SIGNED,
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_wire_round_trip(frame):
    raw = wire.encode(frame)
    assert len(raw) <= wire.MAX_SIZE
    assert wire.decode(raw) == frame
    assert wire.encode(wire.decode(raw)) == raw
    if hasattr(frame, "verify"):
        wire.decode(raw).verify()


def test_wire_signatures_are_domain_separated_and_bound_to_signer():
    s = SIGNED[0]
    assert s.signing_input().startswith(wire.SIGN_DOMAIN)
    from overlay.errors import BadSignature

    with pytest.raises(BadSignature):
        wire.Suspect(A, 3, C, 1234, s.signature).verify()  # claims another observer
    with pytest.raises(BadSignature):
        wire.Suspect(A, 4, B, 1234, s.signature).verify()  # another incarnation
    with pytest.raises(BadSignature):
        wire.Dead(A, 3, B, 1234, s.signature).verify()  # same fields, other type


def _raw(frame) -> dict:
    return cbor.loads_canonical(wire.encode(frame), wire.MAX_SIZE)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda m: m.update({0: 2}), Reason.UNKNOWN_VERSION),
        (lambda m: m.update({1: 9}), Reason.MALFORMED),
        (lambda m: m.update({9: 1}), Reason.MALFORMED),  # unknown key
        (lambda m: m.pop(15), Reason.MALFORMED),  # unsigned accusation
        (lambda m: m.update({3: b"x" * 31}), Reason.MALFORMED),
        (lambda m: m.update({4: -1}), Reason.MALFORMED),
        (lambda m: m.update({4: 2**64}), Reason.UNSUPPORTED_TYPE),  # a bignum is a CBOR tag
        (lambda m: m.update({5: bytes(A)}), Reason.MALFORMED),  # self-accusation
        (lambda m: m.update({15: b"s" * 63}), Reason.MALFORMED),
        (lambda m: m.update({2: 1}), Reason.MALFORMED),  # nonce on a suspect
    ],
)
def test_wire_rejects(mutate, reason):
    m = _raw(SIGNED[0])
    mutate(m)
    with pytest.raises(DecodeError) as ei:
        wire.decode(cbor.dumps(m))
    assert ei.value.reason is reason


def test_wire_rejects_non_canonical_oversized_and_non_maps():
    raw = wire.encode(wire.Ping(5))
    # the same map with a non-minimal integer encoding for the nonce
    noncanon = raw[:-1] + b"\x18\x05"
    with pytest.raises(DecodeError) as ei:
        wire.decode(noncanon)
    assert ei.value.reason is Reason.NON_CANONICAL
    with pytest.raises(DecodeError) as ei:
        wire.decode(b"\xa0" + b"\0" * wire.MAX_SIZE)
    assert ei.value.reason is Reason.OVERSIZED
    for bad in (b"", cbor.dumps([0, 0]), cbor.dumps({0: 1}), cbor.dumps({"0": 1, "1": 0})):
        with pytest.raises(DecodeError):
            wire.decode(bad)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_wire_decode_arbitrary_bytes_raises_only_decode_error(data):
    try:
        f = wire.decode(data)
    except DecodeError:
        return
    assert wire.encode(f) == data


@given(st.sampled_from([wire.encode(f) for f in FRAMES]), st.data())
@settings(max_examples=300, deadline=None)
def test_wire_mutations_give_a_frame_or_decode_error(raw, data):
    pos = data.draw(st.integers(0, len(raw) - 1))
    delta = data.draw(st.integers(1, 255))
    buf = bytearray(raw)
    buf[pos] = (buf[pos] + delta) % 256
    try:
        f = wire.decode(bytes(buf))
    except DecodeError:
        return
    assert wire.encode(f) == bytes(buf)


# -- one core, by hand -----------------------------------------------------------


def core(i: int = 0, n: int = 6, now: float = 0.0, **kw) -> Liveness:
    c = Liveness(IDS[i], KEYS[i].sign, random.Random(i), **kw)
    c.set_members(IDS[:n], now)
    return c


def sends(effects, kind=None):
    out = [(e.peer, wire.decode(e.frame)) for e in effects if isinstance(e, Send)]
    return [x for x in out if kind is None or isinstance(x[1], kind)]


def suspect(subject, observer, inc=0, ts=1, key=None) -> bytes:
    key = key or KEYS[IDS.index(observer)]
    return wire.encode(wire.Suspect(subject, inc, observer, ts).signed_with(key.sign))


def dead(subject, observer, inc=0, ts=1) -> bytes:
    key = KEYS[IDS.index(observer)]
    return wire.encode(wire.Dead(subject, inc, observer, ts).signed_with(key.sign))


def alive(subject, inc, ts=1) -> bytes:
    return wire.encode(wire.Alive(subject, inc, ts).signed_with(KEYS[IDS.index(subject)].sign))


def test_parameters_are_checked():
    with pytest.raises(LocalError):
        core(probe_interval=0.5, probe_timeout=0.5)
    with pytest.raises(LocalError):
        core(suspicion_min=5.0, suspicion_max=4.0)
    with pytest.raises(LocalError):
        core(confirmations_needed=0)
    with pytest.raises(LocalError):
        core(probe_interval=1.0, probe_timeout=0.5, calm_interval=0.5)


def test_ping_is_acked_and_unknown_nodes_are_unknown():
    c = core()
    out = c.receive(B, wire.encode(wire.Ping(99)), 1.0)
    # a fresh core also asks the first members that prove alive what they hold dead
    assert sends(out) == [(B, wire.Ack(99)), (B, wire.DeadReq())]
    assert sends(c.receive(B, wire.encode(wire.Ping(98)), 1.1)) == [(B, wire.Ack(98))]
    assert c.state(B) == (ALIVE, 0.0)
    assert c.state(IDS[10]) == (UNKNOWN, 0.0)
    assert set(c.view()) == set(IDS[1:6])
    assert c.receive(A, wire.encode(wire.Ping(1)), 1.0) == []  # from ourselves: ignored


def test_probe_round_robin_visits_every_member_once_per_round():
    c = core(n=6)
    targets = []
    t = 0.0
    while len(targets) < 10:
        for peer, f in sends(c.tick(t), wire.Ping):
            targets.append(peer)
            c.receive(peer, wire.encode(wire.Ack(f.nonce)), t + 0.01)
        t += 0.05
    assert sorted(targets[:5]) == sorted(IDS[1:6])
    assert sorted(targets[5:10]) == sorted(IDS[1:6])


def _pings_until(c, until: float, answer=lambda peer: True, t: float = 0.0):
    """Tick ``c`` every 0.05 s up to ``until``; (time, target) of every Ping."""
    out = []
    while t < until:
        for peer, f in sends(c.tick(t), wire.Ping):
            out.append((t, peer))
            if answer(peer):
                c.receive(peer, wire.encode(wire.Ack(f.nonce)), t + 0.01)
        t += 0.05
    return out


def test_calm_turns_probe_plain_members_once_per_calm_interval_in_rounds():
    c = core(n=6, probe_interval=0.5, probe_timeout=0.25, calm_interval=5.0)
    pings = _pings_until(c, 100.0)
    # one calm turn per 5 s (the first within the first 5 s) instead of one per 0.5 s
    assert 19 <= len(pings) <= 20
    targets = [p for _, p in pings]
    for k in range(0, 15, 5):  # still a round-robin: each member once per round
        assert sorted(targets[k : k + 5]) == sorted(IDS[1:6])
    gaps = [b - a for (a, _), (b, _) in zip(pings, pings[1:], strict=False)]
    assert min(gaps) > 4.9


def test_critical_members_keep_the_full_rate_beside_calm_turns():
    c = core(n=6, probe_interval=0.5, probe_timeout=0.25, calm_interval=5.0)
    c.set_critical({B, C})
    pings = _pings_until(c, 50.0)
    to = {n: sum(1 for _, p in pings if p == n) for n in IDS[1:6]}
    assert to[B] + to[C] >= 95  # one per 0.5 s period, alternating between the two
    assert abs(to[B] - to[C]) <= 1
    assert sum(to[n] for n in IDS[3:6]) <= 10  # one per 5 s
    assert all(to[n] >= 3 for n in IDS[3:6])
    # calm off (None): every member at the full rate, as without ``set_critical``
    d = core(n=6, probe_interval=0.5, probe_timeout=0.25)
    d.set_critical({B, C})
    assert len(_pings_until(d, 10.0)) >= 19


def test_a_calm_member_that_fails_a_probe_goes_back_to_the_full_rate():
    c = core(n=6, probe_interval=0.5, probe_timeout=0.25, calm_interval=5.0)
    silent = IDS[3]
    pings = _pings_until(c, 30.0, answer=lambda peer: peer != silent)
    first = next(t for t, p in pings if p == silent)
    assert c.state(silent)[0] in (SUSPECT, DEAD)
    # after its failed calm turn it is looked at every period, not every 5 s
    again = [t for t, p in pings if p == silent and t > first]
    assert again and again[0] - first < 2.0
    # and a lone accusation of a calm member is checked at once, as before
    out = c.receive(B, suspect(IDS[4], B), 30.0)
    assert IDS[4] in [p for p, _ in sends(out, wire.Ping)]


def test_near_members_only_are_probed_in_the_round_robin_and_relay_for_us():
    c = core(n=8, verify_fanout=16)
    near = set(IDS[1:5])
    c.set_near(near)
    targets, relays, t = [], set(), 0.0
    while len(targets) < 8:
        out = c.tick(t)
        relays |= {p for p, _ in sends(out, wire.PingReq)}
        for peer, f in sends(out, wire.Ping):
            targets.append(peer)
            if len(targets) > 1:  # the first probe goes unanswered, so it goes indirect
                c.receive(peer, wire.encode(wire.Ack(f.nonce)), t + 0.01)
        t += 0.05
    assert set(targets) == near  # the far members are not probed routinely...
    assert relays == near - {targets[0]}  # ...nor asked to relay
    # ...but a lone accusation of a far member is still checked by us
    far = IDS[6]
    out = c.receive(B, suspect(far, B), t)
    assert far in [p for p, _ in sends(out, wire.Ping)]
    c.set_near(None)  # back to every member
    seen, t = set(), t + 60.0
    while len(seen) < 7 and t < 200.0:
        for peer, f in sends(c.tick(t), wire.Ping):
            seen.add(peer)
            c.receive(peer, wire.encode(wire.Ack(f.nonce)), t + 0.01)
        t += 0.05
    assert seen == set(IDS[1:8])


def test_failed_probe_goes_indirect_then_suspects_and_broadcasts_signed():
    c = core(n=6)
    out = c.tick(0.0)
    t = c.next_wakeup()
    out = c.tick(t)
    [(target, ping)] = sends(out, wire.Ping)
    out = c.tick(t + c.probe_timeout)
    reqs = sends(out, wire.PingReq)
    assert len(reqs) == 3 and {p for p, _ in reqs}.isdisjoint({target, A})
    assert all(f == wire.PingReq(target, ping.nonce) for _, f in reqs)
    out = c.tick(t + c.probe_interval)
    assert StateChanged(target, SUSPECT, t + c.probe_interval) in out
    [bc] = [e for e in out if isinstance(e, Broadcast)]
    s = wire.decode(bc.data)
    assert isinstance(s, wire.Suspect) and (s.subject, s.observer) == (target, A)
    s.verify()
    assert (target, s) in sends(out)  # the suspect itself is told, so it can refute
    assert c.state(target)[0] == SUSPECT
    assert c.health == 1  # Lifeguard: a failed probe makes us slower


def suspected_by_our_probe():
    """A core whose first probe went unanswered: its target is SUSPECT on our own
    word, and our health is 1. Returns the core, the probe's start, the target
    and the Ping."""
    c = core(n=6)
    c.tick(0.0)
    t = c.next_wakeup()
    [(target, ping)] = sends(c.tick(t), wire.Ping)
    c.tick(t + c.probe_timeout)
    c.tick(t + c.probe_interval)
    assert c.state(target)[0] == SUSPECT and c.health == 1
    return c, t, target, ping


def test_our_accusation_refuted_stretches_our_timing():
    """An Alive clearing a member we accused ourselves says we were wrong: our
    local health worsens (longer timeouts); one clearing others' word does not."""
    c, t, target, _ = suspected_by_our_probe()
    out = c.receive(B if target != B else C, alive(target, 1), t + c.probe_interval + 0.1)
    assert StateChanged(target, ALIVE, t + c.probe_interval + 0.1) in out
    assert c.health == 2
    o = core(i=3, n=6, verify_fanout=0)
    o.receive(B, suspect(C, B), 1.0)
    o.receive(IDS[4], suspect(C, IDS[4]), 1.0)
    assert o.state(C)[0] == SUSPECT
    o.receive(B, alive(C, 1), 1.1)
    assert o.state(C)[0] == ALIVE and o.health == 0


def test_relayed_ack_counts_and_relay_forwards():
    c = core(n=6)
    c.tick(0.0)
    t = c.next_wakeup()
    out = c.tick(t)
    [(target, ping)] = sends(out, wire.Ping)
    assert all(e.urgent for e in out if isinstance(e, Send))  # our probe's ping
    reqs = sends(c.tick(t + c.probe_timeout), wire.PingReq)
    relay = reqs[0][0]
    # an ack for the nonce from a node we did not ask is ignored
    stranger = next(n for n in IDS[1:6] if n not in {target} | {p for p, _ in reqs})
    c.receive(stranger, wire.encode(wire.Ack(ping.nonce)), t + 0.3)
    c.receive(relay, wire.encode(wire.Ack(ping.nonce)), t + 0.3)
    out = c.tick(t + c.probe_interval)
    assert c.state(target)[0] == ALIVE and not [e for e in out if isinstance(e, Broadcast)]

    # the relay side: ping the target with our own nonce, forward its ack
    r = core(i=1, n=6)
    out = r.receive(A, wire.encode(wire.PingReq(C, 1234)), 1.0)
    [(peer, p)] = sends(out)
    assert peer == C and isinstance(p, wire.Ping)
    # a ping asked for by another is not urgent (it must not dial past back-offs)
    assert [e.urgent for e in out if isinstance(e, Send)] == [False]
    assert r.receive(B, wire.encode(wire.Ack(p.nonce)), 1.1) == []  # wrong responder
    assert sends(r.receive(C, wire.encode(wire.Ack(p.nonce)), 1.1)) == [(A, wire.Ack(1234))]
    # no answer from the target within 0.8 x probe_timeout: the relay says so
    r.tick(1.95)
    r.receive(A, wire.encode(wire.PingReq(IDS[4], 77)), 2.0)
    assert r.next_wakeup() <= 2.0 + 0.8 * r.probe_timeout
    assert sends(r.tick(2.0 + 0.8 * r.probe_timeout), wire.Nack) == [(A, wire.Nack(77))]
    # ping-req about the relay itself or the requester is ignored
    assert sends(r.receive(A, wire.encode(wire.PingReq(B, 1)), 1.2)) == []
    assert sends(r.receive(A, wire.encode(wire.PingReq(A, 1)), 1.2)) == []


def test_lone_accusation_is_not_believed_but_checked():
    c = core(n=6)
    out = c.receive(B, suspect(C, B), 1.0)
    assert c.state(C)[0] == ALIVE
    pings = sends(out, wire.Ping)
    assert [p for p, _ in pings] == [C]  # we go and look ourselves
    assert sends(out, wire.Suspect) == [(C, wire.decode(suspect(C, B)))]  # and tell C
    # C answers: direct evidence clears the accusation
    c.receive(C, wire.encode(wire.Ack(pings[0][1].nonce)), 1.05)
    # the same observer again, however often, is still one observer
    for ts in range(2, 6):
        c.receive(B, suspect(C, B, ts=ts), 1.1 + ts / 100)
        c.receive(B, dead(C, B, ts=ts), 1.1 + ts / 100)
    c.tick(1.2)
    assert c.state(C)[0] == ALIVE


def test_confirmations_from_distinct_observers_make_suspect_then_dead():
    c = core(n=6, verify_fanout=0)  # no verification probes: isolate the timer logic
    c.receive(B, suspect(IDS[5], B), 1.0)
    assert c.state(IDS[5])[0] == ALIVE
    out = c.receive(C, suspect(IDS[5], C), 1.2)
    assert StateChanged(IDS[5], SUSPECT, 1.2) in out
    timeout = c.suspicion_timeout(1)
    assert c.suspicion_max > timeout > c.suspicion_min
    c.tick(1.2 + c.suspicion_timeout(2) + 0.001)
    assert c.state(IDS[5])[0] == SUSPECT  # two observers: the longer timeout runs
    # a third observer shrinks the timeout (Lifeguard), so death comes sooner
    c.receive(IDS[3], suspect(IDS[5], IDS[3]), 1.2 + c.suspicion_timeout(2) + 0.002)
    assert c.state(IDS[5])[0] == DEAD  # its deadline had passed: dead on arrival
    assert c.state(IDS[5])[1] == 1.2 + c.suspicion_timeout(2) + 0.002
    # dead members are probed only once per dead_reprobe, and only directly
    t, pings = 5.0, []
    while t < 5.0 + 2 * c.dead_reprobe:
        out = c.tick(t)
        for peer, f in sends(out, wire.Ping):
            if peer == IDS[5]:
                pings.append(t)
            else:  # the living answer
                c.receive(peer, wire.encode(wire.Ack(f.nonce)), t)
        assert IDS[5] not in [f.target for _, f in sends(out, wire.PingReq)]
        t += 0.05
    assert len(pings) >= 2
    assert all(b - a >= c.dead_reprobe for a, b in zip(pings, pings[1:], strict=False))
    assert c.state(IDS[5])[0] == DEAD  # unanswered looks at the dead accuse nobody


@pytest.mark.parametrize("answers", [True, False])
def test_old_statements_make_us_look_before_we_declare(answers):
    """Statements already older than accusation_ttl when they reach us (a dead-sync
    answer after our own cut: the accused may have come back and refuted where
    we could not hear it) count toward DEAD only with a failure we saw ourselves
    after they arrived; fresh ones still kill on the others' word (test above)."""
    c = core(n=6, verify_fanout=0)
    x, now = IDS[5], 100.0
    old = wire.ts_of(now - 60.0)  # signed a minute ago
    c.receive(B, dead(x, B, ts=old), now)
    c.receive(C, dead(x, C, ts=old), now)
    assert c.state(x)[0] == SUSPECT  # enough signers to suspect at once
    t, probed = now, []
    while t < now + 3 * c.suspicion_max:
        for peer, f in sends(c.tick(t), wire.Ping):
            if peer != x:
                c.receive(peer, wire.encode(wire.Ack(f.nonce)), t)  # the others are fine
            else:
                probed.append(t)
                if answers:
                    c.receive(x, wire.encode(wire.Ack(f.nonce)), t + 0.01)
        t += 0.05
    assert probed and probed[0] < now + c.suspicion_max  # looked itself, early
    assert c.stale_checks >= 1
    if answers:
        assert c.state(x)[0] == ALIVE  # it answered: the old statements are history
    else:
        state, since = c.state(x)
        assert state == DEAD and since > probed[0]  # dead only after its own probe failed


def test_suspicion_timeout_shrinks_from_max_to_min():
    c = core()
    values = [c.suspicion_timeout(n) for n in range(6)]
    assert values[0] == c.suspicion_max
    assert values == sorted(values, reverse=True)
    assert values[3] == values[5] == c.suspicion_min


def test_alive_with_higher_incarnation_clears_and_stale_accusations_are_ignored():
    c = core(n=6, verify_fanout=0)
    c.receive(B, suspect(IDS[4], B), 1.0)
    c.receive(C, suspect(IDS[4], C), 1.0)
    assert c.state(IDS[4])[0] == SUSPECT
    out = c.receive(B, alive(IDS[4], 1), 1.1)  # forwarded by B: signed by IDS[4]
    assert StateChanged(IDS[4], ALIVE, 1.1) in out
    # accusations against the refuted incarnation are stale
    c.receive(B, suspect(IDS[4], B, inc=0, ts=9), 1.2)
    c.receive(C, suspect(IDS[4], C, inc=0, ts=9), 1.2)
    assert c.state(IDS[4])[0] == ALIVE
    # an older Alive changes nothing
    assert c.receive(B, alive(IDS[4], 1, ts=2), 1.3) == []
    # accusations above the known incarnation count against the known one,
    # so a refutation at known+1 still clears them
    c.receive(B, suspect(IDS[4], B, inc=2**64 - 1, ts=10), 1.4)
    c.receive(C, suspect(IDS[4], C, inc=2**64 - 1, ts=10), 1.4)
    assert c.state(IDS[4])[0] == SUSPECT
    c.receive(B, alive(IDS[4], 2), 1.5)
    assert c.state(IDS[4])[0] == ALIVE


def test_accusation_about_self_is_refuted_once_per_interval():
    c = core(n=6)
    out = c.receive(B, suspect(A, B, inc=0), 1.0)
    [bc] = [e for e in out if isinstance(e, Broadcast)]
    a = wire.decode(bc.data)
    assert a == wire.Alive(A, 1, a.ts, a.signature) and c.incarnation == 1
    a.verify()
    # a stale accusation right after a refutation waits for the rate limit
    assert c.receive(B, suspect(A, B, inc=0, ts=2), 1.1) == []
    # a spammer at the current incarnation gets one refutation per probe interval
    out = c.receive(C, suspect(A, C, inc=1, ts=3), 1.1)
    assert not [e for e in out if isinstance(e, Broadcast)]
    out = c.tick(1.0 + c.probe_interval)
    assert [wire.decode(e.data).incarnation for e in out if isinstance(e, Broadcast)] == [2]
    # a restarted node that forgot its incarnation jumps above what others know
    out = c.receive(B, dead(A, B, inc=41, ts=4), 3.0)
    assert c.incarnation == 42
    # a forged huge incarnation cannot exhaust the space in one step
    c.receive(B, suspect(A, B, inc=2**64 - 1, ts=5), 9.0)
    assert c.incarnation == 42 + 2**32 + 1


def test_an_accusation_below_our_incarnation_is_answered_with_the_one_we_hold():
    """A real node starts at its clock in ms, which the others learn only from an
    Alive: they accuse incarnation 0. The accused answers with the incarnation it
    holds (no new one, no health), at most once per probe interval, and the
    observers that counted the accusation clear it."""
    start = 1_765_000_000_000
    c = core(n=6, incarnation=start)
    out = c.receive(B, suspect(A, B, inc=0), 1.0)
    [bc] = [e for e in out if isinstance(e, Broadcast)]
    a = wire.decode(bc.data)
    assert (a.subject, a.incarnation) == (A, start) and c.incarnation == start
    assert c.health == 0
    # old accusations still travelling (or replayed) do not make it flood: the
    # incarnation it holds is said again once per accusation_ttl
    for t in (1.2, 1.0 + c.probe_interval, 1.0 + c.accusation_ttl - 0.1):
        out = c.receive(C, suspect(A, C, inc=0, ts=int(t * 10)), t)
        assert not [e for e in out if isinstance(e, Broadcast)]
        assert not [e for e in c.tick(t) if isinstance(e, Broadcast)]
    out = c.receive(C, suspect(A, C, inc=0, ts=99), 1.0 + c.accusation_ttl)
    assert [wire.decode(e.data).incarnation for e in out if isinstance(e, Broadcast)] == [start]
    # an accusation at the incarnation it holds is refuted with a new one, at once
    health = c.health
    out = c.receive(B, suspect(A, B, inc=start, ts=100), 1.0 + c.accusation_ttl + c.probe_interval)
    assert [wire.decode(e.data).incarnation for e in out if isinstance(e, Broadcast)] == [start + 1]
    assert c.health == health + 1
    # an observer that holds A suspect at the incarnation it knew (0) clears on it
    o = core(i=3, n=6, verify_fanout=0)
    o.receive(B, suspect(A, B, inc=0), 1.0)
    o.receive(C, suspect(A, C, inc=0), 1.0)
    assert o.state(A)[0] == SUSPECT
    out = o.receive(B, bc.data, 1.1)
    assert StateChanged(A, ALIVE, 1.1) in out
    # the incarnation it now knows makes the old accusations stale there
    o.receive(B, suspect(A, B, inc=0, ts=5), 1.2)
    o.receive(C, suspect(A, C, inc=0, ts=5), 1.2)
    assert o.state(A)[0] == ALIVE


def test_forged_signatures_are_penalized_and_ignored():
    c = core(n=6, verify_fanout=0)
    forged = suspect(IDS[4], B, key=KEYS[2])  # C signs a statement in B's name
    assert c.receive(C, forged, 1.0) == [Penalize(C, Reason.BAD_SIGNATURE)]
    forged2 = suspect(IDS[4], IDS[3], key=KEYS[2])
    assert c.receive(C, forged2, 1.0) == [Penalize(C, Reason.BAD_SIGNATURE)]
    assert c.state(IDS[4])[0] == ALIVE  # two forged "observers" did not count
    bad_alive = wire.encode(wire.Alive(IDS[4], 5, 1).signed_with(KEYS[3].sign))
    assert c.receive(B, bad_alive, 1.0) == [Penalize(B, Reason.BAD_SIGNATURE)]
    about_me = suspect(A, B, key=KEYS[3])
    assert c.receive(B, about_me, 1.0) == [Penalize(B, Reason.BAD_SIGNATURE)]
    assert c.incarnation == 0  # no refutation for a forgery


def test_accusations_from_unknown_observers_do_not_count():
    c = core(n=4, verify_fanout=0)  # members 1..3; 10 and 11 hold no record
    c.receive(B, suspect(C, IDS[10]), 1.0)
    c.receive(B, suspect(C, IDS[11]), 1.0)
    assert c.state(C)[0] == ALIVE
    known = {IDS[10], IDS[11]}
    c2 = Liveness(A, KA.sign, random.Random(0), verify_fanout=0, is_known=known.__contains__)
    c2.set_members(IDS[:4], 0.0)
    c2.receive(B, suspect(C, IDS[10]), 1.0)
    c2.receive(B, suspect(C, IDS[11]), 1.0)
    assert c2.state(C)[0] == SUSPECT


def test_ping_from_a_dead_node_revives_it_and_hands_it_the_accusation():
    c = core(n=6, verify_fanout=0)
    c.receive(B, suspect(IDS[4], B), 1.0)
    c.receive(C, suspect(IDS[4], C), 1.0)
    c.tick(1.0 + c.suspicion_max)
    assert c.state(IDS[4])[0] == DEAD
    out = c.receive(IDS[4], wire.encode(wire.Ping(5)), 9.0)
    assert c.state(IDS[4]) == (ALIVE, 9.0)
    kinds = [type(f) for p, f in sends(out) if p == IDS[4]]
    assert wire.Ack in kinds and (wire.Suspect in kinds or wire.Dead in kinds)


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_garbage_frames_are_penalized_never_raised(data):
    c = core(n=6)
    try:
        wire.decode(data)
        valid = True
    except DecodeError:
        valid = False
    out = c.receive(B, data, 1.0)
    if not valid:
        assert len(out) == 1 and isinstance(out[0], Penalize) and out[0].peer == B


def test_local_health_blames_us_only_without_nacks():
    c = core(n=6)
    c.tick(0.0)
    t = c.next_wakeup()
    [(target, ping)] = sends(c.tick(t), wire.Ping)
    reqs = sends(c.tick(t + c.probe_timeout), wire.PingReq)
    for relay, _ in reqs:  # every relay could not reach the target either
        c.receive(relay, wire.encode(wire.Nack(ping.nonce)), t + 0.4)
    c.receive(target, wire.encode(wire.Nack(ping.nonce)), t + 0.4)  # not a relay: ignored
    c.tick(t + c.probe_interval)
    assert c.state(target)[0] == SUSPECT and c.health == 0
    # a probe that fails with silent relays costs health; the interval stretches
    c = core(n=6)
    c.tick(0.0)
    t = c.next_wakeup()
    assert sends(c.tick(t), wire.Ping)
    c.tick(t + c.probe_timeout)
    c.tick(t + c.probe_interval)
    assert c.health == 1 and c.multiplier == 2
    assert c.next_wakeup() == pytest.approx(t + c.probe_interval + c.probe_timeout * 2)
    assert c._next_probe_at == pytest.approx(t + c.probe_interval * 3)
    # and answered probes bring it back
    now = t + c.probe_interval
    while c.health:
        now = c.next_wakeup()
        for peer, f in sends(c.tick(now), wire.Ping):
            c.receive(peer, wire.encode(wire.Ack(f.nonce)), now + 0.01)
    assert now < t + 5.0


def test_state_is_bounded():
    c = core(n=16, max_pending_probes=4, max_relays=5, max_accusers=3, verify_fanout=100)
    for i in range(20):
        c.receive(B, wire.encode(wire.PingReq(IDS[2 + i % 10], i)), 1.0)
    assert len(c._relays) == 5
    for obs in range(1, 16):
        c.receive(IDS[obs], suspect(IDS[15 if obs != 15 else 14], IDS[obs]), 1.0)
    assert len(c._probes) <= 4
    assert all(len(m.accusers or ()) <= 3 for m in c._members.values())


def test_accusations_age_out():
    # no ticks in between: a long gap between ticks would look like our own stall
    c = core(n=6, verify_fanout=0)
    c.receive(B, suspect(IDS[4], B), 1.0)
    c.receive(C, suspect(IDS[4], C), 1.0 + c.accusation_ttl + 0.02)
    assert c.state(IDS[4])[0] == ALIVE  # B's old word no longer confirms C's
    assert c._watch  # C's accusation is still held...
    c.tick(1.0 + 2 * c.accusation_ttl + 0.1)
    assert not c._watch  # ...until it ages out too


def test_a_stall_of_our_own_accuses_nobody():
    c = core(n=6)
    c.tick(0.0)
    t = c.next_wakeup()
    assert sends(c.tick(t), wire.Ping)
    out = c.tick(t + 30.0)  # we were stopped for 30 s with a probe in flight
    assert not [e for e in out if isinstance(e, StateChanged | Broadcast)]
    assert c.health == 1


def test_a_probe_deadline_seen_late_accuses_nobody_until_one_more_timeout():
    """A starved process looks at a probe's deadline more than a whole timeout late:
    the ack may be unread in its buffers, so no accusation yet; health rises and the
    probe gets one more timeout. If nothing comes by then, the target is suspected."""
    c = core(n=6)
    c.tick(0.0)
    t = c.next_wakeup()
    [(target, _)] = sends(c.tick(t), wire.Ping)
    c.tick(t + c.probe_timeout)  # indirect probes go out on time
    late = t + c.probe_interval + 1.5 * c.probe_timeout  # under the 3-period stall rule
    out = c.tick(late)
    assert not [e for e in out if isinstance(e, StateChanged)]
    assert c.state(target)[0] == ALIVE and c.health == 1 and c.late_probes == 1
    due = late + c.probe_timeout * c.multiplier
    out = c.tick(due)
    assert StateChanged(target, SUSPECT, due) in out


def test_an_answer_to_a_failed_probe_clears_it_and_slows_us_down():
    """The ack of a probe that already failed arrives: the target is alive (our
    suspicion goes) and our timeouts were too short, so our health worsens."""
    c, t, target, ping = suspected_by_our_probe()
    out = c.receive(target, wire.encode(wire.Ack(ping.nonce)), t + c.probe_interval + 0.1)
    assert c.state(target)[0] == ALIVE and c.health == 2 and c.late_acks == 1
    assert StateChanged(target, ALIVE, t + c.probe_interval + 0.1) in out
    # another member's ack with that nonce does nothing
    other = next(n for n in IDS[1:6] if n != target)
    c.receive(other, wire.encode(wire.Ack(ping.nonce)), t + 2)
    assert c.late_acks == 1


class Heard:
    """What the transport read from each member so far (``Liveness(heard=...)``)."""

    def __init__(self) -> None:
        self.reads: dict[NodeId, int] = {}

    def __call__(self, node: NodeId) -> int | None:
        return self.reads.get(node)


def probing(reads: int | None, **kw) -> tuple[Heard, Liveness, float, NodeId]:
    """A core whose transport has read ``reads`` from every member (None: not
    connected to any), right after it pinged its first target at ``t``."""
    heard = Heard()
    if reads is not None:
        heard.reads = {n: reads for n in IDS}
    c = core(n=6, heard=heard, **kw)
    c.tick(0.0)
    t = c.next_wakeup()
    [(target, _)] = sends(c.tick(t), wire.Ping)
    return heard, c, t, target


def test_a_target_heard_from_while_we_wait_is_not_suspected():
    """No ack in time, but the target sent us something (on any connection) after
    the probe started: its process runs. No indirect probes, no accusation, and
    our health stays (whose slowness it is cannot be told)."""
    heard, c, t, target = probing(0)
    heard.reads[target] = 1  # one read from the target's connection since the ping
    assert not sends(c.tick(t + c.probe_timeout), wire.PingReq)
    out = c.tick(t + c.probe_interval)
    assert not [e for e in out if isinstance(e, StateChanged | Broadcast)]
    assert c.state(target)[0] == ALIVE and c.health == 0 and c.heard_probes == 1


@pytest.mark.parametrize("after", [5, None], ids=["silent", "disconnected"])
def test_a_target_not_heard_from_is_suspected_as_before(after):
    """The count did not move while we waited (a stopped or cut-off process), or
    the connection went (a crash closes it): indirect probes, then suspicion."""
    heard, c, t, target = probing(5)
    if after is None:
        del heard.reads[target]
    assert sends(c.tick(t + c.probe_timeout), wire.PingReq)
    c.tick(t + c.probe_interval)
    assert c.state(target)[0] == SUSPECT and c.heard_probes == 0


@pytest.mark.parametrize("handshake", [True, False], ids=["handshake", "none"])
def test_a_handshake_with_the_target_while_we_wait_is_word_from_it(handshake):
    """No connection when the probe began, none at its end (the dial's setup timed
    out after its security handshake, on a saturated machine): a handshake the
    target completed meanwhile (signed with its key) proves its process ran, so
    no accusation; without one, suspicion as before."""
    secured = dict.fromkeys(IDS, 2)
    heard = Heard()
    c = core(n=6, heard=heard, secured=lambda n: secured[n], dial_grace=3.0)
    c.tick(0.0)
    t = c.next_wakeup()
    [(target, _)] = sends(c.tick(t), wire.Ping)
    if handshake:
        secured[target] += 1
    now = t
    while now < t + c.probe_interval + 3.5:
        now += 0.05
        c.tick(now)
    assert c.state(target)[0] == (ALIVE if handshake else SUSPECT)
    assert (c.heard_probes >= 1) == handshake


def test_a_handshake_count_that_fell_is_not_word_from_the_target():
    """The transport forgets the oldest peers' counts when many peers handshake
    (an attacker's fresh identities can push a member out): a count that fell
    during the probe proves nothing, and the silent target is suspected."""
    secured = dict.fromkeys(IDS, 7)
    c = core(n=6, heard=Heard(), secured=lambda n: secured[n], dial_grace=3.0)
    c.tick(0.0)
    t = c.next_wakeup()
    [(target, _)] = sends(c.tick(t), wire.Ping)
    secured[target] = 0
    now = t
    while now < t + c.probe_interval + 3.5:
        now += 0.05
        c.tick(now)
    assert c.state(target)[0] == SUSPECT


@pytest.mark.parametrize("connects", [True, False], ids=["connects", "never"])
def test_a_probe_without_a_connection_waits_for_the_dial_once(connects):
    """No connection to the target when the probe began and none at its deadline:
    the dial is still going (a busy machine), so one ``dial_grace`` more. If the
    connection comes meanwhile, the target was heard from; if not, it is suspected."""
    heard, c, t, target = probing(None, dial_grace=3.0)
    c.tick(t + c.probe_timeout)  # indirect probes
    out = c.tick(t + c.probe_interval)  # the deadline: no connection yet
    assert c.state(target)[0] == ALIVE and c.dial_waits == 1
    assert not [e for e in out if isinstance(e, StateChanged | Broadcast)]
    if connects:
        heard.reads = {n: 3 for n in IDS}  # the handshakes went through
    now = t + c.probe_interval
    while now < t + c.probe_interval + 3.0:  # small steps: a long gap is our own stall
        now += 0.05
        c.tick(now)
        if c.state(target)[0] != ALIVE:
            break
    assert c.state(target)[0] == (ALIVE if connects else SUSPECT)
    assert (c.heard_probes >= 1) == connects
    if not connects:  # suspected only once the grace was over
        assert now >= t + c.probe_interval + 3.0 - 0.05


def test_a_slow_node_that_keeps_talking_is_never_suspected():
    """Everything one node sends arrives later and later, up to 2 s late (a busy
    machine; timeouts are 0.25 s). Without ``heard`` the others suspect it; with
    it, what it sent before a probe (gossip and the rest of a node's traffic,
    here a steady chatter) arrives during the probe, so nobody accuses it."""
    for heard in (False, True):
        net = Net(8, seed=11, heard=heard)
        net.run(3.0)
        slow = net.ids[2]

        def slow_down(net: Net, slow: NodeId = slow) -> None:
            net.slow[slow] = min(2.0, 0.2 * (net.now - 3.0))  # over 10 s
            for src in net.ids:  # every node keeps sending something to every other
                for dst in net.ids:
                    if src != dst and src not in net.down:
                        net.rx[(dst, src)] = net.rx.get((dst, src), 0) + 1

        net.hooks.append(slow_down)
        net.run(25.0)
        suspected = net.ever(slow, SUSPECT)
        assert bool(suspected) != heard, (heard, suspected)
        # without it, the others even declare it dead; with it, never
        assert bool(net.ever(slow, DEAD)) != heard


def test_crashed_node_is_declared_dead_by_all_within_bound_when_reads_are_counted():
    """A crashed node sends nothing more, so counting reads hides no crash."""
    net = Net(10, seed=3, heard=True)
    net.run(5.0)
    victim = net.ids[4]
    net.down.add(victim)
    net.run(12.0)
    for o in others(net, victim):
        assert net.first(victim, DEAD, o) - 5.0 <= 5.0
    assert {n for _, _, n, s in net.changes if s != ALIVE} == {victim}


def test_failed_probes_are_remembered_within_a_bound():
    """Every failed probe is remembered (for a late ack), the last
    ``2 * max_pending_probes`` of them only, however long nobody answers."""
    c = core(n=len(IDS), max_pending_probes=2)
    t = 0.0
    failed = 0
    for _ in range(400):
        c.tick(t)
        t = max(c.next_wakeup(), t + 0.01)
        failed = max(failed, len(c._failed))
    assert failed == 2 * c.max_pending_probes  # reached, never passed
    assert len(c._failed) <= 2 * c.max_pending_probes


def _slow_acks(c, delay: float, until: float) -> list[float]:
    """Drive ``c`` with every member acking each Ping ``delay`` s after it went
    out (a saturated process); the times at which someone became SUSPECT."""
    pending: list[tuple[float, NodeId, int]] = []
    suspected = []
    now = 0.0
    for _ in range(20_000):
        if now > until:
            break
        out = []
        for item in [x for x in pending if x[0] <= now]:
            pending.remove(item)
            out += c.receive(item[1], wire.encode(wire.Ack(item[2])), now)
        out += c.tick(now)
        for peer, f in sends(out, wire.Ping):
            pending.append((now + delay, peer, f.nonce))
        suspected += [e.since for e in out if isinstance(e, StateChanged) and e.state == SUSPECT]
        now = min([c.next_wakeup() or now + 1.0] + [d for d, _, _ in pending])
    return suspected


def test_probe_timeouts_follow_the_round_trips_they_see():
    """Acks that take longer than a whole probe period (0.7 s against 0.5 s) fail
    the first probes; their late answers are round-trip samples, the timeout
    grows past them (TCP's srtt + 4 rttvar) and suspicions stop."""
    c = core(n=6)
    suspected = _slow_acks(c, 0.7, 120.0)
    assert suspected and min(suspected) < 10  # at first, yes
    assert not [t for t in suspected if t > 30]  # then never again
    assert 0.6 < c.srtt < 0.8 and c.timeout > 0.7 and c.interval > c.timeout
    # fast answers keep the configured timeout
    quick = core(n=6)
    assert not _slow_acks(quick, 0.01, 30.0)
    assert quick.timeout == quick.probe_timeout and quick.interval == quick.probe_interval


# -- several cores on a network ----------------------------------------------------


def test_crashed_node_is_declared_dead_by_all_within_bound():
    net = Net(10, seed=3)
    net.run(5.0)
    victim = net.ids[4]
    net.down.add(victim)
    net.run(12.0)
    for o in others(net, victim):
        t = net.first(victim, DEAD, o)
        assert t - 5.0 <= 5.0, f"{o} took {t - 5.0:.2f} s"
        assert net.state_at(o, victim) == DEAD
    # nobody else was ever suspected, and the crash cost a bounded number of broadcasts
    assert {n for _, _, n, s in net.changes if s != ALIVE} == {victim}
    assert net.broadcasts <= 2 * 9
    assert not net.penalties
    # relays nacked, so nobody blamed its own health for the dead node's silence
    assert all(net.cores[o].health == 0 for o in others(net, victim))


def test_a_crash_is_dead_everywhere_when_only_neighbours_probe():
    """Each node probes only its ring neighbours (as a node probes only the members
    it has connections to): a crash is still dead at every node within the same
    bound, by the neighbours' word, and nobody else is ever suspected."""
    net = Net(16, seed=5)
    ids = net.ids
    ring = {
        nid: {ids[(i + d) % len(ids)] for d in (-3, -2, -1, 1, 2, 3)} for i, nid in enumerate(ids)
    }
    for nid, near in ring.items():
        net.cores[nid].set_near(near)
    net.run(5.0)
    for nid, near in ring.items():  # nobody pinged a member beyond its neighbours
        members = net.cores[nid]._members
        probed = {n for n in ids if n != nid and members[n].probed_at > -math.inf}
        assert probed <= near and probed
    victim = ids[7]
    net.down.add(victim)
    net.run(12.0)
    for o in others(net, victim):
        t = net.first(victim, DEAD, o)
        assert t - 5.0 <= 5.0, f"{o} took {t - 5.0:.2f} s"
    assert {n for _, _, n, s in net.changes if s != ALIVE} == {victim}
    assert not net.penalties


def test_crash_detection_time_is_lifeguard_fast_at_default_parameters():
    """memberlist's aggressive profile takes 1.2-1.75 s at 100 members; we look
    at the spread over several crashes in a 12-node overlay."""
    times = []
    for seed in range(4):
        net = Net(12, seed=seed)
        net.run(3.0)
        victim = net.ids[seed]
        net.down.add(victim)
        net.run(10.0)
        times += [net.first(victim, DEAD, o) - 3.0 for o in others(net, victim)]
    times.sort()
    assert times[-1] < 6.0
    assert times[len(times) // 2] < 4.0


def test_lossy_link_is_not_declared_dead():
    net = Net(8, seed=11)
    lossy = net.ids[3]
    net.loss[lossy] = 0.2  # 20% of everything it sends or receives is lost
    net.run(90.0)
    assert not net.ever(lossy, DEAD)
    assert not {n for _, _, n, s in net.changes if s == DEAD}
    assert all(net.state_at(o, lossy) in (ALIVE, SUSPECT) for o in others(net, lossy))


def test_paused_node_is_suspected_then_refutes():
    net = Net(8, seed=5)
    net.run(4.0)
    paused = net.ids[2]
    net.down.add(paused)  # SIGSTOP: no ticks, reads nothing
    net.run(5.5)
    assert net.ever(paused, SUSPECT, since=4.0)
    net.down.discard(paused)  # SIGCONT
    net.run(10.0)
    assert net.cores[paused].incarnation >= 1  # it learnt it was suspected and refuted
    assert not net.ever(paused, DEAD)
    assert all(net.state_at(o, paused) == ALIVE for o in others(net, paused))
    assert not {n for _, _, n, s in net.changes if n != paused and s != ALIVE}


def test_long_paused_node_is_dead_then_comes_back():
    net = Net(8, seed=6)
    net.run(4.0)
    paused = net.ids[1]
    net.down.add(paused)
    net.run(14.0)
    assert all(net.state_at(o, paused) == DEAD for o in others(net, paused))
    net.down.discard(paused)
    net.run(18.0)
    assert all(net.state_at(o, paused) == ALIVE for o in others(net, paused))
    # the resumed node did not take its own stall for everybody else's death
    assert not {n for _, o, n, s in net.changes if o == paused and s != ALIVE}


def test_healed_partition_heals_liveness():
    net = Net(8, seed=13)
    net.run(2.0)
    left, right = set(net.ids[:4]), set(net.ids[4:])
    net.partition = [left]
    net.run(12.0)
    for a in left:
        assert all(net.state_at(a, b) == DEAD for b in right)
        assert all(net.state_at(b, a) == DEAD for b in right)
    net.partition = []
    net.run(12.0 + net.cores[net.ids[0]].dead_reprobe + 5.0)
    assert all(net.state_at(a, b) == ALIVE for a in net.ids for b in net.ids if a != b)


class Accuser:
    """A member that answers probes normally but keeps signing false accusations."""

    def __init__(self, me: NodeId, victims: list[NodeId], every: float = 0.2) -> None:
        self.me, self.victims, self.every, self.next = me, victims, every, 0.0
        self.key = KEYS[IDS.index(me)]
        self.count = 0

    def __call__(self, net: Net) -> None:
        if net.now < self.next or self.me in net.down:
            return
        self.next = net.now + self.every
        for victim in self.victims:
            known = net.cores[victim].incarnation  # the liar watches the victim's refutations
            for inc in (known, known + 1, 2**64 - 1):
                for cls in (wire.Suspect, wire.Dead):
                    self.count += 1
                    f = cls(victim, inc, self.me, wire.ts_of(net.now) + self.count)
                    frame = wire.encode(f.signed_with(self.key.sign))
                    net.dispatch(self.me, [Broadcast("hydra/liveness", frame)])


def test_single_malicious_accuser_cannot_kill_a_healthy_node():
    net = Net(8, seed=7)
    victim, liar = net.ids[0], net.ids[5]
    net.hooks.append(Accuser(liar, [victim]))
    net.run(30.0)
    assert not net.ever(victim, DEAD)
    assert not net.ever(victim, SUSPECT)  # a lone accuser is not even believed
    assert all(net.state_at(o, victim) == ALIVE for o in others(net, victim))
    assert not net.penalties  # its statements were validly signed: just not believed
    assert net.cores[victim].incarnation < 2**63  # refutations did not run away


def test_two_colluders_cannot_kill_a_node_that_answers_probes():
    """Two liars reach confirmations_needed, but every receiver that believes
    them probes the accused and direct evidence wins; the victim refutes."""
    net = Net(10, seed=8)
    victim = net.ids[0]
    liars = [Accuser(net.ids[6], [victim], every=0.3), Accuser(net.ids[7], [victim], every=0.3)]
    net.hooks.extend(liars)
    net.run(30.0)
    assert not net.ever(victim, DEAD)
    net.hooks.clear()  # while they keep lying, some nodes doubt; once they stop, all agree
    net.run(35.0)
    assert all(net.state_at(o, victim) == ALIVE for o in others(net, victim))


def test_forged_broadcasts_in_a_network_are_penalized():
    net = Net(6, seed=9)
    net.run(2.0)
    forger = net.ids[5]
    frame = suspect(net.ids[1], net.ids[2], key=KEYS[5])  # in node 2's name
    net.dispatch(forger, [Broadcast("hydra/liveness", frame)])
    net.run(3.0)
    # every receiver, the accused included, rejects it and blames the forwarder
    # (the node it was forged in the name of ignores its "own" statement unchecked)
    assert sorted((o, p.peer, p.reason) for o, p in net.penalties) == sorted(
        (o, forger, Reason.BAD_SIGNATURE) for o in net.ids if o not in (forger, net.ids[2])
    )
    assert net.cores[net.ids[1]].incarnation == 0  # no refutation for a forgery
    assert not net.ever(net.ids[1], SUSPECT)


def test_event_driven_and_stepped_runs_agree_and_wakeups_are_honest():
    a = Net(6, seed=4)
    a.run(2.0)
    a.down.add(a.ids[2])
    a.run(9.0)
    b = Net(6, seed=4)
    b.run(2.0, step=0.01, check_wakeups=True)
    b.down.add(b.ids[2])
    b.run(9.0, step=0.01, check_wakeups=True)
    for net in (a, b):
        assert all(net.state_at(o, net.ids[2]) == DEAD for o in others(net, net.ids[2]))


def test_same_seed_same_history():
    def history(seed):
        net = Net(8, seed=seed)
        net.loss[net.ids[1]] = 0.3
        net.run(3.0)
        net.down.add(net.ids[4])
        net.run(10.0)
        return [(round(t, 9), o, n, s) for t, o, n, s in net.changes], net.sent

    assert history(21) == history(21)
    assert history(21) != history(22)


def test_message_cost_per_node_is_bounded():
    net = Net(10, seed=12)
    net.run(20.0)
    per_node_per_s = net.sent / 10 / 20.0
    # one ping + one ack per probe period and, when all are healthy, nothing else but
    # the DeadReqs to the first three live peers and one every dead_sync_every (30 s)
    assert per_node_per_s <= 2 / 0.5 + 0.1 + (3 + 1) / 20.0
    assert net.changes == []  # and no false suspicion


# -- learning deaths that happened before we started; transport hints ------------


def _restart(net: Net, node: NodeId, **params) -> None:
    """Replace ``node``'s core by a fresh one (a restart or a newcomer: it holds
    every member alive)."""
    i = net.ids.index(node)
    core = Liveness(
        node, KEYS[i].sign, random.Random(99), incarnation=int(net.now * 1000), **params
    )
    core.set_members(net.ids, net.now)
    net.cores[node] = core


@pytest.mark.parametrize("pull", [True, False])
def test_a_newcomer_learns_earlier_deaths(pull):
    params = {} if pull else {"dead_sync_first": 0, "dead_sync_every": math.inf}
    net = Net(8, seed=31)
    net.run(2.0)
    victim, newcomer = net.ids[0], net.ids[7]
    net.down.add(victim)
    net.run(12.0)
    assert all(net.state_at(o, victim) == DEAD for o in others(net, victim))
    _restart(net, newcomer, **params)
    assert net.state_at(newcomer, victim) == ALIVE
    if pull:
        # DeadReqs to the first three peers that ping it or answer bring statements by several
        # observers: enough confirmations, so it holds the death in a few seconds
        net.run(12.0 + 4.0)
    else:
        # without them, its own probe finds the victim silent; its Suspect alone
        # would never be confirmed (everyone else holds the victim dead and has
        # nothing more to say), so those who hold it dead send it their statement
        net.run(12.0 + 3.5 + 2 + 4.0)  # one round-robin, a probe, the suspicion timeout
    assert net.state_at(newcomer, victim) == DEAD
    # and nobody healthy was harmed on the way
    assert not any(net.ever(n, DEAD) for n in net.ids if n != victim)


def test_dead_req_answers_are_bounded_and_rate_limited():
    net = Net(6, seed=32, max_dead_reply=2)
    net.run(2.0)
    for v in net.ids[:3]:
        net.down.add(v)
    net.run(15.0)
    asker, answerer = net.ids[5], net.ids[4]
    core = net.cores[answerer]
    assert sum(core.state(v)[0] == DEAD for v in net.ids[:3]) == 3
    req = wire.encode(wire.DeadReq())
    first = core.receive(asker, req, net.now)
    frames = [wire.decode(e.frame) for e in first if isinstance(e, Send)]
    assert all(isinstance(f, wire.Suspect | wire.Dead) for f in frames)
    subjects = {f.subject for f in frames}
    assert len(subjects) == 2 and subjects <= set(net.ids[:3])  # the 2 newest deaths
    for s in subjects:  # each with enough distinct signers to be believed
        signers = {f.observer for f in frames if f.subject == s}
        assert core.confirmations_needed <= len(signers) <= core.expected_confirmations
    assert core.receive(asker, req, net.now + 0.01) == []  # once per probe period
    assert len(core.receive(asker, req, net.now + core.probe_interval)) == len(frames)


def test_probe_now_after_a_closed_connection_finds_a_crash_sooner():
    def first_suspicion(hint: bool) -> float:
        net = Net(12, seed=33, probe_interval=2.0, probe_timeout=0.5)
        net.run(3.0)
        victim = net.ids[3]
        net.down.add(victim)
        if hint:  # every peer's connection to it closed with it
            for o in others(net, victim):
                net.dispatch(o, net.cores[o].probe_now(victim, net.now))
        net.run(40.0)
        assert all(net.state_at(o, victim) == DEAD for o in others(net, victim))
        return min(t for t, _, n, st in net.changes if n == victim and st == SUSPECT) - 3.0

    hinted, unhinted = first_suspicion(True), first_suspicion(False)
    # suspected at the end of the hinted probe's period, not at its round-robin turn
    assert hinted <= 2.0 + 0.05
    assert unhinted > hinted


def test_probe_now_is_rate_limited_and_ignores_the_dead_and_strangers():
    net = Net(4, seed=34)
    net.run(1.0)
    core, peer = net.cores[net.ids[0]], net.ids[1]
    first = core.probe_now(peer, net.now)
    assert any(isinstance(e, Send) and isinstance(wire.decode(e.frame), wire.Ping) for e in first)
    assert core.probe_now(peer, net.now + 0.01) == []  # already probing / too soon
    assert core.probe_now(IDS[15], net.now) == []  # not a member


def test_a_newcomer_whose_view_is_mostly_dead_still_learns_every_death():
    """Its DeadReqs go only to members that prove alive, not to its first probe
    targets (which here are more likely dead than alive)."""
    net = Net(12, seed=35)
    net.run(2.0)
    victims, newcomer = net.ids[:8], net.ids[11]
    net.down.update(victims)
    net.run(20.0)
    _restart(net, newcomer)
    net.run(20.0 + 5.0)
    assert [net.state_at(newcomer, v) for v in victims] == [DEAD] * 8
    assert not any(net.ever(n, DEAD) for n in net.ids if n not in victims)


def _turns(c: Liveness, heard: Heard, until: float, *, talking=(), answering=None):
    """Tick ``c`` up to ``until``; before each tick every member in ``talking``
    sends us something; pings are answered at once by ``answering`` (default:
    everyone). Returns the targets pinged, in order."""
    pinged = []
    while (now := c.next_wakeup()) is not None and now < until:
        for n in talking:
            heard.reads[n] = heard.reads.get(n, 0) + 1
        for target, ping in sends(c.tick(now), wire.Ping):
            pinged.append(target)
            if answering is None or target in answering:
                c.receive(target, wire.encode(wire.Ack(ping.nonce)), now + 0.01)
    return pinged


def test_a_member_that_talks_to_us_needs_no_ping_at_its_turn():
    """A routine turn of a member that sent us something since our last look at it
    is spent without a ping (``passive_looks``); members that said nothing are
    pinged at every turn, and nobody is suspected."""
    heard = Heard()
    heard.reads = {n: 0 for n in IDS}
    c = core(n=6, heard=heard)
    c.tick(0.0)
    rounds = 4 * 5 * c.probe_interval  # four turns of each of the 5 members
    talker = IDS[1]
    pinged = _turns(c, heard, rounds, talking=[talker])
    assert pinged.count(talker) == 1  # its first turn only
    assert all(pinged.count(n) >= 3 for n in IDS[2:6])
    assert c.passive_looks >= 3
    assert all(c.state(n)[0] == ALIVE for n in IDS[1:6])


@pytest.mark.parametrize("connects", [True, False], ids=["connects", "never"])
def test_a_probe_after_a_close_waits_for_a_dial_its_target_answered(connects):
    """``probe_now`` after a close; the target's address accepted our ping's dial
    meanwhile (a live process on a busy machine; a crashed one's port refuses):
    one ``dial_grace`` more, once. Connected by then: heard from; else suspected."""
    heard = Heard()
    heard.reads = {n: 0 for n in IDS}
    answered = dict.fromkeys(IDS, 4)
    c = core(n=6, heard=heard, dial_grace=3.0, answered=lambda n: answered[n])
    c.tick(0.0)
    victim = IDS[3]
    del heard.reads[victim]  # its connection closed
    t = 0.01
    assert sends(c.probe_now(victim, t), wire.Ping)
    answered[victim] += 1  # the ping's dial: TCP accepted, the handshake goes on
    now = t
    while now < t + c.probe_interval + 0.1:
        now += 0.05
        c.tick(now)
    assert c.state(victim)[0] == ALIVE and c.dial_waits == 1
    if connects:
        heard.reads[victim] = 1  # the dial went through
    answered[victim] += 1  # another answered dial: no second grace
    while now < t + c.probe_interval + 3.5:
        now += 0.05
        c.tick(now)
    assert c.state(victim)[0] == (ALIVE if connects else SUSPECT)
    assert c.dial_waits == 1


def test_a_member_that_falls_silent_is_pinged_and_suspected_one_turn_later():
    """Bytes from a member buy it one turn without a ping, no more: once it stops
    sending (a stopped process) its next turn pings it, and the unanswered ping
    is a failed probe as before."""
    heard = Heard()
    heard.reads = {n: 0 for n in IDS}
    c = core(n=6, heard=heard)
    c.tick(0.0)
    period = 5 * c.probe_interval
    stopped = IDS[1]
    others = set(IDS[2:6])
    _turns(c, heard, 2 * period, talking=[stopped])  # talking: one ping, then none
    pinged = _turns(c, heard, 5 * period, answering=others)  # silent from now on
    assert stopped in pinged
    assert c.state(stopped)[0] in (SUSPECT, DEAD)


def test_a_probe_after_a_closed_connection_does_not_wait_for_a_dial():
    """``probe_now`` follows a connection that just closed, as a crash closes it:
    with no connection at the deadline the target is suspected at once, without
    the ``dial_grace`` a probe that never had a connection gets (failover)."""
    heard = Heard()
    heard.reads = {n: 0 for n in IDS}
    c = core(n=6, heard=heard, dial_grace=3.0, answered=lambda n: 4)  # refused since
    c.tick(0.0)
    victim = IDS[3]
    del heard.reads[victim]  # its connection closed
    t = 0.01
    assert sends(c.probe_now(victim, t), wire.Ping)
    now = t
    while now < t + c.probe_interval + 0.1:
        now += 0.05
        c.tick(now)
    assert c.state(victim)[0] == SUSPECT and c.dial_waits == 0


@pytest.mark.parametrize("word", ["read", "handshake", "silent", "closed", "fell"], ids=str)
def test_a_suspect_that_talked_to_us_is_not_declared_dead(word):
    """Two observers accuse a member; by the deadline it has sent us something (or
    completed a security handshake with us) since we began to suspect it: its
    process runs, only slowly (its refutation is still on its way). It is not
    declared dead: we clear it and hand it an accusation to refute. A silent one
    (a stopped or cut-off process), one whose connection closed (a crash) or
    whose count fell (one of its connections closed) dies as before."""
    heard = Heard()
    heard.reads = dict.fromkeys(IDS, 4)
    secured = dict.fromkeys(IDS, 1)
    c = core(n=6, verify_fanout=0, heard=heard, secured=lambda n: secured[n])
    x = IDS[5]
    c.receive(B, suspect(x, B), 1.0)
    c.receive(C, suspect(x, C), 1.1)
    assert c.state(x)[0] == SUSPECT
    if word == "read":
        heard.reads[x] += 1
    elif word == "handshake":
        del heard.reads[x]  # its connection failed right after the handshake
        secured[x] += 1
    elif word == "closed":
        del heard.reads[x]
    elif word == "fell":
        heard.reads[x] -= 2  # one of two connections closed: no new word
    out = c.tick(1.1 + c.suspicion_max + 0.01)
    if word in ("read", "handshake"):
        assert c.state(x)[0] == ALIVE and c.talked_suspects == 1
        assert [f for p, f in sends(out, wire.Suspect) if p == x]  # so it can refute
    else:
        assert c.state(x)[0] == DEAD and c.talked_suspects == 0
