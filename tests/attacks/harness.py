"""Attack harness: an honest overlay of real node processes, an attacker, and the checks.

The honest side is three ``overlay run`` processes started through the CLI, each
in its own process group and home, listening on 127.0.0.1 (free ports):

- ``relay``   entry + relay, started first (everybody joins through it);
- ``exit``    exit + relay;
- ``standby`` standby-exit + relay.

With ``target_live_exits = 2`` (the default here) the standby promotes itself
and serves as the second exit: the configuration in which a flood of fake exits
can make it step back. With 1 it stands by, ready to take over.

Everything about the honest nodes is read from outside, as an operator would:
their control endpoints (``/status`` and ``/exits``, what ``overlay status
--json`` and ``overlay exits --json`` print, fetched with the token from the
home the way the CLI does), ``overlay status`` itself as a subprocess once per
node and check, the node logs, ``/proc`` (RSS, CPU time, TCP connections).
Waits poll (cheap HTTP requests, not a CLI process of ~1.5 s CPU each) rather
than sleep a fixed time. A fourth honest node, the *probe*, is started (and
restarted) through the CLI to publish a new record; the time until every honest
node holds it is the honest-gossip check.

The attacker is a py-libp2p identity (``Libp2pHost``) dialling from one of
127.0.0.2..127.0.0.11 (Linux routes all of 127/8 to loopback). It forges fresh
self-signed records cheaply (keys derived from a seed), pushes them as an
anti-entropy initiator or through gossip, and writes arbitrary bytes on any
Hydra stream protocol. Records point their feeds at a ``FeedSink``, a plain TCP
listener on 127.0.0.12 that counts the dials honest nodes make to an address the
attacker chose (reflection).

``check_held`` runs every post-attack check and returns a report with the
numbers; a test asserts that its list of failures is empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import trio

from overlay.control import control_get
from overlay.crypto import OnionKey, SigningKey
from overlay.devtools.cluster import with_parent_death_signal
from overlay.errors import LocalError
from overlay.net import framing
from overlay.net.host import Libp2pHost
from overlay.records import (
    MAX_LIFETIME,
    Kind,
    Role,
    UnverifiedRecord,
)
from overlay.records import validate as validate_record
from overlay.wire import sync

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

ATTACKER_IPS = [f"127.0.0.{i}" for i in range(2, 12)]
SINK_IP = "127.0.0.12"

RECORDS_TOPIC = "hydra/records/1"
SYNC_PROTOCOL = "/hydra/sync/1.0.0"
RELAY_PROTOCOL = "/hydra/relay/1.0.0"
CLIENT_PROTOCOL = "/hydra/client/1.0.0"
DELIVERED_PROTOCOL = "/hydra/delivered/1.0.0"
LIVENESS_PROTOCOL = "/hydra/liveness/1"
LIVENESS_TOPIC = "hydra/liveness"
DELIVERED_TOPIC = "hydra/delivered/1"
PROTOCOLS = (
    SYNC_PROTOCOL,
    RELAY_PROTOCOL,
    CLIENT_PROTOCOL,
    DELIVERED_PROTOCOL,
    LIVENESS_PROTOCOL,
)
EXIT_POLICY = ("maildir:*", "smtp:*")

# ---- bounds used by the checks (generous: a busy 2-core machine) --------------------
#: an honest record must reach every honest node within this many seconds
GOSSIP_BOUND = 60.0
#: RSS after the attack may exceed the pre-attack level by at most this fraction
RSS_TOLERANCE = 0.20
#: how long memory may take to come back after the attack
RSS_WAIT = 120.0
#: dials all honest nodes together may make to the attacker-chosen feed address
#: during one test (a node may check a bounded few new members; 965 dials in 80 s
#: is what an unbounded node does with 5,000 records)
DIAL_BUDGET = 100
#: how long ``start`` waits for the honest overlay to form
START_TIMEOUT = 240.0


# ---- processes: CLI, /proc ------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def overlay_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "overlay", *args]


async def cli(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``overlay ARGS`` to completion; (returncode, stdout, stderr); rc -1 on timeout."""
    with trio.move_on_after(timeout):
        r = await trio.run_process(
            overlay_cmd(*args),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
            env=_env(),
        )
        return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return -1, "", f"overlay {' '.join(args)} did not finish in {timeout:g} s"


