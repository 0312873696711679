"""What the simulator measures, and the numbers it reports.

- propagation: every record published during the run (updates, joins,
  promotions, withdrawals) is tracked; a node *has* it once its view holds that
  seq or a newer one. The nodes that count for a record are those that were
  members of the overlay when it was published and are running and reachable at
  the end of the run (so a node that was cut off while it was published must
  still get it afterwards); t50/t99/t100 are the times until 50/99/100 % of them
  had it;
- liveness: a *down episode* starts when a node of the liveness group is killed
  or loses all its feeds. Each other member's first DEAD for it gives a
  detection delay. A DEAD (or SUSPECT) about a node that is running and
  reachable from the observer is a false positive (declarations by observers
  that are themselves cut off are counted apart: they cannot tell anyone);
- exits: the live exits (running, reachable, publishing EXIT) at every change,
  and, once per ``sample_interval``, how many the client entry nodes (or a
  sample of the liveness group) see as live (an EXIT record and not DEAD);
- traffic: see ``overlay.sim.network``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..records import Role
from ..wire import liveness as live_wire

if TYPE_CHECKING:  # pragma: no cover
    from .sim import Simulation


def r6(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def quantile(sorted_values: list[float], q: float) -> float | None:
    """The smallest value with at least ``q`` of the values at or below it."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


@dataclass
class Track:
    node: int
    seq: int
    why: str
    t0: float
    members: bytearray
    reached: bytearray
    times: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class Episode:
    node: int
    t0: float
    kind: str
    t1: float | None = None
    det: dict[int, float] = field(default_factory=dict)


