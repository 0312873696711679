"""The relay service: moves onion packets between nodes, delivers at exits, serves light clients.

Attach one to a node (``Node(home, services=[RelayService()])``). It speaks
two stream protocols (frames in ``overlay.wire.relay``):

- ``/hydra/relay/1.0.0`` between nodes: one long-lived outbound stream per
  neighbour (opened on first use, reopened on failure, closed when idle),
  each frame one packet. Outbound packets wait in a bounded per-neighbour
  queue (full: dropped and counted) and are written in batches.
- ``/hydra/client/1.0.0`` for light clients: SUBMIT packets (this node is
  their first hop), REGISTER the surb ids whose replies should be pushed
  back as REPLY frames, DEAD hints about nodes this node believes dead.

Per packet: size class check, per-peer token bucket, ``process()`` with the
node's onion keys (the epochs still accepted) and a replay cache whose tags
are appended to ``HOME/replay/<epoch>.tags`` before the packet is acted on,
so a replay is refused even after a restart.

Onion keys rotate (``overlay.onion.epochs``): at each epoch boundary, or
early when the current epoch's replay cache is half full, the key prepared
ahead of time (``onion/<epoch>.next``) becomes current and the node
republishes its record; the previous key stays accepted for one more epoch,
then its key file, replay cache and tags file are erased together. Then:

- ``Forward``: queue it for the next hop, which must be a live member of the
  view (one that is not is looked up in the DHT within a small budget, else
  refused as ``unknown_next_hop``); at most ``max_links`` links, the least
  recently used idle one closed to make room (``link_limit`` when none is
  idle); dials through the hop's feeds run ``max_dials`` at a time; a
  ``delay_ms`` is honoured (held until due, bounded), for mixing later;
- ``Deliver`` (forward message) at an exit: decode the ``ExitMessage``, hand it
  to the ``DeliveryWorker`` (persisted, de-duplicating queue in
  ``HOME/exit-queue.db``, run with ``ack_when="delivered"``); the "queued"
  ack goes back through the message's queued SURB at once and the final ack
  (delivered / rejected) through its final SURB; a node that is not
  currently an exit answers ``rejected: not_exit`` instead;
- ``Deliver`` of a reply (end of a SURB path): push it to the client session
  that registered the surb id (buffered for a while if that client is
  reconnecting), else drop it.

Blame and penalties: only what the sending peer itself controls is
penalised (framing garbage, frames that are no packet size, unknown client
frames). MAC failures, unknown epochs, replays and undecodable exit messages
are made by the packet's *sender*, whom the hop cannot identify; they are
counted in ``hydra_relay_rejected_total{reason}`` but never penalise the
previous hop (or a malicious sender could get honest relays disconnected).
Bad input never raises out of a handler.

Light-client sessions: at most ``clients_per_peer`` per client identity and
``max_clients`` in all (a new one closes the session idle longest when all
slots are taken); a session silent for ``client_idle`` seconds, and any
stream stalled mid-frame for ``frame_timeout``, is closed (``idle_timeout``).

Invariants: every queue and table is bounded (links and their queues, held
packets, next-hop lookups and dials, client sessions and registrations,
buffered replies, exit intake, onion epochs and their replay tags);
all tasks live in the service's nursery or in the host's stream handlers,
and stop with the node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from prometheus_client import Counter, Gauge

from ..core.mixing import MAX_DELAY_MS, LoopMonitor, MixPool, draw_delays, next_poisson
from ..core.paths import NoPath, select_return_path
from ..core.scores import TokenBucket
from ..crypto import NodeId, OnionKey
from ..errors import DecodeError, LocalError, OverlayError, Reason, RemoteError
from ..exits import DeliveryEvent, DeliveryQueue, DeliveryWorker, RetryPolicy, build_dispatcher
from ..net.framing import FrameDecoder, encode_frame
from ..net.host import NetError, Stream, StreamOpenTimeout
from ..onion import epochs
from ..onion.params import LARGE, SMALL, PacketRejected, ReplayCacheFull
from ..onion.process import Deliver, Forward, process
from ..onion.replay import ReplayCache
from ..onion.surb import make_surb, use_surb
from ..records import Role
from ..storage.replay import ReplayStore
from ..wire import cover, delivery
from ..wire import relay as wire
from ..wire.delivery import Ack, AckStatus
from .notices import DeliveryNotices

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("hydra.relay")

DEAD_PUSH_INTERVAL = 0.25

RELAY_PROTOCOL = wire.RELAY_PROTOCOL
CLIENT_PROTOCOL = wire.CLIENT_PROTOCOL
_READ = 65536
_BATCH = 64


# ---- which client gets which reply -----------------------------------------------------


class ReplySink:
    """Something a reply can be pushed to (a client session). ``push`` must not block."""

    def push(self, surb_id: bytes, payload: bytes) -> bool:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass(slots=True)
class _Registration:
    owner: ReplySink | None
    expires_at: float
    buffered: bytes | None = None


class SurbRegistry:
    """surb id -> the session that waits for its reply. Plain class, no I/O.

    A registration lasts ``ttl`` seconds and is used once. When its session
    ends it stays (owner-less) until it expires, and a reply arriving then is
    buffered (at most ``max_buffered`` of them) until a new session registers
    the same id: a client that reconnects loses nothing. Knowing a surb id is
    what entitles a session to its reply (ids are 16 random bytes, and the
    payload is encrypted for the SURB's creator anyway).
    """

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        max_per_session: int = 4096,
        max_total: int = 65536,
        max_buffered: int = 256,
    ) -> None:
        self.ttl = ttl
        self.max_per_session = max_per_session
        self.max_total = max_total
        self.max_buffered = max_buffered
        self._regs: dict[bytes, _Registration] = {}
        self._owned: dict[ReplySink, dict[bytes, None]] = {}
        self._buffered = 0

    def __len__(self) -> int:
        return len(self._regs)

    def register(
        self, owner: ReplySink, surb_ids: Iterable[bytes], now: float
    ) -> list[tuple[bytes, bytes]]:
        """Register ids for ``owner``; returns buffered replies to push to it now."""
        owned = self._owned.setdefault(owner, {})
        ready = []
        for sid in surb_ids:
            reg = self._regs.get(sid)
            if reg is None:
                if len(self._regs) >= self.max_total:
                    self.expire(now)
                    if len(self._regs) >= self.max_total:
                        continue
                reg = self._regs[sid] = _Registration(owner, now + self.ttl)
            else:
                if reg.owner is not None and reg.owner is not owner:
                    self._owned.get(reg.owner, {}).pop(sid, None)
                reg.owner = owner
                reg.expires_at = now + self.ttl
            owned[sid] = None
            if len(owned) > self.max_per_session:  # drop the session's oldest
                old = next(iter(owned))
                del owned[old]
                self._drop(old)
            if reg.buffered is not None:
                ready.append((sid, reg.buffered))
                self._drop(sid)
                owned.pop(sid, None)
        return ready

    def route(self, surb_id: bytes, payload: bytes, now: float) -> ReplySink | None:
        """The live owner of ``surb_id`` (registration consumed), or None (buffered/unknown)."""
        reg = self._regs.get(surb_id)
        if reg is None or reg.expires_at <= now:
            if reg is not None:
                self._drop(surb_id)
            return None
        if reg.owner is not None:
            owner = reg.owner
            self._drop(surb_id)
            return owner
        if reg.buffered is None and self._buffered < self.max_buffered:
            reg.buffered = payload
            self._buffered += 1
        return None

    def knows(self, surb_id: bytes) -> bool:
        return surb_id in self._regs

    def detach(self, owner: ReplySink) -> None:
        for sid in self._owned.pop(owner, {}):
            reg = self._regs.get(sid)
            if reg is not None and reg.owner is owner:
                reg.owner = None

    def expire(self, now: float) -> int:
        gone = [sid for sid, r in self._regs.items() if r.expires_at <= now]
        for sid in gone:
            self._drop(sid)
        return len(gone)

    def _drop(self, sid: bytes) -> None:
        reg = self._regs.pop(sid, None)
        if reg is None:
            return
        if reg.buffered is not None:
            self._buffered -= 1
        if reg.owner is not None:
            self._owned.get(reg.owner, {}).pop(sid, None)


# ---- per-neighbour links and client sessions -----------------------------------------


class _NoRoute(LocalError):
    """A next hop that is neither in the view nor found in the DHT."""


@dataclass(eq=False)
class _Link:
    peer: NodeId
    send: trio.MemorySendChannel
    recv: trio.MemoryReceiveChannel
    failures: int = 0
    resolving: bool = False  # the next hop is not in the view: a DHT lookup first
    busy: bool = False  # opening a stream or writing: not idle
    stream: Stream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def idle(self) -> bool:
        return not self.busy and self.send.statistics().current_buffer_used == 0


@dataclass(eq=False)
class _Session(ReplySink):
    peer: NodeId
    send: trio.MemorySendChannel
    recv: trio.MemoryReceiveChannel
    dropped: int = 0
    last_dead: frozenset = field(default_factory=frozenset)
    last_active: float = 0.0  # trio time of the last complete frame from the client
    scope: trio.CancelScope | None = None

    def push(self, surb_id: bytes, payload: bytes) -> bool:
        try:
            self.send.send_nowait(wire.encode(wire.Reply(surb_id, payload)))
            return True
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped += 1
            return False


class _Metrics:
    def __init__(self, registry) -> None:
        r = registry
        self.packets_in = Counter(
            "hydra_relay_packets_in", "Packets received", ["source"], registry=r
        )
        self.packets_out = Counter(
            "hydra_relay_packets_out", "Packets written to neighbours", registry=r
        )
        self.bytes_out = Counter("hydra_relay_bytes_out", "Relay bytes written", registry=r)
        self.rejected = Counter(
            "hydra_relay_rejected",
            "Packets or frames rejected, by reason",
            ["source", "reason"],
            registry=r,
        )
        self.dropped = Counter(
            "hydra_relay_dropped", "Accepted packets dropped, by cause", ["why"], registry=r
        )
        self.forwarded = Counter("hydra_relay_forwarded", "Packets forwarded", registry=r)
        self.delivered = Counter(
            "hydra_relay_delivered", "Packets ending here", ["kind"], registry=r
        )
        self.reconnects = Counter(
            "hydra_relay_reconnects", "Wedged connections dropped and redialled", registry=r
        )
        self.links = Gauge("hydra_relay_links", "Open outbound relay links", registry=r)
        self.loops = Counter(
            "hydra_relay_loops",
            "This relay's own loop-cover packets, by fate (sent, returned, lost)",
            ["result"],
            registry=r,
        )
        self.cover_bytes = Counter(
            "hydra_relay_cover_bytes", "Bytes of loop cover this relay sent", registry=r
        )
        self.held = Gauge(
            "hydra_relay_held_packets", "Packets held by the mix for their delay", registry=r
        )
        self.sessions = Gauge("hydra_relay_client_sessions", "Light-client sessions", registry=r)
        self.acks = Counter("hydra_exit_acks", "Acks sent by this exit", ["status"], registry=r)
        self.closed = Counter(
            "hydra_relay_closed",
            "Relay links and client sessions closed by this node, by cause",
            ["what", "why"],
            registry=r,
        )
        self.lookups = Gauge(
            "hydra_relay_next_hop_lookups", "DHT lookups for unknown next hops running", registry=r
        )
        self.lookups_started = Counter(
            "hydra_relay_next_hop_lookups_started",
            "DHT lookups started for next hops missing from the view",
            registry=r,
        )
        self.dials = Counter("hydra_relay_dials", "Dials to next hops", registry=r)
        self.epoch = Gauge("hydra_onion_epoch", "Current onion key epoch", registry=r)
        self.epochs = Gauge("hydra_onion_epochs", "Onion key epochs accepted", registry=r)
        self.replay_tags = Gauge(
            "hydra_onion_replay_tags", "Replay tags held, all accepted epochs", registry=r
        )
        self.rotations = Counter(
            "hydra_onion_rotations", "Onion key switches, by cause", ["why"], registry=r
        )


# ---- the service ---------------------------------------------------------------------


class RelayService:
    """Relay, exit and entry duties of a node. See the module docstring."""

    def __init__(
        self,
        *,
        queue_size: int = 512,
        rate: float = 2000.0,
        burst: float = 4000.0,
        client_rate: float = 200.0,
        client_burst: float = 400.0,
        max_hold: float = 10.0,
        idle_timeout: float = 120.0,
        connect_timeout: float = 5.0,
        stream_timeout: float = 3.0,
        max_delay_ms: int = MAX_DELAY_MS,
        max_held: int | None = None,
        max_held_bytes: int = 64 << 20,
        max_clients: int | None = None,
        clients_per_peer: int | None = None,
        client_idle: float | None = None,
        client_evict_idle: float = 10.0,
        frame_timeout: float = 10.0,
        max_links: int | None = None,
        max_dials: int = 8,
        lookup_concurrency: int = 2,
        lookup_rate: float = 1.0,
        lookup_burst: float = 4.0,
        epoch_length: float | None = None,
        serve_clients: bool = True,
        exit_retry: RetryPolicy | None = None,
        exit_concurrency: int = 8,
        exit_intake: int = 1024,
        dead_nodes: Callable[[], Iterable[NodeId]] | None = None,
        key_refresh: float = 30.0,
        replay_max_per_epoch: int = 1 << 20,
        replay_max_epochs: int = 4,
        smtp_relay: str | None = None,
        maildir_root: str | None = None,
        mix_delay: float | None = None,
        loop_rate: float | None = None,
        loop_slack: float | None = None,
    ) -> None:
        """
        :param queue_size: packets waiting per neighbour before new ones are dropped.
        :param rate, burst: token bucket per neighbour (a 2 KiB packet costs 1
            token, a 32 KiB one 16).
        :param client_rate, client_burst: the same per light client.
        :param max_hold: a queued packet older than this is dropped, not sent.
        :param max_delay_ms: longest hold a routing block may ask for (longer ones are cut).
        :param max_held, max_held_bytes: bounds of the mix pool (held packets); beyond
            them an arriving packet that asks to be held is refused (``hold_full``).
        :param exit_retry: the exit queue's retry policy (default ``RetryPolicy()``).
        :param dead_nodes: returns the nodes this node believes dead, pushed to
            light clients as DEAD hints (default: the node's liveness view, if any).
        :param smtp_relay, maildir_root: override ``[exit]`` settings of the config.
        :param max_links: outbound neighbour links at once; a new one closes the least
            recently used idle link, or is refused (``link_limit``) when none is idle.
        :param max_dials: dials for next hops running at once.
        :param lookup_concurrency, lookup_rate, lookup_burst: DHT lookups for next hops
            missing from the membership view; beyond them such a packet is refused
            (``unknown_next_hop``).
        :param max_clients, clients_per_peer: light-client sessions in total and per
            client identity (``client_limit``). At the total, a new session closes
            the one idle longest if it has been idle ``client_evict_idle`` seconds.
        :param client_idle: a session that sends no complete frame for this long is
            closed (``idle_timeout``); ``frame_timeout``: the same for a frame begun
            and not finished, on client and relay streams.
        :param epoch_length: onion key epoch in seconds (see ``overlay.onion.epochs``).
        :param mix_delay, loop_rate: the overlay's mean hold per hop and this relay's
            loop-cover rate (``[onion] mix_delay``, ``[cover] relay_loop_rate``);
            ``loop_slack``: a loop not back this long after its delays is lost.
        Limits left as ``None`` come from the node's config (``[relay]``, ``[onion]``).
        """
        self.queue_size = queue_size
        self.rate, self.burst = rate, burst
        self.client_rate, self.client_burst = client_rate, client_burst
        self.max_hold = max_hold
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.stream_timeout = stream_timeout
        self.max_delay_ms = max_delay_ms
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.mix_delay = mix_delay
        self.loop_rate = loop_rate
        self.loops = LoopMonitor() if loop_slack is None else LoopMonitor(slack=loop_slack)
        self.max_clients = max_clients
        self.clients_per_peer = clients_per_peer
        self.client_idle = client_idle
        self.client_evict_idle = client_evict_idle
        self.frame_timeout = frame_timeout
        self.max_links = max_links
        self.max_dials = max_dials
        self.lookup_concurrency = lookup_concurrency
        self.lookup_bucket = TokenBucket(rate=lookup_rate, burst=lookup_burst)
        self.epoch_length = epoch_length
        self.serve_clients = serve_clients
        self.exit_retry = exit_retry
        self.exit_concurrency = exit_concurrency
        self.exit_intake = exit_intake
        self._dead_nodes = dead_nodes
        self.key_refresh = key_refresh
        self.smtp_relay = smtp_relay
        self.maildir_root = maildir_root
        self.node: NodeContext | None = None
        self.metrics: _Metrics | None = None
        self.replay = ReplayCache(max_per_epoch=replay_max_per_epoch, max_epochs=replay_max_epochs)
        self.replay_store: ReplayStore | None = None
        self.surbs = SurbRegistry()
        self.worker: DeliveryWorker | None = None
        self.notices: DeliveryNotices | None = None
        self._dead_cache: tuple[float, frozenset] | None = None
        # Fault injection for tests: the acks this exit sends are silently lost.
        self.fault_drop_acks = False
        self.exit_queue: DeliveryQueue | None = None
        self._keys: dict[int, OnionKey] = {}
        self._pending_tags: list[tuple[int, bytes]] = []
        self._in_children: dict[str, object] = {}
        self._links: dict[NodeId, _Link] = {}
        self._unreachable: dict[NodeId, float] = {}
        self._buckets: dict[tuple[NodeId, bool], TokenBucket] = {}
        self._rl_penalized: dict[NodeId, float] = {}
        self._sessions: set[_Session] = set()
        self._sessions_of: dict[NodeId, int] = {}
        self._dials = trio.Semaphore(max_dials)
        self._lookups = 0
        self._epoch = 0  # current onion key epoch
        self.mix = MixPool(max_packets=max_held or 4096, max_bytes=max_held_bytes)
        self._held_wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()
        self._closed = False
        self._exit_send, self._exit_recv = trio.open_memory_channel(exit_intake)
        self._loop_send, self._loop_recv = trio.open_memory_channel(queue_size)

    # ---- lifecycle ----------------------------------------------------------------

    def attach(self, node: NodeContext) -> None:
        self.node = node
        cfg = node.config
        if self.max_clients is None:
            self.max_clients = cfg.relay_max_clients
        if self.clients_per_peer is None:
            self.clients_per_peer = cfg.relay_clients_per_peer
        if self.client_idle is None:
            self.client_idle = cfg.relay_client_idle
        if self.max_links is None:
            self.max_links = cfg.relay_max_links
        if self.epoch_length is None:
            self.epoch_length = cfg.onion_epoch_length
        if self.max_held is None:
            self.max_held = self.mix.max_packets = cfg.relay_max_held
        if self.mix_delay is None:
            self.mix_delay = cfg.mix_delay
        if self.loop_rate is None:
            self.loop_rate = cfg.relay_loop_rate
        self.metrics = _Metrics(node.metrics.registry)
        node.host.set_stream_handler(RELAY_PROTOCOL, self._serve_relay)
        if self.serve_clients:
            node.host.set_stream_handler(CLIENT_PROTOCOL, self._serve_client)
        self.notices = DeliveryNotices(node, lambda: self.worker)
        if self.dead_nodes is None:
            self.dead_nodes = self._dead_from_liveness

    def _on_exit_event(self, ev: DeliveryEvent) -> None:
        if ev.kind == "delivered":
            self.notices.delivered(ev.message_id)

    def _dead_from_liveness(self) -> list[NodeId]:
        """Nodes the node's liveness view holds DEAD."""
        liveness = self.node.resilience.liveness
        return [n for n, state in liveness.states().items() if state == "dead"]

    @property
    def exit_capable(self) -> bool:
        cfg = self.node.config
        return bool(cfg.role_flags & (Role.EXIT | Role.STANDBY_EXIT)) and bool(cfg.exit_policy)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        node = self.node
        home = node.home
        self.replay_store = ReplayStore(home.path / "replay")
        try:
            self._load_keys()
            if self.exit_capable:
                cfg = node.config
                self.exit_queue = DeliveryQueue(
                    home.path / "exit-queue.db", retry=self.exit_retry, rng=node.rng
                )
                self.worker = DeliveryWorker(
                    self.exit_queue,
                    build_dispatcher(
                        cfg.exit_policy,
                        config=cfg,
                        smtp_relay=cfg.smtp_relay if self.smtp_relay is None else self.smtp_relay,
                        maildir_root=(
                            cfg.maildir_root if self.maildir_root is None else self.maildir_root
                        ),
                    ),
                    concurrency=self.exit_concurrency,
                    send_ack=self._worker_ack,
                    on_event=self._on_exit_event,
                    ack_when="delivered",
                    clock=node.clock,
                    check_delivered=self.notices.ask,
                    gate=node.caps.delivery_slot,  # [limits] exit_deliveries_per_minute
                )
            async with trio.open_nursery() as n:
                self._nursery = n
                await n.start(self.notices.run)
                if self.worker is not None:
                    await n.start(self.worker.run)
                n.start_soon(self._exit_loop)
                n.start_soon(self._loopback_loop)
                n.start_soon(self._held_loop)
                n.start_soon(self._loop_cover)
                n.start_soon(self._maintenance_loop)
                self._ready.set()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closed = True
            self._nursery = None
            self.replay_store.close()
            if self.exit_queue is not None:
                self.exit_queue.close()

    # ---- onion keys ----------------------------------------------------------------

    def _load_keys(self, now: float | None = None) -> str | None:
        """Bring keys, replay caches and tag files in line with the epoch plan.

        Order matters for crash safety: the new current key is written first; a
        retired epoch loses its private key before its tags (a key without its
        tags would re-admit replays after a restart); the tags of every epoch
        still accepted are loaded before any packet is processed with its key.
        Returns why the current key changed (None, "schedule" or "early").
        """
        home = self.node.home
        now = self.node.clock() if now is None else now
        held = home.onion_keys()
        why = None
        for _ in range(3):  # a reloaded full cache can change the plan once more
            p = epochs.plan(
                held,
                now,
                self.epoch_length,
                cache_sizes=self.replay.sizes(),
                max_per_epoch=self.replay.max_per_epoch,
                max_epochs=self.replay.max_epochs,
            )
            if p.rotated is not None:
                held[p.current] = home.activate_onion_key(p.current)
                why = why or p.rotated
            for epoch in p.drop:
                home.drop_onion_key(epoch)
                held.pop(epoch, None)
            for epoch in set(self.replay.epochs()) | set(self.replay_store.epochs()):
                if epoch not in p.keep:
                    self.replay.drop_epoch(epoch)
                    self.replay_store.drop_epoch(epoch)
            stable = True
            for epoch in p.keep:
                if epoch not in self.replay.epochs():
                    try:
                        self.replay.load(epoch, self.replay_store.tags(epoch))
                    except ReplayCacheFull:
                        stable = False  # full on disk: the next plan retires or rotates it
            if stable and p.rotated is None:
                break
        self._keys = {e: held[e] for e in p.keep}
        if p.current != self._epoch and why is not None:
            self.metrics.rotations.labels(why).inc()
            log.info("onion key epoch %d (%s)", p.current, why)
        self._epoch = p.current
        try:
            home.prepare_onion_key(p.next)
        except OSError as e:
            log.warning("cannot prepare the next onion key (%s); check HOME/onion is writable", e)
        self.metrics.epoch.set(self._epoch)
        self.metrics.epochs.set(len(self._keys))
        self.metrics.replay_tags.set(len(self.replay))
        return why

    @property
    def epoch(self) -> int:
        """The current onion key epoch (the one the node's record announces)."""
        return self._epoch

    def _next_key_check(self, now: float) -> float:
        """Seconds until the next key check: at most 1 s, or the next epoch boundary."""
        boundary = epochs.epoch_start(
            epochs.scheduled_epoch(now, self.epoch_length) + 1, self.epoch_length
        )
        return max(0.01, min(1.0, boundary - now + 0.001))

    async def _publish_rotated(self) -> None:
        try:
            await self.node.publish_own(f"onion key epoch {self._epoch}")
        except OverlayError as e:
            log.info("publishing the rotated onion key failed (retried later): %s", e)

    async def _maintenance_loop(self) -> None:
        next_reload = self.node.clock() + self.key_refresh
        next_sweep = 0.0
        while True:
            await trio.sleep(self._next_key_check(self.node.clock()))
            now = self.node.clock()
            if now >= next_sweep:
                next_sweep = now + 1.0
                self._sweep(now)
            sizes = self.replay.sizes()
            due = (
                epochs.scheduled_epoch(now, self.epoch_length) > self._epoch
                or sizes.get(self._epoch, 0) >= self.replay.max_per_epoch * epochs.ROTATE_AT
                or any(n >= self.replay.max_per_epoch for n in sizes.values())
                or any(epochs.key_retired(e, now, self.epoch_length) for e in self._keys)
            )
            if due or now >= next_reload:
                next_reload = now + self.key_refresh
                try:
                    why = self._load_keys(now)
                except OverlayError as e:
                    log.warning("onion key maintenance failed (%s); check HOME/onion", e)
                    continue
                if why is not None:
                    await self._publish_rotated()

    def _sweep(self, now: float) -> None:
        self.surbs.expire(now)
        for lost in self.loops.tick(now):
            self.metrics.loops.labels("lost").inc()
            log.info("loop cover lost through %s", ", ".join(n.short() for n in lost.relays))
        for d in (self._unreachable, self._rl_penalized):
            for k in [k for k, t in d.items() if t <= now]:
                del d[k]
        if len(self._buckets) > 4096:
            self._buckets.clear()
        self.metrics.replay_tags.set(len(self.replay))

    def status(self) -> dict:
        """Links, client sessions, held packets and onion epochs, for ``overlay status``."""
        return {
            "links": len(self._links),
            "max_links": self.max_links,
            "lookups": self._lookups,
            "clients": len(self._sessions),
            "max_clients": self.max_clients,
            "client_ids": len(self._sessions_of),
            "held": len(self.mix),
            "held_bytes": self.mix.held_bytes,
            "max_held": self.max_held,
            "hold_overflows": self.mix.overflows,
            "loops": {
                **self.loops.stats,
                "in_flight": len(self.loops),
                "rate": self.loop_rate,
                "cover_bytes_per_s": round((self.loop_rate or 0) * SMALL.packet_size),
                "suspects": {
                    n.short(): round(share, 2)
                    for n, share in sorted(
                        self.loops.suspects().items(), key=lambda kv: -self.loops.evidence[kv[0]]
                    )[:8]
                },
            },
            "epoch": self._epoch,
            "epochs": [
                {"epoch": e, "tags": self.replay.size(e)} for e in sorted(self._keys, reverse=True)
            ],
        }

    # ---- inbound ---------------------------------------------------------------------

    def _peer(self, remote_peer: str) -> NodeId | None:
        try:
            return NodeId.from_peer_id(remote_peer)
        except ValueError:
            return None

    async def _serve_relay(self, stream: Stream, remote_peer: str) -> None:
        peer = self._peer(remote_peer)
        if peer is None:
            return
        await self._ready.wait()
        decoder = FrameDecoder(wire.MAX_RELAY_FRAME)
        last_frame = trio.current_time()
        while not self._closed:
            # the sending side closes its link after idle_timeout: twice that is a stuck one
            try:
                chunk = await self._read(stream, decoder, last_frame + 2 * self.idle_timeout)
            except NetError:
                return
            if chunk is None:
                self._closed_for("relay_stream", Reason.IDLE_TIMEOUT)
                return
            if not chunk:
                if not decoder.at_boundary():
                    self._reject("relay", Reason.MALFORMED, peer, penalize=True)
                return
            try:
                frames = decoder.feed(chunk)
            except DecodeError as e:
                self._reject("relay", e.reason, peer, penalize=True)
                return
            if frames:
                last_frame = trio.current_time()
                self._handle_batch(frames, peer, "relay")

    async def _read(self, stream: Stream, decoder: FrameDecoder, deadline: float) -> bytes | None:
        """One chunk from ``stream`` (``b""`` at its end; ``NetError`` passes), or None
        when nothing came before ``deadline`` or, in the middle of a frame, for
        ``frame_timeout`` seconds (a stalled frame)."""
        if not decoder.at_boundary():
            deadline = min(deadline, trio.current_time() + self.frame_timeout)
        with trio.move_on_at(deadline):
            return await stream.read(_READ)
        return None

    def _closed_for(self, what: str, reason: Reason) -> None:
        self.metrics.closed.labels(what, reason.value).inc()

    def _bucket(self, peer: NodeId, source: str) -> TokenBucket:
        key = (peer, source == "client")
        b = self._buckets.get(key)
        if b is None:
            if source == "client":
                b = TokenBucket(rate=self.client_rate, burst=self.client_burst)
            else:
                b = TokenBucket(rate=self.rate, burst=self.burst)
            self._buckets[key] = b
        return b

    def _reject(self, source: str, reason, peer: NodeId | None, *, penalize: bool) -> None:
        label = reason.value if isinstance(reason, Reason) else str(reason)
        self.metrics.rejected.labels(source, label).inc()
        if penalize and peer is not None and isinstance(reason, Reason):
            self.node.penalize(peer, reason)

    def _replay_hook(self, epoch: int, tag: bytes) -> None:
        self.replay.check_and_add(epoch, tag)
        self._pending_tags.append((epoch, tag))

    def _handle_batch(self, frames: list[bytes], peer: NodeId | None, source: str) -> None:
        """Check, process and act on packets; tags are committed before any action."""
        if self._closed:
            return
        now = self.node.clock()
        bucket = self._bucket(peer, source) if peer is not None else None
        results = []
        self._pending_tags = []
        self._packets_in(source).inc(len(frames))
        for frame in frames:
            try:
                params = wire.check_packet(frame)
            except PacketRejected as e:
                self._reject(source, e.reason, peer, penalize=source != "local")
                continue
            if bucket is not None and not bucket.take(now, 1 if params is SMALL else 16):
                self._rate_limited(source, peer, now)
                continue
            if peer is not None and not self.node.caps.relay_allows(len(frame)):
                continue  # over [limits] bandwidth_rate: dropped, counted by the caps
            try:
                results.append(process(params, self._keys, frame, replay=self._replay_hook))
            except RemoteError as e:  # PacketRejected, Replay: the sender's doing
                self._reject(source, e.reason, peer, penalize=False)
            except ReplayCacheFull:
                self._reject(source, "replay_cache_full", peer, penalize=False)
                log.debug("replay cache of an old epoch full; it is retired at the next check")
        if self._pending_tags:
            try:
                self.replay_store.add(self._pending_tags)
            except LocalError as e:
                log.error(
                    "dropping %d packets: %s; check HOME/replay and disk space", len(results), e
                )
                self.metrics.dropped.labels("replay_store").inc(len(results))
                return
            finally:
                self._pending_tags = []
        for res in results:
            self._act(res, now, source)

    def _packets_in(self, source: str):
        child = self._in_children.get(source)
        if child is None:
            child = self._in_children[source] = self.metrics.packets_in.labels(source)
        return child

    def _rate_limited(self, source: str, peer: NodeId | None, now: float) -> None:
        self.metrics.rejected.labels(source, Reason.RATE_LIMITED.value).inc()
        if peer is not None and self._rl_penalized.get(peer, 0) <= now:
            self._rl_penalized[peer] = now + 1.0
            self.node.penalize(peer, Reason.RATE_LIMITED)

    def _act(self, res: Forward | Deliver, now: float, source: str = "local") -> None:
        if isinstance(res, Forward):
            self.metrics.forwarded.inc()
            self.forward(res.next_node, res.packet, res.delay_ms, now, source=source)
        elif res.delay_ms > 0:  # the last hop holds it too before delivering
            self._hold(None, res, res.delay_ms, len(res.payload))
        else:
            self._deliver(res, now)

    def _deliver(self, res: Deliver, now: float) -> None:
        if res.surb_id is not None:
            if self.loops.knows(res.surb_id):  # our own loop cover, back
                self.loops.returned(res.surb_id, now)
                self.metrics.loops.labels("returned").inc()
                return
            self.metrics.delivered.labels("reply").inc()
            owner = self.surbs.route(res.surb_id, res.payload, now)
            if owner is not None:
                owner.push(res.surb_id, res.payload)
            elif not self.surbs.knows(res.surb_id):
                self.metrics.dropped.labels("unknown_surb").inc()
        elif cover.is_cover(res.payload):
            self.metrics.delivered.labels("drop_cover").inc()
        else:
            self.metrics.delivered.labels("exit").inc()
            try:
                self._exit_send.send_nowait(res.payload)
            except trio.WouldBlock:
                self.metrics.dropped.labels("exit_intake_full").inc()

    # ---- outbound --------------------------------------------------------------------

    def forward(
        self,
        node_id: NodeId,
        packet: bytes,
        delay_ms: int = 0,
        now: float = 0.0,
        *,
        source: str = "local",
    ) -> None:
        """Queue ``packet`` for ``node_id`` (non-blocking; drops and counts when it cannot).

        The next hop must be a live member of the view; one that is not is
        looked up in the DHT within the lookup budget, else refused
        (``unknown_next_hop``, counted against ``source`` but nobody is
        penalised: the packet's sender chose the hop, not the previous one).
        """
        if self._nursery is None:
            self.metrics.dropped.labels("stopped").inc()
            return
        if node_id == self.node.node_id:
            if delay_ms <= 0:
                try:
                    self._loop_send.send_nowait(packet)
                except trio.WouldBlock:
                    self.metrics.dropped.labels("queue_full").inc()
                return
        elif node_id not in self._links and not self._known(node_id):
            if not self._lookup_allowed():
                self._reject(source, Reason.UNKNOWN_NEXT_HOP, None, penalize=False)
                return
        if delay_ms > 0:
            self._hold(node_id, packet, delay_ms, len(packet))
            return
        now = now or self.node.clock()
        if self._unreachable.get(node_id, 0) > now:
            self.metrics.dropped.labels("unreachable").inc()
            return
        link = self._links.pop(node_id, None)
        if link is not None:
            self._links[node_id] = link  # most recently used last
        else:
            resolving = not self._known(node_id)
            if resolving and not self._take_lookup(now):
                self._reject(source, Reason.UNKNOWN_NEXT_HOP, None, penalize=False)
                return
            if len(self._links) >= self.max_links and not self._evict_link():
                self._reject(source, Reason.LINK_LIMIT, None, penalize=False)
                self.metrics.dropped.labels(Reason.LINK_LIMIT.value).inc()
                return
            send, recv = trio.open_memory_channel(self.queue_size)
            link = self._links[node_id] = _Link(node_id, send, recv, resolving=resolving)
            if resolving:
                self._lookups += 1
                self.metrics.lookups.set(self._lookups)
                self.metrics.lookups_started.inc()
            self.metrics.links.set(len(self._links))
            self._nursery.start_soon(self._run_link, link)
        try:
            link.send.send_nowait((now, packet))
        except trio.WouldBlock:
            self.metrics.dropped.labels("queue_full").inc()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.metrics.dropped.labels("link_closed").inc()

    def _hold(self, node_id: NodeId | None, item, delay_ms: int, size: int) -> None:
        """Hold a packet for ``node_id`` (or, with None, a ``Deliver``) ``delay_ms``."""
        t = trio.current_time()
        delay = min(delay_ms, self.max_delay_ms) / 1000
        earliest = self.mix.next_due()
        if not self.mix.hold(t, delay, (node_id, item), size):
            self.metrics.dropped.labels("hold_full").inc()
            return
        self.metrics.held.set(len(self.mix))
        if earliest is None or t + delay < earliest:
            self._held_wakeup.set()  # the new earliest: wake the timer

    def _known(self, node_id: NodeId) -> bool:
        rec = self.node.view.get(node_id)
        return rec is not None and not rec.is_tombstone

    def _lookup_allowed(self) -> bool:
        return self._lookups < self.lookup_concurrency

    def _take_lookup(self, now: float) -> bool:
        return self._lookup_allowed() and self.lookup_bucket.take(now)

    def _evict_link(self) -> bool:
        """Close the least recently used idle link; False if every link is busy."""
        for peer, link in self._links.items():
            if link.idle():
                del self._links[peer]
                link.scope.cancel()
                self._closed_for("link", Reason.LINK_LIMIT)
                return True
        return False

    async def _open_link(self, link: _Link) -> Stream:
        """A relay stream to ``link.peer``, dialling it through its feeds if needed.

        A next hop missing from the view is looked up in the DHT (the link holds
        one of the few lookup slots meanwhile). Dials run at most
        ``max_dials`` at once. A stream that does not open within
        ``stream_timeout`` on an existing connection means a wedged connection
        (seen with py-libp2p when both sides dialled at once): drop the
        connection and dial afresh, once.
        """
        node = self.node
        peer = link.peer
        pid = peer.peer_id()
        with trio.fail_after(self.connect_timeout * 2 + self.stream_timeout * 2 + 10):
            for fresh in (False, True):
                if pid not in set(node.host.connected_peers()):
                    rec = node.view.get(peer)
                    if (rec is None or rec.is_tombstone) and link.resolving:
                        rec = await node.lookup(peer)
                    self._lookup_done(link)
                    if rec is None or rec.is_tombstone:
                        raise _NoRoute(f"no route to {peer.short()}")
                    async with self._dials:
                        self.metrics.dials.inc()
                        with trio.fail_after(self.connect_timeout):
                            if not await node.connect_record(rec):
                                raise LocalError(f"{peer.short()} unreachable through its feeds")
                self._lookup_done(link)
                try:
                    return await node.host.open_stream(
                        pid, RELAY_PROTOCOL, timeout=self.stream_timeout
                    )
                except StreamOpenTimeout:
                    if fresh:
                        raise
                    log.info("relay stream to %s hung; reconnecting", peer.short())
                    self.metrics.reconnects.inc()
                    await node.host.disconnect(pid)
        raise LocalError("unreachable")  # pragma: no cover

    def _lookup_done(self, link: _Link) -> None:
        if link.resolving:
            link.resolving = False
            self._lookups -= 1
            self.metrics.lookups.set(self._lookups)

    async def _run_link(self, link: _Link) -> None:
        try:
            with link.scope:
                await self._link_loop(link)
        finally:
            self._lookup_done(link)
            if self._links.get(link.peer) is link:
                del self._links[link.peer]
            link.send.close()
            link.recv.close()
            dropped = 0
            while True:
                try:
                    link.recv.receive_nowait()
                    dropped += 1
                except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                    break
            if dropped:
                self.metrics.dropped.labels("unreachable").inc(dropped)
            self.metrics.links.set(len(self._links))
            if link.stream is not None:
                with trio.move_on_after(1, shield=True):
                    await link.stream.close()
                link.stream = None

    async def _link_loop(self, link: _Link) -> None:
        while True:
            link.busy = False
            with trio.move_on_after(self.idle_timeout) as idle:
                try:
                    first = await link.recv.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
            if idle.cancelled_caught:
                self._closed_for("link", Reason.IDLE_TIMEOUT)
                return
            link.busy = True
            batch = [first]
            size = len(first[1])
            while len(batch) < _BATCH and size < 1 << 20:
                try:
                    item = link.recv.receive_nowait()
                except trio.WouldBlock:
                    break
                batch.append(item)
                size += len(item[1])
            now = self.node.clock()
            fresh = [p for t, p in batch if now - t <= self.max_hold]
            if len(fresh) < len(batch):
                self.metrics.dropped.labels("stale").inc(len(batch) - len(fresh))
            if not fresh:
                continue
            data = b"".join(encode_frame(p, wire.MAX_RELAY_FRAME) for p in fresh)
            sent = False
            for _ in range(2):  # a broken stream gets one fresh replacement
                if link.stream is None:
                    try:
                        t0 = trio.current_time()
                        link.stream = await self._open_link(link)
                        log.debug(
                            "relay link to %s open in %.3f s",
                            link.peer.short(),
                            trio.current_time() - t0,
                        )
                    except _NoRoute as e:  # not a member, not in the DHT: give up on it
                        log.debug("relay link to %s: %s", link.peer.short(), e)
                        self.metrics.dropped.labels("no_route").inc(len(fresh))
                        self._unreachable[link.peer] = self.node.clock() + 10.0
                        return
                    except Exception as e:  # noqa: BLE001 - dial/lookup/libp2p errors
                        log.debug("relay link to %s: %r", link.peer.short(), e)
                        break
                try:
                    await link.stream.write(data)
                    sent = True
                    break
                except NetError as e:
                    log.debug("relay write to %s failed: %r", link.peer.short(), e)
                    await link.stream.reset()
                    link.stream = None
            if sent:
                link.failures = 0
                self.metrics.packets_out.inc(len(fresh))
                self.metrics.bytes_out.inc(len(data))
                continue
            self.metrics.dropped.labels("unreachable").inc(len(fresh))
            link.failures += 1
            if link.failures >= 2:
                self._unreachable[link.peer] = self.node.clock() + 2.0
                return
            await trio.sleep(0.2)

    async def _loopback_loop(self) -> None:
        async for packet in self._loop_recv:
            self._handle_batch([packet], None, "local")
            await trio.sleep(0)

    async def _held_loop(self) -> None:
        """Release held packets when due: the trio side of ``MixPool`` (trio's clock)."""
        while True:
            self._held_wakeup = trio.Event()
            due = self.mix.next_due()
            if due is None:
                await self._held_wakeup.wait()
                continue
            if trio.current_time() < due:
                with trio.move_on_at(due):
                    await self._held_wakeup.wait()
                continue
            released = self.mix.due(trio.current_time())
            self.metrics.held.set(len(self.mix))
            for node_id, item in released:
                if node_id is None:
                    self._deliver(item, self.node.clock())
                else:
                    self.forward(node_id, item)
            await trio.sleep(0)

    async def _loop_cover(self) -> None:
        """Send loop-cover packets at Poisson rate ``loop_rate``: *relay, relay, this
        node*, each hop holding it as the overlay's senders do. A loop that does not
        come back is counted against the relays on it (``LoopMonitor``)."""
        rng = self.node.rng
        while self.loop_rate and self.loop_rate > 0:
            now = trio.current_time()
            await trio.sleep_until(next_poisson(rng, self.loop_rate, now))
            try:
                self.send_loop()
            except OverlayError as e:  # no path yet, a key the onion code refuses
                log.debug("loop cover: %s", e)

    def send_loop(self) -> bytes | None:
        """Send one loop-cover packet now; returns its loop id (None: no path)."""
        now = self.node.clock()
        live = [
            r
            for r in self.node.view.snapshot(now).live()
            if not epochs.record_key_retired(r.onion_epoch, r.issued_at, now, self.epoch_length)
        ]
        try:
            path = select_return_path(live, self.node.rng, last=self.node.node_id, hops=3)
        except NoPath:
            return None
        delays = draw_delays(self.node.rng, self.mix_delay or 0.0, len(path))
        surb, secret = make_surb(SMALL, path.sphinx_hops(), delays_ms=delays)
        first, packet = use_surb(SMALL, surb, cover.encode(cover.LOOP))
        relays = path.node_ids[:-1]
        if not self.loops.sent(secret.surb_id, relays, now, sum(delays) / 1000):
            return None
        self.metrics.loops.labels("sent").inc()
        self.metrics.cover_bytes.inc(len(packet))
        self.forward(first, packet)
        return secret.surb_id

    # ---- exit ------------------------------------------------------------------------

    async def _exit_loop(self) -> None:
        async for payload in self._exit_recv:
            try:
                await self._exit_deliver(payload)
            except Exception:  # noqa: BLE001 - one bad message must not stop the exit
                log.exception("exit: handling a delivered message failed")

    async def _exit_deliver(self, payload: bytes) -> None:
        try:
            msg = delivery.decode(payload)
        except DecodeError as e:
            self._reject("exit", f"bad_message_{e.reason.value}", None, penalize=False)
            return
        blocks = None
        if msg.reply_block:
            try:
                blocks = wire.decode_reply_blocks(msg.reply_block)
            except DecodeError:
                self._reject("exit", "bad_reply_block", None, penalize=False)
        if self.worker is None or Role.EXIT not in self.node.roles:
            self._reject("exit", "not_exit", None, penalize=False)
            if blocks is not None:
                await self._send_ack(
                    blocks.final, Ack.make(msg.message_id, AckStatus.REJECTED, "not_exit")
                )
            return
        try:
            ack = await self.worker.submit(msg)
        except LocalError as e:  # queue unavailable: no ack, the sender resends
            log.error("exit: cannot accept a message (%s); check HOME and disk space", e)
            return
        if ack.status is AckStatus.QUEUED and blocks is not None and blocks.queued:
            await self._send_ack(blocks.queued, ack)

    async def _worker_ack(self, reply_block: bytes, ack: Ack) -> None:
        try:
            blocks = wire.decode_reply_blocks(reply_block)
        except DecodeError:
            return
        await self._send_ack(blocks.final, ack)

    async def _send_ack(self, surb: bytes, ack: Ack) -> None:
        if self.fault_drop_acks:
            return
        params = LARGE if surb[:1] == bytes([LARGE.format]) else SMALL
        try:
            first, packet = use_surb(params, surb, ack.encode())
        except OverlayError as e:
            log.info("exit: unusable reply block: %s", e)
            return
        self.metrics.acks.labels(ack.status.name.lower()).inc()
        self.forward(first, packet)

    # ---- light clients ---------------------------------------------------------------

    async def _serve_client(self, stream: Stream, remote_peer: str) -> None:
        peer = self._peer(remote_peer)
        if peer is None:
            return
        await self._ready.wait()
        if self._sessions_of.get(peer, 0) >= self.clients_per_peer:
            self._reject("client", Reason.CLIENT_LIMIT, peer, penalize=False)
            return
        if len(self._sessions) >= self.max_clients and not self._evict_session():
            self._reject("client", Reason.CLIENT_LIMIT, peer, penalize=False)
            return
        send, recv = trio.open_memory_channel(256)
        session = _Session(peer, send, recv, last_active=trio.current_time())
        self._sessions.add(session)
        self._sessions_of[peer] = self._sessions_of.get(peer, 0) + 1
        self.metrics.sessions.set(len(self._sessions))
        try:
            async with trio.open_nursery() as n:
                session.scope = n.cancel_scope
                n.start_soon(self._client_writer, stream, session, n.cancel_scope)
                await self._client_reader(stream, session)
                n.cancel_scope.cancel()
        finally:
            self._sessions.discard(session)
            left = self._sessions_of.get(peer, 1) - 1
            if left > 0:
                self._sessions_of[peer] = left
            else:
                self._sessions_of.pop(peer, None)
            self.surbs.detach(session)
            send.close()
            self.metrics.sessions.set(len(self._sessions))

    def _evict_session(self) -> bool:
        """Close the session idle longest, if idle ``client_evict_idle`` s; else False."""
        now = trio.current_time()
        oldest = min(self._sessions, key=lambda x: x.last_active, default=None)
        if oldest is None or now - oldest.last_active < self.client_evict_idle:
            return False
        self._sessions.discard(oldest)  # its slot is free now; its task ends soon
        if oldest.scope is not None:
            oldest.scope.cancel()
        self._closed_for("client", Reason.CLIENT_LIMIT)
        return True

    async def _client_reader(self, stream: Stream, session: _Session) -> None:
        peer = session.peer
        decoder = FrameDecoder(wire.MAX_SIZE)
        while not self._closed:
            try:
                chunk = await self._read(stream, decoder, session.last_active + self.client_idle)
            except NetError:
                return
            if chunk is None:
                self._closed_for("client", Reason.IDLE_TIMEOUT)
                return
            if not chunk:
                return
            try:
                bodies = decoder.feed(chunk)
            except DecodeError as e:
                self._reject("client", e.reason, peer, penalize=True)
                return
            if bodies:
                session.last_active = trio.current_time()
            packets = []
            for body in bodies:
                try:
                    frame = wire.decode(body)
                except DecodeError as e:
                    self._reject("client", e.reason, peer, penalize=True)
                    return
                if isinstance(frame, wire.Submit):
                    packets.append(frame.packet)
                elif isinstance(frame, wire.Register):
                    for sid, payload in self.surbs.register(
                        session, frame.surb_ids, self.node.clock()
                    ):
                        session.push(sid, payload)
                else:
                    self._reject("client", Reason.MALFORMED, peer, penalize=True)
                    return
            if packets:
                self._handle_batch(packets, peer, "client")

    async def _client_writer(self, stream: Stream, session: _Session, scope) -> None:
        try:
            while True:
                frames = []
                # wake now and then to push a changed dead set (the client's failover hint)
                with trio.move_on_after(DEAD_PUSH_INTERVAL):
                    frames.append(await session.recv.receive())
                    while len(frames) < _BATCH:
                        try:
                            frames.append(session.recv.receive_nowait())
                        except trio.WouldBlock:
                            break
                dead = self._dead_set()
                if dead != session.last_dead:
                    session.last_dead = dead
                    nodes = sorted(dead, key=bytes)[: wire.MAX_DEAD]
                    frames.append(wire.encode(wire.Dead(tuple(nodes))))
                if frames:
                    await stream.write(b"".join(encode_frame(f, wire.MAX_SIZE) for f in frames))
        except (NetError, trio.EndOfChannel, trio.ClosedResourceError):
            scope.cancel()

    @property
    def dead_nodes(self) -> Callable[[], Iterable[NodeId]] | None:
        """The hook naming the nodes this node believes dead (see ``__init__``)."""
        return self._dead_nodes

    @dead_nodes.setter
    def dead_nodes(self, hook: Callable[[], Iterable[NodeId]] | None) -> None:
        self._dead_nodes = hook
        self._dead_cache = None  # the next push asks the new hook

    def _dead_set(self) -> frozenset:
        """The dead set, computed at most once per half push interval for all sessions
        (every session's writer asks every DEAD_PUSH_INTERVAL)."""
        now = trio.current_time()
        if self._dead_cache is not None and now - self._dead_cache[0] < DEAD_PUSH_INTERVAL / 2:
            return self._dead_cache[1]
        dead: frozenset = frozenset()
        if self._dead_nodes is not None:
            try:
                dead = frozenset(self._dead_nodes())
            except Exception:  # noqa: BLE001 - a broken hook must not break sessions
                log.exception("dead_nodes hook failed")
        self._dead_cache = (now, dead)
        return dead
