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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

import trio

from ..errors import LocalError
from ..wire.delivered import notice_key
from ..wire.delivery import Ack, AckStatus, ExitMessage
from .handlers import DeliveryFailure, Dispatcher, PermanentFailure, TemporaryFailure
from .queue import ELSEWHERE, DeliveryQueue, MessageState, QueuedMessage, QueueFull

log = logging.getLogger("hydra.exits")

EventKind = Literal["accepted", "duplicate", "rejected", "delivered", "retry", "gave_up"]
SendAck = Callable[[bytes, Ack], Awaitable[None]]
CheckDelivered = Callable[[list[bytes]], Awaitable[set[bytes]]]


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
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if ack_when not in ("accepted", "delivered"):
            raise ValueError('ack_when must be "accepted" or "delivered"')
        self.queue = queue
        self.check_delivered = check_delivered
        self.late_after = late_after
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
            if await self._delivered_elsewhere(item):
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

    async def _delivered_elsewhere(self, item: QueuedMessage) -> bool:
        """A message that waited here (we were paused or cut off, or its destination
        was down) may have been resent to and delivered by another exit meanwhile,
        whose notice we missed: ask before delivering it ourselves."""
        if self.check_delivered is None or self.clock() - item.accepted_at < self.late_after:
            return False
        key = notice_key(item.message_id)
        try:
            known = await self.check_delivered([key])
        except Exception:
            log.exception("exit: asking about earlier deliveries failed")
            return False
        if key not in known:
            return False
        try:
            self.queue.note_delivered_elsewhere([key], self.clock())
        except (sqlite3.Error, LocalError):
            log.exception("exit: cannot record a delivery by another exit")
            return False
        log.info("exit: a waiting message was already delivered by another exit")
        self._event("duplicate", item.message, reason=ELSEWHERE)
        if self.ack_when == "delivered":
            await self._send(
                item.message.reply_block, Ack.make(item.message_id, AckStatus.DELIVERED, ELSEWHERE)
            )
        return True

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
