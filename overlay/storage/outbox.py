"""SQLite persistence of the client outbox (``HOME/outbox.db``, mode 0600).

Two tables::

    messages  one row per message: the ``overlay.core.outbox.Entry`` fields
              (node ids as 32-byte blobs, lists of them concatenated)
    surbs     surb_id PK | message_id | kind (0 final, 1 queued) | exit | entry
              | created_at | secret (``SurbSecret.to_bytes()``: secret material)

Invariants:
- every write commits before it returns (WAL); a new message is saved with
  ``synchronous=FULL`` (fsync: not lost even by a power cut), later updates
  and SURB secrets with ``NORMAL`` (not lost by a crash of the process; a
  SURB secret is stored before the packet carrying its SURB is sent);
- a finished row (delivered or failed) is never overwritten by an unfinished
  state (several client processes may share one outbox), and finishing a
  message erases its body and its SURB secrets;
- the file is created 0600 (it holds message bodies and SURB secrets).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.outbox import Entry, State
from ..crypto import NodeId
from .sqlite import SqliteStore

FILENAME = "outbox.db"
KIND_FINAL, KIND_QUEUED = 0, 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    message_id   BLOB PRIMARY KEY,
    destination  TEXT NOT NULL,
    body         BLOB,
    created_at   REAL NOT NULL,
    state        INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    next_at      REAL NOT NULL,
    in_flight    INTEGER NOT NULL,
    exit         BLOB,
    exit_attempts INTEGER NOT NULL,
    queued_at    BLOB,
    exits_failed BLOB NOT NULL,
    last_path    BLOB NOT NULL,
    avoid        BLOB NOT NULL,
    reason       TEXT NOT NULL,
    updated_at   REAL NOT NULL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS messages_state ON messages(state);
CREATE TABLE IF NOT EXISTS surbs (
    surb_id     BLOB PRIMARY KEY,
    message_id  BLOB NOT NULL,
    kind        INTEGER NOT NULL,
    exit        BLOB NOT NULL,
    entry       BLOB NOT NULL,
    created_at  REAL NOT NULL,
    secret      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS surbs_message ON surbs(message_id);
"""

_COLS = (
    "message_id, destination, body, created_at, state, attempts, next_at, in_flight, exit,"
    " exit_attempts, queued_at, exits_failed, last_path, avoid, reason, updated_at, finished_at"
)


@dataclass(frozen=True, slots=True)
class StoredSurb:
    surb_id: bytes
    message_id: bytes
    kind: int
    exit: NodeId
    entry: NodeId
    created_at: float
    secret: bytes


def _ids(nodes) -> bytes:
    return b"".join(bytes(n) for n in nodes)


def _unids(raw: bytes | None) -> tuple[NodeId, ...]:
    raw = bytes(raw or b"")
    return tuple(NodeId(raw[i : i + 32]) for i in range(0, len(raw) - len(raw) % 32, 32))


def _node(raw: bytes | None) -> NodeId | None:
    return NodeId(bytes(raw)) if raw else None


