"""``overlay sim``: run a simulator scenario, write report.json, perf.json and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def sim_command(
    nodes: Annotated[int, typer.Option("--nodes", help="Overlay size at the start.")] = 1000,
    scenario: Annotated[
        str,
        typer.Option("--scenario", help="converge, takedown, churn, gap or compare (baselines)."),
    ] = "takedown",
    seed: Annotated[int, typer.Option("--seed", help="Seed: same seed, same report.")] = 1,
    duration: Annotated[
        Optional[float],  # noqa: UP045 - typer needs Optional
        typer.Option("--duration", help="Simulated seconds (default per scenario)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("sim-out"),
    protocol: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--protocol", help="hydra (default), gossipsub, push or flood."),
    ] = None,
    loss: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--loss", help="Loss probability per transmission."),
    ] = None,
    loss_mode: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--loss-mode", help="retransmit (TCP/QUIC, default) or drop."),
    ] = None,
    cohort: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--cohort", help="Liveness group size (default 1000; 0: off)."),
    ] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw PNG plots.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines.")] = False,
) -> None:
    """Simulate a Hydra overlay (real protocol cores, fake clock, modeled network)."""
    from . import report as rep
    from .scenarios import SCENARIOS

    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"scenario must be one of {', '.join(SCENARIOS)}")
    overrides = {"protocol": protocol, "loss": loss, "loss_mode": loss_mode, "cohort": cohort}
    progress = None if quiet else (lambda line: typer.echo(line, err=True))
    if scenario == "compare":
        overrides.pop("protocol")
        report, perf, sims = rep.compare(nodes, seed, duration, progress=progress, **overrides)
    else:
        sim, report, perf = rep.simulate(
            scenario, nodes, seed, duration, progress=progress, **overrides
        )
        sims = [sim]
    paths = rep.write(out, report, perf, sims, plots=plots)
    typer.echo(summary(report, perf))
    typer.echo(f"wrote {out / 'report.json'}, {out / 'perf.json'}")
    for p in paths:
        typer.echo(f"wrote {p}")


def summary(report: dict, perf: dict) -> str:
    lines = [
        f"scenario {report['scenario']}: wall {perf['wall_s']} s (cpu {perf['cpu_s']} s), "
        f"peak RSS {perf['peak_rss_mib']} MiB"
    ]
    if report["scenario"] == "compare":
        for name, row in report["protocols"].items():
            lines.append(
                f"  {name:10s} coverage min {row['coverage_min']}, complete nodes "
                f"{row['complete_nodes_fraction']}, {row['bytes_per_node_s']} B/node/s"
            )
        return "\n".join(lines)
    p = report["propagation"]["summary"]
    lines.append(
        f"  propagation: t50 p50 {p['t50']['p50']} s, t99 p50 {p['t99']['p50']} s "
        f"(max {p['t99']['max']}), t100 p50 {p['t100']['p50']} s; "
        f"{p['fully_covered']}/{p['records_tracked']} records reached everyone"
    )
    t = report["traffic"]["per_node_per_s"]
    lines.append(f"  traffic: {t['msgs']['total']} msgs, {t['bytes']['total']} B per node per s")
    lv = report["liveness"]
    if lv:
        d = lv["detection"]
        lines.append(
            f"  liveness ({lv['group']} members): first detection p50 {d['first_p50']} s, "
            f"observer p50 {d['observer_p50']} s, 99% of observers p50 {d['all_99pct_p50']} s; "
            f"false DEAD {lv['false_dead']} of {lv['dead_declarations']}"
        )
    ex = report["exits"]
    if ex["takedowns"]:
        rec = [td["recovered_after"] for td in ex["takedowns"]]
        lines.append(
            f"  exits: {len(rec)} takedowns, recovered after {rec} s, "
            f"{ex['promotions']} promotions, {ex['step_backs']} step-backs"
        )
    cl = report["clients"]
    if cl:
        lines.append(
            f"  clients: sent {cl['sent']}, delivered {cl['delivered']}, twice "
            f"{cl['delivered_twice']}, pending {cl['pending_at_end']}, failover p99 "
            f"{cl['failover']['p99']} s"
        )
    c = report["convergence"]
    lines.append(
        f"  views at end: {c['complete_nodes']}/{c['nodes']} complete, "
        f"max missing {c['missing_max']}"
    )
    return "\n".join(lines)
