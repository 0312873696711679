"""Liveness, the accusation half: suspicion, death and refutation (sans-I/O).

``Suspicion`` is the base class of ``liveness.Liveness``; it holds what a
failure detector does with accusations once a probe has failed or a signed
statement has arrived: our own accusation (``Suspect``), remote ones counted
per distinct known observer, Lifeguard's shrinking suspicion timer, the
declaration of death (``Dead``, with the statements kept to hand to others),
direct evidence that clears everything, and our own refutation (``Alive`` at a
higher incarnation). The probing half (round-robin, indirect probes, local
health, dead sync) is in ``liveness.py``, whose docstring states the
invariants both halves keep. ``Member`` and ``Accusation`` are the
per-member state both halves share.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..crypto import NodeId
from ..errors import BadSignature, Reason
from ..wire import liveness as wire
from .effects import Broadcast, Effect, Penalize, Send, StateChanged

ALIVE, SUSPECT, DEAD, UNKNOWN = "alive", "suspect", "dead", "unknown"
MAX_INC_JUMP = 1 << 32  # largest incarnation jump one refutation makes
U64_MAX = (1 << 64) - 1


@dataclass(slots=True)
class Accusation:
    ts: int  # the observer's ts: orders one observer's statements
    received: float  # our clock
    frame: bytes  # the signed frame, forwarded to the accused so it can refute
    dead: bool  # a Dead (rather than a Suspect) statement


@dataclass(slots=True)
class Member:
    since: float
    state: str = ALIVE
    inc: int = 0  # highest incarnation proven by the node's own Alive
    accusers: dict[NodeId, Accusation] | None = None
    suspect_since: float | None = None
    confirmed_at: float | None = None  # when accusers first reached confirmations_needed
    verified_at: float = -math.inf  # last verification probe triggered by an accusation
    reverify_at: float | None = None  # re-probe while only our own accusation stands
    last_frame: bytes | None = None  # an accusation to hand to a dead node that reappears
    dead_frames: tuple[bytes, ...] = ()  # DEAD: statements by distinct observers, ours first
    probed_at: float = -math.inf
    hinted_at: float = -math.inf  # last probe_now() probe
    told_at: float = -math.inf  # last time we told a lagging accuser it is dead
    look_at: float | None = None  # DEAD waits for our own probe: when to look again
    heard_mark: int | None = None  # ``heard(node)`` at our last look at it (``Liveness``)
    talk_mark: int | None = None  # ``heard(node)`` when we began to suspect it
    talk_secured: int = 0  # ``secured(node)`` when we began to suspect it


class Suspicion:
    """Accusations, suspicion timers, death and refutation for ``Liveness``.

    Not used alone: ``Liveness.__init__`` sets the attributes below and provides
    ``_start_probe`` (a verification probe of an accused member).
    """

    me: NodeId
    probe_interval: float
    suspicion_min: float
    suspicion_max: float
    confirmations_needed: int
    expected_confirmations: int
    verify_fanout: int
    accusation_ttl: float
    health_max: int
    max_accusers: int
    protocol: str
    topic: str
    accusations_heard: int
    _sign: Callable[[bytes], bytes]
    _verify: Callable[[NodeId, bytes, bytes], None]
    _is_known: Callable[[NodeId], bool] | None
    _rng: random.Random
    _inc: int
    _refute_to: int | None
    _next_refute_at: float
    _alive_at: float  # our last Alive
    _health: int
    _members: dict[NodeId, Member]
    _watch: dict[NodeId, None]
    _probing: dict[NodeId, int]
    stale_checks: int
    talked_suspects: int
    _secured: Callable[[NodeId], int] | None

    def _start_probe(self, target: NodeId, now: float, out: list[Effect]) -> bool:
        raise NotImplementedError  # Liveness probes

    def _reads(self, node: NodeId) -> int | None:
        raise NotImplementedError  # Liveness: the transport's ``heard`` count

    def suspicion_timeout(self, confirmations: int) -> float:
        """Lifeguard timeout after ``confirmations`` accusations beyond the first.

        ``max - (max - min) * log(c + 1) / log(K + 1)``, floored at ``min``,
        with ``K = expected_confirmations``.
        """
        frac = math.log(confirmations + 1) / math.log(self.expected_confirmations + 1)
        return max(
            self.suspicion_min,
            self.suspicion_max - (self.suspicion_max - self.suspicion_min) * frac,
        )

    # -- suspicion --------------------------------------------------------------

    def _accuse(self, target: NodeId, m: Member, now: float, out: list[Effect]) -> None:
        """Our own probe of ``target`` failed: suspect it and say so (signed)."""
        ts = wire.ts_of(now)
        frame = wire.encode(wire.Suspect(target, m.inc, self.me, ts).signed_with(self._sign))
        acc = self._accusers(m)
        again = self.me in acc
        acc[self.me] = Accusation(ts, now, frame, dead=False)
        self._confirmed(m, now)
        self._watch[target] = None
        # look again soon (one lost exchange should not stand for long), then now and
        # then, re-signing so our accusation does not age out elsewhere meanwhile
        m.reverify_at = now + (self.accusation_ttl / 2 if again else self.probe_interval)
        if m.state != SUSPECT:
            self._suspect(target, m, now, out)
        if len(acc) - 1 < self.expected_confirmations:
            out.append(Broadcast(self.topic, frame))
        out.append(Send(target, self.protocol, frame))  # maybe only our path to it is broken
        self._check(target, now, out)

    def _on_accusation(
        self,
        peer: NodeId,
        f: wire.Suspect | wire.Dead,
        frame: bytes,
        now: float,
        out: list[Effect],
    ) -> None:
        if f.subject == self.me:
            # at any incarnation: one we left may be the newest the accuser knows
            # (our first incarnation is announced only by the first refutation)
            if self._verified(peer, f, out):
                self._want_refute(f.incarnation, now, out)
            return
        if f.observer == self.me:
            return  # our own statement coming back
        m = self._members.get(f.subject)
        if m is not None and m.state == DEAD:
            self._tell_dead(f, m, now, out)
            return
        if m is None or f.incarnation < m.inc:
            return  # not monitored, or refuted (stale)
        if not self._known(f.observer):
            return  # invented observers do not count
        is_dead = isinstance(f, wire.Dead)
        self._expire(m, now)
        acc = self._accusers(m)
        prev = acc.get(f.observer)
        if prev is not None and prev.ts >= f.ts and (prev.dead or not is_dead):
            return  # duplicate or older statement from the same observer
        if not self._verified(peer, f, out):
            return
        acc[f.observer] = Accusation(f.ts, now, frame, is_dead)
        self.accusations_heard += 1
        if len(acc) > self.max_accusers:
            oldest = min((a.received, o) for o, a in acc.items() if o != self.me)[1]
            del acc[oldest]
        self._confirmed(m, now)
        self._watch[f.subject] = None
        if m.state == ALIVE and len(acc) >= self.confirmations_needed:
            self._suspect(f.subject, m, now, out)
        # a lone accusation is not believed: check for ourselves. About
        # verify_fanout nodes of the overlay do, so a crash gains confirmations
        # fast and a false accusation meets direct evidence, at bounded cost.
        if self.me not in acc and now - m.verified_at >= self.probe_interval:
            m.verified_at = now
            p = min(1.0, self.verify_fanout / max(1, len(self._members)))
            if self._rng.random() < p:
                self._start_probe(f.subject, now, out)
        self._check(f.subject, now, out)

    def _tell_dead(self, f: wire.Accusation, m: Member, now: float, out: list[Effect]) -> None:
        """Someone still only suspects a member we hold dead (it started after the
        death, or was cut off): send the accuser our statement, so its lone
        accusation meets the confirmation it needs. About ``verify_fanout`` nodes
        do, at most once per member per probe period each."""
        if not isinstance(f, wire.Suspect) or m.last_frame is None:
            return
        if now - m.told_at < self.probe_interval:
            return
        if self._rng.random() < min(1.0, self.verify_fanout / max(1, len(self._members))):
            m.told_at = now
            out.append(Send(f.observer, self.protocol, m.last_frame))

    def _on_alive(
        self, peer: NodeId, f: wire.Alive, frame: bytes, now: float, out: list[Effect]
    ) -> None:
        if f.subject == self.me:
            # our own statement: echoed, or from a previous life we forgot
            if f.incarnation > self._inc and self._verified(peer, f, out):
                self._want_refute(f.incarnation, now, out)
            return
        m = self._members.get(f.subject)
        if m is None or f.incarnation <= m.inc:
            return
        if not self._verified(peer, f, out):
            return
        if m.accusers and self.me in m.accusers:
            # it was alive when we said otherwise: our timeouts are too short for
            # how slow we (or our links) are now, so stretch them (local health)
            self._health = min(self.health_max, self._health + 1)
        m.inc = f.incarnation
        self._clear(f.subject, m, now, out)

    def _verified(self, peer: NodeId, f: wire.Signed, out: list[Effect]) -> bool:
        try:
            self._verify(f.signer, f.signing_input(), f.signature)
        except BadSignature:
            out.append(Penalize(peer, Reason.BAD_SIGNATURE))
            return False
        return True

    def _suspect(self, node: NodeId, m: Member, now: float, out: list[Effect]) -> None:
        m.state, m.since, m.suspect_since = SUSPECT, now, now
        m.talk_mark = self._reads(node)
        m.talk_secured = self._handshakes(node)
        out.append(StateChanged(node, SUSPECT, now))

    def _talked(self, node: NodeId, m: Member) -> bool:
        """``node`` sent us something (or finished a security handshake with us)
        since we began to suspect it: its process runs, however late its answers
        come. A crashed process's connections close and a stopped or cut-off one
        sends nothing, so neither ever talks; a starved process does, in the
        seconds its refutation may take to reach us."""
        reads = self._reads(node)
        if reads is not None and (m.talk_mark is None or reads > m.talk_mark):
            return True  # a count that fell (one of two connections went) says nothing
        return self._handshook_since(node, m.talk_secured)

    def _handshakes(self, node: NodeId) -> int:
        """``secured(node)``: security handshakes completed with ``node`` so far
        (0 without ``secured``). Compare two values with ``_handshook_since``."""
        return 0 if self._secured is None else self._secured(node)

    def _handshook_since(self, node: NodeId, mark: int) -> bool:
        """A security handshake with ``node`` finished since ``_handshakes`` was
        ``mark``: its process answered (signed), whatever became of that
        connection. Only a count that grew: one that fell (the transport forgot
        the peer, as it does with the oldest when many peers handshake) proves
        nothing."""
        return self._secured is not None and self._secured(node) > mark

    def _confirmed(self, m: Member, now: float) -> None:
        if m.confirmed_at is None and len(m.accusers or ()) >= self.confirmations_needed:
            m.confirmed_at = now

    def _suspicion_deadline(self, m: Member) -> float:
        """Lifeguard's shrinking timeout from the start of our suspicion, but never
        less than ``suspicion_min`` after the confirmation that made it sufficient:
        two rare failures seconds apart must not combine into an instant death
        before the accused could hear of the second and refute."""
        n = len(m.accusers) if m.accusers else 0
        t = m.suspect_since + self.suspicion_timeout(max(0, n - 1))
        if m.confirmed_at is not None:
            t = max(t, m.confirmed_at + self.suspicion_min)
        return t

    def _check(self, node: NodeId, now: float, out: list[Effect]) -> None:
        """Expire old accusations, fire the suspicion timer, re-verify lingering suspicion."""
        m = self._members.get(node)
        if m is None:
            self._watch.pop(node, None)
            return
        acc = self._expire(m, now)
        if m.state == SUSPECT:
            if self.me not in acc and len(acc) < self.confirmations_needed:
                # remote confirmations aged out and we never saw a failure ourselves
                self._set_state(node, m, ALIVE, now, out)
                m.suspect_since = None
                m.look_at = None
            elif len(acc) >= self.confirmations_needed and now >= self._suspicion_deadline(m):
                if self._talked(node, m):
                    # word from it since we began to suspect it: alive and slow, not
                    # dead. Clear it here and hand it an accusation to refute
                    self.talked_suspects += 1
                    self._evidence(node, now, out)
                    return
                if not self._needs_own_look(node, m, acc, now, out):
                    self._declare_dead(node, m, now, out)
                    return
            elif m.reverify_at is not None and now >= m.reverify_at:
                # look again rather than wait for the round-robin; a failure re-accuses
                m.reverify_at = now + self.accusation_ttl / 2
                self._start_probe(node, now, out)
        if not acc and m.state != SUSPECT:
            m.accusers = None
            m.reverify_at = None
            self._watch.pop(node, None)

    def _needs_own_look(
        self, node: NodeId, m: Member, acc: dict[NodeId, Accusation], now: float, out: list[Effect]
    ) -> bool:
        """Old statements make us look, not declare.

        A remote statement that was already older than ``accusation_ttl`` (by its
        signer's clock) when it reached us is history: it may have been true
        while the accused was cut off, or we were, and the accused may have
        refuted long ago where we could not hear it (a dead-sync answer after
        our own cut, a newcomer's first answers). Such statements count toward
        DEAD only together with a failure we saw ourselves after they arrived;
        until then we probe the accused (at most once a probe period). Fresh
        statements count as before, so a crash still dies on the others' word.
        """
        stale = [
            a
            for o, a in acc.items()
            if o != self.me and a.received - a.ts / 1000 > self.accusation_ttl
        ]
        if not stale:
            return False
        fresh = len(acc) - len(stale)
        if fresh >= self.confirmations_needed:
            return False
        ours = acc.get(self.me)
        if ours is not None and ours.received >= max(a.received for a in stale):
            return False  # we saw it fail ourselves since
        if node not in self._probing and now - m.verified_at >= self.probe_interval:
            m.verified_at = now
            self.stale_checks += 1
            self._start_probe(node, now, out)
        # (a probe in flight wakes us by its own deadline; this is the fallback)
        m.look_at = max(m.verified_at + self.probe_interval, now + self.probe_interval / 4)
        return True

    def _expire(self, m: Member, now: float) -> dict[NodeId, Accusation]:
        """Drop remote accusations older than ``accusation_ttl``; return what is left."""
        acc = m.accusers or {}
        ttl = self.accusation_ttl
        for obs in [o for o, a in acc.items() if o != self.me and now - a.received >= ttl]:
            del acc[obs]
        if len(acc) < self.confirmations_needed:
            m.confirmed_at = None
        return acc

    def _declare_dead(self, node: NodeId, m: Member, now: float, out: list[Effect]) -> None:
        acc = m.accusers or {}
        dead_frames = sum(1 for o, a in acc.items() if a.dead and o != self.me)
        if self.me in acc and dead_frames < self.expected_confirmations:
            frame = wire.encode(
                wire.Dead(node, m.inc, self.me, wire.ts_of(now)).signed_with(self._sign)
            )
            out.append(Broadcast(self.topic, frame))
            m.last_frame = frame
        else:
            m.last_frame = self._accusation_for(node)
        others = sorted(
            (a for o, a in acc.items() if o != self.me and a.frame != m.last_frame),
            key=lambda a: -a.received,
        )
        keep = self.expected_confirmations - 1
        m.dead_frames = tuple(f for f in (m.last_frame, *(a.frame for a in others[:keep])) if f)
        m.accusers = None
        m.suspect_since = None
        m.confirmed_at = None
        m.reverify_at = None
        m.look_at = None
        self._watch.pop(node, None)
        self._set_state(node, m, DEAD, now, out)

    def _evidence(self, node: NodeId, now: float, out: list[Effect]) -> None:
        """``node`` just talked to us (or answered through a relay): it is alive."""
        m = self._members.get(node)
        if m is None or (m.state == ALIVE and not m.accusers):
            return
        hint = self._accusation_for(node) or m.last_frame
        if hint is not None and m.state != ALIVE:
            out.append(Send(node, self.protocol, hint))  # let it refute for the others
        self._clear(node, m, now, out)

    def _clear(self, node: NodeId, m: Member, now: float, out: list[Effect]) -> None:
        m.accusers = None
        m.suspect_since = None
        m.confirmed_at = None
        m.reverify_at = None
        m.look_at = None
        m.last_frame = None
        m.dead_frames = ()
        self._watch.pop(node, None)
        if m.state != ALIVE:
            self._set_state(node, m, ALIVE, now, out)

    def _set_state(self, node: NodeId, m: Member, state: str, now: float, out: list[Effect]):
        m.state, m.since = state, now
        out.append(StateChanged(node, state, now))

    def _accusers(self, m: Member) -> dict[NodeId, Accusation]:
        if m.accusers is None:
            m.accusers = {}
        return m.accusers

    def _accusation_for(self, node: NodeId) -> bytes | None:
        """One signed accusation against ``node`` (ours if we have one, else the newest)."""
        m = self._members.get(node)
        if m is None or not m.accusers:
            return None
        mine = m.accusers.get(self.me)
        if mine is not None:
            return mine.frame
        return max(m.accusers.values(), key=lambda a: a.received).frame

    def _known(self, node: NodeId) -> bool:
        if self._is_known is not None:
            return self._is_known(node)
        return node in self._members

    # -- refutation -------------------------------------------------------------

    def _want_refute(self, accused_inc: int, now: float, out: list[Effect]) -> None:
        """Accused at ``accused_inc``: announce an incarnation above it.

        An accusation below our incarnation is answered too, with the incarnation
        we hold (no new one): its accuser, and whoever counts its word, never
        heard that incarnation (a node starts at its clock in ms, which nobody
        knows until it announces it; a newcomer missed our last refutation), at
        most once per ``accusation_ttl``: stale frames keep travelling for a while
        (hints, dead-sync answers) after the others have learnt our incarnation.
        Both kinds share the rate limit of ``_refute``.
        """
        if accused_inc < self._inc:
            if now - self._alive_at < self.accusation_ttl:
                return  # said lately; a stale frame still travelling is harmless
            to = self._inc
        else:
            to = min(U64_MAX, min(accused_inc, self._inc + MAX_INC_JUMP) + 1)
            if to <= self._inc:
                return  # incarnation space exhausted: nothing more we can say
        self._refute_to = max(self._refute_to or 0, to)
        if now >= self._next_refute_at:
            self._refute(now, out)

    def _refute(self, now: float, out: list[Effect]) -> None:
        """Announce (signed) that we are alive at a higher incarnation. At most one
        refutation per probe interval, so a spammer cannot make us flood. A new
        incarnation raises our health (Lifeguard: being suspected hints that we are
        slow); repeating the one we hold (a stale accusation, maybe replayed) does not."""
        if self._refute_to > self._inc:
            self._health = min(self.health_max, self._health + 1)
        self._inc = self._refute_to
        self._refute_to = None
        self._next_refute_at = now + self.probe_interval
        self._alive_at = now
        frame = wire.encode(wire.Alive(self.me, self._inc, wire.ts_of(now)).signed_with(self._sign))
        out.append(Broadcast(self.topic, frame))
