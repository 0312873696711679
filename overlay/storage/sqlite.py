"""The SQLite file every store opens the same way.

A store is one SQLite file in WAL mode, opened for use from several threads
(one connection behind a lock) and in autocommit mode, so each write is its
own transaction or an explicit ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``_tx``).
Opening creates the schema and runs the store's migrations; any SQLite (or
file system) error on the way is a ``LocalError`` naming the file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from ..errors import LocalError


class SqliteStore:
    """Base of the SQLite stores: open, migrate, lock, transactions, close.

    Subclasses set ``WHAT`` (named in errors), ``SCHEMA`` (run on open),
    ``SYNCHRONOUS`` (``NORMAL``: a committed write survives a crash of the
    process; ``FULL``: also a power cut), and override ``_migrate`` to bring
    older files up to date. ``private`` files are created mode 0600 (with
    their directory) before SQLite opens them.
    """

    WHAT = "store"
    SCHEMA = ""
    SYNCHRONOUS = "NORMAL"

    def __init__(
        self,
        path: str | Path,
        *,
        private: bool = False,
        text_factory: Callable[[bytes], Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            if private:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if not self.path.exists():
                    os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(
                str(self.path), timeout=10.0, check_same_thread=False, isolation_level=None
            )
            if text_factory is not None:
                self._db.text_factory = text_factory
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={self.SYNCHRONOUS}")
            self._db.executescript(self.SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as e:
            raise LocalError(f"cannot open {self.WHAT} {self.path}: {e}") from e

    def _migrate(self) -> None:
        """Bring a file written by an older version up to date (runs on every open)."""

    def _columns(self, table: str) -> set[str]:
        """Column names of ``table`` (as ``str`` whatever the text factory)."""
        rows = self._db.execute(f"PRAGMA table_info({table})").fetchall()
        return {r[1].decode() if isinstance(r[1], bytes) else r[1] for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self, fn: Callable[..., Any], *args: Any, durable: bool = False) -> Any:
        """Run ``fn(cursor, *args)`` in one committed transaction (rolled back if
        it raises); SQLite errors become ``LocalError``. ``durable``: fsync the
        commit (``synchronous=FULL`` for this transaction)."""
        with self._lock:
            try:
                if durable and self.SYNCHRONOUS != "FULL":
                    self._db.execute("PRAGMA synchronous=FULL")
                cur = self._db.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(cur, *args)
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
                return out
            except sqlite3.Error as e:
                raise LocalError(f"{self.WHAT} {self.path.name}: {e}") from e
            finally:
                if durable and self.SYNCHRONOUS != "FULL":
                    self._db.execute(f"PRAGMA synchronous={self.SYNCHRONOUS}")
