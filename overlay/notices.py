"""Delivery notices between exits: so a resent message is not delivered twice.

The gap this closes: an exit delivers a message and dies before its
acknowledgement reaches the sender; the sender resends through another exit,
which would deliver it again. With notices, the first exit publishes the
message's notice key (``overlay.wire.delivered``) right after delivering, and
every exit-capable node remembers the keys it hears in its delivery queue; the
second exit then answers ``delivered`` without delivering. What is left is the
moment between a delivery and its notice leaving the exit (and an exit that
restarts with messages still queued hears only the notices published after it
came back).

I/O edge only: every node subscribes (so the topic is relayed whatever the
mesh), the validator accepts a notice only from an origin whose record holds
the EXIT or STANDBY_EXIT role, and only nodes with a delivery queue store it.
Publishing is immediate and batches only what is already waiting (up to
``MAX_KEYS`` keys), and bounded (``BACKLOG`` keys waiting; beyond that keys are dropped and counted —
the sender's resend then meets only the exit's own de-duplication).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio
from prometheus_client import Counter

from .crypto import NodeId
from .errors import DecodeError, LocalError, Reason
from .exits import DeliveryQueue
from .net import framing
from .records import Role
from .wire import delivered as wire

if TYPE_CHECKING:
    from .runtime import Node

log = logging.getLogger("hydra.notices")

BACKLOG = 1024
ASK_PEERS = 3  # exit-capable peers asked before a late delivery
ASK_TIMEOUT = 2.0


class DeliveryNotices:
    """Publishes our deliveries and records other exits' ones. Run inside a node."""

    def __init__(self, node: Node, queue: Callable[[], DeliveryQueue | None]) -> None:
        self.node = node
        self._queue = queue
        self._send, self._recv = trio.open_memory_channel[bytes](BACKLOG)
        r = node.metrics.registry
        self.m_notices = Counter(
            "hydra_delivery_notices",
            "Delivery notices: published, accepted, or rejected by reason",
            ["result"],
            registry=r,
        )
        self.m_finished = Counter(
            "hydra_exit_finished_elsewhere",
            "Pending messages finished because another exit delivered them",
            registry=r,
        )
        node.host.set_topic_validator(wire.TOPIC, self._validate)
        node.host.set_stream_handler(wire.PROTOCOL, self._serve)

    def delivered(self, message_id: bytes) -> None:
        """We delivered ``message_id``: announce it (soon, batched)."""
        try:
            self._send.send_nowait(wire.notice_key(message_id))
        except trio.WouldBlock:
            self.m_notices.labels("dropped").inc()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain)
            task_status.started()
            await self._publish_loop()

    async def _publish_loop(self) -> None:
        while True:
            keys = [await self._recv.receive()]
            # no waiting to fill a batch: every millisecond before the notice leaves
            # is a window in which our death would let a resend be delivered again
            while len(keys) < wire.MAX_KEYS:
                try:
                    keys.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self.node.host.publish(wire.TOPIC, wire.encode(wire.Delivered(tuple(keys))))
                self.m_notices.labels("published").inc()
            except Exception as e:  # noqa: BLE001 - best effort, like all gossip
                log.warning("publishing a delivery notice failed: %r", e)
                self.m_notices.labels("publish_failed").inc()

    async def _drain(self) -> None:
        async with await self.node.host.subscribe(wire.TOPIC) as sub:
            async for _ in sub:
                pass

    async def _validate(self, forwarder: str, msg) -> bool:
        if msg.origin == self.node.node_id.peer_id():
            return True
        try:
            frame = wire.decode(msg.data)
        except DecodeError as e:
            self._reject(e.reason.value, forwarder, penalize=True)
            return False
        if not frame.keys:
            self._reject("empty", forwarder)
            return False
        try:
            origin = NodeId.from_peer_id(msg.origin)
        except ValueError:
            self._reject("bad_origin", forwarder)
            return False
        rec = self.node.view.get(origin)
        if rec is None:  # e.g. we joined a moment ago: we cannot tell, so we do not relay it
            self._reject("unknown_origin", forwarder)
            return False
        if not self._exit_capable(rec):
            self._reject("not_exit", forwarder)
            return False
        self.m_notices.labels("accepted").inc()
        queue = self._queue()
        if queue is not None:
            try:
                finished = queue.note_delivered_elsewhere(frame.keys, self.node.clock())
            except LocalError as e:
                log.warning("cannot record a delivery notice: %s", e)
            else:
                if finished:
                    self.m_finished.inc(finished)
                    log.info("%d pending message(s) were delivered by another exit", finished)
        return True

    @staticmethod
    def _exit_capable(rec) -> bool:
        return (
            rec is not None
            and not rec.is_tombstone
            and bool(rec.roles & (Role.EXIT | Role.STANDBY_EXIT))
        )

    # -- asking before a late delivery -------------------------------------------

    async def ask(self, keys: Iterable[bytes]) -> set[bytes]:
        """Which of these notice keys do up to ``ASK_PEERS`` connected exit-capable
        peers know as delivered? For a message that waited at this exit (we were
        paused or cut off, and may have missed the notice of the exit that took
        over). Unreachable or silent peers count as "don't know"."""
        keys = tuple(dict.fromkeys(bytes(k) for k in keys))[: wire.MAX_KEYS]
        if not keys:
            return set()
        node = self.node
        peers = [nid for nid in node.connected() if self._exit_capable(node.view.get(nid))]
        node.rng.shuffle(peers)
        question = framing.encode_frame(wire.encode(wire.Delivered(keys)), wire.MAX_SIZE)
        known: set[bytes] = set()

        async def one(peer: NodeId) -> None:
            try:
                with trio.move_on_after(ASK_TIMEOUT):
                    stream = await node.host.open_stream(peer.peer_id(), wire.PROTOCOL)
                    try:
                        await stream.write(question)
                        data = await framing.read_frame(stream, wire.MAX_SIZE)
                    finally:
                        await stream.close()
                    if data is not None:
                        known.update(set(wire.decode(data).keys) & set(keys))
            except Exception as e:  # noqa: BLE001 - a peer that cannot answer does not know
                log.debug("asking %s about deliveries failed: %r", peer.short(), e)

        async with trio.open_nursery() as nursery:
            for peer in peers[:ASK_PEERS]:
                nursery.start_soon(one, peer)
        self.m_notices.labels("asked_known" if known else "asked_unknown").inc()
        return known

    async def _serve(self, stream, remote_peer: str) -> None:
        try:
            with trio.fail_after(ASK_TIMEOUT):
                data = await framing.read_frame(stream, wire.MAX_SIZE)
                if data is None:
                    return
                keys = wire.decode(data).keys
                queue = self._queue()
                known = queue.delivered_among(keys) if queue is not None else set()
                answer = wire.Delivered(tuple(k for k in keys if k in known))
                await stream.write(framing.encode_frame(wire.encode(answer), wire.MAX_SIZE))
        except DecodeError as e:
            self._reject(e.reason.value, remote_peer, penalize=True)
        except (LocalError, trio.TooSlowError) as e:
            log.debug("answering a delivery question from %s: %r", remote_peer[-8:], e)

    def _reject(self, why: str, forwarder: str, penalize: bool = False) -> None:
        self.m_notices.labels(f"rejected_{why}").inc()
        log.info("delivery notice via %s rejected: %s", forwarder[-8:], why)
        if penalize:
            try:
                self.node.penalize(NodeId.from_peer_id(forwarder), Reason.MALFORMED)
            except ValueError:
                pass
