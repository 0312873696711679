"""``scripts/netns-lab``: build a lab and keep it up, cut and restore feeds by hand."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from .ip import (
    _AUTO_PREFIX_RE,
    DEFAULT_BASE,
    LabError,
    _owner_pid,
    _pid_alive,
    cleanup_stale,
    list_namespaces,
    netns_available,
)
from .lab import Lab

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
