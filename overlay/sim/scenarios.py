"""Scenarios: a configuration plus a schedule of things that happen to the overlay.

- ``converge``: a converged overlay; a relay updates its record (t=10 s), a new
  node joins (20 s), an exit loses one of its feeds and re-announces the
  others (30 s), another update (40 s). How fast does each record reach
  everyone, and what does the overlay cost at rest?
- ``takedown``: 3 live exits (target 3) and a pool of standby exits; every
  ``every`` seconds (from 60 s) the ``k`` most visible live exits are taken
  down, alternately killed (process gone) and cut off (all feeds cut, the
  process still runs). Half-way through, the feeds of 1 % of the relays are
  cut for 60 s. Clients send a message per second each throughout.
- ``churn``: nodes leave (crash or withdraw), come back with their identity,
  and new nodes join, at ``churn`` of the nodes per minute in total; one record
  update every 5 s.
- ``gap``: the dissemination test the baselines fail: from 20 s to 60 s, 5 %
  of the nodes are cut off; records are published meanwhile (and one new node
  joins); loss is 5 % per transmission with drop semantics. Liveness is off
  (it is not what is compared).
- ``compare``: ``gap`` once per protocol (hydra, gossipsub, push, flood).

``make(name, nodes, seed, duration, **overrides)`` returns the configuration
and a ``setup(sim)`` that schedules the events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..records import Role
from .sim import SimConfig, Simulation

Setup = Callable[[Simulation], None]
DEFAULT_DURATION = {"converge": 60.0, "takedown": 600.0, "churn": 300.0, "gap": 120.0}
SCENARIOS = ("converge", "takedown", "churn", "gap", "compare")
COMPARED = ("hydra", "gossipsub", "push", "flood")


def _relays(sim: Simulation) -> list[int]:
    return [
        i
        for i in range(len(sim.nodes))
        if i not in sim._exitish_set and sim.net.ok(i) and sim.nodes[i].member
    ]


def converge(nodes: int, seed: int, duration: float) -> tuple[SimConfig, Setup]:
    cfg = SimConfig(
        nodes=nodes,
        seed=seed,
        duration=duration,
        standbys=max(3, nodes // 500),
        extra_capacity=4,
    )

    def setup(sim: Simulation) -> None:
        rng = sim.rng
        e = sim.engine
        pick = sorted(_relays(sim))

        def update(*_):
            node = sim.nodes[pick[rng.randrange(len(pick))]]
            sim.publish(node, e.now, why="update")

        def cut_exit_feed(*_):
            sim.cut_one_feed(sim.truth_live_exits()[0])

        e.at(10.0, update)
        e.at(20.0, lambda *_: sim.join_new())
        e.at(30.0, cut_exit_feed)
        e.at(40.0, update)

    return cfg, setup


def takedown(
    nodes: int, seed: int, duration: float, k: int = 2, every: float = 60.0
) -> tuple[SimConfig, Setup]:
    cfg = SimConfig(
        nodes=nodes,
        seed=seed,
        duration=duration,
        standbys=max(8, nodes // 200),
        clients=min(10, max(2, nodes // 20)),
    )

    def setup(sim: Simulation) -> None:
        e = sim.engine
        count = [0]

        def strike(*_):
            live = sim.truth_live_exits()
            ranked = sorted(live, key=lambda j: (-sim.visibility(j), j))[:k]
            mode = "kill" if count[0] % 2 == 0 else "cut"
            count[0] += 1
            for j in ranked:
                if mode == "kill":
                    sim.kill(j)
                else:
                    sim.cut_feeds(j)
            sim.metrics.takedown(e.now, ranked, mode)

        t = 60.0
        while t <= duration - 30.0:
            e.at(t, strike)
            t += every
        mid = round(duration / 2 / 10) * 10 + 5
        if mid + 60 <= duration - 15:
            victims: list[int] = []

            def cut(*_):
                relays = [i for i in _relays(sim) if i not in sim.client_entries]
                n = max(1, len(sim.nodes) // 100)
                victims.extend(sim.rng.sample(relays, min(n, len(relays))))
                for i in victims:
                    sim.cut_feeds(i)

            def restore(*_):
                for i in victims:
                    sim.restore_feeds(i)

            e.at(mid, cut)
            e.at(mid + 60.0, restore)

    return cfg, setup


def churn(nodes: int, seed: int, duration: float, rate: float = 0.005) -> tuple[SimConfig, Setup]:
    per_s = rate * nodes / 60.0
    joins = int(per_s * duration / 3 * 1.5) + 8
    cfg = SimConfig(
        nodes=nodes,
        seed=seed,
        duration=duration,
        standbys=max(5, nodes // 500),
        clients=min(5, max(1, nodes // 50)),
        extra_capacity=joins,
    )

    def setup(sim: Simulation) -> None:
        e = sim.engine
        rng = sim.rng
        gone: list[int] = []

        def event(*_):
            now = e.now
            nxt = now + rng.expovariate(per_s)
            if nxt < duration - 20.0:
                e.at(nxt, event)
            kind = rng.randrange(3)
            if kind == 0 and len(sim.nodes) < sim.capacity:
                sim.join_new()
                return
            if kind == 1 and gone:
                sim.rejoin(gone.pop(rng.randrange(len(gone))))
                return
            relays = [i for i in _relays(sim) if i not in sim.client_entries]
            if relays:
                i = relays[rng.randrange(len(relays))]
                graceful = rng.random() < 0.3
                sim.leave(i, graceful=graceful)
                if not graceful:
                    gone.append(i)

        def update(*_):
            relays = _relays(sim)
            if relays:
                sim.publish(sim.nodes[relays[rng.randrange(len(relays))]], e.now, why="update")
            if e.now + 5.0 < duration - 10.0:
                e.at(e.now + 5.0, update)

        if per_s > 0:
            e.at(5.0 + rng.expovariate(per_s), event)
        e.at(5.0, update)

    return cfg, setup


def gap(nodes: int, seed: int, duration: float, protocol: str = "hydra") -> tuple[SimConfig, Setup]:
    cfg = SimConfig(
        nodes=nodes,
        seed=seed,
        duration=duration,
        protocol=protocol,
        cohort=0,
        loss=0.05,
        loss_mode="drop",
        extra_capacity=2,
    )

    def setup(sim: Simulation) -> None:
        e = sim.engine
        rng = sim.rng
        cut: list[int] = []

        def cut_some(*_):
            relays = _relays(sim)
            cut.extend(rng.sample(relays, max(1, len(relays) // 20)))
            for i in cut:
                sim.cut_feeds(i)

        def restore(*_):
            for i in cut:
                sim.restore_feeds(i)

        def update(*_):
            relays = _relays(sim)
            sim.publish(sim.nodes[relays[rng.randrange(len(relays))]], e.now, why="update")

        e.at(20.0, cut_some)
        for t in (30.0, 40.0, 50.0, 70.0):
            e.at(t, update)
        e.at(45.0, lambda *_: sim.join_new(Role.RELAY | Role.ENTRY))
        e.at(60.0, restore)

    return cfg, setup


BUILDERS = {"converge": converge, "takedown": takedown, "churn": churn, "gap": gap}


def make(
    name: str, nodes: int, seed: int, duration: float | None = None, **overrides
) -> tuple[SimConfig, Setup]:
    """The configuration and event schedule of scenario ``name`` (not ``compare``)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown scenario {name!r} (one of {', '.join(SCENARIOS)})")
    dur = DEFAULT_DURATION[name] if duration is None else duration
    if name == "gap":
        cfg, setup = gap(nodes, seed, dur, overrides.pop("protocol", "hydra"))
    else:
        cfg, setup = BUILDERS[name](nodes, seed, dur)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, **overrides), setup
