"""The node home directory: keys, config, record store, sequence state.

Layout::

    HOME/config.toml        settings (see config.py)
    HOME/node.key           Ed25519 seed, 32 bytes, mode 0600
    HOME/onion/<epoch>.key  X25519 secrets, 32 bytes each, mode 0600
    HOME/state.json         last published seq
    HOME/records.db         SQLite record store
    HOME/control.json       URL of the running node's control endpoint
    HOME/node.lock          held (flock) by the one process using the home; its PID
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import config as config_mod
from .crypto import OnionKey, SigningKey
from .errors import ConfigError, LocalError
from .records import Role, ValidRecord, make_record, make_tombstone


def default_home() -> Path:
    env = os.environ.get("HYDRA_HOME")
    return Path(env) if env else Path.home() / ".hydra"


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` (the file never exists with wider mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine (read locally, no traffic sent)."""
    try:
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out)


def feeds_from_listen(listen: list[str]) -> list[str]:
    """Announceable feeds for listen addresses: wildcard hosts become real addresses."""
    out: list[str] = []
    for addr in listen:
        if addr.startswith("/ip4/0.0.0.0/"):
            rest = addr[len("/ip4/0.0.0.0") :]
            hosts = local_addresses() or ["127.0.0.1"]
            out.extend(f"/ip4/{h}{rest}" for h in hosts)
        else:
            out.append(addr)
    seen: dict[str, None] = {}
    for a in out:
        if not re.search(r"/(tcp|udp)/0(/|$)", a):
            seen.setdefault(a, None)
    return list(seen)[:8]


class HomeLocked(LocalError):
    """Another process holds the home's lock (another node runs from it)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"{path} is in use by {holder} (another `overlay run`?); stop it first,"
            " or use another --home"
        )


class HomeLock:
    """An exclusive ``flock`` on ``HOME/node.lock``, held until ``release()``.

    The lock is tied to the open file, so it is released however the process
    ends; the file itself stays and only names the last holder's PID.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LocalError(f"cannot lock {self.path}: {e.strerror}") from None
            try:
                pid = int(self.path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            raise HomeLocked(self.path.parent, pid or None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the file releases the flock


@dataclass
class Home:
    path: Path
    _lock: HomeLock | None = field(default=None, init=False, repr=False, compare=False)
    _lock_depth: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def key_path(self) -> Path:
        return self.path / "node.key"

    @property
    def onion_dir(self) -> Path:
        return self.path / "onion"

    @property
    def db_path(self) -> Path:
        return self.path / "records.db"

    @property
    def control_path(self) -> Path:
        return self.path / "control.json"

    @property
    def lock_path(self) -> Path:
        return self.path / "node.lock"

    def exists(self) -> bool:
        return self.key_path.exists()

    @contextmanager
    def locked(self) -> Iterator[Home]:
        """Hold the home's exclusive lock (re-entrant on this ``Home`` object).

        Raises ``HomeLocked`` (naming the holder's PID) when another process,
        or another ``Home`` object, holds it. Take it before writing anything.
        """
        if self._lock is None:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = HomeLock(self.lock_path)
            lock.acquire()
            self._lock = lock
        self._lock_depth += 1
        try:
            yield self
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                lock, self._lock = self._lock, None
                lock.release()

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        roles: list[str],
        listen: list[str],
        exit_policy: list[str] | None = None,
        force: bool = False,
        extra: dict | None = None,
    ) -> Home:
        home = cls(Path(path))
        if home.exists() and not force:
            raise LocalError(f"{home.key_path} exists; use --force to replace this identity")
        cfg = config_mod.Config(roles=list(roles), listen=list(listen))
        if exit_policy is not None:
            cfg.exit_policy = list(exit_policy)
        elif cfg.role_flags & (Role.EXIT | Role.STANDBY_EXIT):
            cfg.exit_policy = ["maildir:*", "smtp:*"]
        for k, v in (extra or {}).items():
            setattr(cfg, k, v)
        cfg.validate()
        home.path.mkdir(parents=True, exist_ok=True)
        os.chmod(home.path, 0o700)
        write_atomic(home.key_path, SigningKey.generate().seed())
        if home.onion_dir.exists():
            for f in home.onion_dir.glob("*.key"):
                f.unlink()
        write_atomic(home.onion_dir / "0.key", OnionKey.generate(0).secret())
        write_atomic(home.path / "state.json", json.dumps({"seq": 0}).encode(), 0o644)
        if home.db_path.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(str(home.db_path) + suffix).unlink(missing_ok=True)
        write_atomic(home.config_path, config_mod.render(cfg).encode(), 0o644)
        # parse what we wrote, so a broken template fails here, not at `run`
        config_mod.load(home.config_path)
        return home

    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    def signing_key(self) -> SigningKey:
        try:
            return SigningKey(self.key_path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"no identity in {self.path}; run `overlay init`") from None

    def onion_keys(self) -> dict[int, OnionKey]:
        keys = {}
        for f in sorted(self.onion_dir.glob("*.key")):
            try:
                epoch = int(f.stem)
            except ValueError:
                continue
            keys[epoch] = OnionKey(f.read_bytes(), epoch)
        if not keys:
            raise ConfigError(f"no onion key in {self.onion_dir}; run `overlay init`")
        return keys

    def onion_key(self) -> OnionKey:
        keys = self.onion_keys()
        return keys[max(keys)]

    def rotate_onion_key(self, keep: int = 2) -> OnionKey:
        """Start a new epoch; keep the previous ``keep-1`` epochs for the overlap window."""
        keys = self.onion_keys()
        new = OnionKey.generate(max(keys) + 1)
        write_atomic(self.onion_dir / f"{new.epoch}.key", new.secret())
        for epoch in sorted(keys)[: max(0, len(keys) + 1 - keep)]:
            (self.onion_dir / f"{epoch}.key").unlink(missing_ok=True)
        return new

    def last_seq(self) -> int:
        try:
            return int(json.loads((self.path / "state.json").read_text())["seq"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def next_seq(self) -> int:
        """Reserve the next seq, persisted before use so a crash never reuses one."""
        seq = self.last_seq() + 1
        write_atomic(self.path / "state.json", json.dumps({"seq": seq}).encode(), 0o644)
        return seq

    def feeds(self, cfg: config_mod.Config | None = None) -> list[str]:
        cfg = cfg or self.config()
        return list(cfg.announce) or feeds_from_listen(cfg.listen)

    def make_record(
        self,
        *,
        now: float | None = None,
        feeds: list[str] | None = None,
        roles=None,
        cfg: config_mod.Config | None = None,
    ) -> ValidRecord:
        cfg = cfg or self.config()
        onion = self.onion_key()
        feeds = feeds if feeds is not None else self.feeds(cfg)
        if not feeds:
            raise ConfigError("no announceable feed: set [node] announce or a fixed listen port")
        roles = cfg.role_flags if roles is None else Role(roles)
        exitish = bool(roles & (Role.EXIT | Role.STANDBY_EXIT))
        return make_record(
            self.signing_key(),
            seq=self.next_seq(),
            now=time.time() if now is None else now,
            roles=roles,
            feeds=feeds,
            onion_key=onion.public,
            onion_epoch=onion.epoch,
            exit_policy=cfg.exit_policy if exitish else (),
            ttl=cfg.record_ttl,
        )

    def make_tombstone(self, now: float | None = None) -> ValidRecord:
        return make_tombstone(
            self.signing_key(), seq=self.next_seq(), now=time.time() if now is None else now
        )
