"""Sender anonymity under a global passive adversary, measured by simulation.

The network: ``nodes`` Hydra nodes (every one a relay and an entry, ``exits``
of them exits) and ``clients`` light clients, each attached to one entry for
the whole run (as ``overlay send --via`` and ``overlay agent`` are). A real
message takes the default path *entry, relay, exit* (2 holds); its two acks
come back through *relay, relay, entry* (2 holds). The pieces that decide
timing are the real cores: hold times from ``draw_delays``, send and loop
timers from ``next_poisson``, and each node's holding and release decisions
from the relay's own core (``overlay.core.relaycore.RelayCore``: its mix pool
with the node's default bounds and overflow rule, the ``max_delay_ms`` cut,
``hold``, and ``tick`` at ``next_wakeup()`` on the engine's clock). A packet
the core refuses (``hold_full``) is lost and counted (``hold_overflows``).

Traffic:
- real messages: each client creates one every ``msg_interval`` seconds
  (Poisson). Without an agent (``cover_rate == 0``) it is sent at once;
  with one, the agent sends at Poisson rate ``cover_rate``: the oldest queued
  message if there is one, else a *drop-cover* packet (same path shape; its
  last hop discards it);
- client loop cover at ``loop_rate``: *entry, relay, relay, entry*, pushed
  back to the client (3 holds);
- relay loop cover at ``relay_loop_rate`` per node: *relay, relay, itself*;
- acks: the exit sends two per real message (queued, delivered).

The adversary (``Adversary``) sees every link with timestamps, as in Loopix
(Piotrowska et al., USENIX Security 2017) and Nym's mixnet simulator: it
labels every packet on a link with a probability distribution over senders
(clients, plus one "other" bucket for packets that no client sent). A
client's own packet is certain (it saw the client send it). Each node is a
Poisson mix: because every hold time is exponential with the same mean and
the exponential is memoryless, each of the ``k`` packets a node holds is
equally likely to be the next one out, so an outgoing packet's distribution
is the mean of the distributions held, and the pool keeps the rest
(``S -= S / k``). It is given more than it can see in one respect (so the
numbers are conservative): it knows which packets a relay or exit
originates (relay loops, acks), labelling them "other" with certainty. A
real message is recognised when its exit delivers it (the adversary sees the
delivery leave, e.g. to an SMTP server); its sender distribution is the
label of the packet that just reached the exit, restricted to clients and
normalised; the result is its Shannon entropy in bits (the maximum is
``log2(clients)``).

Links have a fixed latency and never lose packets; processing is instant.
Determinism: one ``random.Random(seed)``, so a run is a function of its config.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np

from ..core.mixing import draw_delays, next_poisson
from ..core.relaycore import ForwardPacket, RelayCore
from ..onion.params import SMALL
from .engine import Engine
from .metrics import quantile

#: bytes one SMALL packet costs a client on its entry link (packet, frame header,
#: and the REGISTER frame of two surb ids that goes with every submit)
PACKET_BYTES = SMALL.packet_size + 3 + 3 + 2 * 16


@dataclass(frozen=True)
class AnonConfig:
    clients: int = 100
    nodes: int = 20
    exits: int = 4
    mix_delay: float = 0.5  # mean hold per forwarding hop, seconds (0: no mixing)
    msg_interval: float = 60.0  # seconds between a client's real messages (mean)
    cover_rate: float = 0.0  # agent's Poisson send rate per client (0: no agent, send at once)
    loop_rate: float = 0.0  # client loop cover per second
    relay_loop_rate: float = 0.0  # relay loop cover per second per node
    hops: int = 3  # nodes on a forward path: entry, hops - 2 relays, exit
    last_hold: bool = True  # the last hop holds too (deliver-held, reply-held)
    acks: bool = True
    link_latency: float = 0.02
    duration: float = 600.0  # measured seconds, after the warm-up
    warmup: float = 60.0
    seed: int = 1


class Adversary:
    """Global passive observer: sender distributions through Poisson mixes.

    Distributions are numpy vectors of length ``clients + 1`` (the last entry:
    "not sent by a client"); a fresh client packet is just the client's index.
    """

    def __init__(self, clients: int, nodes: int) -> None:
        self.n = clients + 1
        self.other = clients
        self.pool = [np.zeros(self.n) for _ in range(nodes)]
        self.count = [0] * nodes

    def arrive(self, node: int, label) -> None:
        if isinstance(label, int):
            self.pool[node][label] += 1.0
        else:
            self.pool[node] += label
        self.count[node] += 1

    def depart(self, node: int) -> np.ndarray:
        k = self.count[node]
        s = self.pool[node]
        out = s / k
        if k == 1:
            s[:] = 0.0
        else:
            s -= out
        self.count[node] = k - 1
        return out

    def sender_entropy(self, label) -> float:
        """Entropy (bits) of the client part of ``label``, normalised."""
        if isinstance(label, int):
            return 0.0
        p = label[: self.other]
        total = p.sum()
        if total <= 0:
            return 0.0
        p = p[p > 1e-15] / total
        return max(0.0, float(-(p * np.log2(p)).sum()))


@dataclass
class _Packet:
    kind: str  # real | drop | loop | rloop | ack
    hops: list[int]  # nodes that process it, in order
    delays: list[int]  # ms, one per forwarding hop (len(hops) - 1)
    label: object = None  # the adversary's distribution for the link it is on
    msg_created: float = 0.0
    client: int = -1  # the true sender (a client), for the ack's return path
    at: int = 0  # index into hops


@dataclass
class AnonResult:
    config: dict
    messages: int
    entropy: list[float] = field(repr=False)
    latency: list[float] = field(repr=False)
    cover_bytes_per_client: float = 0.0
    real_bytes_per_client: float = 0.0
    relay_loop_bytes_per_node: float = 0.0
    max_held: int = 0
    hold_overflows: int = 0

    def summary(self) -> dict:
        e = sorted(self.entropy)
        lat = sorted(self.latency)
        return {
            **{k: self.config[k] for k in ("clients", "mix_delay", "cover_rate", "loop_rate")},
            "messages": self.messages,
            "entropy_p10": _r(quantile(e, 0.10)),
            "entropy_p50": _r(quantile(e, 0.50)),
            "entropy_p90": _r(quantile(e, 0.90)),
            "entropy_max": round(math.log2(self.config["clients"]), 3),
            "latency_p50": _r(quantile(lat, 0.50)),
            "latency_p90": _r(quantile(lat, 0.90)),
            "cover_bytes_per_client": round(self.cover_bytes_per_client),
            "client_bytes_per_client": round(
                self.cover_bytes_per_client + self.real_bytes_per_client
            ),
            "relay_loop_bytes_per_node": round(self.relay_loop_bytes_per_node),
            "max_held": self.max_held,
            "hold_overflows": self.hold_overflows,
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


class AnonymitySim:
    def __init__(self, cfg: AnonConfig) -> None:
        if cfg.nodes < 4 or not 1 <= cfg.exits <= cfg.nodes or cfg.clients < 2:
            raise ValueError("need nodes >= 4, 1 <= exits <= nodes, clients >= 2")
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.engine = Engine()
        self.adv = Adversary(cfg.clients, cfg.nodes)
        self.other_label = np.zeros(self.adv.n)
        self.other_label[self.adv.other] = 1.0
        self.relays = [RelayCore() for _ in range(cfg.nodes)]
        self.wake = [math.inf] * cfg.nodes  # when each node's release is scheduled
        self.exits = list(range(cfg.exits))
        self.entry_of = [self.rng.randrange(cfg.nodes) for _ in range(cfg.clients)]
        self.queue: list[list[float]] = [[] for _ in range(cfg.clients)]
        self.end = cfg.warmup + cfg.duration
        self.entropy: list[float] = []
        self.latency: list[float] = []
        self.client_packets = {"real": 0, "cover": 0}
        self.relay_loops = 0
        self.max_held = 0
        self.hold_overflows = 0

    # ---- paths and packets ----------------------------------------------------------

    def _others(self, n: int, exclude: set[int]) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            x = self.rng.randrange(self.cfg.nodes)
            if x not in exclude and x not in out:
                out.append(x)
        return out

    def _delays(self, hops: list[int]) -> list[int]:
        n = len(hops) if self.cfg.last_hold else len(hops) - 1
        return draw_delays(self.rng, self.cfg.mix_delay, n)

    def _forward_path(self, entry: int) -> list[int]:
        ex = self.rng.choice([e for e in self.exits if e != entry] or self.exits)
        return [entry, *self._others(self.cfg.hops - 2, {entry, ex}), ex]

    def _client_send(self, c: int, kind: str, created: float) -> None:
        entry = self.entry_of[c]
        if kind == "loop":
            hops = [entry, *self._others(2, {entry}), entry]
        else:
            hops = self._forward_path(entry)
        p = _Packet(kind, hops, self._delays(hops), label=c, msg_created=created, client=c)
        if self.cfg.warmup <= self.engine.now < self.end:
            self.client_packets["real" if kind == "real" else "cover"] += 1
        self.engine.after(self.cfg.link_latency, self._arrive, p)

    def _node_send(self, kind: str, hops: list[int]) -> None:
        """A node's own packet (relay loop, ack): sent straight to ``hops[0]``,
        held by each forwarding hop; the adversary knows it is no client's."""
        p = _Packet(kind, hops, self._delays(hops), label=self.other_label)
        self.engine.after(self.cfg.link_latency, self._arrive, p)

    # ---- events ---------------------------------------------------------------------

    def _arrive(self, p: _Packet, _b=None, _c=None) -> None:
        if p.at == len(p.hops):  # released by the last hop: delivered now
            self._end_of_path(p, p.hops[-1])
            return
        node = p.hops[p.at]
        if p.at == len(p.hops) - 1 and not self.cfg.last_hold:
            self._end_of_path(p, node)
            return
        relay = self.relays[node]
        to = p.hops[p.at + 1] if p.at + 1 < len(p.hops) else None
        if relay.hold(to, p, p.delays[p.at], SMALL.packet_size, self.engine.now):
            self.hold_overflows += 1  # refused by the pool's bound: lost
            return
        self.adv.arrive(node, p.label)
        self.max_held = max(self.max_held, len(relay.mix))
        self._schedule(node)

    def _schedule(self, node: int) -> None:
        """Ask the engine to tick ``node``'s relay core at its next wakeup."""
        due = self.relays[node].next_wakeup()
        if due is not None and due < self.wake[node]:
            self.wake[node] = due
            self.engine.at(due, self._tick, node, due)

    def _tick(self, node: int, due: float, _c=None) -> None:
        if due != self.wake[node]:
            return  # superseded by an earlier wakeup, which ran and rescheduled
        self.wake[node] = math.inf
        for e in self.relays[node].tick(self.engine.now):
            if type(e) is not ForwardPacket:
                continue
            p = e.packet
            p.label = self.adv.depart(node)
            p.at += 1
            if p.at == len(p.hops):  # the last hop's own output: no link to cross
                self._arrive(p)
            else:
                self.engine.after(self.cfg.link_latency, self._arrive, p)
        self._schedule(node)

    def _end_of_path(self, p: _Packet, node: int) -> None:
        if p.kind != "real":
            return  # dropped (drop cover), pushed to its client (loop, ack) or home (rloop)
        now = self.engine.now
        if p.msg_created >= self.cfg.warmup and now <= self.end:
            self.entropy.append(self.adv.sender_entropy(p.label))
            wire = len(p.hops) * self.cfg.link_latency
            self.latency.append(max(0.0, now - p.msg_created - wire))
        if self.cfg.acks:
            entry = self.entry_of[p.client]
            for _ in range(2):
                self._node_send("ack", [*self._others(2, {node, entry}), entry])

    # ---- timers ---------------------------------------------------------------------

    def _new_message(self, c: int, _b=None, _c=None) -> None:
        now = self.engine.now
        if self.cfg.cover_rate > 0:
            self.queue[c].append(now)
        else:
            self._client_send(c, "real", now)
        self.engine.at(now + self.rng.expovariate(1 / self.cfg.msg_interval), self._new_message, c)

    def _agent_tick(self, c: int, _b=None, _c=None) -> None:
        if self.queue[c]:
            self._client_send(c, "real", self.queue[c].pop(0))
        else:
            self._client_send(c, "drop", self.engine.now)
        self.engine.at(
            next_poisson(self.rng, self.cfg.cover_rate, self.engine.now), self._agent_tick, c
        )

    def _loop_tick(self, c: int, _b=None, _c=None) -> None:
        self._client_send(c, "loop", self.engine.now)
        self.engine.at(
            next_poisson(self.rng, self.cfg.loop_rate, self.engine.now), self._loop_tick, c
        )

    def _relay_loop_tick(self, n: int, _b=None, _c=None) -> None:
        if self.cfg.warmup <= self.engine.now < self.end:
            self.relay_loops += 1
        self._node_send("rloop", [*self._others(2, {n}), n])
        self.engine.at(
            next_poisson(self.rng, self.cfg.relay_loop_rate, self.engine.now),
            self._relay_loop_tick,
            n,
        )

    def run(self) -> AnonResult:
        cfg, eng, rng = self.cfg, self.engine, self.rng
        for c in range(cfg.clients):
            eng.at(rng.expovariate(1 / cfg.msg_interval), self._new_message, c)
            if cfg.cover_rate > 0:
                eng.at(next_poisson(rng, cfg.cover_rate, 0.0), self._agent_tick, c)
            if cfg.loop_rate > 0:
                eng.at(next_poisson(rng, cfg.loop_rate, 0.0), self._loop_tick, c)
        if cfg.relay_loop_rate > 0:
            for n in range(cfg.nodes):
                eng.at(next_poisson(rng, cfg.relay_loop_rate, 0.0), self._relay_loop_tick, n)
        # run on past the end so that messages created before it are delivered
        eng.run(self.end + 60 * max(cfg.mix_delay, 0.1) + 10 / max(cfg.cover_rate, 0.1))
        per_client = cfg.clients * cfg.duration
        return AnonResult(
            config=asdict(cfg),
            messages=len(self.entropy),
            entropy=self.entropy,
            latency=self.latency,
            cover_bytes_per_client=self.client_packets["cover"] * PACKET_BYTES / per_client,
            real_bytes_per_client=self.client_packets["real"] * PACKET_BYTES / per_client,
            relay_loop_bytes_per_node=self.relay_loops * PACKET_BYTES / (cfg.nodes * cfg.duration),
            max_held=self.max_held,
            hold_overflows=self.hold_overflows,
        )


def measure(cfg: AnonConfig) -> AnonResult:
    """Run one configuration; see the module docstring for the model."""
    return AnonymitySim(cfg).run()
