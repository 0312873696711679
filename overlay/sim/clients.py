"""Client traffic: the real ``Outbox`` and ``select_path`` over a model of onion delivery.

Each client runs next to its entry node (a member of the liveness group) and
adds one message every ``msg_interval`` seconds to its ``Outbox``. The
outbox's ``Attempt`` decisions are turned into paths by the real
``select_path`` (3 hops: entry, relay, exit; liveness states of the entry as
weights; the candidates are every exit-ish record of the entry's view plus a
fixed random sample of 48 relays, not all 10,000 records) and reply paths by
``select_return_path``.

The onion packet's bytes are modeled, not built (one ``SMALL`` packet, 2 KiB,
per hop in the network model; lost if a hop is down or cut off), but every hop
makes its decisions with the relay's own core (``overlay.core.relaycore.
RelayCore``, one per node on a path): what a hop has peeled is handed to
``act`` as the ``Forward`` or ``Deliver`` the onion layer would return, and
its effects are carried out (``ForwardPacket`` sent on, ``DeliverExit`` handed
to the exit). Paths here carry no mix delay, so nothing is held; mixing is
measured by ``overlay.sim.anonymity``, which runs the same core's pool. Acks come back on single-use
reply blocks: the client's session registers two surb ids per attempt at its
entry (``RelayCore.register``), the exit answers on them, and the entry's core
routes each reply to the session (``PushReply``) or buffers / drops it as the
SURB registry decides. An exit that no longer has the EXIT role answers
``rejected: not_exit``; otherwise it de-duplicates by message id (per exit),
answers ``queued`` at once and ``delivered`` ``delivery_delay`` seconds later
(a seized exit loses what it queued; a cut-off exit retries every 5 s and
delivers once its feeds come back, as its persisted queue would). Acks travel
back along the reply path. ``Outbox.tick`` gets, as ``live``, the exits the
entry sees as live (EXIT record, not DEAD).

Reported: messages sent, delivered (at least once), delivered more than once
(by two exits), still pending or failed at the end; delivery latency; and, for
every takedown that killed the exit a client last used, the time until that
client's next delivery through another exit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.outbox import Attempt, Finished, Outbox, State
from ..core.paths import NoPath, select_path, select_return_path
from ..core.relaycore import Count, DeliverExit, ForwardPacket, PushReply, RelayCore
from ..core.surbs import ReplySink
from ..crypto import hash32
from ..onion.params import SMALL
from ..onion.process import Deliver, Forward
from ..records import EXIT_ROLES, Role
from ..wire.delivery import AckStatus
from .metrics import quantile, r6
from .network import C_CLIENT

if TYPE_CHECKING:  # pragma: no cover
    from .sim import Simulation

DEST = "smtp:user@example.org"
PACKET = SMALL.packet_size
SAMPLE = 48
INF = math.inf
#: surb ids a session registers per attempt: an exit answers at most twice (queued, delivered)
ACKS = 2


class _Session(ReplySink):
    """A client's session at its entry: what replies are pushed to."""

    def __init__(self, c: int) -> None:
        self.c = c

    def push(self, surb_id: bytes, payload: bytes) -> bool:  # the sim acts on PushReply itself
        return True


@dataclass(slots=True)
class _Onion:
    """A packet in flight: the path and where it is; ``item`` is the client's data."""

    hops: list[int]
    at: int
    item: object
    surb_id: bytes | None = None


