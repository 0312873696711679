"""Send messages through Hydra from anywhere: the Python API and the light client.

    async with Client(home_dir, via=["/ip4/198.51.100.7/tcp/4001/p2p/12D3KooW..."]) as c:
        mid = await c.send("smtp:alice@example.org", b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
        entry = await c.wait_acked(mid, timeout=30)      # entry.state: DELIVERED, ...

The client runs no node. It starts an ephemeral libp2p host (fresh key,
listening on loopback only), connects to a ``via`` peer (its *entry*), pulls
the whole membership from it with the anti-entropy frames, and keeps one
``/hydra/client/1.0.0`` stream open to it. For each attempt it picks a path
``entry, relay..., exit`` (``overlay.core.paths``) and two SURB return paths
ending at the entry, stores the SURB secrets, REGISTERs the surb ids and
SUBMITs the packet; the entry pushes the acks back as REPLY frames.

``home`` is a directory that holds ``outbox.db`` (a node home works, and so
does any empty directory). Messages are in the outbox (committed) before
``send`` returns, stay there until a final ack, and are resent by any later
``Client`` on the same directory: see ``overlay.core.outbox`` for the resend
policy and docs/user.md for what the acks mean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from .core.admission import Limits
from .core.antientropy import AntiEntropy
from .core.membership import MembershipView
from .core.mixing import DEFAULT_MIX_DELAY, LoopMonitor, draw_delays, next_poisson
from .core.outbox import (
    ELSEWHERE_OR_FAIL,
    Attempt,
    Entry,
    Finished,
    Outbox,
    Persist,
    State,
    reason_code,
)
from .core.paths import DEFAULT_HOPS, NoPath, select_path, select_return_path
from .core.paths import Path as HopPath
from .core.syncround import Initiator, Responder
from .crypto import NodeId, SigningKey
from .errors import DecodeError, LocalError, OverlayError, RemoteError
from .home import Home
from .net import framing
from .net.host import Libp2pHost, NetError, Stream
from .onion import epochs
from .onion.build import build_packet
from .onion.params import LARGE, SMALL, params_for_message
from .onion.surb import SurbSecret, make_surb, open_reply, use_surb
from .records import Role
from .runtime import SYNC_PROTOCOL
from .storage.outbox import KIND_FINAL, KIND_QUEUED, OutboxStore, StoredSurb
from .wire import cover, sync
from .wire import relay as wire
from .wire.delivery import MAX_EARLIER, ExitMessage, decode_ack

log = logging.getLogger("hydra.client")

MIN_SYNC_GAP = 0.2  # seconds between membership rounds with the entry, at the most often
SPARE_IDS = 32  # agent: surb ids registered at the entry ahead of use
ADOPT_INTERVAL = 0.5  # agent: seconds between looks at the outbox for messages others queued

LOOPBACK_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
_PLACEHOLDER_BLOCKS = wire.encode_reply_blocks(
    bytes([SMALL.format]) + bytes(wire.SURB_SIZE - 1),
    bytes([SMALL.format]) + bytes(wire.SURB_SIZE - 1),
)

__all__ = ["AckTimeout", "Client", "Entry", "State"]


def earlier_exits(e: Entry, exit_id: NodeId) -> tuple[bytes, ...]:
    """The exits other than ``exit_id`` this message was handed to (newest last):
    the next exit asks them before delivering, in case one still holds it."""
    seen = [x for x in dict.fromkeys((*e.exits_failed, e.exit)) if x not in (None, exit_id)]
    return tuple(bytes(x) for x in seen[-MAX_EARLIER:])


def _check_message(destination: str, body: bytes, mid: bytes) -> ExitMessage:
    """The message as an exit would get it (placeholder reply blocks); ``LocalError``
    for a bad destination or a body that does not fit a packet."""
    try:
        probe = ExitMessage.make(mid, destination, bytes(body), _PLACEHOLDER_BLOCKS)
    except DecodeError as e:
        raise LocalError(f"cannot send this message: {e}") from None
    params_for_message(len(probe.encode()))  # MessageTooLong (a LocalError) if too big
    return probe


def queue_message(store: OutboxStore, destination: str, body: bytes, now: float) -> bytes:
    """Put a new message in an outbox without sending it (a running agent on the same
    outbox adopts and sends it). Durable when this returns; returns its message id."""
    mid = os.urandom(16)
    probe = _check_message(destination, body, mid)
    for d in Outbox().add(mid, probe.destination, probe.body, now):
        if isinstance(d, Persist):
            store.save(d.entry, durable=True)
    return mid


class AckTimeout(LocalError):
    """``wait_acked`` ran out of time; ``entry`` is the message's state then (still kept)."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        super().__init__(f"no {'final ' if entry.state is State.QUEUED else ''}ack yet")


