"""Running ``ip`` (iproute2): namespace listing, deletion, stale-lab cleanup, the probe.

Shared by the lab (``lab.py``) and its command line (``cli.py``).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

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
