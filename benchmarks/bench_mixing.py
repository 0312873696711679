"""A relay's mixing cost per packet, beyond Sphinx processing, at 300 packets/s.

Run:  .venv/bin/python benchmarks/bench_mixing.py [--rate 300] [--seconds 20] [--quick]

Two real nodes on loopback in this process (A, B). A raw libp2p host writes
SMALL drop-cover packets (path A, B) to A's relay stream at ``--rate`` packets
per second, paced, for ``--seconds``; A processes and forwards each to B,
which processes it and discards it. The run is made twice with the same
prebuilt packets' shape: once with no holds (delays 0: each packet forwarded
as soon as processed) and once mixed (a hold drawn for A and for B from the
default ``[onion] mix_delay``). Reported: this process's CPU time per packet
in each run (both nodes, the sender and libp2p included) and the difference,
which is the mixing cost of one packet at two hops (the mix pool, its timer
task, a wake-up per due time); halved, per hop. Also the pure ``MixPool``
hold + release alone, and one hop's mixing code of ``RelayService`` (its
``forward`` -> ``_hold`` -> ``_held_loop`` timer task) at the same rate with
the links replaced by a counter: the cleanest figure, as no network or Sphinx
work shares the measurement.

The machine is shared: CPU time (not wall time) is what is compared, and the
mixed run is made between two unmixed ones (the mean of those is the base).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import timeit
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlay.core.mixing import DEFAULT_MIX_DELAY, MixPool, draw_delays  # noqa: E402
from overlay.crypto import SigningKey  # noqa: E402
from overlay.net.framing import encode_frame  # noqa: E402
from overlay.net.host import Libp2pHost  # noqa: E402
from overlay.onion.build import build_packet  # noqa: E402
from overlay.onion.params import SMALL, Hop  # noqa: E402
from overlay.services.relay import RELAY_PROTOCOL, RelayService  # noqa: E402
from overlay.testing import LOOPBACK, join_addr, light_services, overlay, wait_until  # noqa: E402
from overlay.wire import cover  # noqa: E402


def hop(node) -> Hop:
    key = node.home.onion_key()
    return Hop(node.node_id, key.public, key.epoch)


def delivered(node) -> float:
    return (
        node.metrics.registry.get_sample_value(
            "hydra_relay_delivered_total", {"kind": "drop_cover"}
        )
        or 0.0
    )


async def run(rate: float, seconds: float, mean: float, runs: list[str]) -> dict:
    n = int(rate * seconds)
    rng = random.Random(1)
    out = {}

    def services(i, home):  # no loop cover: only the measured packets
        return [RelayService(loop_rate=0.0, queue_size=4096), *light_services()]

    with tempfile.TemporaryDirectory(prefix="hydra-mixbench-") as tmp:
        async with overlay(Path(tmp), 2, services_for=services) as (a, b):
            await wait_until(lambda: len(a.view) >= 2 and len(b.view) >= 2, 30)
            async with Libp2pHost(SigningKey.generate(), LOOPBACK, enable_dht=False) as h:
                await h.connect(join_addr(a))
                s = await h.open_stream(a.node_id.peer_id(), RELAY_PROTOCOL)
                path = [hop(a), hop(b)]
                payload = cover.encode(cover.DROP)
                for label in runs:
                    m = mean if label == "mixed" else 0.0
                    frames = [
                        encode_frame(
                            build_packet(
                                SMALL, path, payload, delays_ms=draw_delays(rng, m, 2)
                            ).packet
                        )
                        for _ in range(n)
                    ]
                    base = delivered(b)
                    await trio.sleep(1.0)
                    cpu0, t0 = time.process_time(), trio.current_time()
                    for i, f in enumerate(frames):
                        await trio.sleep_until(t0 + i / rate)
                        await s.write(f)
                    await wait_until(lambda base=base: delivered(b) >= base + n, 120)
                    cpu = time.process_time() - cpu0
                    out.setdefault(label, []).append(
                        {
                            "cpu_us_per_packet": cpu / n * 1e6,
                            "wall_s": trio.current_time() - t0,
                            "max_held": a.relay.status()["held"],
                        }
                    )
                    print(
                        f"  {label:8} {cpu / n * 1e6:7.0f} us CPU per packet "
                        f"({n} packets, {trio.current_time() - t0:.1f} s)",
                        flush=True,
                    )
    return out


class _CountingRelay(RelayService):
    """The relay's own mixing code (``forward`` -> ``_hold`` -> ``_held_loop``) with the
    link layer replaced by a counter: what mixing adds to one hop, and nothing else."""

    def forward(self, node_id, packet, delay_ms=0, now=0.0, *, source="local"):
        if delay_ms > 0:
            self._hold(node_id, packet, delay_ms, len(packet))
            return
        self.sent += 1


async def hop_cost(rate: float, seconds: float, mean: float) -> dict[str, float]:
    """CPU per packet of one hop's mixing code at ``rate``, vs forwarding at once."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from overlay.services.relay_metrics import RelayMetrics

    peer = SigningKey.generate().node_id
    packet = bytes(SMALL.packet_size)
    out = {}
    for label, m in (("at once", 0.0), ("held", mean), ("at once", 0.0)):
        relay = _CountingRelay(loop_rate=0.0)
        relay.node = SimpleNamespace(clock=time.time)
        relay.metrics = RelayMetrics(CollectorRegistry())
        relay.sent = 0
        n = int(rate * seconds)
        delays = draw_delays(random.Random(3), m, n)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay._held_loop)
            cpu0, t0 = time.process_time(), trio.current_time()
            for i, d in enumerate(delays):
                await trio.sleep_until(t0 + i / rate)
                relay.forward(peer, packet, d)
            while relay.sent < n:
                await trio.sleep(0.05)
            cpu = time.process_time() - cpu0
            nursery.cancel_scope.cancel()
        out.setdefault(label, []).append(cpu / n * 1e6)
    return {k: sum(v) / len(v) for k, v in out.items()}


