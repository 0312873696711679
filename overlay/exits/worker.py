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
and when it arrives we ask the exit that asked.

Silence is never leave to deliver a *stale* message: one accepted before this
worker started (the saved queue of a restarted exit) or that waited here
``late_after`` seconds. Another exit may have been handed it meanwhile, and
only the exits that heard that exit's notice can tell; so such a message is
delivered only once some exit-capable peer answered, or when no other exit
could have had it (``Verdict.alone``: none is known that our failure detector
does not hold dead). Otherwise it is postponed and asked about again.
``check_delivered`` waits until the node has joined before asking, so a
restarted exit delivers nothing from its queue before that.

The end-of-data window: ``Dispatcher.deliver`` calls ``on_commit`` right
before the destination is handed the last piece it needs to take the message
(the SMTP final dot). The worker then records the attempt as committing
(``DeliveryQueue.committing``, fsynced) and, through ``mark_in_flight``, tells
other exits that the message is in flight here. A restarted exit finishes a
message it finds committing as delivered (``INTERRUPTED``) and never hands it
over again; a successor that finds an unfinished in-flight mark of an exit
that does not answer treats the message as delivered (``MAYBE_DELIVERED``):
see docs/protocol.md, "The end-of-data window".

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
from ..storage.delivery_queue import (
    ELSEWHERE,
    INTERRUPTED,
    DeliveryQueue,
    MessageState,
    QueuedMessage,
    QueueFull,
)
from ..wire.delivered import Answer, notice_key
from ..wire.delivery import Ack, AckStatus, ExitMessage
from .handlers import (
    DeliveryFailure,
    Dispatcher,
    EndOfData,
    PermanentFailure,
    TemporaryFailure,
)

log = logging.getLogger("hydra.exits")

EventKind = Literal[
    "accepted", "duplicate", "rejected", "delivered", "retry", "gave_up", "deferred"
]
SendAck = Callable[[bytes, Ack], Awaitable[None]]
DEFER_MIN, DEFER_MAX = 3.0, 60.0
CLAIM_TTL, MAX_CLAIMS = 120.0, 4096
MARK_TTL, MAX_MARKS = 6 * 3600.0, 4096
# an exit that does not answer died (or was cut off) with the message in its
# end-of-data window: the destination most likely has it
MAYBE_DELIVERED = "in_flight_at_silent_exit"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a question to other exits established (``DeliveryNotices.ask``).

    ``delivered``/``holding`` as in ``Answer``; ``in_flight``: keys an exit
    that had the message marked in flight (its end-of-data window) and that
    did not answer; ``answered``: exit-capable peers that answered at all;
    ``alone``: no other exit-capable member is known that our failure detector
    does not hold dead, so nobody is left who could have delivered it or know.
    """

    delivered: tuple[bytes, ...] = ()
    holding: tuple[bytes, ...] = ()
    in_flight: tuple[bytes, ...] = ()
    answered: int = 0
    alone: bool = False

    @classmethod
    def of(cls, answer: Answer | Verdict) -> Verdict:
        """A plain ``Answer`` counts as one exit's answer."""
        if isinstance(answer, Verdict):
            return answer
        return cls(tuple(answer.delivered), tuple(answer.holding), answered=1)


