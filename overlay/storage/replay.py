"""The relay's replay tags, per onion-key epoch, in append-only files."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LocalError
from ..onion.params import TAG_SIZE


class ReplayStore:
    """Replay tags per onion-key epoch, persisted as append-only files ``DIR/<epoch>.tags``.

    Each file is a sequence of 16-byte tags; one ``os.write`` (``O_APPEND``)
    per batch of packets, before any of them is acted on. The data is in the
    kernel when ``add`` returns, so a crash of the process loses nothing; a
    power cut may lose the last writes (packets forwarded in the same
    instant). A torn final record is ignored on load. ~2 µs per batch,
    against ~25 µs for a SQLite commit.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self._fds: dict[int, int] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise LocalError(f"cannot create replay store {self.dir}: {e}") from e

    def _path(self, epoch: int) -> Path:
        return self.dir / f"{epoch}.tags"

    def tags(self, epoch: int) -> list[bytes]:
        try:
            raw = self._path(epoch).read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise LocalError(f"cannot read replay tags: {e}") from e
        n = len(raw) - len(raw) % TAG_SIZE
        return [raw[i : i + TAG_SIZE] for i in range(0, n, TAG_SIZE)]

    def epochs(self) -> list[int]:
        out = []
        for f in self.dir.glob("*.tags"):
            try:
                out.append(int(f.stem))
            except ValueError:
                continue
        return sorted(out)

    def add(self, pairs: list[tuple[int, bytes]]) -> None:
        by_epoch: dict[int, list[bytes]] = {}
        for epoch, tag in pairs:
            by_epoch.setdefault(epoch, []).append(tag)
        try:
            for epoch, tags in by_epoch.items():
                fd = self._fds.get(epoch)
                if fd is None:
                    fd = os.open(self._path(epoch), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    self._fds[epoch] = fd
                data = b"".join(tags)
                if os.write(fd, data) != len(data):
                    raise OSError("short write")
        except OSError as e:
            raise LocalError(f"replay store: {e}") from e

    def drop_epoch(self, epoch: int) -> None:
        fd = self._fds.pop(epoch, None)
        if fd is not None:
            os.close(fd)
        self._path(epoch).unlink(missing_ok=True)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
