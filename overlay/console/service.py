"""The console service of a node: event sources, the history sampler, and snapshots.

Runs in the node's nursery like the other services. Each second it notes peers
that connected or left (``peer-up`` / ``peer-down`` events) and, every
``History.interval`` seconds, takes a history sample (records held, peers,
members, exit pool, traffic by class). A task reads the node's accepted records
to note members that join (a new node id) or leave (a tombstone); the events of
liveness, the exit pool and the feeds are added where those are logged.

``snapshot()`` is what the control endpoint serves (``/console/state``, the
``/console/stream`` Server-Sent Events, ``overlay status --watch``): plain JSON
values, built at most once per ``SNAPSHOT_TTL`` seconds however many readers ask.

Bounds: the event ring and the history are fixed-size; the set of node ids seen
is cleared and rebuilt from the view when it outgrows twice ``max_members``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..home import dialable
from ..records import Role
from .history import History

if TYPE_CHECKING:
    from ..runtime import Node

log = logging.getLogger("hydra.console")

TICK = 1.0  # seconds between two looks at the peers (counters: see ``_read_rates``)
SNAPSHOT_TTL = 0.5  # a snapshot is rebuilt at most this often
QUEUE_TTL = 5.0  # the exit delivery queue (SQLite) is counted at most this often
EVENTS_IN_SNAPSHOT = 50
TRAFFIC = ("gossip", "sync", "relay")  # traffic classes, bytes per second


def counter_total(metric) -> float:
    """The sum of a Prometheus counter over all its labels (0 if none yet)."""
    total = 0.0
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                total += s.value
    return total


def role_of(roles: Role) -> str:
    if Role.EXIT in roles:
        return "exit"
    if Role.STANDBY_EXIT in roles:
        return "standby"
    return ""


class ConsoleService:
    """See the module docstring."""

    def __init__(self, *, tick: float = TICK, history: History | None = None) -> None:
        self.tick = tick
        self.history = history or History()
        self.node: Node | None = None
        self._peers: set = set()
        self._known: dict = {}  # node id -> role_of its roles, members seen since ready
        self._cache: tuple[float, dict] | None = None
        self._queue: tuple[float, dict | None] | None = None
        self._counters: tuple[float, dict[str, float]] | None = None
        self.rates: dict[str, float] = {}
        self._pool_seen = None

    # ---------------------------------------------------------------- service
    def attach(self, node: Node) -> None:
        self.node = node
        node.console = self

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        node = self.node
        records = node.record_events()
        async with trio.open_nursery() as n:
            n.start_soon(self._watch_records, records)
            n.start_soon(self._announce_join)
            task_status.started()
            while True:
                try:
                    self._step(node.clock())
                except Exception as e:  # noqa: BLE001 - the console must not stop the node
                    log.debug("console sample failed: %r", e)
                await trio.sleep(self.tick)

    async def _announce_join(self) -> None:
        node = self.node
        await node.ready.wait()
        self._known = self._view_roles()
        if node.joined_via:
            node.events.add(
                "joined", f"joined the overlay via {node.joined_via} ({len(node.view)} records)"
            )

    async def _watch_records(self, records: trio.MemoryReceiveChannel) -> None:
        node = self.node
        async for rec in records:
            nid = rec.node_id
            if nid == node.node_id or not node.ready.is_set():
                continue
            known = self._known
            if rec.is_tombstone:
                if known.pop(nid, None) is not None:
                    node.events.add("leave", f"member {nid.short()} left", peer=nid.peer_id())
                continue
            role, before = role_of(rec.roles), known.get(nid)
            if before is None and len(known) >= 2 * node.config.max_members:
                self._known = known = self._view_roles()
            known[nid] = role
            if before is None:
                node.events.add(
                    "join",
                    f"new member {nid.short()} ({', '.join(rec.roles.names())})",
                    peer=nid.peer_id(),
                    role=role,
                )
            elif role == "exit" and before == "standby":
                node.events.add(
                    "promoted",
                    f"member {nid.short()} is an exit now",
                    peer=nid.peer_id(),
                    role=role,
                )
            elif role == "standby" and before == "exit":
                node.events.add(
                    "stepped-back",
                    f"member {nid.short()} is a standby again",
                    peer=nid.peer_id(),
                    role=role,
                )

    def _view_roles(self) -> dict:
        node = self.node
        return {
            nid: role_of(r.roles)
            for nid, r in node.view.snapshot(node.clock()).records.items()
            if not r.is_tombstone
        }

    def _step(self, now: float) -> None:
        node = self.node
        peers = set(node.peers)
        if node.ready.is_set() and peers != self._peers:
            snap = node.view.snapshot(now)
            for nid in peers - self._peers:
                rec = snap.get(nid)
                info = node.peers.get(nid)
                where = f" via {info.address}" if info and info.address else ""
                node.events.add(
                    "peer-up",
                    f"peer {nid.short()} connected{where}",
                    peer=nid.peer_id(),
                    role=role_of(rec.roles) if rec else "",
                )
            for nid in self._peers - peers:
                rec = snap.get(nid)
                node.events.add(
                    "peer-down",
                    f"peer {nid.short()} disconnected",
                    peer=nid.peer_id(),
                    role=role_of(rec.roles) if rec else "",
                )
        self._peers = peers
        self._copy_pool_events()
        if self.history.due(now):
            self.history.offer(now, self._gauges(now), self._read_rates(now))

    def _read_rates(self, now: float) -> dict[str, float]:
        """Read the counters; ``rates`` become per-second rates since the previous
        reading. Read only for a history sample or a snapshot (nobody watching: once
        per ``History.interval``), not every tick. Returns the counters read."""
        counters = self._read_counters()
        prev = self._counters
        if prev is not None and now > prev[0]:
            dt = now - prev[0]
            self.rates = {
                k: round(max(0.0, v - prev[1].get(k, v)) / dt, 1) for k, v in counters.items()
            }
        self._counters = (now, counters)
        return counters

    def _copy_pool_events(self) -> None:
        """The exit pool's decisions (deficit, restored, promote, step-back), with their times."""
        pool = self.node.resilience.pool
        if pool is None or not pool.events:
            return
        new = []
        for ev in reversed(pool.events):
            if ev is self._pool_seen:
                break
            new.append(ev)
        self._pool_seen = pool.events[-1]
        for ev in reversed(new):
            text = f"exit pool: {ev.kind}, live exits {ev.live} of {ev.target}"
            self.node.events.add(ev.kind, text + (f" ({ev.why})" if ev.why else ""), at=ev.at)

    # ---------------------------------------------------------------- readings
    def _read_counters(self) -> dict[str, float]:
        node = self.node
        m = node.metrics
        out = {
            "gossip": counter_total(m.gossip_bytes),
            "sync": counter_total(m.sync_bytes),
            "relay": 0.0,
            "relay_packets_in": 0.0,
            "relay_packets_out": 0.0,
            "liveness_frames": 0.0,
        }
        rm = getattr(getattr(node, "relay", None), "metrics", None)
        if rm is not None:
            out["relay"] = counter_total(rm.bytes_out)
            out["relay_packets_in"] = counter_total(rm.packets_in)
            out["relay_packets_out"] = counter_total(rm.packets_out)
        frames = getattr(node.resilience, "m_frames", None)
        if frames is not None:
            out["liveness_frames"] = counter_total(frames)
        return out

    def _pool(self, now: float) -> dict:
        """The exit pool as this node sees it: exits live / suspect / dead, standbys."""
        res = self.node.resilience
        if res.pool is None or res.liveness is None:
            return {}
        x = res.exits(now)
        exits = x["exits"]
        return {
            "target": x["target_live_exits"],
            "live": x["live_exits"],
            "mode": x["mode"],
            "suspect": sum(1 for e in exits if e["state"] == "suspect"),
            "dead": sum(1 for e in exits if e["state"] == "dead"),
            "standby": sum(1 for e in x["standby"] if e["state"] != "dead"),
            "members": [
                {
                    "peer_id": e["peer_id"],
                    "role": role,
                    "state": e["state"],
                    "since": e["since"],
                    "verified": e["verified"],
                    "promoted": role == "exit" and "standby-exit" in e["roles"],
                }
                for role, rows in (("exit", exits), ("standby", x["standby"]))
                for e in rows
            ],
        }

    def _gauges(self, now: float) -> dict:
        node = self.node
        snap = node.view.snapshot(now)
        pool = self._pool(now)
        return {
            "records": len(snap.records),
            "members": len(snap.live()),
            "peers": len(node.peers),
            "exits_live": pool.get("live"),
            "exits_target": pool.get("target"),
            "standby": pool.get("standby"),
        }

    def _delivery_queue(self, now: float) -> dict | None:
        relay = getattr(self.node, "relay", None)
        queue = getattr(relay, "exit_queue", None)
        if queue is None:
            return None
        if self._queue is None or now - self._queue[0] >= QUEUE_TTL:
            try:
                counts = queue.counts()
            except Exception as e:  # noqa: BLE001 - closed during shutdown
                log.debug("exit queue count failed: %r", e)
                counts = None
            self._queue = (now, counts)
        counts = self._queue[1]
        if counts is None:
            return None
        worker = getattr(relay, "worker", None)
        return dict(counts) | {"in_flight": worker.in_flight if worker is not None else 0}

    # ---------------------------------------------------------------- snapshots
    def snapshot(self, since: int = 0, history: bool = False) -> dict:
        """The facts the console shows, events after ``since`` (the newest
        ``EVENTS_IN_SNAPSHOT`` at most), or with ``history`` the whole history and
        every event held."""
        node = self.node
        now = node.clock()
        if self._cache is None or now - self._cache[0] >= SNAPSHOT_TTL or now < self._cache[0]:
            self._cache = (now, self._build(now))
        out = dict(self._cache[1])
        events = node.events
        limit = None if history else EVENTS_IN_SNAPSHOT
        out["events"] = [e.to_json() for e in events.since(since, limit=limit)]
        out["last_seq"] = events.last_seq
        if history:
            out["history"] = list(self.history.samples)
            out["history_interval"] = self.history.interval
            out["history_span"] = self.history.span
        return out

    def _build(self, now: float) -> dict:
        node = self.node
        st = node.status()
        feeds = st.get("feeds") or []
        addresses = dialable(
            list(st.get("listen", []))
            + [f["addr"] for f in feeds if f.get("state", "up") == "up" and f.get("announced", 1)],
            st["peer_id"],
        )
        snap = node.view.snapshot(now)
        peers = []
        for p in list(node.peers.values()):
            rec = snap.get(p.peer)
            peers.append(
                {
                    "peer_id": p.peer.peer_id(),
                    "address": p.address,
                    "connected_for": round(now - p.connected_at, 1),
                    "roles": rec.roles.names() if rec else [],
                }
            )
        counters = self._read_rates(now)
        rates = self.rates
        relay = st.get("relay") or {}
        return {
            "now": round(now, 3),
            "peer_id": st["peer_id"],
            "roles": st["roles"],
            "uptime": st["uptime"],
            "seq": st["seq"],
            "addresses": addresses,
            "joined_via": st.get("joined_via"),
            "counts": {
                "peers": st["peers"],
                "members": st["members"],
                "records": st["records"],
                "unverified": st["admission"]["unverified"],
            },
            "feeds": [
                {
                    k: f.get(k)
                    for k in (
                        "addr",
                        "network",
                        "kind",
                        "state",
                        "announced",
                        "conns",
                        "bytes_in",
                        "bytes_out",
                        "last_ok",
                    )
                }
                for f in feeds
            ],
            "peers": peers,
            "pool": self._pool(now),
            "relay": {
                "links": relay.get("links"),
                "clients": relay.get("clients"),
                "held": relay.get("held"),
                "packets_in": counters.get("relay_packets_in", 0),
                "packets_out": counters.get("relay_packets_out", 0),
                "bytes_out": counters.get("relay", 0),
                "packets_in_per_s": rates.get("relay_packets_in", 0.0),
                "packets_out_per_s": rates.get("relay_packets_out", 0.0),
                "bytes_out_per_s": rates.get("relay", 0.0),
            },
            "traffic": {k: rates.get(k, 0.0) for k in TRAFFIC},
            "liveness_frames_per_s": rates.get("liveness_frames", 0.0),
            "delivery_queue": self._delivery_queue(now),
        }