def _home_dir(home: str | Path | Home) -> Path:
    return home.path if isinstance(home, Home) else Path(home)


class Client:
    """A light client with a persisted outbox. Use as ``async with``."""

    def __init__(
        self,
        home: str | Path | Home,
        via: Sequence[str] = (),
        *,
        hops: int = DEFAULT_HOPS,
        timeout: float = 3.0,
        max_timeout: float = 30.0,
        same_exit_attempts: int = 3,
        queued_refresh: float = 10.0,
        rng: random.Random | None = None,
        clock=time.time,
        listen: Sequence[str] = LOOPBACK_LISTEN,
        connect_timeout: float = 10.0,
        sync_interval: float = 1.0,
        tick_interval: float = 0.1,
        epoch_length: float = epochs.EPOCH_LENGTH,
        mix_delay: float = DEFAULT_MIX_DELAY,
        cover_rate: float = 0.0,
        loop_rate: float = 0.0,
        loop_slack: float | None = None,
    ) -> None:
        """
        :param via: multiaddrs (ending in ``/p2p/<peer id>``) of entry nodes, tried in turn.
        :param hops: nodes per path, the entry and the exit included (2..5).
        :param timeout: first ack timeout; later ones grow by 1.5x up to ``max_timeout``.
        :param same_exit_attempts: unanswered attempts through one exit before another.
        :param epoch_length: the overlay's onion key epoch (``[onion] epoch_length``):
            hops whose record names a key already retired on that schedule are skipped.
        :param mix_delay: the overlay's mean hold time per forwarding hop (``[onion]
            mix_delay``); every packet and reply block gets fresh exponential draws.
        :param cover_rate: > 0 makes this client an *agent* (``overlay agent``): it sends
            at Poisson rate ``cover_rate`` per second, a queued attempt if there is one,
            else a drop-cover packet; it also adopts messages other processes put in
            its outbox (``overlay send`` while an agent runs).
        :param loop_rate: loop-cover packets per second (they come back through the
            entry); a loop not back ``loop_slack`` s after its delays counts against
            the nodes on it (``self.loops``).
        """
        if not via:
            raise LocalError("a light client needs at least one --via peer multiaddr")
        self.home = _home_dir(home)
        self.via = list(via)
        self.hops = hops
        self.rng = rng or random.SystemRandom()
        self.clock = clock
        self.listen = list(listen)
        self.connect_timeout = connect_timeout
        self.sync_interval = sync_interval
        self.tick_interval = tick_interval
        self.epoch_length = epoch_length
        self.mix_delay = mix_delay
        self.cover_rate = cover_rate
        self.loop_rate = loop_rate
        self.loops = LoopMonitor() if loop_slack is None else LoopMonitor(slack=loop_slack)
        self._loop_secrets: dict[bytes, SurbSecret] = {}
        self._sendq: dict[bytes, Attempt] = {}  # agent: attempts waiting for a send slot
        self._spare: dict[bytes, None] = {}  # agent: surb ids registered, not yet used
        #: seconds of holds chosen for each message's latest attempt, until the exit
        #: and until its final ack is back (the latency they add; newest 1024)
        self.holds: dict[bytes, tuple[float, float]] = {}
        self.outbox = Outbox(
            timeout=timeout,
            max_timeout=max_timeout,
            same_exit_attempts=same_exit_attempts,
            queued_refresh=queued_refresh,
        )
        # no admission (a client verifies nobody), but a bound: a hostile entry can
        # push records of fresh identities without end
        self.view = MembershipView(max_records=Limits().max_members)
        self.ae = AntiEntropy(self.view)
        self.store: OutboxStore | None = None
        self.host: Libp2pHost | None = None
        self.entry: NodeId | None = None
        self.entry_addr: str | None = None
        self.dead: frozenset[NodeId] = frozenset()
        self._stream: Stream | None = None
        self._write_lock = trio.Lock()
        self._changed = trio.Event()
        self._connected = trio.Event()
        self._synced = False
        self._wake = trio.Event()
        self._sync_soon = trio.Event()
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self.stats = {
            "attempts": 0,
            "replies": 0,
            "bad_replies": 0,
            "dead_pushes": 0,  # DEAD frames from the entry (each brings a sync)
            "send_failed": 0,
            "drop_cover": 0,
            "loop_cover": 0,
            "bytes_out": 0,
            "cover_bytes_out": 0,
        }
        self.started_at = 0.0
        # Fault injection for tests: ``fault_paths(entry, attempt, path, ret_final,
        # ret_queued)`` returns the paths an attempt uses instead (forces a route).
        self.fault_paths: Callable[..., tuple] | None = None

    # ---- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Client:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self.store = stack.enter_context(OutboxStore.in_home(self.home))
            self.outbox.load(self.store.load())
            self.store.purge(self.clock() - 7 * 86400)
            # a SURB's keys are accepted for at most two epochs after it was made
            self.store.drop_surbs_before(self.clock() - max(86400, 2 * self.epoch_length))
            self.host = Libp2pHost(
                SigningKey.generate(), self.listen, enable_dht=False, dial_timeout=5.0
            )
            # the entry node counts us as a peer and may start sync rounds with us
            self.host.set_stream_handler(SYNC_PROTOCOL, self._serve_sync)
            await stack.enter_async_context(self.host)
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(self._nursery.cancel_scope.cancel)
            self._nursery.start_soon(self._session_loop)
            with trio.move_on_after(self.connect_timeout):
                await self._connected.wait()
            if not self._connected.is_set():
                raise LocalError(f"could not reach any via peer: {', '.join(self.via)}")
            self._nursery.start_soon(self._tick_loop)
            self._nursery.start_soon(self._sync_loop)
            self.started_at = trio.current_time()
            if self.agent:
                self._nursery.start_soon(self._send_slots)
                self._nursery.start_soon(self._adopt_loop)
            if self.loop_rate > 0:
                self._nursery.start_soon(self._loop_slots)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(None, None, None)
        self._nursery = None
        return None

    # ---- public API -----------------------------------------------------------------

    async def send(
        self, destination: str, body: bytes, *, message_id: bytes | None = None
    ) -> bytes:
        """Put a message in the outbox and send its first attempt; returns its message id.

        Raises ``LocalError`` for a bad destination or a body that does not fit.
        """
        mid = message_id or os.urandom(16)
        probe = _check_message(destination, body, mid)
        await self._apply(self.outbox.add(mid, probe.destination, probe.body, self.clock()))
        return mid

    async def wait_acked(
        self, message_id: bytes, timeout: float | None = None, *, until: str = "delivered"
    ) -> Entry:
        """Wait until the message is finished (``until="delivered"``: delivered or failed)
        or at least held by an exit (``until="queued"``). Returns its ``Entry``; raises
        ``AckTimeout`` when ``timeout`` passes first.
        """
        if until not in ("queued", "delivered"):
            raise LocalError('until must be "queued" or "delivered"')
        deadline = trio.current_time() + (timeout if timeout is not None else float("inf"))
        while True:
            e = self.status(message_id)
            if e is None:
                raise LocalError(f"unknown message {message_id.hex()}")
            if e.state.finished or (until == "queued" and e.state is State.QUEUED):
                return e
            if trio.current_time() >= deadline:
                raise AckTimeout(e)
            with trio.move_on_at(deadline):
                await self._changed.wait()

    def status(self, message_id: bytes) -> Entry | None:
        e = self.outbox.get(message_id)
        if e is not None:
            return e.copy()
        return self.store.get(message_id) if self.store else None

    def pending(self) -> list[Entry]:
        return [e.copy() for e in self.outbox.unfinished()]

    def flush(self) -> None:
        """Send or resubmit every unfinished message now (``overlay outbox --flush``):
        a message queued at an exit is resubmitted to it, so a final ack is collected,
        and one whose exit has left the membership is resent elsewhere."""
        self.outbox.due_now(self.clock())
        self._wake.set()

    # ---- decisions ------------------------------------------------------------------

    async def _apply(self, decisions) -> None:
        changed = False
        for d in decisions:
            if isinstance(d, Persist):
                self.store.save(d.entry, durable=d.durable)
                changed = True
            elif isinstance(d, Finished):
                log.info("message %s %s (%s)", d.message_id.hex()[:8], d.state.name, d.reason)
                if d.state.finished:
                    self.outbox.entries.pop(d.message_id, None)
            elif isinstance(d, Attempt):
                await self._attempt(d)
        if changed:
            self._changed.set()
            self._changed = trio.Event()

    def _live(self) -> set[NodeId] | None:
        if not self._synced:
            return None
        snap = self.view.snapshot(self.clock())
        return {r.node_id for r in snap.live()} - set(self.dead)

    @property
    def agent(self) -> bool:
        return self.cover_rate > 0

    async def _attempt(self, a: Attempt) -> None:
        if self.agent:  # wait for the next send slot (dict: one per message)
            self._sendq.pop(a.message_id, None)
            self._sendq[a.message_id] = a
            return
        await self._attempt_now(a)

    async def _attempt_now(self, a: Attempt) -> None:
        e = self.outbox.get(a.message_id)
        if e is None:
            return
        now = self.clock()
        stream, entry = self._stream, self.entry
        if stream is None or entry is None:
            self.stats["send_failed"] += 1
            await self._apply(self.outbox.send_failed(a.message_id, "not connected", now))
            return
        try:
            path, ret_final, ret_queued = self._paths(e, a, entry, now)
            if self.fault_paths is not None:
                path, ret_final, ret_queued = self.fault_paths(e, a, path, ret_final, ret_queued)
        except NoPath as err:
            self.stats["send_failed"] += 1
            log.info("no path for %s: %s", e.message_id.hex()[:8], err)
            if reason_code(e.reason) in ELSEWHERE_OR_FAIL and self._synced:
                # an exit refused the destination and no other exit left allows it
                await self._apply(self.outbox.give_up(a.message_id, e.reason, now))
                return
            self._sync_soon.set()  # the entry may already know the exit we lack
            await self._apply(self.outbox.send_failed(a.message_id, f"no path: {err}", now))
            return
        exit_id = path.last.node_id
        if a.refresh and exit_id != a.exit_hint:
            return  # a queued message goes to the exit that holds it, or nowhere
        if reason_code(e.reason) in ELSEWHERE_OR_FAIL and exit_id in e.exits_failed:
            # every exit whose policy allows the destination has refused it
            await self._apply(self.outbox.give_up(a.message_id, e.reason, now))
            return
        d_fwd, d_f, d_q = (self._delays(len(p)) for p in (path, ret_final, ret_queued))
        id_f, id_q = self._take_id(), self._take_id()
        try:
            surb_f, sec_f = make_surb(SMALL, ret_final.sphinx_hops(), delays_ms=d_f, surb_id=id_f)
            surb_q, sec_q = make_surb(SMALL, ret_queued.sphinx_hops(), delays_ms=d_q, surb_id=id_q)
            msg = ExitMessage.make(
                e.message_id,
                e.destination,
                e.body,
                wire.encode_reply_blocks(surb_f, surb_q),
                earlier_exits(e, exit_id),
            )
            payload = msg.encode()
            params = params_for_message(len(payload))
            packet, _first = build_packet(params, path.sphinx_hops(), payload, delays_ms=d_fwd)
        except OverlayError as err:  # e.g. a record whose key the onion code refuses
            self.stats["send_failed"] += 1
            await self._apply(self.outbox.send_failed(a.message_id, f"build: {err}", now))
            return
        self.store.add_surbs(
            [
                StoredSurb(
                    sec_f.surb_id, e.message_id, KIND_FINAL, exit_id, entry, now, sec_f.to_bytes()
                ),
                StoredSurb(
                    sec_q.surb_id, e.message_id, KIND_QUEUED, exit_id, entry, now, sec_q.to_bytes()
                ),
            ]
        )
        need = [sec.surb_id for sec, pre in ((sec_f, id_f), (sec_q, id_q)) if pre is None]
        frames = [self._register(*need), wire.Submit(packet)]
        try:
            await self._write(stream, frames)
        except NetError as err:
            self.stats["send_failed"] += 1
            await self._drop_stream(stream)
            await self._apply(self.outbox.send_failed(a.message_id, f"entry: {err}", now))
            return
        self.stats["attempts"] += 1
        log.debug(
            "sent %s attempt %d via %s",
            e.message_id.hex()[:8],
            e.attempts + 1,
            [n.short() for n in path.node_ids],
        )
        held = (sum(d_fwd) + max(sum(d_f), sum(d_q))) / 1000
        self.holds.pop(e.message_id, None)
        self.holds[e.message_id] = (sum(d_fwd) / 1000, (sum(d_fwd) + sum(d_f)) / 1000)
        if len(self.holds) > 1024:
            del self.holds[next(iter(self.holds))]
        await self._apply(self.outbox.sent(e.message_id, path.node_ids, exit_id, now, held))

    # ---- cover traffic (agent) ---------------------------------------------------------

    def _take_id(self) -> bytes | None:
        """A surb id registered ahead of time (agent), else None (drawn fresh)."""
        if not self.agent or not self._spare:
            return None
        sid = next(iter(self._spare))
        del self._spare[sid]
        return sid

    def _register(self, *needed: bytes) -> wire.Register:
        """The REGISTER frame that goes with a packet (``needed``: its surb ids that
        were not registered ahead).

        A plain client registers the packet's own surb ids. An agent registers
        two ids with every packet whatever it carries (message, drop or loop),
        fresh ones while fewer than ``SPARE_IDS`` wait unused, else the oldest
        unused ones again; its packets use ids registered earlier. So the entry
        sees the same frames for every packet and cannot tell, from which ids
        get replies, which packet a reply belongs to.
        """
        if not self.agent:
            return wire.Register(tuple(needed))
        ids = list(needed)  # ids of this packet that were not registered ahead
        while len(ids) < 2:
            if len(self._spare) < SPARE_IDS:
                sid = os.urandom(16)
            else:
                sid = next(iter(self._spare))
                del self._spare[sid]
            self._spare[sid] = None
            ids.append(sid)
        return wire.Register(tuple(ids))

    def _live_records(self, now: float) -> list:
        return [
            r
            for r in self.view.snapshot(now).live()
            if r.node_id not in self.dead
            and not epochs.record_key_retired(r.onion_epoch, r.issued_at, now, self.epoch_length)
        ]

    async def _send_cover(self, kind: int) -> None:
        """One drop-cover packet (entry, relays, an exit: a message's shape) or one
        loop (entry, relays, back to the entry, which pushes it to us)."""
        stream, entry, now = self._stream, self.entry, self.clock()
        if stream is None or entry is None:
            return
        live = self._live_records(now)
        by_id = {r.node_id: r for r in live}
        if entry not in by_id:
            return
        try:
            if kind == cover.DROP:
                exits = [r for r in live if Role.EXIT in r.roles and r.node_id != entry]
                if not exits:
                    return
                ex = self.rng.choice(sorted(exits, key=lambda r: bytes(r.node_id)))
                tail = select_return_path(
                    live, self.rng, last=ex.node_id, hops=self.hops - 1, exclude={entry}
                )
            else:
                tail = select_return_path(live, self.rng, last=entry, hops=self.hops)
        except NoPath:
            return
        path = HopPath((by_id[entry], *tail.hops))
        delays = self._delays(len(path))
        if kind == cover.DROP:
            packet, _ = build_packet(
                SMALL, path.sphinx_hops(), cover.encode(kind), delays_ms=delays
            )
            frames = [self._register(), wire.Submit(packet)]
        else:
            pre = self._take_id()
            surb, secret = make_surb(SMALL, path.sphinx_hops(), delays_ms=delays, surb_id=pre)
            _, packet = use_surb(SMALL, surb, cover.encode(kind))
            if not self.loops.sent(secret.surb_id, path.node_ids[:-1], now, sum(delays) / 1000):
                return
            self._loop_secrets[secret.surb_id] = secret
            frames = [
                self._register(*([secret.surb_id] if pre is None else [])),
                wire.Submit(packet),
            ]
        try:
            n = await self._write(stream, frames)
        except NetError:
            await self._drop_stream(stream)
            return
        self.stats["cover_bytes_out"] += n
        self.stats["drop_cover" if kind == cover.DROP else "loop_cover"] += 1

    async def _send_slots(self) -> None:
        """The agent's Poisson send process: a waiting attempt, else drop cover."""
        while True:
            await trio.sleep_until(next_poisson(self.rng, self.cover_rate, trio.current_time()))
            if self._sendq:
                mid = next(iter(self._sendq))
                await self._attempt_now(self._sendq.pop(mid))
            else:
                await self._send_cover(cover.DROP)

    async def _loop_slots(self) -> None:
        while True:
            await trio.sleep_until(next_poisson(self.rng, self.loop_rate, trio.current_time()))
            await self._send_cover(cover.LOOP)

    async def _adopt_loop(self) -> None:
        """Take in messages another process (``overlay send``) put in our outbox."""
        while True:
            await trio.sleep(ADOPT_INTERVAL)
            new = [e for e in self.store.load() if e.message_id not in self.outbox.entries]
            if new:
                self.outbox.load(new)
                self._wake.set()

    def _on_loop(self, surb_id: bytes, payload: bytes) -> None:
        secret = self._loop_secrets.pop(surb_id, None)
        try:
            if secret is None or cover.decode(open_reply(SMALL, secret, payload)) != cover.LOOP:
                raise DecodeError(detail="not our loop")
        except (RemoteError, LocalError):
            self.stats["bad_replies"] += 1
            return
        self.loops.returned(surb_id, self.clock())

    def cover_status(self) -> dict:
        """What the agent sent and learned: rates, bytes per second, loop fates."""
        up = max(1e-9, trio.current_time() - self.started_at)
        return {
            "cover_rate": self.cover_rate,
            "loop_rate": self.loop_rate,
            "queued": len(self._sendq),
            "bytes_out_per_s": round(self.stats["bytes_out"] / up, 1),
            "cover_bytes_out_per_s": round(self.stats["cover_bytes_out"] / up, 1),
            **{k: self.stats[k] for k in ("attempts", "drop_cover", "loop_cover")},
            "loops": {**self.loops.stats, "in_flight": len(self.loops)},
            "suspects": {n.short(): round(v, 2) for n, v in self.loops.suspects().items()},
        }

    def _delays(self, hops: int) -> list[int]:
        """Hold times (ms) for every hop of a ``hops``-node path, the last one included."""
        if not self.mix_delay > 0:
            return [0] * (hops - 1)  # no mixing: the v1 blocks, delivered at once
        return draw_delays(self.rng, self.mix_delay, hops)

    def _paths(self, e: Entry, a: Attempt, entry: NodeId, now: float):
        """Forward path and two return paths (final, queued). Hook for tests."""
        live = [
            r
            for r in self.view.snapshot(now).live()
            if not epochs.record_key_retired(r.onion_epoch, r.issued_at, now, self.epoch_length)
        ]
        weights = {n: "dead" for n in self.dead}
        path = select_path(
            live,
            self.rng,
            destination=e.destination,
            hops=self.hops,
            entry=entry,
            exit_hint=a.exit_hint,
            avoid=a.avoid,
            weights=weights,
        )
        avoid = set(a.avoid) | {path.last.node_id}
        rets = [
            select_return_path(
                live, self.rng, last=entry, hops=self.hops, avoid=avoid, weights=weights
            )
            for _ in range(2)
        ]
        return path, rets[0], rets[1]

    # ---- the entry connection ---------------------------------------------------------

    async def _write(self, stream: Stream, frames: list) -> int:
        data = b"".join(framing.encode_frame(wire.encode(f), wire.MAX_SIZE) for f in frames)
        async with self._write_lock:
            await stream.write(data)
        self.stats["bytes_out"] += len(data)
        return len(data)

    async def _drop_stream(self, stream: Stream) -> None:
        if self._stream is stream:
            self._stream = None
        with contextlib.suppress(Exception):
            await stream.reset()

    async def _session_loop(self) -> None:
        i = 0
        while True:
            addr = self.via[i % len(self.via)]
            i += 1
            try:
                await self._session(addr)
            except (OverlayError, trio.TooSlowError, Exception) as e:  # noqa: BLE001
                log.info("entry %s: %r", addr, e)
            self._stream = None
            await trio.sleep(0.5 if i % len(self.via) else 1.0)

    async def _session(self, addr: str) -> None:
        with trio.fail_after(self.connect_timeout):
            pid = await self.host.connect(addr)
            entry = NodeId.from_peer_id(pid)
            await self._pull(entry)
            stream = await self.host.open_stream(pid, wire.CLIENT_PROTOCOL)
        try:
            self.entry, self.entry_addr = entry, addr
            ids = [s.surb_id for s in self.store.surbs_for_entry(entry)]
            if self.agent:  # a new session: ids registered at another entry are useless
                self._spare.clear()
                for _ in range(8):
                    self._spare[os.urandom(16)] = None
                ids += list(self._spare)
            for k in range(0, len(ids), wire.MAX_REGISTER):
                await self._write(stream, [wire.Register(tuple(ids[k : k + wire.MAX_REGISTER]))])
            self._stream = stream
            self._connected.set()
            self._wake.set()
            log.info("connected to entry %s (%d members)", entry.short(), len(self.view))
            reader = framing.FrameReader(stream, wire.MAX_SIZE)
            while True:
                body = await reader.read_frame()
                if body is None:
                    return
                frame = wire.decode(body)
                if isinstance(frame, wire.Reply):
                    await self._on_reply(frame.surb_id, frame.payload)
                elif isinstance(frame, wire.Dead):
                    self.stats["dead_pushes"] += 1
                    self.dead = frozenset(frame.nodes)
                    self._sync_soon.set()  # a death often comes with a replacement
                    self._wake.set()
        finally:
            await self._drop_stream(stream)

    async def _on_reply(self, surb_id: bytes, payload: bytes) -> None:
        self.stats["replies"] += 1
        if self.loops.knows(surb_id):
            self._on_loop(surb_id, payload)
            return
        s = self.store.surb(surb_id)
        if s is None:
            return
        try:
            secret = SurbSecret.from_bytes(s.secret)
            params = SMALL if secret.format == SMALL.format else LARGE
            ack = decode_ack(open_reply(params, secret, payload))
        except (RemoteError, LocalError) as e:
            self.stats["bad_replies"] += 1
            log.info("unusable reply for %s: %s", s.message_id.hex()[:8], e)
            return
        self.store.drop_surb(surb_id)
        if ack.message_id != s.message_id:
            self.stats["bad_replies"] += 1
            return
        log.info("ack %s for %s from %s", ack.status.name, s.message_id.hex()[:8], s.exit.short())
        await self._apply(
            self.outbox.on_ack(s.message_id, ack.status, ack.reason, s.exit, self.clock())
        )

    # ---- membership -----------------------------------------------------------------

    async def _pull(self, peer: NodeId) -> int:
        total = 0
        for _ in range(20):  # each round moves at most sync.MAX_WANT records
            n = await self._sync_round(peer)
            total += n
            if n == 0:
                break
        self._synced = True
        return total

    async def _sync_round(self, peer: NodeId) -> int:
        """One pull from ``peer`` (a light client pushes nothing)."""
        rnd = Initiator(self.ae, push=False)
        stream = await self.host.open_stream(peer.peer_id(), SYNC_PROTOCOL)
        try:
            await self._sync_send(stream, rnd.start())
            while not rnd.done:
                for out in rnd.receive(await self._sync_recv(stream)):
                    await self._sync_send(stream, out)
        finally:
            await stream.close()
        return self._offer(rnd.records)

    def _offer(self, records) -> int:
        accepted = 0
        now = self.clock()
        for raw in records:
            try:
                self.view.offer(raw, now)
                accepted += 1
            except RemoteError as e:
                log.debug("record from a peer rejected: %s", e)
        return accepted

    async def _sync_send(self, stream: Stream, frame) -> None:
        await stream.write(framing.encode_frame(sync.encode(frame), sync.MAX_SIZE))

    async def _sync_recv(self, stream: Stream, end_ok: bool = False):
        data = await framing.read_frame(stream, sync.MAX_SIZE)
        if data is None:
            if end_ok:
                return None
            raise DecodeError(detail="sync stream closed mid-round")
        return sync.decode(data)

    async def _serve_sync(self, stream: Stream, remote_peer: str) -> None:
        """Answer a sync round from our (validated) view, as a node would, and take
        what the node pushes."""
        rnd = Responder(self.ae)
        try:
            with trio.fail_after(5):
                while not rnd.done:
                    frame = await self._sync_recv(stream, end_ok=True)
                    for out in rnd.end() if frame is None else rnd.receive(frame):
                        await self._sync_send(stream, out)
            self._offer(rnd.pushed)
        except (OverlayError, trio.TooSlowError) as e:
            log.debug("serving sync to %s failed: %r", remote_peer[-8:], e)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def _sync_loop(self) -> None:
        while True:
            started = trio.current_time()
            with trio.move_on_after(self.sync_interval):
                await self._sync_soon.wait()
            self._sync_soon = trio.Event()
            # asked early (no path, a death): still at most one round per MIN_SYNC_GAP
            await trio.sleep_until(started + MIN_SYNC_GAP)
            self.view.expire(self.clock())
            if self.entry is not None and self._stream is not None:
                try:
                    with trio.fail_after(5):
                        if await self._sync_round(self.entry):
                            self.outbox.retry_waiting(self.clock())
                            self._wake.set()
                except (OverlayError, trio.TooSlowError, Exception) as e:  # noqa: BLE001
                    log.debug("membership refresh failed: %r", e)

    # ---- timers ---------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            with trio.move_on_after(self.tick_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self._apply(self.outbox.tick(self.clock(), self._live()))
            for lost in self.loops.tick(self.clock()):
                self._loop_secrets.pop(lost.loop_id, None)
                log.info("loop cover lost through %s", [n.short() for n in lost.relays])
