"""The simulator: N Hydra nodes, each driving the real sans-I/O cores, on a fake clock.

Each simulated node owns, exactly like a running node (``overlay.runtime``):
- a ``MembershipView`` (``SimView``: the real class on shared storage) and an
  ``AntiEntropy`` over it, in push-pull rounds with a random connected peer
  when the real ``SyncSchedule`` says so (fast while rounds find differences,
  backing off to ``sync_idle_interval`` while they find none; kicked by pushed
  news, as ``AntiEntropySync.run`` in services/sync.py), frames passed
  as the core's frame objects and sized with the real encoder
  (``overlay.wire.sync``);
- connections chosen by the real ``peering.choose_dials`` (from a random sample
  of ``dial_sample`` known records; the runtime passes all of them);
- a ``Liveness`` core (if the node is in the liveness group, see below), ticked
  at its own ``next_wakeup()``; its ``Send`` effects become direct messages,
  its ``Broadcast`` effects gossip on the liveness topic;
- an ``ExitPool`` (exits and standby exits: the only nodes whose pool can act),
  updated whenever the view accepts an exit-ish record or the liveness core
  changes the state of an exit-ish node, ticked at its ``next_wakeup()``; its
  ``Announce`` effects publish a new record (seq+1, real Ed25519 signature);
- clients (``overlay.sim.clients``) drive the real ``Outbox`` and ``select_path``.

What is not real, by design (see docs/architecture.md):
- record signatures are made for real but not verified on receipt: one
  validated record object per (node, seq) is shared and merged with
  ``view.accept`` (``MembershipView.offer`` = decode + verify + accept, whose
  cost is measured by the benchmarks); liveness statements are signed and
  checked with a keyed-hash stand-in of the same size;
- the liveness group: every node of a real overlay monitors every member; the
  simulator runs SWIM in a group of ``cohort`` nodes (all exits, standbys and
  client entry nodes among them), because 10,000 full member tables would take
  10⁸ entries. Accusations still travel through the gossip mesh of all nodes.
  A SWIM member is probed about once per period whatever the group size, and
  ``verify_fanout`` is a count, so detection times carry over;
- connection loss is noticed after ``conn_timeout`` (±50 %) (keep-alives);
  dialing takes one round trip; the DHT is not modeled (records reach nodes by
  gossip and anti-entropy only); runs are at most half a record lifetime
  (30 min), so records are neither refreshed nor expired.

Protocols (``protocol``): ``hydra`` (mesh push + IHAVE/IWANT + anti-entropy,
the real node), and the baselines ``gossipsub`` (no anti-entropy), ``push``
(mesh push only) and ``flood`` (every node forwards to all its connections).
Joining always pulls the membership from the bootstrap peer (that is part of
joining, not of anti-entropy).

Determinism: all randomness comes from ``random.Random`` instances seeded from
``seed``; nodes are referred to by index and nothing iterates a hash-ordered
set, so a run is a pure function of its configuration.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from ..config import Config
from ..core.effects import Announce, Broadcast, Penalize, Send, StateChanged
from ..core.exitpool import ExitPool
from ..core.liveness import DEAD, Liveness
from ..core.peering import choose_dials
from ..core.syncround import Initiator, Responder
from ..core.syncsched import DIFFERED, FAILED, SAME, Due, SyncSchedule
from ..core.timing import JOIN_ROUNDS, SETTLE, SYNC_TIMEOUT
from ..crypto import NodeId, OnionPublicKey, SigningKey, hash32
from ..errors import BadSignature
from ..records import DEFAULT_TTL, EXIT_ROLES, Role, make_record, make_tombstone
from ..wire import sync
from .engine import Engine
from .gossip import Gossip, GossipParams, Msg
from .metrics import Metrics
from .network import C_GOSSIP_LIVENESS, C_GOSSIP_RECORDS, C_LIVENESS, C_SYNC, Network
from .views import EMPTY_BASE, Base, SimAntiEntropy, SimRecord, SimView, changed_ids, sim_record

T0 = 1_700_000_000  # unix time of simulated t = 0: records are stamped T0 + t
POLICY = ("smtp:*",)
TOPIC_RECORDS, TOPIC_LIVENESS = 0, 1
INF = math.inf
STREAM_OVERHEAD = 4  # length prefix of a framed stream message
PROTOCOLS = {
    # name: (gossip mode, IHAVE/IWANT, anti-entropy)
    "hydra": ("mesh", True, True),
    "gossipsub": ("mesh", True, False),
    "push": ("mesh", False, False),
    "flood": ("flood", False, False),
}
_NODE = Config()
LIVENESS_DEFAULTS = {  # the node's configuration defaults (overlay.config)
    "probe_interval": _NODE.probe_interval,
    "probe_timeout": _NODE.probe_timeout,
    "suspicion_min": _NODE.suspicion_min,
    "suspicion_max": _NODE.suspicion_max,
}


@dataclass
class SimConfig:
    nodes: int = 200
    seed: int = 1
    duration: float = 60.0
    protocol: str = "hydra"
    exits: int = 3
    standbys: int = 3
    target_live_exits: int = _NODE.target_live_exits
    clients: int = 0
    msg_interval: float = 1.0
    cohort: int = 1000  # liveness group size (capped at nodes; 0 disables liveness)
    target_peers: int = _NODE.target_peers
    dial_sample: int = 24
    sync_interval: float = _NODE.sync_interval  # while the view changes (busy)
    sync_idle_interval: float = _NODE.sync_idle_interval
    feeds_per_node: int = 2
    latency_median: float = 0.04
    latency_sigma: float = 0.35
    jitter: float = 0.1
    loss: float = 0.01
    loss_mode: str = "retransmit"
    bandwidth: float = 1.25e6  # bytes/s uplink per node (10 Mbit/s)
    conn_timeout: float = 5.0
    extra_capacity: int = 0  # room for nodes that join during the run
    rebase_interval: float = 15.0
    sample_interval: float = 0.5
    liveness: dict = field(default_factory=dict)  # Liveness keyword overrides
    exitpool: dict = field(default_factory=dict)  # ExitPool keyword overrides
    gossip: dict = field(default_factory=dict)  # GossipParams overrides

    def public(self) -> dict:
        d = dict(self.__dict__)
        return {k: v for k, v in d.items() if not k.startswith("_")}


class SimNode:
    __slots__ = (
        "idx",
        "nid",
        "key",
        "secret",
        "rec",
        "config_roles",
        "feeds",
        "view",
        "ae",
        "live",
        "pool",
        "states",
        "wake",
        "pool_wake",
        "joining",
        "join_rounds",
        "syncing",
        "refill",
        "member",
        "left",
        "changes",
        "sched",
        "sync_gen",
    )

    def __init__(self, idx: int, key: SigningKey, secret: bytes) -> None:
        self.idx = idx
        self.key = key
        self.nid = key.node_id
        self.secret = secret
        self.rec: SimRecord | None = None
        self.config_roles = Role.RELAY
        self.feeds: list[str] = []
        self.view: SimView | None = None
        self.ae: SimAntiEntropy | None = None
        self.live: Liveness | None = None
        self.pool: ExitPool | None = None
        self.states = None
        self.wake = INF
        self.pool_wake = INF
        self.joining = False
        self.join_rounds = 0
        self.syncing = False
        self.refill = False
        self.member = False  # part of the overlay (joined at least once)
        self.left = False  # withdrew (tombstone)
        self.changes = 0  # records the view accepted (overlay.runtime.Node.changes)
        self.sched: SyncSchedule | None = None  # anti-entropy rounds (AntiEntropySync.schedule)
        self.sync_gen = 0  # only the newest scheduled sync tick runs


class _States:
    """The liveness states ``ExitPool.update`` and ``select_path`` read (``get`` only)."""

    __slots__ = ("live",)

    def __init__(self, live: Liveness | None) -> None:
        self.live = live

    def get(self, node: NodeId, default=None):
        if self.live is None:
            return default
        return self.live.state(node)[0]


def _summary_size() -> int:
    return len(sync.encode(sync.Summary(tuple(b"\0" * sync.BUCKET_HASH for _ in range(64)))))


SUMMARY_SIZE = _summary_size() + STREAM_OVERHEAD
EMPTY_ENTRIES_SIZE = len(sync.encode(sync.Entries((), ()))) + STREAM_OVERHEAD
EMPTY_WANT_SIZE = len(sync.encode(sync.Want(()))) + STREAM_OVERHEAD


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        if cfg.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}")
        if cfg.duration > DEFAULT_TTL / 2:
            # nodes would re-publish before expiry and views would expire records;
            # neither is modeled (``expire`` is never called in a run)
            raise ValueError(f"runs longer than {DEFAULT_TTL // 2} s are not supported")
        self.cfg = cfg
        mode, ihave, ae = PROTOCOLS[cfg.protocol]
        self.anti_entropy = ae
        master = random.Random(cfg.seed)
        self.rng = random.Random(master.getrandbits(64))
        self.capacity = cfg.nodes + cfg.extra_capacity
        self.engine = Engine()
        self.net = Network(
            random.Random(master.getrandbits(64)),
            self.capacity,
            latency_median=cfg.latency_median,
            latency_sigma=cfg.latency_sigma,
            jitter=cfg.jitter,
            loss=cfg.loss,
            loss_mode=cfg.loss_mode,
            bandwidth=cfg.bandwidth,
        )
        gp = GossipParams(
            **{"mode": mode, "ihave": ihave, "heartbeat": _NODE.gossip_heartbeat, **cfg.gossip}
        )
        self.gossip = Gossip(
            self.engine,
            self.net,
            random.Random(master.getrandbits(64)),
            self.capacity,
            gp,
            self._deliver,
        )
        self._live_seed = master.getrandbits(32)
        self.nodes: list[SimNode] = []
        self.ids: list[NodeId] = []
        self.index: dict[NodeId, int] = {}
        self.truth: dict[NodeId, SimRecord] = {}  # the latest record each node published
        self.registry: dict[bytes, SimRecord] = {}
        self.exitish: list[int] = []  # nodes that ever published an exit or standby role
        self._exitish_set: set[int] = set()
        self.cohort: list[int] = []
        self._cohort_set: set[int] = set()
        self.memo: dict = {}
        self._base_gen = 1
        self.base = EMPTY_BASE
        self._changed: dict[NodeId, None] = {}
        self.metrics = Metrics(self)
        self.clients = None
        self._build()

    # ---- set-up -----------------------------------------------------------------
    def _new_node(self, roles: Role) -> SimNode:
        i = len(self.nodes)
        if i >= self.capacity:
            raise RuntimeError("simulation capacity exhausted (raise extra_capacity)")
        seed = self.cfg.seed
        key = SigningKey(hash32(b"hydra-sim/%d/%d" % (seed, i)))
        node = SimNode(i, key, hash32(b"hydra-sim-sig/%d/%d" % (seed, i)))
        node.config_roles = roles
        rng = self.rng
        nets = self.cfg.feeds_per_node
        feeds = [
            f"/ip4/{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}"
            f".{rng.randrange(1, 255)}/tcp/4001"
        ]
        for _ in range(nets - 1):
            feeds.append(
                f"/ip4/{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}"
                f".{rng.randrange(1, 255)}/udp/4001/quic-v1"
            )
        node.feeds = feeds
        self.nodes.append(node)
        self.ids.append(node.nid)
        self.index[node.nid] = i
        return node

    def _sign_record(
        self, node: SimNode, seq: int, roles: Role, now: float, tombstone: bool = False
    ) -> SimRecord:
        if tombstone:
            rec = make_tombstone(node.key, seq=seq, now=T0 + now)
        else:
            exitish = bool(roles & EXIT_ROLES)
            rec = make_record(
                node.key,
                seq=seq,
                now=T0 + now,
                roles=roles,
                feeds=node.feeds,
                onion_key=OnionPublicKey(hash32(bytes(node.nid), person=b"sim-onion")),
                onion_epoch=1,
                exit_policy=POLICY if exitish else (),
            )
        srec = sim_record(rec)
        self.registry[srec.raw] = srec
        return srec

    def _set_truth(self, node: SimNode, rec: SimRecord) -> None:
        node.rec = rec
        self.truth[node.nid] = rec
        self._changed[node.nid] = None
        if not rec.is_tombstone and rec.roles & EXIT_ROLES:
            if node.idx not in self._exitish_set:
                self._exitish_set.add(node.idx)
                self.exitish.append(node.idx)

    def _build(self) -> None:
        cfg = self.cfg
        n = cfg.nodes
        if n < cfg.exits + cfg.standbys + 2:
            raise ValueError("too few nodes for the exits and standbys asked for")
        order = list(range(n))
        self.rng.shuffle(order)
        roles = [Role.RELAY | Role.ENTRY] * n
        for i in order[: cfg.exits]:
            roles[i] = Role.EXIT | Role.RELAY
        for i in order[cfg.exits : cfg.exits + cfg.standbys]:
            roles[i] = Role.STANDBY_EXIT | Role.RELAY
        for i in range(n):
            node = self._new_node(roles[i])
            self._set_truth(node, self._sign_record(node, 1, roles[i], 0.0))
            node.member = True
            self.net.up[i] = 1
            self.net.reach[i] = 1
        self._changed = {}
        self.base = Base(dict(self.truth), self._base_gen)
        for node in self.nodes:
            node.view = SimView(self.base, self.memo)
            node.ae = SimAntiEntropy(node.view)
        # the liveness group: exits, standbys, client entries, then random others
        size = min(cfg.cohort, n)
        if size > 0:
            rest = [i for i in order[cfg.exits + cfg.standbys :]]
            self.client_entries = rest[: cfg.clients]
            chosen = order[: cfg.exits + cfg.standbys] + rest[: max(0, size - len(self.exitish))]
            self.cohort = sorted(set(chosen[:size]) | set(self.client_entries))
        else:
            self.client_entries = order[cfg.exits + cfg.standbys :][: cfg.clients]
            self.cohort = []
        self._cohort_set = set(self.cohort)
        # connections (the real peering core on a sample), then the meshes
        for node in self.nodes:
            self._dial(node, initial=True)
        self.gossip.build_mesh()
        now = 0.0
        for i in self.cohort:
            self._start_liveness(self.nodes[i], now)
        for i in self.exitish:
            self._start_pool(self.nodes[i], now)
        if self.anti_entropy:
            for node in self.nodes:
                self._start_sync(node, 0.0)
        self.metrics.start()
        if cfg.clients:
            from .clients import Clients

            self.clients = Clients(self, self.client_entries, cfg.msg_interval)
            self.clients.start()
        self.engine.at(cfg.rebase_interval, self._rebase_tick, None, None, None)

    def _start_liveness(self, node: SimNode, now: float) -> None:
        secret = node.secret

        def sign(msg: bytes, _s=secret) -> bytes:
            return hashlib.blake2b(msg, key=_s, digest_size=64).digest()

        view = node.view
        params = {**LIVENESS_DEFAULTS, **self.cfg.liveness}
        node.live = Liveness(
            node.nid,
            sign,
            random.Random(self._live_seed * 1_000_003 + node.idx),
            incarnation=int(now * 1000),  # as overlay.services.resilience: grows across restarts
            verify=self._verify,
            is_known=view.__contains__,
            **params,
        )
        node.states = _States(node.live)
        node.live.set_members(self._cohort_members(node), now)
        node.wake = INF
        self._live_resched(node, now)

    def _start_pool(self, node: SimNode, now: float) -> None:
        node.pool = ExitPool(
            node.nid,
            node.rec.roles if node.rec and not node.rec.is_tombstone else node.config_roles,
            random.Random(self._live_seed * 7_000_003 + node.idx),
            target_live_exits=self.cfg.target_live_exits,
            **self.cfg.exitpool,
        )
        if node.states is None:
            node.states = _States(node.live)
        node.pool_wake = INF
        self._pool_update(node, now)

    def _verify(self, signer: NodeId, message: bytes, signature: bytes) -> None:
        i = self.index.get(signer)
        if i is None:
            raise BadSignature(detail="unknown signer")
        good = hashlib.blake2b(message, key=self.nodes[i].secret, digest_size=64).digest()
        if good != signature:
            raise BadSignature(detail="stand-in signature mismatch")

    def _cohort_members(self, node: SimNode) -> list[NodeId]:
        get = node.view.get
        out = []
        for j in self.cohort:
            r = get(self.ids[j])
            if r is not None and not r.is_tombstone:
                out.append(self.ids[j])
        return out

    # ---- running ----------------------------------------------------------------
    def run(self, until: float | None = None) -> None:
        self.engine.run(self.cfg.duration if until is None else until)

    @property
    def now(self) -> float:
        return self.engine.now

    # ---- gossip delivery ------------------------------------------------------------
    def _deliver(self, k: int, msg: Msg, src: int, now: float) -> bool:
        if msg.topic == TOPIC_RECORDS:
            return self._on_record(self.nodes[k], msg.obj, now)
        node = self.nodes[k]
        live = node.live
        if live is None:
            return True
        # as overlay.services.resilience: the forwarder is the peer; invalid frames are not forwarded
        eff = live.receive(self.ids[src], msg.data, now)
        if eff:
            self._live_effects(node, eff, now)
        self._live_resched(node, now)
        return not any(type(e) is Penalize for e in eff)

    def _on_record(self, node: SimNode, rec: SimRecord, now: float) -> bool:
        """Merge a record into a node's view (as ``Node.ingest``). Valid: forward it."""
        view = node.view
        prev = view.get(rec.node_id)
        if prev is not None and rec.seq <= prev.seq:
            return rec.seq == prev.seq  # duplicate: valid; older: Stale, not forwarded
        view.accept(rec)
        node.changes += 1
        self.metrics.arrival(node.idx, rec, now)
        if node.idx in self.metrics.joins_open and len(view) >= len(self.truth):
            self.metrics.join_complete(node.idx, now)
        self._after_accept(node, rec, prev, now)
        return True

    def _after_accept(self, node: SimNode, rec: SimRecord, prev, now: float) -> None:
        j = self.index[rec.node_id]
        if node.pool is not None and j in self._exitish_set:
            self._pool_update(node, now)
        if (
            node.live is not None
            and j in self._cohort_set
            and j != node.idx
            and (prev is None or prev.is_tombstone != rec.is_tombstone)
        ):
            node.live.set_members(self._cohort_members(node), now)
            self._live_resched(node, now)

    # ---- publishing ---------------------------------------------------------------
    def publish(
        self,
        node: SimNode,
        now: float,
        *,
        roles: Role | None = None,
        tombstone: bool = False,
        why: str = "update",
    ) -> SimRecord:
        """Sign the node's next record (seq+1), merge it locally and push it to the mesh."""
        seq = (node.rec.seq if node.rec else 0) + 1
        if roles is None:
            roles = node.rec.roles if node.rec and not node.rec.is_tombstone else node.config_roles
        rec = self._sign_record(node, seq, roles, now, tombstone)
        self._set_truth(node, rec)
        self.metrics.published(node.idx, rec, now, why)
        self._on_record(node, rec, now)
        self.gossip.publish(node.idx, TOPIC_RECORDS, C_GOSSIP_RECORDS, rec.raw, rec, now)
        self.metrics.exits_changed(now)
        return rec

    # ---- liveness -----------------------------------------------------------------
    def _live_resched(self, node: SimNode, now: float) -> None:
        nw = node.live.next_wakeup()
        if nw is None:
            nw = now
        if nw < node.wake:
            if nw < now:
                nw = now
            node.wake = nw
            self.engine.at(nw, self._live_tick, node.idx, nw, None)

    def _live_tick(self, i: int, t: float, _c) -> None:
        node = self.nodes[i]
        if node.wake != t or node.live is None or not self.net.up[i]:
            return
        node.wake = INF
        eff = node.live.tick(t)
        if eff:
            self._live_effects(node, eff, t)
        self._live_resched(node, t)

    def _live_effects(self, node: SimNode, effects, now: float) -> None:
        i = node.idx
        for e in effects:
            tp = type(e)
            if tp is Send:
                dst = self.index.get(e.peer)
                if dst is None:
                    continue
                at = self.net.send(C_LIVENESS, i, dst, len(e.frame) + STREAM_OVERHEAD, now)
                if at is not None:
                    self.engine.at(at, self._live_arrive, dst, i, e.frame)
            elif tp is Broadcast:
                self.metrics.broadcast(i, e.data)
                self.gossip.publish(i, TOPIC_LIVENESS, C_GOSSIP_LIVENESS, e.data, None, now)
            elif tp is StateChanged:
                j = self.index[e.node]
                self.metrics.state_changed(i, j, e.state, now)
                if node.pool is not None and j in self._exitish_set:
                    self._pool_update(node, now)
                if self.clients is not None:
                    self.clients.state_changed(i, j)
            elif tp is Penalize:
                self.metrics.penalties += 1

    def _live_arrive(self, dst: int, src: int, frame: bytes) -> None:
        node = self.nodes[dst]
        if node.live is None or not self.net.up[dst] or not self.net.reach[dst]:
            return
        now = self.engine.now
        eff = node.live.receive(self.ids[src], frame, now)
        if eff:
            self._live_effects(node, eff, now)
        self._live_resched(node, now)

    # ---- exit pool ------------------------------------------------------------------
    def exit_records(self, node: SimNode) -> list[SimRecord]:
        get = node.view.get
        ids = self.ids
        return [r for j in self.exitish if (r := get(ids[j])) is not None]

    def _pool_update(self, node: SimNode, now: float) -> None:
        if not self.net.up[node.idx]:
            return
        eff = node.pool.update(self.exit_records(node), node.states, now)
        self._pool_effects(node, eff, now)

    def _pool_effects(self, node: SimNode, eff, now: float) -> None:
        for e in eff:
            if type(e) is Announce:
                kind = "promote" if "exit" in e.roles else "step-back"
                self.metrics.pool_event(node.idx, kind, now)
                self.publish(node, now, roles=Role.parse(e.roles), why=kind)
        nw = node.pool.next_wakeup()
        if nw is not None and nw < node.pool_wake:
            nw = max(nw, now)
            node.pool_wake = nw
            self.engine.at(nw, self._pool_tick, node.idx, nw, None)

    def _pool_tick(self, i: int, t: float, _c) -> None:
        node = self.nodes[i]
        if node.pool_wake != t or node.pool is None or not self.net.up[i]:
            return
        node.pool_wake = INF
        self._pool_effects(node, node.pool.tick(t), t)

    # ---- anti-entropy -----------------------------------------------------------------
    def _sync_at(self, node: SimNode, t: float) -> None:
        node.sync_gen += 1
        self.engine.at(t, self._sync_tick, node.idx, node.sync_gen)

    def _sync_kick(self, node: SimNode, now: float) -> None:
        if node.sched is not None and node.syncing:
            node.sched.kick(now)
            self._sync_at(node, now)

    def _sync_tick(self, i: int, gen, _c) -> None:
        node = self.nodes[i]
        if gen != node.sync_gen:
            return  # superseded by a kick
        if not self.net.up[i] or not node.syncing:
            node.syncing = False
            return
        now = self.engine.now
        step = node.sched.poll(now)
        if not isinstance(step, Due):
            self._sync_at(node, now + step)
            return
        peers = self.gossip.conns[i] if not node.joining and self.net.reach[i] else ()
        if peers:
            peer = step.peer if step.peer in peers else list(peers)[self.rng.randrange(len(peers))]
            node.sched.started(now, SYNC_TIMEOUT)
            self._sync_round(i, peer, now)
        else:
            node.sched.done(FAILED, now)
        # the round reports its outcome to the schedule; look again at the fast rate
        self._sync_at(node, now + node.sched.fastest)

    def _sync_outcome(self, i: int, outcome: str) -> None:
        node = self.nodes[i]
        if node.sched is not None and not node.joining:
            node.sched.done(outcome, self.engine.now)

    def _start_sync(self, node: SimNode, now: float) -> None:
        node.syncing = True
        cfg = self.cfg
        node.sched = SyncSchedule(cfg.sync_interval, cfg.sync_idle_interval, self.rng, now)
        self._sync_at(node, node.sched.next_at)

    def _sync_round(self, i: int, j: int, now: float) -> None:
        rnd = Initiator(self.nodes[i].ae)  # the real round's state machines, as the node's
        summary = rnd.start()
        at = self.net.send(C_SYNC, i, j, SUMMARY_SIZE, now)
        if at is not None:
            self.engine.at(at, self._sync_summary, j, i, (rnd, summary))
        elif self.nodes[i].joining:
            self._join_done(self.nodes[i], now)

    def _sync_summary(self, j: int, i: int, pair) -> None:
        if not self.net.ok(j):
            return self._sync_failed(i)
        rnd, summary = pair
        now = self.engine.now
        resp = Responder(self.nodes[j].ae)
        (entries,) = resp.receive(summary)
        if entries.entries:
            size = len(sync.encode(entries)) + STREAM_OVERHEAD
        else:
            size = EMPTY_ENTRIES_SIZE
        at = self.net.send(C_SYNC, j, i, size, now)
        if at is not None:
            self.engine.at(at, self._sync_entries, i, j, (rnd, resp, entries))
        else:
            self._sync_failed(i)

    def _sync_entries(self, i: int, j: int, triple) -> None:
        if not self.net.ok(i):
            return
        rnd, resp, entries = triple
        node = self.nodes[i]
        now = self.engine.now
        want, *push = rnd.receive(entries)
        self._sync_outcome(i, DIFFERED if entries.entries else SAME)
        size = len(sync.encode(want)) + STREAM_OVERHEAD if want.ids else EMPTY_WANT_SIZE
        at = self.net.send(C_SYNC, i, j, size, now)
        if want.ids and at is not None:
            self.engine.at(at, self._sync_want, j, i, (rnd, resp, want))
            return
        if at is not None:
            resp.receive(want)
            self._sync_push(i, j, resp, push, now)
        if node.joining:
            self._join_done(node, now)

    def _sync_push(self, i: int, j: int, resp: Responder, frames: list, now: float) -> None:
        """The initiator's push step: what the responder lacks in the buckets it listed."""
        for push in frames:
            size = len(sync.encode(push)) + STREAM_OVERHEAD
            at = self.net.send(C_SYNC, i, j, size, now)
            if at is not None:
                self.engine.at(at, self._sync_pushed, j, i, (resp, push))

    def _sync_pushed(self, j: int, i: int, pair) -> None:
        node = self.nodes[j]
        if not self.net.ok(j):
            return
        resp, push = pair
        resp.receive(push)
        now = self.engine.now
        before = node.changes
        for raw in resp.pushed:
            self._on_record(node, self.registry[raw], now)
        self.metrics.sync_pushed += len(resp.pushed)
        if node.changes != before:
            self._sync_kick(node, now)  # news pushed to us, as AntiEntropySync.serve

    def _sync_want(self, j: int, i: int, triple) -> None:
        if not self.net.ok(j):
            return self._sync_failed(i)
        rnd, resp, want = triple
        (recs,) = resp.receive(want)
        size = len(sync.encode(recs)) + STREAM_OVERHEAD
        at = self.net.send(C_SYNC, j, i, size, self.engine.now)
        if at is not None:
            self.engine.at(at, self._sync_records, i, j, (rnd, resp, recs))
        else:
            self._sync_failed(i)

    def _sync_records(self, i: int, j: int, triple) -> None:
        node = self.nodes[i]
        if not self.net.ok(i):
            return
        rnd, resp, recs = triple
        push = rnd.receive(recs)
        now = self.engine.now
        accepted = 0
        for raw in rnd.records:
            rec = self.registry[raw]
            before = node.view.seq_of(rec.node_id)
            self._on_record(node, rec, now)
            if before is None or before < rec.seq:
                accepted += 1
        self.metrics.sync_records += len(recs.records)
        self.metrics.sync_repairs += accepted
        self._sync_push(i, j, resp, push, now)
        if node.joining:
            node.join_rounds += 1
            if accepted and node.join_rounds < JOIN_ROUNDS:
                self._sync_round(i, j, now)
            else:
                self._join_done(node, now)

    def _sync_failed(self, i: int) -> None:
        node = self.nodes[i]
        self._sync_outcome(i, FAILED)
        if node.joining:
            self._join_done(node, self.engine.now)

    # ---- connections ------------------------------------------------------------------
    def _dial(self, node: SimNode, initial: bool = False) -> int:
        """One peer-maintenance step (``PeerManager._fill_peers``): dial what ``choose_dials`` picks."""
        i = node.idx
        conns = self.gossip.conns[i]
        if len(conns) >= self.cfg.target_peers:
            return 0
        rng = self.rng
        get = node.view.get
        ids = self.ids
        n = len(self.nodes)
        cands = []
        for _ in range(self.cfg.dial_sample):
            j = rng.randrange(n)
            if j != i and j not in conns:
                r = get(ids[j])
                if r is not None:
                    cands.append(r)
        connected = {ids[j] for j in conns}
        chosen = choose_dials(cands, connected, node.nid, self.cfg.target_peers, rng)
        dialed = 0
        for r in chosen:
            j = self.index[r.node_id]
            if initial:
                self.gossip.connect(i, j)
                dialed += 1
            elif self.net.connected(i, j):
                self.engine.at(
                    self.engine.now + 2 * self.net.latency(i, j), self._connect, i, j, None
                )
                dialed += 1
        return dialed

    def _connect(self, i: int, j: int, _c) -> None:
        if self.net.connected(i, j):
            self.gossip.connect(i, j)

    def _schedule_refill(self, i: int) -> None:
        node = self.nodes[i]
        if not node.refill:
            node.refill = True
            self.engine.at(self.engine.now + 1.0 + self.rng.random(), self._refill, i, None, None)

    def _refill(self, i: int, _b, _c) -> None:
        node = self.nodes[i]
        node.refill = False
        if not self.net.ok(i) or node.joining:
            return
        self._dial(node)
        if len(self.gossip.conns[i]) < self.cfg.target_peers:
            self._schedule_refill(i)

    def _lose_connections(self, i: int) -> None:
        """``i`` went away: each peer notices after a keep-alive timeout."""
        to = self.cfg.conn_timeout
        for p in list(self.gossip.conns[i]):
            self.engine.after(to * (0.5 + self.rng.random()), self._conn_lost, p, i, None)
            if self.net.up[i]:  # alive but cut off: it notices too
                self.engine.after(to * (0.5 + self.rng.random()), self._conn_lost, i, p, None)

    def _conn_lost(self, p: int, x: int, _c) -> None:
        if x in self.gossip.conns[p] and not self.net.connected(p, x):
            self.gossip.disconnect(p, x)
            if self.net.ok(p):
                self._schedule_refill(p)

    # ---- node life cycle -----------------------------------------------------------
    def kill(self, i: int) -> None:
        """The process stops (or the machine is seized): no more ticks, nothing answers."""
        if not self.net.up[i]:
            return
        now = self.engine.now
        self._lose_connections(i)
        self.net.up[i] = 0
        self.gossip.drop_node(i)
        self.nodes[i].syncing = False
        self.metrics.went_down(i, now, "kill")
        self.metrics.exits_changed(now)

    def cut_feeds(self, i: int) -> None:
        """Every feed of ``i`` is cut: it keeps running but nobody can reach it."""
        if not self.net.reach[i]:
            return
        now = self.engine.now
        self._lose_connections(i)
        self.net.reach[i] = 0
        self.metrics.went_down(i, now, "cut")
        self.metrics.exits_changed(now)

    def restore_feeds(self, i: int) -> None:
        if self.net.reach[i]:
            return
        self.net.reach[i] = 1
        self.metrics.came_back(i, self.engine.now)
        self.metrics.exits_changed(self.engine.now)
        if self.net.up[i]:
            self._schedule_refill(i)
            self._sync_kick(self.nodes[i], self.engine.now)  # a feed change, as Node

    def cut_one_feed(self, i: int) -> None:
        """One of several feeds is cut: the node stays reachable and re-announces the rest."""
        node = self.nodes[i]
        if len(node.feeds) <= 1:
            return self.cut_feeds(i)
        node.feeds = node.feeds[1:]
        self.engine.after(1.0, self._republish, i, "feeds changed", None)

    def _republish(self, i: int, why: str, _c) -> None:
        if self.net.ok(i):
            self.publish(self.nodes[i], self.engine.now, why=why)

    def leave(self, i: int, graceful: bool = False) -> None:
        node = self.nodes[i]
        if not self.net.up[i]:
            return
        if graceful and self.net.reach[i]:
            node.left = True
            self.publish(node, self.engine.now, tombstone=True, why="withdraw")
            self.engine.after(1.0, self._kill_later, i, None, None)
        else:
            self.kill(i)

    def _kill_later(self, i: int, _b, _c) -> None:
        self.kill(i)

    def join_new(self, roles: Role = Role.RELAY | Role.ENTRY) -> int:
        """A new node (new identity) joins through a random running member."""
        now = self.engine.now
        node = self._new_node(roles)
        node.view = SimView(EMPTY_BASE, self.memo)
        node.ae = SimAntiEntropy(node.view)
        rec = self._sign_record(node, 1, roles, now)
        self._set_truth(node, rec)  # "start": in its own view (sync pushes it from there)
        node.view.accept(rec)
        self.net.up[node.idx] = 1
        self.net.reach[node.idx] = 1
        if self.cfg.cohort >= self.cfg.nodes:  # full-group mode: newcomers join it
            self.cohort.append(node.idx)
            self._cohort_set.add(node.idx)
        self._start_join(node, now)
        return node.idx

    def rejoin(self, i: int) -> None:
        """A node that stopped comes back with its identity and stored records."""
        if self.net.up[i]:
            return
        now = self.engine.now
        node = self.nodes[i]
        self.net.up[i] = 1
        self.net.reach[i] = 1
        node.left = False
        node.wake = INF
        node.pool_wake = INF
        node.live = None
        node.pool = None
        node.states = None
        self.metrics.came_back(i, now)
        self._start_join(node, now)

    def _start_join(self, node: SimNode, now: float) -> None:
        i = node.idx
        if i in self._cohort_set and node.live is None and self.cfg.cohort > 0:
            # the liveness service runs from the node's start (overlay.services.resilience),
            # so a node answers probes while it is still pulling the membership
            self._start_liveness(node, now)
        running = [j for j in range(len(self.nodes)) if j != i and self.net.ok(j)]
        if not running:
            return
        boot = running[self.rng.randrange(len(running))]
        node.joining = True
        node.join_rounds = 0
        self.metrics.join_started(i, now)
        self.gossip.connect(i, boot)
        self._sync_round(i, boot, now + 2 * self.net.latency(i, boot))
        self.engine.after(30.0, self._join_watchdog, i, None, None)

    def _settled(self, i: int, _b, _c) -> None:
        node = self.nodes[i]
        if node.pool is None and self.net.up[i] and not node.joining:
            self._start_pool(node, self.engine.now)

    def _join_watchdog(self, i: int, _b, _c) -> None:
        node = self.nodes[i]
        if node.joining:
            self._join_done(node, self.engine.now)

    def _join_done(self, node: SimNode, now: float) -> None:
        if not node.joining:
            return
        node.joining = False
        self.metrics.join_synced(node.idx, now)
        node.member = True
        if not self.net.up[node.idx]:
            return
        roles = node.config_roles
        self.publish(node, now, roles=roles, why="join")
        if roles & EXIT_ROLES and node.pool is None:
            self.engine.after(SETTLE, self._settled, node.idx)
        self._dial(node)
        self._schedule_refill(node.idx)
        if self.anti_entropy and not node.syncing:
            self._start_sync(node, now)

    # ---- partitions ------------------------------------------------------------------
    def partition(self, groups: list[int]) -> None:
        self.net.partition(groups)
        for i in range(len(self.nodes)):
            for p in list(self.gossip.conns[i]):
                if p > i and groups[p] != groups[i]:
                    self.engine.after(self.cfg.conn_timeout, self._conn_lost, i, p, None)
                    self.engine.after(self.cfg.conn_timeout, self._conn_lost, p, i, None)

    def heal(self) -> None:
        self.net.partition(None)
        for i in range(len(self.nodes)):
            if self.net.ok(i):
                self._schedule_refill(i)

    # ---- shared storage ----------------------------------------------------------------
    def _rebase_tick(self, _a, _b, _c) -> None:
        total = sum(len(n.view.store.delta) for n in self.nodes)
        if total > 4 * len(self.nodes) + 64:
            self.rebase()
        self.engine.after(self.cfg.rebase_interval, self._rebase_tick)

    def rebase(self) -> None:
        """Move every view onto a base holding the latest published records."""
        old = self.base
        self._base_gen += 1
        new = Base(dict(self.truth), self._base_gen)
        changed_main = list(self._changed)
        other: dict[int, list[NodeId]] = {}
        for node in self.nodes:
            store = node.view.store
            b = store.base
            if b is old:
                store.rebase(new, changed_main)
            else:
                ch = other.get(b.gen)
                if ch is None:
                    ch = other[b.gen] = changed_ids(b, new)
                store.rebase(new, ch)
        self.base = new
        self._changed = {}
        self.memo.clear()

    def missing_records(self, i: int) -> int:
        """After ``rebase()``: records of members node ``i`` lacks or holds in an older
        version (the first record of a node still joining does not count)."""
        nodes, index = self.nodes, self.index
        return sum(1 for k in self.nodes[i].view.store.delta if nodes[index[k]].member)

    # ---- observations --------------------------------------------------------------------
    def truth_live_exits(self) -> list[int]:
        up, reach = self.net.up, self.net.reach
        out = []
        for j in self.exitish:
            r = self.nodes[j].rec
            if up[j] and reach[j] and not r.is_tombstone and Role.EXIT in r.roles:
                out.append(j)
        return out

    def exits_seen_by(self, i: int) -> list[int]:
        """Exits in node ``i``'s view that its liveness core does not hold dead."""
        node = self.nodes[i]
        state = node.live.state if node.live is not None else None
        out = []
        for j in self.exitish:
            r = node.view.get(self.ids[j])
            if r is None or r.is_tombstone or Role.EXIT not in r.roles:
                continue
            if state is not None and state(self.ids[j])[0] == DEAD:
                continue
            out.append(j)
        return out

    def visibility(self, j: int) -> int:
        """How many running nodes hold ``j`` as an exit."""
        nid = self.ids[j]
        n = 0
        for node in self.nodes:
            if self.net.up[node.idx]:
                r = node.view.get(nid)
                if r is not None and not r.is_tombstone and Role.EXIT in r.roles:
                    n += 1
        return n
