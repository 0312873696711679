"""Record propagation: time until a new record reaches every node, vs bare GossipSub.

Runs N real nodes (py-libp2p on loopback), by default all in this process.
With ``--procs P`` they are spread over P worker processes (node i in worker
i % P, see ``_propagation_worker.py``), so that one core no longer has to run
N nodes' worth of protocol work. For each trial a random node re-publishes its
record (seq+1); we time when each node accepts it (from any layer: gossip,
anti-entropy or DHT) and report the time until 50 %, 99 % and 100 % of the
other nodes have it, plus gossip/sync traffic per node. The baseline is bare
py-libp2p GossipSub (Libp2pHost only, no Hydra logic) on the same connection
graph, publishing a payload of the same size, measured in the same run and
with the same split over processes.

    .venv/bin/python benchmarks/bench_propagation.py --nodes 50 --trials 10
    .venv/bin/python benchmarks/bench_propagation.py --nodes 50 --trials 10 --procs 50
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from overlay.config import Config
from overlay.crypto import SigningKey
from overlay.net.host import Libp2pHost
from overlay.records import Role
from overlay.testing import default_services, overlay, wait_until

TOPIC = "bench/baseline"
WORKER = Path(__file__).with_name("_propagation_worker.py")
WORKER_LIMIT = 1800.0  # seconds; each worker process ends itself after this
START_BATCH = 8  # --procs: nodes joining at once (at most one per worker)


def reach_time(arrivals: list[float], total: int, q: float) -> float:
    """Time until ``q`` percent of ``total`` receivers had it (inf if never)."""
    need = max(1, math.ceil(q / 100 * total))
    arrivals = sorted(arrivals)
    return arrivals[need - 1] if len(arrivals) >= need else float("inf")


def trial_stats(lat: list[float], total: int) -> dict:
    return {
        "reached": len(lat) / total,
        "p50": reach_time(lat, total, 50),
        "p99": reach_time(lat, total, 99),
        "all": reach_time(lat, total, 100),
    }


def _counter(c, **labels) -> float:
    total = 0.0
    for metric in c.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def node_settings(args) -> dict:
    """Config of every Hydra node: the default configuration (``defaults``), apart
    from what the command line sets explicitly."""
    out = {"defaults": True}
    if args.sync_interval is not None:
        out["sync_interval"] = args.sync_interval
    for item in args.set:
        key, _, value = item.partition("=")
        out[key] = _number(value)
    return out


def _number(text: str):
    """``--set`` values: an int or a float when they parse as one, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


async def hydra_trials(
    tmp: Path, n: int, trials: int, target_peers: int, seed: int, settings: dict
):
    rng = random.Random(seed)
    results = []
    async with overlay(
        tmp, n, seed=seed, target_peers=target_peers, services_for=default_services, **settings
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
            results.append(trial_stats(lat, n - 1))
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
        for layer in LAYERS:
            out[f"accepted_{layer}"] = out.get(f"accepted_{layer}", 0.0) + _counter(
                m.records_accepted, source=layer
            )
    return out


LAYERS = ("gossip", "sync", "dht")


def layer_shares(per_node: dict[str, float]) -> dict[str, float]:
    """Which layer delivered the records accepted during the trials (fractions)."""
    got = {layer: per_node.pop(f"accepted_{layer}", 0.0) for layer in LAYERS}
    total = sum(got.values()) or 1.0
    return {layer: round(v / total, 3) for layer, v in got.items()}


async def start_baseline_hosts(
    nursery: trio.Nursery, graph: dict[str, list[str]], topic: str, keys=None
) -> list[Libp2pHost]:
    """Bare py-libp2p hosts (GossipSub on ``topic``, no DHT), one per node of
    ``graph`` (peer id -> connected peer ids), connected like it."""
    ids = list(graph)
    index = {pid: i for i, pid in enumerate(ids)}
    keys = keys or [SigningKey.generate() for _ in ids]
    hosts = []
    for k in keys:
        h = Libp2pHost(k, ["/ip4/127.0.0.1/tcp/0"], gossip_topics=[topic], enable_dht=False)
        hosts.append(await nursery.start(h.run))
    for pid, peers in graph.items():
        i = index[pid]
        for p in peers:
            j = index.get(p)
            if j is not None and j > i:
                await hosts[i].connect(hosts[j].listen_addrs()[0])
    return hosts


async def baseline_trials(graph: dict[str, list[str]], trials: int, size: int, seed: int):
    rng = random.Random(seed)
    keys = [SigningKey.generate() for _ in graph]
    results = []
    async with trio.open_nursery() as nursery:
        hosts = await start_baseline_hosts(nursery, graph, TOPIC, keys)
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
            results.append(trial_stats(lat, len(hosts) - 1))
            await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    return results


# ---------------------------------------------------------------- multi-process mode (--procs)
class JsonLines:
    """One JSON object per line over a pair of trio streams (parent <-> worker)."""

    MAX_LINE = 16 * 1024 * 1024

    def __init__(self, send: trio.abc.SendStream, recv: trio.abc.ReceiveStream) -> None:
        self._send, self._recv, self._buf = send, recv, b""

    async def send(self, obj: dict) -> None:
        await self._send.send_all(json.dumps(obj).encode() + b"\n")

    async def receive(self) -> dict | None:
        """The next object, or None at end of stream."""
        while b"\n" not in self._buf:
            if len(self._buf) > self.MAX_LINE:
                raise ValueError("protocol line too long")
            chunk = await self._recv.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)


