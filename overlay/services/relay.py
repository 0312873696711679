"""The relay service: moves onion packets between nodes, delivers at exits, serves light clients.

Attach one to a node (``Node(home, services=[RelayService()])``). It is the
I/O shell around ``overlay.core.relaycore.RelayCore``, which makes every
decision about a packet (buckets, size checks, Sphinx processing, replays,
mixing, the end of a path) and returns effects; this service reads streams,
feeds the core, carries out its effects, and keeps the files, links, sessions
and metrics. It speaks two stream protocols (frames in ``overlay.wire.relay``):

- ``/hydra/relay/1.0.0`` between nodes: one long-lived outbound stream per
  neighbour (``services.relay_links``), each frame one packet;
- ``/hydra/client/1.0.0`` for light clients (``services.relay_clients``):
  SUBMIT packets (this node is their first hop), REGISTER the surb ids whose
  replies should be pushed back as REPLY frames, DEAD hints.

Per batch of packets: the core checks and processes them with the node's
onion keys (the epochs still accepted) and its replay cache; the new replay
tags are appended to ``HOME/replay/<epoch>.tags`` before the core is asked to
act on the packets, so a replay is refused even after a restart (a batch
whose tags cannot be written is dropped, ``replay_store``).

Onion keys rotate (``overlay.onion.epochs``): at each epoch boundary, or
early when the current epoch's replay cache is half full, the key prepared
ahead of time (``onion/<epoch>.next``) becomes current and the node
republishes its record; the previous key stays accepted for one more epoch,
then its key file, replay cache and tags file are erased together.

The core's effects: ``ForwardPacket`` is queued on the link to the next hop
(a packet with a ``delay_ms`` is held by the core's mix pool first, released
by ``_held_loop`` at ``next_wakeup()``, on the node's clock); ``DeliverExit``
goes to the exit side (``services.relay_exit``); ``PushReply`` to the client
session that registered the surb id (buffered for a while if that client is
reconnecting); ``Reject`` and ``Count`` to the metrics (and penalties).

Blame and penalties: only what the sending peer itself controls is
penalised (framing garbage, frames that are no packet size, its own rate,
unknown client frames). MAC failures, unknown epochs, replays and
undecodable exit messages are made by the packet's *sender*, whom the hop
cannot identify; they are counted in ``hydra_relay_rejected_total{reason}``
but never penalise the previous hop (or a malicious sender could get honest
relays disconnected). Bad input never raises out of a handler.

Invariants: every queue and table is bounded (links and their queues, held
packets, next-hop lookups and dials, client sessions and registrations,
buffered replies, exit intake, onion epochs and their replay tags);
all tasks live in the service's nursery or in the host's stream handlers,
and stop with the node.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from ..core.mixing import MAX_DELAY_MS, LoopLost, LoopMonitor, MixPool, next_poisson, ramp_keeps
from ..core.relaycore import (
    DEFAULT_BURST,
    DEFAULT_CLIENT_BURST,
    DEFAULT_CLIENT_RATE,
    DEFAULT_MAX_HELD,
    DEFAULT_MAX_HELD_BYTES,
    DEFAULT_RATE,
    Count,
    DeliverExit,
    ForwardPacket,
    PushReply,
    Reject,
    RelayCore,
    RelayEffect,
)
from ..core.scores import TokenBucket
from ..core.surbs import ReplySink as ReplySink
from ..core.surbs import SurbRegistry as SurbRegistry
from ..crypto import NodeId, OnionKey
from ..errors import DecodeError, LocalError, OverlayError, Reason
from ..exits import RetryPolicy
from ..net.framing import FrameDecoder
from ..net.host import NetError, Stream
from ..onion import epochs
from ..onion.params import SMALL, ReplayCacheFull
from ..onion.process import Deliver, Forward
from ..onion.replay import ReplayCache
from ..storage.replay import ReplayStore
from ..wire import relay as wire
from .notices import DeliveryNotices
from .relay_clients import CLIENT_PROTOCOL, DEAD_PUSH_INTERVAL, ClientSessions
from .relay_exit import ExitSide
from .relay_links import RELAY_PROTOCOL, Links
from .relay_metrics import RelayMetrics

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("hydra.relay")

__all__ = [
    "CLIENT_PROTOCOL",
    "DEAD_PUSH_INTERVAL",
    "RELAY_PROTOCOL",
    "RelayService",
    "ReplySink",
    "SurbRegistry",
]

_READ = 65536
LOOP_RAMP = 300.0  # seconds over which a starting relay's own loop cover reaches its rate
# seconds between two sweeps (expired reply blocks, marks, lost loops: lookups check
# expiry themselves, the sweep frees memory) and key checks (the replay filter rotates
# at half full, far from what 5 s of traffic can fill); epoch boundaries come on time
MAINTAIN_EVERY = 5.0


class RelayService(Links, ClientSessions, ExitSide):
    """Relay, exit and entry duties of a node. See the module docstring."""

    def __init__(
        self,
        *,
        queue_size: int = 512,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        client_rate: float = DEFAULT_CLIENT_RATE,
        client_burst: float = DEFAULT_CLIENT_BURST,
        max_hold: float = 10.0,
        idle_timeout: float = 600.0,
        connect_timeout: float = 5.0,
        stream_timeout: float = 3.0,
        max_delay_ms: int = MAX_DELAY_MS,
        max_held: int | None = None,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
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
        loop_ramp: float = LOOP_RAMP,
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
            ``loop_slack``: a loop not back this long after its delays is lost;
            ``loop_ramp``: the loop rate grows from 0 to ``loop_rate`` over this
            many seconds after the relay starts.
        Limits left as ``None`` come from the node's config (``[relay]``, ``[onion]``).
        """
        self.queue_size = queue_size
        self.max_hold = max_hold
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.stream_timeout = stream_timeout
        self.max_held = max_held
        self.mix_delay = mix_delay
        self.loop_rate = loop_rate
        self.loop_ramp = loop_ramp
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
        self.key_refresh = key_refresh
        self.smtp_relay = smtp_relay
        self.maildir_root = maildir_root
        self.node: NodeContext | None = None
        self.metrics: RelayMetrics | None = None
        self.core = RelayCore(
            rate=rate,
            burst=burst,
            client_rate=client_rate,
            client_burst=client_burst,
            max_delay_ms=max_delay_ms,
            max_held=max_held or DEFAULT_MAX_HELD,
            max_held_bytes=max_held_bytes,
            replay=ReplayCache(max_per_epoch=replay_max_per_epoch, max_epochs=replay_max_epochs),
            loops=LoopMonitor() if loop_slack is None else LoopMonitor(slack=loop_slack),
        )
        self.replay_store: ReplayStore | None = None
        self.notices: DeliveryNotices | None = None
        # Fault injection for tests: the acks this exit sends are silently lost.
        self.fault_drop_acks = False
        self._in_children: dict[str, object] = {}
        self._epoch = 0  # current onion key epoch
        self._held_wakeup = trio.Event()
        self._held_until = math.inf  # when _held_loop wakes next
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()
        self._closed = False
        self._loop_send, self._loop_recv = trio.open_memory_channel(queue_size)
        self._init_links(max_dials)
        self._init_clients(dead_nodes)
        self._init_exit(exit_intake)

    # ---- the core's state, by the names the service has always had ------------------

    @property
    def mix(self) -> MixPool:
        """The mix pool of held packets (``(next hop or None, packet)`` items)."""
        return self.core.mix

    @property
    def surbs(self) -> SurbRegistry:
        return self.core.surbs

    @property
    def replay(self) -> ReplayCache:
        return self.core.replay

    @property
    def loops(self) -> LoopMonitor:
        return self.core.loops

    @property
    def _keys(self) -> dict[int, OnionKey]:
        return self.core.keys

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
            self.max_held = self.core.mix.max_packets = cfg.relay_max_held
        if self.mix_delay is None:
            self.mix_delay = cfg.mix_delay
        if self.loop_rate is None:
            self.loop_rate = cfg.relay_loop_rate
        self.metrics = RelayMetrics(node.metrics.registry)
        node.host.set_stream_handler(RELAY_PROTOCOL, self._serve_relay)
        if self.serve_clients:
            node.host.set_stream_handler(CLIENT_PROTOCOL, self._serve_client)
        self.notices = DeliveryNotices(node, lambda: self.worker)
        if self.dead_nodes is None:
            self.dead_nodes = self._dead_from_liveness

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        node = self.node
        self.replay_store = ReplayStore(node.home.path / "replay")
        try:
            self._load_keys()
            self._open_exit()
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
        self.core.keys = {e: held[e] for e in p.keep}
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
        """Seconds until the next key check and sweep: at most ``MAINTAIN_EVERY``,
        or the next epoch boundary."""
        boundary = epochs.epoch_start(
            epochs.scheduled_epoch(now, self.epoch_length) + 1, self.epoch_length
        )
        return max(0.01, min(MAINTAIN_EVERY, boundary - now + 0.001))

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
                next_sweep = now + MAINTAIN_EVERY
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
        self._apply(self.core.sweep(now), now)
        for k in [k for k, t in self._unreachable.items() if t <= now]:
            del self._unreachable[k]
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
            deadline = last_frame + 2 * self.idle_timeout
            frames = await self._frames(stream, decoder, deadline, "relay_stream", "relay", peer)
            if frames is None:
                return
            if frames:
                last_frame = trio.current_time()
                self._handle_batch(frames, peer, "relay")

    async def _frames(
        self,
        stream: Stream,
        decoder: FrameDecoder,
        deadline: float,
        what: str,
        source: str,
        peer: NodeId,
    ) -> list[bytes] | None:
        """The complete frames of the next chunk from ``stream``, or None when the
        stream is done: ended, failed, garbage (counted, the peer penalised), or
        silent until ``deadline`` or, in the middle of a frame, for
        ``frame_timeout`` seconds (a stalled frame; closed as ``idle_timeout``)."""
        if not decoder.at_boundary():
            deadline = min(deadline, trio.current_time() + self.frame_timeout)
        chunk = None
        with trio.move_on_at(deadline):
            try:
                chunk = await stream.read(_READ)
            except NetError:
                return None
        if chunk is None:
            self._closed_for(what, Reason.IDLE_TIMEOUT)
            return None
        try:
            if not chunk:  # the end; a relay's frame cut short is garbage (a light
                # client may lose its connection mid-frame)
                if source == "relay" and not decoder.at_boundary():
                    raise DecodeError(Reason.MALFORMED, "stream ended inside a frame")
                return None
            return decoder.feed(chunk)
        except DecodeError as e:
            self._reject(source, e.reason, peer, penalize=True)
            return None

    def _closed_for(self, what: str, reason: Reason) -> None:
        self.metrics.closed.labels(what, reason.value).inc()

    def _reject(self, source: str, reason, peer: NodeId | None, *, penalize: bool) -> None:
        label = reason.value if isinstance(reason, Reason) else str(reason)
        self.metrics.rejected.labels(source, label).inc()
        if penalize and peer is not None and isinstance(reason, Reason):
            self.node.penalize(peer, reason)

    def _handle_batch(self, frames: list[bytes], peer: NodeId | None, source: str) -> None:
        """Feed packets to the core; their replay tags are persisted before it acts on them."""
        if self._closed:
            return
        now = self.node.clock()
        self._packets_in(source).inc(len(frames))
        intake = self.core.receive(frames, peer, source, now, admit=self.node.caps.relay_allows)
        self._apply(intake.effects, now)
        if intake.tags:
            try:
                self.replay_store.add(intake.tags)
            except LocalError as e:
                n = len(intake.accepted)
                log.error("dropping %d packets: %s; check HOME/replay and disk space", n, e)
                self.metrics.dropped.labels("replay_store").inc(n)
                return
        for res in intake.accepted:
            self._act(res, now, source)

    def _act(self, res: Forward | Deliver, now: float, source: str = "local") -> None:
        """Carry out what the core decides for one processed packet."""
        self._apply(self.core.act((res,), now, source, self._routable), now)

    def _packets_in(self, source: str):
        child = self._in_children.get(source)
        if child is None:
            child = self._in_children[source] = self.metrics.packets_in.labels(source)
        return child

    def _apply(self, effects: list[RelayEffect], now: float = 0.0) -> None:
        """Carry out the core's effects, in order."""
        for e in effects:
            kind = type(e)
            if kind is ForwardPacket:
                self.forward(e.node, e.packet, 0, now, source=e.source)
            elif kind is Count:
                metric = getattr(self.metrics, e.what)
                (metric.labels(e.label) if e.label else metric).inc(e.n)
            elif kind is Reject:
                self._reject(e.source, e.reason, e.peer, penalize=e.penalize)
                if e.reason == "replay_cache_full":
                    log.debug("replay cache of an old epoch full; retired at the next key check")
            elif kind is PushReply:
                e.sink.push(e.surb_id, e.payload)
            elif kind is DeliverExit:
                self._to_exit(e.payload)
            elif kind is LoopLost:
                log.info("loop cover lost through %s", ", ".join(n.short() for n in e.relays))
        self._held_changed()

    # ---- the mix ---------------------------------------------------------------------

    def _hold(self, node_id: NodeId | None, item, delay_ms: int, size: int) -> None:
        """Hold a packet for ``node_id`` (or, with None, a ``Deliver``) ``delay_ms``."""
        self._apply(self.core.hold(node_id, item, delay_ms, size, self.node.clock()))

    def _held_changed(self) -> None:
        self.metrics.held.set(len(self.core.mix))
        due = self.core.next_wakeup()
        if due is not None and due < self._held_until:
            self._held_wakeup.set()  # a new earliest: wake the timer

    async def _held_loop(self) -> None:
        """Release held packets when the core says (``next_wakeup``, the node's clock)."""
        clock = self.node.clock
        while True:
            self._held_wakeup = trio.Event()
            due = self.core.next_wakeup()
            now = clock()
            if due is None or due > now:
                self._held_until = math.inf if due is None else due
                with trio.move_on_after(math.inf if due is None else due - now) as timer:
                    await self._held_wakeup.wait()
                if not timer.cancelled_caught:
                    continue  # woken: a new earliest packet
                now = max(clock(), due)  # the timer ran out: ``due`` has come
            self._held_until = math.inf
            self._apply(self.core.tick(now), now)
            await trio.sleep(0)

    async def _loopback_loop(self) -> None:
        async for packet in self._loop_recv:
            self._handle_batch([packet], None, "local")
            await trio.sleep(0)

    async def _loop_cover(self) -> None:
        """Send loop-cover packets at Poisson rate ``loop_rate``: *relay, relay, this
        node*, each hop holding it as the overlay's senders do. A loop that does not
        come back is counted against the relays on it (``LoopMonitor``).

        The rate grows linearly from 0 over the relay's first ``loop_ramp`` seconds
        (``ramp_keeps``): each loop goes through relays not yet connected to, so a
        starting overlay whose relays all began at full rate at once dialled every
        relay from every relay within its first minute."""
        rng = self.node.rng
        started = trio.current_time()
        while self.loop_rate and self.loop_rate > 0:
            now = trio.current_time()
            due = next_poisson(rng, self.loop_rate, now)
            await trio.sleep_until(due)
            if not ramp_keeps(rng, due - started, self.loop_ramp):
                continue
            try:
                self.send_loop()
            except OverlayError as e:  # no path yet, a key the onion code refuses
                log.debug("loop cover: %s", e)

    def send_loop(self) -> bytes | None:
        """Send one loop-cover packet now; returns its loop id (None: no path)."""
        node = self.node
        now = node.clock()
        records = node.view.snapshot(now).live()
        loop = self.core.loop_packet(
            records, node.node_id, node.rng, self.mix_delay or 0.0, self.epoch_length, now
        )
        if loop is None:
            return None
        self.metrics.loops.labels("sent").inc()
        self.metrics.cover_bytes.inc(len(loop.packet))
        self.forward(loop.first, loop.packet)
        return loop.loop_id