async def cli_json(*args: str, timeout: float = 60.0) -> dict | None:
    rc, out, _ = await cli(*args, "--json", timeout=timeout)
    if rc != 0:
        return None
    try:
        value = json.loads(out)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    with suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(target[8:-1])
    return out


def tcp_connections(pid: int) -> int:
    """Established TCP connections (IPv4 and IPv6) held by ``pid``."""
    inodes = _socket_inodes(pid)
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "01" and cols[9] in inodes:
                    n += 1
    return n


def set_config(home: Path, section: str, key: str, value) -> None:
    """Set ``[section] key = value`` in the config.toml ``overlay init`` wrote."""
    path = home / "config.toml"
    lines = path.read_text().splitlines()
    current = None
    rendered = json.dumps(value)  # numbers, strings and lists of them are valid TOML so
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            current = s[1:-1]
            continue
        if current == section and re.match(rf"#?\s*{re.escape(key)}\s*=", s):
            lines[i] = f"{key} = {rendered}"
            break
    else:
        raise ValueError(f"no [{section}] {key} in {path}")
    path.write_text("\n".join(lines) + "\n")


# ---- honest nodes -----------------------------------------------------------------------


@dataclass
class HonestNode:
    """One ``overlay run`` process with its own home, log and process group."""

    name: str
    home: Path
    roles: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    peer_id: str = ""
    addr: str = ""  # first listen address, with /p2p/

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def short(self) -> str:
        return self.peer_id[-8:]

    async def init(self, settings: dict) -> None:
        args = ["init", "--home", str(self.home), "--listen", "/ip4/127.0.0.1/tcp/0", "--force"]
        for r in self.roles:
            args += ["--role", r]
        if {"exit", "standby-exit"} & set(self.roles):
            for p in EXIT_POLICY:
                args += ["--policy", p]
        rc, out, err = await cli(*args)
        if rc != 0:
            raise RuntimeError(f"overlay init {self.name} failed: {out}{err}")
        for (section, key), value in settings.items():
            set_config(self.home, section, key, value)
        self.peer_id = SigningKey((self.home / "node.key").read_bytes()).node_id.peer_id()

    def spawn(self, join: Sequence[str] = ()) -> None:
        (self.home / "control.json").unlink(missing_ok=True)
        args = overlay_cmd("run", "--home", str(self.home))
        for a in join:
            args += ["--join", a]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                # a killed test run must not leave its nodes running
                with_parent_death_signal(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
                env=_env(),
            )

    async def wait_started(self, joining: bool, timeout: float) -> None:
        with trio.fail_after(timeout):
            while True:
                if not self.alive:
                    raise RuntimeError(f"{self.name} exited; see {self.log_path}")
                if (self.home / "control.json").exists():
                    st = await self.status(timeout=5.0)
                    if st and st.get("listen") and (not joining or st.get("joined_via")):
                        self.addr = st["listen"][0]
                        return
                await trio.sleep(0.2)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the node's process group (no wait)."""
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # anything the node started in its group goes too
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def _get(self, route: str, timeout: float) -> dict | None:
        """GET ``route`` of the node's control endpoint (token from the home, as the
        CLI does); None if it does not answer within ``timeout``."""
        with trio.move_on_after(timeout + 1):
            try:
                value = await trio.to_thread.run_sync(
                    lambda: control_get(self.home, route, timeout=timeout), abandon_on_cancel=True
                )
            except LocalError:
                return None
            return value if isinstance(value, dict) else None
        return None

    async def status(self, timeout: float = 60.0) -> dict | None:
        """What ``overlay status --json`` prints (but ``addresses``)."""
        return await self._get("/status", timeout)

    async def exits(self, timeout: float = 60.0) -> dict | None:
        """What ``overlay exits --json`` prints."""
        return await self._get("/exits", timeout)

    async def status_cli(self, timeout: float = 60.0) -> dict | None:
        """``overlay status --json`` run as a subprocess, as an operator would."""
        return await cli_json("status", "--home", str(self.home), timeout=timeout)

    def seq_on_disk(self) -> int:
        try:
            return int(json.loads((self.home / "state.json").read_text())["seq"])
        except (OSError, ValueError, KeyError):
            return 0

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def rss_kb(self) -> int | None:
        return rss_kb(self.pid) if self.alive else None

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid) if self.alive else None

    def tcp_connections(self) -> int | None:
        return tcp_connections(self.pid) if self.alive else None


