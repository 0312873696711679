"""Network-namespace test lab: test hosts with two "feed" links to two providers.

Used by ``tests/netns`` (pytest fixtures ``make_lab`` / ``lab``) and by
``scripts/netns-lab`` for manual experiments.  Pure stdlib; everything is done
by running ``ip`` (iproute2) as root.  Nothing here touches the real network:
every link created is a veth pair whose two ends live in namespaces created by
the lab, no namespace has a link to the root namespace, and no namespace has a
default route.

Topology (``Lab(hosts=N, providers=K)``)::

                          core  (router)
               provA ---/      \\--- provB       (routers, "two ISPs")
              /  |  \\             /  |  \\
            h1  h2  h3          h1  h2  h3       (each host: one link to each provider)

Namespaces are named ``{prefix}core``, ``{prefix}provA``, ``{prefix}provB``,
``{prefix}h1`` ...; the default prefix is ``hy{pid}x{n}-`` (owner pid + per-process
counter), so parallel runs never collide and leftovers of crashed runs can be
recognised (owner pid dead) and removed with :func:`cleanup_stale`.

Addressing (provider k = 0, 1, ... is named "A", "B", ...; host i = 1, 2, ...):

* provider k owns ``10.(11+k).0.0/16``; host i's link to it is the subnet
  ``10.(11+k).i.0/24`` with the provider at ``.1`` and the host at ``.2``.
  So h2's addresses are ``10.11.2.2`` (A, device ``ethA``) and ``10.12.2.2``
  (B, device ``ethB``).
* core <-> provider k transit: ``10.10.(k+1).0/24``, core ``.1``, provider ``.2``.

Interface names (per namespace, so no global clash, all <= 15 chars): host side
``eth{P}``; provider side ``h{i}`` (to host i) and ``core``; core side ``prov{P}``.

Routing (plain destination routing, no policy routing):

* host: ``10.(11+k).0.0/16 via <provider k> metric 10`` for every provider
  ("on-net": traffic to a provider's addresses leaves through the link to that
  provider, with that link's address as source), plus a fallback
  ``10.0.0.0/8 via <provider k> metric 100+k`` for every provider, so when one
  of the host's own links is cut its traffic goes out through another provider
  (and core).  No default route: anything outside 10/8 is unreachable.
  Hosts do not forward.
* provider k: connected /24s to its hosts, ``unreachable 10.(11+k).0.0/16`` (so a
  cut host link answers with ICMP unreachable at once instead of looping) and
  ``10.0.0.0/8 via core``.  ip_forward=1.
* core: ``10.(11+k).0.0/16 via provider k``.  ip_forward=1.
* everywhere: ``ignore_routes_with_linkdown=1`` (a link whose peer is down is not
  used) and ``rp_filter=0``; loopback is up.

Cutting a feed: :meth:`Lab.cut` sets the link down on the host side (default,
the host sees its interface go down) or on the provider side (the host only
sees NO-CARRIER, like a cut upstream).  Either way the host's address on that
provider becomes unreachable from everywhere while its other addresses stay
reachable.  :meth:`Lab.restore` brings both ends up and re-installs the host's
routes (the kernel drops routes through an interface that goes down).

Cleanup is guaranteed by: ``with Lab(...)`` (``__exit__`` and a failed
``__enter__`` both call :meth:`Lab.close`), an ``atexit`` hook that closes
every open lab, a SIGTERM/SIGHUP handler (installed only while labs are open
and only if the signal would otherwise kill the process without running
``atexit``) and, for SIGKILL/power loss, :func:`cleanup_stale` which removes
namespaces whose owner pid is dead and that are older than a minute (the pytest
fixture calls it once per session, ``scripts/netns-lab up`` on start).  :meth:`Lab.close` kills processes started with :meth:`Lab.popen`,
then every process still inside a lab namespace, then deletes the namespaces
(which destroys all the veths, since every veth end lives in a lab namespace).

From trio tests: the methods block for a few milliseconds (they run ``ip``);
wrap them in ``trio.to_thread.run_sync`` if that matters.  To run a node under
trio use ``trio.open_process(lab.exec_argv(host, argv))``; such processes are not
tracked by :meth:`Lab.popen` but are still killed at teardown, because
:meth:`Lab.close` kills every process left inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "Host",
    "Lab",
    "LabError",
    "Provider",
    "cleanup_stale",
    "list_namespaces",
    "netns_available",
]

DEFAULT_BASE = "hy"  # auto prefixes are f"{base}{pid}x{n}-"
MAX_HOSTS = 250
MAX_PROVIDERS = 16
_AUTO_PREFIX_RE = re.compile(r"^(?P<prefix>(?P<base>[A-Za-z_]+?)(?P<pid>\d+)x(?P<n>\d+)-)")
_counter = itertools.count()
_IP_TIMEOUT = 30.0


class LabError(RuntimeError):
    """Setting up or driving the lab failed."""


# --------------------------------------------------------------------------- helpers


def _ip_bin() -> str | None:
    found = shutil.which("ip")
    if found:
        return found
    for cand in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def _ip() -> str:
    path = _ip_bin()
    if path is None:
        raise LabError("`ip` (iproute2) not found")
    return path


def _run_ip(args: Sequence[str], *, stdin: str | None = None, check: bool = True):
    proc = subprocess.run(
        [_ip(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=_IP_TIMEOUT,
    )
    if check and proc.returncode != 0:
        what = " ".join(args)
        if stdin:
            what += " <<batch:\n" + stdin
        raise LabError(f"ip {what} failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return proc


def _batch(ns: str | None, lines: Sequence[str]) -> None:
    """Run ``ip`` commands (without the leading ``ip``) in one process."""
    if not lines:
        return
    args = ["-n", ns] if ns else []
    _run_ip([*args, "-batch", "-"], stdin="\n".join(lines) + "\n")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of network namespaces (``ip netns list``) starting with ``prefix``."""
    ip = _ip_bin()
    if ip is None:
        return []
    proc = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, timeout=30)
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts and parts[0].startswith(prefix):
            names.append(parts[0])
    return names