class Metrics:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.tracks: list[Track] = []
        self._by_node: dict[int, list[Track]] = {}
        self.episodes: list[Episode] = []
        self._current: dict[int, Episode] = {}
        self.dead_total = 0
        self.false_dead: list[tuple[float, int, int]] = []
        self.isolated_dead = 0
        self.partition_dead = 0
        self.suspect_total = 0
        self.false_suspect = 0
        self.penalties = 0
        self.broadcasts = 0  # liveness statements gossiped (Broadcast effects)
        self.broadcast_types: dict[str, int] = {}
        self.sync_records = 0
        self.sync_repairs = 0
        self.sync_pushed = 0
        self.pool_events: list[tuple[float, int, str]] = []
        self.exit_changes: list[tuple[float, int]] = []
        self.samples: list[tuple[float, int, float, int]] = []
        self.takedowns: list[dict] = []
        self.up_integral = 0.0
        self._last_sample = 0.0
        self._observers: list[int] = []
        self._down_since: dict[int, float] = {}
        self._outages: dict[int, list[tuple[float, float]]] = {}  # ended outages per node
        self.joins: list[list] = []  # [node, started, join loop done, full membership]
        self.joins_open: dict[int, list] = {}

    # ---- set-up ---------------------------------------------------------------
    def start(self) -> None:
        sim = self.sim
        obs = list(sim.client_entries) if sim.cfg.clients else []
        if not obs:
            obs = [i for i in sim.cohort if i not in sim._exitish_set][:20]
        self._observers = obs
        self.exits_changed(0.0)
        sim.engine.at(0.0, self._sample, None, None, None)

    # ---- records --------------------------------------------------------------------
    def published(self, i: int, rec, now: float, why: str) -> None:
        sim = self.sim
        members = bytearray(sim.capacity)
        for node in sim.nodes:
            if node.member:
                members[node.idx] = 1
        t = Track(i, rec.seq, why, now, members, bytearray(sim.capacity))
        self.tracks.append(t)
        self._by_node.setdefault(i, []).append(t)

    def arrival(self, k: int, rec, now: float) -> None:
        tracks = self._by_node.get(self.sim.index[rec.node_id])
        if not tracks:
            return
        seq = rec.seq
        for t in tracks:
            if t.seq <= seq and not t.reached[k]:
                t.reached[k] = 1
                t.times.append((now - t.t0, k))

    # ---- joins ----------------------------------------------------------------------
    def join_started(self, i: int, now: float) -> None:
        row = [i, now, None, None]
        self.joins.append(row)
        self.joins_open[i] = row

    def join_synced(self, i: int, now: float) -> None:
        row = self.joins_open.get(i)
        if row is not None and row[2] is None:
            row[2] = now - row[1]

    def join_complete(self, i: int, now: float) -> None:
        row = self.joins_open.pop(i, None)
        if row is not None:
            row[3] = now - row[1]

    def join_report(self) -> dict:
        synced = sorted(r[2] for r in self.joins if r[2] is not None)
        full = sorted(r[3] for r in self.joins if r[3] is not None)
        return {
            "joins": len(self.joins),
            "join_loop_s": {
                "p50": r6(quantile(synced, 0.5)),
                "max": r6(synced[-1]) if synced else None,
            },
            "full_membership_s": {
                "reached": len(full),
                "p50": r6(quantile(full, 0.5)),
                "p99": r6(quantile(full, 0.99)),
                "max": r6(full[-1]) if full else None,
            },
        }

    # ---- exits ----------------------------------------------------------------------
    def exits_changed(self, now: float) -> None:
        n = len(self.sim.truth_live_exits())
        if not self.exit_changes or self.exit_changes[-1][1] != n:
            self.exit_changes.append((now, n))

    def pool_event(self, i: int, kind: str, now: float) -> None:
        self.pool_events.append((now, i, kind))

    def takedown(self, now: float, killed: list[int], mode: str) -> None:
        self.takedowns.append({"at": now, "killed": list(killed), "mode": mode})

    def _sample(self, _a, _b, _c) -> None:
        sim = self.sim
        now = sim.engine.now
        net = sim.net
        ok = (int.from_bytes(net.up, "little") & int.from_bytes(net.reach, "little")).bit_count()
        self.up_integral += ok * (now - self._last_sample)
        self._last_sample = now
        truth = len(sim.truth_live_exits())
        seen = [len(sim.exits_seen_by(i)) for i in self._observers if net.ok(i)]
        mean = sum(seen) / len(seen) if seen else 0.0
        self.samples.append((now, truth, mean, min(seen) if seen else 0))
        nxt = now + sim.cfg.sample_interval
        if nxt <= sim.cfg.duration:
            sim.engine.at(nxt, self._sample, None, None, None)

    # ---- liveness --------------------------------------------------------------------
    def went_down(self, i: int, now: float, kind: str) -> None:
        sim = self.sim
        if sim.nodes[i].left:
            kind = "withdrawn"
        if i not in self._down_since:
            self._down_since[i] = now
        if i in self._current or i not in sim._cohort_set:
            return
        ep = Episode(i, now, kind)
        self.episodes.append(ep)
        self._current[i] = ep

    def came_back(self, i: int, now: float) -> None:
        t0 = self._down_since.pop(i, None)
        if t0 is not None:
            self._outages.setdefault(i, []).append((t0, now))
        ep = self._current.pop(i, None)
        if ep is not None:
            ep.t1 = now

    def broadcast(self, i: int, frame: bytes) -> None:
        self.broadcasts += 1
        kind = type(live_wire.decode(frame)).__name__.lower()
        if not self.sim.net.ok(i):
            kind += " (cut off, not sent)"
        self.broadcast_types[kind] = self.broadcast_types.get(kind, 0) + 1

    def state_changed(self, obs: int, subj: int, state: str, now: float) -> None:
        net = self.sim.net
        if state == "dead":
            self.dead_total += 1
            ep = self._current.get(subj)
            if ep is not None:
                if obs not in ep.det:
                    ep.det[obs] = now - ep.t0
            elif not net.ok(obs):
                self.isolated_dead += 1
            elif net.connected(obs, subj):
                self.false_dead.append((now, obs, subj))
            else:
                self.partition_dead += 1
        elif state == "suspect":
            self.suspect_total += 1
            if subj not in self._current and net.ok(obs) and net.connected(obs, subj):
                self.false_suspect += 1

    # ---- report --------------------------------------------------------------------------
    def _final_ok(self) -> bytearray:
        sim = self.sim
        ok = bytearray(sim.capacity)
        for node in sim.nodes:
            i = node.idx
            if sim.net.up[i] and sim.net.reach[i] and node.member and not node.left:
                ok[i] = 1
        return ok

    def propagation(self) -> dict:
        ok = self._final_ok()
        rows = []
        for t in self.tracks:
            eligible = sum(1 for i in range(len(ok)) if ok[i] and t.members[i])
            times = sorted(dt for dt, k in t.times if ok[k] and t.members[k])
            reached = len(times)
            row = {
                "node": t.node,
                "seq": t.seq,
                "why": t.why,
                "published_at": r6(t.t0),
                "eligible": eligible,
                "reached": reached,
                "coverage": r6(reached / eligible) if eligible else None,
                "t50": None,
                "t99": None,
                "t100": None,
            }
            for q, key in ((0.5, "t50"), (0.99, "t99"), (1.0, "t100")):
                need = max(1, math.ceil(q * eligible))
                if reached >= need:
                    row[key] = r6(times[need - 1])
            rows.append(row)
        summary = {}
        for key in ("t50", "t99", "t100"):
            vals = sorted(r[key] for r in rows if r[key] is not None)
            summary[key] = {
                "records": len(vals),
                "p50": r6(quantile(vals, 0.5)),
                "max": r6(vals[-1]) if vals else None,
            }
        covs = [r["coverage"] for r in rows if r["coverage"] is not None]
        summary["records_tracked"] = len(rows)
        summary["fully_covered"] = sum(1 for r in rows if r["t100"] is not None)
        summary["coverage_min"] = r6(min(covs)) if covs else None
        summary["coverage_mean"] = r6(sum(covs) / len(covs)) if covs else None
        return {"summary": summary, "records": rows}

    def liveness(self) -> dict:
        sim = self.sim
        ok = self._final_ok()
        end = sim.engine.now
        eps = []
        firsts, medians, p99s, all99, covs, late_max = [], [], [], [], [], []
        for ep in self.episodes:
            if ep.kind == "withdrawn":
                continue
            stop = ep.t1 if ep.t1 is not None else end
            if stop - ep.t0 < 15.0:
                continue
            # observers: running and reachable at the end, and throughout the episode's
            # first 30 s (a node that was cut off itself is reported apart: "late")
            lo, hi = ep.t0, ep.t0 + 30.0
            away = {
                i for i, spans in self._outages.items() if any(a < hi and b > lo for a, b in spans)
            }
            away |= {i for i, t in self._down_since.items() if t < hi}
            observers = [i for i in sim.cohort if i != ep.node and ok[i] and i not in away]
            obs = set(observers)
            delays = sorted(d for o, d in ep.det.items() if o in obs)
            late = [d for o, d in ep.det.items() if ok[o] and o in away]
            late_max.extend(late)
            cov = len(delays) / len(observers) if observers else None
            need = math.ceil(0.99 * len(observers)) if observers else 0
            t99 = delays[need - 1] if observers and len(delays) >= need else None
            row = {
                "node": ep.node,
                "kind": ep.kind,
                "at": r6(ep.t0),
                "observers": len(observers),
                "detected": len(delays),
                "first": r6(delays[0]) if delays else None,
                "p50": r6(quantile(delays, 0.5)),
                "p99": r6(quantile(delays, 0.99)),
                "all_99pct": r6(t99),
                "late_observers": len(late),
                "late_max": r6(max(late)) if late else None,
            }
            eps.append(row)
            if delays:
                firsts.append(delays[0])
                medians.append(quantile(delays, 0.5))
                p99s.append(quantile(delays, 0.99))
            if t99 is not None:
                all99.append(t99)
            if cov is not None:
                covs.append(cov)
        hours = len(sim.cohort) * end / 3600.0 if end else 0.0
        fd = len(self.false_dead)
        return {
            "group": len(sim.cohort),
            "episodes": len(eps),
            "detection": {
                "first_p50": r6(quantile(sorted(firsts), 0.5)),
                "observer_p50": r6(quantile(sorted(medians), 0.5)),
                "observer_p99_max": r6(max(p99s)) if p99s else None,
                "all_99pct_p50": r6(quantile(sorted(all99), 0.5)),
                "all_99pct_max": r6(max(all99)) if all99 else None,
                "coverage_mean": r6(sum(covs) / len(covs)) if covs else None,
                "late_observers": len(late_max),
                "late_max": r6(max(late_max)) if late_max else None,
            },
            "dead_declarations": self.dead_total,
            "false_dead": fd,
            "false_dead_fraction": r6(fd / self.dead_total) if self.dead_total else 0.0,
            "false_dead_per_member_hour": r6(fd / hours) if hours else 0.0,
            "suspicions": self.suspect_total,
            "false_suspicions": self.false_suspect,
            "dead_by_cut_off_observers": self.isolated_dead,
            "dead_across_partition": self.partition_dead,
            "penalties": self.penalties,
            "broadcasts": self.broadcasts,
            "broadcasts_by_type": dict(sorted(self.broadcast_types.items())),
            "broadcasts_per_episode": r6(self.broadcasts / len(eps)) if eps else None,
            "episode_list": eps,
        }

    def exits(self) -> dict:
        sim = self.sim
        target = sim.cfg.target_live_exits
        rows = []
        ok = self._final_ok()
        for k, td in enumerate(self.takedowns):
            at = td["at"]
            nxt = self.takedowns[k + 1]["at"] if k + 1 < len(self.takedowns) else math.inf
            state = None
            for t, n in self.exit_changes:
                if t > at:
                    break
                state = n
            if state is not None and state >= target:
                recovered = 0.0
            else:
                recovered = next(
                    (t - at for t, n in self.exit_changes if t > at and n >= target), None
                )
            promos = [
                (t, i) for t, i, kind in self.pool_events if kind == "promote" and at <= t < nxt
            ]
            seen99 = []
            for t, i in promos:
                tr = next(
                    (x for x in self._by_node.get(i, []) if x.t0 == t and x.why == "promote"),
                    None,
                )
                if tr is None:
                    continue
                elig = sum(1 for j in range(len(ok)) if ok[j] and tr.members[j])
                times = sorted(dt for dt, j in tr.times if ok[j] and tr.members[j])
                need = max(1, math.ceil(0.99 * elig))
                if len(times) >= need:
                    seen99.append(t - at + times[need - 1])
            rows.append(
                {
                    "at": r6(at),
                    "mode": td["mode"],
                    "killed": td["killed"],
                    "live_after": state,
                    "recovered_after": r6(recovered),
                    "promotions": len(promos),
                    "new_exits_at_99pct_after": r6(max(seen99)) if seen99 else None,
                }
            )
        kinds = [k for _, _, k in self.pool_events]
        return {
            "target": target,
            "promotions": kinds.count("promote"),
            "step_backs": kinds.count("step-back"),
            "takedowns": rows,
            "changes": [[r6(t), n] for t, n in self.exit_changes],
            "series": {
                "t": [r6(t) for t, *_ in self.samples],
                "live": [n for _, n, _, _ in self.samples],
                "seen_mean": [r6(m) for _, _, m, _ in self.samples],
                "seen_min": [m for *_, m in self.samples],
            },
        }

    def traffic(self) -> dict:
        from .network import BIN, CLASSES

        sim = self.sim
        tr = sim.net.traffic
        dur = max(sim.engine.now, 1e-9)
        node_s = self.up_integral or (len(sim.nodes) * dur)
        per = {
            "msgs": {c: r6(tr.msgs[k] / node_s) for k, c in enumerate(CLASSES)},
            "bytes": {c: r6(tr.bytes[k] / node_s) for k, c in enumerate(CLASSES)},
        }
        per["msgs"]["total"] = r6(sum(tr.msgs) / node_s)
        per["bytes"]["total"] = r6(sum(tr.bytes) / node_s)
        group = len(sim.cohort)
        from .network import C_LIVENESS

        rates = sorted(tr.node_bytes[i] / dur for i in range(len(sim.nodes)))
        return {
            "node_seconds": r6(node_s),
            "per_node_per_s": per,
            "liveness_per_member_per_s": {
                "msgs": r6(tr.msgs[C_LIVENESS] / (group * dur)) if group else 0.0,
                "bytes": r6(tr.bytes[C_LIVENESS] / (group * dur)) if group else 0.0,
            },
            "node_bytes_per_s": {
                "p50": r6(quantile(rates, 0.5)),
                "p99": r6(quantile(rates, 0.99)),
                "max": r6(rates[-1]) if rates else None,
            },
            "totals": {
                "msgs": {c: tr.msgs[k] for k, c in enumerate(CLASSES)},
                "bytes": {c: tr.bytes[k] for k, c in enumerate(CLASSES)},
                "dropped_queue_full": tr.dropped,
            },
            "series": {
                "bin_s": BIN,
                "bytes": {c: [b[k] for b in tr.bins_bytes] for k, c in enumerate(CLASSES)},
                "msgs": {c: [b[k] for b in tr.bins_msgs] for k, c in enumerate(CLASSES)},
            },
            "sync_records_moved": self.sync_records,
            "sync_records_accepted": self.sync_repairs,
            "sync_records_pushed": self.sync_pushed,
        }

    def convergence(self) -> dict:
        """Compare every running member's view with the latest published records."""
        sim = self.sim
        sim.rebase()
        ok = self._final_ok()
        missing = [sim.missing_records(i) for i in range(len(sim.nodes)) if ok[i]]
        lagging = [m for m in missing if m]
        return {
            "nodes": len(missing),
            "records": len(sim.truth),
            "complete_nodes": len(missing) - len(lagging),
            "complete_fraction": r6((len(missing) - len(lagging)) / len(missing))
            if missing
            else None,
            "missing_mean": r6(sum(missing) / len(missing)) if missing else None,
            "missing_max": max(missing) if missing else 0,
            "exits_in_truth": sum(
                1
                for j in sim.exitish
                if not sim.nodes[j].rec.is_tombstone and Role.EXIT in sim.nodes[j].rec.roles
            ),
        }
