"""The lab itself: providers, hosts, building the namespaces, feeds cut and restored.

Topology, addressing and cleanup are described in the package docstring.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .ip import (
    _IP_TIMEOUT,
    DEFAULT_BASE,
    MAX_HOSTS,
    MAX_PROVIDERS,
    LabError,
    _batch,
    _counter,
    _delete_namespaces,
    _ip,
    _run_ip,
    list_namespaces,
)


def _provider_name(k: int) -> str:
    return chr(ord("A") + k)


@dataclass
class Provider:
    """A provider router ("ISP"); hosts get addresses in its ``network``."""

    name: str  # "A", "B", ...
    index: int  # 0-based
    ns: str
    network: str  # "10.11.0.0/16"
    core_addr: str  # provider's address on the core transit link
    core_if: str = "core"  # provider-side device towards core


@dataclass
class Host:
    """A test host with one link per provider."""

    name: str  # "h1", "h2", ...
    index: int  # 1-based
    ns: str
    addrs: dict[str, str] = field(default_factory=dict)  # provider -> "10.11.1.2"
    links: dict[str, str] = field(default_factory=dict)  # provider -> host-side dev ("ethA")
    gateways: dict[str, str] = field(default_factory=dict)  # provider -> "10.11.1.1"
    peer_links: dict[str, str] = field(default_factory=dict)  # provider -> dev in provider ns

    def __str__(self) -> str:
        return self.name


Target = Host | Provider | str


# --------------------------------------------------------------------------- signals / atexit

_live_labs: set[Lab] = set()
_live_lock = threading.RLock()
_prev_handlers: dict[int, object] = {}
_CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _close_all_labs() -> None:
    with _live_lock:
        labs = list(_live_labs)
    for lab in labs:
        lab.close()


atexit.register(_close_all_labs)


def _on_fatal_signal(signum, frame) -> None:  # pragma: no cover - exercised manually
    _close_all_labs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _CLEANUP_SIGNALS:
        if sig in _prev_handlers:
            continue
        try:
            # Only where the signal would kill us without running atexit.
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_fatal_signal)
                _prev_handlers[sig] = signal.SIG_DFL
        except (ValueError, OSError):
            pass


def _uninstall_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_prev_handlers.items()):
        try:
            if signal.getsignal(sig) is _on_fatal_signal:
                signal.signal(sig, prev)
        except (ValueError, OSError):
            pass
        del _prev_handlers[sig]


# --------------------------------------------------------------------------- the lab

_PING_SCRIPT = r"""
import os, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
ident, payload = os.getpid() & 0xFFFF, b"hydra-netns-probe"
pkt = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
pkt = struct.pack("!BBHHH", 8, 0, csum(pkt), ident, 1) + payload
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
try:
    s.sendto(pkt, (dst, 0))
except OSError:
    sys.exit(1)
deadline = time.monotonic() + timeout
while True:
    left = deadline - time.monotonic()
    if left <= 0: sys.exit(1)
    s.settimeout(left)
    try:
        data, addr = s.recvfrom(4096)
    except (socket.timeout, OSError):
        sys.exit(1)
    ihl = (data[0] & 0xF) * 4
    typ, _c, _s, rid, _q = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    if typ == 0 and rid == ident and addr[0] == dst:
        sys.exit(0)
    if typ in (3, 11):  # unreachable / TTL exceeded for our probe -> fail fast
        inner = data[ihl + 8:]
        if len(inner) >= 28:
            iihl = (inner[0] & 0xF) * 4
            if socket.inet_ntoa(inner[16:20]) == dst and inner[iihl + 4:iihl + 6] == struct.pack("!H", ident):
                sys.exit(1)
"""

_TCP_SCRIPT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError:
    sys.exit(1)
"""