def find_entry(exits: dict | None, peer_id: str) -> dict | None:
    """The entry for ``peer_id`` in ``overlay exits --json`` (exits or standby list)."""
    if not exits:
        return None
    for x in [*exits.get("exits", []), *exits.get("standby", [])]:
        if x.get("peer_id") == peer_id:
            return x
    return None


class HonestOverlay:
    """Three honest node processes (relay, exit, standby) and an optional probe.

    ``async with HonestOverlay(root) as ov:`` starts them and waits until they
    form the overlay (every node knows both exits and none is held dead); every
    process is stopped (its process group killed) on exit.
    """

    def __init__(
        self,
        root: Path,
        *,
        target_live_exits: int = 2,
        settings: dict | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.target_live_exits = target_live_exits
        self.settings = {("exits", "target_live_exits"): target_live_exits, **(settings or {})}
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)

        def node(name: str, roles: list[str]) -> HonestNode:
            return HonestNode(name, self.root / name, roles, logs / f"{name}.log")

        self.relay = node("relay", ["entry", "relay"])
        self.exit = node("exit", ["exit", "relay"])
        self.standby = node("standby", ["standby-exit", "relay"])
        self.nodes = [self.relay, self.exit, self.standby]
        self.probe = node("probe", ["standby-exit", "relay"])
        self._probe_ready = False
        self.timings: dict[str, float] = {}  # seconds per phase, shown in every report

    # -- lifecycle -----------------------------------------------------------------
    async def __aenter__(self) -> HonestOverlay:
        try:
            await self.start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop()

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        t0 = trio.current_time()
        with trio.fail_after(timeout):
            async with trio.open_nursery() as n:
                for node in [*self.nodes, self.probe]:
                    n.start_soon(node.init, self.settings)
            self._probe_ready = True
            self.relay.spawn()
            await self.relay.wait_started(False, timeout)
            for node in (self.exit, self.standby):
                node.spawn([self.relay.addr])
            for node in (self.exit, self.standby):
                await node.wait_started(True, timeout)
            await self.wait_formed()
        self.timings["start"] = round(trio.current_time() - t0, 1)

    def honest_exits(self) -> list[HonestNode]:
        """The honest nodes serving as exits: the exit, and the standby when promoted."""
        return [self.exit, self.standby] if self.target_live_exits >= 2 else [self.exit]

    async def wait_formed(self) -> None:
        """Until every node lists every honest exit as an exit, none of them dead."""
        want = self.honest_exits()
        while True:
            ok = True
            for node in self.nodes:
                ex = await node.exits()
                listed = {x["peer_id"]: x for x in (ex or {}).get("exits", [])}
                if any(
                    e.peer_id not in listed or listed[e.peer_id]["state"] == "dead" for e in want
                ):
                    ok = False
                    break
            if ok:
                return
            await trio.sleep(0.5)

    def stop(self) -> None:
        nodes = [*self.nodes, self.probe]
        for node in nodes:  # all at once: each takes a few seconds to leave cleanly
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            node.stop()

    # -- the probe: a fourth honest node whose records must reach everybody ----------
    async def probe_publish(self, timeout: float = 120.0) -> int:
        """(Re)start the probe node; return the seq of the record it published on joining."""
        if not self._probe_ready:
            await self.probe.init(self.settings)
            self._probe_ready = True
        self.probe.stop()
        before = self.probe.seq_on_disk()
        self.probe.spawn([self.relay.addr])
        # a run signs a new record on start and gossips it once joined
        await self.probe.wait_started(joining=True, timeout=timeout)
        seq = self.probe.seq_on_disk()
        assert seq > before, f"the probe did not sign a new record ({before} -> {seq})"
        return seq

    async def honest_gossip(self, bound: float = GOSSIP_BOUND) -> tuple[float | None, list[str]]:
        """Publish a probe record; seconds until every honest node holds it (None if not
        within ``bound``) and the names of the nodes that did not get it."""
        seq = await self.probe_publish()
        t0 = trio.current_time()
        pending = [n for n in self.nodes if n.alive]
        missing = [n.name for n in self.nodes if not n.alive]

        async def poll(node: HonestNode) -> None:
            while True:
                entry = find_entry(await node.exits(timeout=bound), self.probe.peer_id)
                if entry is not None and entry.get("seq", 0) >= seq:
                    pending.remove(node)
                    return
                await trio.sleep(0.2)

        with trio.move_on_after(bound):
            async with trio.open_nursery() as n:
                for node in list(pending):
                    n.start_soon(poll, node)
        missing += [n.name for n in pending]
        return (None if missing else trio.current_time() - t0), missing


