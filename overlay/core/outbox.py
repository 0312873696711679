"""Sans-I/O client outbox: what to (re)send, when, and through which exit.

A message stays in the outbox until an exit's final acknowledgement arrives.
Every message carries two reply blocks (``overlay.wire.relay``): the exit
answers ``queued`` as soon as it has durably accepted the message and
``delivered`` (or ``rejected``) when it is done with it.

States::

    PENDING --queued ack--> QUEUED --delivered ack--> DELIVERED
       |  ^                    |
       |  +--queued exit gone--+          (rejected, permanent) --> FAILED
       +--delivered ack--> DELIVERED      (too old)              --> FAILED

Resend policy (the caller runs ``tick`` and executes the ``Attempt``s):
- PENDING: an attempt that gets no ack within its timeout
  (``rto * backoff**(n-1)``, at most ``max_timeout``; ``rto`` is ``timeout``
  or, once first acks have been seen, ``srtt + 4 * rttvar`` if larger, as
  TCP does, sampled only from messages acked after one attempt) is resent through
  a different path (the relays of unanswered attempts are avoided), to the
  same exit for up to ``same_exit_attempts`` consecutive attempts, then to a
  different exit; at once to a different exit if the exit left the live
  membership (even while an attempt through it is still in flight) or
  rejected the message with a retryable reason (``not_exit``, ``queue_full``,
  and ``policy_denied``: another exit's policy may allow the destination;
  when none is left the caller gives up with ``give_up``). The same message
  id is always reused, so an exit that got an earlier copy de-duplicates it
  (and answers again).
- QUEUED: never resent to another exit while the exit that queued it is
  live: a second exit would deliver it a second time. If that exit leaves
  the live membership (tombstone, expiry, or a DEAD hint) the message is at
  risk and goes back to PENDING, avoiding that exit. Every
  ``queued_refresh`` seconds it is resubmitted to the same exit (a duplicate
  there), which refreshes the reply block the exit will use for the final
  ack and confirms that the exit still holds it.
- Poisson mixing: an attempt's timeout runs from the moment its chosen hold
  times have passed (``sent(..., held=)``), never counting them as loss.
- Nodes of a timed-out attempt are *suspects* for ``suspect_for`` seconds:
  path selection avoids them for every message, so a dead exit or relay
  costs one timeout, not one per message.

Invariants: no I/O, no clock (``now`` is passed in), no randomness; every
state change is reported as a ``Persist`` carrying a copy of the entry, so
the caller can write it through before acting; a finished entry never
changes again; acks for unknown or finished messages are ignored.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from ..crypto import NodeId
from ..errors import LocalError
from ..wire.delivery import AckStatus

DAY = 86400.0
RETRYABLE_REJECTS = frozenset({"not_exit", "queue_full", "policy_denied"})
# rejections that depend on the exit's policy: with no other exit left, final
ELSEWHERE_OR_FAIL = frozenset({"policy_denied"})
MAX_AVOID = 16


class State(enum.IntEnum):
    PENDING = 0  # no exit has taken responsibility yet
    QUEUED = 1  # an exit holds it durably; waiting for "delivered"
    DELIVERED = 2
    FAILED = 3

    @property
    def finished(self) -> bool:
        return self >= State.DELIVERED


@dataclass(slots=True)
class Entry:
    message_id: bytes
    destination: str
    body: bytes
    created_at: float
    state: State = State.PENDING
    attempts: int = 0  # packets sent for this message
    next_at: float = 0.0  # next decision time (send, timeout or refresh)
    in_flight: bool = False  # an attempt was sent and its timeout has not passed
    exit: NodeId | None = None  # exit of the latest attempt
    exit_attempts: int = 0  # PENDING: unanswered attempts through ``exit``; QUEUED: refreshes
    queued_at: NodeId | None = None  # the exit that acknowledged "queued"
    exits_failed: tuple[NodeId, ...] = ()  # exits we moved away from (avoided; see sent())
    last_path: tuple[NodeId, ...] = ()
    avoid: tuple[NodeId, ...] = ()  # relays of unanswered attempts
    reason: str = ""
    updated_at: float = 0.0
    finished_at: float | None = None

    def copy(self) -> Entry:
        return dataclasses.replace(self)


@dataclass(frozen=True, slots=True)
class Attempt:
    """Send ``message_id`` now. ``exit_hint``: use this exit if it still qualifies."""

    message_id: bytes
    exit_hint: NodeId | None
    avoid: frozenset[NodeId]  # prefer paths without these nodes (exits and relays)
    refresh: bool = False  # a QUEUED message's periodic resubmission to its exit


@dataclass(frozen=True, slots=True)
class Persist:
    """Write ``entry`` through. ``durable``: must survive a power cut (a new message)."""

    entry: Entry
    durable: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    message_id: bytes
    state: State
    reason: str


Decision = Attempt | Persist | Finished


def reason_code(reason: str) -> str:
    """``"queue_full"`` from ``"queue_full: 4096 messages pending"``."""
    return reason.partition(":")[0].strip()


class Outbox:
    """The outbox state machine. ``entries`` maps message id to ``Entry``."""

    def __init__(
        self,
        *,
        timeout: float = 3.0,
        backoff: float = 1.5,
        max_timeout: float = 30.0,
        same_exit_attempts: int = 3,
        retry_soon: float = 1.0,
        queued_refresh: float = 10.0,
        queued_refresh_max: float = 600.0,
        suspect_for: float = 60.0,
        max_age: float = 7 * DAY,
    ) -> None:
        if timeout <= 0 or backoff < 1 or max_timeout < timeout or same_exit_attempts < 1:
            raise LocalError("need timeout > 0, backoff >= 1, max_timeout >= timeout")
        self.timeout = timeout
        self.backoff = backoff
        self.max_timeout = max_timeout
        self.same_exit_attempts = same_exit_attempts
        self.retry_soon = retry_soon
        self.queued_refresh = queued_refresh
        self.queued_refresh_max = queued_refresh_max
        self.suspect_for = suspect_for
        self.max_age = max_age
        self.entries: dict[bytes, Entry] = {}
        self.suspects: dict[NodeId, float] = {}  # node -> suspected until
        self.srtt: float | None = None  # smoothed first-ack round trip (RFC 6298 style)
        self.rttvar = 0.0
        self._sent_at: dict[bytes, float] = {}

    # ---- queries ----------------------------------------------------------------

    def get(self, message_id: bytes) -> Entry | None:
        return self.entries.get(message_id)

    def unfinished(self) -> list[Entry]:
        return [e for e in self.entries.values() if not e.state.finished]

    def rto(self) -> float:
        """The first-attempt timeout: ``timeout``, or more when acks have been slower."""
        if self.srtt is None:
            return self.timeout
        return min(self.max_timeout, max(self.timeout, self.srtt + 4 * self.rttvar))

    def timeout_for(self, attempt: int) -> float:
        return min(self.max_timeout, self.rto() * self.backoff ** max(0, attempt - 1))

    def _sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def refresh_after(self, refreshes: int) -> float:
        return min(self.queued_refresh_max, self.queued_refresh * 2 ** min(refreshes, 30))

    def next_deadline(self) -> float | None:
        times = [e.next_at for e in self.entries.values() if not e.state.finished]
        return min(times) if times else None

    def avoid_now(self, now: float) -> frozenset[NodeId]:
        for n in [n for n, until in self.suspects.items() if until <= now]:
            del self.suspects[n]
        return frozenset(self.suspects)

    # ---- inputs -----------------------------------------------------------------

    def load(self, entries: Iterable[Entry]) -> None:
        """Restore entries (from the store). An attempt in flight before a restart times out."""
        for e in entries:
            self.entries[e.message_id] = e

    def add(self, message_id: bytes, destination: str, body: bytes, now: float) -> list[Decision]:
        if message_id in self.entries:
            raise LocalError("message id already in the outbox")
        e = Entry(bytes(message_id), destination, bytes(body), now, next_at=now, updated_at=now)
        self.entries[e.message_id] = e
        return [Persist(e.copy(), durable=True), *self._due(e, now, None)]

    def tick(self, now: float, live: Collection[NodeId] | None = None) -> list[Decision]:
        """Timeouts, resends, refreshes. ``live``: node ids in the live membership (None: unknown)."""
        out: list[Decision] = []
        for e in list(self.entries.values()):
            if e.state.finished:
                continue
            if now - e.created_at > self.max_age:
                out += self._finish(e, State.FAILED, "expired", now)
                continue
            if e.state is State.QUEUED:
                if live is not None and e.queued_at is not None and e.queued_at not in live:
                    gone = e.queued_at
                    e.state = State.PENDING
                    e.queued_at = None
                    e.in_flight = False
                    e.exit_attempts = 0
                    e.exits_failed = _add(e.exits_failed, gone)
                    e.reason = "queued exit left the membership"
                    e.next_at = now
                    e.updated_at = now
                    out.append(Persist(e.copy()))
                elif now >= e.next_at:
                    e.exit_attempts += 1
                    e.next_at = now + self.refresh_after(e.exit_attempts)
                    e.updated_at = now
                    out.append(Persist(e.copy()))
                    out.append(
                        Attempt(e.message_id, e.queued_at, self.avoid_now(now), refresh=True)
                    )
                    continue
                else:
                    continue
            if e.in_flight and live is not None and e.exit is not None and e.exit not in live:
                e.next_at = now  # its exit is gone: the attempt is lost, resend at once
            out += self._due(e, now, live)
        return out

    def due_now(self, now: float) -> None:
        """Make every unfinished message due at the next ``tick`` (``overlay outbox
        --flush``): a queued one is resubmitted to its exit (which answers with the
        final ack if it is done), a waiting pending one is sent. Attempts in flight
        keep their timeout."""
        for e in self.entries.values():
            if e.state is State.QUEUED or (e.state is State.PENDING and not e.in_flight):
                e.next_at = min(e.next_at, now)

    def give_up(self, message_id: bytes, reason: str, now: float) -> list[Decision]:
        """The caller found no exit left to try (e.g. every exit's policy refused the
        destination): the message fails with ``reason``."""
        e = self.entries.get(message_id)
        if e is None or e.state.finished:
            return []
        return self._finish(e, State.FAILED, reason, now)

    def retry_waiting(self, now: float) -> None:
        """The membership changed (e.g. a new exit appeared): messages waiting after
        a failed send (no path, no entry connection) are due now, not after
        ``retry_soon``. Messages in flight or queued are not touched."""
        for e in self.entries.values():
            if e.state is State.PENDING and not e.in_flight and e.next_at > now:
                e.next_at = now

    def sent(
        self,
        message_id: bytes,
        path: Sequence[NodeId],
        exit: NodeId,
        now: float,
        held: float = 0.0,
    ) -> list[Decision]:
        """The caller sent an attempt through ``path`` (first hop first) to ``exit``.

        ``held``: seconds the hops were asked to hold the packet and its ack in
        all (Poisson mixing: the forward delays plus those of the ack's return
        path). The attempt's timeout starts after them, so a packet a relay
        holds for its delay is not taken for lost, and round-trip samples
        exclude them.
        """
        e = self.entries.get(message_id)
        if e is None or e.state.finished:
            return []
        e.attempts += 1
        e.last_path = tuple(path)
        e.updated_at = now
        if e.state is State.QUEUED:  # a refresh; its deadline was set in tick
            return [Persist(e.copy())]
        if exit == e.exit:
            e.exit_attempts += 1
        else:
            if e.exit is not None:  # left behind (it may still hold a copy): the new
                e.exits_failed = _add(e.exits_failed, e.exit)  # exit is told to ask it
            e.exit, e.exit_attempts = exit, 1
        held = max(0.0, held)
        if e.attempts == 1:  # Karn: sample only unambiguous round trips
            self._sent_at[e.message_id] = now + held
        else:
            self._sent_at.pop(e.message_id, None)
        e.in_flight = True
        e.next_at = now + held + self.timeout_for(e.attempts)
        return [Persist(e.copy())]

    def send_failed(self, message_id: bytes, reason: str, now: float) -> list[Decision]:
        """The caller could not send (no path, no entry connection): try again soon."""
        e = self.entries.get(message_id)
        if e is None or e.state.finished:
            return []
        e.reason = reason
        e.updated_at = now
        if e.state is State.PENDING:
            e.in_flight = False
            e.next_at = now + self.retry_soon
        return [Persist(e.copy())]

    def on_ack(
        self,
        message_id: bytes,
        status: AckStatus,
        reason: str,
        exit: NodeId | None,
        now: float,
    ) -> list[Decision]:
        """An ack opened from one of the message's reply blocks (``exit``: who it came from)."""
        e = self.entries.get(message_id)
        if e is None or e.state.finished:
            return []
        if exit is not None:
            self.suspects.pop(exit, None)
        sent_at = self._sent_at.pop(message_id, None)
        if sent_at is not None and e.state is State.PENDING and status is not AckStatus.REJECTED:
            self._sample(max(0.0, now - sent_at))
        exit = exit or e.exit
        if status is AckStatus.DELIVERED:
            return self._finish(e, State.DELIVERED, reason or "delivered", now)
        if status is AckStatus.QUEUED:
            if e.state is State.PENDING:
                e.state = State.QUEUED
                e.exit_attempts = 0
                e.next_at = now + self.refresh_after(0)
            e.queued_at = exit
            e.in_flight = False
            e.reason = "queued"
            e.updated_at = now
            return [Persist(e.copy())]
        # rejected
        if reason_code(reason) in RETRYABLE_REJECTS:
            e.state = State.PENDING
            e.queued_at = None
            e.in_flight = False
            e.exit_attempts = 0
            if exit is not None:
                e.exits_failed = _add(e.exits_failed, exit)
            e.reason = reason
            e.next_at = now
            e.updated_at = now
            return [Persist(e.copy())]
        return self._finish(e, State.FAILED, reason or "rejected", now)

    # ---- internals --------------------------------------------------------------

    def _due(self, e: Entry, now: float, live: Collection[NodeId] | None) -> list[Decision]:
        if now < e.next_at:
            return []
        if e.in_flight:  # the attempt timed out
            e.in_flight = False
            until = now + self.suspect_for
            for n in e.last_path[1:]:  # not the entry: it is where we send everything
                self.suspects[n] = until
            e.avoid = (*[n for n in e.avoid if n not in e.last_path], *e.last_path[1:-1])[
                -MAX_AVOID:
            ]
            e.reason = "no ack"
            if e.exit is not None and e.exit_attempts >= self.same_exit_attempts:
                e.exits_failed = _add(e.exits_failed, e.exit)
                e.exit, e.exit_attempts = None, 0
        hint = e.exit
        if hint is not None and (hint in e.exits_failed or (live is not None and hint not in live)):
            e.exits_failed = _add(e.exits_failed, hint)
            e.exit, e.exit_attempts, hint = None, 0, None
        e.next_at = now + self.timeout_for(e.attempts + 1)  # until sent() sets the real one
        e.updated_at = now
        avoid = self.avoid_now(now) | frozenset(e.avoid) | frozenset(e.exits_failed)
        if hint is not None:
            avoid -= {hint}
        return [Persist(e.copy()), Attempt(e.message_id, hint, avoid)]

    def _finish(self, e: Entry, state: State, reason: str, now: float) -> list[Decision]:
        self._sent_at.pop(e.message_id, None)
        e.state = state
        e.reason = reason
        e.in_flight = False
        e.finished_at = now
        e.updated_at = now
        return [Persist(e.copy()), Finished(e.message_id, state, reason)]


def _add(items: tuple[NodeId, ...], node: NodeId) -> tuple[NodeId, ...]:
    return items if node in items else (*items, node)[-MAX_AVOID:]
