"""Sender anonymity against a global passive adversary, vs mixing delay and cover traffic.

Run:  .venv/bin/python benchmarks/bench_anonymity.py [--quick] [--write-docs]

Runs ``overlay.sim.anonymity`` (the real delay, mix-pool and Poisson-timer
cores on a simulated clock; see that module for the model and the adversary)
over a grid: 100 and 1,000 active clients each sending one real message a
minute, 20 nodes of which 4 exits, mean hold per hop 0 (no mixing) to 2 s,
and three cover settings: none (messages sent at once, no agent), low and
the defaults of ``[cover]``. Prints one table row per run; ``--write-docs``
puts the table between the markers of docs/anonymity.md and draws
docs/img/anonymity.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from overlay.core.mixing import (  # noqa: E402
    DEFAULT_COVER_LOOP_RATE,
    DEFAULT_COVER_RATE,
    DEFAULT_MIX_DELAY,
    DEFAULT_RELAY_LOOP_RATE,
)
from overlay.sim.anonymity import AnonConfig, measure  # noqa: E402

DOC = ROOT / "docs" / "anonymity.md"
PLOT = ROOT / "docs" / "img" / "anonymity.png"
BEGIN, END = "<!-- bench_anonymity:begin -->", "<!-- bench_anonymity:end -->"

COVERS = {
    "none": dict(cover_rate=0.0, loop_rate=0.0, relay_loop_rate=0.0),
    "low": dict(cover_rate=0.2, loop_rate=0.1, relay_loop_rate=DEFAULT_RELAY_LOOP_RATE),
    "default": dict(
        cover_rate=DEFAULT_COVER_RATE,
        loop_rate=DEFAULT_COVER_LOOP_RATE,
        relay_loop_rate=DEFAULT_RELAY_LOOP_RATE,
    ),
}
DELAYS = (0.0, 0.25, 0.5, 0.75, 1.0, 2.0)


def grid(quick: bool) -> list[tuple[str, AnonConfig]]:
    runs = []
    for clients in (100, 1000):
        big = clients >= 1000
        delays = (0.0, 0.25, DEFAULT_MIX_DELAY, 2.0) if big or quick else DELAYS
        covers = ("none", "default") if big and quick else tuple(COVERS)
        for cover in covers:
            for d in delays:
                if cover != "none" and d == 0.0 and big:
                    continue
                runs.append(
                    (
                        cover,
                        AnonConfig(
                            clients=clients,
                            mix_delay=d,
                            duration=100.0 if big else (150.0 if quick else 300.0),
                            warmup=30.0 if big else 60.0,
                            **COVERS[cover],
                        ),
                    )
                )
    # what the design choices buy, at the defaults with 100 clients
    default = dict(clients=100, mix_delay=DEFAULT_MIX_DELAY, duration=300.0, **COVERS["default"])
    runs.append(("default, exit does not hold", AnonConfig(**default, last_hold=False)))
    runs.append(("default, 40 nodes / 8 exits", AnonConfig(**default, nodes=40, exits=8)))
    return runs


HEAD = (
    "| clients | cover | mean hold/hop (s) | messages | entropy p10 | p50 | p90 | max "
    "| added latency p50 (s) | p90 | client upload (B/s) | relay loops (B/s/node) |"
)
RULE = "|" + "---|" * 12


def row(label: str, s: dict) -> str:
    return (
        f"| {s['clients']} | {label} | {s['mix_delay']:g} | {s['messages']} "
        f"| {s['entropy_p10']:.2f} | **{s['entropy_p50']:.2f}** | {s['entropy_p90']:.2f} "
        f"| {s['entropy_max']:.2f} | {s['latency_p50']:.2f} | {s['latency_p90']:.2f} "
        f"| {s['client_bytes_per_client']} | {s['relay_loop_bytes_per_node']} |"
    )


def plot(results: list[tuple[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[tuple[int, str], list[dict]] = {}
    for label, s in results:
        if label in COVERS:
            series.setdefault((s["clients"], label), []).append(s)
    for (clients, cover), rows in sorted(series.items()):
        rows.sort(key=lambda s: s["mix_delay"])
        x = [s["mix_delay"] for s in rows]
        style = "-" if clients == 100 else "--"
        name = f"{clients} clients, cover {cover}"
        ax1.plot(x, [s["entropy_p50"] for s in rows], style, marker="o", label=name)
        ax2.plot(x, [s["latency_p50"] for s in rows], style, marker="o", label=name)
    ax1.axhline(6.0, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("mean hold per hop (s)")
    ax1.set_ylabel("median sender entropy (bits)")
    ax2.axhline(5.0, color="grey", lw=0.8, ls=":")
    ax2.set_xlabel("mean hold per hop (s)")
    ax2.set_ylabel("median added latency (s)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    ap.add_argument("--write-docs", action="store_true", help="update docs/anonymity.md")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    results = []
    print(HEAD)
    print(RULE)
    t0 = time.perf_counter()
    for label, cfg in grid(args.quick):
        s = measure(cfg).summary()
        results.append((label, s))
        print(row(label, s), flush=True)
    print(f"\n{len(results)} runs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps([{"label": lb, **s} for lb, s in results], indent=1))
    if args.write_docs:
        table = "\n".join([HEAD, RULE, *(row(lb, s) for lb, s in results)])
        text = DOC.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        plot(results)
        print(f"wrote {DOC} and {PLOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