# ---- the attacker's tools ----------------------------------------------------------------


def derive_key(seed: bytes, *parts: object) -> SigningKey:
    """A signing key derived from ``seed`` and ``parts`` (cheap: one hash, one scalar mult)."""
    h = hashlib.blake2b(seed, digest_size=32, person=b"hydra-attackkey")
    for p in parts:
        h.update(repr(p).encode() + b"\x00")
    return SigningKey(h.digest())


class RecordForge:
    """Fresh self-signed records, as many as wanted, each under its own derived key.

    ``feeds`` are the addresses the records claim (point them at a ``FeedSink``
    to count reflection dials). Exit records carry ``EXIT_POLICY``.
    """

    def __init__(self, seed: bytes, feeds: Sequence[str], *, ttl: int = MAX_LIFETIME) -> None:
        self.seed = seed
        self.feeds = tuple(feeds)
        self.ttl = ttl
        self.onion = OnionKey(hashlib.blake2b(seed, digest_size=32).digest(), 0).public
        # the first record goes through the real validator: the rest are built the same way
        validate_record(self.make(0), time.time())
        validate_record(self.make(0, exit=True), time.time())

    def make(self, i: int, *, exit: bool = False, seq: int = 1, now: float | None = None) -> bytes:
        key = derive_key(self.seed, "record", i)
        issued = int(time.time() if now is None else now)
        roles = Role.EXIT | Role.RELAY if exit else Role.RELAY
        rec = UnverifiedRecord(
            key.node_id,
            seq,
            issued,
            issued + self.ttl,
            Kind.RECORD,
            roles,
            self.feeds,
            self.onion,
            0,
            tuple(sorted(EXIT_POLICY)) if exit else (),
        )
        return dataclasses.replace(rec, signature=key.sign(rec.signing_input())).encode()

    def batch(self, start: int, count: int, *, exit: bool = False) -> list[bytes]:
        now = time.time()
        return [self.make(i, exit=exit, now=now) for i in range(start, start + count)]


class FeedSink:
    """A TCP listener that accepts and closes connections, counting them (a thread).

    Honest nodes that dial the feeds of forged records end up here.
    """

    def __init__(self, host: str = SINK_IP) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(4096)
        self._sock.settimeout(0.2)
        self.host, self.port = self._sock.getsockname()[:2]
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feed-sink", daemon=True)

    @property
    def feed(self) -> str:
        return f"/ip4/{self.host}/tcp/{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            conn.close()

    def __enter__(self) -> FeedSink:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _bind_dials_to(host: Libp2pHost, ip: str) -> None:
    """Make ``host``'s TCP dials leave from ``ip`` (the kernel would pick 127.0.0.1).

    Test-side patch of this one host's TCP transport instance: py-libp2p 0.8.1
    binds a source address only for hole punching.
    """
    from libp2p.transport.tcp.tcp import TCP

    for t in host._swarm.transport_manager.get_transports():  # noqa: SLF001
        if isinstance(t, TCP):
            orig = t._dial_resolved  # noqa: SLF001

            async def dial(maddr, source=None, _orig=orig):
                return await _orig(maddr, source=source or (ip, 0))

            t._dial_resolved = dial  # noqa: SLF001


@dataclass
class PushStats:
    rounds: int = 0
    refused: int = 0
    records: int = 0
    reconnects: int = 0
    seconds: float = 0.0


