"""The exit's delivery service: accept messages, deliver due ones, send acknowledgements.

``DeliveryWorker.submit(msg)`` is what the exit calls for every exit message
it unwraps: policy check, durable accept (or duplicate detection), then the
acknowledgement. ``run()`` delivers due messages with bounded concurrency,
waking up when a message is accepted, when an attempt finishes and at the
next scheduled retry.

Acknowledgements: every ack goes out through ``send_ack(reply_block, ack)``
(the runtime wraps it in the SURB and sends it), at most once per reply block
(SURBs are single-use). With ``ack_when="accepted"`` (default) the exit acks
as soon as the message is durably queued (``queued``), or at once with
``delivered``/``rejected`` for a duplicate of a finished message or a refused
one: the sender can stop resending once one exit has taken responsibility,
so two exits never both hold the message. With ``ack_when="delivered"`` the
reply block is stored with the message and the ack (``delivered`` or
``rejected``) is sent when delivery ends; a resent copy's reply block replaces
the stored one. ``on_event`` (sync) sees every step, for logs and metrics.

Hand-over between exits (``check_delivered``, the question of
``overlay.wire.delivered``): before delivering a message that waited here
``late_after`` seconds, or that the sender resent after handing it to other
exits (``ExitMessage.earlier``), the worker asks those exits and a few others.
A key someone knows as *delivered* finishes our copy; a key someone *holds*
postpones our copy (the holder's notice finishes it; if the holder dies we
ask again later and deliver). ``answer`` is our side of that question: a
message we hold is *held* unless we already gave way for it, or we are
asking about it ourselves at the same moment and the asker's id is lower
(``asker_first``): so two exits asking each other never both wait, nor both
deliver. A question about a message we do not have yet is remembered: the
sender's earlier attempt may still be on its way to us through the overlay,
and when it arrives we ask the exit that asked. Nobody answering means
delivering: no message is lost to silence.

``gate`` (optional) is awaited before every delivery attempt: a cap on
deliveries (``[limits] exit_deliveries_per_minute``) holds the attempt there,
the message still pending in the queue, until the cap has room.

Invariants: an attempt cancelled by shutdown records nothing, so the message
stays pending and the next worker on the same queue delivers it; a handler
that raises anything but a ``DeliveryFailure`` counts as a temporary failure
(logged) and never stops the service; exceptions from ``send_ack`` and
``on_event`` are logged and swallowed.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal

import trio

from ..errors import LocalError
from ..wire.delivered import Answer, notice_key
from ..wire.delivery import Ack, AckStatus, ExitMessage
from .handlers import DeliveryFailure, Dispatcher, PermanentFailure, TemporaryFailure
from .queue import ELSEWHERE, DeliveryQueue, MessageState, QueuedMessage, QueueFull

log = logging.getLogger("hydra.exits")

EventKind = Literal[
    "accepted", "duplicate", "rejected", "delivered", "retry", "gave_up", "deferred"
]
SendAck = Callable[[bytes, Ack], Awaitable[None]]
# (notice keys, raw ids of the exits that had the message before) -> their answer
CheckDelivered = Callable[[list[bytes], tuple[bytes, ...]], Awaitable[Answer]]
DEFER_MIN, DEFER_MAX = 3.0, 60.0
CLAIM_TTL, MAX_CLAIMS = 120.0, 4096


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    kind: EventKind
    message_id: bytes
    destination: str
    attempts: int = 0
    reason: str = ""
    retry_at: float | None = None


class DeliveryWorker:
    """Trio service around a ``DeliveryQueue`` and a ``Dispatcher``. One per queue file."""

    def __init__(
        self,
        queue: DeliveryQueue,
        dispatcher: Dispatcher,
        *,
        concurrency: int = 8,
        send_ack: SendAck | None = None,
        on_event: Callable[[DeliveryEvent], None] | None = None,
        ack_when: Literal["accepted", "delivered"] = "accepted",
        clock: Callable[[], float] = time.time,
        purge_interval: float = 3600.0,
        max_sleep: float = 60.0,
        check_delivered: CheckDelivered | None = None,
        late_after: float = 2.0,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if ack_when not in ("accepted", "delivered"):
            raise ValueError('ack_when must be "accepted" or "delivered"')
        self.queue = queue
        self.check_delivered = check_delivered
        self.late_after = late_after
        self.gate = gate  # awaited before each delivery: an operator's cap holds it there
        self.dispatcher = dispatcher
        self.concurrency = concurrency
        self.send_ack = send_ack
        self.on_event = on_event
        self.ack_when = ack_when
        self.clock = clock
        self.purge_interval = purge_interval
        self.max_sleep = max_sleep
        self._wakeup = trio.Event()
        self._in_flight: set[bytes] = set()
        self._asking: set[bytes] = set()  # ids we are asking other exits about now
        self._gave_way: dict[bytes, float] = {}  # ids another exit holds -> until when
        # notice keys another exit asked about before we had the message -> (its raw
        # id, until when): our copy may be an earlier attempt that the overlay delayed
        self._claims: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._next_purge = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def wake(self) -> None:
        """Make ``run`` look at the queue now."""
        self._wakeup.set()

    # -- accepting ------------------------------------------------------------------

    async def submit(self, msg: ExitMessage) -> Ack:
        """Take ``msg`` from the overlay; returns the ack status for it.

        The ack is also sent through ``send_ack`` when ``msg`` has a reply block
        and it is due now (see the module docstring). Raises ``LocalError`` (and
        sends nothing, so the sender will resend) if the queue cannot store it.
        """
        mid = msg.message_id
        try:
            self.dispatcher.check(msg)
        except PermanentFailure as e:
            return await self._refuse(msg, e.code, str(e))
        stored = msg if self.ack_when == "delivered" else replace(msg, reply_block=None)
        try:
            res = self.queue.accept(stored, self.clock())
        except QueueFull:
            return await self._refuse(msg, "queue_full", "queue_full")
        if res.accepted:
            self._event("accepted", msg)
            self.wake()
            ack = Ack.make(mid, AckStatus.QUEUED)
        else:
            self._event("duplicate", msg, reason=res.state.name.lower())
            if res.state is MessageState.DELIVERED:
                ack = Ack.make(mid, AckStatus.DELIVERED, res.reason)
            elif res.state is MessageState.FAILED:
                ack = Ack.make(mid, AckStatus.REJECTED, res.reason)
            else:
                ack = Ack.make(mid, AckStatus.QUEUED)
        if ack.status is not AckStatus.QUEUED or self.ack_when == "accepted":
            await self._send(msg.reply_block, ack)
        return ack

    async def _refuse(self, msg: ExitMessage, code: str, reason: str) -> Ack:
        self._event("rejected", msg, reason=code)
        ack = Ack.make(msg.message_id, AckStatus.REJECTED, reason)
        await self._send(msg.reply_block, ack)
        return ack

    # -- delivering -----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deliver due messages until cancelled. Ready once the first scan can start."""
        self._next_purge = self.clock()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._wakeup = trio.Event()  # reset before looking, so no wake-up is lost
                try:
                    timeout = self._scan(nursery)
                except (sqlite3.Error, LocalError):
                    log.exception("exit: delivery queue unavailable; retrying")
                    timeout = min(5.0, self.max_sleep)
                with trio.move_on_after(timeout):
                    await self._wakeup.wait()

    def _scan(self, nursery: trio.Nursery) -> float:
        """Start due attempts; return how long to sleep at most."""
        now = self.clock()
        if now >= self._next_purge:
            dropped = self.queue.purge(now)
            if dropped:
                log.info("exit queue: forgot %d finished message ids", dropped)
            self._next_purge = now + self.purge_interval
            for mid, until in list(self._gave_way.items()):
                if until < now - DEFER_MAX:  # finished by a notice meanwhile
                    del self._gave_way[mid]
            for key, (_, until) in list(self._claims.items()):
                if until < now:
                    del self._claims[key]
        free = self.concurrency - len(self._in_flight)
        if free > 0:
            for item in self.queue.due(now, limit=free, exclude=self._in_flight):
                self._in_flight.add(item.message_id)
                nursery.start_soon(self._attempt, item)
        if len(self._in_flight) >= self.concurrency:
            timeout = math.inf  # a finishing attempt wakes us
        else:
            nxt = self.queue.next_due(now)
            timeout = math.inf if nxt is None else nxt - self.clock()
        return max(0.0, min(timeout, self.max_sleep, self._next_purge - self.clock()))

    async def _attempt(self, item: QueuedMessage) -> None:
        msg, mid = item.message, item.message_id
        try:
            if not await self._ours_to_deliver(item):
                return
            if self.gate is not None:  # over a cap the message waits queued, never dropped
                await self.gate()
            if not self._still_pending(mid):
                return
            failure: DeliveryFailure | None = None
            try:
                await self.dispatcher.deliver(msg)
            except DeliveryFailure as e:
                failure = e
            except Exception as e:
                log.exception("exit: delivery handler crashed for %s", msg.dest.kind)
                failure = TemporaryFailure("internal_error", type(e).__name__)
            # no checkpoint from here to the queue update: a finished attempt is recorded
            try:
                if failure is None:
                    self.queue.mark_delivered(mid, self.clock())
                    outcome = None
                else:
                    outcome = self.queue.mark_failed(
                        mid, self.clock(), temporary=failure.temporary, reason=str(failure)
                    )
            except (sqlite3.Error, LocalError):
                log.exception("exit: cannot record the outcome of a delivery attempt")
                return
            if outcome is None:
                self._event("delivered", msg, attempts=item.attempts + 1)
                if self.ack_when == "delivered":
                    await self._send(msg.reply_block, Ack.make(mid, AckStatus.DELIVERED))
            elif outcome.gave_up:
                log.info("exit: gave up on a %s message: %s", msg.dest.kind, outcome.reason)
                self._event("gave_up", msg, attempts=outcome.attempts, reason=outcome.reason)
                if self.ack_when == "delivered":
                    ack = Ack.make(mid, AckStatus.REJECTED, outcome.reason)
                    await self._send(msg.reply_block, ack)
            else:
                self._event(
                    "retry",
                    msg,
                    attempts=outcome.attempts,
                    reason=outcome.reason,
                    retry_at=outcome.retry_at,
                )
        finally:
            self._in_flight.discard(mid)
            self.wake()

    async def _ours_to_deliver(self, item: QueuedMessage) -> bool:
        """Ask other exits before delivering a message that waited here (we were
        paused or cut off, or its destination was down) or that other exits had
        before us: it may be delivered or held elsewhere."""
        msg, mid = item.message, item.message_id
        now = self.clock()
        key = notice_key(mid)
        claim = self._claims.get(key)
        earlier = msg.earlier
        if claim is not None and claim[1] >= now:
            earlier = tuple(dict.fromkeys((*earlier, claim[0])))
        if self.check_delivered is None or (
            not earlier and now - item.accepted_at < self.late_after
        ):
            return True
        self._gave_way.pop(mid, None)
        self._asking.add(mid)
        try:
            answer = await self.check_delivered([key], earlier)
        except Exception:
            log.exception("exit: asking about earlier deliveries failed")
            answer = Answer()
        finally:
            self._asking.discard(mid)
        log.info(
            "exit: asked other exits about %s (%d earlier): %s",
            mid.hex()[:8],
            len(earlier),
            "delivered" if key in answer.delivered else "held" if key in answer.holding else "-",
        )
        try:
            if key in answer.delivered:
                self.queue.note_delivered_elsewhere([key], self.clock())
            elif key in answer.holding or mid in self._gave_way:
                now = self.clock()
                until = now + min(DEFER_MAX, max(DEFER_MIN, (now - item.accepted_at) / 2))
                self._gave_way[mid] = until
                self.queue.postpone(mid, until)
                log.info("exit: another exit holds a message; waiting for its notice")
                self._event("deferred", msg, retry_at=until)
                return False
            else:
                return True
        except (sqlite3.Error, LocalError):
            log.exception("exit: cannot record what another exit answered")
            return True
        log.info("exit: a waiting message was already delivered by another exit")
        self._event("duplicate", msg, reason=ELSEWHERE)
        if self.ack_when == "delivered":
            await self._send(msg.reply_block, Ack.make(mid, AckStatus.DELIVERED, ELSEWHERE))
        return False

    def _still_pending(self, mid: bytes) -> bool:
        """A notice (or an answer) may have finished the message while we waited
        for our turn or asked: then another exit delivered it and we must not."""
        try:
            known = self.queue.lookup(mid)
        except (sqlite3.Error, LocalError):
            log.exception("exit: cannot read the delivery queue")
            return True
        if known is None or known[0] is MessageState.PENDING:
            return True
        log.info("exit: %s was finished elsewhere while waiting to be delivered", mid.hex()[:8])
        return False

    def answer(self, keys: Iterable[bytes], asker: bytes | None, asker_first: bool) -> Answer:
        """Another exit (raw id ``asker``) asks about these notice keys: it holds
        those messages and is about to deliver them. ``asker_first``: its id sorts
        before ours, so it goes first when we are both asking. A key we know
        nothing of is remembered for ``CLAIM_TTL`` s: if the message reaches us
        later (an earlier attempt the overlay delayed), we ask the asker first
        (``asker`` None: an asker that is no exit, whose claim we would not trust).
        See the module docstring."""
        keys = tuple(dict.fromkeys(bytes(k) for k in keys))
        delivered = self.queue.delivered_among(keys)
        pending = self.queue.pending_among(k for k in keys if k not in delivered)
        until = self.clock() + CLAIM_TTL
        for key in keys if asker is not None else ():
            if key not in delivered and key not in pending:
                self._claims[key] = (bytes(asker), until)
                self._claims.move_to_end(key)
        while len(self._claims) > MAX_CLAIMS:
            self._claims.popitem(last=False)
        holding = set()
        for key, mid in pending.items():
            if mid in self._gave_way:
                continue
            if mid in self._asking and asker_first:
                self._gave_way[mid] = self.clock() + DEFER_MIN
                continue
            holding.add(key)
        return Answer(
            tuple(k for k in keys if k in delivered), tuple(k for k in keys if k in holding)
        )

    # -- helpers --------------------------------------------------------------------

    async def _send(self, reply_block: bytes | None, ack: Ack) -> None:
        if reply_block is None or self.send_ack is None:
            return
        try:
            await self.send_ack(reply_block, ack)
        except Exception:
            log.exception("exit: sending an ack failed")

    def _event(self, kind: EventKind, msg: ExitMessage, **kw) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(DeliveryEvent(kind, msg.message_id, msg.destination, **kw))
        except Exception:
            log.exception("exit: on_event hook failed")
