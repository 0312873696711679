"""Sans-I/O failure detection: SWIM probes with Lifeguard-style suspicion.

Each probe period the core pings the next member of a shuffled round-robin.
If no ``Ack`` arrives within ``probe_timeout`` it asks ``indirect_k`` other
members to ping the target for it (``PingReq``; a relay that hears nothing
answers ``Nack``); if still nothing has arrived at the end of the period, the
target becomes SUSPECT here, a signed ``Suspect`` is gossiped (``Broadcast``
on ``hydra/liveness``) and sent to the target itself, and we look again one
period later. Every node that holds a suspicion runs a timer that starts at
``suspicion_max`` and shrinks towards ``suspicion_min`` as independent
confirmations (signed accusations by distinct observers) arrive; when it
expires the node is DEAD. The accused node refutes with a signed ``Alive`` at
a higher incarnation, which clears the accusation everywhere.

Lifeguard's local health: a probe that fails although the relays did not nack
(so the fault may be ours), a refutation, or a stall of our own raise
``health``; answered probes lower it; probe interval and timeout are scaled
by ``1 + health``. A gap between ticks much longer than a probe interval is
taken as our own stall (SIGSTOP, swap): probes in flight then accuse nobody
and suspicion timers restart. A shorter lateness counts too: a probe whose
deadline we look at more than a whole ``probe_timeout`` after it passed (a
starved process, its ack perhaps unread in our buffers) accuses nobody yet;
it raises our health and gets one more timeout from then. An answer to a
probe that already failed (the last ``2 * max_pending_probes`` are
remembered) is evidence that the target is alive and raises our health too:
our timeouts were too short for how slow we, or our links, are. Round
trips are measured too (direct acks, late ones included): the direct timeout
is ``probe_timeout`` or, when longer, TCP's ``srtt + 4 * rttvar`` (at most
``probe_timeout * (1 + health_max)``), and the probe period stretches with it,
so a process whose acks are slow stops accusing before it has accused anyone
twice, where health alone swings back and forth with each answered probe.

A probe whose target sent us anything at all while we waited (``heard``: the
transport counts what it reads from each member's connections) does not fail
either, whatever the timeouts: bytes from the target prove that its process
runs, and a busy machine's answers come late. It changes neither side's
health (whose slowness it is cannot be told; a late ack to it is ignored),
and the indirect probes are skipped once the target has been heard from. A
probe that began with no connection to its target (a lone accusation checked,
a dead member looked at again, an exit) and still has none at its deadline
gets ``dial_grace`` more once: on a busy machine the dial's handshake is what
it waited for. A ``probe_now`` probe (the connection it follows just closed,
which is how a crash looks, and waiting would delay failover), or one whose
connection closed while it waited, gets it only if the target's address
accepted a dial of ours meanwhile (``answered``): a crashed process's port
refuses the dial, while a live process on a busy machine accepts it and
takes seconds to finish the handshake. A crashed process's connections close
and a stopped or cut-off one sends nothing, so neither is ever heard. A
security handshake with the target that completes while we wait
(``secured``) counts the same, even when the connection fails right after
it: the handshake is signed with the target's key, so its process ran, and
on a saturated machine a dial's handshake often completes while the
connection setup after it times out (a crashed process refuses the dial, a
stopped or cut-off one never answers it). The same word counts when a
suspicion timer runs out: a member that talked to us (or handshook) since we
began to suspect it is not declared dead but cleared here, and handed an
accusation to refute (``Suspicion._talked``; a starved process's refutation
can take longer to cross the overlay than the timer lasts). For the same
reason a routine turn of an alive, unaccused member that has sent us
anything since our last look at it (its own ping, an ack, gossip, a sync
round) sends no ping at all (``passive_looks``): the turn is spent, and its
next turn pings it unless it talked again. A member that stops sending is
pinged at its next turn or the one after; a closed connection still brings a
ping at once (``probe_now``).

Deaths announced before a node started (or while it was cut off) are not
gossiped again, so a node sends a ``DeadReq`` to the first
``dead_sync_first`` distinct members that prove alive (they ping it, or answer
its ping), and to one such member every ``dead_sync_every`` seconds after that;
the target answers with the signed statements (its own and up to
``expected_confirmations - 1`` others') it kept about the (at most
``max_dead_reply``) newest members it holds dead, and these count as any
other accusation does (several distinct signers are still needed). Without
this a newcomer would hold a dead exit live until its own probe reached it,
and nobody else would confirm its lone accusation. But a statement already
older than ``accusation_ttl`` (by its signer's ``ts``) when it arrives counts
toward DEAD only with a failure we saw ourselves after it arrived; until
then we probe the accused (``Suspicion._needs_own_look``): it may have come
back and refuted where we could not hear it. And, so that lone accusations
get confirmed, a node that holds a member dead answers a ``Suspect`` about it
(with probability
``verify_fanout / members``, at most once per probe period) by sending the
accuser its own statement. ``probe_now`` lets the
transport report a closed connection, so a crashed member is probed at once
instead of at its turn in the round-robin.

Driving it: call ``tick(now)`` at ``next_wakeup()`` (or more often), feed every
liveness frame (direct stream or gossip) to ``receive``, and keep the member
set current with ``set_members``. ``Send`` effects go on ``protocol``,
``Broadcast`` effects on ``topic``. A node that should not dial the whole
overlay to probe it passes the members it has connections to (and the exits)
to ``set_near``: the round-robin and the indirect probes then use only those,
and every member is still probed about once a period by its own neighbours.
With ``calm_interval`` set, only the members passed to ``set_critical`` (exits
and standbys), the dead and the suspected or accused are probed at that rate;
the other members get a round-robin of their own with one probe per
``calm_interval`` (calm turns), which is most of an idle node's probing.

This module holds the probing half (round-robin, indirect probes, local health,
dead sync); the accusation half (suspicion timers, death, evidence, refutation)
is its base class ``Suspicion`` in ``suspicion.py``.

Invariants:
- DEAD needs the suspicion timer to expire, no word from the member since
  we began to suspect it (``heard``/``secured``), *and* at least
  ``confirmations_needed`` distinct observers (ourselves included) accusing
  the same incarnation, so one node, however often it signs, cannot get a
  healthy node removed. A lone accusation by someone else is never believed:
  it makes us probe the accused ourselves (with a probability chosen so that
  about ``verify_fanout`` nodes of the overlay do so).
- Direct evidence wins: a Ping or Ack from a node (or an Ack relayed for it)
  clears every accusation we hold against it and makes it ALIVE here; we then
  send it one accusation so it can refute for everybody else. DEAD members
  are pinged once per ``dead_reprobe`` so a healed partition heals here too.
- DEAD comes no sooner than ``suspicion_min`` after the confirmation that made
  the accusations sufficient, so two rare failures seconds apart do not
  combine into a death before the accused could refute.
- Only a node's own ``Alive`` raises its known incarnation. Accusations at a
  higher incarnation than we know count against the incarnation we know (so a
  forged huge incarnation cannot block later refutations); accusations at a
  lower one are stale and ignored.
- Every Suspect/Dead/Alive we accept carries a valid signature of its signer;
  bad ones give ``Penalize(peer, BAD_SIGNATURE)``; undecodable frames give
  ``Penalize(peer, reason)``. ``receive`` never raises on remote input.
- Accusations count only from observers the membership knows (``is_known``),
  so inventing keys does not add confirmations.
- State is bounded: at most ``max_pending_probes`` probes, ``max_relays``
  relayed probes and ``max_accusers`` accusations per member; remote
  accusations are forgotten after ``accusation_ttl`` seconds.
- Gossip is bounded: we broadcast our own Suspect (or Dead) only while we know
  fewer than ``expected_confirmations`` other accusers (Dead frames), so one
  failure costs O(``expected_confirmations`` + ``verify_fanout``) broadcasts,
  not one per node.
- Time and randomness come only from ``now`` arguments and the ``rng``;
  nothing here does I/O. Iteration orders are deterministic given the inputs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..crypto import NodeId
from ..errors import DecodeError, LocalError
from ..wire import liveness as wire
from .effects import Effect, Penalize, Send
from .suspicion import (
    ALIVE,
    DEAD,
    SUSPECT,
    U64_MAX,
    UNKNOWN,
    Member,
    Suspicion,
)
from .suspicion import MAX_INC_JUMP as MAX_INC_JUMP

PROTOCOL = "/hydra/liveness/1"
TOPIC = "hydra/liveness"

Verifier = Callable[[NodeId, bytes, bytes], None]


def _verify_ed25519(signer: NodeId, message: bytes, signature: bytes) -> None:
    signer.verify(message, signature)


@dataclass(slots=True)
class _Probe:
    target: NodeId
    nonce: int
    indirect_at: float
    deadline: float
    relays: tuple[NodeId, ...] = ()
    indirect_sent: bool = False
    nacks: int = 0
    graced: bool = False  # its deadline was seen late once and moved (see ``tick``)
    sent: float = 0.0  # when the Ping went out (round-trip samples)
    heard0: int | None = None  # ``heard(target)`` when the probe started
    secured0: int = 0  # ``secured(target)`` when the probe started
    after_close: bool = False  # ``probe_now``: a missing connection is no reason to wait
    dial_graced: bool = False  # its deadline was moved once for a dial (see ``tick``)
    answered0: int = 0  # ``answered(target)`` when the probe started


@dataclass(slots=True)
class _Relay:
    requester: NodeId
    nonce: int  # the requester's nonce
    target: NodeId
    nack_at: float
    expires: float
    nacked: bool = False


@dataclass(slots=True)
class _Round:
    """A shuffled round-robin over the members (may hold removed ids until pruned)."""

    order: list[NodeId]
    pos: int = 0

    def add(self, new: list[NodeId], rng: random.Random) -> None:
        """Newcomers go to random slots in the rest of this round, so they come soon."""
        if len(new) <= 16:
            for n in new:
                self.order.insert(rng.randint(self.pos, len(self.order)), n)
        else:
            tail = self.order[self.pos :] + new
            rng.shuffle(tail)
            self.order[self.pos :] = tail

    def prune(self, members: Mapping[NodeId, Member]) -> None:
        if len(self.order) > 2 * len(members) + 16:
            self.order = [n for n in self.order if n in members]
            self.pos = min(self.pos, len(self.order))

    def next(
        self, members: Mapping[NodeId, Member], rng: random.Random, take: Callable[[NodeId], bool]
    ) -> NodeId | None:
        """The next member ``take`` accepts, at most one whole round ahead."""
        for _ in range(len(self.order) + 1):
            if self.pos >= len(self.order):
                self.order = [n for n in self.order if n in members]
                rng.shuffle(self.order)
                self.pos = 0
                if not self.order:
                    return None
            node = self.order[self.pos]
            self.pos += 1
            if node in members and take(node):
                return node
        return None


class Liveness(Suspicion):
    """SWIM + Lifeguard failure detector for one node. See the module docstring.

    ``sign(msg) -> signature`` signs with this node's key (``me``);
    ``verify(signer, msg, sig)`` raises ``BadSignature`` (default: Ed25519 via
    ``NodeId.verify``; a simulator may pass a cheaper stand-in).
    ``is_known(node)`` says whether ``node`` holds a valid membership record
    (default: it is one of the monitored members).
    ``heard(node)`` is a count that grows whenever ``node`` sends us anything
    over an authenticated connection (None when we have none to it); a probe
    whose target was heard from while it ran does not fail (``tick``).
    ``secured(node)`` is a count that grows whenever a security handshake with
    ``node`` completes, in either direction, also on a connection that fails
    right after; one during a probe counts as word from the target too.

    Defaults: 0.5 s probes with a 0.25 s direct timeout sit between
    memberlist's LAN (1 s / 0.5 s) and aggressive (0.2 s / 0.1 s) profiles;
    with ``indirect_k = 3`` one lossy link rarely fails a whole probe. The
    suspicion timeout runs from 4 s (one accuser) down to 1 s (ourselves and two
    others or more, ``expected_confirmations = 2``, memberlist's
    ``SuspicionMult - 2``), so a crash is declared about 2 s after it happens.
    ``confirmations_needed = 2`` is the smallest number that keeps a single liar
    from killing anyone. ``verify_fanout = 6``
    nodes re-probe on a lone accusation. ``accusation_ttl`` defaults to twice
    ``suspicion_max``.
    """

    def __init__(
        self,
        me: NodeId,
        sign: Callable[[bytes], bytes],
        rng: random.Random,
        *,
        probe_interval: float = 0.5,
        probe_timeout: float = 0.25,
        indirect_k: int = 3,
        suspicion_min: float = 1.0,
        suspicion_max: float = 4.0,
        confirmations_needed: int = 2,
        expected_confirmations: int = 2,
        verify_fanout: int = 6,
        accusation_ttl: float | None = None,
        health_max: int = 8,
        dead_reprobe: float = 10.0,
        dead_sync_first: int = 3,
        dead_sync_every: float = 30.0,
        max_dead_reply: int = 64,
        max_pending_probes: int = 32,
        max_relays: int = 64,
        max_accusers: int = 16,
        incarnation: int = 0,
        protocol: str = PROTOCOL,
        topic: str = TOPIC,
        verify: Verifier | None = None,
        is_known: Callable[[NodeId], bool] | None = None,
        heard: Callable[[NodeId], int | None] | None = None,
        secured: Callable[[NodeId], int] | None = None,
        answered: Callable[[NodeId], int] | None = None,
        dial_grace: float = 5.0,
        calm_interval: float | None = None,
    ) -> None:
        if not 0 < probe_timeout < probe_interval:
            raise LocalError("need 0 < probe_timeout < probe_interval")
        if not 0 < suspicion_min <= suspicion_max:
            raise LocalError("need 0 < suspicion_min <= suspicion_max")
        if confirmations_needed < 1 or indirect_k < 0 or expected_confirmations < 1:
            raise LocalError("confirmations_needed and expected_confirmations must be >= 1")
        if max_accusers < confirmations_needed:
            raise LocalError("max_accusers must be >= confirmations_needed")
        if calm_interval is not None and calm_interval < probe_interval:
            raise LocalError("need calm_interval >= probe_interval")
        self.me = me
        self._sign = sign
        self._rng = rng
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.indirect_k = indirect_k
        self.suspicion_min = suspicion_min
        self.suspicion_max = suspicion_max
        self.confirmations_needed = confirmations_needed
        self.expected_confirmations = expected_confirmations
        self.verify_fanout = verify_fanout
        self.accusation_ttl = 2 * suspicion_max if accusation_ttl is None else accusation_ttl
        self.health_max = health_max
        self.dead_reprobe = dead_reprobe
        self.dead_sync_every = dead_sync_every
        self.max_dead_reply = max_dead_reply
        self.max_pending_probes = max_pending_probes
        self.max_relays = max_relays
        self.max_accusers = max_accusers
        self.protocol = protocol
        self.topic = topic
        self._verify = verify or _verify_ed25519
        self._is_known = is_known
        self._heard = heard
        self._secured = secured
        self._answered = answered
        self.dial_grace = dial_grace
        self._near: set[NodeId] | None = None  # see ``set_near``; None: every member
        self.calm_interval = calm_interval  # see ``set_critical``; None: no calm turns
        self._critical: frozenset[NodeId] = frozenset()

        self._inc = min(incarnation, U64_MAX)
        self._refute_to: int | None = None  # incarnation a pending refutation will announce
        self._next_refute_at = -math.inf
        self._alive_at = -math.inf
        self._health = 0
        self._members: dict[NodeId, Member] = {}
        self._round = _Round([])  # routine probes
        self._calm_round = _Round([])  # calm turns (see ``set_critical``)
        self._next_calm_at: float | None = None
        self._probes: dict[int, _Probe] = {}
        self._probing: dict[NodeId, int] = {}
        self._relays: dict[int, _Relay] = {}
        self._watch: dict[NodeId, None] = {}  # members with accusations or suspicion
        self._next_probe_at: float | None = None
        self._last_tick: float | None = None
        self._dead_pulls = dead_sync_first  # DeadReqs still to send to distinct live peers
        self._pulled: set[NodeId] = set()
        self._next_dead_pull = -math.inf
        self._dead_answered: dict[NodeId, float] = {}  # DeadReq rate limit per peer
        self.accusations_heard = 0  # signed accusations by members taken into account
        self.stale_checks = 0  # probes made because only old statements accused a member
        self.talked_suspects = 0  # suspicions ended at their deadline: the member had talked
        self.late_probes = 0  # probe deadlines seen a whole timeout late (graced once)
        self.late_acks = 0  # answers to probes that had already failed
        self.heard_probes = 0  # probes unanswered in time by a member we heard from
        self.dial_waits = 0  # deadlines moved because no connection to the target existed yet
        self.passive_looks = 0  # routine turns that needed no ping: the member had talked to us
        # recent failed probes: target, relays, when the Ping went out
        self._failed: dict[int, tuple[NodeId, tuple[NodeId, ...], float]] = {}
        self._srtt: float | None = None  # smoothed round trip of direct probes
        self._rttvar = 0.0

    # -- public surface -------------------------------------------------------

    @property
    def incarnation(self) -> int:
        """Our own incarnation: raised by each refutation."""
        return self._inc

    @property
    def health(self) -> int:
        """Lifeguard local-health score, 0 (healthy) .. ``health_max``."""
        return self._health

    @property
    def multiplier(self) -> int:
        """Factor applied to probe interval and timeout: ``1 + health``."""
        return 1 + self._health

    @property
    def timeout(self) -> float:
        """The direct-probe timeout before the health multiplier: ``probe_timeout``,
        or the round trip our probes take now (``srtt + 4 * rttvar``, TCP's RTO
        rule) when that is longer, at most ``probe_timeout * (1 + health_max)``."""
        if self._srtt is None:
            return self.probe_timeout
        rto = self._srtt + 4 * self._rttvar
        return min(max(self.probe_timeout, rto), self.probe_timeout * (1 + self.health_max))

    @property
    def interval(self) -> float:
        """The probe period before the health multiplier: ``probe_interval``,
        stretched in proportion when ``timeout`` is (the indirect probes need
        their share of the period)."""
        return self.probe_interval * (self.timeout / self.probe_timeout)

    @property
    def srtt(self) -> float | None:
        """Smoothed round trip of direct probes (seconds), None before the first."""
        return self._srtt

    def _rtt_sample(self, rtt: float) -> None:
        rtt = max(0.0, rtt)
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt

    def set_members(self, members: Iterable[NodeId], now: float) -> None:
        """Monitor exactly ``members`` (ourselves excluded).

        New members start ALIVE at ``now``; removed members are forgotten
        (their pending probes are ignored when they end).
        """
        wanted = set(members)
        wanted.discard(self.me)
        for gone in [n for n in self._members if n not in wanted]:
            del self._members[gone]
            self._watch.pop(gone, None)
        new = sorted(n for n in wanted if n not in self._members)
        for n in new:
            self._members[n] = Member(since=now)
        for r in (self._round, self._calm_round) if self.calm_interval else (self._round,):
            r.add(new, self._rng)
            r.prune(self._members)

    def set_near(self, nodes: Iterable[NodeId] | None) -> None:
        """Probe only ``nodes`` in the round-robin (None: every member, the default).

        A node that passes the members it already has connections to (and the
        exits) probes without dialling anybody: each member is still probed
        about once a period, by those connected to it. The others stay
        monitored: their accusations are heard and checked (a lone accusation
        still makes us probe), the dead are still looked at now and then, and
        indirect probes go through near members first.
        """
        self._near = None if nodes is None else set(nodes)

    def set_critical(self, nodes: Iterable[NodeId]) -> None:
        """The members whose failure must be seen fastest (exits and standbys: the
        exit pool replaces a dead exit). With ``calm_interval`` set, the routine
        round-robin (one probe per probe period) holds only these, the dead and
        the members under suspicion or accused; the other members, alive and
        unaccused, get their own round-robin with one probe per
        ``calm_interval``. A crash still closes their connections, which brings
        a probe at once (``probe_now``), and an accusation, a suspicion or a
        closed connection moves a member back to the full rate."""
        self._critical = frozenset(nodes)

    def state(self, node: NodeId) -> tuple[str, float]:
        """``(state, since)`` for a monitored node, ``("unknown", 0.0)`` otherwise."""
        m = self._members.get(node)
        return (UNKNOWN, 0.0) if m is None else (m.state, m.since)

    def incarnation_of(self, node: NodeId) -> int | None:
        """The highest incarnation ``node`` has proven to us (its own Alive; 0 until
        then), None if it is not monitored."""
        m = self._members.get(node)
        return None if m is None else m.inc

    def view(self) -> dict[NodeId, tuple[str, float]]:
        """Every monitored node with its state and the time that state began."""
        return {n: (m.state, m.since) for n, m in self._members.items()}

    def states(self) -> dict[NodeId, str]:
        """Every monitored node with its state (the mapping ``ExitPool.update`` takes)."""
        return {n: m.state for n, m in self._members.items()}

    def next_wakeup(self) -> float | None:
        """The earliest time ``tick`` has work to do (None before the first tick)."""
        t = self._next_probe_at
        if t is None:
            return None
        if self._next_calm_at is not None:
            t = min(t, self._next_calm_at)
        for p in self._probes.values():
            t = min(t, p.deadline if p.indirect_sent else p.indirect_at)
        for r in self._relays.values():
            if not r.nacked:
                t = min(t, r.nack_at)
        if self._refute_to is not None:
            t = min(t, self._next_refute_at)
        for node in self._watch:
            m = self._members[node]
            if m.accusers:
                for obs, a in m.accusers.items():
                    if obs != self.me:
                        t = min(t, a.received + self.accusation_ttl)
                if m.state == SUSPECT and len(m.accusers) >= self.confirmations_needed:
                    d = self._suspicion_deadline(m)
                    t = min(t, d if m.look_at is None else max(d, m.look_at))
            if m.reverify_at is not None:
                t = min(t, m.reverify_at)
        return t

    # -- time -------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Advance to ``now``: time out probes, expire suspicions, start the next probe."""
        out: list[Effect] = []
        if self._last_tick is not None:
            gap = now - self._last_tick
            if gap > 3 * self.interval * self.multiplier:
                self._stalled(now)
        self._last_tick = now
        if self._next_probe_at is None:
            # first tick: spread nodes over the period so they do not probe in lockstep
            self._next_probe_at = now + self._rng.uniform(0, self.probe_interval)

        for nonce in list(self._probes):
            p = self._probes[nonce]
            if now >= p.deadline and not p.graced and now - p.deadline > self.probe_timeout:
                # we looked a whole timeout late (this process is starved: an ack may
                # be sitting unread in our buffers): not evidence against the target.
                # Our health worsens (so intervals and timeouts stretch) and the
                # probe gets one more timeout, counted from now
                p.graced = True
                self._health = min(self.health_max, self._health + 1)
                p.deadline = now + self.timeout * self.multiplier
                self.late_probes += 1
                continue
            if now >= p.deadline:
                reads = self._reads(p.target)
                if self._heard is not None and reads is None and not p.dial_graced:
                    if (p.heard0 is None and not p.after_close) or self._dial_answered(p):
                        # no connection to the target now: the dial (a handshake
                        # on a busy machine) is what we waited for, not the
                        # target. One more ``dial_grace``, then it counts as a
                        # failure. After a close (a crash closes connections)
                        # only if its address accepted a dial of ours since the
                        # probe began: a crashed process's port refuses it
                        p.dial_graced = True
                        p.deadline = now + self.dial_grace
                        self.dial_waits += 1
                        continue
                self._end_probe(nonce)
                if _moved(p.heard0, reads) or self._handshook_since(p.target, p.secured0):
                    # the target sent us something while we waited: its process
                    # runs and only answers late (a busy machine, ours or its).
                    # Not a failure, and no blame either way: whose slowness it
                    # is we cannot tell (our health stays, its late ack is ignored)
                    self.heard_probes += 1
                    continue
                self._failed[nonce] = (p.target, p.relays, p.sent)
                if len(self._failed) > 2 * self.max_pending_probes:
                    del self._failed[next(iter(self._failed))]
                # Lifeguard: if every relay told us it could not reach the target
                # either, our own link is fine and our health does not suffer
                self._probe_failed(
                    p.target, now, out, blame_self=p.nacks < len(p.relays) or not p.relays
                )
            elif not p.indirect_sent and now >= p.indirect_at:
                if _moved(p.heard0, self._reads(p.target)) or self._handshook_since(
                    p.target, p.secured0
                ):
                    p.indirect_sent = True  # it is talking to us: no one else need look
                else:
                    self._send_ping_reqs(p, out)
        for nonce in list(self._relays):
            r = self._relays[nonce]
            if now >= r.expires:
                del self._relays[nonce]
            elif not r.nacked and now >= r.nack_at:
                r.nacked = True
                out.append(Send(r.requester, self.protocol, wire.encode(wire.Nack(r.nonce))))
        for node in list(self._watch):
            self._check(node, now, out)
        if self._refute_to is not None and now >= self._next_refute_at:
            self._refute(now, out)
        if now >= self._next_probe_at:
            target = self._next_target(now)
            if target is not None and not self._heard_since_last_look(target, now):
                self._start_probe(target, now, out)
            self._next_probe_at = now + self.interval * self.multiplier
        if self.calm_interval is not None:
            if self._next_calm_at is None:
                self._next_calm_at = now + self._rng.uniform(0, self.calm_interval)
            elif now >= self._next_calm_at:
                target = self._next_target(now, calm=True)
                if target is not None and not self._heard_since_last_look(target, now):
                    self._start_probe(target, now, out)
                self._next_calm_at = now + self.calm_interval * self.multiplier
        return out

    # -- input ------------------------------------------------------------------

    def receive(self, peer: NodeId, frame: bytes, now: float) -> list[Effect]:
        """Handle one frame from ``peer`` (a direct stream or the gossip topic)."""
        try:
            f = wire.decode(frame)
        except DecodeError as e:
            return [Penalize(peer, e.reason)]
        out: list[Effect] = []
        if peer == self.me:
            return out
        if isinstance(f, wire.Ping):
            out.append(Send(peer, self.protocol, wire.encode(wire.Ack(f.nonce))))
            self._evidence(peer, now, out)
            self._maybe_pull(peer, now, out)
        elif isinstance(f, wire.Ack):
            self._on_ack(peer, f.nonce, now, out)
        elif isinstance(f, wire.Nack):
            p = self._probes.get(f.nonce)
            if p is not None and peer in p.relays:
                p.nacks += 1
        elif isinstance(f, wire.PingReq):
            self._on_ping_req(peer, f, now, out)
        elif isinstance(f, wire.DeadReq):
            self._evidence(peer, now, out)
            self._on_dead_req(peer, now, out)
        elif isinstance(f, wire.Alive):
            self._on_alive(peer, f, frame, now, out)
        else:
            self._on_accusation(peer, f, frame, now, out)
        return out

    def probe_now(self, node: NodeId, now: float) -> list[Effect]:
        """A hint from the transport: our connection to ``node`` just closed.

        Probe it now rather than at its turn in the round-robin, so a crashed
        node (its sockets closed by its kernel) is suspected about one probe
        period after the crash instead of up to a whole round later. This is
        only a probe: an answered one costs a ping, a failed one accuses as any
        failed probe does. At most one such probe per member per probe period.
        """
        out: list[Effect] = []
        m = self._members.get(node)
        if m is None or m.state == DEAD or node in self._probing:
            return out
        if now - m.hinted_at < self.probe_interval * self.multiplier:
            return out
        m.hinted_at = now
        # the connection just closed (a crash closes it): no dial to wait for
        self._start_probe(node, now, out, dial_grace=False)
        return out

    def _maybe_pull(self, peer: NodeId, now: float, out: list[Effect]) -> None:
        """``peer`` just proved it is alive (pinged us, or answered our ping): if we
        still want to learn deaths, ask it (``DeadReq``). Asking only members that
        answer matters: a newcomer's view may hold more dead members than live ones."""
        if peer not in self._members:
            return
        if self._dead_pulls > 0:
            if peer in self._pulled:
                return
            self._pulled.add(peer)
            self._dead_pulls -= 1
            if not self._dead_pulls:
                self._pulled.clear()
        elif now < self._next_dead_pull:
            return
        self._next_dead_pull = now + self.dead_sync_every
        out.append(Send(peer, self.protocol, wire.encode(wire.DeadReq())))

    def _on_dead_req(self, peer: NodeId, now: float, out: list[Effect]) -> None:
        """Answer with our signed statements about the newest deaths (rate-limited)."""
        if now - self._dead_answered.get(peer, -math.inf) < self.probe_interval:
            return
        if len(self._dead_answered) >= 4 * self.max_relays:
            self._dead_answered.clear()
        self._dead_answered[peer] = now
        dead = [
            (m.since, n, m.dead_frames)
            for n, m in self._members.items()
            if m.state == DEAD and m.dead_frames and n != peer
        ]
        dead.sort(key=lambda d: (-d[0], bytes(d[1])))
        # several signers each: one answer is enough for the asker to confirm a death
        for _, _, frames in dead[: self.max_dead_reply]:
            out.extend(Send(peer, self.protocol, f) for f in frames)

    # -- probing ----------------------------------------------------------------

    def _next_target(self, now: float, calm: bool = False) -> NodeId | None:
        """The next member of the routine round-robin, or of the calm turns' one."""

        def take(node: NodeId) -> bool:
            m = self._members[node]
            if node in self._probing or self._is_calm(node, m) != calm:
                return False
            if self._near is not None and m.state != DEAD and node not in self._near:
                return False  # watched by the members connected to it
            # the dead are looked at now and then, so a healed partition heals here too
            return m.state != DEAD or now - m.probed_at >= self.dead_reprobe

        return (self._calm_round if calm else self._round).next(self._members, self._rng, take)

    def _is_calm(self, node: NodeId, m: Member) -> bool:
        """A member for the calm turns (``set_critical``): alive, unaccused, and
        neither an exit nor a standby."""
        return (
            self.calm_interval is not None
            and m.state == ALIVE
            and not m.accusers
            and node not in self._critical
        )

    def _heard_since_last_look(self, target: NodeId, now: float) -> bool:
        """A routine turn of an alive, unaccused member that has sent us something
        since our last look at it needs no ping: those bytes already show that its
        process runs (what an answered ping would show). The turn is spent (and
        counted in ``passive_looks``); health and timeouts are left alone."""
        m = self._members.get(target)
        if m is None:
            return False
        reads = self._reads(target)
        mark, m.heard_mark = m.heard_mark, reads
        if (
            m.state != ALIVE
            or m.accusers
            or mark is None  # first look (or a new connection): ping
            or not _moved(mark, reads)
        ):
            return False
        m.probed_at = now
        self.passive_looks += 1
        return True

    def _start_probe(
        self, target: NodeId, now: float, out: list[Effect], *, dial_grace: bool = True
    ) -> bool:
        if target in self._probing or len(self._probes) >= self.max_pending_probes:
            return False
        nonce = self._rng.getrandbits(64)
        mult = self.multiplier
        probe = _Probe(
            target,
            nonce,
            now + self.timeout * mult,
            now + self.interval * mult,
            sent=now,
            after_close=not dial_grace,
        )
        m = self._members.get(target)
        if m is not None:
            m.probed_at = now
            if m.state == DEAD:
                probe.indirect_sent = True  # a direct look is enough for the dead
        probe.heard0 = self._reads(target)
        probe.secured0 = self._handshakes(target)
        probe.answered0 = self._answered(target) if self._answered is not None else 0
        if m is not None:
            m.heard_mark = probe.heard0
        self._probes[nonce] = probe
        self._probing[target] = nonce
        hint = self._accusation_for(target)
        if hint is not None:  # tell the target what it is accused of, so it can refute
            out.append(Send(target, self.protocol, hint))
        out.append(Send(target, self.protocol, wire.encode(wire.Ping(nonce)), urgent=True))
        return True

    def _reads(self, node: NodeId) -> int | None:
        """``heard(node)``; None without ``heard`` (nothing is ever heard then)."""
        return None if self._heard is None else self._heard(node)

    def _dial_answered(self, p: _Probe) -> bool:
        """The target's address accepted a dial of ours since the probe began: a
        process listens there (a crashed one's port refuses)."""
        return self._answered is not None and self._answered(p.target) > p.answered0

    def _send_ping_reqs(self, p: _Probe, out: list[Effect]) -> None:
        p.indirect_sent = True
        relays = self._pick_relays(p.target, self.indirect_k)
        p.relays = tuple(relays)
        frame = wire.encode(wire.PingReq(p.target, p.nonce))
        out.extend(Send(r, self.protocol, frame) for r in relays)

    def _pick_relays(self, target: NodeId, k: int) -> list[NodeId]:
        """Up to ``k`` distinct ALIVE members other than ``target``, chosen at random
        (near ones when ``set_near`` gave some: a relay we talk to needs no dial)."""
        pool = self._round.order
        if self._near is not None:
            near = sorted(
                n for n in self._near if n != target and self._members.get(n, _DEAD).state == ALIVE
            )
            if near:  # fewer relays rather than a dial
                return self._rng.sample(near, min(k, len(near)))
        chosen: list[NodeId] = []
        if not pool or k <= 0:
            return chosen
        for _ in range(4 * k + 8):
            n = pool[self._rng.randrange(len(pool))]
            m = self._members.get(n)
            if n != target and m is not None and m.state == ALIVE and n not in chosen:
                chosen.append(n)
                if len(chosen) == k:
                    return chosen
        if len(pool) <= 64:  # small overlays: make sure we find them if they exist
            rest = [
                n
                for n in pool
                if n != target and n not in chosen and self._members.get(n, _DEAD).state == ALIVE
            ]
            rest = sorted(set(rest))
            self._rng.shuffle(rest)
            chosen.extend(rest[: k - len(chosen)])
        return chosen

    def _end_probe(self, nonce: int) -> None:
        p = self._probes.pop(nonce)
        if self._probing.get(p.target) == nonce:
            del self._probing[p.target]

    def _on_ack(self, peer: NodeId, nonce: int, now: float, out: list[Effect]) -> None:
        p = self._probes.get(nonce)
        if p is not None and (peer == p.target or peer in p.relays):
            self._end_probe(nonce)
            self._health = max(0, self._health - 1)
            if peer == p.target:
                self._rtt_sample(now - p.sent)
            self._evidence(p.target, now, out)
            if peer == p.target:
                self._maybe_pull(peer, now, out)
            return
        r = self._relays.get(nonce)
        if r is not None and peer == r.target:
            del self._relays[nonce]
            out.append(Send(r.requester, self.protocol, wire.encode(wire.Ack(r.nonce))))
            self._evidence(peer, now, out)
        late = self._failed.pop(nonce, None)
        if late is not None and (peer == late[0] or peer in late[1]):
            # the answer to a probe that already failed: the target is alive, and
            # our timeouts are too short for how slow we (or our links) are now.
            # Lifeguard-style, our health worsens, stretching them
            self.late_acks += 1
            self._health = min(self.health_max, self._health + 1)
            if peer == late[0]:
                self._rtt_sample(now - late[2])
            self._evidence(late[0], now, out)
        # anything else is a duplicate ack: harmless, ignored

    def _on_ping_req(self, peer: NodeId, f: wire.PingReq, now: float, out: list[Effect]) -> None:
        self._evidence(peer, now, out)
        if f.target in (self.me, peer) or len(self._relays) >= self.max_relays:
            return
        nonce = self._rng.getrandbits(64)
        self._relays[nonce] = _Relay(
            peer, f.nonce, f.target, now + 0.8 * self.timeout, now + self.interval
        )
        # not urgent: others ask for this ping, and an urgent one dials past the
        # sender's back-off (a member's ping-reqs must not make us hammer an address)
        out.append(Send(f.target, self.protocol, wire.encode(wire.Ping(nonce))))

    def _probe_failed(
        self, target: NodeId, now: float, out: list[Effect], blame_self: bool = True
    ) -> None:
        m = self._members.get(target)
        if m is None or m.state == DEAD:
            return
        if blame_self:
            self._health = min(self.health_max, self._health + 1)
        self._accuse(target, m, now, out)

    def _stalled(self, now: float) -> None:
        """We did not run for a while (paused, swapped out): nothing that timed out
        meanwhile is evidence against anyone else."""
        self._probes.clear()
        self._probing.clear()
        self._relays.clear()
        self._health = min(self.health_max, self._health + 1)
        for node in self._watch:
            m = self._members[node]
            if m.suspect_since is not None:
                m.suspect_since = now  # refutations may have been lost while we slept
            if m.confirmed_at is not None:
                m.confirmed_at = now
            if m.accusers:
                for a in m.accusers.values():
                    a.received = now
        self._next_probe_at = now


_DEAD = Member(since=0.0, state=DEAD)


def _moved(before: int | None, now: int | None) -> bool:
    """The target sent us something between two ``heard`` counts (a connection
    that appeared counts; one that went does not)."""
    return now is not None and now != before
