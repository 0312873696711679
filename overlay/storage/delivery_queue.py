"""The exit's persisted, de-duplicating delivery queue (SQLite, WAL). No trio here.

One row per message id::

    message_id BLOB PK | state 0 pending / 1 delivered / 2 failed | raw (encoded
    ExitMessage; NULL once finished) | accepted_at | attempts | next_at |
    finished_at | reason | notice_key (indexed; added to older files on open) |
    committing_at (added to older files on open)

Invariants:
- ``accept`` commits (``synchronous=FULL``) before it returns: an accepted
  message survives a crash or restart of the exit;
- a message id is accepted at most once: while it is pending, and for
  ``retention`` seconds after it was delivered or given up, ``accept``
  reports it as a duplicate and changes nothing except (pending only) the
  stored reply block, which the newest copy replaces;
- ``mark_delivered`` / ``mark_failed`` change only pending rows, so an id is
  marked delivered at most once; a finished row keeps no body or reply block;
- retries back off exponentially: the n-th failure schedules the next attempt
  ``min(max_delay, base_delay * factor**(n-1)) * U(1 - jitter, 1 + jitter)``
  later (``rng`` injectable); a permanent failure, ``max_attempts`` failures,
  or an age of ``max_age`` gives up;
- times are wall-clock seconds (``time.time()``), passed in by the caller,
  because they are persisted across restarts;
- a stored row that no longer decodes (a tampered file) is given up as
  ``corrupt``, never delivered;
- a notice key another exit announced (``note_delivered_elsewhere``, table
  ``elsewhere``, kept ``retention`` seconds) makes ``accept`` answer
  ``delivered`` (reason ``delivered_elsewhere``) without storing the message,
  and finishes a pending copy we hold, so it is not delivered twice; the
  table also holds the keys of our own deliveries, so ``delivered_among``
  answers an exit that asks about both; ``pending_among`` tells which asked
  keys we hold, and ``postpone`` moves a pending message's next attempt
  without counting an attempt (we wait for the exit that holds it too);
- ``committing`` records (fsynced) that an attempt is about to hand the
  destination the last piece it needs to take the message (the SMTP final
  dot): from then on the destination may have it whatever happens to us.
  ``mark_failed`` clears the mark; a pending row that still carries it when
  the exit starts again (``interrupted``) is never attempted again:
  ``finish_interrupted`` finishes it as delivered with reason
  ``INTERRUPTED`` (docs/protocol.md, "the end-of-data window").
"""

from __future__ import annotations

import enum
import random
import sqlite3
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DecodeError, LocalError
from ..wire.delivered import notice_key
from ..wire.delivery import MESSAGE_ID_SIZE, ExitMessage, decode
from .sqlite import SqliteStore

