"""Run a scenario, build its JSON report and draw its plots.

``report.json`` is a pure function of the scenario, its parameters and the
seed (byte-identical across runs); how long the run took and how much memory
it used go to ``perf.json``, which is not.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import scenarios
from .sim import Simulation


def peak_rss_mib() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024.0 * 1024.0) if sys.platform == "darwin" else ru / 1024.0


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def simulate(
    name: str,
    nodes: int,
    seed: int,
    duration: float | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides,
) -> tuple[Simulation, dict, dict]:
    """Run one scenario; return the simulation, its report and its performance record.

    ``progress`` (e.g. ``print``) gets a line every 30 simulated seconds.
    """
    t0 = time.perf_counter()
    c0 = cpu_s()
    cfg, setup = scenarios.make(name, nodes, seed, duration, **overrides)
    sim = Simulation(cfg)
    setup(sim)
    t_setup = time.perf_counter() - t0
    if progress is None:
        sim.run()
    else:
        t = 0.0
        while t < cfg.duration:
            t = min(cfg.duration, t + 30.0)
            sim.run(t)
            progress(
                f"t={t:.0f}/{cfg.duration:.0f} s  wall {time.perf_counter() - t0:.0f} s  "
                f"events {sim.engine.events}  rss {peak_rss_mib():.0f} MiB"
            )
    t_run = time.perf_counter() - t0 - t_setup
    report = build_report(sim, name)
    wall = time.perf_counter() - t0
    perf = {
        "scenario": name,
        "nodes": nodes,
        "duration_simulated_s": cfg.duration,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu_s() - c0, 2),
        "setup_s": round(t_setup, 2),
        "run_s": round(t_run, 2),
        "events": sim.engine.events,
        "events_per_s": round(sim.engine.events / max(t_run, 1e-9)),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    return sim, report, perf


def build_report(sim: Simulation, name: str) -> dict:
    m = sim.metrics
    out = {
        "scenario": name,
        "config": sim.cfg.public(),
        "nodes_total": len(sim.nodes),
        "events": sim.engine.events,
        "propagation": m.propagation(),
        "traffic": m.traffic(),
        "liveness": m.liveness() if sim.cohort else None,
        "exits": m.exits(),
        "clients": sim.clients.report() if sim.clients is not None else None,
        "joins": m.join_report(),
    }
    out["convergence"] = m.convergence()  # last: it rebases every view
    return out


def compare(
    nodes: int,
    seed: int,
    duration: float | None = None,
    progress: Callable[[str], None] | None = None,
    **overrides,
) -> tuple[dict, dict, list[Simulation]]:
    """``gap`` once per protocol; a combined report."""
    rows, perfs, sims = {}, {}, []
    for proto in scenarios.COMPARED:
        if progress is not None:
            progress(f"protocol {proto}")
        sim, rep, perf = simulate(
            "gap", nodes, seed, duration, progress=progress, protocol=proto, **overrides
        )
        sims.append(sim)
        perfs[proto] = perf
        tr = rep["traffic"]["per_node_per_s"]
        dissemination = ("gossip-records", "gossip-control", "sync")
        rows[proto] = {
            "coverage_min": rep["propagation"]["summary"]["coverage_min"],
            "coverage_mean": rep["propagation"]["summary"]["coverage_mean"],
            "records_fully_covered": rep["propagation"]["summary"]["fully_covered"],
            "records_tracked": rep["propagation"]["summary"]["records_tracked"],
            "t99_p50": rep["propagation"]["summary"]["t99"]["p50"],
            "complete_nodes_fraction": rep["convergence"]["complete_fraction"],
            "missing_records_max": rep["convergence"]["missing_max"],
            "msgs_per_node_s": round(sum(tr["msgs"][c] for c in dissemination), 6),
            "bytes_per_node_s": round(sum(tr["bytes"][c] for c in dissemination), 6),
            "gossip_bytes_per_node_s": round(
                tr["bytes"]["gossip-records"] + tr["bytes"]["gossip-control"], 6
            ),
            "sync_bytes_per_node_s": tr["bytes"]["sync"],
            "record_copies_per_node": round(
                rep["traffic"]["totals"]["msgs"]["gossip-records"]
                / max(1, rep["propagation"]["summary"]["records_tracked"] * rep["nodes_total"]),
                6,
            ),
            "report": rep,
        }
    report = {"scenario": "compare", "nodes": nodes, "seed": seed, "protocols": rows}
    perf = {
        "scenario": "compare",
        "nodes": nodes,
        "wall_s": round(sum(p["wall_s"] for p in perfs.values()), 2),
        "cpu_s": round(sum(p["cpu_s"] for p in perfs.values()), 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "runs": perfs,
    }
    return report, perf, sims


def write(out: Path, report: dict, perf: dict, sims: list[Simulation], plots: bool = True) -> list:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (out / "perf.json").write_text(json.dumps(perf, indent=1, sort_keys=True) + "\n")
    paths = []
    if plots:
        from . import plots as p

        paths = p.draw(out, report, sims)
    return paths