class Clients:
    def __init__(self, sim: Simulation, entries: list[int], msg_interval: float) -> None:
        self.sim = sim
        self.entries = list(entries)
        self.interval = msg_interval
        self.rng = random.Random(sim.rng.getrandbits(64))
        n = len(self.entries)
        self.outboxes = [Outbox() for _ in range(n)]
        self.wake = [INF] * n
        self.count = [0] * n
        relays = [
            i for i in range(len(sim.nodes)) if i not in sim._exitish_set and i not in entries
        ]
        self.samples = [self.rng.sample(relays, min(SAMPLE, len(relays))) for _ in range(n)]
        self.created: dict[bytes, tuple[int, float]] = {}
        self.deliveries: dict[bytes, list[tuple[float, int]]] = {}
        self.finished: dict[bytes, tuple[float, str]] = {}
        self.exit_has: set[tuple[int, bytes]] = set()  # (exit, message id) received
        self.exit_done: set[tuple[int, bytes]] = set()  # (exit, message id) delivered
        self.by_entry = {e: c for c, e in enumerate(self.entries)}
        self.delivery_delay = 0.05
        self.attempts = 0
        self.no_path = 0
        self.sessions = [_Session(c) for c in range(n)]
        self.relays: dict[int, RelayCore] = {}  # one relay core per node a packet reached
        self.relay_counts: dict[str, int] = {}
        self.tries: dict[bytes, int] = {}

    def start(self) -> None:
        for c in range(len(self.entries)):
            self.sim.engine.at(self.rng.uniform(0, self.interval), self._new_message, c)

    # ---- sending ---------------------------------------------------------------------
    def _new_message(self, c: int, _b=None, _c=None) -> None:
        sim = self.sim
        now = sim.engine.now
        if now + self.interval <= sim.cfg.duration - 10.0:
            sim.engine.at(now + self.interval, self._new_message, c)
        self.count[c] += 1
        mid = hash32(b"sim-msg/%d/%d" % (c, self.count[c]))[:16]
        self.created[mid] = (c, now)
        self._decide(c, self.outboxes[c].add(mid, DEST, b"", now), now)

    def _decide(self, c: int, decisions, now: float) -> None:
        for d in decisions:
            tp = type(d)
            if tp is Attempt:
                self._attempt(c, d, now)
            elif tp is Finished:
                self.finished[d.message_id] = (now, d.reason)
        nd = self.outboxes[c].next_deadline()
        if nd is not None and nd < self.wake[c]:
            nd = max(nd, now)
            self.wake[c] = nd
            self.sim.engine.at(nd, self._tick, c, nd)

    def _tick(self, c: int, t: float, _c=None) -> None:
        if self.wake[c] != t:
            return
        self.wake[c] = INF
        live = self._live(c)
        self._decide(c, self.outboxes[c].tick(t, live), t)

    def state_changed(self, observer: int, subject: int) -> None:
        """The entry's liveness view changed: let the outbox look at once."""
        c = self.by_entry.get(observer)
        if c is not None and subject in self.sim._exitish_set:
            now = self.sim.engine.now
            if self.wake[c] > now:
                self.wake[c] = now
                self.sim.engine.at(now, self._tick, c, now)

    def _live(self, c: int) -> set:
        sim = self.sim
        return {sim.ids[j] for j in sim.exits_seen_by(self.entries[c])}

    def _records(self, c: int) -> list:
        sim = self.sim
        e = self.entries[c]
        get = sim.nodes[e].view.get
        out = sim.exit_records(sim.nodes[e])
        for j in [e, *self.samples[c]]:
            r = get(sim.ids[j])
            if r is not None and not (r.roles & EXIT_ROLES):
                out.append(r)
        return out

    def _attempt(self, c: int, a: Attempt, now: float) -> None:
        sim = self.sim
        ob = self.outboxes[c]
        e = self.entries[c]
        node = sim.nodes[e]
        if not sim.net.ok(e):
            self._decide(c, ob.send_failed(a.message_id, "entry unreachable", now), now)
            return
        records = self._records(c)
        try:
            path = select_path(
                records,
                self.rng,
                destination=DEST,
                entry=node.nid,
                exit_hint=a.exit_hint,
                avoid=a.avoid,
                weights=node.states,
            )
            back = select_return_path(
                records, self.rng, last=node.nid, avoid=a.avoid, weights=node.states
            )
        except NoPath as err:
            self.no_path += 1
            self._decide(c, ob.send_failed(a.message_id, err.reason, now), now)
            return
        self.attempts += 1
        hops = [sim.index[n] for n in path.node_ids]
        ret = [sim.index[n] for n in back.node_ids]
        mid = a.message_id
        k = self.tries[mid] = self.tries.get(mid, 0) + 1
        surbs = [hash32(b"sim-surb/%s/%d/%d" % (mid, k, i))[:16] for i in range(ACKS)]
        self._relay(e).register(self.sessions[c], surbs, now)  # nothing is buffered for new ids
        self._decide(c, ob.sent(mid, path.node_ids, path.last.node_id, now), now)
        self._arrive(_Onion(hops, 0, (c, mid, ret, surbs)))

    # ---- the relays ---------------------------------------------------------------------
    def _relay(self, i: int) -> RelayCore:
        r = self.relays.get(i)
        if r is None:
            r = self.relays[i] = RelayCore()
        return r

    def _arrive(self, p: _Onion, _b=None, _c=None) -> None:
        """``p`` reached ``p.hops[p.at]``, whose relay core acts on what its layer says."""
        sim = self.sim
        i = p.hops[p.at]
        if not sim.net.ok(i):
            return
        if p.at == len(p.hops) - 1:
            res = Deliver(payload=b"", replay_tag=b"", surb_id=p.surb_id)
        else:
            nxt = _Onion(p.hops, p.at + 1, p.item, p.surb_id)
            res = Forward(next_node=p.hops[p.at + 1], next_epoch=0, packet=nxt, replay_tag=b"")
        self._effects(i, p, self._relay(i).act([res], sim.engine.now, "relay"))

    def _effects(self, i: int, p: _Onion, effects) -> None:
        sim = self.sim
        for fx in effects:
            tp = type(fx)
            if tp is ForwardPacket:
                t = sim.net.send(C_CLIENT, i, fx.node, PACKET, sim.engine.now)
                if t is not None:
                    sim.engine.at(t, self._arrive, fx.packet)
            elif tp is DeliverExit:
                c, mid, ret, surbs = p.item
                self._at_exit(c, mid, (i, ret, surbs))
            elif tp is PushReply:
                c, mid, info = p.item
                self._on_ack(c, mid, info)
            elif tp is Count:
                key = f"{fx.what}:{fx.label}" if fx.label else fx.what
                self.relay_counts[key] = self.relay_counts.get(key, 0) + fx.n

    # ---- the exit ----------------------------------------------------------------------
    def _at_exit(self, c: int, mid: bytes, info) -> None:
        x, ret, surbs = info
        sim = self.sim
        rec = sim.nodes[x].rec
        if rec.is_tombstone or Role.EXIT not in rec.roles:
            self._ack(
                c, mid, x, ret, surbs[0], AckStatus.REJECTED, "not_exit: this node is not an exit"
            )
            return
        key = (x, mid)
        if key in self.exit_done:
            self._ack(c, mid, x, ret, surbs[0], AckStatus.DELIVERED)
            return
        if key not in self.exit_has:
            self.exit_has.add(key)
            sim.engine.after(self.delivery_delay, self._delivered, c, mid, (x, ret, surbs[1]))
        self._ack(c, mid, x, ret, surbs[0], AckStatus.QUEUED)

    def _delivered(self, c: int, mid: bytes, info) -> None:
        x, ret, surb = info
        sim = self.sim
        if not sim.net.up[x]:
            return  # seized with its queue
        if not sim.net.reach[x]:  # cut off: it cannot reach the destination either
            sim.engine.after(5.0, self._delivered, c, mid, info)  # the queue retries
            return
        self.exit_done.add((x, mid))
        self.deliveries.setdefault(mid, []).append((sim.engine.now, x))
        self._ack(c, mid, x, ret, surb, AckStatus.DELIVERED)

    def _ack(
        self, c: int, mid: bytes, x: int, ret: list[int], surb: bytes, status, reason: str = ""
    ) -> None:
        """The exit answers on one of the attempt's reply blocks (path ``x, *ret``)."""
        reply = _Onion([x, *ret], 1, (c, mid, (x, status, reason)), surb)
        self._effects(x, reply, [ForwardPacket(ret[0], reply)])

    def _on_ack(self, c: int, mid: bytes, info) -> None:
        x, status, reason = info
        sim = self.sim
        now = sim.engine.now
        self._decide(c, self.outboxes[c].on_ack(mid, status, reason, sim.ids[x], now), now)

    # ---- report ------------------------------------------------------------------------
    def report(self) -> dict:
        sim = self.sim
        sent = len(self.created)
        delivered = [m for m in self.created if m in self.deliveries]
        dup = sum(1 for m in delivered if len({x for _, x in self.deliveries[m]}) > 1)
        lat = sorted(self.deliveries[m][0][0] - self.created[m][1] for m in delivered)
        pending = sum(
            1 for ob in self.outboxes for e in ob.entries.values() if not e.state.finished
        )
        failed = sum(
            1 for ob in self.outboxes for e in ob.entries.values() if e.state is State.FAILED
        )
        # failover: per takedown, clients whose last used exit was killed
        log = sorted((t, self.created[m][0], x) for m, ds in self.deliveries.items() for t, x in ds)
        failovers = []
        for td in sim.metrics.takedowns:
            at, killed = td["at"], set(td["killed"])
            for c in range(len(self.entries)):
                before = [x for t, cc, x in log if cc == c and t < at]
                if not before or before[-1] not in killed:
                    continue
                after = next(
                    (t for t, cc, x in log if cc == c and t >= at and x not in killed), None
                )
                failovers.append(None if after is None else after - at)
        got = sorted(f for f in failovers if f is not None)
        return {
            "clients": len(self.entries),
            "sent": sent,
            "delivered": len(delivered),
            "delivered_twice": dup,
            "pending_at_end": pending,
            "failed": failed,
            "lost": sent - len(delivered) - pending,
            "attempts": self.attempts,
            "no_path": self.no_path,
            "relay": dict(sorted(self.relay_counts.items())),
            "latency": {
                "p50": r6(quantile(lat, 0.5)),
                "p99": r6(quantile(lat, 0.99)),
                "max": r6(lat[-1]) if lat else None,
            },
            "failover": {
                "cases": len(failovers),
                "recovered": len(got),
                "p50": r6(quantile(got, 0.5)),
                "p99": r6(quantile(got, 0.99)),
                "max": r6(got[-1]) if got else None,
            },
        }
