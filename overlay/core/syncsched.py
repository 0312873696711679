"""Sans-I/O schedule of anti-entropy rounds: fast while rounds find differences,
backing off while they do not.

A node runs one round at a time with one connected peer. After a round whose
summaries matched (nothing pulled, nothing pushed) the gap to the next round
doubles, up to ``slowest`` (memberlist's push-pull runs every 30 s); a round
that found differences brings the gap back to ``fastest``; a round that failed
or timed out backs off as a matching one does (a busy or unreachable peer is
not asked again at full rate). Evidence that a peer holds something we lack
(a record that reached us other than by gossip, connections back after none)
brings rounds back to the fast rate at once with ``kick()``; a gossiped seq
that skips one asks for one round with its forwarder, ``kick(peer=...)``.

So the idle cost of anti-entropy is one round per ``slowest`` seconds per node,
and a node whose view is changing still converges at the fast rate.

Time and randomness are parameters: ``poll(now)`` says what to do next.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass

SAME = "same"  # summaries matched: nothing moved
DIFFERED = "differed"  # records moved in either direction
FAILED = "failed"  # timed out, refused, stream broken

JITTER = 0.25  # each gap is drawn in [1 - JITTER, 1 + JITTER] x the interval


@dataclass(frozen=True)
class Due:
    """Run a round now; with ``peer`` if it is still connected, else with any."""

    peer: Hashable | None


class SyncSchedule:
    def __init__(
        self, fastest: float, slowest: float, rng: random.Random | None = None, now: float = 0.0
    ) -> None:
        if not 0 < fastest <= slowest:
            raise ValueError("need 0 < fastest <= slowest")
        self.fastest = fastest
        self.slowest = slowest
        self.rng = rng or random.Random()
        self.interval = fastest
        self.next_at = now + self._gap()
        self._targets: list[Hashable] = []  # peers asked for by kick, oldest first
        self.kicks = 0

    def configure(self, fastest: float, slowest: float) -> None:
        """New bounds (config reload); the current gap is clamped into them."""
        if not 0 < fastest <= slowest:
            raise ValueError("need 0 < fastest <= slowest")
        self.fastest, self.slowest = fastest, slowest
        self.interval = min(max(self.interval, fastest), slowest)

    def _gap(self) -> float:
        return self.interval * (1 - JITTER + 2 * JITTER * self.rng.random())

    def poll(self, now: float) -> Due | float:
        """``Due`` if a round should start now, else the seconds until one should."""
        if self._targets:
            return Due(self._targets.pop(0))
        if now >= self.next_at:
            return Due(None)
        return self.next_at - now

    def started(self, now: float, timeout: float) -> None:
        """A round started (for drivers that do not wait for it): if its outcome
        never comes, the next round is due after ``timeout``."""
        self.next_at = now + timeout

    def done(self, outcome: str, now: float) -> None:
        """A round ended with ``outcome`` (``SAME``, ``DIFFERED`` or ``FAILED``)."""
        if outcome == DIFFERED:
            self.interval = self.fastest
        else:
            self.interval = min(self.interval * 2, self.slowest)
        self.next_at = now + self._gap()

    def kick(self, now: float, peer: Hashable | None = None) -> None:
        """Something suggests a peer (or, without ``peer``, any peer) holds what we
        lack, or lacks what we hold: rounds come back to the fast rate at once."""
        self.kicks += 1
        if peer is not None:  # one round with that peer; the rate stays as it is
            if peer not in self._targets:
                self._targets.append(peer)
                del self._targets[:-8]  # bounded: the newest few
            return
        self.interval = self.fastest
        self.next_at = min(self.next_at, now + self.fastest * self.rng.random())
