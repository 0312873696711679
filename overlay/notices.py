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
from .exits import DeliveryWorker
from .net import framing
from .records import Role
from .wire import delivered as wire

if TYPE_CHECKING:
    from .runtime import Node

log = logging.getLogger("hydra.notices")

BACKLOG = 1024
ASK_PEERS = 3  # exit-capable peers asked besides the message's earlier exits
ASK_TIMEOUT = 2.0
OTHERS_NEEDED = 2  # exits not named by the sender that must agree a message was delivered
ASK_DOUBTFUL_TIMEOUT = 0.5  # for an earlier exit we hold suspect or dead (yet still connected)


class AnswerTally:
    """Combines the answers to one question (pure; see ``DeliveryNotices.ask``).

    The exits the sender named (``named``: it handed them the message) are
    believed alone, "delivered" and "held" alike: they had the message, and a
    lying one could have dropped it anyway. Any other exit can only vouch for
    a delivery it heard of, and must be backed by a second one (unless only
    one was asked): else a single lying exit, asked at random, could make us
    drop every late message by answering "delivered", or stall it forever by
    answering "held". "Held" from an exit not named is ignored.
    """

    def __init__(self, keys: Iterable[bytes], named: set[NodeId], others: int) -> None:
        self.keys = tuple(keys)
        self.named = named
        self.needed = max(1, min(OTHERS_NEEDED, others))
        self.delivered: set[bytes] = set()
        self.holding: set[bytes] = set()
        self._votes: dict[bytes, set[NodeId]] = {}

    def add(self, peer: NodeId, answer: wire.Answer) -> bool:
        """Count ``peer``'s answer; True once every key is settled (delivered or held)."""
        asked = set(self.keys)
        for key in set(answer.delivered) & asked:
            if peer in self.named:
                self.delivered.add(key)
            else:
                votes = self._votes.setdefault(key, set())
                votes.add(peer)
                if len(votes) >= self.needed:
                    self.delivered.add(key)
        if peer in self.named:
            self.holding.update(set(answer.holding) & asked)
        return self.delivered | self.holding >= asked

    def result(self) -> wire.Answer:
        holding = self.holding - self.delivered
        return wire.Answer(
            tuple(k for k in self.keys if k in self.delivered),
            tuple(k for k in self.keys if k in holding),
        )