@dataclass
class SendOutcome:
    protocol: str
    case: str
    opened: bool = False
    written: int = 0
    reply: bytes = b""
    error: str = ""


class Attacker:
    """One hostile identity: a py-libp2p host on ``ip`` with a key derived from ``seed``."""

    def __init__(self, index: int, ip: str | None = None, *, seed: bytes = b"hydra-attack") -> None:
        self.index = index
        self.ip = ip or ATTACKER_IPS[index % len(ATTACKER_IPS)]
        self.key = derive_key(seed, "identity", index)
        self.peer_id = self.key.node_id.peer_id()
        self.host = Libp2pHost(
            self.key,
            [f"/ip4/{self.ip}/tcp/0"],
            gossip_topics=[RECORDS_TOPIC, LIVENESS_TOPIC, DELIVERED_TOPIC],
            enable_dht=False,
            dial_timeout=5.0,
        )
        self._addrs: dict[str, str] = {}

    async def __aenter__(self) -> Attacker:
        await self.host.__aenter__()
        _bind_dials_to(self.host, self.ip)
        return self

    async def __aexit__(self, *exc) -> bool | None:
        return await self.host.__aexit__(*exc)

    async def connect(self, addr: str) -> str | None:
        """Dial a node; its peer id, or None if it would not have us."""
        try:
            pid = await self.host.connect(addr)
        except Exception:  # noqa: BLE001 - refused or banned: the attack goes on
            return None
        self._addrs[pid] = addr
        return pid

    async def _ensure(self, peer_id: str) -> bool:
        if peer_id in self.host.connected_peers():
            return True
        addr = self._addrs.get(peer_id)
        return addr is not None and await self.connect(addr) is not None

    async def _open(self, peer_id: str, protocol: str, timeout: float = 5.0):
        if not await self._ensure(peer_id):
            return None
        try:
            return await self.host.open_stream(peer_id, protocol, timeout=timeout)
        except Exception:  # noqa: BLE001
            return None

    # -- anti-entropy --------------------------------------------------------------------
    async def sync_round(
        self, peer_id: str, records: Sequence[bytes], timeout: float = 20.0
    ) -> bool:
        """One round as initiator that pushes ``records`` (<= sync.MAX_RECORDS); True if the
        responder read them (it closes the stream after ingesting)."""
        with trio.move_on_after(timeout):
            stream = await self._open(peer_id, SYNC_PROTOCOL)
            if stream is None:
                return False
            try:
                empty = sync.Summary(tuple(b"\0" * sync.BUCKET_HASH for _ in range(sync.BUCKETS)))
                await stream.write(framing.encode_frame(sync.encode(empty), sync.MAX_SIZE))
                if await framing.read_frame(stream, sync.MAX_SIZE) is None:
                    return False  # refused (rate limit)
                await stream.write(framing.encode_frame(sync.encode(sync.Want(())), sync.MAX_SIZE))
                push = sync.encode(sync.Records(tuple(records)))
                await stream.write(framing.encode_frame(push, sync.MAX_SIZE))
                await stream.close_write()
                while await stream.read(4096):  # until the responder is done
                    pass
                return True
            except Exception:  # noqa: BLE001 - a reset is the node's answer
                return False
            finally:
                await stream.close()
        return False

    async def sync_push(
        self,
        peer_ids: Sequence[str],
        records: Sequence[bytes],
        *,
        per_round: int = sync.MAX_RECORDS,
        min_interval: float = 0.55,
        deadline: float = 600.0,
    ) -> PushStats:
        """Push ``records`` in rounds, cycling over ``peer_ids``, as fast as they are taken:
        at most one round per ``min_interval`` seconds per peer (the responders' token
        bucket), backing off when refused. Bounded by ``deadline`` seconds."""
        st = PushStats()
        t0 = trio.current_time()
        last: dict[str, float] = {}
        i, k, backoff = 0, 0, 0.5
        with trio.move_on_after(deadline):
            while i < len(records):
                peer = peer_ids[k % len(peer_ids)]
                k += 1
                wait = last.get(peer, -1e9) + min_interval - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                last[peer] = trio.current_time()
                batch = records[i : i + per_round]
                if await self.sync_round(peer, batch):
                    st.rounds += 1
                    st.records += len(batch)
                    i += len(batch)
                    backoff = 0.5
                else:
                    st.refused += 1
                    await trio.sleep(backoff)
                    backoff = min(5.0, backoff * 2)
                    if peer not in self.host.connected_peers():
                        st.reconnects += 1
        st.seconds = trio.current_time() - t0
        return st

    async def pull(self, peer_id: str, timeout: float = 20.0) -> list[bytes]:
        """Pull up to ``sync.MAX_WANT`` of the node's records (as an honest joiner would)."""
        with trio.move_on_after(timeout):
            stream = await self._open(peer_id, SYNC_PROTOCOL)
            if stream is None:
                return []
            try:
                empty = sync.Summary(tuple(b"\0" * sync.BUCKET_HASH for _ in range(sync.BUCKETS)))
                await stream.write(framing.encode_frame(sync.encode(empty), sync.MAX_SIZE))
                entries = sync.decode(await framing.read_frame(stream, sync.MAX_SIZE))
                ids = tuple(nid for nid, _ in entries.entries)[: sync.MAX_WANT]
                await stream.write(framing.encode_frame(sync.encode(sync.Want(ids)), sync.MAX_SIZE))
                if not ids:
                    return []
                recs = sync.decode(await framing.read_frame(stream, sync.MAX_SIZE))
                return list(recs.records)
            except Exception:  # noqa: BLE001
                return []
            finally:
                await stream.close()
        return []

    # -- gossip -----------------------------------------------------------------------
    async def gossip(self, topic: str, messages: Sequence[bytes], rate: float = 40.0) -> int:
        """Publish ``messages`` on ``topic`` at ``rate`` per second; how many went out."""
        sent = 0
        for m in messages:
            try:
                await self.host.publish(topic, m)
                sent += 1
            except Exception:  # noqa: BLE001
                pass
            await trio.sleep(1.0 / rate)
        return sent

    # -- raw streams -------------------------------------------------------------------
    async def send_raw(
        self,
        peer_id: str,
        protocol: str,
        data: bytes,
        *,
        case: str = "",
        hold: float = 0.0,
        read_reply: float = 1.0,
    ) -> SendOutcome:
        """Open ``protocol`` to the node, write ``data`` verbatim, optionally keep the
        stream open ``hold`` seconds, read what comes back for up to ``read_reply`` s."""
        out = SendOutcome(protocol, case)
        stream = await self._open(peer_id, protocol)
        if stream is None:
            out.error = "no stream"
            return out
        out.opened = True
        try:
            with trio.move_on_after(10):
                await stream.write(data)
                out.written = len(data)
            if hold:
                await trio.sleep(hold)
            with trio.move_on_after(read_reply):
                while len(out.reply) < 65536:
                    chunk = await stream.read(65536)
                    if not chunk:
                        break
                    out.reply += chunk
        except Exception as e:  # noqa: BLE001
            out.error = type(e).__name__
        finally:
            await stream.reset() if hold else await stream.close()
        return out


