"""Record-flood soak: do three honest nodes survive a flood of forged members?

Starts an honest overlay of three ``overlay run`` processes on 127.0.0.1 (a
relay/entry, an exit, a standby exit promoted to serve as the second exit), all
in their default configuration except ``target_live_exits = 2``. Then each of
``--attackers`` hostile identities (py-libp2p hosts dialling from 127.0.0.2,
127.0.0.3, ...) pushes ``--records`` fresh self-signed records over anti-entropy
into the honest nodes, as fast as they take them (one round of 256 records per
node per 0.55 s, the responders' rate limit, backing off when refused). The
records' feeds point at a local listener that counts the dials the honest nodes
make to it (reflection).

Then it watches the honest nodes for ``--soak`` seconds, reporting every
``--interval`` seconds: process alive, ``overlay status`` answers, RSS, CPU %,
records held and unverified records held (``admission`` in the status), TCP
connections, and honest gossip propagation (a fourth honest node restarts and
publishes a new record; the time until every honest node holds it). A summary
table at the end; ``--json`` prints every sample as JSON.

    .venv/bin/python benchmarks/bench_flood.py --attackers 1 --records 100000 --soak 1800
    .venv/bin/python benchmarks/bench_flood.py --attackers 10 --records 10000 --soak 1800

Bounded: the flood stops after ``--push-timeout`` seconds whatever is left, the
soak after ``--soak`` seconds; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.attacks.harness import (  # noqa: E402
    ATTACKER_IPS,
    Attacker,
    FeedSink,
    HonestOverlay,
    RecordForge,
    take_baseline,
)


async def sample(ov: HonestOverlay, prev_cpu: dict, t: float, since_flood: float) -> dict:
    """One row per honest node, plus honest gossip propagation."""
    rows = {}
    statuses = {}

    async def status(n):
        statuses[n.name] = await n.status(timeout=30) if n.alive else None

    async with trio.open_nursery() as nursery:
        for n in ov.nodes:
            nursery.start_soon(status, n)
    for n in ov.nodes:
        cpu = n.cpu_seconds()
        last = prev_cpu.get(n.name)
        pct = None
        if cpu is not None and last is not None and t > last[1]:
            pct = round(100 * (cpu - last[0]) / (t - last[1]), 1)
        if cpu is not None:
            prev_cpu[n.name] = (cpu, t)
        st = statuses.get(n.name)
        adm = (st or {}).get("admission") or {}
        rss = n.rss_kb()
        rows[n.name] = {
            "alive": n.alive,
            "status": st is not None,
            "rss_mb": None if rss is None else round(rss / 1024, 1),
            "cpu_pct": pct,
            "records": (st or {}).get("records"),
            "unverified": adm.get("unverified"),
            "max_unverified": adm.get("max_unverified"),
            "tcp": n.tcp_connections(),
        }
    took, missing = await ov.honest_gossip(bound=60.0)
    return {
        "t": round(since_flood, 1),
        "nodes": rows,
        "gossip_s": None if took is None else round(took, 1),
        "gossip_missing": missing,
    }


def print_row(row: dict) -> None:
    parts = [f"t+{row['t']:>6.0f}s"]
    for name, r in row["nodes"].items():
        if not r["alive"]:
            parts.append(f"{name}: DEAD")
            continue
        parts.append(
            f"{name}: {'ok' if r['status'] else 'NO STATUS'} rss {r['rss_mb']} MB "
            f"cpu {r['cpu_pct']}% rec {r['records']} unv {r['unverified']} tcp {r['tcp']}"
        )
    g = row["gossip_s"]
    missed = "MISSED " + ",".join(row["gossip_missing"])
    parts.append(f"gossip {g:.1f} s" if g is not None else f"gossip {missed}")
    print(" | ".join(parts), file=sys.stderr, flush=True)


def summarize(before: dict, rows: list[dict], ov: HonestOverlay) -> list[dict]:
    out = []
    for n in ov.nodes:
        rs = [r["nodes"][n.name] for r in rows]

        def vals(key, rs=rs):
            return [r[key] for r in rs if r.get(key) is not None]

        died = next((r["t"] for r in rows if not r["nodes"][n.name]["alive"]), None)
        out.append(
            {
                "node": n.name,
                "alive_at_end": rs[-1]["alive"] if rs else n.alive,
                "died_at_s": died,
                "status_answers": f"{sum(r['status'] for r in rs)}/{len(rs)}",
                "rss_mb_before": before["rss_mb"].get(n.name),
                "rss_mb_max": max(vals("rss_mb"), default=None),
                "rss_mb_end": rs[-1]["rss_mb"] if rs else None,
                "cpu_pct_before": before["cpu_pct"].get(n.name),
                "cpu_pct_median": (
                    round(statistics.median(vals("cpu_pct")), 1) if vals("cpu_pct") else None
                ),
                "cpu_pct_max": max(vals("cpu_pct"), default=None),
                "records_max": max(vals("records"), default=None),
                "unverified_max": max(vals("unverified"), default=None),
                "max_unverified": next(iter(vals("max_unverified")), None),
                "tcp_max": max(vals("tcp"), default=None),
            }
        )
    return out


def print_summary(summary: list[dict], rows: list[dict], flood: dict) -> None:
    cols = list(summary[0])
    widths = {c: max(len(c), *(len(str(s[c])) for s in summary)) for c in cols}
    print("\nflood: " + ", ".join(f"{k} {v}" for k, v in flood.items()))
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for s in summary:
        print("  ".join(str(s[c]).ljust(widths[c]) for c in cols))
    g = [r["gossip_s"] for r in rows if r["gossip_s"] is not None]
    missed = sum(1 for r in rows if r["gossip_s"] is None)
    if g:
        print(
            f"honest gossip: median {statistics.median(g):.1f} s, max {max(g):.1f} s "
            f"(CLI polling resolution), missed {missed}/{len(rows)}"
        )
    else:
        print(f"honest gossip: missed {missed}/{len(rows)}")


async def flood(ov: HonestOverlay, sink: FeedSink, args) -> dict:
    forge = RecordForge(b"bench-flood", [sink.feed])
    print(f"forging {args.attackers} x {args.records} records ...", file=sys.stderr, flush=True)
    batches = [forge.batch(i * args.records, args.records) for i in range(args.attackers)]
    stats = {}

    async def one(i: int) -> None:
        async with Attacker(i, ATTACKER_IPS[i % len(ATTACKER_IPS)]) as attacker:
            peers = [p for p in [await attacker.connect(n.addr) for n in ov.nodes] if p]
            if peers:
                stats[i] = await attacker.sync_push(peers, batches[i], deadline=args.push_timeout)

    t0 = trio.current_time()
    print("flooding ...", file=sys.stderr, flush=True)
    async with trio.open_nursery() as n:
        for i in range(args.attackers):
            n.start_soon(one, i)
    return {
        "attackers": args.attackers,
        "records_each": args.records,
        "pushed": sum(s.records for s in stats.values()),
        "rounds": sum(s.rounds for s in stats.values()),
        "refused_rounds": sum(s.refused for s in stats.values()),
        "seconds": round(trio.current_time() - t0, 1),
        "dials_to_attacker_feed": sink.count,
    }


async def main_async(args) -> dict:
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="hydra-flood-"))
    print(f"homes and logs under {root}", file=sys.stderr, flush=True)
    with FeedSink() as sink:
        async with HonestOverlay(root, target_live_exits=2) as ov:
            base = await take_baseline(ov, sink, settle=5.0)
            cpu0 = {n.name: (n.cpu_seconds(), trio.current_time()) for n in ov.nodes}
            await trio.sleep(20.0)
            t = trio.current_time()
            before = {
                "rss_mb": {k: round(v / 1024, 1) for k, v in base.rss_kb.items()},
                "cpu_pct": {
                    n.name: round(
                        100 * (n.cpu_seconds() - cpu0[n.name][0]) / (t - cpu0[n.name][1]), 1
                    )
                    for n in ov.nodes
                },
                "gossip_s": None if base.gossip_seconds is None else round(base.gossip_seconds, 1),
            }
            print(f"before the flood: {before}", file=sys.stderr, flush=True)
            fl = await flood(ov, sink, args)
            print(f"flood done: {fl}", file=sys.stderr, flush=True)
            t_flood = trio.current_time()
            prev_cpu = {n.name: (n.cpu_seconds(), t_flood) for n in ov.nodes}
            rows = []
            k = 1
            while True:
                at = t_flood + min(k * args.interval, args.soak)
                await trio.sleep_until(at)
                now = trio.current_time()
                row = await sample(ov, prev_cpu, now, now - t_flood)
                rows.append(row)
                print_row(row)
                if at >= t_flood + args.soak or not any(n.alive for n in ov.nodes):
                    break
                k += 1
            fl["dials_to_attacker_feed"] = sink.count
            summary = summarize(before, rows, ov)
    return {"root": str(root), "before": before, "flood": fl, "rows": rows, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000, help="records per attacker")
    p.add_argument("--attackers", type=int, default=1, help="attacker identities (max 10 IPs)")
    p.add_argument("--soak", type=float, default=1800.0, help="seconds watched after the flood")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between reports")
    p.add_argument("--push-timeout", type=float, default=3600.0, help="flood time bound, s")
    p.add_argument("--root", default=None, help="directory for homes and logs (kept)")
    p.add_argument("--json", action="store_true", help="print all samples as JSON")
    args = p.parse_args()
    if not 1 <= args.attackers <= 100 or args.records < 1:
        p.error("need 1..100 attackers and at least one record")
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    result = trio.run(main_async, args)
    print_summary(result["summary"], result["rows"], result["flood"])
    if args.json:
        print(json.dumps(result, indent=2, default=lambda o: asdict(o)))


if __name__ == "__main__":
    main()