class DeliveryNotices:
    """Publishes our deliveries and records other exits' ones. Run inside a node."""

    def __init__(self, node: Node, worker: Callable[[], DeliveryWorker | None]) -> None:
        self.node = node
        self._worker = worker
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
                # best effort: exits that hold a copy ask before they deliver it
                log.info("publishing a delivery notice failed: %s", e)
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
        worker = self._worker()
        if worker is not None:
            try:
                finished = worker.queue.note_delivered_elsewhere(frame.keys, self.node.clock())
            except LocalError as e:
                log.warning(
                    "cannot record a delivery notice (%s); check that HOME is writable "
                    "and the disk has room",
                    e,
                )
            else:
                if finished:
                    self.m_finished.inc(finished)
                    log.info("%d pending message(s) were delivered by another exit", finished)
        return True

    def _liveness_state(self, nid: NodeId) -> str:
        """``alive``, ``suspect``, ``dead`` or ``unknown`` in our failure detector."""
        liveness = getattr(getattr(self.node, "resilience", None), "liveness", None)
        return "alive" if liveness is None else liveness.state(nid)[0]

    @staticmethod
    def _exit_capable(rec) -> bool:
        return (
            rec is not None
            and not rec.is_tombstone
            and bool(rec.roles & (Role.EXIT | Role.STANDBY_EXIT))
        )

    # -- asking before a late or resent delivery -------------------------------------

    async def ask(self, keys: Iterable[bytes], earlier: Iterable[bytes] = ()) -> wire.Answer:
        """What do the exits in ``earlier`` (raw node ids: they had these messages
        before us) and up to ``ASK_PEERS`` other connected exit-capable peers know
        of these notice keys: delivered, or held by them? Unreachable or silent
        peers count as "don't know"."""
        keys = tuple(dict.fromkeys(bytes(k) for k in keys))[: wire.MAX_KEYS]
        if not keys:
            return wire.Answer()
        node = self.node
        me = node.node_id
        connected = set(node.connected())
        asked: dict[NodeId, float] = {}  # peer -> how long we wait for its answer
        named: set[NodeId] = set()
        for raw in earlier:
            try:
                nid = NodeId(bytes(raw))
            except ValueError:
                continue
            state = self._liveness_state(nid)
            if nid == me or (state == "dead" and nid not in connected):
                continue  # crashed and gone: dialling it would only cost time
            doubtful = state in ("suspect", "dead")
            asked.setdefault(nid, ASK_DOUBTFUL_TIMEOUT if doubtful else ASK_TIMEOUT)
            named.add(nid)
        others = [
            nid
            for nid in connected
            if nid not in asked
            and self._exit_capable(node.view.get(nid))
            and self._liveness_state(nid) not in ("suspect", "dead")
        ]
        others.sort(key=bytes)
        node.rng.shuffle(others)
        others = others[:ASK_PEERS]
        for nid in others:
            asked[nid] = ASK_TIMEOUT
        question = framing.encode_frame(wire.encode(wire.Delivered(keys)), wire.MAX_SIZE)
        tally = AnswerTally(keys, named, others=len(others))

        async def one(peer: NodeId, timeout: float, done: trio.CancelScope) -> None:
            try:
                with trio.move_on_after(timeout):
                    stream = await node.host.open_stream(
                        peer.peer_id(), wire.PROTOCOL, timeout=timeout
                    )
                    try:
                        await stream.write(question)
                        data = await framing.read_frame(stream, wire.ANSWER_MAX_SIZE)
                    finally:
                        await stream.close()
                    if data is not None and tally.add(peer, wire.decode_answer(data)):
                        done.cancel()  # every key is settled: no need to wait for the rest
            except Exception as e:  # noqa: BLE001 - a peer that cannot answer does not know
                log.debug("asking %s about deliveries failed: %r", peer.short(), e)

        async with trio.open_nursery() as nursery:
            for peer, timeout in asked.items():
                nursery.start_soon(one, peer, timeout, nursery.cancel_scope)
        answer = tally.result()
        result = (
            "asked_delivered"
            if answer.delivered
            else "asked_held"
            if answer.holding
            else "asked_unknown"
        )
        self.m_notices.labels(result).inc()
        return answer

    async def _serve(self, stream, remote_peer: str) -> None:
        try:
            with trio.fail_after(ASK_TIMEOUT):
                data = await framing.read_frame(stream, wire.MAX_SIZE)
                if data is None:
                    return
                keys = wire.decode(data).keys
                worker = self._worker()
                if worker is None:
                    answer = wire.Answer()
                else:
                    asker = NodeId.from_peer_id(remote_peer)
                    me = bytes(self.node.node_id)
                    # only an exit may leave a claim we would later trust (see answer)
                    claimant = (
                        bytes(asker) if self._exit_capable(self.node.view.get(asker)) else None
                    )
                    answer = worker.answer(keys, claimant, bytes(asker) < me)
                data = framing.encode_frame(wire.encode_answer(answer), wire.ANSWER_MAX_SIZE)
                await stream.write(data)
        except DecodeError as e:
            self._reject(e.reason.value, remote_peer, penalize=True)
        except (LocalError, ValueError, trio.TooSlowError) as e:
            log.debug("answering a delivery question from %s: %r", remote_peer[-8:], e)

    def _reject(self, why: str, forwarder: str, penalize: bool = False) -> None:
        self.m_notices.labels(f"rejected_{why}").inc()
        log.info("delivery notice via %s rejected: %s", forwarder[-8:], why)
        if penalize:
            try:
                self.node.penalize(NodeId.from_peer_id(forwarder), Reason.MALFORMED)
            except ValueError:
                pass