def tag36_bomb(max_size: int = sync.MAX_SIZE) -> bytes:
    """A sync frame body of ``max_size`` bytes: ``{0: 1, 1: 1, 2: [36(""), 36(""), ...]}``.

    Tag 36 is the CBOR MIME-message tag; a decoder that builds tagged values
    before any type check parses each one as an e-mail message.
    """
    prefix = bytes([0xA3, 0x00, 0x01, 0x01, 0x01, 0x02])
    item = b"\xd8\x24\x60"  # tag(36) text string ""
    n = (max_size - len(prefix) - 5) // len(item)
    return prefix + bytes([0x9A]) + n.to_bytes(4, "big") + item * n


# ---- the checks ------------------------------------------------------------------------


@dataclass
class Baseline:
    rss_kb: dict[str, int]
    log_offsets: dict[str, int]
    sink_dials: int
    gossip_seconds: float | None
    at: float = field(default_factory=time.time)


async def settle_rss(
    nodes: Sequence[HonestNode], samples: int = 3, gap: float = 2.0
) -> dict[str, int]:
    """The lowest RSS of each node over a few samples (a quiet moment)."""
    out: dict[str, int] = {}
    for i in range(samples):
        for n in nodes:
            v = n.rss_kb()
            if v is not None:
                out[n.name] = min(out.get(n.name, v), v)
        if i < samples - 1:
            await trio.sleep(gap)
    return out


