"""The relay's decisions, sans I/O: what to do with each packet a node receives.

``RelayCore`` is what ``services.relay.RelayService`` (the trio + libp2p
shell) and the simulator (``overlay.sim.anonymity``) both run. It owns:

- per-peer token buckets (relay neighbours and light clients apart), and the
  rule that a rate-limited peer is penalised at most once a second;
- the checks of a batch of frames, cheapest first: packet size class, the
  peer's bucket, the node's bandwidth cap (``admit``, the caller's), then
  Sphinx processing (``onion.process``) with the onion keys in ``keys`` and
  the replay cache ``replay``;
- the replay decision: a tag seen before is a ``Reject``; new tags are
  recorded and handed back (``Intake.tags``) for the caller to persist
  *before* it calls ``act`` on the accepted packets;
- the mix: packets held until their sender-chosen delay (cut at
  ``max_delay_ms``) in a ``MixPool`` bounded in packets and bytes, whose
  overflow rule is *refuse the arriving packet* (``Count("dropped",
  "hold_full")``); a packet is held only for a next hop the caller can route
  to (``routable``), so a flood of packets for unknown hops holds nothing;
  ``next_wakeup()`` says when ``tick(now)`` releases the next one;
- the end of a path: the relay's own loop cover coming back (``loops``), a
  reply pushed to the session that registered its surb id (``surbs``), drop
  cover discarded, a forward message handed to the exit;
- the relay's own loop-cover packets (``loop_packet``).

Inputs are values (frames, the sending peer, ``now``); outputs are effect
values, executed in order by the caller: ``ForwardPacket`` (send on now),
``DeliverExit``, ``PushReply``, ``Reject`` (count; penalise the peer if
``penalize``), ``Count`` (a metric: ``forwarded``, ``delivered{kind}``,
``dropped{why}``, ``loops{result}``) and ``LoopLost``. Held items are opaque:
``hold(to, item, ...)`` accepts anything, and ``tick`` hands back an onion
``Deliver`` held for ``to=None`` as delivery effects, anything else as
``ForwardPacket(to, item)``.

Blame: only what the sending peer itself controls (a frame of no packet
size, its own rate) may penalise it; MAC failures, unknown epochs, replays
are the packet's sender's doing, whom the hop cannot identify.

Invariants: no I/O, no clock (``now`` is a parameter), randomness only from
the ``rng`` passed in; every table is bounded (buckets ``max_buckets``,
penalty marks expire in ``sweep``, the mix pool, the SURB registry, the loop
monitor, the replay cache); any input bytes give effects, never an exception.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..crypto import NodeId, OnionKey
from ..errors import Reason, RemoteError
from ..onion import epochs
from ..onion.params import SMALL, PacketRejected, ReplayCacheFull
from ..onion.process import Deliver, Forward, process
from ..onion.replay import ReplayCache
from ..onion.surb import make_surb, use_surb
from ..records import ValidRecord
from ..wire import cover
from ..wire.relay import check_packet
from .mixing import MAX_DELAY_MS, LoopLost, LoopMonitor, MixPool, draw_delays
from .paths import NoPath, select_return_path
from .scores import TokenBucket
from .surbs import ReplySink, SurbRegistry

#: default bounds of the mix pool (``[relay] max_held`` and ``max_held_bytes``)
DEFAULT_MAX_HELD = 4096
DEFAULT_MAX_HELD_BYTES = 64 << 20
#: default token buckets per relay neighbour and per light client (packets/s, burst)
DEFAULT_RATE, DEFAULT_BURST = 2000.0, 4000.0
DEFAULT_CLIENT_RATE, DEFAULT_CLIENT_BURST = 200.0, 400.0
#: a large packet costs this many bucket tokens, a small one 1
LARGE_COST = 16

# ---- effects -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    """Send ``packet`` on to ``node`` now (``source``: whom a refusal is counted against)."""

    node: object  # a NodeId in a node; any hashable in the simulator
    packet: object
    source: str = "local"


@dataclass(frozen=True, slots=True)
class DeliverExit:
    """A forward message ends here: hand it to the exit."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PushReply:
    """A reply for a registered surb id: push it to its session."""

    sink: ReplySink
    surb_id: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class Reject:
    """Refused input, counted by ``source`` and ``reason``; penalise ``peer`` if ``penalize``."""

    source: str
    reason: Reason | str
    peer: NodeId | None
    penalize: bool


@dataclass(frozen=True, slots=True)
class Count:
    """Count ``n`` on the relay metric ``what`` (with its one label, if any)."""

    what: str
    label: str = ""
    n: int = 1


RelayEffect = ForwardPacket | DeliverExit | PushReply | Reject | Count | LoopLost