DAY = 86400.0
ELSEWHERE = "delivered_elsewhere"
# the exit stopped after handing the destination the whole message, before its answer
INTERRUPTED = "interrupted_after_data"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    message_id  BLOB PRIMARY KEY,
    state       INTEGER NOT NULL,
    raw         BLOB,
    accepted_at REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL,
    finished_at REAL,
    reason      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_at);
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries(state, finished_at);
CREATE TABLE IF NOT EXISTS elsewhere (
    notice_key  BLOB PRIMARY KEY,
    noted_at    REAL NOT NULL
);
"""
_NOTICE_INDEX = "CREATE INDEX IF NOT EXISTS deliveries_notice ON deliveries(notice_key)"


class MessageState(enum.IntEnum):
    PENDING = 0
    DELIVERED = 1
    FAILED = 2  # given up (permanent failure, too many attempts, too old, corrupt)


class QueueFull(LocalError):
    """``max_pending`` messages are waiting: the exit takes no new ones for now."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_delay: float = 5.0
    factor: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.25
    max_attempts: int = 30
    max_age: float = 3 * DAY

    def __post_init__(self) -> None:
        if self.base_delay <= 0 or self.factor < 1 or self.max_delay < self.base_delay:
            raise ValueError("need base_delay > 0, factor >= 1, max_delay >= base_delay")
        if not 0 <= self.jitter < 1 or self.max_attempts < 1 or self.max_age <= 0:
            raise ValueError("need 0 <= jitter < 1, max_attempts >= 1, max_age > 0")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (``failures`` >= 1)."""
        exp = min(max(failures - 1, 0), 1000)
        base = min(self.max_delay, self.base_delay * self.factor**exp)
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True, slots=True)
class AcceptResult:
    """``duplicate`` is False when this call stored the message (it is ``PENDING``)."""

    duplicate: bool
    state: MessageState
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return not self.duplicate


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    message: ExitMessage
    attempts: int
    accepted_at: float
    next_at: float
    last_reason: str

    @property
    def message_id(self) -> bytes:
        return self.message.message_id


@dataclass(frozen=True, slots=True)
class FailOutcome:
    """Result of ``mark_failed``: ``retry_at`` is None when the queue gave up."""

    attempts: int
    retry_at: float | None
    reason: str

    @property
    def gave_up(self) -> bool:
        return self.retry_at is None


class DeliveryQueue(SqliteStore):
    """Durable queue of messages an exit has accepted, keyed by message id."""

    WHAT = "delivery queue"
    SCHEMA = _SCHEMA
    SYNCHRONOUS = "FULL"

    def __init__(
        self,
        path: str | Path,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        retention: float = 7 * DAY,
        max_pending: int = 4096,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()
        if retention < self.retry.max_age:
            raise LocalError("retention must be at least the retry policy's max_age")
        self.retention = retention
        self.max_pending = max_pending
        super().__init__(path, text_factory=lambda b: b.decode("utf-8", "replace"))

    def _migrate(self) -> None:
        """Files written before the ``notice_key`` column get it, filled in."""
        cols = self._columns("deliveries")
        if "notice_key" not in cols:
            self._db.execute("ALTER TABLE deliveries ADD COLUMN notice_key BLOB")
            rows = self._db.execute("SELECT message_id FROM deliveries").fetchall()
            self._db.executemany(
                "UPDATE deliveries SET notice_key = ? WHERE message_id = ?",
                [(notice_key(bytes(m)), m) for (m,) in rows],
            )
        self._db.execute(_NOTICE_INDEX)
        if "committing_at" not in cols:
            self._db.execute("ALTER TABLE deliveries ADD COLUMN committing_at REAL")

    # -- accepting --------------------------------------------------------------------

    def accept(self, msg: ExitMessage, now: float) -> AcceptResult:
        """Store ``msg`` durably unless its id is known; raise ``QueueFull`` if full."""
        if not isinstance(msg, ExitMessage) or len(msg.message_id) != MESSAGE_ID_SIZE:
            raise LocalError("accept needs an ExitMessage")
        raw = msg.encode()
        return self._tx(self._accept, msg, raw, float(now))

    def _accept(self, cur: sqlite3.Cursor, msg: ExitMessage, raw: bytes, now: float):
        row = cur.execute(
            "SELECT state, raw, reason FROM deliveries WHERE message_id = ?", (msg.message_id,)
        ).fetchone()
        if (
            row is None
            and cur.execute(
                "SELECT 1 FROM elsewhere WHERE notice_key = ?", (notice_key(msg.message_id),)
            ).fetchone()
        ):
            return AcceptResult(True, MessageState.DELIVERED, ELSEWHERE)
        if row is not None:
            state = _state(row[0])
            if state is MessageState.PENDING and msg.reply_block and row[1] is not None:
                try:
                    old = decode(bytes(row[1]))
                except DecodeError:
                    old = None
                if old is not None and old.reply_block != msg.reply_block:
                    new_raw = replace(old, reply_block=msg.reply_block).encode()
                    cur.execute(
                        "UPDATE deliveries SET raw = ? WHERE message_id = ?",
                        (new_raw, msg.message_id),
                    )
            return AcceptResult(True, state, row[2] or "")
        (pending,) = cur.execute("SELECT COUNT(*) FROM deliveries WHERE state = 0").fetchone()
        if pending >= self.max_pending:
            raise QueueFull(f"{pending} messages pending")
        cur.execute(
            "INSERT INTO deliveries"
            " (message_id, state, raw, accepted_at, attempts, next_at, notice_key)"
            " VALUES (?, 0, ?, ?, 0, ?, ?)",
            (msg.message_id, raw, now, now, notice_key(msg.message_id)),
        )
        return AcceptResult(False, MessageState.PENDING)

    def lookup(self, message_id: bytes) -> tuple[MessageState, str] | None:
        """``(state, reason)`` of a known id, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, reason FROM deliveries WHERE message_id = ?", (bytes(message_id),)
            ).fetchone()
        return None if row is None else (_state(row[0]), row[1] or "")

    # -- scheduling -----------------------------------------------------------------

    def due(
        self, now: float, limit: int = 64, exclude: Collection[bytes] = ()
    ) -> list[QueuedMessage]:
        """Pending messages whose next attempt is at or before ``now``, soonest first.

        Ids in ``exclude`` (e.g. attempts in flight) are skipped; at most
        ``limit`` are returned. Rows that no longer decode are given up here.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT message_id, raw, attempts, accepted_at, next_at, reason FROM deliveries"
                " WHERE state = 0 AND next_at <= ? ORDER BY next_at, accepted_at LIMIT ?",
                (float(now), limit + len(exclude)),
            ).fetchall()
        out = self._decoded([r for r in rows if bytes(r[0]) not in exclude], now)
        return out[:limit]

    def _decoded(self, rows, now: float) -> list[QueuedMessage]:
        out: list[QueuedMessage] = []
        for mid, raw, attempts, accepted_at, next_at, reason in rows:
            mid = bytes(mid)
            try:
                msg = decode(bytes(raw or b""))
                if msg.message_id != mid:
                    raise DecodeError(detail="id mismatch")
            except DecodeError:
                self._finish(mid, MessageState.FAILED, now, "corrupt: stored message unreadable")
                continue
            out.append(QueuedMessage(msg, attempts, accepted_at, next_at, reason or ""))
        return out

    def next_due(self, after: float) -> float | None:
        """The earliest scheduled attempt strictly after ``after``, or None."""
        with self._lock:
            (t,) = self._db.execute(
                "SELECT MIN(next_at) FROM deliveries WHERE state = 0 AND next_at > ?",
                (float(after),),
            ).fetchone()
        return t

    def mark_delivered(self, message_id: bytes, now: float, reason: str = "") -> bool:
        """Record a delivery. False if the id was not pending (nothing changes)."""
        return self._finish(bytes(message_id), MessageState.DELIVERED, now, reason[:200])

    def mark_failed(
        self, message_id: bytes, now: float, *, temporary: bool, reason: str
    ) -> FailOutcome:
        """Record a failed attempt; schedule a retry or give up. ``LocalError`` if not pending."""
        mid = bytes(message_id)
        reason = reason[:200]
        return self._tx(self._mark_failed, mid, float(now), temporary, reason)

    def _mark_failed(self, cur, mid: bytes, now: float, temporary: bool, reason: str):
        row = cur.execute(
            "SELECT attempts, accepted_at FROM deliveries WHERE message_id = ? AND state = 0",
            (mid,),
        ).fetchone()
        if row is None:
            raise LocalError("mark_failed: message is not pending")
        attempts = row[0] + 1
        too_old = now - row[1] >= self.retry.max_age
        if not temporary or attempts >= self.retry.max_attempts or too_old:
            if temporary:
                why = "too many attempts" if attempts >= self.retry.max_attempts else "too old"
                reason = f"{reason} (gave up: {why})"[:200]
            cur.execute(
                "UPDATE deliveries SET state = 2, raw = NULL, attempts = ?, next_at = NULL,"
                " finished_at = ?, reason = ? WHERE message_id = ?",
                (attempts, now, reason, mid),
            )
            return FailOutcome(attempts, None, reason)
        retry_at = now + self.retry.delay(attempts, self.rng)
        cur.execute(
            "UPDATE deliveries SET attempts = ?, next_at = ?, reason = ?, committing_at = NULL"
            " WHERE message_id = ?",
            (attempts, retry_at, reason, mid),
        )
        return FailOutcome(attempts, retry_at, reason)

    def _finish(self, mid: bytes, state: MessageState, now: float, reason: str) -> bool:
        return self._tx(self._finish_tx, mid, state, float(now), reason)

    def _finish_tx(self, cur, mid: bytes, state: MessageState, now: float, reason: str) -> bool:
        cur.execute(
            "UPDATE deliveries SET state = ?, raw = NULL, next_at = NULL, finished_at = ?,"
            " attempts = attempts + 1, reason = ? WHERE message_id = ? AND state = 0",
            (int(state), now, reason, mid),
        )
        if cur.rowcount != 1:
            return False
        if state is MessageState.DELIVERED:  # so we can tell others who ask (delivered_among)
            cur.execute(
                "INSERT OR IGNORE INTO elsewhere (notice_key, noted_at) VALUES (?, ?)",
                (notice_key(mid), now),
            )
        return True

    def committing(self, message_id: bytes, now: float) -> bool:
        """Record (durably) that the destination is about to be handed the whole
        message (see the module docstring). False if the id is not pending."""

        def tx(cur):
            cur.execute(
                "UPDATE deliveries SET committing_at = ? WHERE message_id = ? AND state = 0",
                (float(now), bytes(message_id)),
            )
            return cur.rowcount == 1

        return self._tx(tx)

    def interrupted(self) -> list[QueuedMessage]:
        """Pending messages whose last attempt stopped after ``committing`` (a crash).
        Rows that no longer decode are given up, as in ``due``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT message_id, raw, attempts, accepted_at, next_at, reason FROM deliveries"
                " WHERE state = 0 AND committing_at IS NOT NULL"
            ).fetchall()
        return self._decoded(rows, 0.0)

    def finish_interrupted(self, message_id: bytes, now: float) -> bool:
        """Finish an ``interrupted`` message as delivered (reason ``INTERRUPTED``):
        the destination may have it, so this exit never hands it over again."""
        return self._finish(bytes(message_id), MessageState.DELIVERED, now, INTERRUPTED)

    def delivered_among(self, keys: Iterable[bytes]) -> set[bytes]:
        """Which of these notice keys we know as delivered (by us or, from a notice,
        by another exit)."""
        rows = self._rows_for_keys("SELECT notice_key FROM elsewhere WHERE", keys)
        return {bytes(r[0]) for r in rows}

    def pending_among(self, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """Of these notice keys, those of messages we hold pending: key -> message id."""
        rows = self._rows_for_keys(
            "SELECT notice_key, message_id FROM deliveries WHERE state = 0 AND", keys
        )
        return {bytes(k): bytes(m) for k, m in rows}

    def _rows_for_keys(self, select: str, keys: Iterable[bytes]) -> list[tuple]:
        """``select`` (ending in WHERE or AND) ``notice_key IN (...)`` for up to 256
        distinct ``keys``."""
        keys = list(dict.fromkeys(bytes(k) for k in keys))[:256]
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        with self._lock:
            return self._db.execute(f"{select} notice_key IN ({marks})", keys).fetchall()  # noqa: S608

    def postpone(self, message_id: bytes, until: float) -> bool:
        """Move a pending message's next attempt to ``until`` (no attempt counted)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE deliveries SET next_at = ? WHERE message_id = ? AND state = 0",
                (float(until), bytes(message_id)),
            )
            return cur.rowcount == 1

    def note_delivered_elsewhere(self, keys: Iterable[bytes], now: float) -> int:
        """Another exit announced these notice keys as delivered: remember them (so a
        resent copy is answered ``delivered``, not delivered again) and finish our
        own pending copies of those messages. Returns how many pending copies were
        finished."""
        keys = {bytes(k) for k in keys}
        return self._tx(self._note_elsewhere, keys, float(now)) if keys else 0

    def _note_elsewhere(self, cur: sqlite3.Cursor, keys: set[bytes], now: float) -> int:
        cur.executemany(
            "INSERT OR IGNORE INTO elsewhere (notice_key, noted_at) VALUES (?, ?)",
            [(k, now) for k in keys],
        )
        cur.executemany(
            "UPDATE deliveries SET state = 1, raw = NULL, next_at = NULL, finished_at = ?,"
            " reason = ? WHERE notice_key = ? AND state = 0",
            [(now, ELSEWHERE, k) for k in keys],
        )
        return cur.rowcount

    # -- housekeeping -----------------------------------------------------------------

    def purge(self, now: float) -> int:
        """Forget finished ids older than ``retention``. Returns how many were dropped."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM deliveries WHERE state != 0 AND finished_at < ?",
                (float(now) - self.retention,),
            )
            self._db.execute(
                "DELETE FROM elsewhere WHERE noted_at < ?", (float(now) - self.retention,)
            )
            return cur.rowcount

    def counts(self) -> dict[str, int]:
        """Number of known ids per state name (``pending``, ``delivered``, ``failed``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM deliveries GROUP BY state"
            ).fetchall()
        out = {s.name.lower(): 0 for s in MessageState}
        for st, n in rows:
            if st in (0, 1, 2):
                out[MessageState(st).name.lower()] = n
        return out


def _state(v: object) -> MessageState:
    return MessageState(v) if v in (0, 1, 2) else MessageState.FAILED
