"""Exit failover: time from killing the exit a client uses to (a) a standby's new
record reaching 99 % of nodes and (b) the client's next message being delivered.

Real nodes (py-libp2p on loopback) in this process, chain mode (one public exit,
standbys ordered), a real SMTP sink, and a light client. Each trial kills the
current exit abruptly (no tombstone), sends one message at once, and measures;
then a fresh standby is started so that every trial has the same shape. The
baseline, measured in the same run, is the same client delivering through a
healthy exit (no takedown). The client mixes as configured by default
(``--mix-delay``); the time to the delivered acknowledgement then includes the
holds it chose for the attempt that got through and for that ack's way back,
reported beside it (the bound with mixing: 3 s plus those holds).

    .venv/bin/python benchmarks/bench_failover.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from overlay.client import Client
from overlay.core.mixing import DEFAULT_MIX_DELAY
from overlay.devtools.demo import SmtpSink
from overlay.records import Role
from overlay.testing import default_services, fleet, join_addr, wait_until


def q(values, p):
    values = sorted(values)
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)] if values else float("nan")


async def main_async(args) -> dict:
    sink = SmtpSink()
    port = sink.start()
    cfg = {
        "smtp_relay": f"127.0.0.1:{port}",
        "exit_policy_mode": "chain",
        "target_live_exits": 1,
        # a real node's liveness timing (the test kit slows it for crowded processes)
        "probe_interval": 1.0,
        "probe_timeout": 0.5,
    }
    record_times, delivery_times, healthy, holds = [], [], [], []
    try:
        with tempfile.TemporaryDirectory(prefix="hydra-failover-") as tmp:
            async with fleet(Path(tmp)) as f:
                entry = await f.add("entry", ("entry", "relay"), services=default_services(), **cfg)
                relays = [
                    await f.add(f"relay{i}", ("relay",), services=default_services(), **cfg)
                    for i in range(args.relays)
                ]
                exit_node = await f.add(
                    "exit0", ("exit", "relay"), services=default_services(), **cfg
                )
                standbys = [
                    await f.add(
                        f"standby{i}", ("standby-exit", "relay"), services=default_services(), **cfg
                    )
                    for i in range(args.standby)
                ]
                nodes = [entry, *relays, exit_node, *standbys]
                await wait_until(lambda: all(len(n.view) == len(nodes) for n in nodes), 120)
                await trio.sleep(6)
                async with Client(
                    Path(tmp) / "client", via=[join_addr(entry)], mix_delay=args.mix_delay
                ) as client:
                    for i in range(3):  # warm up paths and the ack round-trip estimate
                        await client.wait_acked(
                            await client.send("smtp:b@example.org", b"warm %d\r\n" % i), timeout=60
                        )
                    killed = set()
                    for trial in range(args.trials):
                        t0 = time.monotonic()
                        mid = await client.send("smtp:b@example.org", b"healthy %d\r\n" % trial)
                        await client.wait_acked(mid, timeout=60)
                        healthy.append(time.monotonic() - t0)

                        current = [n for n in nodes if f.running(n) and Role.EXIT in n.roles]
                        victim = current[0]
                        others = [n for n in nodes if f.running(n) and n is not victim]
                        await f.stop(victim)
                        t_kill, t_kill_wall = time.monotonic(), time.time()
                        print(
                            f"trial {trial}: killed {victim.node_id.short()} at {t_kill_wall:.3f}",
                            file=sys.stderr,
                        )
                        mid = await client.send("smtp:b@example.org", b"failover %d\r\n" % trial)
                        rec_done = None

                        killed.add(victim.node_id)

                        def new_exit_seen(n):
                            return any(
                                r.node_id not in killed
                                for r in n.view.snapshot(time.time()).with_role(Role.EXIT)
                            )

                        with trio.fail_after(60):
                            while True:
                                if rec_done is None:
                                    seen = sum(new_exit_seen(n) for n in others)
                                    if seen >= math.ceil(0.99 * len(others)):
                                        rec_done = time.monotonic() - t_kill
                                e = client.status(mid)
                                if e.state.finished and rec_done is not None:
                                    break
                                await trio.sleep(0.02)
                        assert e.state.name == "DELIVERED", e
                        record_times.append(rec_done)
                        delivery_times.append(e.finished_at - t_kill_wall)
                        # the final ack ends the measurement: its return holds count too
                        holds.append(client.holds.get(mid, (0.0, 0.0))[1])
                        print(
                            f"trial {trial}: record at 99% {rec_done:.2f} s, "
                            f"next message delivered {delivery_times[-1]:.2f} s "
                            f"(of which chosen holds {holds[-1]:.2f} s)",
                            file=sys.stderr,
                        )
                        nodes = [n for n in nodes if n is not victim]
                        fresh = await f.add(
                            f"standby-new{trial}",
                            ("standby-exit", "relay"),
                            services=default_services(),
                            **cfg,
                        )
                        nodes.append(fresh)
                        size = len(nodes)
                        await wait_until(
                            lambda nodes=nodes, size=size: all(len(n.view) >= size for n in nodes),
                            60,
                        )
                        await trio.sleep(6)  # the newcomer's exit pool settles
    finally:
        sink.stop()
    net = [d - h for d, h in zip(delivery_times, holds, strict=True)]
    return {
        "trials": len(delivery_times),
        "nodes": 2 + args.relays + args.standby,
        "baseline_healthy_delivery_s": {
            "p50": round(statistics.median(healthy), 3),
            "p99": round(q(healthy, 99), 3),
        },
        "new_exit_record_at_99pct_of_nodes_s": {
            "p50": round(statistics.median(record_times), 3),
            "p99": round(q(record_times, 99), 3),
        },
        "next_message_delivered_after_kill_s": {
            "p50": round(statistics.median(delivery_times), 3),
            "p99": round(q(delivery_times, 99), 3),
        },
        "mix_delay_s": args.mix_delay,
        "next_message_delivered_minus_its_holds_s": {
            "p50": round(statistics.median(net), 3),
            "p99": round(q(net, 99), 3),
        },
        "holds_of_that_attempt_s": {
            "p50": round(statistics.median(holds), 3),
            "p99": round(q(holds, 99), 3),
        },
        "duplicates_at_sink": sum(c - 1 for c in sink.counts.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--relays", type=int, default=3)
    p.add_argument("--standby", type=int, default=2)
    p.add_argument("--log", help="write the overlay's own log (INFO) to this file")
    p.add_argument(
        "--mix-delay",
        type=float,
        default=DEFAULT_MIX_DELAY,
        help="the client's mean hold per hop (default: [onion] mix_delay; 0: no mixing)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.log:
        handler = logging.FileHandler(args.log, mode="w")
        handler.setFormatter(logging.Formatter("%(created).3f %(name)s %(message)s"))
        hydra = logging.getLogger("hydra")
        hydra.setLevel(logging.INFO)
        hydra.addHandler(handler)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    print(json.dumps(trio.run(main_async, args), indent=2))


if __name__ == "__main__":
    main()