@dataclass(slots=True)
class Intake:
    """What ``receive`` made of a batch: refusals, tags to persist, packets to act on."""

    effects: list[RelayEffect] = field(default_factory=list)
    tags: list[tuple[int, bytes]] = field(default_factory=list)
    accepted: list[Forward | Deliver] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LoopPacket:
    """One loop-cover packet of this relay: send ``packet`` to ``first``."""

    loop_id: bytes
    first: NodeId
    packet: bytes


Routable = Callable[[object], bool]


def _always(_node: object) -> bool:
    return True


# ---- the core ------------------------------------------------------------------------


class RelayCore:
    """The relay's packet policy; see the module docstring."""

    def __init__(
        self,
        *,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        client_rate: float = DEFAULT_CLIENT_RATE,
        client_burst: float = DEFAULT_CLIENT_BURST,
        max_delay_ms: int = MAX_DELAY_MS,
        max_held: int = DEFAULT_MAX_HELD,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        max_buckets: int = 4096,
        replay: ReplayCache | None = None,
        surbs: SurbRegistry | None = None,
        loops: LoopMonitor | None = None,
    ) -> None:
        self.rate, self.burst = rate, burst
        self.client_rate, self.client_burst = client_rate, client_burst
        self.max_delay_ms = max_delay_ms
        self.max_buckets = max_buckets
        self.keys: dict[int, OnionKey] = {}  # the onion keys of every accepted epoch
        self.replay = ReplayCache() if replay is None else replay
        self.surbs = SurbRegistry() if surbs is None else surbs
        self.loops = LoopMonitor() if loops is None else loops
        self.mix: MixPool[tuple[object, object]] = MixPool(
            max_packets=max_held, max_bytes=max_held_bytes
        )
        self._buckets: dict[tuple[NodeId, bool], TokenBucket] = {}
        self._rl_penalized: dict[NodeId, float] = {}
        self._tags: list[tuple[int, bytes]] = []

    # ---- inbound -----------------------------------------------------------------

    def receive(
        self,
        frames: Iterable[bytes],
        peer: NodeId | None,
        source: str,
        now: float,
        *,
        admit: Callable[[int], bool] | None = None,
    ) -> Intake:
        """Check and process a batch of packets from ``peer`` (None: this node itself).

        ``admit(size)``, if given, is the node's bandwidth cap for a packet from
        a peer (False: dropped, counted by the caller's cap). The caller persists
        ``Intake.tags`` and then calls ``act(intake.accepted, ...)``.
        """
        out = Intake()
        bucket = self._bucket(peer, source) if peer is not None else None
        self._tags = out.tags
        for frame in frames:
            try:
                params = check_packet(frame)
            except PacketRejected as e:
                out.effects.append(Reject(source, e.reason, peer, source != "local"))
                continue
            if bucket is not None and not bucket.take(now, 1 if params is SMALL else LARGE_COST):
                out.effects.append(self._rate_limited(source, peer, now))
                continue
            if peer is not None and admit is not None and not admit(len(frame)):
                continue
            try:
                out.accepted.append(process(params, self.keys, frame, replay=self._replay_hook))
            except RemoteError as e:  # PacketRejected, Replay: the sender's doing
                out.effects.append(Reject(source, e.reason, peer, False))
            except ReplayCacheFull:  # an old epoch's cache: retired at the next key check
                out.effects.append(Reject(source, "replay_cache_full", peer, False))
        self._tags = []
        return out

    def _replay_hook(self, epoch: int, tag: bytes) -> None:
        self.replay.check_and_add(epoch, tag)
        self._tags.append((epoch, tag))

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

    def _rate_limited(self, source: str, peer: NodeId, now: float) -> Reject:
        penalize = self._rl_penalized.get(peer, 0) <= now
        if penalize:
            self._rl_penalized[peer] = now + 1.0
        return Reject(source, Reason.RATE_LIMITED, peer, penalize)

    def act(
        self,
        accepted: Sequence[Forward | Deliver],
        now: float,
        source: str = "local",
        routable: Routable = _always,
    ) -> list[RelayEffect]:
        """Effects of acting on processed packets (their tags are persisted)."""
        out: list[RelayEffect] = []
        for res in accepted:
            if isinstance(res, Forward):
                out.append(Count("forwarded"))
                out.extend(
                    self.forward(res.next_node, res.packet, res.delay_ms, now, source, routable)
                )
            elif res.delay_ms > 0:  # the last hop holds it too before delivering
                out.extend(self.hold(None, res, res.delay_ms, len(res.payload), now))
            else:
                out.extend(self.deliver(res, now))
        return out

    def forward(
        self,
        node: object,
        packet: object,
        delay_ms: int,
        now: float,
        source: str = "local",
        routable: Routable = _always,
    ) -> list[RelayEffect]:
        """Send ``packet`` on to ``node`` now, or hold it ``delay_ms`` first.

        A packet to hold for a hop the caller cannot route to (``routable``) is
        refused (``unknown_next_hop``, nobody penalised: the packet's sender
        chose the hop); one to send now is checked by the caller as it sends.
        """
        if delay_ms <= 0:
            return [ForwardPacket(node, packet, source)]
        if not routable(node):
            return [Reject(source, Reason.UNKNOWN_NEXT_HOP, None, False)]
        size = len(packet) if isinstance(packet, bytes | bytearray) else 0
        return self.hold(node, packet, delay_ms, size, now)

    def deliver(self, res: Deliver, now: float) -> list[RelayEffect]:
        """Effects of a packet whose path ends here."""
        sid = res.surb_id
        if sid is not None:
            if self.loops.knows(sid):  # our own loop cover, back
                self.loops.returned(sid, now)
                return [Count("loops", "returned")]
            out: list[RelayEffect] = [Count("delivered", "reply")]
            owner = self.surbs.route(sid, res.payload, now)
            if owner is not None:
                out.append(PushReply(owner, sid, res.payload))
            elif not self.surbs.knows(sid):
                out.append(Count("dropped", "unknown_surb"))
            return out
        if cover.is_cover(res.payload):
            return [Count("delivered", "drop_cover")]
        return [Count("delivered", "exit"), DeliverExit(res.payload)]

    # ---- the mix -----------------------------------------------------------------

    def hold(
        self, to: object, item: object, delay_ms: int, size: int, now: float
    ) -> list[RelayEffect]:
        """Hold ``item`` for ``to`` (None with an onion ``Deliver``: deliver here)
        ``delay_ms`` (cut at ``max_delay_ms``); refused when the pool is full."""
        delay = min(delay_ms, self.max_delay_ms) / 1000
        if not self.mix.hold(now, delay, (to, item), size):
            return [Count("dropped", "hold_full")]
        return []

    def next_wakeup(self) -> float | None:
        """When ``tick`` has something to release (None: nothing held)."""
        return self.mix.next_due()

    def tick(self, now: float) -> list[RelayEffect]:
        """Release every held item due at ``now``, earliest first."""
        out: list[RelayEffect] = []
        for to, item in self.mix.due(now):
            if to is None and isinstance(item, Deliver):
                out.extend(self.deliver(item, now))
            else:
                out.append(ForwardPacket(to, item))
        return out

    # ---- replies and upkeep ------------------------------------------------------

    def register(self, sink: ReplySink, surb_ids: Iterable[bytes], now: float) -> list[PushReply]:
        """``sink`` waits for replies to ``surb_ids``; replies buffered for them, to push now."""
        return [PushReply(sink, sid, p) for sid, p in self.surbs.register(sink, surb_ids, now)]

    def detach(self, sink: ReplySink) -> None:
        """``sink``'s session ended: its replies are buffered until another registers them."""
        self.surbs.detach(sink)

    def sweep(self, now: float) -> list[RelayEffect]:
        """Expire registrations and penalty marks, bound the buckets; lost loops."""
        self.surbs.expire(now)
        for k in [k for k, t in self._rl_penalized.items() if t <= now]:
            del self._rl_penalized[k]
        if len(self._buckets) > self.max_buckets:
            self._buckets.clear()
        lost: list[RelayEffect] = []
        for loop in self.loops.tick(now):
            lost += [Count("loops", "lost"), loop]
        return lost

    def loop_packet(
        self,
        records: Iterable[ValidRecord],
        me: NodeId,
        rng: random.Random,
        mix_delay: float,
        epoch_length: float,
        now: float,
    ) -> LoopPacket | None:
        """A loop-cover packet *relay, relay, me* over live ``records``, each hop
        holding it as senders ask (None: no path, or too many loops in flight)."""
        live = [
            r
            for r in records
            if not epochs.record_key_retired(r.onion_epoch, r.issued_at, now, epoch_length)
        ]
        try:
            path = select_return_path(live, rng, last=me, hops=3)
        except NoPath:
            return None
        delays = draw_delays(rng, mix_delay, len(path))
        surb, secret = make_surb(SMALL, path.sphinx_hops(), delays_ms=delays)
        first, packet = use_surb(SMALL, surb, cover.encode(cover.LOOP))
        if not self.loops.sent(secret.surb_id, path.node_ids[:-1], now, sum(delays) / 1000):
            return None
        return LoopPacket(secret.surb_id, first, packet)

    def status(self) -> dict:
        """The mix pool's state, for the shell's ``status()``."""
        return {
            "held": len(self.mix),
            "held_bytes": self.mix.held_bytes,
            "hold_overflows": self.mix.overflows,
        }