class Lab:
    """A set of network namespaces: ``hosts`` test hosts, ``providers`` providers, one core.

    Use as a context manager (or call :meth:`start` / :meth:`close`)::

        with Lab(hosts=3) as lab:
            h1, h2, _ = lab.hosts
            assert lab.reachable(h1, h2.addrs["A"])
            lab.cut(h2, "A")
            assert not lab.reachable(h1, h2.addrs["A"])
            assert lab.reachable(h1, h2.addrs["B"])
            node = lab.popen(h2, ["python", "-m", "overlay", ...])
    """

    def __init__(self, hosts: int, providers: int = 2, prefix: str | None = None):
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be in 1..{MAX_HOSTS}")
        if not 1 <= providers <= MAX_PROVIDERS:
            raise ValueError(f"providers must be in 1..{MAX_PROVIDERS}")
        self.auto_prefix = prefix is None
        if prefix is None:
            prefix = f"{DEFAULT_BASE}{os.getpid()}x{next(_counter)}-"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", prefix):
            raise ValueError(f"bad prefix {prefix!r}")
        self.prefix = prefix
        self.owned = True  # False for Lab.attach(): close() leaves namespaces alone
        self.core_ns = f"{prefix}core"
        self.providers: list[Provider] = [
            Provider(
                name=_provider_name(k),
                index=k,
                ns=f"{prefix}prov{_provider_name(k)}",
                network=f"10.{11 + k}.0.0/16",
                core_addr=f"10.10.{k + 1}.2",
            )
            for k in range(providers)
        ]
        self.hosts: list[Host] = []
        for i in range(1, hosts + 1):
            h = Host(name=f"h{i}", index=i, ns=f"{prefix}h{i}")
            for p in self.providers:
                net = 11 + p.index
                h.addrs[p.name] = f"10.{net}.{i}.2"
                h.gateways[p.name] = f"10.{net}.{i}.1"
                h.links[p.name] = f"eth{p.name}"
                h.peer_links[p.name] = f"h{i}"
            self.hosts.append(h)
        self._created: list[str] = []  # namespaces we (tried to) create, in order
        self._procs: list[subprocess.Popen] = []
        self._started = False
        self._closed = False
        self.leftovers: list[str] = []  # namespaces close() could not delete

    # ------------------------------------------------------------------ lifecycle

    @property
    def namespaces(self) -> list[str]:
        return [self.core_ns, *(p.ns for p in self.providers), *(h.ns for h in self.hosts)]

    @property
    def provider_names(self) -> list[str]:
        return [p.name for p in self.providers]

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix!r} hosts={len(self.hosts)} providers={self.provider_names}>"

    def start(self) -> Lab:
        if self._started:
            return self
        if self._closed:
            raise LabError("lab already closed")
        self._started = True
        with _live_lock:
            _live_labs.add(self)
            _install_signal_handlers()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        existing = list_namespaces(self.prefix)
        if existing:
            if not self.auto_prefix:
                raise LabError(f"namespaces with prefix {self.prefix!r} exist: {existing}")
            _delete_namespaces(existing)  # leftovers of a dead process that had our pid
        # 1. all namespaces and all veth pairs (each end created directly in its namespace)
        lines = []
        for ns in self.namespaces:
            self._created.append(ns)
            lines.append(f"netns add {ns}")
        for p in self.providers:
            lines.append(
                f"link add name prov{p.name} netns {self.core_ns} type veth"
                f" peer name {p.core_if} netns {p.ns}"
            )
        for h in self.hosts:
            for p in self.providers:
                lines.append(
                    f"link add name {h.links[p.name]} netns {h.ns} type veth"
                    f" peer name {h.peer_links[p.name]} netns {p.ns}"
                )
        _batch(None, lines)
        # 2. sysctls
        routers = [self.core_ns, *(p.ns for p in self.providers)]
        for ns in self.namespaces:
            self._sysctl(ns, forward=ns in routers)
        # 3. addresses, links up, routes: one batch per namespace
        core = ["link set lo up"]
        for p in self.providers:
            dev = f"prov{p.name}"
            core += [
                f"addr add 10.10.{p.index + 1}.1/24 dev {dev}",
                f"link set {dev} up",
                f"route add {p.network} via {p.core_addr} dev {dev}",
            ]
        _batch(self.core_ns, core)
        for p in self.providers:
            cmds = [
                "link set lo up",
                f"addr add {p.core_addr}/24 dev {p.core_if}",
                f"link set {p.core_if} up",
                f"route add unreachable {p.network}",
                f"route add 10.0.0.0/8 via 10.10.{p.index + 1}.1 dev {p.core_if}",
            ]
            for h in self.hosts:
                dev = h.peer_links[p.name]
                cmds += [f"addr add {h.gateways[p.name]}/24 dev {dev}", f"link set {dev} up"]
            _batch(p.ns, cmds)
        for h in self.hosts:
            cmds = ["link set lo up"]
            for p in self.providers:
                dev = h.links[p.name]
                cmds += [f"addr add {h.addrs[p.name]}/24 dev {dev}", f"link set {dev} up"]
            cmds += self._host_routes(h)
            _batch(h.ns, cmds)

    def _host_routes(self, h: Host, only: str | None = None) -> list[str]:
        cmds = []
        for p in self.providers:
            if only is not None and p.name != only:
                continue
            gw, dev = h.gateways[p.name], h.links[p.name]
            cmds += [
                f"route replace {p.network} via {gw} dev {dev} metric 10",
                f"route replace 10.0.0.0/8 via {gw} dev {dev} metric {100 + p.index}",
            ]
        return cmds

    def _sysctl(self, ns: str, *, forward: bool) -> None:
        script = (
            f"echo {1 if forward else 0} > /proc/sys/net/ipv4/ip_forward; "
            "for f in /proc/sys/net/ipv4/conf/*/ignore_routes_with_linkdown; do echo 1 > $f; done; "
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done"
        )
        proc = subprocess.run(
            [_ip(), "netns", "exec", ns, "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
        )
        if proc.returncode != 0:
            raise LabError(f"sysctl in {ns} failed: {proc.stderr.strip()}")

    def close(self) -> list[str]:
        """Tear everything down (idempotent, never raises); return leftover namespaces."""
        if self._closed:
            return self.leftovers
        self._closed = True
        try:
            self._stop_processes()
        except Exception:  # noqa: BLE001 - teardown must go on
            pass
        if self.owned:
            try:
                self.leftovers = _delete_namespaces(self._created)
            except Exception:  # noqa: BLE001
                self.leftovers = [ns for ns in self._created if ns in list_namespaces(self.prefix)]
        with _live_lock:
            _live_labs.discard(self)
            if not _live_labs:
                _uninstall_signal_handlers()
        return self.leftovers

    def _stop_processes(self, grace: float = 3.0) -> None:
        procs = [p for p in self._procs if p.poll() is None]
        for p in procs:
            self._signal_proc(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.poll() is None:
                self._signal_proc(p, signal.SIGKILL)
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass

    @staticmethod
    def _signal_proc(p: subprocess.Popen, sig: int) -> None:
        try:
            if getattr(p, "_hydra_own_group", False):
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    @classmethod
    def attach(cls, prefix: str) -> Lab:
        """A handle on a lab built by another process (e.g. ``netns-lab up``).

        The topology is rebuilt from the namespace names; :meth:`close` does not
        delete anything.
        """
        names = list_namespaces(prefix)
        hosts = sorted(
            int(m.group(1)) for n in names if (m := re.fullmatch(re.escape(prefix) + r"h(\d+)", n))
        )
        provs = sorted(
            m.group(1) for n in names if (m := re.fullmatch(re.escape(prefix) + r"prov([A-Z])", n))
        )
        if not hosts or not provs:
            raise LabError(f"no lab with prefix {prefix!r}")
        lab = cls(hosts=max(hosts), providers=ord(provs[-1]) - ord("A") + 1, prefix=prefix)
        lab.owned = False
        lab._started = True
        return lab

    # ------------------------------------------------------------------ lookup

    def host(self, name: str | int) -> Host:
        """Host by name ("h2"), index (2) or namespace name."""
        for h in self.hosts:
            if name in (h.name, h.index, h.ns):
                return h
        raise KeyError(name)

    def provider(self, name: str | int) -> Provider:
        """Provider by name ("A"), index (0), "provA" or namespace name."""
        for p in self.providers:
            if name in (p.name, p.index, p.ns, f"prov{p.name}"):
                return p
        raise KeyError(name)

    def ns_of(self, target: Target) -> str:
        if isinstance(target, Host | Provider):
            return target.ns
        if target in ("core", self.core_ns):
            return self.core_ns
        for finder in (self.host, self.provider):
            try:
                return finder(target).ns
            except KeyError:
                pass
        raise KeyError(target)

    # ------------------------------------------------------------------ running things

    def exec_argv(self, target: Target, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped in ``ip netns exec`` (for trio.run_process & co.)."""
        return [_ip(), "netns", "exec", self.ns_of(target), *map(str, argv)]

    def run(self, target: Target, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace; defaults: capture text output, 60 s timeout."""
        kw.setdefault("timeout", 60)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.exec_argv(target, argv), **kw)

    def popen(self, target: Target, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a long-running process inside the namespace; it is killed at teardown.

        It runs in its own session (process group) unless ``start_new_session=False``
        is passed; teardown sends SIGTERM to the group, then SIGKILL after 3 s.
        """
        if self._closed:
            raise LabError("lab closed")
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_argv(target, argv), **kw)
        proc._hydra_own_group = bool(kw["start_new_session"])  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    # ------------------------------------------------------------------ feeds

    def _link(self, host: Host | str, provider: Provider | str) -> tuple[Host, Provider]:
        h = host if isinstance(host, Host) else self.host(host)
        p = provider if isinstance(provider, Provider) else self.provider(provider)
        return h, p

    def cut(self, host: Host | str, provider: Provider | str, *, side: str = "host") -> None:
        """Cut ``host``'s link to ``provider``: ``ip link set ... down``.

        ``side="host"``: inside the host (its ``eth{P}`` goes down, the node can see it);
        ``side="provider"``: the provider's end (the host only sees NO-CARRIER).
        """
        h, p = self._link(host, provider)
        if side == "host":
            _batch(h.ns, [f"link set {h.links[p.name]} down"])
        elif side == "provider":
            _batch(p.ns, [f"link set {h.peer_links[p.name]} down"])
        else:
            raise ValueError("side must be 'host' or 'provider'")

    def restore(self, host: Host | str, provider: Provider | str) -> None:
        """Bring both ends of the link back up and re-install the host's routes."""
        h, p = self._link(host, provider)
        _batch(p.ns, [f"link set {h.peer_links[p.name]} up"])
        _batch(h.ns, [f"link set {h.links[p.name]} up", *self._host_routes(h, only=p.name)])

    def link_up(self, host: Host | str, provider: Provider | str) -> bool:
        """True if both ends of the link are administratively up and have carrier."""
        h, p = self._link(host, provider)
        for ns, dev in ((h.ns, h.links[p.name]), (p.ns, h.peer_links[p.name])):
            out = _run_ip(["-n", ns, "-o", "link", "show", "dev", dev]).stdout
            flags = out.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in out else []
            if "UP" not in flags or "LOWER_UP" not in flags:
                return False
        return True

    def reachable(
        self, src: Target, dst_ip: str, timeout: float = 1.0, *, port: int | None = None
    ) -> bool:
        """Can ``src`` reach ``dst_ip``?  ICMP echo (one probe), or a TCP connect if ``port``.

        Only ever aim this at lab addresses (10.x); namespaces have no way out anyway.
        """
        if port is None:
            argv = [sys.executable, "-S", "-c", _PING_SCRIPT, dst_ip, str(timeout)]
        else:
            argv = [sys.executable, "-S", "-c", _TCP_SCRIPT, dst_ip, str(port), str(timeout)]
        proc = self.run(src, argv, timeout=timeout + 10)
        return proc.returncode == 0

    def wait_reachable(
        self, src: Target, dst_ip: str, timeout: float = 5.0, *, port: int | None = None
    ) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self.reachable(src, dst_ip, timeout=min(1.0, max(0.1, left)), port=port):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    # ------------------------------------------------------------------ description

    def describe(self) -> dict:
        return {
            "prefix": self.prefix,
            "core": self.core_ns,
            "providers": {
                p.name: {"ns": p.ns, "network": p.network, "core_addr": p.core_addr}
                for p in self.providers
            },
            "hosts": {
                h.name: {"ns": h.ns, "addrs": dict(h.addrs), "links": dict(h.links)}
                for h in self.hosts
            },
        }
