"""Idle cost of a node: CPU per node, and connections, for overlays of growing size.

Starts N real Hydra nodes in this process (loopback, the node's default
configuration), waits until every node holds every record, lets the overlay
settle, then measures this process's CPU time over a quiet window, and its
resident memory after it (Python keeps what it once used, so for the memory of
one size, give one size per run). Baseline, same run and same connection
graph: bare py-libp2p hosts (GossipSub on one topic, no Hydra logic) left idle
for the same window. Prints one JSON object; every loop is bounded in time.

    .venv/bin/python benchmarks/bench_idle.py --nodes 8 16 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from bench_propagation import start_baseline_hosts

from overlay.testing import default_services, overlay, wait_until

TOPIC = "bench/idle"


def _rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _cpu_over(window: float) -> float:
    c0 = time.process_time()
    await trio.sleep(window)
    return time.process_time() - c0


async def hydra_idle(n: int, settle: float, window: float, settings: dict):
    with tempfile.TemporaryDirectory() as tmp:
        async with overlay(Path(tmp), n, services_for=default_services, **settings) as nodes:
            await wait_until(lambda: all(len(x.view) == n for x in nodes), 300, 0.2)
            await trio.sleep(settle)
            cpu = await _cpu_over(window)
            rss = _rss_mb()
            graph = {x.node_id.peer_id(): [p.peer_id() for p in x.connected()] for x in nodes}
    return cpu / window / n, graph, rss


async def baseline_idle(graph: dict[str, list[str]], settle: float, window: float) -> float:
    async with trio.open_nursery() as nursery:
        hosts = await start_baseline_hosts(nursery, graph, TOPIC)
        subs = [await h.subscribe(TOPIC) for h in hosts]
        await trio.sleep(settle)
        cpu = await _cpu_over(window)
        for s in subs:
            await s.aclose()
        nursery.cancel_scope.cancel()
    return cpu / window / len(hosts)


async def main_async(args) -> dict:
    settings: dict = {"defaults": True}  # the node's default configuration
    if args.probe_interval is not None:
        settings["probe_interval"] = args.probe_interval
        settings["probe_timeout"] = args.probe_interval / 2
    if args.sync_idle_interval is not None:
        settings["sync_idle_interval"] = args.sync_idle_interval
    rows = []
    for n in args.nodes:
        print(f"{n} nodes ...", file=sys.stderr)
        per_node, graph, rss = await hydra_idle(n, args.settle, args.window, settings)
        base = await baseline_idle(graph, args.settle, args.window)
        conns = [len(v) for v in graph.values()]
        rows.append(
            {
                "nodes": n,
                "connections_median": statistics.median(conns),
                "hydra_cpu_pct_per_node": round(per_node * 100, 2),
                "baseline_cpu_pct_per_node": round(base * 100, 2),
                "ratio": round(per_node / base, 1) if base > 0 else None,
                # all nodes share this process: its RSS, and that over the nodes
                "rss_mb_process": round(rss),
                "rss_mb_per_node": round(rss / n, 1),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {"settings": settings, "window_s": args.window, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--probe-interval", type=float, default=None, help="node setting")
    p.add_argument("--sync-idle-interval", type=float, default=None, help="node setting")
    p.add_argument("--settle", type=float, default=20.0, help="seconds before measuring")
    p.add_argument("--window", type=float, default=20.0, help="seconds measured")
    args = p.parse_args()
    print(json.dumps(trio.run(main_async, args), indent=2))


if __name__ == "__main__":
    main()
