"""A crowd in one process: N nodes started at once, nobody fails; any death is false.

Starts one node, then N-1 more all at once, each joining through a random one
of the first few (the node's default configuration; real Hydra nodes on
loopback, all in this process, so they share one core), waits until every
node holds every record, then watches for ``--window`` seconds. Nobody is
stopped, so every member declared DEAD by any node is a false death, and
every suspicion is a false one. Reports per run: start-up time, false
suspicions and false deaths (counted by every node's failure detector),
probe deadlines seen late (a starved process, see docs/protocol.md), and CPU.
Every run is bounded in time.

    .venv/bin/python benchmarks/bench_crowd.py --nodes 48 --runs 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import trio

from overlay.testing import default_services, fleet, join_addr, make_home

FIRST = 4  # the first nodes, started one by one; the rest join through them at once


def _count(nodes, state: str) -> int:
    total = 0
    for n in nodes:
        for metric in n.resilience.m_states.collect():
            for s in metric.samples:
                if s.name.endswith("_total") and s.labels.get("state") == state:
                    total += int(s.value)
    return total


async def one_run(n: int, window: float, seed: int, limit: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="hydra-crowd-") as tmp:
        root = Path(tmp)
        async with fleet(root, seed=seed) as f:
            t0 = time.monotonic()
            first = []
            for i in range(min(FIRST, n)):
                home = make_home(root / f"n{i}", ("relay",), defaults=True)
                join = [join_addr(first[-1])] if first else []
                first.append(await f.start(home, join=join, services=default_services()))
            async with trio.open_nursery() as starting:
                for i in range(len(first), n):
                    home = make_home(root / f"n{i}", ("relay",), defaults=True)
                    join = [join_addr(first[i % len(first)])]
                    starting.start_soon(
                        lambda h=home, j=join: f.start(h, join=j, services=default_services())
                    )
            started = time.monotonic() - t0
            nodes = list(f.nodes)
            converged = None
            with trio.move_on_after(limit):
                while not all(len(x.view) == n for x in nodes):
                    await trio.sleep(0.5)
                converged = time.monotonic() - t0
            s0, d0 = _count(nodes, "suspect"), _count(nodes, "dead")
            c0 = time.process_time()
            await trio.sleep(window)
            cpu = (time.process_time() - c0) / window
            return {
                "nodes": n,
                "started_s": round(started, 1),
                "all_records_s": round(converged, 1) if converged is not None else None,
                "false_suspicions_start": s0,
                "false_deaths_start": d0,
                "false_suspicions_window": _count(nodes, "suspect") - s0,
                "false_deaths_window": _count(nodes, "dead") - d0,
                "late_probes": sum(x.resilience.liveness.late_probes for x in nodes),
                "talked_suspects": sum(x.resilience.liveness.talked_suspects for x in nodes),
                "cpu_pct_per_node_window": round(100 * cpu / n, 2),
            }


async def main_async(args) -> dict:
    runs = []
    for r in range(args.runs):
        row = await one_run(args.nodes, args.window, args.seed + r, args.limit)
        print(json.dumps(row), file=sys.stderr)
        runs.append(row)
    deaths = sum(x["false_deaths_start"] + x["false_deaths_window"] for x in runs)
    return {
        "nodes": args.nodes,
        "runs": runs,
        "runs_without_false_deaths": sum(
            1 for x in runs if x["false_deaths_start"] + x["false_deaths_window"] == 0
        ),
        "false_deaths_total": deaths,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=48)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--window", type=float, default=60.0, help="seconds watched after start-up")
    p.add_argument("--limit", type=float, default=300.0, help="seconds to wait for all records")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    print(json.dumps(trio.run(main_async, args), indent=2))


if __name__ == "__main__":
    main()
