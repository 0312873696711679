"""Discrete-event simulator: many Hydra nodes driving the real sans-I/O cores on a fake clock.

``simulate("takedown", nodes=10_000, seed=1)`` runs a scenario and returns the
simulation, its report and its performance record; ``overlay sim`` is the
command line (``overlay.sim.cli.sim_command``). See docs/architecture.md for
what is real and what is modeled.
"""

from .engine import Engine as Engine
from .gossip import GossipParams as GossipParams
from .network import Network as Network
from .report import build_report as build_report
from .report import compare as compare
from .report import simulate as simulate
from .scenarios import SCENARIOS as SCENARIOS
from .scenarios import make as make_scenario
from .sim import SimConfig as SimConfig
from .sim import Simulation as Simulation

__all__ = [
    "SCENARIOS",
    "Engine",
    "GossipParams",
    "Network",
    "SimConfig",
    "Simulation",
    "build_report",
    "compare",
    "make_scenario",
    "simulate",
]
