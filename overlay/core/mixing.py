"""Poisson mixing and cover traffic, the pure parts (Loopix-style).

- ``draw_delays``: the sender draws one hold time per forwarding hop from an
  exponential distribution of mean ``mean`` seconds and writes it into that
  hop's Sphinx routing block (``delay ms``), so no hop learns another's delay.
  Because the exponential distribution is memoryless, every packet held by a
  relay is equally likely to be the next to leave, whenever it arrived: that
  is what makes a relay a *Poisson mix*, and what the anonymity measurement
  (``overlay.sim.anonymity``) relies on.
- ``MixPool``: what a relay holds, each packet until its own due time,
  independently of the others. Bounded in packets and in bytes; the overflow
  rule is *refuse the arriving packet* (counted by the caller): releasing a
  held packet early would leak its timing, evicting one at random would break
  the sender's delay promise for a packet already accepted. A refused packet
  is lost like any other, and its sender resends it after its ack timeout.
- ``next_poisson``: the next event of a Poisson process (cover traffic).
- ``LoopMonitor``: loop-cover packets in flight; a loop that does not come
  back within its deadline is evidence against every relay on it.

Invariants: no I/O, no clock (``now`` is a parameter), all randomness from the
``rng`` passed in; every structure is bounded.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..crypto import NodeId
from ..errors import LocalError

#: default mean hold time per forwarding hop, seconds (docs/anonymity.md says why)
DEFAULT_MIX_DELAY = 0.75
#: ``overlay agent``: Poisson rate of its sends (a queued message, else drop cover)
DEFAULT_COVER_RATE = 0.5
#: ``overlay agent``: Poisson rate of its loop-cover packets
DEFAULT_COVER_LOOP_RATE = 0.2
#: a relay's own loop-cover rate
DEFAULT_RELAY_LOOP_RATE = 0.1
#: the longest hold time a sender writes and a relay honours (a sender's draw is
#: cut there; at any sane mean the cut is never reached: P = exp(-cap / mean))
MAX_DELAY_MS = 60_000
#: a loop-cover packet is lost when not back ``LOOP_SLACK`` seconds after its
#: chosen delays have passed
LOOP_SLACK = 10.0

T = TypeVar("T")


def draw_delays(rng: random.Random, mean: float, n: int, cap_ms: int = MAX_DELAY_MS) -> list[int]:
    """``n`` hold times in whole milliseconds, exponential with mean ``mean`` seconds.

    ``mean <= 0`` gives zeros (no mixing). Each draw is cut at ``cap_ms``.
    """
    if n < 0:
        raise LocalError("need n >= 0 delays")
    if not mean > 0:
        return [0] * n
    return [min(cap_ms, int(round(rng.expovariate(1.0 / mean) * 1000))) for _ in range(n)]


def next_poisson(rng: random.Random, rate: float, now: float) -> float:
    """When the next event of a Poisson process of ``rate`` per second falls
    (``inf`` for a zero rate)."""
    if not rate > 0:
        return math.inf
    return now + rng.expovariate(rate)


def ramp_keeps(rng: random.Random, elapsed: float, ramp: float) -> bool:
    """Thinning of a Poisson process to a rate that grows linearly from 0 to its
    full value over ``ramp`` seconds: an event ``elapsed`` seconds in is kept with
    probability ``min(1, elapsed / ramp)`` (always, for ``ramp <= 0``). The kept
    events form a Poisson process of that growing rate; which events are kept
    does not depend on what they are (a loop's path is drawn only once kept)."""
    return ramp <= 0 or rng.random() * ramp < elapsed


class MixPool(Generic[T]):
    """Packets held until their due time; at most ``max_packets`` and ``max_bytes``.

    ``hold(now, delay, item, size)`` returns False (and counts an overflow)
    when the packet would exceed a bound: the arriving packet is refused.
    ``due(now)`` pops every packet due at or before ``now``, earliest first
    (ties in arrival order). ``next_due()`` says when to call it next.
    """

    __slots__ = ("max_packets", "max_bytes", "_heap", "_seq", "_bytes", "overflows", "released")

    def __init__(self, max_packets: int = 4096, max_bytes: int = 64 << 20) -> None:
        if max_packets < 1 or max_bytes < 1:
            raise LocalError("MixPool bounds must be >= 1")
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self._heap: list[tuple[float, int, int, T]] = []
        self._seq = itertools.count()
        self._bytes = 0
        self.overflows = 0
        self.released = 0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def hold(self, now: float, delay: float, item: T, size: int = 0) -> bool:
        if len(self._heap) >= self.max_packets or self._bytes + size > self.max_bytes:
            self.overflows += 1
            return False
        heapq.heappush(self._heap, (now + max(0.0, delay), next(self._seq), size, item))
        self._bytes += size
        return True

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[T]:
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, size, item = heapq.heappop(heap)
            self._bytes -= size
            out.append(item)
        self.released += len(out)
        return out

    def held(self) -> list[T]:
        """Every held item, earliest due first, left in place (for status and checks)."""
        return [h[3] for h in sorted(self._heap)]

    def drain(self) -> list[T]:
        """Everything still held (e.g. at shutdown: these packets are lost)."""
        out = [h[3] for h in sorted(self._heap)]
        self._heap.clear()
        self._bytes = 0
        return out


# ---- loop cover ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoopLost:
    """A loop did not come back by ``deadline``: evidence against ``relays``."""

    loop_id: bytes
    relays: tuple[NodeId, ...]
    sent_at: float
    deadline: float


@dataclass(slots=True)
class _Loop:
    relays: tuple[NodeId, ...]
    sent_at: float
    deadline: float


class LoopMonitor:
    """Loop-cover packets in flight, and what their fate says about relays.

    ``sent(loop_id, relays, now, held)``: a loop left through ``relays``
    (every node that processes it, the one where it ends included) and its
    hops will hold it ``held`` seconds in all; it is due back by
    ``now + held + slack``. ``returned(loop_id, now)`` marks it back (True if
    it was ours and in time). ``tick(now)`` reports every loop past its
    deadline as a ``LoopLost`` and adds one to ``evidence[node]`` for each of
    its relays (a loss is shared evidence: one relay on the loop dropped it,
    the monitor cannot say which; a relay on many lost loops stands out).
    Bounded: at most ``max_inflight`` loops (``sent`` refuses more) and
    ``max_nodes`` evidence entries (the smallest are forgotten).
    """

    def __init__(
        self, *, slack: float = LOOP_SLACK, max_inflight: int = 4096, max_nodes: int = 4096
    ) -> None:
        self.slack = slack
        self.max_inflight = max_inflight
        self.max_nodes = max_nodes
        self._inflight: dict[bytes, _Loop] = {}
        self.evidence: dict[NodeId, int] = {}
        self.returns: dict[NodeId, int] = {}
        self.stats = {"sent": 0, "returned": 0, "lost": 0, "late": 0, "refused": 0}

    def __len__(self) -> int:
        return len(self._inflight)

    def sent(self, loop_id: bytes, relays: Sequence[NodeId], now: float, held: float) -> bool:
        if len(self._inflight) >= self.max_inflight:
            self.stats["refused"] += 1
            return False
        self._inflight[bytes(loop_id)] = _Loop(tuple(relays), now, now + held + self.slack)
        self.stats["sent"] += 1
        return True

    def knows(self, loop_id: bytes) -> bool:
        return loop_id in self._inflight

    def returned(self, loop_id: bytes, now: float) -> bool:
        loop = self._inflight.pop(loop_id, None)
        if loop is None:
            self.stats["late"] += 1  # already declared lost, or never ours
            return False
        self.stats["returned"] += 1
        for n in loop.relays:
            self.returns[n] = self.returns.get(n, 0) + 1
        self._bound(self.returns)
        return True

    def tick(self, now: float) -> list[LoopLost]:
        lost = [(k, v) for k, v in self._inflight.items() if v.deadline <= now]
        out = []
        for k, v in lost:
            del self._inflight[k]
            self.stats["lost"] += 1
            for n in v.relays:
                self.evidence[n] = self.evidence.get(n, 0) + 1
            out.append(LoopLost(k, v.relays, v.sent_at, v.deadline))
        if out:
            self._bound(self.evidence)
        return out

    def next_deadline(self) -> float | None:
        return min((v.deadline for v in self._inflight.values()), default=None)

    def _bound(self, table: dict[NodeId, int]) -> None:
        if len(table) > self.max_nodes:
            for n, _ in sorted(table.items(), key=lambda kv: kv[1])[: len(table) - self.max_nodes]:
                del table[n]

    def suspects(self, min_losses: int = 1) -> dict[NodeId, float]:
        """Nodes with at least ``min_losses`` lost loops: their loss share."""
        out = {}
        for n, lost in self.evidence.items():
            if lost >= min_losses:
                out[n] = lost / (lost + self.returns.get(n, 0))
        return out
