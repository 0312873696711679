"""A model of GossipSub v1.1 mesh push (what libp2p does for the real node), and flooding.

Modeled (``mode = "mesh"``):
- one mesh per node over its connections, shared by Hydra's two topics
  (``hydra/records/1``, ``hydra/liveness``: every node subscribes to both, so
  their meshes would be built from the same peers); target degree ``D = 6``,
  ``D_low = 4``, ``D_high = 12``: GRAFT on join / connection, and at a
  heartbeat a node below ``D_low`` grafts connected peers up to ``D``, a node
  above ``D_high`` prunes at random down to ``D``;
- publish: flood-publish (v1.1 default) to every connected peer; forward: a
  node that receives a message for the first time validates it (the caller's
  ``deliver`` says whether it is valid) and forwards it once to its mesh peers,
  except the peer it came from and the origin; message ids are deduplicated
  for ``seen_ttl`` (2 min);
- gossip repair (``ihave = True``): at each heartbeat (1 s, a random phase per
  node in 0.1 s slots) a node that received messages in the last
  ``history_gossip`` (3) heartbeats sends IHAVE with their ids to ``D_lazy``
  (6) random connected non-mesh peers; a peer missing some answers IWANT and
  gets them while they are still in the sender's message cache
  (``history_length`` = 5 heartbeats).
- sizes: a message costs its data plus ``MSG_OVERHEAD`` (from, seqno, topic,
  signature, protobuf), control messages ``CTRL_OVERHEAD`` plus
  ``ID_SIZE`` per message id.

Not modeled: peer scoring, opportunistic grafting, backoff timers, fanout for
unsubscribed publishers, IDONTWANT; direct-peer settings.

``mode = "flood"`` (a baseline): every node forwards every new message to all
its connections (except the sender); no mesh, no IHAVE.

Cost-saving equivalences (they do not change any outcome): a transmission to
a peer that has already seen the message when it is sent is counted (and
takes uplink time) but not scheduled, nor is a copy that would arrive after
one already on its way (the receiver would drop both); heartbeats run only
for nodes with something to do (messages in their gossip window, or a mesh
out of bounds).
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from .engine import Engine
from .network import C_GOSSIP_CONTROL, Network

MSG_OVERHEAD = 140
CTRL_OVERHEAD = 24
ID_SIZE = 46
SLOTS = 10
_INF = [math.inf]


@dataclass(frozen=True)
class GossipParams:
    mode: str = "mesh"  # "mesh" (GossipSub) or "flood"
    D: int = 6
    D_low: int = 4
    D_high: int = 12
    D_lazy: int = 6
    heartbeat: float = 1.0
    history_gossip: int = 3
    history_length: int = 5
    seen_ttl: float = 120.0
    flood_publish: bool = True
    ihave: bool = True


class Msg:
    __slots__ = ("mid", "topic", "cls", "data", "obj", "size", "origin", "t0", "seen", "due")

    def __init__(self, mid, topic, cls, data, obj, origin, t0, capacity) -> None:
        self.mid = mid
        self.topic = topic
        self.cls = cls
        self.data = data
        self.obj = obj
        self.size = len(data) + MSG_OVERHEAD
        self.origin = origin
        self.t0 = t0
        self.seen = bytearray(capacity)  # delivered at this node
        self.due = array("d", _INF) * capacity  # earliest arrival already scheduled


# deliver(node, msg, from_peer, now) -> valid (forward it) or not
Deliver = Callable[[int, Msg, int, float], bool]


class Gossip:
    def __init__(
        self,
        engine: Engine,
        net: Network,
        rng: random.Random,
        capacity: int,
        params: GossipParams,
        deliver: Deliver,
    ) -> None:
        if params.mode not in ("mesh", "flood"):
            raise ValueError("gossip mode must be 'mesh' or 'flood'")
        self.engine = engine
        self.net = net
        self.rng = rng
        self.p = params
        self.deliver = deliver
        self.capacity = capacity
        self.conns: list[dict[int, None]] = [{} for _ in range(capacity)]
        self.mesh: list[dict[int, None]] = [{} for _ in range(capacity)]
        self.recent: list[list[list[int]] | None] = [None] * capacity  # [mid, age]
        self.phase = [rng.randrange(SLOTS) for _ in range(capacity)]
        self.active: list[dict[int, None]] = [{} for _ in range(SLOTS)]
        self._slot_at: list[float | None] = [None] * SLOTS
        self.msgs: dict[int, Msg] = {}
        self._next_mid = 0
        self._gc_at: float | None = None
        self.published = 0
        self.deliveries = 0

    # ---- connections and mesh ---------------------------------------------------
    def connect(self, a: int, b: int) -> None:
        if a == b or b in self.conns[a]:
            return
        self.conns[a][b] = None
        self.conns[b][a] = None
        if self.p.mode == "mesh":
            for x, y in ((a, b), (b, a)):
                if len(self.mesh[x]) < self.p.D:
                    self._graft(x, y)
            self.wake(a)
            self.wake(b)

    def disconnect(self, a: int, b: int) -> None:
        self.conns[a].pop(b, None)
        self.conns[b].pop(a, None)
        if self.mesh[a].pop(b, 1) is None:
            self.wake(a)
        if self.mesh[b].pop(a, 1) is None:
            self.wake(b)

    def drop_node(self, a: int) -> None:
        """``a`` stopped: it forgets its connections (its peers notice later)."""
        self.conns[a] = {}
        self.mesh[a] = {}
        self.recent[a] = None

    def build_mesh(self) -> None:
        """Initial meshes: every node grafts up to D of its connections, then prunes above D_high."""
        if self.p.mode != "mesh":
            return
        rng = self.rng
        for a in range(self.capacity):
            need = self.p.D - len(self.mesh[a])
            if need <= 0 or not self.conns[a]:
                continue
            cands = [p for p in self.conns[a] if p not in self.mesh[a]]
            for p in rng.sample(cands, min(need, len(cands))):
                self._graft(a, p)
        for a in range(self.capacity):
            if len(self.mesh[a]) > self.p.D_high:
                self._maintain(a, 0.0, count=False)

    def _graft(self, a: int, b: int) -> None:
        self.mesh[a][b] = None
        self.mesh[b][a] = None

    def wake(self, a: int) -> None:
        """Make sure ``a`` gets a heartbeat soon."""
        slot = self.phase[a]
        act = self.active[slot]
        if a in act:
            return
        act[a] = None
        if self._slot_at[slot] is None:
            hb = self.p.heartbeat
            off = slot * hb / SLOTS
            now = self.engine.now
            t = (math.floor((now - off) / hb) + 1) * hb + off
            self._slot_at[slot] = t
            self.engine.at(t, self._slot, slot, None, None)

    # ---- messages ----------------------------------------------------------------
    def publish(self, src: int, topic: int, cls: int, data: bytes, obj, now: float) -> Msg:
        self._next_mid += 1
        msg = Msg(self._next_mid, topic, cls, data, obj, src, now, self.capacity)
        self.msgs[msg.mid] = msg
        msg.seen[src] = 1
        self.published += 1
        p = self.p
        targets = self.conns[src] if (p.flood_publish or p.mode == "flood") else self.mesh[src]
        self._send_to(src, targets, msg, -1, now)
        self._remember(src, msg.mid)
        if self._gc_at is None:
            self._gc_at = now + p.seen_ttl
            self.engine.at(self._gc_at, self._gc, None, None, None)
        return msg

    def _send_to(self, k: int, targets, msg: Msg, src: int, now: float) -> None:
        send = self.net.send
        at = self.engine.at
        arrive = self._arrive
        seen, due = msg.seen, msg.due
        origin = msg.origin
        cls, size, mid = msg.cls, msg.size, msg.mid
        dup = 0
        for t in targets:
            if t == src or t == origin:
                continue
            if seen[t]:
                dup += 1
                continue
            when = send(cls, k, t, size, now)
            if when is not None and when < due[t]:
                due[t] = when
                at(when, arrive, t, k, mid)
        if dup:
            self.net.occupy(cls, k, size, dup, now)

    def _arrive(self, dst: int, src: int, mid: int) -> None:
        msg = self.msgs.get(mid)
        if msg is None or msg.seen[dst] or not self.net.up[dst] or not self.net.reach[dst]:
            return
        msg.seen[dst] = 1
        now = self.engine.now
        self.deliveries += 1
        if not self.deliver(dst, msg, src, now):
            return
        targets = self.mesh[dst] if self.p.mode == "mesh" else self.conns[dst]
        self._send_to(dst, targets, msg, src, now)
        self._remember(dst, mid)

    def _remember(self, a: int, mid: int) -> None:
        p = self.p
        if p.mode != "mesh" or not p.ihave:
            return
        rec = self.recent[a]
        if rec is None:
            rec = self.recent[a] = []
        rec.append([mid, 0])
        self.wake(a)

    # ---- heartbeats -------------------------------------------------------------
    def _slot(self, slot: int, _b, _c) -> None:
        self._slot_at[slot] = None
        nodes = self.active[slot]
        self.active[slot] = {}
        now = self.engine.now
        up = self.net.up
        for a in nodes:
            if up[a]:
                self._heartbeat(a, now)

    def _heartbeat(self, a: int, now: float) -> None:
        p = self.p
        again = False
        if p.mode == "mesh":
            again = self._maintain(a, now)
        rec = self.recent[a]
        if rec:
            msgs = self.msgs
            ids = [m for m, age in rec if age < p.history_gossip and m in msgs]
            if ids and p.ihave:
                mesh = self.mesh[a]
                lazy = [x for x in self.conns[a] if x not in mesh]
                if len(lazy) > p.D_lazy:
                    lazy = self.rng.sample(lazy, p.D_lazy)
                size = CTRL_OVERHEAD + ID_SIZE * len(ids)
                objs = [msgs[m] for m in ids]
                for x in lazy:
                    when = self.net.send(C_GOSSIP_CONTROL, a, x, size, now)
                    if when is not None and any(not o.seen[x] for o in objs):
                        self.engine.at(when, self._on_ihave, x, a, ids)
            rec[:] = [[m, age + 1] for m, age in rec if age + 1 < p.history_length]
            again = again or bool(rec)
        if again:
            self.wake(a)

    def _maintain(self, a: int, now: float, count: bool = True) -> bool:
        p = self.p
        mesh = self.mesh[a]
        n = len(mesh)
        if n < p.D_low:
            cands = [x for x in self.conns[a] if x not in mesh]
            for x in self.rng.sample(cands, min(p.D - n, len(cands))):
                self._graft(a, x)
                if count:
                    self.net.send(C_GOSSIP_CONTROL, a, x, CTRL_OVERHEAD, now)
                if len(self.mesh[x]) > p.D_high:
                    self.wake(x)
        elif n > p.D_high:
            for x in self.rng.sample(list(mesh), n - p.D):
                self.mesh[a].pop(x, None)
                self.mesh[x].pop(a, None)
                if count:
                    self.net.send(C_GOSSIP_CONTROL, a, x, CTRL_OVERHEAD, now)
                if len(self.mesh[x]) < p.D_low:
                    self.wake(x)
        return False

    def _on_ihave(self, x: int, a: int, ids: list[int]) -> None:
        if not self.net.up[x]:
            return
        msgs = self.msgs
        missing = [m for m in ids if m in msgs and not msgs[m].seen[x]]
        if not missing:
            return
        now = self.engine.now
        when = self.net.send(C_GOSSIP_CONTROL, x, a, CTRL_OVERHEAD + ID_SIZE * len(missing), now)
        if when is not None:
            self.engine.at(when, self._on_iwant, a, x, missing)

    def _on_iwant(self, a: int, x: int, ids: list[int]) -> None:
        if not self.net.up[a]:
            return
        cache = {m for m, _age in (self.recent[a] or ())}
        now = self.engine.now
        for m in ids:
            msg = self.msgs.get(m)
            if msg is None or m not in cache:
                continue
            when = self.net.send(msg.cls, a, x, msg.size, now)
            if when is not None:
                self.engine.at(when, self._arrive, x, a, m)

    def _gc(self, _a, _b, _c) -> None:
        now = self.engine.now
        ttl = self.p.seen_ttl
        for mid in [m for m, msg in self.msgs.items() if msg.t0 + ttl <= now]:
            del self.msgs[mid]
        if self.msgs:
            oldest = min(msg.t0 for msg in self.msgs.values())
            self._gc_at = oldest + self.p.seen_ttl
            self.engine.at(self._gc_at, self._gc, None, None, None)
        else:
            self._gc_at = None
