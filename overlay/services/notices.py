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

Asking (``ask``, the worker's ``check_delivered``) waits until the node has
joined: a restarted exit asks nothing, and so delivers nothing from its saved
queue, before it knows the overlay. It asks the exits the sender named and
up to ``ASK_PEERS`` other exit-capable members (connected ones first, others
dialled), and reports who answered (``Verdict``). In-flight marks (``mark``,
``/hydra/inflight/1.0.0``) are sent to the named exits and to up to
``MARK_PEERS`` connected exit-capable peers right before the end of data, and
accepted only from peers whose record holds an exit role.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio
from prometheus_client import Counter

from ..crypto import NodeId
from ..errors import DecodeError, LocalError, Reason
from ..exits import DeliveryWorker
from ..exits.worker import Verdict
from ..net import framing
from ..records import EXIT_ROLES
from ..wire import delivered as wire

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("hydra.notices")

BACKLOG = 1024
ASK_PEERS = 3  # exit-capable peers asked besides the message's earlier exits
ASK_TIMEOUT = 2.0
OTHERS_NEEDED = 2  # exits not named by the sender that must agree a message was delivered
ASK_DOUBTFUL_TIMEOUT = 0.5  # for an earlier exit we hold suspect or dead (yet still connected)
READY_WAIT = 60.0  # a question waits this long for the node to join, else nobody answered
MARK_PEERS = 8  # connected exit-capable peers told of an in-flight attempt, besides named ones
MARK_TIMEOUT = 0.5  # per peer: to open the stream, and for its acknowledgement
MARK_OPEN_WAIT = 0.5  # the end of data waits this long at most for the mark streams
MARK_GRACE = 0.05  # ... and this long for the others once one is open
MAX_MARK_ACKS = 1024  # mark streams awaiting their acknowledgement at once


class AnswerTally:
    """Combines the answers to one question (pure; see ``DeliveryNotices.ask``).

    The exits the sender named (``named``: it handed them the message) are
    believed alone, "delivered" and "held" alike: they had the message, and a
    lying one could have dropped it anyway. Any other exit can only vouch for
    a delivery it heard of, and must be backed by a second one (unless only
    one was asked): else a single lying exit, asked at random, could make us
    drop every late message by answering "delivered", or stall it forever by
    answering "held". "Held" from an exit not named is ignored. An in-flight
    mark counts only for an exit the sender named (the exit it died in must
    have had the message), from our own marks or as *delivered* is believed.
    """

    def __init__(self, keys: Iterable[bytes], named: set[NodeId], others: int) -> None:
        self.keys = tuple(keys)
        self.named = named
        self.needed = max(1, min(OTHERS_NEEDED, others))
        self.delivered: set[bytes] = set()
        self.holding: set[bytes] = set()
        self.answered: set[NodeId] = set()
        self.marks: set[tuple[bytes, bytes]] = set()  # believed (key, marking exit's raw id)
        self._named_raw = {bytes(n) for n in named}
        self._votes: dict[bytes, set[NodeId]] = {}
        self._mark_votes: dict[tuple[bytes, bytes], set[NodeId]] = {}

    def add_mark(self, key: bytes, marker: bytes) -> None:
        """A mark we received ourselves, from the marking exit: believed if the
        sender named that exit (it handed it the message)."""
        if bytes(marker) in self._named_raw:
            self.marks.add((bytes(key), bytes(marker)))

    def add(self, peer: NodeId, answer: wire.Answer) -> bool:
        """Count ``peer``'s answer; True once every key is settled (delivered or held).
        In-flight marks it reports are believed like its *delivered*."""
        asked = set(self.keys)
        self.answered.add(peer)
        for pair in answer.in_flight:
            if pair[0] not in asked or pair[1] == bytes(peer) or pair[1] not in self._named_raw:
                continue
            votes = self._mark_votes.setdefault(pair, set())
            votes.add(peer)
            if peer in self.named or len(votes) >= self.needed:
                self.marks.add(pair)
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

    def verdict(self, alone: bool = False) -> Verdict:
        """The answer, plus the keys marked in flight by an exit that did not answer
        (an exit that answered speaks for itself: *held*, *delivered* or neither)."""
        answer = self.result()
        settled = set(answer.delivered) | set(answer.holding)
        spoke = {bytes(p) for p in self.answered}
        in_flight = {k for k, m in self.marks if m not in spoke and k not in settled}
        return Verdict(
            answer.delivered,
            answer.holding,
            tuple(k for k in self.keys if k in in_flight),
            answered=len(self.answered),
            alone=alone,
        )


class DeliveryNotices:
    """Publishes our deliveries and records other exits' ones. Run inside a node."""

    def __init__(self, node: NodeContext, worker: Callable[[], DeliveryWorker | None]) -> None:
        self.node = node
        self._worker = worker
        self._nursery: trio.Nursery | None = None
        self._acks_pending = 0  # mark streams whose acknowledgement is still awaited
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
        node.host.set_stream_handler(wire.MARK_PROTOCOL, self._serve_mark)

    def delivered(self, message_id: bytes) -> None:
        """We delivered ``message_id``: announce it (soon, batched)."""
        try:
            self._send.send_nowait(wire.notice_key(message_id))
        except trio.WouldBlock:
            self.m_notices.labels("dropped").inc()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        worker = self._worker()
        if worker is not None and worker.mark_in_flight is None:
            worker.mark_in_flight = self.mark  # the worker's end-of-data window, told to others
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
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
        return self.node.resilience.liveness.state(nid)[0]

    @staticmethod
    def _exit_capable(rec) -> bool:
        return rec is not None and not rec.is_tombstone and bool(rec.roles & EXIT_ROLES)

    # -- asking before a late or resent delivery -------------------------------------

    def _others(self, exclude: set[NodeId], connected: set[NodeId]) -> tuple[list, bool]:
        """Exit-capable members besides ``exclude`` and us that our failure detector
        does not hold suspect or dead, connected ones first then in random order;
        and whether every other exit-capable member is held dead (``alone``)."""
        node = self.node
        me = node.node_id
        records = [
            r
            for r in node.view.snapshot(node.clock()).live()
            if r.node_id != me and self._exit_capable(r)
        ]
        alone = all(self._liveness_state(r.node_id) == "dead" for r in records)
        ids = sorted(
            (
                r.node_id
                for r in records
                if r.node_id not in exclude
                and self._liveness_state(r.node_id) not in ("suspect", "dead")
            ),
            key=bytes,
        )
        node.rng.shuffle(ids)
        ids.sort(key=lambda n: n not in connected)  # stable: connected first, each shuffled
        return ids, alone

    async def ask(self, keys: Iterable[bytes], earlier: Iterable[bytes] = ()) -> Verdict:
        """What do the exits in ``earlier`` (raw node ids: they had these messages
        before us), the exits whose in-flight marks we hold for them, and up to
        ``ASK_PEERS`` other exit-capable members know of these notice keys:
        delivered, held by them, or in flight at an exit that does not answer?
        Waits until the node has joined (at most ``READY_WAIT`` s; then nobody
        answered). Unreachable or silent peers count as "don't know", and
        ``Verdict.answered`` tells how many did answer."""
        keys = tuple(dict.fromkeys(bytes(k) for k in keys))[: wire.MAX_KEYS]
        if not keys:
            return Verdict()
        node = self.node
        with trio.move_on_after(READY_WAIT):
            await node.ready.wait()
        if not node.ready.is_set():
            self.m_notices.labels("asked_not_joined").inc()
            return Verdict()
        me = node.node_id
        connected = set(node.connected())
        worker = self._worker()
        asked: dict[NodeId, float] = {}  # peer -> how long we wait for its answer
        named: set[NodeId] = set()
        for raw in earlier:
            try:
                nid = NodeId(bytes(raw))
            except ValueError:
                continue
            state = self._liveness_state(nid)
            if nid == me or nid in named:
                continue
            named.add(nid)
            if state == "dead" and nid not in connected:
                continue  # crashed and gone: dialling it would only cost time
            doubtful = state in ("suspect", "dead")
            asked[nid] = ASK_DOUBTFUL_TIMEOUT if doubtful else ASK_TIMEOUT
        others, alone = self._others(set(asked) | named, connected)
        others = others[:ASK_PEERS]
        for nid in others:
            asked[nid] = ASK_TIMEOUT
        question = framing.encode_frame(wire.encode(wire.Delivered(keys)), wire.MAX_SIZE)
        tally = AnswerTally(keys, named, others=len(others))
        own_marks = worker.marks_among(keys) if worker is not None else {}
        for key, marker in own_marks.items():
            tally.add_mark(key, marker)  # counted only if the sender named the marker

        async def one(peer: NodeId, timeout: float, done: trio.CancelScope) -> None:
            try:
                with trio.move_on_after(timeout):
                    if peer not in connected:
                        rec = node.view.get(peer)
                        if rec is not None and not await node.connect_record(rec):
                            return
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
        verdict = tally.verdict(alone=alone)
        result = (
            "asked_delivered"
            if verdict.delivered
            else "asked_held"
            if verdict.holding
            else "asked_in_flight"
            if verdict.in_flight
            else "asked_unknown"
            if verdict.answered or alone
            else "asked_unanswered"
        )
        self.m_notices.labels(result).inc()
        return verdict

    # -- in-flight marks ---------------------------------------------------------------

    async def mark(
        self,
        key: bytes,
        earlier: Iterable[bytes] = (),
        ended: bool = False,
        then: Callable[[], None] | None = None,
    ) -> int:
        """Tell the exits in ``earlier`` and up to ``MARK_PEERS`` other exit-capable
        peers, all among those we are connected to, that the message with notice
        key ``key`` is in flight here (its end of data is about to be sent), or
        (``ended``) that our attempt ended without a delivery. Nothing is dialled:
        this runs inside every delivery, while the mail server waits for the end
        of data, and a dial to a named exit that has gone costs seconds.

        Streams are opened first (until all are open, or ``MARK_GRACE`` s after
        the first one, or ``MARK_OPEN_WAIT`` s in all), then the mark is written
        on all of them at once and ``then`` (the end of data) is called at once,
        synchronously: no other task runs between the last mark written and the
        end of data, so a peer holds the mark only for the moment the end of data
        really is on its way. Acknowledgements are collected in the background.
        Returns on how many streams the mark was written."""
        node = self.node
        me = node.node_id
        connected = set(node.connected())
        peers: list[NodeId] = []
        for raw in earlier:
            try:
                nid = NodeId(bytes(raw))
            except ValueError:
                continue
            if nid != me and nid not in peers and nid in connected:
                peers.append(nid)
        # connected exit-capable peers, whatever our failure detector thinks of them (a
        # connection is better evidence than a starved detector); no dialling here:
        # this runs for every delivery
        linked = [n for n in connected if n not in peers and self._exit_capable(node.view.get(n))]
        linked.sort(key=bytes)
        node.rng.shuffle(linked)
        peers += linked[:MARK_PEERS]
        frame = framing.encode_frame(
            wire.encode_mark(wire.Mark(bytes(key), ended)), wire.MARK_MAX_SIZE
        )
        opened: list = []

        async def open_one(peer: NodeId) -> None:
            try:
                stream = await node.host.open_stream(
                    peer.peer_id(), wire.MARK_PROTOCOL, timeout=MARK_TIMEOUT
                )
            except Exception as e:  # noqa: BLE001 - best effort: the delivery goes on
                log.debug("marking in flight at %s failed: %r", peer.short(), e)
                return
            opened.append((peer, stream))
            first.set()

        async def grace(done: trio.CancelScope) -> None:
            await first.wait()  # a dead peer that still looks connected must not hold us up
            await trio.sleep(MARK_GRACE)
            done.cancel()

        first = trio.Event()
        with trio.move_on_after(MARK_OPEN_WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(grace, nursery.cancel_scope)
                async with trio.open_nursery() as opening:
                    for peer in peers:
                        opening.start_soon(open_one, peer)
                nursery.cancel_scope.cancel()
        written = []
        for peer, stream in opened:
            try:
                await stream.write(frame)
                written.append((peer, stream))
            except Exception as e:  # noqa: BLE001
                log.debug("marking in flight at %s failed: %r", peer.short(), e)
                with contextlib.suppress(Exception):
                    await stream.close()
        if then is not None:
            then()
        self.m_notices.labels("mark_ended" if ended else "mark_sent").inc()
        if written and self._nursery is not None and self._acks_pending < MAX_MARK_ACKS:
            self._acks_pending += len(written)
            self._nursery.start_soon(self._mark_acks, written, bytes(key))
        else:
            for _, stream in written:
                with contextlib.suppress(Exception):
                    await stream.close()
        return len(written)

    async def _mark_acks(self, streams: list, key: bytes) -> None:
        """Read the acknowledgements of a mark (for the metrics), then close."""

        async def one(peer: NodeId, stream) -> None:
            try:
                with trio.move_on_after(MARK_TIMEOUT):
                    data = await framing.read_frame(stream, wire.MARK_MAX_SIZE)
                    ok = data is not None and wire.decode_mark(data).key == key
                    self.m_notices.labels("mark_acked" if ok else "mark_unacked").inc()
            except Exception as e:  # noqa: BLE001
                log.debug("in-flight mark at %s not acknowledged: %r", peer.short(), e)
            finally:
                self._acks_pending -= 1
                with contextlib.suppress(Exception):
                    await stream.close()

        async with trio.open_nursery() as nursery:
            for peer, stream in streams:
                nursery.start_soon(one, peer, stream)

    async def _serve_mark(self, stream, remote_peer: str) -> None:
        try:
            with trio.fail_after(ASK_TIMEOUT):
                data = await framing.read_frame(stream, wire.MARK_MAX_SIZE)
                if data is None:
                    return
                mark = wire.decode_mark(data)
                marker = NodeId.from_peer_id(remote_peer)
                if not self._exit_capable(self.node.view.get(marker)):
                    self.m_notices.labels("rejected_mark_not_exit").inc()
                    return  # only an exit's mark may stop another exit's delivery
                worker = self._worker()
                if worker is not None:
                    worker.note_mark(mark.key, bytes(marker), mark.ended)
                self.m_notices.labels("mark_accepted").inc()
                await stream.write(framing.encode_frame(data, wire.MARK_MAX_SIZE))
        except DecodeError as e:
            self._reject(e.reason.value, remote_peer, penalize=True)
        except (LocalError, ValueError, trio.TooSlowError) as e:
            log.debug("taking an in-flight mark from %s: %r", remote_peer[-8:], e)

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
