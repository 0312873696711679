"""Record propagation: time until a new record reaches every node, vs bare GossipSub.

Runs N real nodes (py-libp2p on loopback) in this process. For each trial a
random node re-publishes its record (seq+1); we time when each node accepts
it (from any layer: gossip, anti-entropy or DHT) and report the time until
50 %, 99 % and 100 % of the other nodes have it, plus gossip/sync traffic per
node. The baseline is bare py-libp2p GossipSub (Libp2pHost only, no Hydra
logic) on the same connection graph, publishing a payload of the same size,
measured in the same run.

    .venv/bin/python benchmarks/bench_propagation.py --nodes 50 --trials 10
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from overlay.crypto import SigningKey
from overlay.net.host import Libp2pHost
from overlay.records import Role
from overlay.testing import overlay, wait_until

TOPIC = "bench/baseline"


def reach_time(arrivals: list[float], total: int, q: float) -> float:
    """Time until ``q`` percent of ``total`` receivers had it (inf if never)."""
    need = max(1, math.ceil(q / 100 * total))
    arrivals = sorted(arrivals)
    return arrivals[need - 1] if len(arrivals) >= need else float("inf")


def _counter(c, **labels) -> float:
    total = 0.0
    for metric in c.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def hydra_trials(tmp: Path, n: int, trials: int, target_peers: int, seed: int):
    rng = random.Random(seed)
    results = []
    # N nodes share one CPU: liveness probes are slowed so that they do not dominate it
    async with overlay(
        tmp, n, seed=seed, target_peers=target_peers, probe_interval=5.0, probe_timeout=2.5
    ) as nodes:
        t = time.monotonic()
        await wait_until(lambda: all(len(x.view) == n for x in nodes), 300, 0.2)
        print(
            f"  {n} nodes converged {time.monotonic() - t:.1f} s after the last start",
            file=sys.stderr,
        )
        await trio.sleep(3)
        graph = {x.node_id.peer_id(): [p.peer_id() for p in x.connected()] for x in nodes}
        degrees = [len(v) for v in graph.values()]
        before = _traffic(nodes)
        wall0 = time.monotonic()
        for trial in range(trials):
            src = rng.choice(nodes)
            arrivals: dict[int, float] = {}
            roles = Role.RELAY | (Role.ENTRY if trial % 2 == 0 else Role(0))
            chans = [x.record_events() for x in nodes]

            want_seq = src.home.last_seq() + 1

            async def watch(i, ch, nid=src.node_id, seq=want_seq, arrivals=arrivals):
                async for rec in ch:
                    if rec.node_id == nid and rec.seq == seq:
                        arrivals[i] = time.monotonic()
                        return

            async with trio.open_nursery() as nursery:
                for i, ch in enumerate(chans):
                    if nodes[i] is not src:
                        nursery.start_soon(watch, i, ch)
                t0 = time.monotonic()
                rec = await src.publish_own("bench", roles=roles)
                assert rec.seq == want_seq
                with trio.move_on_after(20):
                    while len(arrivals) < n - 1:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            for x in nodes:
                x._record_events.clear()
            lat = sorted(a - t0 for a in arrivals.values())
            results.append(
                {
                    "reached": len(lat) / (n - 1),
                    "p50": reach_time(lat, n - 1, 50),
                    "p99": reach_time(lat, n - 1, 99),
                    "all": reach_time(lat, n - 1, 100),
                }
            )
            await trio.sleep(1.0)
        elapsed = time.monotonic() - wall0
        after = _traffic(nodes)
    per_node = {k: (after[k] - before[k]) / n / elapsed for k in after}
    return results, graph, degrees, per_node


def _traffic(nodes) -> dict[str, float]:
    out = {"gossip_msgs": 0.0, "gossip_bytes": 0.0, "sync_bytes": 0.0, "sync_rounds": 0.0}
    for x in nodes:
        m = x.metrics
        out["gossip_msgs"] += _counter(m.gossip_messages)
        out["gossip_bytes"] += _counter(m.gossip_bytes)
        out["sync_bytes"] += _counter(m.sync_bytes)
        out["sync_rounds"] += _counter(m.sync_rounds)
    return out


async def baseline_trials(graph: dict[str, list[str]], trials: int, size: int, seed: int):
    rng = random.Random(seed)
    keys = [SigningKey.generate() for _ in graph]
    ids = list(graph)
    index = {pid: i for i, pid in enumerate(ids)}
    results = []
    async with trio.open_nursery() as nursery:
        hosts = []
        for k in keys:
            h = Libp2pHost(k, ["/ip4/127.0.0.1/tcp/0"], gossip_topics=[TOPIC], enable_dht=False)
            hosts.append(await nursery.start(h.run))
        for pid, peers in graph.items():
            i = index[pid]
            for p in peers:
                j = index.get(p)
                if j is not None and j > i:
                    await hosts[i].connect(hosts[j].listen_addrs()[0])
        subs = [await h.subscribe(TOPIC) for h in hosts]
        await trio.sleep(3)  # mesh formation (heartbeat 1 s)
        for trial in range(trials):
            src = rng.randrange(len(hosts))
            payload = trial.to_bytes(4, "big") + random.randbytes(size - 4)
            arrivals: dict[int, float] = {}

            async def watch(i, sub, payload=payload, arrivals=arrivals):
                while True:
                    msg = await sub.receive()
                    if msg.data == payload:
                        arrivals[i] = time.monotonic()
                        return

            async with trio.open_nursery() as inner:
                for i, sub in enumerate(subs):
                    if i != src:
                        inner.start_soon(watch, i, sub)
                t0 = time.monotonic()
                await hosts[src].publish(TOPIC, payload)
                with trio.move_on_after(20):
                    while len(arrivals) < len(hosts) - 1:
                        await trio.sleep(0.01)
                inner.cancel_scope.cancel()
            lat = sorted(a - t0 for a in arrivals.values())
            n1 = len(hosts) - 1
            results.append(
                {
                    "reached": len(lat) / n1,
                    "p50": reach_time(lat, n1, 50),
                    "p99": reach_time(lat, n1, 99),
                    "all": reach_time(lat, n1, 100),
                }
            )
            await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    return results


def summarize(name: str, results: list[dict]) -> dict:
    def med(key):
        vals = [r[key] for r in results]
        return statistics.median(vals)

    return {
        "name": name,
        "trials": len(results),
        "reached_all_trials": sum(r["reached"] == 1.0 for r in results),
        "median_time_to_50pct_s": round(med("p50"), 3),
        "median_time_to_99pct_s": round(med("p99"), 3),
        "median_time_to_100pct_s": round(med("all"), 3),
        "worst_time_to_99pct_s": round(max(r["p99"] for r in results), 3),
    }


async def main_async(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="hydra-bench-") as tmp:
        print(f"hydra overlay, {args.nodes} nodes ...", file=sys.stderr)
        hydra, graph, degrees, per_node = await hydra_trials(
            Path(tmp), args.nodes, args.trials, args.target_peers, args.seed
        )
    print("bare gossipsub on the same graph ...", file=sys.stderr)
    base = await baseline_trials(graph, args.trials, 300, args.seed)
    h, b = summarize("hydra", hydra), summarize("bare-gossipsub", base)
    return {
        "nodes": args.nodes,
        "target_peers": args.target_peers,
        "mean_degree": round(statistics.mean(degrees), 1),
        "hydra": h,
        "baseline": b,
        "ratio_99pct_hydra_over_baseline": round(
            h["median_time_to_99pct_s"] / b["median_time_to_99pct_s"], 2
        ),
        "per_node_per_second": {k: round(v, 2) for k, v in per_node.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--target-peers", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    out = trio.run(main_async, args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
