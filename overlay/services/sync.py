"""Anti-entropy in a node: the driver of ``core.syncround`` over ``/hydra/sync/1.0.0``.

One round at a time, pulling from a connected peer when ``core.syncsched``
says (fast while rounds find differences, backing off while they do not).
Rounds with a peer reuse one stream: the initiator keeps it after a round
that went well (its push, empty or not, ends the round) and the responder
waits on it for the next ``Summary`` (``IDLE_TIMEOUT``), so a round costs no
stream negotiation; a kept stream the peer has closed meanwhile is replaced
by a new one within the same round.
every frame capped (``wire.sync``), every record through the node's single
``ingest`` path, bad input penalized. The responder serves each peer at most
a token bucket's worth of rounds. A peer that holds no record here is served
no exit this node has not verified (``core.membership.StrangerView``).

The node builds one ``AntiEntropySync`` and runs it in its nursery; the driver
sees the node through ``SyncNode`` (``NodeContext`` plus the record intake and
the table of connected peers) and imports nothing of the runtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ..core.antientropy import AntiEntropy
from ..core.membership import StrangerView
from ..core.scores import TokenBucket
from ..core.syncround import Initiator, Responder, RoundAborted
from ..core.syncsched import DIFFERED, FAILED, SAME, Due, SyncSchedule
from ..core.timing import SYNC_TIMEOUT
from ..crypto import NodeId
from ..errors import OverlayError, Reason, RemoteError
from ..net import framing
from ..wire import sync
from .context import NodeContext

log = logging.getLogger("hydra.node")

SYNC_PROTOCOL = "/hydra/sync/1.0.0"
# a kept sync stream with no round for this long is closed: rounds with one peer
# come minutes apart in a settled overlay (30 s rounds spread over the peers),
# and a stream opened again costs both ends a negotiation
IDLE_TIMEOUT = 600.0


def _round_bucket() -> TokenBucket:
    """The rounds one peer may make us answer: 2/s, burst 6."""
    return TokenBucket(rate=2.0, burst=6.0)


@dataclass
class PeerInfo:
    peer: NodeId
    connected_at: float
    address: str = ""
    sync_ok: int = 0
    sync_failed: int = 0
    bucket: TokenBucket = field(default_factory=_round_bucket)


class SyncNode(NodeContext, Protocol):
    """What the driver uses of the node beyond ``NodeContext``."""

    peers: dict[NodeId, PeerInfo]

    def ingest(
        self, raw: bytes, source: str, peer: NodeId | str | None = None, *, bulk: bool = False
    ) -> bool: ...


class AntiEntropySync:
    """Anti-entropy rounds of one node: ``sync_with`` pulls (the node's join uses it
    too), ``serve`` answers (the handler of ``SYNC_PROTOCOL``), ``run`` schedules."""

    def __init__(self, node: SyncNode) -> None:
        self.node = node
        self.ae = AntiEntropy(node.view)
        # what a peer holding no record here (a light client, a node in its first
        # pull) is served: no exit this node has not verified
        self.ae_stranger = AntiEntropy(StrangerView(node.view))
        self.last_ok = False  # the last round ended well
        self.last_outcome = FAILED
        self.schedule = SyncSchedule(
            node.config.sync_interval, node.config.sync_idle_interval, node.rng, node.clock()
        )
        self._kicked = trio.Event()
        self._streams: dict[NodeId, object] = {}  # kept for the next round, one per peer

    def kick(self, peer: NodeId | None = None) -> None:
        """Bring rounds back to the fast rate now (with ``peer`` next)."""
        self.schedule.kick(self.node.clock(), peer)
        self._kicked.set()

    def ae_for(self, peer: NodeId) -> AntiEntropy:
        """A peer that holds no record here is served no exit we have not verified."""
        return self.ae if peer in self.node.view else self.ae_stranger

    async def sync_with(self, peer: NodeId, *, bulk: bool = False) -> int:
        """One anti-entropy round pulling from ``peer``. Returns records accepted.

        ``bulk``: the pull of a joining node (exempt from the admission rate)."""
        accepted = 0
        self.last_outcome = FAILED
        self._forget_streams()
        stream = self._streams.pop(peer, None)
        rnd = None
        try:
            with trio.fail_after(SYNC_TIMEOUT):
                if stream is not None:
                    rnd = self._initiator(peer)
                    try:
                        await self._round(stream, rnd, peer)
                    except (OverlayError, RoundAborted):
                        if rnd.answered:
                            raise
                        # the kept stream was closed at the other end: a new one
                        await _close(stream)
                        stream = None
                if stream is None:
                    stream = await self.node.host.open_stream(peer.peer_id(), SYNC_PROTOCOL)
                    self.node.metrics.sync_streams.inc()
                    rnd = self._initiator(peer)
                    await self._round(stream, rnd, peer)
            assert rnd is not None
            for raw in rnd.records:
                if self.node.ingest(raw, "sync", peer, bulk=bulk):
                    accepted += 1
            self.node.metrics.sync_records.inc(len(rnd.records))
            self.node.metrics.sync_pushed.inc(rnd.pushed)
        except RemoteError as e:
            await _close(stream)
            self.node.metrics.sync_rounds.labels("initiator", e.reason.value).inc()
            self.node.penalize(peer, e.reason)
            return accepted
        except (trio.TooSlowError, OverlayError, OSError, Exception) as e:  # noqa: BLE001
            await _close(stream)
            self.node.metrics.sync_rounds.labels("initiator", "failed").inc()
            info = self.node.peers.get(peer)
            if info:
                info.sync_failed += 1
            log.debug("sync with %s failed: %r", peer.short(), e)
            return accepted
        self._streams[peer] = stream  # for the next round with this peer
        self.node.metrics.sync_rounds.labels("initiator", "ok").inc()
        self.last_ok = True
        self.last_outcome = DIFFERED if rnd.differed else SAME
        info = self.node.peers.get(peer)
        if info:
            info.sync_ok += 1
        return accepted

    def _initiator(self, peer: NodeId) -> Initiator:
        return Initiator(
            self.ae, now=self.node.clock(), push_ae=self.ae_for(peer), always_push=True
        )

    async def _round(self, stream, rnd: Initiator, peer: NodeId) -> None:
        await self._send(stream, rnd.start())
        while not rnd.done:
            frame = await self._recv(stream)
            self.node.confirm(peer)
            for out in rnd.receive(frame):
                await self._send(stream, out)

    def _forget_streams(self) -> None:
        """Kept streams of peers no longer connected go (their connection took them)."""
        if not self._streams:
            return
        connected = set(self.node.connected())
        for peer in [p for p in self._streams if p not in connected]:
            self._streams.pop(peer, None)

    async def serve(self, stream, remote_peer: str) -> None:
        """Answer rounds on ``stream`` until the peer closes it, stays idle for
        ``IDLE_TIMEOUT``, or a round goes wrong."""
        try:
            peer = NodeId.from_peer_id(remote_peer)
        except ValueError:
            await _close(stream)
            return
        stranger = _round_bucket()  # rounds of a peer not in the table
        try:
            while True:
                first = None
                with trio.move_on_after(IDLE_TIMEOUT):
                    first = await self._recv(stream, end_ok=True)
                if first is None:
                    return  # closed by the peer, or idle: both are a clean end
                if not await self._serve_round(stream, peer, first, stranger):
                    return
        except RemoteError as e:  # the first frame of a round was bad input
            self.node.metrics.sync_rounds.labels("responder", e.reason.value).inc()
            self.node.penalize(peer, e.reason)
        except Exception as e:  # noqa: BLE001 - a broken stream must not kill the node
            log.debug("sync stream from %s ended: %r", peer.short(), e)
        finally:
            await _close(stream)

    async def _serve_round(self, stream, peer: NodeId, frame, stranger: TokenBucket) -> bool:
        """One round that began with ``frame``; False if the stream should end."""
        self.node.confirm(peer)
        info = self.node.peers.get(peer)
        bucket = info.bucket if info else stranger
        try:
            if not bucket.take(self.node.clock()):
                self.node.penalize(peer, Reason.RATE_LIMITED)
                self.node.metrics.sync_rounds.labels("responder", "rate_limited").inc()
                return False
            rnd = Responder(self.ae_for(peer))
            with trio.fail_after(SYNC_TIMEOUT):
                while True:
                    for out in rnd.end() if frame is None else rnd.receive(frame):
                        await self._send(stream, out)
                    if rnd.done:
                        break
                    # a clean end of stream after the want means nothing to push
                    frame = await self._recv(stream, end_ok=True)
            if rnd.pushed:
                before = self.node.changes
                for raw in rnd.pushed:
                    self.node.ingest(raw, "sync", peer)
                if self.node.changes != before:
                    self.kick()  # news pushed to us: our other peers may lack it
            self.node.metrics.sync_rounds.labels("responder", "ok").inc()
            return frame is not None
        except RemoteError as e:
            self.node.metrics.sync_rounds.labels("responder", e.reason.value).inc()
            self.node.penalize(peer, e.reason)
        except Exception as e:  # noqa: BLE001 - a broken stream must not kill the node
            self.node.metrics.sync_rounds.labels("responder", "failed").inc()
            log.debug("serving sync to %s failed: %r", peer.short(), e)
        return False

    async def _send(self, stream, frame) -> None:
        data = framing.encode_frame(sync.encode(frame), sync.MAX_SIZE)
        self.node.metrics.sync_bytes.labels("out").inc(len(data))
        await stream.write(data)

    async def _recv(self, stream, *, end_ok: bool = False):
        """The next sync frame; at end of stream ``None`` if ``end_ok``, else
        ``RoundAborted`` (the peer gave up: its deadline passed, or it is shutting
        down; not bad input)."""
        data = await framing.read_frame(stream, sync.MAX_SIZE)
        if data is None:
            if end_ok:
                return None
            raise RoundAborted("stream closed mid-round")
        self.node.metrics.sync_bytes.labels("in").inc(len(data))
        return sync.decode(data)

    async def run(self) -> None:
        """Anti-entropy rounds, one at a time, as ``core.syncsched`` schedules them:
        fast while rounds find differences, backing off to ``sync_idle_interval``
        while they do not."""
        sched = self.schedule
        while True:
            cfg = self.node.config
            if (sched.fastest, sched.slowest) != (cfg.sync_interval, cfg.sync_idle_interval):
                sched.configure(cfg.sync_interval, cfg.sync_idle_interval)  # SIGHUP
            step = sched.poll(self.node.clock())
            if not isinstance(step, Due):
                with trio.move_on_after(step):
                    await self._kicked.wait()
                self._kicked = trio.Event()
                continue
            peers = self.node.connected()
            if not peers:
                sched.done(FAILED, self.node.clock())
                continue
            peer = step.peer if step.peer in peers else self.node.rng.choice(peers)
            await self.sync_with(peer)
            sched.done(self.last_outcome, self.node.clock())


async def _close(stream) -> None:
    with trio.move_on_after(1, shield=True):
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 - closing a broken stream
            pass