# (notice keys, raw ids of the exits that had the message before) -> their answer
CheckDelivered = Callable[[list[bytes], tuple[bytes, ...]], Awaitable[Answer | Verdict]]
# (notice key, raw ids of the exits the sender named, ended) -> None; tells other
# exits the message is in flight here (ended=False) or that the attempt ended
# without delivery (ended=True)
# (key, earlier exits, ended, then): ``then`` (or None) is called, synchronously,
# right after the mark is written
MarkInFlight = Callable[
    [bytes, tuple[bytes, ...], bool, Callable[[], None] | None], Awaitable[object]
]


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
        mark_in_flight: MarkInFlight | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if ack_when not in ("accepted", "delivered"):
            raise ValueError('ack_when must be "accepted" or "delivered"')
        self.queue = queue
        self.check_delivered = check_delivered
        self.late_after = late_after
        self.gate = gate  # awaited before each delivery: an operator's cap holds it there
        self.mark_in_flight = mark_in_flight
        self.started_at = math.inf  # set by run(): older messages come from the saved queue
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
        # notice keys another exit marked in flight (its end-of-data window) ->
        # (its raw id, until when); dropped when it ends the attempt or a notice comes
        self._marks: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
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
        self.started_at = self.clock()
        await self._finish_interrupted()
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
            for table in (self._claims, self._marks):
                for key, (_, until) in list(table.items()):
                    if until < now:
                        del table[key]
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
            committed = False
            began = self.clock()

            async def on_commit(end_of_data: EndOfData) -> None:
                nonlocal committed
                # asked before any mark goes out: an exit that dies while asking must
                # leave no in-flight mark behind (a successor would take the message
                # for delivered although its end of data was never sent)
                if self.clock() - began >= self.late_after:
                    await self._recheck(item)  # raises: no end of data, the attempt fails
                committed = True
                await self._committing(item, end_of_data)

            try:
                await self.dispatcher.deliver(msg, on_commit=on_commit)
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
            if committed and outcome is not None and self.mark_in_flight is not None:
                try:  # the attempt ended without a delivery: withdraw our in-flight mark
                    await self.mark_in_flight(notice_key(mid), msg.earlier, True, None)
                except Exception:
                    log.exception("exit: withdrawing an in-flight mark failed")
        finally:
            self._in_flight.discard(mid)
            self.wake()

    async def _committing(self, item: QueuedMessage, end_of_data: EndOfData) -> None:
        """The destination is about to be handed the whole message: record it, then
        tell other exits (see the module docstring; ``mark_in_flight`` bounds its
        own wait and calls ``end_of_data`` the moment its mark is written, so no
        other task runs between the two: an exit killed there would leave a mark
        for a message its destination never got). Errors are logged, never
        raised: the delivery goes on (without the mark a crash now may cost a
        second copy)."""
        mid = item.message_id
        try:
            self.queue.committing(mid, self.clock())
        except (sqlite3.Error, LocalError):
            log.exception("exit: cannot record a committing attempt")
        if self.mark_in_flight is None:
            end_of_data()
            return
        t0 = time.perf_counter()
        try:
            sent = await self.mark_in_flight(
                notice_key(mid), item.message.earlier, False, end_of_data
            )
        except Exception:
            log.exception("exit: marking a message in flight failed")
            return
        log.info(
            "exit: %s marked in flight at %s exit(s) in %.1f ms",
            mid.hex()[:8],
            sent,
            (time.perf_counter() - t0) * 1000,
        )

    async def _recheck(self, item: QueuedMessage) -> None:
        """The attempt took ``late_after`` s or more before its end of data (a slow
        server, or this exit was frozen or starved meanwhile): the sender may have
        resent the message through another exit since. Ask again; if another exit
        has delivered it or holds it, raise ``TemporaryFailure`` so the end of data
        is never sent (the server drops the transaction) and the message is asked
        about before its next attempt (it is stale by then)."""
        if self.check_delivered is None:
            return
        key = notice_key(item.message_id)
        try:
            verdict = Verdict.of(await self.check_delivered([key], item.message.earlier))
        except Exception:
            log.exception("exit: asking again before the end of data failed")
            return
        if key in verdict.delivered or key in verdict.holding or key in verdict.in_flight:
            log.info(
                "exit: %s is delivered or held elsewhere; end of data not sent",
                item.message_id.hex()[:8],
            )
            raise TemporaryFailure("superseded", "delivered or held by another exit")

    async def _finish_interrupted(self) -> None:
        """At start: messages whose attempt was stopped inside the end-of-data window
        (the destination may have them) are finished, never handed over again."""
        try:
            items = self.queue.interrupted()
        except (sqlite3.Error, LocalError):
            log.exception("exit: cannot read the delivery queue")
            return
        for item in items:
            mid, msg = item.message_id, item.message
            try:
                if not self.queue.finish_interrupted(mid, self.clock()):
                    continue
            except (sqlite3.Error, LocalError):
                log.exception("exit: cannot finish an interrupted delivery")
                continue
            log.warning(
                "exit: %s was handed to its destination when this exit stopped, before the"
                " destination answered; not delivering it again",
                mid.hex()[:8],
            )
            self._event("delivered", msg, attempts=item.attempts + 1, reason=INTERRUPTED)
            if self.ack_when == "delivered":
                await self._send(msg.reply_block, Ack.make(mid, AckStatus.DELIVERED, INTERRUPTED))

    def _stale(self, item: QueuedMessage, now: float) -> bool:
        """From the saved queue of a restart, or waited here ``late_after`` s."""
        return item.accepted_at < self.started_at or now - item.accepted_at >= self.late_after

    async def _ours_to_deliver(self, item: QueuedMessage) -> bool:
        """Ask other exits before delivering a message that waited here (we were
        restarted, paused or cut off, or its destination was down) or that other
        exits had before us: it may be delivered or held elsewhere. See the module
        docstring for when silence postpones it."""
        msg, mid = item.message, item.message_id
        now = self.clock()
        key = notice_key(mid)
        earlier = msg.earlier
        claim = self._claims.get(key)
        if claim is not None and claim[1] >= now:
            earlier = tuple(dict.fromkeys((*earlier, claim[0])))
        stale = self._stale(item, now)
        if self.check_delivered is None or (not earlier and not stale):
            return True
        self._gave_way.pop(mid, None)
        self._asking.add(mid)
        try:
            verdict = Verdict.of(await self.check_delivered([key], earlier))
        except Exception:
            log.exception("exit: asking about earlier deliveries failed")
            verdict = Verdict()
        finally:
            self._asking.discard(mid)
        silent = stale and not verdict.answered and not verdict.alone
        log.info(
            "exit: asked other exits about %s (%d earlier, %d answered): %s",
            mid.hex()[:8],
            len(earlier),
            verdict.answered,
            "delivered"
            if key in verdict.delivered
            else "held"
            if key in verdict.holding
            else "in flight at a silent exit"
            if key in verdict.in_flight
            else "nobody answered"
            if silent
            else "-",
        )
        try:
            if key in verdict.delivered:
                self.queue.note_delivered_elsewhere([key], self.clock())
                reason = ELSEWHERE
            elif key in verdict.in_flight:
                if not self.queue.mark_delivered(mid, self.clock(), MAYBE_DELIVERED):
                    return False
                reason = MAYBE_DELIVERED
            elif key in verdict.holding or mid in self._gave_way or silent:
                now = self.clock()
                until = now + min(DEFER_MAX, max(DEFER_MIN, (now - item.accepted_at) / 2))
                if not silent:
                    self._gave_way[mid] = until
                self.queue.postpone(mid, until)
                if silent:
                    log.info("exit: no other exit answered; asking again before delivering")
                else:
                    log.info("exit: another exit holds a message; waiting for its notice")
                self._event("deferred", msg, retry_at=until)
                return False
            else:
                return True
        except (sqlite3.Error, LocalError):
            log.exception("exit: cannot record what another exit answered")
            await trio.sleep(DEFER_MIN)  # the message stays pending and is asked about again
            return False
        if reason == ELSEWHERE:
            log.info("exit: a waiting message was already delivered by another exit")
        else:
            log.warning(
                "exit: %s was in flight at an exit that no longer answers (its mail server"
                " most likely has it); not delivering a second copy",
                mid.hex()[:8],
            )
        self._event("duplicate", msg, reason=reason)
        if self.ack_when == "delivered":
            await self._send(msg.reply_block, Ack.make(mid, AckStatus.DELIVERED, reason))
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
        marks = self.marks_among(k for k in keys if k not in delivered)
        return Answer(
            tuple(k for k in keys if k in delivered),
            tuple(k for k in keys if k in holding),
            tuple((k, m) for k, m in marks.items() if bytes(asker or b"") != m),
        )

    def note_mark(self, key: bytes, marker: bytes, ended: bool) -> None:
        """Exit ``marker`` (raw id) marked the message with notice key ``key`` in flight
        (its end-of-data window), or (``ended``) withdrew its mark."""
        key, marker = bytes(key), bytes(marker)
        if ended:
            if self._marks.get(key, (None,))[0] == marker:
                del self._marks[key]
            return
        self._marks[key] = (marker, self.clock() + MARK_TTL)
        self._marks.move_to_end(key)
        while len(self._marks) > MAX_MARKS:
            self._marks.popitem(last=False)

    def marks_among(self, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """Of these notice keys, those with an unfinished in-flight mark: key -> marker."""
        now = self.clock()
        out = {}
        for key in keys:
            entry = self._marks.get(bytes(key))
            if entry is not None and entry[1] >= now:
                out[bytes(key)] = entry[0]
        return out

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
