"""The node home directory: keys, config, record store, sequence state.

Layout::

    HOME/config.toml        settings (see config.py)
    HOME/node.key           Ed25519 seed, 32 bytes, mode 0600
    HOME/onion/<epoch>.key  X25519 secrets of the accepted epochs, 32 bytes each, mode 0600
    HOME/onion/<epoch>.next the next epoch's secret, made ahead of its switch
    HOME/state.json         last published seq
    HOME/records.db         SQLite record store
    HOME/control.json       URL of the running node's control endpoint
    HOME/node.lock          held (flock) by the one process using the home; its PID
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import config as config_mod
from .crypto import OnionKey, SigningKey
from .errors import ConfigError, LocalError
from .onion.epochs import scheduled_epoch
from .records import EXIT_ROLES, Role, ValidRecord, make_record, make_tombstone
from .storage.files import write_atomic

log = logging.getLogger("hydra.home")

MAX_SEQ = 1 << 64  # record seqs are uint64
MAX_STATE_SIZE = 4096  # state.json is a few bytes; a larger file is corrupt


def time_floor(now: float | None = None) -> int:
    """The seq a node with lost state restarts from: unix time in milliseconds."""
    return int((time.time() if now is None else now) * 1000)


def default_home() -> Path:
    env = os.environ.get("HYDRA_HOME")
    return Path(env) if env else Path.home() / ".hydra"


def global_ipv4_addresses() -> list[str]:
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
            hosts = global_ipv4_addresses() or ["127.0.0.1"]
            out.extend(f"/ip4/{h}{rest}" for h in hosts)
        else:
            out.append(addr)
    seen: dict[str, None] = {}
    for a in out:
        if not re.search(r"/(tcp|udp)/0(/|$)", a):
            seen.setdefault(a, None)
    return list(seen)[:8]


def dialable(addrs: list[str], peer_id: str) -> list[str]:
    """Addresses others can dial, each ending in ``/p2p/<peer_id>``: wildcard listen
    addresses become one per interface address (``feeds_from_listen``), never
    ``0.0.0.0``; the IPv6 wildcard is left out (its interface addresses are
    announced as feeds)."""
    own = f"/p2p/{peer_id}"
    out: list[str] = []
    for a in addrs:
        base = a[: -len(own)] if a.endswith(own) else a
        if base.startswith("/ip4/0.0.0.0/"):
            out += feeds_from_listen([base])
        elif not base.startswith("/ip6/::/"):
            out.append(base)
    return list(dict.fromkeys(f"{b}{own}" for b in out))


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
        elif cfg.role_flags & EXIT_ROLES:
            cfg.exit_policy = ["maildir:*", "smtp:*"]
        for k, v in (extra or {}).items():
            setattr(cfg, k, v)
        cfg.validate()
        home.path.mkdir(parents=True, exist_ok=True)
        os.chmod(home.path, 0o700)
        write_atomic(home.key_path, SigningKey.generate().seed(), mode=0o600)
        if home.onion_dir.exists():
            for pattern in ("*.key", "*.next"):
                for f in home.onion_dir.glob(pattern):
                    f.unlink()
        epoch = scheduled_epoch(time.time(), cfg.onion_epoch_length)
        write_atomic(home.onion_dir / f"{epoch}.key", OnionKey.generate(epoch).secret(), mode=0o600)
        write_atomic(home.state_path, json.dumps({"seq": 0}).encode(), mode=0o644)
        if home.db_path.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(str(home.db_path) + suffix).unlink(missing_ok=True)
        write_atomic(home.config_path, config_mod.render(cfg).encode(), mode=0o644)
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

    def _onion_files(self, suffix: str) -> dict[int, Path]:
        out = {}
        for f in self.onion_dir.glob(f"*{suffix}"):
            try:
                epoch = int(f.name[: -len(suffix)])
            except ValueError:
                continue
            if epoch >= 0:
                out[epoch] = f
        return out

    def onion_keys(self) -> dict[int, OnionKey]:
        """The keys of every epoch still accepted (``onion/<epoch>.key``)."""
        keys = {}
        for epoch, f in sorted(self._onion_files(".key").items()):
            try:
                keys[epoch] = OnionKey(f.read_bytes(), epoch)
            except FileNotFoundError:
                continue  # erased meanwhile
            except OSError as e:
                raise LocalError(f"cannot read onion key {f}: {e}") from e
        if not keys:
            raise ConfigError(f"no onion key in {self.onion_dir}; run `overlay init`")
        return keys

    def onion_key(self) -> OnionKey:
        """The current key: the newest accepted epoch (the one the record announces)."""
        keys = self.onion_keys()
        return keys[max(keys)]

    def prepare_onion_key(self, epoch: int) -> OnionKey:
        """Make ``epoch``'s key ahead of its switch (``onion/<epoch>.next``); idempotent."""
        path = self.onion_dir / f"{epoch}.next"
        try:
            return OnionKey(path.read_bytes(), epoch)
        except (FileNotFoundError, LocalError):
            pass
        key = OnionKey.generate(epoch)
        write_atomic(path, key.secret(), mode=0o600)
        return key

    def activate_onion_key(self, epoch: int) -> OnionKey:
        """Switch to ``epoch``: its prepared key (or a fresh one) becomes ``<epoch>.key``.

        Prepared keys of epochs up to ``epoch`` are consumed or erased. Idempotent.
        """
        path = self.onion_dir / f"{epoch}.key"
        nxt = self.onion_dir / f"{epoch}.next"
        if not path.exists():
            try:
                key = OnionKey(nxt.read_bytes(), epoch)
                os.replace(nxt, path)
            except (FileNotFoundError, LocalError):
                key = OnionKey.generate(epoch)
                write_atomic(path, key.secret(), mode=0o600)
        for e, f in self._onion_files(".next").items():
            if e <= epoch:
                f.unlink(missing_ok=True)
        return OnionKey(path.read_bytes(), epoch)

    def drop_onion_key(self, epoch: int) -> None:
        """Erase ``epoch``'s private key: packets for that epoch can no longer be opened."""
        (self.onion_dir / f"{epoch}.key").unlink(missing_ok=True)

    def rotate_onion_key(self, keep: int = 2) -> OnionKey:
        """Start the epoch after the newest one now; keep the newest ``keep`` keys."""
        keys = self.onion_keys()
        new = self.activate_onion_key(max(keys) + 1)
        for epoch in sorted(keys)[: max(0, len(keys) + 1 - keep)]:
            self.drop_onion_key(epoch)
        return new

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    def _read_state(self) -> int | None:
        """The stored last seq, or None when the state file is missing or unreadable."""
        try:
            with open(self.state_path, "rb") as f:
                data = f.read(MAX_STATE_SIZE + 1)
            state = json.loads(data) if len(data) <= MAX_STATE_SIZE else None
        except (OSError, ValueError, RecursionError):  # ValueError: bad JSON, non-UTF-8 bytes
            return None
        seq = state.get("seq") if isinstance(state, dict) else None
        if type(seq) is not int or not 0 <= seq < MAX_SEQ:
            return None
        return seq

    def last_seq(self) -> int:
        """The last seq this home reserved (0 when the state file is missing or corrupt)."""
        seq = self._read_state()
        return 0 if seq is None else seq

    def next_seq(self, above: int = 0) -> int:
        """Reserve a seq higher than any this identity has used, and than ``above``.

        The seq is persisted before use, so a crash never reuses one. Normally it is
        the stored seq + 1. When ``state.json`` is missing or corrupt, the stored
        value is unknown: the seq restarts from a time floor (unix time in
        milliseconds), which is above every seq published earlier (seqs grow by one
        per record, at most a few a second, from a smaller floor), so the node's
        next records are not rejected as stale. Callers pass in ``above`` the
        highest seq of ours they hold (the record store, records seen in the
        overlay), which covers a state file rolled back with a clock gone backwards.
        """
        stored = self._read_state()
        if stored is None:
            why = "missing" if not self.state_path.exists() else "corrupt"
            stored = time_floor()
            log.warning(
                "%s is %s; record seq restarts above the time floor %d (file rewritten)",
                self.state_path,
                why,
                stored,
            )
        seq = max(stored, above) + 1
        if seq >= MAX_SEQ:
            raise LocalError(f"record seq exhausted in {self.state_path}")
        try:
            write_atomic(self.state_path, json.dumps({"seq": seq}).encode(), mode=0o644)
        except OSError as e:
            raise LocalError(f"cannot write {self.state_path}: {e.strerror or e}") from None
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
        above: int = 0,
    ) -> ValidRecord:
        """Sign a new record of this node with a fresh seq (higher than ``above``)."""
        cfg = cfg or self.config()
        onion = self.onion_key()
        feeds = feeds if feeds is not None else self.feeds(cfg)
        if not feeds:
            raise ConfigError("no announceable feed: set [node] announce or a fixed listen port")
        roles = cfg.role_flags if roles is None else Role(roles)
        exitish = bool(roles & EXIT_ROLES)
        return make_record(
            self.signing_key(),
            seq=self.next_seq(above),
            now=time.time() if now is None else now,
            roles=roles,
            feeds=feeds,
            onion_key=onion.public,
            onion_epoch=onion.epoch,
            exit_policy=cfg.advertised_policy() if exitish else (),
            ttl=cfg.record_ttl,
        )

    def make_tombstone(self, now: float | None = None, above: int = 0) -> ValidRecord:
        return make_tombstone(
            self.signing_key(), seq=self.next_seq(above), now=time.time() if now is None else now
        )
