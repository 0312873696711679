"""The node runtime: one nursery running the I/O around the sans-I/O cores.

``async with Node(home) as node:`` starts the libp2p host, the gossip, DHT and
anti-entropy services, the peer manager and the control endpoint, publishes the
node's own record, and stops everything (host closed, store closed) on exit.

``Node`` is the composition root: it owns the membership view, the record
store and the record path (gossip, DHT, publication), and builds and runs the
parts that drive the other cores — anti-entropy rounds
(``services.sync.AntiEntropySync``), joining and the peer loop
(``services.peers.PeerManager``), the services (liveness and the exit pool,
relaying, feeds, the console) — and reports through ``services.status``.

Record ingestion has one path (``ingest``) whatever the source — gossip, sync,
DHT, local — so every record is validated the same way before it is stored or
forwarded, and every new identity passes the same admission bounds
(``overlay.core.admission``). Members become verified when they authenticate
to this node themselves (``confirm``: a connection, a sync round, a liveness
frame); dials to members that are not verified go through a dial budget.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from . import collector, control
from .caps import Caps
from .config import Config
from .console import EventRing
from .console.service import ConsoleService
from .console.web import ConsoleWeb
from .core.admission import REFUSALS, Admission, DialBudget, DialLimits, Limits
from .core.membership import MembershipView, Outcome
from .core.scores import PeerScores, TokenBucket
from .crypto import NodeId
from .errors import DecodeError, LocalError, Reason, RemoteError
from .home import Home
from .metrics import Metrics
from .net.host import Libp2pHost
from .records import EXIT_ROLES, Role, ValidRecord, decode
from .records import validate as validate_record
from .services.feeds import FeedMonitor
from .services.peers import PeerManager
from .services.relay import RelayService
from .services.resilience import Resilience
from .services.status import control_state, node_status
from .services.sync import SYNC_PROTOCOL, AntiEntropySync, PeerInfo
from .storage.files import write_atomic
from .storage.records import RecordStore

log = logging.getLogger("hydra.node")

RECORDS_TOPIC = "hydra/records/1"
REPUBLISH_CHECK = 10.0  # seconds between two unprompted looks at the own record
ANNOUNCE_SETTLE = 5.0  # seconds a join's announcement waits for the relay feeds to come
DHT_NAMESPACE = "hydra"
# The DHT copy of a new record is stored after a short random delay, so that its
# lookups (dozens of streams across the overlay) do not compete with the record's
# gossip in the first second; role provider records are re-announced only when
# the roles change or are this old (they serve discovery, not dissemination).
# Each record is stored once, after the node has joined (before, it knows
# nobody to store it at); a record pushed again (announced once joined) is not
# stored twice.
DHT_PUBLISH_DELAY = (1.0, 3.0)
PROVIDE_REFRESH = 1800.0
# A node that is neither exit nor standby stores its first record in the DHT at
# a random time within this many seconds of its start (exits at once: clients
# look them up), so that the stores of nodes that start together are spread.
DHT_FIRST_SPREAD = 300.0
# A record is stored at this many members: the ones closest to its key among
# the live members of the view (a lookup that reaches the key's closest nodes
# finds it). Upstream's put stores at the 20 closest a network lookup finds
# and connects to each node it asks, so every store connected a node to about
# 20 others; gossip and anti-entropy carry every record to every member, and
# the DHT copy is the fallback for a node id missing from a view.
DHT_REPLICAS = 4
# Roles announced under a DHT provider key: the few a client looks for. Every
# volunteer node relays, so a provider list of relays would be the membership
# itself (which any one peer hands over), with every node's announcement landing
# on the same 20 nodes closest to one key.
PROVIDED_ROLES = (Role.ENTRY, Role.EXIT, Role.STANDBY_EXIT)
REFUSAL_LOG_EVERY = 10.0  # seconds between two INFO lines about refused new identities


def dht_key(node_id: NodeId) -> str:
    """``/hydra/<node id, unpadded base64url>``: 50 bytes, within what libp2p DHTs accept."""
    return f"/{DHT_NAMESPACE}/{base64.urlsafe_b64encode(bytes(node_id)).rstrip(b'=').decode()}"


def role_key(role: Role) -> str:
    return f"hydra-role/{role.names()[0]}"


class Service(Protocol):
    """A component that runs inside a node (relay, exit, liveness...).

    ``attach`` is called before the host starts (register stream handlers and
    topic validators there); ``run`` is started in the node's nursery after the
    host and control endpoint are up, and is cancelled when the node stops.
    """

    def attach(self, node: Node) -> None: ...

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None: ...


class Node:
    """A running Hydra node. Use as ``async with Node(home) as node``."""

    def __init__(
        self,
        home: Home,
        config: Config | None = None,
        *,
        join: Sequence[str] = (),
        listen: Sequence[str] | None = None,
        rng: random.Random | None = None,
        clock=time.time,
        services: Sequence[Service] = (),
    ) -> None:
        self.home = home
        self.config = config or home.config()
        if listen is not None:
            self.config.listen = list(listen)
        self.join_addrs = list(join) or list(self.config.join)
        self.key = home.signing_key()
        self.node_id = self.key.node_id
        self.rng = rng or random.Random()
        self.clock = clock
        self.metrics = Metrics()
        self.caps = Caps(self.config, self.metrics)  # [limits]: bandwidth, connections, exits
        cfg = self.config
        self.admission = Admission(
            Limits(
                rate=cfg.admission_rate,
                burst=cfg.admission_burst,
                peer_rate=cfg.admission_peer_rate,
                peer_burst=cfg.admission_peer_burst,
                max_unverified=cfg.max_unverified,
                max_members=cfg.max_members,
                unverified_ttl=cfg.unverified_ttl,
            ),
            me=self.node_id,
        )
        self.dial_budget = DialBudget(
            DialLimits(
                rate=cfg.dial_rate,
                burst=cfg.dial_burst,
                addr_interval=cfg.dial_addr_interval,
                failed_interval=min(10.0, cfg.dial_addr_interval),
            )
        )
        self.view = MembershipView(admission=self.admission)
        self._refusals_logged_at = -1e18
        self._refusals_unlogged = 0
        self.scores = PeerScores()
        self.store: RecordStore | None = None
        self.host: Libp2pHost | None = None
        self.peers: dict[NodeId, PeerInfo] = {}
        self.roles = self.config.role_flags
        self.own: ValidRecord | None = None
        self.control_url = ""
        self.control_token = ""  # bearer token of the control endpoint (HOME/control.token)
        self.started_at = 0.0
        self._publish_bucket = TokenBucket(rate=1.0, burst=3.0)
        self._republish = trio.Event()
        self._announce_at: float | None = None  # a deferred announcement (``announce_own``)
        self._own_seen = -1  # highest seq of a record of ours seen from the overlay
        self._record_events: list[trio.MemorySendChannel] = []
        self._nursery: trio.Nursery | None = None
        self.changes = 0  # bumped whenever the view accepts a record
        self._provided: dict[Role, float] = {}  # role -> when we last provided its DHT key
        self._dht_stored_seq = -1  # seq of the last own record handed to the DHT
        self._dht_first_after = 0.0  # trio time before which no non-exit record is stored
        self.sync = AntiEntropySync(self)  # anti-entropy rounds (services.sync)
        self.peering = PeerManager(self, self.sync)  # join, peer loop (services.peers)
        self._isolated = False
        self.ready = trio.Event()  # set once joined (or started with nobody to join)
        self._connected_ids: dict[str, NodeId] = {}  # peer id -> node id (``connected``)
        self.events = EventRing(clock=clock)  # joins, deaths, promotions... (the console)
        self.console: ConsoleService | None = None  # set by the service's attach
        given = [s for s in services if isinstance(s, Resilience)]
        self.resilience = given[0] if given else Resilience()
        self.services = [self.resilience, *(s for s in services if s is not self.resilience)]
        if not any(isinstance(s, RelayService) for s in services):
            self.services.append(RelayService())
        if not any(isinstance(s, FeedMonitor) for s in services):
            self.services.append(FeedMonitor())
        if not any(isinstance(s, ConsoleService) for s in services):
            self.services.append(ConsoleService())
        self.relay = next(s for s in self.services if isinstance(s, RelayService))

    # ---------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Node:
        self._cm = self._lifetime()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc) -> bool | None:
        return await self._cm.__aexit__(*exc)

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[Node]:
        self.started_at = self.clock()
        if collector.tune():  # once per process (docs/performance.md: the collector)
            log.debug("garbage collector thresholds set to %s", collector.THRESHOLDS)
        self._dht_first_after = trio.current_time() + self.rng.uniform(0.0, DHT_FIRST_SPREAD)
        # one node per home: the lock comes before anything in the home is written
        self._home_lock = self.home.locked()
        self._home_lock.__enter__()
        try:
            self.store = RecordStore(self.home.db_path)
        except BaseException:
            self._home_lock.__exit__(None, None, None)
            raise
        try:
            self._load_store(self.clock())
            self.host = Libp2pHost(
                self.key,
                self.config.listen,
                gossip_topics=[RECORDS_TOPIC],
                gossip_heartbeat=self.config.gossip_heartbeat,
                dht_validators={DHT_NAMESPACE: _DhtRecordValidator(self.clock)},
                dht_timeout=10.0,
                limits=self.caps.connection_limits(),
            )
            self.metrics.watch_connections(self.host)
            self.caps.attach_host(self.host)
            self.host.set_topic_validator(RECORDS_TOPIC, self._gossip_validator)
            self.host.set_stream_handler(SYNC_PROTOCOL, self.sync.serve)
            for svc in self.services:
                svc.attach(self)
            async with self.host, trio.open_nursery() as n:
                self._nursery = n
                await n.start(self._run_control)
                for svc in self.services:
                    await n.start(svc.run)
                # with a join to come, the join announces the record (``announce_own``):
                # gossiped now, to nobody, it would sit in GossipSub's message cache
                # and be replayed to the join peer, and the overlay would carry it twice
                await self.publish_own("start", gossip=not self.join_addrs)
                n.start_soon(self._gossip_loop)
                n.start_soon(self.sync.run)
                n.start_soon(self.peering.run)
                n.start_soon(self._maintenance_loop)
                n.start_soon(self._republish_loop)
                if self.join_addrs:
                    try:
                        await self.join(self.join_addrs)
                    except LocalError as e:
                        known = len(self.view) - (self.node_id in self.view)
                        if not known:
                            raise
                        # e.g. a restart after the join peer was taken down: the
                        # stored members are dialled, and the peer loop retries
                        log.warning(
                            "%s; carrying on with %d members from the store (check --join "
                            "or [network] join if this repeats)",
                            e,
                            known,
                        )
                self.ready.set()
                try:
                    yield self
                finally:
                    self._nursery = None
                    n.cancel_scope.cancel()
        finally:
            self.host = None
            self.store.close()
            self.store = None
            self._remove_control_file()
            self._home_lock.__exit__(None, None, None)

    # ---------------------------------------------------------------- records
    def _load_store(self, now: float) -> None:
        """Fill the view from the store: verified members first, then the newest
        unverified ones up to the bound; what does not fit is deleted."""
        left_out = []
        for rec, first_seen, verified_at in self.store.members(now):
            fs = now if first_seen is None else min(first_seen, now)
            if not self.view.restore(rec, fs, verified_at) and rec.node_id not in self.view:
                left_out.append(rec.node_id)
        if left_out:
            self.store.delete(left_out)
            log.info(
                "store: %d unverified records beyond the admission bound dropped", len(left_out)
            )
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.records_known.set(len(self.view))
        self.metrics.records_unverified.set(self.admission.unverified)

    def _sync_store(self) -> None:
        """Remove from the store what admission evicted or dropped from the view."""
        gone = self.view.take_dropped()
        if gone:
            self.store.delete(gone)

    def confirm(self, peer: NodeId) -> None:
        """``peer`` authenticated to us itself (connection, sync, liveness frame)."""
        if peer == self.node_id:
            return
        now = self.clock()
        if self.view.confirm(peer, now):
            self.store.set_verified(peer, now)
            self.metrics.records_unverified.set(self.admission.unverified)

    def ingest(
        self, raw: bytes, source: str, peer: NodeId | str | None = None, *, bulk: bool = False
    ) -> bool:
        """Validate and merge one record from anywhere. True if valid (new or duplicate).

        A new identity beyond the admission bounds is refused (False: a gossip
        validator does not forward it) without blame for ``peer``; ``bulk`` marks
        a joining node's first pull (no rate limit, the bounds still hold).
        """
        now = self.clock()
        try:
            outcome, rec = self.view.offer(raw, now, peer=peer, bulk=bulk)
        except RemoteError as e:
            if source != "local" and self._own_seq_conflict(raw, e):
                return False  # our own record from an earlier life: not forwarded, no penalty
            self.metrics.records_rejected.labels(source, e.reason.value).inc()
            if e.reason in REFUSALS:
                self._log_refusal(e, source, peer, now)
                return False
            log.info("rejected record from %s via %s: %s", peer and _short(peer), source, e)
            if peer is not None and peer != self.node_id:
                self.penalize(peer, e.reason)
            return False
        if outcome is Outcome.ACCEPTED:
            if rec.node_id == self.node_id and source != "local":
                self._own_superseded(rec.seq)
            self.changes += 1
            self._kick_sync_for(rec, source, peer, now)
            self.store.put(
                rec,
                first_seen=now,
                verified_at=self.view.verified_since(rec.node_id),
            )
            self._sync_store()
            self.metrics.records_accepted.labels(source).inc()
            self._update_gauges()
            for ch in list(self._record_events):
                try:
                    ch.send_nowait(rec)
                except (trio.WouldBlock, trio.BrokenResourceError):
                    pass
        return True

    def _kick_sync_for(self, rec: ValidRecord, source: str, peer, now: float) -> None:
        """Anti-entropy comes back to the fast rate when a record shows that peers
        may differ: it reached us other than by gossip (so our peers may lack it),
        or a gossiped seq skipped one (so we missed an update its forwarder has)."""
        if source == "gossip":
            prior = self.view.prior_seq
            if prior is not None and rec.seq > prior + 1 and isinstance(peer, NodeId):
                self.kick_sync(peer)
            return
        if source == "sync" or rec.node_id == self.node_id:
            return  # a round that moved records already keeps the fast rate; own: gossiped
        self.kick_sync()

    def _own_superseded(self, seq: int) -> None:
        """The overlay holds a record of ours at ``seq`` >= our current one (signed before
        a lost or rolled-back state file): publish again above it, or every node keeps
        the old record and rejects our new ones as stale."""
        if seq > self._own_seen:
            log.warning(
                "the overlay holds our record seq=%d; republishing above it (if another "
                "node runs from a copy of this home, stop it: identities must not be shared)",
                seq,
            )
            self._own_seen = seq
        self._republish.set()

    def _own_seq_conflict(self, raw: bytes, err: RemoteError) -> bool:
        """True if ``raw`` is a genuine record of ours, other than the one we hold, with
        the same seq (a ``Stale`` rejection): that record lives in the overlay too."""
        if err.reason is not Reason.STALE_SEQ:
            return False
        try:
            unverified = decode(raw)
        except RemoteError:
            return False
        held = self.view.seq_of(self.node_id)
        if unverified.node_id != self.node_id or held is None or unverified.seq < held:
            return False
        try:
            unverified.verify()  # only our own key can make us republish
        except RemoteError:
            return False
        self._own_superseded(unverified.seq)
        return True

    def _log_refusal(
        self, e: RemoteError, source: str, peer: NodeId | str | None, now: float
    ) -> None:
        self._refusals_unlogged += 1
        if now - self._refusals_logged_at < REFUSAL_LOG_EVERY:
            return
        log.info(
            "admission: refused %d new identities (latest via %s from %s: %s); %d unverified held",
            self._refusals_unlogged,
            source,
            peer and _short(peer),
            e,
            self.admission.unverified,
        )
        self._refusals_logged_at, self._refusals_unlogged = now, 0

    def penalize(self, peer: NodeId | str, reason: Reason) -> None:
        """Score bad input from ``peer`` (a node id, or the peer id of a non-Hydra key)."""
        peer = _as_peer(peer)
        self.metrics.penalties.labels(reason.value).inc()
        if self.scores.penalize(peer, reason, self.clock()) and self._nursery is not None:
            log.info("disconnecting and banning %s after repeated bad input", _short(peer))
            self.metrics.disconnects.inc()
            self._nursery.start_soon(self._disconnect, peer)

    async def _disconnect(self, peer: NodeId | str) -> None:
        pid = peer if isinstance(peer, str) else peer.peer_id()
        if isinstance(peer, NodeId):
            self.peers.pop(peer, None)
        if self.host is None:
            return
        self.host.ban(pid, self.scores.ban_seconds)
        try:
            await self.host.disconnect(pid)
        except Exception as e:  # noqa: BLE001 - already gone is fine
            log.debug("disconnect %s: %s", _short(peer), e)

    def current_feeds(self) -> list[str]:
        # A feed monitor service (overlay/services/feeds.py) decides which feeds work.
        for svc in self.services:
            announced = getattr(svc, "announced_feeds", None)
            if announced is not None and (feeds := announced()):
                return feeds
        if self.config.announce:
            return list(self.config.announce)
        feeds = []
        for addr in self.host.listen_addrs():
            base = addr.split("/p2p/")[0]
            if base.startswith("/ip4/0.0.0.0/"):
                from .home import feeds_from_listen

                feeds.extend(feeds_from_listen([base]))
            else:
                feeds.append(base)
        return list(dict.fromkeys(feeds))[:8]

    async def publish_own(
        self, why: str, roles: Role | None = None, *, gossip: bool = True
    ) -> ValidRecord:
        """Sign a new record (seq+1) and push it to store, view, gossip (unless not
        ``gossip``) and DHT."""
        if roles is not None:
            self.roles = roles
        now = self.clock()
        while not self._publish_bucket.take(now):
            await trio.sleep(0.2)
            now = self.clock()
        rec = self.home.make_record(
            now=now,
            feeds=self.current_feeds(),
            roles=self.roles,
            cfg=self.config,
            above=self.view.seq_of(self.node_id) or 0,
        )
        self.own = rec
        self.ingest(rec.encode(), "local")
        self.metrics.publishes.inc()
        log.info("published record seq=%d roles=%s (%s)", rec.seq, rec.roles.names(), why)
        await self._push(rec, gossip=gossip)
        return rec

    async def announce_own(self, why: str) -> ValidRecord:
        """Push our record to gossip and the DHT again (e.g. once joined, when there
        is someone to gossip to); a new one is signed only if the overlay holds a
        newer record of ours than the one we push (say, a restart from an old
        home), so a join costs the overlay one record, not two."""
        own = self.own
        if own is None or own.is_tombstone or (self.view.seq_of(self.node_id) or 0) > own.seq:
            return await self.publish_own(why)
        if any(getattr(svc, "feeds_settling", lambda: False)() for svc in self.services):
            # our relay feeds are on their way: the record that has them is the one
            # to announce (one record per join for the overlay to carry, not two);
            # the republish loop gossips it, or this one after ANNOUNCE_SETTLE
            self._announce_at = self.clock() + ANNOUNCE_SETTLE
            self.request_republish()
            log.info("record seq=%d announced once the relay feeds come (%s)", own.seq, why)
            return own
        log.info("announced record seq=%d (%s)", own.seq, why)
        await self._push(own)
        return own

    async def withdraw(self) -> ValidRecord:
        """Publish a tombstone: the overlay forgets this node."""
        rec = self.home.make_tombstone(self.clock(), above=self.view.seq_of(self.node_id) or 0)
        self.own = rec
        self.ingest(rec.encode(), "local")
        await self._push(rec)
        return rec

    async def _push(self, rec: ValidRecord, *, gossip: bool = True) -> None:
        raw = rec.encode()
        if gossip:
            self._announce_at = None
            try:
                await self.host.publish(RECORDS_TOPIC, raw)
                self.metrics.gossip_messages.labels("out").inc()
                self.metrics.gossip_bytes.labels("out").inc(len(raw))
            except Exception as e:  # noqa: BLE001 - gossip is best effort; sync repairs
                log.info("gossip publish failed: %s", e)
        if self._nursery is not None:
            self._nursery.start_soon(self._dht_publish, rec)

    async def _dht_publish(self, rec: ValidRecord) -> None:
        await trio.sleep(self.rng.uniform(*DHT_PUBLISH_DELAY))
        await self.ready.wait()  # joined (or started with nobody to join)
        if not rec.roles & EXIT_ROLES:
            await trio.sleep_until(self._dht_first_after)
        if self.own is not rec or rec.seq <= self._dht_stored_seq:
            return  # a newer record was published meanwhile, or this one is stored
        self._dht_stored_seq = rec.seq
        with trio.move_on_after(10):
            try:
                await self._dht_store(dht_key(rec.node_id), rec.encode())
                now = self.clock()
                for role in PROVIDED_ROLES:
                    if role in rec.roles and now - self._provided.get(role, -1e18) >= (
                        PROVIDE_REFRESH
                    ):
                        await self.host.provide(role_key(role))
                        self._provided[role] = now
            except Exception as e:  # noqa: BLE001 - the DHT is one layer of three
                log.debug("dht publish failed: %s", e)

    async def _dht_store(self, key: str, raw: bytes) -> None:
        """Store ``raw`` at the ``DHT_REPLICAS`` live members closest to ``key``.

        The view holds the whole membership, so the closest members are known
        here without a lookup (upstream's put looks them up first and connects
        to every node the lookup asks); those we have no connection to are
        dialled through their feeds, within the dial budget (``connect_record``),
        and those connections are trimmed again once idle (``PeerManager.trim``).
        """
        now = self.clock()
        live = {
            r.node_id.peer_id(): r
            for r in self.view.snapshot(now).live()
            if r.node_id != self.node_id and not self.scores.banned(r.node_id, now)
        }
        targets = self.host.dht_closest(key, live, DHT_REPLICAS)
        connected = set(self.host.connected_peers())
        dialled = [pid for pid in targets if pid not in connected]
        async with trio.open_nursery() as n:
            for pid in dialled:
                n.start_soon(self.connect_record, live[pid])
        now = self.clock()
        for pid in dialled:  # their connections go again once idle (``PeerManager.trim``)
            self.peering.errand(live[pid].node_id, now)
        connected = set(self.host.connected_peers())
        await self.host.dht_put_at(key, raw, [p for p in targets if p in connected])

    async def lookup(self, node_id: NodeId) -> ValidRecord | None:
        """Find a node's record: local view first, then the DHT (validated, seq-compared)."""
        rec = self.view.get(node_id)
        if rec is not None:
            return rec
        with trio.move_on_after(10):
            raw = await self.host.dht_get(dht_key(node_id))
            if raw:
                self.ingest(raw, "dht")
        return self.view.get(node_id)

    async def _gossip_validator(self, from_peer: str, msg) -> bool:
        data = msg.data
        self.metrics.gossip_messages.labels("in").inc()
        self.metrics.gossip_bytes.labels("in").inc(len(data))
        peer = _as_peer(from_peer)
        if isinstance(peer, NodeId):
            self.confirm(peer)
        return self.ingest(data, "gossip", peer)

    async def _gossip_loop(self) -> None:
        # validation (and so ingestion) happens in the validator; drain deliveries
        async with await self.host.subscribe(RECORDS_TOPIC) as sub:
            async for _msg in sub:
                pass

    def record_events(self, size: int = 1000) -> trio.MemoryReceiveChannel:
        """A channel of every record accepted from now on (for tests and tools)."""
        send, recv = trio.open_memory_channel(size)
        self._record_events.append(send)
        return recv

    # ---------------------------------------------------------------- anti-entropy
    async def sync_with(self, peer: NodeId, *, bulk: bool = False) -> int:
        """One anti-entropy round pulling from ``peer`` (``services.sync``)."""
        return await self.sync.sync_with(peer, bulk=bulk)

    # ---------------------------------------------------------------- peers
    def connected(self) -> list[NodeId]:
        out = []
        ids, self._connected_ids = self._connected_ids, {}
        for pid in self.host.connected_peers():
            nid = ids.get(pid)
            if nid is None:
                try:
                    nid = NodeId.from_peer_id(pid)
                except ValueError:
                    continue
            self._connected_ids[pid] = nid  # parsed once per connection, not per call
            out.append(nid)
            self.confirm(nid)  # a connection authenticates its peer id (Noise)
            if nid not in self.peers:
                self.peers[nid] = PeerInfo(nid, self.clock())
        for gone in set(self.peers) - set(out):
            del self.peers[gone]
        self.metrics.peers.set(len(out))
        if out and self._isolated:
            self.kick_sync()  # connected again after having none: compare views soon
        self._isolated = not out
        return out

    def kick_sync(self, peer: NodeId | None = None) -> None:
        """Bring anti-entropy rounds back to the fast rate now (with ``peer`` next)."""
        self.sync.kick(peer)

    async def connect_record(self, rec: ValidRecord) -> bool:
        """Dial a member through its feeds in turn, the next in parallel after 300 ms
        (happy eyeballs; the feed that worked last time first); remember the winner."""
        from .services.feeds import dial_record

        feed = await dial_record(self, rec)
        if feed is None:
            return False
        self.peers[rec.node_id] = PeerInfo(rec.node_id, self.clock(), feed)
        self.confirm(rec.node_id)
        return True

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` in the background until it returns or the node stops."""
        if self._nursery is None:
            raise LocalError("the node is not running")
        self._nursery.start_soon(fn, *args)

    def permitted_feeds(self, rec: ValidRecord, feeds: Sequence[str]) -> list[str]:
        """The feeds of ``rec`` the dial budget lets us dial now (``dial_record`` asks):
        any feed that did not just fail for a verified member; for a member that
        never authenticated to us, a budgeted few (see ``core.admission.DialBudget``)."""
        return self.dial_budget.permit(feeds, self.view.is_verified(rec.node_id), self.clock())

    def dial_outcome(self, feed: str, outcome: str) -> None:
        """``dial_record`` reports each dial: ``"started"``, then ``"ok"`` or ``"failed"``."""
        self.dial_budget.dialled(feed, outcome, self.clock())

    async def join(self, addrs: Sequence[str]) -> str:
        """Connect through the first reachable address and pull the whole membership."""
        return await self.peering.join(addrs)

    @property
    def joined_via(self) -> str | None:
        """The join address that worked last (None before a join)."""
        return self.peering.joined_via

    # ---------------------------------------------------------------- maintenance
    async def _maintenance_loop(self) -> None:
        while True:
            await trio.sleep(5.0)
            now = self.clock()
            gone = self.view.expire(now)
            self.store.purge_expired(now)
            self.store.delete(gone)
            self._sync_store()
            self.scores.forget_idle(now)
            self._update_gauges()
            collector.collect_if_due()

    async def _republish_loop(self) -> None:
        # woken by ``request_republish`` (the feed monitor, when the feeds to
        # announce changed) and by a record of ours seen from the overlay; else
        # at the refresh time, and at least every REPUBLISH_CHECK seconds
        while True:
            wait = REPUBLISH_CHECK
            own = self.own
            if own is not None and not own.is_tombstone:
                refresh_at = own.issued_at + (own.expires_at - own.issued_at) / 2
                wait = min(wait, max(0.05, refresh_at - self.clock()))
            if self._announce_at is not None:
                wait = min(wait, max(0.05, self._announce_at - self.clock()))
            with trio.move_on_after(wait):
                await self._republish.wait()
            self._republish = trio.Event()
            own = self.own
            if own is not None and own.seq <= self._own_seen:
                if own.is_tombstone:
                    await self.withdraw()
                else:
                    await self.publish_own("own record seen with a higher seq")
                continue
            if own is None or own.is_tombstone:
                continue
            now = self.clock()
            half_life = (own.expires_at - own.issued_at) / 2
            if now >= own.issued_at + half_life:
                await self.publish_own("refresh before expiry")
            elif sorted(self.current_feeds()) != sorted(own.feeds):
                await self.publish_own("feeds changed")
            elif self._announce_at is not None and now >= self._announce_at:
                log.info("announced record seq=%d (joined; no relay feeds came)", own.seq)
                await self._push(own)

    def request_republish(self) -> None:
        self._republish.set()

    # ---------------------------------------------------------------- control
    async def _run_control(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = control.bind_local(self.config.control_listen)
        self.control_url = control.url_of(sock)
        self.control_token = control.ensure_token(self.home.path)
        write_atomic(
            self.home.control_path,
            json.dumps(
                {"url": self.control_url, "peer_id": self.node_id.peer_id(), "pid": os.getpid()}
            ).encode(),
            mode=0o600,
        )

        def refused(check: str) -> None:
            self.metrics.control_refused.labels(Reason.UNAUTHORIZED.value, check).inc()

        await control.serve_control(
            sock,
            self.control_state,
            self.metrics.render,
            token=self.control_token,
            on_refused=refused,
            console=ConsoleWeb(self.console) if self.console is not None else None,
            task_status=task_status,
        )

    def _remove_control_file(self) -> None:
        """Remove HOME/control.json only if this process wrote it (same pid and URL)."""
        try:
            info = json.loads(self.home.control_path.read_text())
        except (OSError, ValueError):
            return
        if info.get("pid") == os.getpid() and info.get("url") == self.control_url:
            self.home.control_path.unlink(missing_ok=True)

    def control_state(self, what: str) -> dict:
        """What the control endpoint serves (``services.status``)."""
        return control_state(self, what)

    def status(self) -> dict:
        """The node's state as ``overlay status`` shows it (``services.status``)."""
        return node_status(self)


class _DhtRecordValidator:
    """DHT namespace hooks: only valid records under their own node's key; highest seq wins."""

    def __init__(self, clock) -> None:
        self.clock = clock

    def validate(self, key: str, value: bytes) -> None:
        rec = validate_record(value, self.clock())
        if key != dht_key(rec.node_id):
            raise DecodeError(Reason.MALFORMED, "record stored under another node's key")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, v in enumerate(values):
            try:
                seq = decode(v).seq
            except RemoteError:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best


def _as_peer(peer: NodeId | str) -> NodeId | str:
    """A node id when the peer's key is Ed25519 (a Hydra node), else its peer id string."""
    if isinstance(peer, str):
        try:
            return NodeId.from_peer_id(peer)
        except ValueError:
            return peer
    return peer


def _short(peer: NodeId | str) -> str:
    return peer.short() if isinstance(peer, NodeId) else peer[-8:]
