"""Cost of the web console to the node: CPU of a node process with one open browser vs none.

Starts a small overlay of real ``overlay run`` processes on loopback (default
configuration, as ``overlay/devtools/cluster.py`` starts them), then measures one
node's CPU time (``/proc/PID/stat``: user + system) over alternating windows:
no browser, then one headless Chromium showing the node's console (logged in
with a one-time link; the page holds the ``/console/stream`` event stream open
and redraws every second), and so on for ``--rounds`` rounds. The difference of
the means is the page's cost. The browser's own CPU is not the node's and is
not counted.

Second, noise-free figures, timed in this process on an in-process node: the
node's work per stream message (build the snapshot, encode it as JSON; the
stream sends one a second), and per tick of the console's sampler, which every
node runs once a second whether a browser is open or not.

Prints one JSON object. Needs chromium, chromium-driver and selenium.

    .venv/bin/python benchmarks/bench_console.py --window 30 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from overlay.console import browser
from overlay.control import read_token
from overlay.devtools.cluster import Cluster

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def cpu_share(pid: int, seconds: float) -> float:
    """The share of one core the process used over the next ``seconds``."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def per_message(samples: int = 300) -> dict:
    """CPU per stream message of an in-process node (snapshot + JSON), in ms."""
    import trio

    from overlay.console.service import ConsoleService
    from overlay.testing import overlay

    out = {}

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with overlay(Path(tmp), 3, roles=[["relay"], ["exit", "relay"], ["relay"]]) as ns:
                await trio.sleep(5)
                svc: ConsoleService = ns[0].console
                for _ in range(20):
                    ns[0].events.add("join", "warm-up event")
                c0 = time.process_time()
                for _ in range(samples):
                    svc._cache = None  # as after SNAPSHOT_TTL: rebuilt for every message
                    json.dumps(svc.snapshot(since=svc.node.events.last_seq - 2)).encode()
                ms = (time.process_time() - c0) / samples * 1000
                # the sampler every node runs, browser or not: one tick a second
                c0 = time.process_time()
                for _ in range(samples):
                    svc._step(ns[0].clock())
                tick_ms = (time.process_time() - c0) / samples * 1000
                full = len(json.dumps(svc.snapshot(history=True)))
                out.update(
                    ms_per_sampler_tick=round(tick_ms, 3),
                    ms_per_message=round(ms, 3),
                    message_bytes=len(json.dumps(svc.snapshot(since=0))),
                    first_message_bytes=full,
                )

    trio.run(main)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--window", type=float, default=30.0, help="seconds per measurement window")
    ap.add_argument("--rounds", type=int, default=2, help="(without, with browser) pairs")
    ap.add_argument("--settle", type=float, default=15.0)
    ap.add_argument("--no-per-message", action="store_true")
    args = ap.parse_args(argv)
    why = browser.missing()
    if why:
        print(f"needs {why}", file=sys.stderr)
        return 2
    roles = [["relay"], ["exit", "relay"]] + [["relay"]] * max(0, args.nodes - 2)
    result: dict = {"nodes": args.nodes, "window_s": args.window, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="hydra-bench-console-") as tmp:
        cluster = Cluster(Path(tmp), roles)
        try:
            cluster.start()
            node = cluster.nodes[0]
            pid = node.proc.pid
            time.sleep(args.settle)
            without, with_page = [], []
            for _ in range(args.rounds):
                without.append(cpu_share(pid, args.window))
                drv = browser.chromium()
                try:
                    drv.get(browser.login_url(node.control, read_token(node.home.path)))
                    time.sleep(3)  # page loaded, stream open
                    assert drv.current_url.endswith("/console"), drv.current_url
                    with_page.append(cpu_share(pid, args.window))
                    errors = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
                    assert not errors, errors
                finally:
                    drv.quit()
        finally:
            cluster.stop()
    idle, shown = statistics.mean(without), statistics.mean(with_page)
    result.update(
        node_cpu_without_browser_pct=[round(x * 100, 2) for x in without],
        node_cpu_with_browser_pct=[round(x * 100, 2) for x in with_page],
        mean_without_pct=round(idle * 100, 2),
        mean_with_pct=round(shown * 100, 2),
        page_cost_pct_of_a_core=round((shown - idle) * 100, 2),
    )
    if not args.no_per_message:
        pm = per_message()
        pm["pct_of_a_core_at_1_msg_per_s"] = round(pm["ms_per_message"] / 10, 3)
        pm["sampler_pct_of_a_core"] = round(pm["ms_per_sampler_tick"] / 10, 3)
        result["per_message"] = pm
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
