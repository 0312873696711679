"""Maildir delivery: write the body into a Maildir under the exit's configured root.

Invariants:
- the destination path (``maildir:PATH``; relative to the root, or absolute)
  must resolve, after following symlinks, to the root or a directory inside
  it; anything else is ``PermanentFailure("path_outside_root")`` and nothing
  is written;
- delivery is atomic (Maildir protocol): the body is written to
  ``tmp/UNIQUE`` (``O_EXCL``, mode 0600), fsynced, hard-linked into
  ``new/UNIQUE`` and removed from ``tmp/``; ``new/`` is fsynced. A reader
  never sees a partial file; the file holds exactly the body bytes;
- ``UNIQUE`` = ``SECONDS.M<usec>P<pid>Q<n>_<message id hex>.<host>``;
- a missing Maildir is created (``tmp``/``new``/``cur``, mode 0700) when
  ``create=True`` (default), otherwise it is ``PermanentFailure("no_such_maildir")``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import time
from pathlib import Path

import trio

from ..wire.delivery import ExitMessage
from .handlers import PermanentFailure, TemporaryFailure

_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP, errno.EISDIR}


class MaildirHandler:
    """Delivers ``maildir:`` destinations under ``root``."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True) -> None:
        self.root = Path(os.path.realpath(root))
        self.create = create
        host = socket.gethostname() or "localhost"
        self._host = host.replace("/", r"\057").replace(":", r"\072")
        self._counter = itertools.count()

    def resolve(self, path: str) -> Path:
        """The real directory for ``path``; ``PermanentFailure`` if it is outside the root."""
        p = Path(path)
        real = Path(os.path.realpath(p if p.is_absolute() else self.root / p))
        if real != self.root and not real.is_relative_to(self.root):
            raise PermanentFailure("path_outside_root", f"maildir:{path} is outside the root")
        return real

    async def deliver(self, msg: ExitMessage) -> None:
        dest = msg.dest
        if dest.kind != "maildir" or dest.path is None:
            raise PermanentFailure("wrong_handler", f"maildir handler got {dest.kind}")
        await trio.to_thread.run_sync(self._write, dest.path, msg)

    def _unique(self, msg: ExitMessage) -> str:
        now = time.time()
        sec, usec = int(now), int((now % 1) * 1e6)
        n = next(self._counter)
        return f"{sec}.M{usec}P{os.getpid()}Q{n}_{msg.id_hex}.{self._host}"

    def _write(self, path: str, msg: ExitMessage) -> None:
        try:
            md = self.resolve(path)
            if self.create:
                for sub in ("tmp", "new", "cur"):
                    (md / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
                md = self.resolve(path)  # re-check: nothing created may lead outside
            elif not all((md / sub).is_dir() for sub in ("tmp", "new", "cur")):
                raise PermanentFailure("no_such_maildir", f"maildir:{path}")
            name = self._unique(msg)
            tmp, new = md / "tmp" / name, md / "new" / name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                try:
                    view = memoryview(msg.body)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.link(tmp, new)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            err = errno.errorcode.get(e.errno or 0, "EIO")
            cls = PermanentFailure if e.errno in _PERMANENT_ERRNOS else TemporaryFailure
            raise cls("maildir_error", f"maildir:{path}: {err}") from None
        # delivered: the rest is tidying up and must not turn into a retry (a duplicate)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            dfd = os.open(md / "new", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