def pool_cost() -> float:
    rng = random.Random(2)
    pool: MixPool[int] = MixPool(max_packets=1 << 20)
    delays = [rng.expovariate(1 / DEFAULT_MIX_DELAY) for _ in range(10_000)]
    t = [0.0]

    def one_round():
        for i, d in enumerate(delays):
            pool.hold(t[0] + i / 300, d, i, 2048)
        pool.due(t[0] + 1e9)
        t[0] += 100

    return min(timeit.repeat(one_round, number=1, repeat=5)) / len(delays) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--mean", type=float, default=DEFAULT_MIX_DELAY, help="mean hold per hop")
    ap.add_argument("--quick", action="store_true", help="5 s runs")
    args = ap.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    print(
        f"mixing cost at {args.rate:g} packets/s, mean hold {args.mean:g} s per hop, "
        f"2 hops, {seconds:g} s per run"
    )
    res = trio.run(run, args.rate, seconds, args.mean, ["plain", "mixed", "plain"])
    plain = sum(r["cpu_us_per_packet"] for r in res["plain"]) / len(res["plain"])
    mixed = res["mixed"][0]["cpu_us_per_packet"]
    print(f"\nplain (no holds, mean of 2 runs): {plain:7.0f} us CPU per packet (2 hops)")
    print(f"mixed:                            {mixed:7.0f} us CPU per packet (2 hops)")
    print(
        f"mixing cost: {mixed - plain:7.0f} us per packet for 2 hops, "
        f"{(mixed - plain) / 2:.0f} us per hop (target < 1000 us)"
    )
    print(f"MixPool hold + release alone: {pool_cost():.2f} us per packet")
    hc = trio.run(hop_cost, args.rate, seconds, args.mean)
    print(
        f"one hop's mixing code at {args.rate:g}/s (relay forward -> hold -> timer -> release, "
        f"links excluded): {hc['held']:.0f} us CPU per packet held vs {hc['at once']:.0f} us "
        f"forwarded at once: {hc['held'] - hc['at once']:.0f} us per packet"
    )


if __name__ == "__main__":
    main()