class WorkerProc:
    """A worker process running some of the nodes; ``call`` sends one command."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.io = JsonLines(proc.stdin, proc.stdout)
        self.lock = trio.Lock()

    async def call(self, cmd: str, timeout: float = 300.0, **kw) -> dict:
        try:
            with trio.fail_after(timeout):
                async with self.lock:
                    await self.io.send({"cmd": cmd, **kw})
                    reply = await self.io.receive()
        except trio.BrokenResourceError:
            reply = None
        if reply is None:
            raise RuntimeError(f"worker {self.proc.pid} exited during {cmd!r}")
        if "error" in reply:
            raise RuntimeError(f"worker {self.proc.pid}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        try:
            await self.call("stop", timeout=60)
        except (RuntimeError, trio.TooSlowError, trio.BrokenResourceError):
            return
        await self.proc.wait()


@asynccontextmanager
async def worker_procs(p: int) -> AsyncIterator[list[WorkerProc]]:
    """Start ``p`` workers; stop them on the way out, killing whatever is left."""
    procs: list[trio.Process] = []
    try:
        for _ in range(p):
            cmd = [sys.executable, str(WORKER), "--limit", str(WORKER_LIMIT)]
            procs.append(
                await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            )
        workers = [WorkerProc(x) for x in procs]
        yield workers
        with trio.move_on_after(90):
            async with trio.open_nursery() as nursery:
                for w in workers:
                    nursery.start_soon(w.stop)
    finally:
        for x in procs:
            if x.returncode is None:
                x.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            for x in procs:
                await x.wait()


async def on_all(workers: list[WorkerProc], cmd: str, **kw) -> list[dict]:
    """Send ``cmd`` to every worker at once; the replies in worker order."""
    out: list[dict] = [{} for _ in workers]

    async def one(k: int) -> None:
        out[k] = await workers[k].call(cmd, **kw)

    async with trio.open_nursery() as nursery:
        for k in range(len(workers)):
            nursery.start_soon(one, k)
    return out


async def per_worker(workers: list[WorkerProc], n: int, fn) -> None:
    """``await fn(i)`` for every node i: in order within a worker, workers in parallel."""

    async def run(k: int) -> None:
        for i in range(k, n, len(workers)):
            await fn(i)

    async with trio.open_nursery() as nursery:
        for k in range(len(workers)):
            nursery.start_soon(run, k)


def proc_stats(workers: list[WorkerProc]) -> tuple[list[float], list[float]]:
    """Resident memory (MB) and CPU time used so far (s) of each worker, from /proc."""
    rss, cpu = [], []
    tick = os.sysconf("SC_CLK_TCK")
    for w in workers:
        try:
            status = Path(f"/proc/{w.proc.pid}/status").read_text()
            stat = Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        rss.extend(int(x.split()[1]) / 1024 for x in status.splitlines() if x.startswith("VmRSS"))
        cpu.append((int(stat[11]) + int(stat[12])) / tick)  # utime + stime
    return rss, cpu


async def hydra_trials_procs(
    workers: list[WorkerProc],
    tmp: Path,
    n: int,
    trials: int,
    target_peers: int,
    seed: int,
    settings: dict,
):
    """``hydra_trials`` with node i in worker i % P; same joins, trials and output."""
    p = len(workers)
    join_rng, rng = random.Random(seed), random.Random(seed)
    addrs, peers = [""] * n, [""] * n

    async def start(i: int, join: list[str]) -> None:
        r = await workers[i % p].call(
            "hydra_start",
            i=i,
            home=str(tmp / f"n{i}"),
            join=join,
            seed=seed,
            target_peers=target_peers,
            settings=settings,
        )
        addrs[i], peers[i] = r["addr"], r["peer"]

    # batches of at most P nodes (one per worker), each joining through a random
    # node of an earlier batch; batches grow 1, 1, 2, 4, ... up to min(P, START_BATCH)
    t = time.monotonic()
    started, shown = 0, t
    while started < n:
        batch = range(started, min(n, started + max(1, min(p, started, START_BATCH))))
        joins = [[addrs[join_rng.choice(range(started))]] if started else [] for _ in batch]
        async with trio.open_nursery() as nursery:
            for i, join in zip(batch, joins, strict=True):
                nursery.start_soon(start, i, join)
        started = batch.stop
        if time.monotonic() - shown >= 15 and started < n:
            shown = time.monotonic()
            print(f"  {started} of {n} nodes started after {shown - t:.0f} s", file=sys.stderr)
    print(f"  {n} nodes started in {time.monotonic() - t:.1f} s", file=sys.stderr)

    t = time.monotonic()
    shown = t
    with trio.fail_after(300):
        while True:
            replies = await on_all(workers, "counts")
            counts = [c for r in replies for _, c in r["counts"]]
            if all(c == n for c in counts):
                break
            if time.monotonic() - shown >= 15:
                shown = time.monotonic()
                peers = [c for r in replies for c in r["peers"]]
                ok, failed = (sum(r["sync"][k] for r in replies) for k in ("ok", "failed"))
                sus, dead = (sum(r["liveness"][k] for r in replies) for k in ("suspect", "dead"))
                print(
                    f"  {shown - t:.0f} s: {sum(c == n for c in counts)} of {n} nodes hold all"
                    f" {n} records; fewest held {min(counts)}, median"
                    f" {statistics.median(counts):.0f}; connections min {min(peers)}, median"
                    f" {statistics.median(peers):.0f}; sync rounds ok {ok:.0f}, failed"
                    f" {failed:.0f}; suspicions {sus:.0f}, deaths {dead:.0f} (all false);"
                    f" load average {os.getloadavg()[0]:.1f}",
                    file=sys.stderr,
                )
            await trio.sleep(0.5)
    print(
        f"  {n} nodes converged {time.monotonic() - t:.1f} s after the last start",
        file=sys.stderr,
    )
    _, cpu0 = proc_stats(workers)
    await trio.sleep(3)
    rss, cpu1 = proc_stats(workers)
    if rss and len(cpu0) == len(cpu1):
        print(
            f"  workers: RSS {min(rss):.0f}-{max(rss):.0f} MB each ({sum(rss):.0f} MB total); "
            f"CPU in the 3 s before the trials: {sum(cpu1) - sum(cpu0):.2f} s "
            f"= {(sum(cpu1) - sum(cpu0)) / 3 / n * 100:.1f} % of a core per node",
            file=sys.stderr,
        )
    graph: dict[str, list[str]] = {}
    for r in await on_all(workers, "graph"):
        graph.update(r["graph"])
    degrees = [len(v) for v in graph.values()]

    async def traffic() -> dict[str, float]:
        total: dict[str, float] = {}
        for r in await on_all(workers, "traffic"):
            for k, v in r["traffic"].items():
                total[k] = total.get(k, 0.0) + v
        return total

    results = []
    before = await traffic()
    wall0 = time.monotonic()
    for trial in range(trials):
        src = rng.choice(range(n))
        roles = Role.RELAY | (Role.ENTRY if trial % 2 == 0 else Role(0))
        want_seq = (await workers[src % p].call("next_seq", i=src))["seq"]
        await on_all(workers, "watch", src=src, peer=peers[src], seq=want_seq)
        pub = await workers[src % p].call("publish", i=src, roles=int(roles))
        assert pub["seq"] == want_seq
        replies = await on_all(workers, "wait", until=time.monotonic() + 20)
        lat = sorted(a - pub["t0"] for r in replies for _, a in r["arrivals"])
        results.append(trial_stats(lat, n - 1))
        await trio.sleep(1.0)
    elapsed = time.monotonic() - wall0
    after = await traffic()
    per_node = {k: (after[k] - before[k]) / n / elapsed for k in after}
    return results, graph, degrees, per_node, peers


async def baseline_trials_procs(
    workers: list[WorkerProc],
    graph: dict[str, list[str]],
    ids: list[str],
    trials: int,
    size: int,
    seed: int,
):
    """``baseline_trials`` with host i (in Hydra node i's place) in worker i % P."""
    p, n = len(workers), len(ids)
    rng = random.Random(seed)
    index = {pid: i for i, pid in enumerate(ids)}
    addrs = [""] * n

    async def start(i: int) -> None:
        addrs[i] = (await workers[i % p].call("base_start", i=i))["addr"]

    async def connect(i: int) -> None:
        # the same edges as the in-process baseline: i dials each listed peer j > i
        targets = [addrs[j] for x in graph.get(ids[i], []) if (j := index.get(x, -1)) > i]
        await workers[i % p].call("base_connect", i=i, addrs=targets)

    await per_worker(workers, n, start)
    await per_worker(workers, n, connect)
    await trio.sleep(3)  # mesh formation (heartbeat 1 s)
    results = []
    for trial in range(trials):
        src = rng.randrange(n)
        payload = (trial.to_bytes(4, "big") + random.randbytes(size - 4)).hex()
        await on_all(workers, "watch", src=src, payload=payload)
        pub = await workers[src % p].call("publish", i=src, payload=payload)
        replies = await on_all(workers, "wait", until=time.monotonic() + 20)
        lat = sorted(a - pub["t0"] for r in replies for _, a in r["arrivals"])
        results.append(trial_stats(lat, n - 1))
        await trio.sleep(1.0)
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
    procs = max(1, min(args.procs, args.nodes))
    run = (args.nodes, args.trials, args.target_peers, args.seed, node_settings(args))
    if procs == 1:
        with tempfile.TemporaryDirectory(prefix="hydra-bench-") as tmp:
            print(f"hydra overlay, {args.nodes} nodes ...", file=sys.stderr)
            hydra, graph, degrees, per_node = await hydra_trials(Path(tmp), *run)
            load = os.getloadavg()[0]
        print("bare gossipsub on the same graph ...", file=sys.stderr)
        base = await baseline_trials(graph, args.trials, 300, args.seed)
    else:
        async with worker_procs(procs) as workers:
            with tempfile.TemporaryDirectory(prefix="hydra-bench-") as tmp:
                print(
                    f"hydra overlay, {args.nodes} nodes in {procs} processes ...", file=sys.stderr
                )
                hydra, graph, degrees, per_node, ids = await hydra_trials_procs(
                    workers, Path(tmp), *run
                )
                load = os.getloadavg()[0]  # how busy the CPUs were during the Hydra trials
                # Hydra's results first: kept if the baseline fails
                print(f"  {summarize('hydra', hydra)}", file=sys.stderr)
                if not args.baseline_alongside:
                    await on_all(workers, "reset")  # every Hydra node stops before the baseline
                print("bare gossipsub on the same graph ...", file=sys.stderr)
                base = await baseline_trials_procs(workers, graph, ids, args.trials, 300, args.seed)
    h, b = summarize("hydra", hydra), summarize("bare-gossipsub", base)
    return {
        "nodes": args.nodes,
        "procs": procs,
        "target_peers": args.target_peers,
        "node_settings": node_settings(args),
        "baseline_alongside": bool(args.baseline_alongside and procs > 1),
        "mean_degree": round(statistics.mean(degrees), 1),
        "hydra": h,
        "baseline": b,
        "ratio_99pct_hydra_over_baseline": round(
            h["median_time_to_99pct_s"] / b["median_time_to_99pct_s"], 2
        ),
        "records_accepted_by_layer": layer_shares(per_node),
        "cpus": os.cpu_count(),
        "load_1min_after_hydra_trials": round(load, 1),
        "per_node_per_second": {k: round(v, 2) for k, v in per_node.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--target-peers", type=int, default=Config().target_peers, help="node setting")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--baseline-alongside",
        action="store_true",
        help="with --procs: keep the Hydra nodes running while the baseline is measured, "
        "so both see the same CPU load",
    )
    p.add_argument(
        "--sync-interval",
        type=float,
        default=None,
        help="anti-entropy interval while the membership changes (node default 0.5 s)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another node setting, to explore (the targets hold for the defaults only)",
    )
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        help="worker processes; node i runs in worker i %% P (1: all in this process)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    out = trio.run(main_async, args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
