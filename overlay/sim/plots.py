"""PNG plots of a simulator run (matplotlib, Agg backend, small files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .network import CLASSES  # noqa: E402
from .sim import Simulation  # noqa: E402

DPI = 80
SIZE = (6.4, 3.4)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def propagation(sim: Simulation, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=SIZE)
    ok = sim.metrics._final_ok()
    shown = 0
    for t in sim.metrics.tracks:
        elig = sum(1 for i in range(len(ok)) if ok[i] and t.members[i])
        if not elig:
            continue
        times = sorted(dt for dt, k in t.times if ok[k] and t.members[k])
        if not times:
            continue
        ys = [(n + 1) / elig for n in range(len(times))]
        ax.step(times, ys, where="post", lw=1, label=f"{t.why} (node {t.node})")
        shown += 1
        if shown >= 8:
            break
    ax.set_xscale("log")
    ax.set_xlabel("seconds since publication (log)")
    ax.set_ylabel("fraction of nodes holding it")
    ax.axhline(0.99, color="grey", lw=0.5, ls=":")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    if shown:
        ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def exits(report: dict, path: Path, title: str) -> Path:
    ex = report["exits"]
    s = ex["series"]
    tds = ex["takedowns"]
    fig, axes = plt.subplots(1, 2 if tds else 1, figsize=(8.0, 3.2), squeeze=False)
    ch = ex["changes"]
    end = report["config"]["duration"]
    for k, ax in enumerate(axes[0]):
        if ch:
            xs = [t for t, _ in ch] + [end]
            ys = [n for _, n in ch] + [ch[-1][1]]
            ax.step(xs, ys, where="post", lw=1.2, label="live exits (truth)")
        ax.plot(s["t"], s["seen_mean"], lw=0.8, label="seen live by clients (mean)")
        ax.plot(s["t"], s["seen_min"], lw=0.6, ls="--", label="seen (min)")
        for td in tds:
            ax.axvline(td["at"], color="red", lw=0.5, alpha=0.6)
        ax.axhline(ex["target"], color="grey", lw=0.5, ls=":")
        ax.set_ylabel("exits")
        if k == 0:
            ax.set_xlabel("simulated time (s); red: takedowns")
            ax.legend(fontsize=6, loc="lower left")
        else:
            at = tds[0]["at"]
            ax.set_xlim(at - 2, at + 12)
            ax.set_xlabel(f"zoom on the takedown at {at:g} s")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def traffic(report: dict, path: Path, title: str) -> Path:
    tr = report["traffic"]["series"]
    bin_s = tr["bin_s"]
    nodes = max(1, report["nodes_total"])
    fig, ax = plt.subplots(figsize=SIZE)
    n = max((len(v) for v in tr["bytes"].values()), default=0)
    xs = [i * bin_s for i in range(n)]
    ys = [
        [v / bin_s / nodes for v in tr["bytes"][c]] + [0] * (n - len(tr["bytes"][c]))
        for c in CLASSES
    ]
    ax.stackplot(xs, ys, labels=CLASSES, step="post")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("bytes / node / s (sent)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper right")
    return _save(fig, path)


def detection(sim: Simulation, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=SIZE)
    ok = sim.metrics._final_ok()
    delays = sorted(
        d
        for ep in sim.metrics.episodes
        if ep.kind != "withdrawn"
        for o, d in ep.det.items()
        if ok[o]
    )
    if delays:
        ys = [(i + 1) / len(delays) for i in range(len(delays))]
        ax.step(delays, ys, where="post", lw=1.2)
    ax.set_xlabel("seconds from takedown to DEAD at an observer")
    ax.set_ylabel("fraction of (episode, observer) pairs")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def compare(report: dict, path: Path, title: str) -> Path:
    rows = report["protocols"]
    names = list(rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7.2, 3.2))
    a1.bar(names, [rows[n]["coverage_min"] or 0 for n in names], color="tab:blue")
    a1.set_ylim(0.8, 1.005)
    a1.set_ylabel("worst record coverage at end")
    gos = [rows[n]["gossip_bytes_per_node_s"] for n in names]
    syn = [rows[n]["sync_bytes_per_node_s"] for n in names]
    a2.bar(names, gos, color="tab:orange", label="gossip (records + control)")
    a2.bar(names, syn, bottom=gos, color="tab:red", label="anti-entropy")
    a2.set_ylabel("bytes / node / s")
    a2.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def draw(out: Path, report: dict, sims: list[Simulation]) -> list[Path]:
    if report.get("scenario") == "compare":
        n = report["nodes"]
        return [compare(report, out / "compare.png", f"gap scenario, {n} nodes: baselines")]
    sim = sims[0]
    n = report["nodes_total"]
    name = report["scenario"]
    paths = [
        propagation(sim, out / "propagation.png", f"{name}, {n} nodes: record propagation"),
        traffic(report, out / "traffic.png", f"{name}, {n} nodes: traffic by class"),
    ]
    if report["exits"]["takedowns"] or name == "takedown":
        paths.append(exits(report, out / "exits.png", f"{name}, {n} nodes: live exits"))
    if report["liveness"] and report["liveness"]["episodes"]:
        paths.append(detection(sim, out / "detection.png", f"{name}, {n} nodes: failure detection"))
    return paths