def _ns_pids(ns: str) -> list[int]:
    ip = _ip_bin()
    if ip is None:
        return []
    proc = subprocess.run([ip, "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_ns_processes(namespaces: Sequence[str]) -> None:
    for _ in range(3):
        pids = [p for ns in namespaces for p in _ns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _delete_namespaces(namespaces: Sequence[str]) -> list[str]:
    """Kill processes inside, delete the namespaces; return names still present."""
    namespaces = list(dict.fromkeys(namespaces))
    if not namespaces or _ip_bin() is None:
        return []
    _kill_ns_processes(namespaces)
    try:
        subprocess.run(
            [_ip(), "-force", "-batch", "-"],
            input="".join(f"netns del {ns}\n" for ns in namespaces),
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError):
        pass
    existing = set(list_namespaces())
    left = [ns for ns in namespaces if ns in existing]
    for ns in left:  # one retry, one by one
        subprocess.run([_ip(), "netns", "del", ns], capture_output=True, timeout=_IP_TIMEOUT)
    existing = set(list_namespaces())
    return [ns for ns in namespaces if ns in existing]


def _ns_age(ns: str) -> float:
    try:
        return time.time() - os.stat(f"/run/netns/{ns}").st_mtime
    except OSError:
        return float("inf")


def _owner_pid(ns: str) -> int | None:
    m = _AUTO_PREFIX_RE.match(ns)
    return int(m.group("pid")) if m else None


def cleanup_stale(
    prefix: str = DEFAULT_BASE, *, force: bool = False, min_age: float = 60.0
) -> list[str]:
    """Delete leftover namespaces starting with ``prefix``; return their names.

    Without ``force`` only namespaces with an auto-generated name
    (``{base}{pid}x{n}-...``) whose owner process is dead are removed, so labs of
    other running test processes are left alone; namespaces younger than
    ``min_age`` seconds are kept too (in case their owner lives in another pid
    namespace).  With ``force`` every namespace starting with ``prefix`` is
    removed (processes inside are killed).
    """
    victims = []
    for ns in list_namespaces(prefix):
        pid = _owner_pid(ns)
        if force:
            victims.append(ns)
        elif pid is not None and pid != os.getpid() and not _pid_alive(pid):
            if _ns_age(ns) >= min_age:
                victims.append(ns)
    _delete_namespaces(victims)
    return victims


_avail_cache: tuple[bool, str] | None = None


def netns_available(*, use_cache: bool = True) -> tuple[bool, str]:
    """``(True, "")`` if this process can build a lab, else ``(False, reason)``.

    Tries for real: creates a throwaway namespace with a veth pair inside and
    runs a process in it with ``ip netns exec``, then deletes it.  Set
    ``HYDRA_NETNS_DISABLE=1`` to force ``False`` (e.g. to check skip paths).
    """
    global _avail_cache
    if os.environ.get("HYDRA_NETNS_DISABLE", "") not in ("", "0"):
        return False, "disabled by HYDRA_NETNS_DISABLE"
    if use_cache and _avail_cache is not None:
        return _avail_cache
    result = _probe()
    _avail_cache = result
    return result


def _probe() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return False, f"not root (euid {os.geteuid()})"
    ip = _ip_bin()
    if ip is None:
        return False, "`ip` (iproute2) not found"
    ns = f"{DEFAULT_BASE}{os.getpid()}x{next(_counter)}-probe"
    steps = [
        ([ip, "netns", "add", ns], "`ip netns add` failed"),
        (
            [ip, "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
            "cannot create veth pairs",
        ),
        ([ip, "netns", "exec", ns, sys.executable, "-S", "-c", "pass"], "`ip netns exec` failed"),
    ]
    try:
        for argv, what in steps:
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                return False, f"{what}: {exc}"
            if proc.returncode != 0:
                return False, f"{what}: {proc.stderr.strip() or f'rc={proc.returncode}'}"
        return True, ""
    finally:
        subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=30)


# --------------------------------------------------------------------------- model


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


# --------------------------------------------------------------------------- CLI (scripts/netns-lab)

CLI_BASE = "hylab"


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _cli_labs(prefix: str | None) -> list[str]:
    """Lab prefixes of running/left-over CLI labs (or just ``prefix``)."""
    if prefix:
        return [prefix]
    found = []
    for ns in list_namespaces(CLI_BASE):
        m = _AUTO_PREFIX_RE.match(ns)
        if m and m.group("base") == CLI_BASE and m.group("prefix") not in found:
            found.append(m.group("prefix"))
    return found


def _one_cli_lab(prefix: str | None) -> Lab:
    labs = _cli_labs(prefix)
    if not labs:
        raise SystemExit("no lab is up (start one with: scripts/netns-lab up)")
    if len(labs) > 1:
        raise SystemExit(f"several labs are up, pick one with --prefix: {', '.join(labs)}")
    try:
        return Lab.attach(labs[0])
    except LabError as exc:
        raise SystemExit(str(exc)) from None


def _print_lab(lab: Lab, *, examples: bool) -> None:
    provs = lab.provider_names
    print(
        f"lab {lab.prefix!r}: core {lab.core_ns}; providers "
        + ", ".join(f"{p.name} ({p.ns}, {p.network})" for p in lab.providers)
    )
    header = f"  {'host':5} {'namespace':24}" + "".join(f" {f'{n} (eth{n})':16}" for n in provs)
    print(header)
    for h in lab.hosts:
        row = f"  {h.name:5} {h.ns:24}"
        for n in provs:
            addr = h.addrs[n]
            if not lab.owned:
                try:
                    addr += "" if lab.link_up(h, n) else " CUT"
                except LabError:
                    addr += " ?"
            row += f" {addr:16}"
        print(row)
    if not examples:
        return
    h1 = lab.hosts[0]
    h2 = lab.hosts[1] if len(lab.hosts) > 1 else h1
    a = provs[0]
    b = provs[1] if len(provs) > 1 else a
    print("\nexamples:")
    print(f"  ip netns exec {h1.ns} bash                      # a shell on {h1.name}")
    print(f"  ip -n {h1.ns} -4 addr; ip -n {h1.ns} route")
    print(
        f"  ip netns exec {h2.ns} python3 -m http.server 8080 --bind {h2.addrs[a]} &"
        f"   # a server on {h2.name}'s {a} feed"
    )
    print(
        f'  ip netns exec {h1.ns} python3 -c "import urllib.request as u;'
        f" print(u.urlopen('http://{h2.addrs[a]}:8080/').status)\""
    )
    print(f"  scripts/netns-lab cut {h2.name} {a}        # = ip -n {h2.ns} link set eth{a} down")
    print(f"  scripts/netns-lab restore {h2.name} {a}    # link up + routes back")
    print(f"  scripts/netns-lab ping {h1.name} {h2.addrs[b]}")
    print("  scripts/netns-lab status | down")


def _cmd_up(args) -> int:
    cleanup_stale(CLI_BASE)  # leftovers of killed `up` runs
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    lab = Lab(hosts=args.hosts, providers=args.providers, prefix=f"{CLI_BASE}{os.getpid()}x0-")
    lab.auto_prefix = True
    try:
        lab.start()
        _print_lab(lab, examples=True)
        if args.json:
            print(json.dumps(lab.describe(), indent=2))
        print(
            f"\nup for at most {args.duration:g} s; Ctrl-C or `scripts/netns-lab down` tears it down",
            flush=True,
        )
        deadline = time.monotonic() + args.duration
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
        print("duration elapsed", flush=True)
    except _Stop as stop:
        print(f"\n{stop}: tearing down", flush=True)
    finally:
        # A second signal during teardown must not interrupt it.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        left = lab.close()
        print("lab removed" if not left else f"could not remove: {left}", flush=True)
    return 0 if not left else 1


def _cmd_down(args) -> int:
    prefixes = _cli_labs(args.prefix)
    owners = {p: _owner_pid(p) for p in prefixes}
    for pid in {pid for pid in owners.values() if pid and pid != os.getpid()}:
        if _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid and _pid_alive(pid) for pid in owners.values()):
        time.sleep(0.1)
    removed = []
    for p in prefixes:
        removed += cleanup_stale(p, force=True)
    left = [ns for p in prefixes for ns in list_namespaces(p)]
    print(
        f"labs down: {', '.join(prefixes) or 'none'}"
        + (f" (removed {len(removed)} leftover namespaces)" if removed else "")
    )
    if left:
        print(f"could not remove: {left}")
        return 1
    return 0


def _cmd_status(args) -> int:
    prefixes = _cli_labs(args.prefix)
    if not prefixes:
        print("no lab is up")
    for p in prefixes:
        pid = _owner_pid(p)
        state = "running" if pid and _pid_alive(pid) else "owner gone (stale: run down)"
        print(f"{p}  owner pid {pid}: {state}")
        try:
            _print_lab(Lab.attach(p), examples=False)
        except LabError as exc:
            print(f"  {exc}")
    others = [ns for ns in list_namespaces(DEFAULT_BASE) if not ns.startswith(CLI_BASE)]
    if others and not args.prefix:
        by_owner: dict[str, int] = {}
        for ns in others:
            m = _AUTO_PREFIX_RE.match(ns)
            key = m.group("prefix") if m else ns
            by_owner[key] = by_owner.get(key, 0) + 1
        print(
            "other hydra test namespaces: " + ", ".join(f"{k} ({n})" for k, n in by_owner.items())
        )
    return 0


def _cmd_cut_restore(args) -> int:
    lab = _one_cli_lab(args.prefix)
    try:
        if args.cmd == "cut":
            lab.cut(args.host, args.provider, side=args.side)
        else:
            lab.restore(args.host, args.provider)
    except (KeyError, LabError) as exc:
        raise SystemExit(f"{args.cmd} failed: {exc}") from None
    _print_lab(lab, examples=False)
    return 0


def _cmd_ping(args) -> int:
    lab = _one_cli_lab(args.prefix)
    ok = lab.reachable(args.host, args.addr, timeout=args.timeout, port=args.port)
    print(
        f"{args.host} -> {args.addr}{f':{args.port}' if args.port else ''}: "
        + ("reachable" if ok else "UNREACHABLE")
    )
    return 0 if ok else 1


def _cmd_exec(args) -> int:
    lab = _one_cli_lab(args.prefix)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    argv = argv or [os.environ.get("SHELL", "/bin/sh")]
    try:
        return subprocess.call(lab.exec_argv(args.host, argv))
    except KeyError as exc:
        raise SystemExit(f"unknown host {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="netns-lab",
        description="Hydra network-namespace lab: test hosts with two feed links to two providers.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and keep it up (foreground)")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--providers", type=int, default=2)
    up.add_argument(
        "--duration",
        type=float,
        default=3600.0,
        help="tear down by itself after this many seconds (default 3600)",
    )
    up.add_argument("--json", action="store_true", help="also print the topology as JSON")
    for name, hlp in (("down", "tear down labs (and leftovers)"), ("status", "show labs")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--prefix")
    for name in ("cut", "restore"):
        p = sub.add_parser(name, help=f"{name} a host's link to a provider")
        p.add_argument("host")
        p.add_argument("provider")
        p.add_argument("--prefix")
        if name == "cut":
            p.add_argument("--side", choices=("host", "provider"), default="host")
    p = sub.add_parser("ping", help="reachability from a host to a lab address")
    p.add_argument("host")
    p.add_argument("addr")
    p.add_argument("--port", type=int)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--prefix")
    p = sub.add_parser("exec", help="run a command (default: a shell) inside a host")
    p.add_argument("host")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.add_argument("--prefix")
    args = ap.parse_args(argv)

    ok, reason = netns_available()
    if not ok:
        print(f"ip netns unavailable: {reason}", file=sys.stderr)
        return 2
    if args.cmd == "up":
        return _cmd_up(args)
    return {
        "down": _cmd_down,
        "status": _cmd_status,
        "cut": _cmd_cut_restore,
        "restore": _cmd_cut_restore,
        "ping": _cmd_ping,
        "exec": _cmd_exec,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
