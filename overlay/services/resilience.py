"""Exit resilience service: runs the liveness core and the exit pool inside a node.

I/O edge only: streams and gossip carry liveness frames to ``Liveness``; its
effects are executed here; ``ExitPool`` sees the membership and the liveness
view and its ``Announce`` effects re-publish our record (promotion to exit, or
stepping back to standby).

Only verified members (``overlay.core.admission``: they authenticated to this
node themselves) are monitored, count as accusers, and count as exits for the
pool; a liveness frame received from a peer confirms it. A probe never opens a
new connection to a member that is not verified.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio
from prometheus_client import Counter, Gauge

from ..console.service import role_of
from ..core.effects import Announce, Broadcast, Penalize, Send, StateChanged
from ..core.exitpool import ExitPool
from ..core.liveness import DEAD, PROTOCOL, TOPIC, Liveness
from ..core.timing import SETTLE
from ..crypto import NodeId
from ..errors import RemoteError
from ..net import framing
from ..records import EXIT_ROLES, Role
from ..wire import liveness as wire
from .frame_sender import FrameSender

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("hydra.resilience")

# A peer we hear from is not pinged (passive turns), so the stream to it can stay
# unused for minutes; a stream closed and opened again costs a negotiation at both
# ends. Ours closes with the connection or after SEND_IDLE; an inbound one after
# IDLE_TIMEOUT, longer (it must outlive the sender's).
IDLE_TIMEOUT = 900.0  # an inbound liveness stream with no frame for this long is closed
SEND_IDLE = 600.0  # our stream to a peer is closed sooner (a round-robin over many is slow)
POOL_RECHECK = 30.0  # the exit pool looks at unchanged inputs this often, to be sure
MAX_SLEEP = 1.0  # the loop wakes at least this often (probes wake it sooner)


class Resilience:
    """Failure detection of members and standby-exit promotion for one node."""

    def __init__(self, *, fault_drop: float = 0.0) -> None:
        """:param fault_drop: fault injection for tests — the probability that each
        liveness frame this node sends or receives is silently lost (a lossy link)."""
        self.fault_drop = fault_drop
        self.fault_dropped = 0  # liveness frames lost to ``fault_drop``
        # set once the exit pool has looked at the membership after SETTLE
        self.settled = trio.Event()
        self.node: NodeContext | None = None
        self.liveness: Liveness | None = None
        self.pool: ExitPool | None = None
        self._wake = trio.Event()
        self._members_version: tuple[int, int] | None = None
        self._exitish: frozenset[NodeId] = frozenset()  # live exits and standbys
        self._near_key: frozenset[str] | None = None  # connections ``set_near`` last saw
        self._transitions = 0  # liveness state changes seen (the exit pool reads states)
        self._nursery: trio.Nursery | None = None
        self._ready_at: float | None = None
        self._out: FrameSender | None = None  # one stream per peer for our frames

    # ------------------------------------------------------------------ wiring
    def attach(self, node: NodeContext) -> None:
        self.node = node
        cfg = node.config
        now = node.clock()
        self.liveness = Liveness(
            node.node_id,
            node.key.sign,
            node.rng,
            probe_interval=cfg.probe_interval,
            probe_timeout=cfg.probe_timeout,
            suspicion_min=cfg.suspicion_min,
            suspicion_max=cfg.suspicion_max,
            calm_interval=cfg.calm_interval or None,
            incarnation=int(now * 1000),  # grows across restarts
            # accusations count only from members that authenticated to us:
            # inventing records does not add confirmations
            is_known=node.view.is_verified,
            # a member that sends us anything while we wait for its ack is running
            heard=self._heard,
            secured=self._secured,
            answered=self._answered,
        )
        self.pool = ExitPool(
            node.node_id,
            node.roles,
            node.rng,
            target_live_exits=cfg.target_live_exits,
            mode=cfg.exit_policy_mode,
        )
        r = node.metrics.registry
        self.m_states = Counter(
            "hydra_liveness_transitions", "Liveness state changes seen", ["state"], registry=r
        )
        self.m_frames = Counter(
            "hydra_liveness_frames", "Liveness frames", ["direction"], registry=r
        )
        self.m_send_failed = Counter(
            "hydra_liveness_sends_failed",
            "Liveness frames not sent: full (queue or links), stale (queued too long), "
            "backoff (the last open failed), timeout, error",
            ["why"],
            registry=r,
        )
        self.m_promotions = Counter(
            "hydra_exit_role_changes", "Own promotions/step-backs", ["kind"], registry=r
        )
        self.m_dead = Gauge("hydra_members_dead", "Members this node holds dead", registry=r)
        self._out = FrameSender(
            lambda peer: node.host.open_stream(peer.peer_id(), self.liveness.protocol),
            clock=node.clock,
            on_drop=lambda why: self.m_send_failed.labels(why).inc(),
            on_sent=self.m_frames.labels("out").inc,
            idle=SEND_IDLE,
            stream_gone=lambda stream: stream.connection_closed,
        )
        node.host.set_stream_handler(PROTOCOL, self._serve)
        node.host.on_disconnect(self._on_disconnect)
        node.host.set_topic_validator(TOPIC, self._validate_gossip)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self._nursery = None
            self._out.bind(None)

    async def _run(self, task_status) -> None:
        node, liveness, pool = self.node, self.liveness, self.pool
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._out.bind(nursery)
            nursery.start_soon(self._drain_gossip)
            task_status.started()
            pool_seen, pool_at, dead_seen = None, -float("inf"), None
            while True:
                now = node.clock()
                self._refresh_members(now)
                self._refresh_near()
                self._execute(liveness.tick(now))
                if dead_seen != (self._transitions, self._members_version):
                    dead_seen = (self._transitions, self._members_version)
                    states = liveness.states()
                    self.m_dead.set(sum(1 for s in states.values() if s == DEAD))
                if node.ready.is_set():
                    if self._ready_at is None:
                        self._ready_at = now
                    # the pool reads records, liveness states and verification ages:
                    # look again when one of them changed (a record accepted or
                    # expired, a verification, a transition), when an exit's
                    # verification becomes old enough to count (``next_update``),
                    # when the pool asked to be woken, or once per POOL_RECHECK
                    inputs = (
                        node.changes,
                        len(node.view),
                        node.admission.version,
                        self._transitions,
                    )
                    pool_due = [t for t in (pool.next_wakeup(), pool.next_update()) if t]
                    if now - self._ready_at >= SETTLE and (
                        inputs != pool_seen
                        or now - pool_at >= POOL_RECHECK
                        or any(now >= t for t in pool_due)
                    ):
                        pool_seen, pool_at = inputs, now
                        records = node.view.snapshot(now).records.values()
                        self._execute(
                            pool.update(records, liveness.view(), now, node.view.verified_since)
                        )
                        node.metrics.exits_live.set(pool.live_exits)
                        self.settled.set()
                wake = [
                    t for t in (liveness.next_wakeup(), pool.next_wakeup(), pool.next_update()) if t
                ]
                if node.ready.is_set() and self._ready_at is not None:
                    wake.append(max(self._ready_at + SETTLE, pool_at + POOL_RECHECK))
                delay = min(wake, default=now + MAX_SLEEP) - now
                with trio.move_on_after(min(max(delay, 0.01), MAX_SLEEP)):
                    await self._wake.wait()
                self._wake = trio.Event()

    def _heard(self, member: NodeId) -> int | None:
        host = self.node.host
        return None if host is None else host.reads_from(member.peer_id())

    def _secured(self, member: NodeId) -> int:
        host = self.node.host
        return 0 if host is None else host.handshakes_with(member.peer_id())

    def _answered(self, member: NodeId) -> int:
        host = self.node.host
        return 0 if host is None else host.dials_answered(member.peer_id())

    def _refresh_members(self, now: float) -> None:
        node = self.node
        version = (node.changes, node.admission.version)
        if self._members_version == version:
            return
        self._members_version = version
        verified = node.view.is_verified
        live = [
            r
            for r in node.view.snapshot(now).live()
            if r.node_id != node.node_id and verified(r.node_id)
        ]
        self.liveness.set_members([r.node_id for r in live], now)
        self._exitish = frozenset(r.node_id for r in live if r.roles & EXIT_ROLES)
        self.liveness.set_critical(self._exitish)  # probed every period, the others calmly
        self._near_key = None

    def _refresh_near(self) -> None:
        """Routine probes go to the members we have connections to, and to every
        exit and standby (the exit pool needs its own view of them): probing
        never dials the rest of the overlay (``Liveness.set_near``)."""
        connected = frozenset(self.node.host.connected_peers())
        if connected == self._near_key:
            return
        self._near_key = connected
        near = set(self._exitish)
        for pid in connected:
            try:
                near.add(NodeId.from_peer_id(pid))
            except ValueError:
                continue  # not a Hydra node
        self.liveness.set_near(near)

    # ------------------------------------------------------------------ effects
    def _execute(self, effects) -> None:
        node = self.node
        for e in effects:
            if isinstance(e, Send):
                self._send(e)
            elif isinstance(e, Broadcast):
                self._spawn(self._broadcast, e)
            elif isinstance(e, Penalize):
                node.penalize(e.peer, e.reason)
            elif isinstance(e, StateChanged):
                self._transitions += 1
                self.m_states.labels(e.state).inc()
                rec = node.view.get(e.node)
                # another node's state: nothing for this node's operator to do
                exit_ = " (an exit)" if rec and Role.EXIT in rec.roles else ""
                log.info("member %s is %s%s", e.node.short(), e.state, exit_)
                node.events.add(
                    e.state,
                    f"member {e.node.short()} is {e.state}",
                    peer=e.node.peer_id(),
                    role=role_of(rec.roles) if rec else "",
                    at=e.since,
                )
            elif isinstance(e, Announce):
                roles = Role.parse(e.roles)
                kind = (
                    "promote" if Role.EXIT in roles and Role.EXIT not in node.roles else "step-back"
                )
                self.m_promotions.labels(kind).inc()
                log.info("exit pool: %s (%s)", kind, e.why)  # automatic, by design
                self._spawn(node.publish_own, e.why, roles)

    def _spawn(self, fn, *args) -> None:
        if self._nursery is None:
            return  # not running (yet, or any more): drop, as a lost packet
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # nursery closing during shutdown
            pass

    def _send(self, e: Send) -> None:
        """Queue one frame on the peer's long-lived stream (``FrameSender``);
        a frame that cannot go out in time is lost, which SWIM is built for."""
        if self.fault_drop and self.node.rng.random() < self.fault_drop:
            self.fault_dropped += 1
            return
        if self._may_open(e.peer):  # never dial a member that did not authenticate to us
            self._out.send(e.peer, framing.encode_frame(e.frame, wire.MAX_SIZE), urgent=e.urgent)

    def _may_open(self, peer: NodeId) -> bool:
        """A new stream may go to a verified member, or over a connection we have."""
        node = self.node
        return node.view.is_verified(peer) or peer.peer_id() in node.host.connected_peers()

    async def _broadcast(self, e: Broadcast) -> None:
        try:
            await self.node.host.publish(e.topic, e.data)
        except Exception as exc:  # noqa: BLE001 - gossip is best effort
            log.debug("liveness broadcast failed: %r", exc)

    # ------------------------------------------------------------------ input
    async def _serve(self, stream, remote_peer: str) -> None:
        try:
            peer = NodeId.from_peer_id(remote_peer)
        except ValueError:
            return
        try:
            while True:
                with trio.fail_after(IDLE_TIMEOUT):
                    frame = await framing.read_frame(stream, wire.MAX_SIZE)
                if frame is None:
                    break
                self.m_frames.labels("in").inc()
                self.node.confirm(peer)  # it wrote to us over an authenticated stream
                if self.fault_drop and self.node.rng.random() < self.fault_drop:
                    self.fault_dropped += 1
                    continue
                self._execute(self.liveness.receive(peer, frame, self.node.clock()))
                self._wake.set()
        except RemoteError as e:
            self.node.penalize(peer, e.reason)
        except Exception as e:  # noqa: BLE001 - broken stream
            log.debug("liveness stream from %s: %r", peer.short(), e)
        finally:
            with trio.move_on_after(0.5, shield=True):
                try:
                    await stream.close()
                except Exception:  # noqa: BLE001
                    pass

    def _on_disconnect(self, peer_id: str, trimmed: bool) -> None:
        """A connection closed: probe that member now (a crash closes its sockets),
        unless it was trimmed (one side said it no longer needs it: alive) or
        another connection to it is still open (a dial-back or a second feed
        closed: a crash closes them all, and the last one brings the probe)."""
        try:
            peer = NodeId.from_peer_id(peer_id)
        except ValueError:
            return
        self._out.connection_closed(peer)  # our stream goes if it ran over that connection
        if trimmed or self.node.host.is_connected(peer_id):
            return
        self._execute(self.liveness.probe_now(peer, self.node.clock()))
        self._wake.set()

    async def _validate_gossip(self, forwarder: str, msg) -> bool:
        if msg.origin == self.node.node_id.peer_id():
            return True
        try:
            peer = NodeId.from_peer_id(forwarder)
        except ValueError:
            return False
        effects = self.liveness.receive(peer, msg.data, self.node.clock())
        self._execute(effects)
        self._wake.set()
        return not any(isinstance(e, Penalize) for e in effects)

    async def _drain_gossip(self) -> None:
        async with await self.node.host.subscribe(TOPIC) as sub:
            async for _ in sub:
                pass

    # ------------------------------------------------------------------ views
    def exits(self, now: float) -> dict:
        view = self.liveness.view()
        snap = self.node.view.snapshot(now)

        verified = self.node.view.is_verified

        def entry(r):
            state, since = view.get(r.node_id, ("alive", r.issued_at))
            if r.node_id == self.node.node_id:
                state, since = "alive", self.node.started_at
            return {
                "peer_id": r.node_id.peer_id(),
                "state": state,
                "verified": verified(r.node_id),
                "since": round(since if math.isfinite(since) else r.issued_at, 3),
                "seq": r.seq,
                "roles": r.roles.names(),
                "feeds": list(r.feeds),
                "policy": list(r.exit_policy),
            }

        exits = [entry(r) for r in snap.with_role(Role.EXIT)]
        standby = [entry(r) for r in snap.with_role(Role.STANDBY_EXIT) if Role.EXIT not in r.roles]
        return {
            "exits": exits,
            "standby": standby,
            # as the exit pool counts: verified here and not dead
            "live_exits": sum(1 for x in exits if x["state"] != DEAD and x["verified"]),
            "target_live_exits": self.pool.target,
            "mode": self.pool.mode,
            "events": [
                {"at": round(ev.at, 3), "kind": ev.kind, "live": ev.live, "why": ev.why}
                for ev in list(self.pool.events)[-20:]
            ],
        }