class OutboxStore(SqliteStore):
    WHAT = "outbox"
    SCHEMA = _SCHEMA

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, private=True)  # message bodies and SURB secrets

    @classmethod
    def in_home(cls, home: str | Path) -> OutboxStore:
        return cls(Path(home) / FILENAME)

    # ---- messages ----------------------------------------------------------------

    def save(self, e: Entry, *, durable: bool = False) -> None:
        """Insert or update one entry; finished rows never go back to unfinished.

        ``durable``: fsync before returning (a new message); other updates
        survive a crash of the process but may be lost with power (the
        worst case is one more resend).
        """
        row = (
            e.message_id,
            e.destination,
            None if e.state.finished else e.body,
            e.created_at,
            int(e.state),
            e.attempts,
            e.next_at,
            int(e.in_flight),
            bytes(e.exit) if e.exit else None,
            e.exit_attempts,
            bytes(e.queued_at) if e.queued_at else None,
            _ids(e.exits_failed),
            _ids(e.last_path),
            _ids(e.avoid),
            e.reason,
            e.updated_at,
            e.finished_at,
        )

        def tx(cur):
            cur.execute(
                f"INSERT INTO messages ({_COLS}) VALUES ({', '.join('?' * 17)})"
                " ON CONFLICT(message_id) DO UPDATE SET"
                " body=excluded.body, state=excluded.state, attempts=excluded.attempts,"
                " next_at=excluded.next_at, in_flight=excluded.in_flight, exit=excluded.exit,"
                " exit_attempts=excluded.exit_attempts, queued_at=excluded.queued_at,"
                " exits_failed=excluded.exits_failed, last_path=excluded.last_path,"
                " avoid=excluded.avoid, reason=excluded.reason, updated_at=excluded.updated_at,"
                " finished_at=excluded.finished_at"
                " WHERE messages.state < 2",
                row,
            )
            if e.state.finished:
                cur.execute("DELETE FROM surbs WHERE message_id = ?", (e.message_id,))

        self._tx(tx, durable=durable)

    def load(self, *, unfinished_only: bool = True) -> list[Entry]:
        q = f"SELECT {_COLS} FROM messages"
        if unfinished_only:
            q += " WHERE state < 2"
        with self._lock:
            rows = self._db.execute(q + " ORDER BY created_at").fetchall()
        return [self._entry(r) for r in rows]

    def get(self, message_id: bytes) -> Entry | None:
        with self._lock:
            r = self._db.execute(
                f"SELECT {_COLS} FROM messages WHERE message_id = ?", (bytes(message_id),)
            ).fetchone()
        return None if r is None else self._entry(r)

    @staticmethod
    def _entry(r) -> Entry:
        return Entry(
            message_id=bytes(r[0]),
            destination=r[1],
            body=bytes(r[2] or b""),
            created_at=r[3],
            state=State(r[4]),
            attempts=r[5],
            next_at=r[6],
            in_flight=bool(r[7]),
            exit=_node(r[8]),
            exit_attempts=r[9],
            queued_at=_node(r[10]),
            exits_failed=_unids(r[11]),
            last_path=_unids(r[12]),
            avoid=_unids(r[13]),
            reason=r[14],
            updated_at=r[15],
            finished_at=r[16],
        )

    def find(self, prefix: str) -> list[bytes]:
        """Message ids whose hex starts with ``prefix`` (any case)."""
        prefix = prefix.strip().lower()
        with self._lock:
            rows = self._db.execute("SELECT message_id FROM messages").fetchall()
        return [bytes(m) for (m,) in rows if bytes(m).hex().startswith(prefix)]

    def drop(self, message_id: bytes) -> bool:
        """Forget a message and its SURB secrets (the user gives up on it). A later
        ack for it is ignored. False if it was not in the outbox."""

        def tx(cur):
            cur.execute("DELETE FROM surbs WHERE message_id = ?", (bytes(message_id),))
            return cur.execute(
                "DELETE FROM messages WHERE message_id = ?", (bytes(message_id),)
            ).rowcount

        return self._tx(tx, durable=True) == 1

    def purge(self, before: float) -> int:
        """Forget finished messages that finished before ``before``."""

        def tx(cur):
            return cur.execute(
                "DELETE FROM messages WHERE state >= 2 AND finished_at < ?", (before,)
            ).rowcount

        return self._tx(tx)

    # ---- SURB secrets -------------------------------------------------------------

    def add_surbs(self, surbs: list[StoredSurb]) -> None:
        def tx(cur):
            cur.executemany(
                "INSERT OR REPLACE INTO surbs VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        s.surb_id,
                        s.message_id,
                        s.kind,
                        bytes(s.exit),
                        bytes(s.entry),
                        s.created_at,
                        s.secret,
                    )
                    for s in surbs
                ],
            )

        self._tx(tx)

    def surb(self, surb_id: bytes) -> StoredSurb | None:
        with self._lock:
            r = self._db.execute(
                "SELECT surb_id, message_id, kind, exit, entry, created_at, secret FROM surbs"
                " WHERE surb_id = ?",
                (bytes(surb_id),),
            ).fetchone()
        return None if r is None else _surb(r)

    def surbs_for_entry(self, entry: NodeId) -> list[StoredSurb]:
        with self._lock:
            rows = self._db.execute(
                "SELECT surb_id, message_id, kind, exit, entry, created_at, secret FROM surbs"
                " WHERE entry = ?",
                (bytes(entry),),
            ).fetchall()
        return [_surb(r) for r in rows]

    def drop_surb(self, surb_id: bytes) -> None:
        self._tx(lambda cur: cur.execute("DELETE FROM surbs WHERE surb_id = ?", (surb_id,)))

    def drop_surbs_before(self, before: float) -> int:
        return self._tx(
            lambda cur: cur.execute("DELETE FROM surbs WHERE created_at < ?", (before,)).rowcount
        )


def _surb(r) -> StoredSurb:
    return StoredSurb(
        bytes(r[0]), bytes(r[1]), r[2], NodeId(bytes(r[3])), NodeId(bytes(r[4])), r[5], bytes(r[6])
    )
