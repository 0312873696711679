"""SQLite persistence for membership records.

Invariants:
- only ``ValidRecord`` values are written (the type is checked), and a record
  replaces the stored one for its node only if its ``seq`` is strictly higher —
  enforced inside one SQL statement, so concurrent writers (threads, tasks or
  processes) cannot lower a node's ``seq``;
- records are re-validated when loaded, so a tampered file yields nothing invalid;
- tombstones are kept (they block older records) until they expire;
- each row carries its member's admission state (``first_seen``, and
  ``verified_at``: NULL while unverified, see ``overlay.core.admission``); a
  newer record of the same node keeps both. Files written before these columns
  existed are migrated in place on open (their rows load as unverified).
"""

from __future__ import annotations

from pathlib import Path

from ..crypto import NodeId
from ..errors import LocalError, RemoteError
from ..records import Role, ValidRecord, decode
from .sqlite import SqliteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    node_id    BLOB PRIMARY KEY,
    seq        INTEGER NOT NULL,
    tombstone  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    raw        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS record_roles (
    node_id BLOB NOT NULL,
    role    TEXT NOT NULL,
    PRIMARY KEY (node_id, role)
);
CREATE INDEX IF NOT EXISTS record_roles_by_role ON record_roles(role);
CREATE INDEX IF NOT EXISTS records_by_expiry ON records(expires_at);
"""

# admission state, added after the first release: migrated with ALTER TABLE
_COLUMNS = {"first_seen": "REAL", "verified_at": "REAL"}


def _seq_sql(seq: int) -> int:
    # SQLite integers are signed 64-bit: store uint64 shifted so ordering is preserved
    return seq - (1 << 63)


class RecordStore(SqliteStore):
    """The newest valid record per node, on disk."""

    WHAT = "record store"
    SCHEMA = _SCHEMA

    def __init__(self, path: str | Path) -> None:
        # a tampered text cell must not raise on read
        super().__init__(path, text_factory=bytes)

    def _migrate(self) -> None:
        have = self._columns("records")
        for name, kind in _COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE records ADD COLUMN {name} {kind}")

    def put(
        self, rec: ValidRecord, *, first_seen: float | None = None, verified_at: float | None = None
    ) -> bool:
        """Store ``rec`` if it beats the stored seq for its node. Returns True if stored.

        ``first_seen`` / ``verified_at`` are kept from the stored row when it has them.
        """
        if not isinstance(rec, ValidRecord):
            raise LocalError("only validated records may be stored")
        nid = bytes(rec.node_id)

        def tx(cur) -> bool:
            cur.execute(
                "INSERT INTO records(node_id, seq, tombstone, expires_at, raw, first_seen, "
                "verified_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET "
                "seq=excluded.seq, tombstone=excluded.tombstone, "
                "expires_at=excluded.expires_at, raw=excluded.raw, "
                "first_seen=COALESCE(records.first_seen, excluded.first_seen), "
                "verified_at=COALESCE(records.verified_at, excluded.verified_at) "
                "WHERE excluded.seq > records.seq",
                (
                    nid,
                    _seq_sql(rec.seq),
                    int(rec.is_tombstone),
                    rec.expires_at,
                    rec.encode(),
                    first_seen,
                    verified_at,
                ),
            )
            stored = cur.rowcount == 1
            if stored:
                cur.execute("DELETE FROM record_roles WHERE node_id=?", (nid,))
                cur.executemany(
                    "INSERT INTO record_roles(node_id, role) VALUES (?, ?)",
                    [(nid, name) for name in rec.roles.names()],
                )
            return stored

        return self._tx(tx)

    def _load(self, raw: bytes, now: float) -> ValidRecord | None:
        try:
            return decode(raw).verify().check_valid_at(now)
        except RemoteError:
            return None

    def get(self, node_id: NodeId, now: float) -> ValidRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT raw FROM records WHERE node_id=?", (bytes(node_id),)
            ).fetchone()
        return self._load(row[0], now) if row else None

    def all(self, now: float) -> list[ValidRecord]:
        """Every stored record (tombstones included) still valid at ``now``."""
        with self._lock:
            rows = self._db.execute("SELECT raw FROM records").fetchall()
        return [r for r in (self._load(raw, now) for (raw,) in rows) if r is not None]

    def members(self, now: float) -> list[tuple[ValidRecord, float | None, float | None]]:
        """Every stored record still valid at ``now`` with its ``(first_seen,
        verified_at)``: verified members first (oldest verification first), then
        the unverified ones newest first (the order in which to fill a bounded view)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT raw, first_seen, verified_at FROM records ORDER BY "
                "verified_at IS NULL, verified_at, first_seen IS NULL, first_seen DESC"
            ).fetchall()
        out = []
        for raw, first_seen, verified_at in rows:
            rec = self._load(raw, now)
            if rec is not None:
                out.append((rec, _real(first_seen), _real(verified_at)))
        return out

    def set_verified(self, node_id: NodeId, at: float) -> bool:
        """Mark a stored member verified (kept across restarts). True if a row changed."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE records SET verified_at=? WHERE node_id=? AND verified_at IS NULL",
                (float(at), bytes(node_id)),
            )
            return cur.rowcount == 1

    def delete(self, node_ids) -> int:
        """Remove these nodes' records (dropped or evicted by admission)."""
        ids = [(bytes(n),) for n in node_ids]
        if not ids:
            return 0

        def tx(cur) -> int:
            cur.executemany("DELETE FROM record_roles WHERE node_id=?", ids)
            cur.executemany("DELETE FROM records WHERE node_id=?", ids)
            return cur.rowcount

        return self._tx(tx)

    def count_unverified(self) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM records WHERE verified_at IS NULL"
            ).fetchone()[0]

    def by_role(self, role: Role, now: float) -> list[ValidRecord]:
        name = role.names()[0]
        with self._lock:
            rows = self._db.execute(
                "SELECT r.raw FROM records r JOIN record_roles x ON x.node_id = r.node_id "
                "WHERE x.role=? AND r.tombstone=0 AND r.expires_at > ?",
                (name, int(now)),
            ).fetchall()
        return [r for r in (self._load(raw, now) for (raw,) in rows) if r is not None]

    def digest(self) -> list[tuple[bytes, int]]:
        with self._lock:
            rows = self._db.execute("SELECT node_id, seq FROM records").fetchall()
        return [(nid, seq + (1 << 63)) for nid, seq in rows]

    def purge_expired(self, now: float) -> int:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            cur.execute(
                "DELETE FROM record_roles WHERE node_id IN "
                "(SELECT node_id FROM records WHERE expires_at <= ?)",
                (int(now),),
            )
            cur.execute("DELETE FROM records WHERE expires_at <= ?", (int(now),))
            n = cur.rowcount
            cur.execute("COMMIT")
        return n

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]


def _real(v) -> float | None:
    """A REAL cell as a float (``None`` for NULL or a tampered non-number)."""
    return float(v) if isinstance(v, int | float) else None