async def take_baseline(ov: HonestOverlay, sink: FeedSink | None, settle: float = 5.0) -> Baseline:
    """Before the attack: one probe publish (the overlay works), then quiet RSS."""
    t0 = trio.current_time()
    gossip, missing = await ov.honest_gossip()
    if missing:
        raise RuntimeError(f"honest gossip did not work before the attack: {missing} missed it")
    await trio.sleep(settle)
    ov.timings["baseline"] = round(trio.current_time() - t0, 1)
    ov.timings["baseline_end"] = trio.current_time()
    return Baseline(
        rss_kb=await settle_rss(ov.nodes),
        log_offsets={n.name: n.log_size() for n in ov.nodes},
        sink_dials=sink.count if sink else 0,
        gossip_seconds=gossip,
    )


async def wait_views_settled(
    ov: HonestOverlay, *, quiet: float = 3.0, at_most: float = 20.0
) -> float:
    """After an attack: until no honest node's record count changed for ``quiet``
    seconds (what was pushed has spread as far as it will), at most ``at_most``
    seconds; returns the seconds waited."""
    t0 = trio.current_time()
    last: dict[str, object] = {}
    since = t0
    with trio.move_on_after(at_most):
        while True:
            now = {n.name: ((await n.status(timeout=10.0)) or {}).get("records") for n in ov.nodes}
            if now != last:
                last, since = now, trio.current_time()
            elif trio.current_time() - since >= quiet:
                break
            await trio.sleep(0.5)
    return trio.current_time() - t0


@dataclass
class Report:
    numbers: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    def text(self) -> str:
        lines = ["attack not held:" if self.failures else "attack held:"]
        lines += [f"  FAIL {f}" for f in self.failures]
        lines += [f"  {k} = {v}" for k, v in self.numbers.items()]
        return "\n".join(lines)


def dead_lines(ov: HonestOverlay, base: Baseline) -> dict[str, int]:
    """How often each honest node logged an honest exit as dead since the baseline."""
    out = {}
    for n in ov.nodes:
        text = n.log_since(base.log_offsets.get(n.name, 0))
        out[n.name] = sum(
            text.count(f"member {e.short} is dead") for e in ov.honest_exits() if e is not n
        )
    return out


