"""Feed links at run time: health monitoring, relay reservations, dialing policy.

A node is reachable over several *feeds* (see ``overlay/core/feedhealth.py``):
its listen addresses on every interface and transport, and relay feeds
through other peers. ``FeedMonitor`` is a node service (``Node(services=
[FeedMonitor()])``) that keeps them honest:

- when the kernel announces an address or link change (rtnetlink, at most
  one reading per ``scan_interval``, 1 s), and every ``LOCAL_EVERY`` (60 s)
  anyway, it reads the machine's addresses and link states (``getifaddrs``
  and the interface flags, through psutil; a bind test where they cannot be
  read; without rtnetlink every ``scan_interval``), marks feeds
  whose address vanished or whose interface went down (or lost carrier) as
  DOWN, closes the connections that used them (so traffic moves to the other
  feeds at once instead of after TCP timeouts), and asks the node to
  re-publish its record (seq+1) when the set of working feeds changed;
- it keeps circuit-relay v2 reservations on ``relays`` (2) other nodes with
  role ``relay``, chosen for diverse networks, refreshes them (every
  ``refresh_interval``, 5 min, and before they expire), replaces lost
  ones, and announces ``<relay feed>/p2p/<relay>/p2p-circuit`` for each;
- every ``probe_interval`` (60 s) it asks two connected peers to dial each
  direct feed back (AutoNAT v1 with Hydra's dial-back policy): feeds that
  several peers cannot reach become UNREACHABLE and leave the record until a
  probe succeeds again; a round that found every feed as it was doubles the
  wait (up to ``probe_max_interval``, 15 min, AutoNAT's refresh of a
  confirmed status), a change of the direct feeds brings a round within
  ``PROBE_SOON`` and the wait back to ``probe_interval``;
- it attributes live connections to feeds (traffic from the kernel's TCP
  counters where they exist, connection counts otherwise) when ``overlay
  status`` asks, and every ``CONN_EVERY`` (30 s) for its Prometheus gauges;
  a relay's connection closing brings a scan at once (its relay feed goes
  down and the relay loop looks for another).

On attach it turns on the host's relay service (hop if the node has role
``relay``; accepting relayed connections always), DCUtR and the AutoNAT
server.

``dial_record`` is the dialing policy ``Node.connect_record`` uses: a
member's direct feeds in turn — the one that worked last time first, then
TCP, QUIC, WebSocket — starting the next attempt in parallel after
``DIAL_STAGGER`` (300 ms) or as soon as the previous one fails (happy
eyeballs); its relay feeds only once every direct attempt has failed, in the
same way (first, when one worked last time or every direct feed failed
recently). The first connection wins, the rest are cancelled, and the winning
feed is remembered.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import socket
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
import trio
from prometheus_client import Counter, Gauge

from ..core.feedhealth import (
    Backoff,
    ConnSample,
    FeedState,
    FeedTable,
    RelayCandidate,
    choose_relays,
    feed_ip,
    feed_transport,
    is_relay_feed,
    relay_feed,
    relay_of,
    usable_addresses,
)
from ..core.peering import feed_network
from ..crypto import NodeId
from ..errors import LocalError, OverlayError
from ..net.netwatch import AddressEvents
from ..records import Role, ValidRecord

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("hydra.feeds")

__all__ = [
    "DIAL_STAGGER",
    "DialMemory",
    "FeedMonitor",
    "dial_record",
    "feed_status",
    "local_addresses",
]

DIAL_STAGGER = 0.3
"""Seconds before the next feed is tried in parallel (happy eyeballs)."""
CONN_EVERY = 30.0
"""Seconds between two periodic scans where the kernel announces address changes
(the attribution of live connections to feeds for metrics; an announcement, a
relay's connection closing and a reservation made each bring a scan at once, and
``overlay status`` attributes the connections when it asks)."""
PROBE_SOON = 2.0
"""Seconds from a change of the direct feeds to the dial-back round it brings."""
RELAYS_HELD_CHECK = 20.0
"""Seconds between two looks at the reservations while every one we want is held."""
LOCAL_EVERY = 60.0
"""Seconds a reading of the machine's addresses stands while rtnetlink announces
no change (the periodic scans between use the last one)."""

_TRANSPORT_RANK = {"tcp": 0, "quic": 1, "ws": 2, "other": 3, "relay": 4}


# ---------------------------------------------------------------- local addresses

_local_lock = threading.Lock()
_local_cache: tuple[float, dict[str, bool] | None] = (-1e9, None)


def _read_interfaces() -> dict[str, bool] | None:
    """The machine's addresses and link states (``getifaddrs`` and interface
    flags, through psutil: no process spawned), or None if they cannot be read."""
    try:
        addrs = psutil.net_if_addrs()
        stats = psutil.net_if_stats()
    except (OSError, RuntimeError):
        return None
    return usable_addresses(
        {dev: [a.address for a in found if a.family in (socket.AF_INET, socket.AF_INET6)]
         for dev, found in addrs.items()},
        {dev: st.isup for dev, st in stats.items()},
    )  # fmt: skip


def local_addresses(max_age: float = 0.5) -> dict[str, bool] | None:
    """``{ip: usable}`` for this machine (network namespace), or None if unknown.

    Read at most once per ``max_age`` seconds per process (many nodes in one
    test process share it). Thread-safe; call it from a worker thread.
    """
    global _local_cache
    with _local_lock:
        at, value = _local_cache
        if time.monotonic() - at <= max_age:
            return value
        value = _read_interfaces()
        _local_cache = (time.monotonic(), value)
        return value


def _bind_test(ips: Sequence[str]) -> dict[str, bool]:
    """Fallback without ``ip``: an address is usable if a socket can bind to it."""
    out = {}
    for ip in ips:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((ip, 0))
            out[ip] = True
        except OSError:
            out[ip] = False
    return out


# ---------------------------------------------------------------- dialing policy


class DialMemory:
    """Which feed worked last per peer, and which failed recently (bounded LRU)."""

    def __init__(self, max_peers: int = 4096, fail_memory: float = 30.0) -> None:
        self.max_peers = max_peers
        self.fail_memory = fail_memory
        self._good: OrderedDict[str, str] = OrderedDict()
        self._failed: OrderedDict[tuple[str, str], float] = OrderedDict()

    def good(self, peer: str) -> str | None:
        return self._good.get(peer)

    def order(self, peer: str, feeds: Sequence[str], now: float) -> list[str]:
        good = self._good.get(peer)

        def key(item: tuple[int, str]) -> tuple[bool, bool, int, int]:
            i, f = item
            return (
                f != good,
                self.recently_failed(peer, f, now),
                _TRANSPORT_RANK[feed_transport(f)],
                i,
            )

        return [f for _, f in sorted(enumerate(dict.fromkeys(feeds)), key=key)]

    def recently_failed(self, peer: str, feed: str, now: float) -> bool:
        return now - self._failed.get((peer, feed), -1e18) < self.fail_memory

    def succeeded(self, peer: str, feed: str) -> None:
        self._good[peer] = feed
        self._good.move_to_end(peer)
        self._failed.pop((peer, feed), None)
        while len(self._good) > self.max_peers:
            self._good.popitem(last=False)

    def failed(self, peer: str, feed: str, now: float) -> None:
        self._failed[(peer, feed)] = now
        self._failed.move_to_end((peer, feed))
        if self._good.get(peer) == feed:
            del self._good[peer]
        while len(self._failed) > 4 * self.max_peers:
            self._failed.popitem(last=False)


_memories: weakref.WeakKeyDictionary[Any, DialMemory] = weakref.WeakKeyDictionary()


@dataclass(eq=False, slots=True)
class _Dial:
    done: trio.Event = field(default_factory=trio.Event)
    winner: str | None = None


# per node: the member each dial_record in flight is dialling
_inflight: weakref.WeakKeyDictionary[Any, dict[str, _Dial]] = weakref.WeakKeyDictionary()


def _memory_for(node: NodeContext) -> DialMemory:
    monitor = _monitor_of(node)
    if monitor is not None:
        return monitor.memory
    mem = _memories.get(node)
    if mem is None:
        mem = _memories[node] = DialMemory()
    return mem


def _monitor_of(node: NodeContext) -> FeedMonitor | None:
    for svc in node.services:
        if isinstance(svc, FeedMonitor):
            return svc
    return None


async def dial_record(
    node: NodeContext,
    rec: ValidRecord,
    *,
    stagger: float = DIAL_STAGGER,
    direct_only: bool = False,
    join: bool = True,
) -> str | None:
    """Connect to a member through its feeds (happy eyeballs); return the feed that worked.

    Already connected: returns the remembered feed (or the first one). Every
    failure is remembered for ``DialMemory.fail_memory`` seconds and moves
    that feed to the back next time. Only the feeds the node's dial budget
    permits (``NodeContext.permitted_feeds``) are dialled; ``None`` if there are none.
    A member already being dialled is not dialled twice: the second caller gets
    the first one's outcome (without ``join``, None at once). The dial runs in
    the node's nursery, so a caller that is cancelled leaves it to finish (each
    attempt ends at the dial timeout).
    """
    host = node.host
    peer = rec.node_id.peer_id()
    memory = _memory_for(node)
    feeds = [f for f in rec.feeds if not (direct_only and is_relay_feed(f))]
    feeds = [f for f in feeds if relay_of(f) not in (peer, node.node_id.peer_id())]
    order = memory.order(peer, feeds, time.monotonic())
    if not order:
        return None
    if peer in host.connected_peers():
        return memory.good(peer) or order[0]
    # One dial per member at a time, run by the node rather than by the caller: a
    # caller that gives up (its own deadline) does not cut a handshake short that
    # both ends have paid for, and the next caller waits for that dial's outcome
    # instead of starting another (the budget would hold the direct feeds back as
    # just dialled and leave it the relay feeds). Each attempt ends at the host's
    # dial timeout, so a dial left alone still ends.
    inflight = _inflight.setdefault(node, {})
    dial = inflight.get(peer)
    if dial is not None and not join:
        return None
    if dial is None:
        dial = inflight[peer] = _Dial()
        run = functools.partial(_dial_feeds, node, rec, peer, order, memory, stagger)
        node.spawn(_run_dial, run, dial, inflight, peer)
    await dial.done.wait()
    return dial.winner


async def _run_dial(
    run: Callable[[], Awaitable[str | None]], dial: _Dial, inflight: dict[str, _Dial], peer: str
) -> None:
    try:
        dial.winner = await run()
    except Exception:  # noqa: BLE001 - a dial must not stop the node
        log.exception("dialling %s failed", peer[-8:])
    finally:
        if inflight.get(peer) is dial:
            del inflight[peer]
        dial.done.set()


async def _dial_feeds(
    node: NodeContext,
    rec: ValidRecord,
    peer: str,
    order: list[str],
    memory: DialMemory,
    stagger: float,
) -> str | None:
    host = node.host
    # the node's dial budget decides which claimed addresses may be dialled now
    order = node.permitted_feeds(rec, order)
    if not order:
        return None
    report = node.dial_outcome
    winner: str | None = None

    async def attempt(feed: str, failed: trio.Event, nursery: trio.Nursery) -> None:
        nonlocal winner
        report(feed, "started")
        try:
            if is_relay_feed(feed):
                await _dial_relay_feed(node, feed, peer, stagger)
            else:
                await host.connect(f"{feed}/p2p/{peer}")
        except Exception as e:  # noqa: BLE001 - any failure: try the next feed
            memory.failed(peer, feed, time.monotonic())
            report(feed, "failed")
            log.debug("dial %s via %s failed: %s", rec.node_id.short(), feed, e)
            failed.set()
            return
        report(feed, "ok")
        if winner is None:
            winner = feed
            memory.succeeded(peer, feed)
            nursery.cancel_scope.cancel()

    # Direct feeds in parallel after a stagger (a silent address costs 300 ms);
    # relay feeds only once every direct attempt has failed: a circuit costs three
    # nodes a handshake, and on a busy machine a direct dial that is merely slow
    # would otherwise start one too. When a relay feed comes first (it worked last
    # time, or every direct feed failed recently) the order is kept as it is.
    if is_relay_feed(order[0]):
        groups = [order]
    else:
        groups = [
            [f for f in order if not is_relay_feed(f)],
            [f for f in order if is_relay_feed(f)],
        ]
    async with trio.open_nursery() as nursery:
        for group in groups:
            pending: list[trio.Event] = []
            for feed in group:
                failed = trio.Event()
                pending.append(failed)
                nursery.start_soon(attempt, feed, failed, nursery)
                with trio.move_on_after(stagger):
                    await failed.wait()
                if winner is not None:
                    break
            for failed in pending:
                await failed.wait()  # a win cancels this scope: no wait then
    return winner


async def _dial_relay_feed(node: NodeContext, feed: str, peer: str, stagger: float) -> None:
    host = node.host
    relay = relay_of(feed)
    if relay is None:
        raise LocalError(f"not a relay feed: {feed}")
    if relay not in host.connected_peers():
        # Reach the relay through its own (current) feeds first: the address
        # inside the relay feed may be one the relay has lost since.
        with contextlib.suppress(ValueError):
            relay_rec = node.view.get(NodeId.from_peer_id(relay))
            if relay_rec is not None and not relay_rec.is_tombstone:
                # not waiting for a dial of the relay already on its way: that
                # one may be waiting for this one (each through the other)
                await dial_record(node, relay_rec, stagger=stagger, direct_only=True, join=False)
    await host.connect(f"{feed}/p2p/{peer}")


# ---------------------------------------------------------------- the service


class FeedMonitor:
    """Node service: feed health, relay reservations, AutoNAT probes, feed traffic.

    See the module docstring. ``announced_feeds()`` is what ``Node.current_feeds``
    publishes; ``feed_status()`` what ``overlay status`` shows.
    """

    def __init__(
        self,
        *,
        scan_interval: float = 1.0,
        relays: int = 2,
        refresh_interval: float = 300.0,
        probe_interval: float = 60.0,
        probe_max_interval: float = 900.0,
        probe_peers: int = 2,
        probe_failures: int = 2,
        hop: bool | None = None,
        dcutr: bool = True,
        autonat: bool = True,
        local_addrs: Callable[[], Mapping[str, bool] | None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """
        :param relays: reservations to hold on other relay-role nodes (0: none).
        :param refresh_interval: re-reserve each relay this often (and whenever a
            reservation is due to expire within a minute, or its connection changed).
        :param probe_interval: seconds between AutoNAT dial-back rounds (0: never),
            doubling after each round that confirmed every feed's state up to
            ``probe_max_interval``; back to ``probe_interval`` (and a round soon)
            when the direct feeds change or a round changed anything.
        :param hop: relay circuits for others (default: if the node has role relay).
        :param local_addrs: replaces ``local_addresses`` (tests).
        """
        self.scan_interval = scan_interval
        self.relays = relays
        self.refresh_interval = refresh_interval
        self.probe_interval = probe_interval
        self.probe_max_interval = max(probe_interval, probe_max_interval)
        self.probe_peers = probe_peers
        self.hop = hop
        self.dcutr = dcutr
        self.autonat = autonat
        self._local_addrs = local_addrs
        self.rng = rng or random.Random()
        self.table = FeedTable(relay_slots=max(relays, 0), probe_failures=probe_failures)
        self.memory = DialMemory()
        self.backoff = Backoff(base=2.0, cap=60.0)
        self.node: NodeContext | None = None
        self._reserved_at: dict[str, float] = {}
        self._relay_conns: dict[str, set[int]] = {}  # connections a reservation was made on
        self._recent_ips: dict[str, dict[str, float]] = {}
        self._wake_relays = trio.Event()
        self._probe_soon = trio.Event()
        self._scan_soon = trio.Event()  # a relay's connection closed: scan now
        self._direct_seen: tuple[str, ...] = ()
        self._scan_lock = trio.Lock()
        self._last_local: tuple[float, dict[str, bool]] | None = None  # (when, reading)
        self._metrics: dict[str, Any] = {}
        self.reachability = "unknown"

    # ---- service protocol

    def attach(self, node: NodeContext) -> None:
        self.node = node
        host = node.host
        hop = self.hop if self.hop is not None else bool(node.roles & Role.RELAY)
        host.enable_relay(hop=hop)
        if self.dcutr:
            host.enable_dcutr()
        if self.autonat:
            host.enable_autonat(self._allow_dial)
        self._register_metrics(node)
        host.on_disconnect(self._on_disconnect)

    def _on_disconnect(self, peer_id: str, trimmed: bool) -> None:
        """A relay holding our reservation lost its last connection to us: the relay
        dropped the reservation with it, so forget it now (a dial back to the relay
        right after must not make it look held), scan (its relay feed goes down)
        and wake the relay loop to reserve again there or elsewhere."""
        if peer_id not in self._reserved_at or self.node.host.is_connected(peer_id):
            return
        self._drop_reservation(peer_id)
        self._scan_soon.set()
        self._wake_relays.set()

    def _drop_reservation(self, relay: str) -> None:
        self.node.host.forget_reservation(relay)
        self._reserved_at.pop(relay, None)
        self._relay_conns.pop(relay, None)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.scan()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._scan_loop)
            nursery.start_soon(self._watch_records)
            if self.relays > 0:
                nursery.start_soon(self._relay_loop)
            if self.autonat and self.probe_interval > 0:
                nursery.start_soon(self._probe_loop)
            task_status.started()

    # ---- what the node reads

    def announced_feeds(self) -> list[str]:
        return self.table.announced()

    def feeds_settling(self) -> bool:
        """Relay feeds are still to come: fewer are announced than ``relays`` while
        the view holds a relay member to reserve on (a node that just joined)."""
        node = self.node
        if node is None or self.relays <= 0:
            return False
        held = sum(1 for f in self.table.announced() if is_relay_feed(f))
        if held >= self.relays:
            return False
        snap = node.view.snapshot(node.clock())
        return any(r.node_id != node.node_id for r in snap.with_role(Role.RELAY))

    def feed_status(self) -> list[dict]:
        node = self.node
        if node is None:
            return self.table.status(time.time())
        now = node.clock()
        if node.host is not None:
            self._attribute_connections(node.host, now)  # as of now, not of the last scan
        return self.table.status(now)

    # ---- scanning

    async def _local(self, listen: Sequence[str], *, fresh: bool = False) -> dict[str, bool]:
        if self._local_addrs is not None:
            got = self._local_addrs()
        else:
            got = await trio.to_thread.run_sync(local_addresses, 0.0 if fresh else 0.5)
        if got is not None:
            return dict(got)
        ips = [ip for ip in (feed_ip(a) for a in listen) if ip and ip not in ("0.0.0.0", "::")]
        return await trio.to_thread.run_sync(_bind_test, [*ips, "127.0.0.1"])

    async def scan(
        self, *, connections: bool = True, fresh: bool = False, watched: bool = False
    ) -> None:
        """One health pass: local addresses, reservations, announcement, and (unless
        not ``connections``) the attribution of live connections to feeds.
        ``fresh``: read the addresses now, not from the per-process cache.
        ``watched``: rtnetlink announced no change since the last reading, so a
        reading younger than ``LOCAL_EVERY`` still stands (no read at all)."""
        node = self.node
        if node is None or node.host is None:
            return
        async with self._scan_lock:
            host = node.host
            listen = [a.split("/p2p/")[0] for a in host.listen_addrs()]
            last, at = self._last_local, trio.current_time()
            if watched and not fresh and last is not None and at - last[0] < LOCAL_EVERY:
                local = dict(last[1])
            else:
                local = await self._local(listen, fresh=fresh)
                self._last_local = (at, dict(local))
            now = node.clock()
            self.table.update_local(listen, local, now, announce=node.config.announce)
            self.table.update_relays(self._relay_feeds(now), now)
            events = self.table.take_events()
            closed: set[str] = set()
            for feed, old, new in events:
                log.info("feed %s: %s -> %s", feed, old, new)
                node.events.add("feed", f"feed {feed}: {old} -> {new}")
                self._metric("changes", lambda m, new=new: m.labels(new).inc())
                ip = feed_ip(feed)
                if new == "down" and ip and not is_relay_feed(feed) and not local.get(ip):
                    if ip not in closed:
                        closed.add(ip)
                        n = await host.close_connections_from(ip)
                        if n:
                            log.info("closed %d connection(s) over lost address %s", n, ip)
            if any(is_relay_feed(f) and new == "down" for f, _, new in events):
                self._wake_relays.set()
            direct = self._direct_feeds()
            if direct != self._direct_seen:
                self._direct_seen = direct
                self._probe_soon.set()  # a new or returning address: dial-back soon
            if connections:
                self._attribute_connections(host, now)
            self._update_reachability()
            self._update_metrics()
            own = node.own
            if own is not None and not own.is_tombstone:
                if sorted(self.table.announced()) != sorted(own.feeds):
                    node.request_republish()

    def _attribute_connections(self, host, now: float) -> None:
        samples = [
            ConnSample(
                c.key,
                c.transport,
                c.direction,
                c.local,
                c.relay_peer_id,
                c.bytes_in,
                c.bytes_out,
            )
            for c in host.connections()
        ]
        self.table.observe_connections(samples, now)
        self.table.forget_absent(600.0, now)

    async def _scan_loop(self) -> None:
        # Addresses and links: at once when the kernel announces a change (rtnetlink),
        # at most every scan_interval; every CONN_EVERY otherwise, or at once when a
        # relay's connection closed, with the per-connection attribution (metrics)
        # and the last reading of the addresses (read again once LOCAL_EVERY old).
        # Without rtnetlink (or with a test's local_addrs) addresses are polled
        # every scan_interval.
        events = AddressEvents.open() if self._local_addrs is None else None
        next_conns = trio.current_time() + CONN_EVERY
        try:
            while True:
                if events is None:
                    await trio.sleep(self.scan_interval)
                    changed = False
                else:
                    changed = await self._wait_change(events, next_conns - trio.current_time())
                now = trio.current_time()
                conns = now >= next_conns or self._scan_soon.is_set()
                self._scan_soon = trio.Event()
                if conns:
                    next_conns = now + CONN_EVERY
                try:
                    await self.scan(connections=conns, fresh=changed, watched=events is not None)
                except Exception:  # noqa: BLE001 - a monitoring bug must not stop the node
                    log.exception("feed scan failed")
                if changed:
                    self._metric("address_events", lambda m: m.inc())
                    # a burst of announcements (an interface going down takes
                    # several) costs one scan per scan_interval
                    await trio.sleep(self.scan_interval)
        finally:
            if events is not None:
                events.close()

    async def _wait_change(self, events: AddressEvents, timeout: float) -> bool:
        """Wait up to ``timeout`` for an address announcement (True) or a relay's
        connection closing (``_scan_soon``; False)."""
        changed = False
        with trio.move_on_after(max(timeout, 0.0)):
            async with trio.open_nursery() as nursery:

                async def announced() -> None:
                    nonlocal changed
                    changed = await events.wait(math.inf)
                    nursery.cancel_scope.cancel()

                async def soon() -> None:
                    await self._scan_soon.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(announced)
                nursery.start_soon(soon)
        return changed

    # ---- relay reservations

    def _relay_feeds(self, now: float) -> dict[str, float]:
        node = self.node
        host = node.host
        out: dict[str, float] = {}
        for relay, r in host.reservations().items():
            base = self._relay_base(relay, r.relay_addrs, now)
            if base is not None:
                out[relay_feed(base, relay)] = r.expires_at
        return out

    def _relay_base(self, relay: str, reported: Sequence[str], now: float) -> str | None:
        """The relay's address to put in our relay feed: one of its current direct feeds."""
        node = self.node
        rec = None
        with contextlib.suppress(ValueError):
            rec = node.view.get(NodeId.from_peer_id(relay))
        direct = [
            f for f in (rec.feeds if rec and not rec.is_tombstone else ()) if not is_relay_feed(f)
        ]
        if direct:
            remotes = {a.split("/p2p/")[0] for a in node.host.connection_addrs(relay)}
            for f in direct:
                if f in remotes:
                    return f
            tcp = [f for f in direct if feed_transport(f) == "tcp"]
            return (tcp or direct)[0]
        for a in reported:
            base = a.split("/p2p/")[0]
            if feed_ip(base) not in (None, "0.0.0.0", "::"):
                return base
        return None

    async def _relay_loop(self) -> None:
        await trio.sleep(0.2)
        while True:
            held = 0
            try:
                await self._relay_round()
                held = len(self.node.host.reservations())
            except Exception:  # noqa: BLE001 - keep trying; the node must not stop
                log.exception("relay maintenance failed")
            # looking for relays: every 2 s; all held: a lost one wakes us (the scan
            # sees its feed go down), else a look every RELAYS_HELD_CHECK s is
            # enough for refreshes due and reservations about to expire (a minute ahead)
            with trio.move_on_after(2.0 if held < self.relays else RELAYS_HELD_CHECK):
                await self._wake_relays.wait()
            self._wake_relays = trio.Event()

    async def _relay_round(self) -> None:
        node = self.node
        host = node.host
        now = node.clock()
        mono = time.monotonic()
        snap = node.view.snapshot(now)
        relay_recs = {
            r.node_id.peer_id(): r for r in snap.with_role(Role.RELAY) if r.node_id != node.node_id
        }
        held = host.reservations()
        changed = False
        for relay in [pid for pid in self._reserved_at if pid not in held]:
            # connection to the relay lost (or reservation expired): the relay
            # dropped it too; if we reconnect, it has to be made again
            self._drop_reservation(relay)
            changed = True
        for relay, r in held.items():
            if relay not in relay_recs:
                # no longer a relay member (withdrew, expired, dropped the role)
                self._drop_reservation(relay)
                changed = True
                continue
            due = mono - self._reserved_at.get(relay, -1e18) >= self.refresh_interval
            # a new connection to the relay (it may have restarted and lost our
            # reservation): reserve again now rather than at the next refresh
            reconnected = not (self._relay_conns.get(relay, set()) & self._conn_keys(relay))
            if due or reconnected or r.expires_at - time.time() < 60:
                if await self._reserve(relay):
                    changed = True
        held = host.reservations()
        if len(held) > self.relays:
            # e.g. a lost relay came back after we replaced it: keep the oldest
            extra = sorted(held, key=lambda pid: self._reserved_at.get(pid, 0.0))[self.relays :]
            for relay in extra:
                self._drop_reservation(relay)
            changed = True
        elif len(held) < self.relays:
            connected = set(host.connected_peers())
            own_networks = frozenset(
                feed_network(f) for f in self.table.announced() if not is_relay_feed(f)
            )
            candidates = [
                RelayCandidate(pid, _networks(rec), pid in connected)
                for pid, rec in relay_recs.items()
                if self.backoff.ready(pid, mono)
            ]
            held_nets = {pid: _networks(relay_recs[pid]) for pid in held if pid in relay_recs}
            chosen = choose_relays(
                candidates, held_nets, self.relays, self.rng, own_networks=own_networks
            )
            if chosen:
                results: list[bool] = []

                async def one(pid: str) -> None:
                    results.append(await self._connect_and_reserve(relay_recs[pid]))

                async with trio.open_nursery() as nursery:
                    for pid in chosen:
                        nursery.start_soon(one, pid)
                changed = changed or any(results)
        if changed:
            await self.scan()

    async def _connect_and_reserve(self, rec: ValidRecord) -> bool:
        node = self.node
        pid = rec.node_id.peer_id()
        if pid not in node.host.connected_peers():
            with trio.move_on_after(15):
                await node.connect_record(rec)
            if pid not in node.host.connected_peers():
                self.backoff.failed(pid, time.monotonic())
                return False
        return await self._reserve(pid)

    def _conn_keys(self, peer: str) -> set[int]:
        return self.node.host.connection_keys(peer)

    async def _reserve(self, relay: str) -> bool:
        host = self.node.host
        try:
            r = await host.reserve(relay)
        except (OverlayError, OSError) as e:
            wait = self.backoff.failed(relay, time.monotonic())
            host.forget_reservation(relay)
            self._reserved_at.pop(relay, None)
            log.info("relay reservation on %s failed (%s); retry in %.0f s", relay[-8:], e, wait)
            return False
        fresh = relay not in self._reserved_at
        self._reserved_at[relay] = time.monotonic()
        self._relay_conns[relay] = self._conn_keys(relay)
        self.backoff.ok(relay)
        if fresh:
            log.info("relay reservation on %s (%.0f s)", relay[-8:], r.expires_at - time.time())
        return True

    # ---- AutoNAT probes

    def _allow_dial(self, peer_id: str, addr: str) -> bool:
        """AutoNAT server policy: dial back only addresses on IPs the requester announced."""
        ip = feed_ip(addr)
        if ip is None:
            return False
        node = self.node
        if node is not None:
            with contextlib.suppress(ValueError):
                rec = node.view.get(NodeId.from_peer_id(peer_id))
                if rec is not None and any(feed_ip(f) == ip for f in rec.feeds):
                    return True
        seen = self._recent_ips.get(peer_id, {})
        return ip in seen and time.monotonic() - seen[ip] < 3600

    async def _watch_records(self) -> None:
        """Remember the feed IPs members announced lately (for ``_allow_dial``)."""
        recv = self.node.record_events(256)
        async with recv:
            async for rec in recv:
                if rec.is_tombstone:
                    self._recent_ips.pop(rec.node_id.peer_id(), None)
                    continue
                seen = self._recent_ips.setdefault(rec.node_id.peer_id(), {})
                for f in rec.feeds:
                    ip = feed_ip(f)
                    if ip is not None and not is_relay_feed(f):
                        seen[ip] = time.monotonic()
                if len(self._recent_ips) > 8192:
                    self._recent_ips.pop(next(iter(self._recent_ips)))

    def _direct_feeds(self) -> tuple[str, ...]:
        """The direct feeds a dial-back can test (present, not DOWN), in table order."""
        return tuple(
            r.addr
            for r in self.table.rows.values()
            if r.kind != "relay" and r.present and r.state is not FeedState.DOWN
        )

    def _probe_state(self) -> dict[str, tuple[FeedState, frozenset[str]]]:
        return {
            r.addr: (r.state, frozenset(r.failures))
            for r in self.table.rows.values()
            if r.kind != "relay"
        }

    async def _probe_loop(self) -> None:
        """Dial-back rounds: every ``probe_interval`` while anything is unsettled,
        backing off (doubling, up to ``probe_max_interval``, as AutoNAT's confirmed
        refresh does) after each round that found every feed as it was; each
        dial-back is a new connection at two peers, for every node, so a settled
        overlay must not pay for them every minute."""
        await trio.sleep(min(30.0, self.probe_interval) * (0.5 + self.rng.random()))
        interval = self.probe_interval
        while True:
            self._probe_soon = trio.Event()
            before = self._probe_state()
            verdicts = 0
            try:
                verdicts = await self.probe_round()
            except Exception:  # noqa: BLE001 - probes are advisory
                log.exception("feed probe round failed")
            confirmed = verdicts > 0 and self._probe_state() == before
            interval = (
                min(interval * 2, self.probe_max_interval) if confirmed else self.probe_interval
            )
            with trio.move_on_after(interval * (0.75 + 0.5 * self.rng.random())):
                await self._probe_soon.wait()
                interval = self.probe_interval
                await trio.sleep(PROBE_SOON)  # the address may still be settling

    async def probe_round(self) -> int:
        """Ask up to ``probe_peers`` connected peers to dial each direct feed back."""
        node = self.node
        host = node.host
        direct_peers = sorted({c.peer_id for c in host.connections() if c.transport != "relay"})
        if not direct_peers:
            return 0
        peers = self.rng.sample(direct_peers, min(self.probe_peers, len(direct_peers)))
        feeds = self._direct_feeds()
        me = node.node_id.peer_id()
        verdicts = 0

        async def ask(peer: str) -> None:
            nonlocal verdicts
            for feed in feeds:  # one at a time per peer: each dial-back is a new connection
                try:
                    res = await host.autonat_probe(peer, [f"{feed}/p2p/{me}"])
                except (OverlayError, OSError) as e:
                    log.debug("AutoNAT via %s unavailable: %s", peer[-8:], e)
                    return
                if res.status in ("ok", "dial_error"):
                    verdicts += 1
                    self.table.probe_result(feed, peer, res.status == "ok", node.clock())

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        await self.scan()
        return verdicts

    def _update_reachability(self) -> None:
        self.reachability = self.table.reachability()

    # ---- metrics

    def _register_metrics(self, node: NodeContext) -> None:
        registry = node.metrics.registry
        try:
            self._metrics = {
                "feeds": Gauge("hydra_feeds", "Feeds by state", ["state"], registry=registry),
                "announced": Gauge(
                    "hydra_feeds_announced", "Feeds in our record", registry=registry
                ),
                "bytes": Gauge(
                    "hydra_feed_bytes",
                    "Bytes over a feed (kernel TCP counters; TCP/WebSocket only)",
                    ["feed", "direction"],
                    registry=registry,
                ),
                "conns": Gauge(
                    "hydra_feed_connections",
                    "Live connections per feed",
                    ["feed"],
                    registry=registry,
                ),
                "changes": Counter(
                    "hydra_feed_state_changes", "Feed state changes", ["to"], registry=registry
                ),
                "address_events": Counter(
                    "hydra_address_changes",
                    "Address or link changes the kernel announced (each one re-reads the addresses)",
                    registry=registry,
                ),
                "held": Gauge(
                    "hydra_circuit_reservations_held",
                    "Relay reservations we hold on other nodes",
                    registry=registry,
                ),
                "hop_reservations": Gauge(
                    "hydra_circuit_hop_reservations",
                    "Reservations other nodes hold on us (relay role)",
                    registry=registry,
                ),
                "hop_circuits": Gauge(
                    "hydra_circuit_hop_circuits", "Circuits we relay now", registry=registry
                ),
                "public": Gauge(
                    "hydra_reachability",
                    "1 for our reachability verdict (public, private, unknown)",
                    ["verdict"],
                    registry=registry,
                ),
            }
        except ValueError:  # already registered (a second monitor on one node)
            self._metrics = {}

    def _metric(self, name: str, fn: Callable[[Any], Any]) -> None:
        m = self._metrics.get(name)
        if m is not None:
            fn(m)

    def _update_metrics(self) -> None:
        if not self._metrics:
            return
        host = self.node.host
        rows = self.table.rows.values()
        for state in FeedState:
            self._metrics["feeds"].labels(state.value).set(
                sum(1 for r in rows if r.present and r.state is state)
            )
        self._metrics["announced"].set(len(self.table.announced()))
        for r in rows:
            if r.bytes_in is not None:
                self._metrics["bytes"].labels(r.addr, "in").set(r.bytes_in)
                self._metrics["bytes"].labels(r.addr, "out").set(r.bytes_out or 0)
            self._metrics["conns"].labels(r.addr).set(r.conns)
        self._metrics["held"].set(len(host.reservations()))
        stats = host.relay_stats()
        self._metrics["hop_reservations"].set(stats["reservations"])
        self._metrics["hop_circuits"].set(stats["circuits"])
        for verdict in ("public", "private", "unknown"):
            self._metrics["public"].labels(verdict).set(1 if self.reachability == verdict else 0)


def _networks(rec: ValidRecord) -> frozenset[str]:
    return frozenset(feed_network(f) for f in rec.feeds if not is_relay_feed(f))


def feed_status(node: NodeContext) -> list[dict] | None:
    """The monitor's feed rows for ``node``, or None if it runs no ``FeedMonitor``."""
    monitor = _monitor_of(node)
    return None if monitor is None else monitor.feed_status()