async def check_held(
    ov: HonestOverlay,
    base: Baseline,
    *,
    sink: FeedSink | None = None,
    dial_budget: int = DIAL_BUDGET,
    gossip_bound: float = GOSSIP_BOUND,
    rss_wait: float = RSS_WAIT,
    check_rss: bool = True,
) -> Report:
    """Every post-attack check of issue 14 ("Done when"), with the numbers."""
    rep = Report()
    t0 = trio.current_time()
    if "baseline_end" in ov.timings:
        ov.timings["attack"] = round(t0 - ov.timings.pop("baseline_end"), 1)
    nodes = ov.nodes

    # 1. alive and answering `overlay status` (the CLI, as an operator runs it)
    for n in nodes:
        if not n.alive:
            rep.fail(f"{n.name} process died (exit code {n.proc.returncode if n.proc else None})")
    statuses = {}

    async def status_of(n: HonestNode) -> None:
        statuses[n.name] = await n.status_cli()

    async with trio.open_nursery() as nursery:
        for n in nodes:
            if n.alive:
                nursery.start_soon(status_of, n)
    for n in nodes:
        if n.name in statuses and statuses[n.name] is None:
            rep.fail(f"{n.name}: `overlay status` did not answer")

    # 2. the admission bound: unverified records held <= the node's bound
    for name, st in statuses.items():
        if st is None:
            continue
        rep.numbers[f"{name}.records"] = st.get("records")
        adm = st.get("admission")
        if not isinstance(adm, dict) or not {"unverified", "max_unverified"} <= set(adm):
            rep.fail(
                f"{name}: `overlay status --json` has no admission section (verified/unverified/max_unverified/rejected)"
            )
            continue
        rep.numbers[f"{name}.admission"] = adm
        if adm["unverified"] > adm["max_unverified"]:
            rep.fail(
                f"{name}: {adm['unverified']} unverified records > bound {adm['max_unverified']}"
            )

    # 3. no honest exit held dead, now (CLI) and at any time since the baseline (logs)
    for n in nodes:
        if not n.alive:
            continue
        ex = await n.exits()
        if ex is None:
            rep.fail(f"{n.name}: `overlay exits` did not answer")
            continue
        rep.numbers[f"{n.name}.live_exits"] = ex.get("live_exits")
        for e in ov.honest_exits():
            entry = find_entry(ex, e.peer_id)
            if entry is None or e.peer_id not in {x["peer_id"] for x in ex.get("exits", [])}:
                rep.fail(f"{n.name} does not list honest exit {e.name} as an exit")
            elif entry["state"] == "dead":
                rep.fail(f"{n.name} holds honest exit {e.name} dead")
    deaths = dead_lines(ov, base)
    rep.numbers["honest_exit_declared_dead"] = deaths
    for name, count in deaths.items():
        if count:
            rep.fail(f"{name} declared an honest exit dead {count} time(s) during the attack")

    # 4. the standby stays as it was (promoted: still an exit, never stepped back)
    sb = ov.standby
    text = sb.log_since(base.log_offsets.get(sb.name, 0))
    step_backs = text.count("exit pool: step-back")
    rep.numbers["standby_step_backs"] = step_backs
    if step_backs:
        rep.fail(f"the honest standby stepped back {step_backs} time(s)")
    st = statuses.get(sb.name)
    if ov.target_live_exits >= 2 and st is not None and "exit" not in st.get("roles", []):
        rep.fail(f"the honest standby no longer serves as an exit (roles {st.get('roles')})")

    # 5. honest gossip reaches every honest node
    took, missing = await ov.honest_gossip(gossip_bound)
    rep.numbers["honest_gossip_s"] = None if took is None else round(took, 1)
    rep.numbers["honest_gossip_before_s"] = (
        None if base.gossip_seconds is None else round(base.gossip_seconds, 1)
    )
    if missing:
        rep.fail(f"honest gossip did not reach {missing} within {gossip_bound:g} s")

    # 6. memory comes back to within RSS_TOLERANCE of the pre-attack level
    if check_rss:
        rss = await wait_rss(nodes, base, rss_wait)
        rep.numbers["rss_kb_before"] = base.rss_kb
        rep.numbers["rss_kb_after"] = rss
        for n in nodes:
            b, a = base.rss_kb.get(n.name), rss.get(n.name)
            if b and a and a > b * (1 + RSS_TOLERANCE):
                rep.fail(
                    f"{n.name} RSS {a / 1024:.0f} MB > {b / 1024:.0f} MB + {RSS_TOLERANCE:.0%}"
                )

    # 7. reflection: dials to the attacker's feed address, counted last so that the
    # window covers everything the nodes did with the attacker's records until now
    if sink is not None:
        dials = sink.count - base.sink_dials
        rep.numbers["dials_to_attacker_feed"] = dials
        if dials > dial_budget:
            rep.fail(
                f"honest nodes dialled the attacker-chosen feed {dials} times (budget {dial_budget})"
            )
    rep.numbers["tcp_connections"] = {n.name: n.tcp_connections() for n in nodes}
    ov.timings["check"] = round(trio.current_time() - t0, 1)
    rep.numbers["timings_s"] = dict(ov.timings)
    print(rep.text())  # shown with -rP (and on failure)
    return rep


async def wait_rss(nodes: Sequence[HonestNode], base: Baseline, wait: float) -> dict[str, int]:
    """RSS per node, sampled until every node is back within tolerance or ``wait`` passes."""
    rss: dict[str, int] = {}
    with trio.move_on_after(wait):
        while True:
            rss = await settle_rss([n for n in nodes if n.alive], samples=2, gap=1.0)
            if all(
                rss.get(n.name, 0) <= base.rss_kb.get(n.name, 0) * (1 + RSS_TOLERANCE)
                for n in nodes
                if n.alive
            ):
                break
            await trio.sleep(5.0)
    return rss
