"""Sans-I/O peer scoring and rate limiting.

A peer loses points for each bad input (more for forgeries than for stale
gossip); points recover over time. Below ``disconnect_below`` the runtime
disconnects the peer and refuses it for ``ban_seconds``. Token buckets bound
how often a peer may make us do work (sync rounds, packets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Reason

WEIGHTS = {
    Reason.BAD_SIGNATURE: 25.0,
    Reason.OVERSIZED: 20.0,
    Reason.MALFORMED: 10.0,
    Reason.NON_CANONICAL: 10.0,
    Reason.UNKNOWN_VERSION: 2.0,
    Reason.EXPIRED: 2.0,
    Reason.FUTURE: 5.0,
    Reason.STALE_SEQ: 1.0,
    Reason.RATE_LIMITED: 5.0,
}


@dataclass
class _Peer:
    score: float = 0.0
    updated: float = 0.0
    banned_until: float = 0.0


@dataclass
class PeerScores:
    disconnect_below: float = -100.0
    recover_per_second: float = 2.0
    ban_seconds: float = 60.0
    _peers: dict = field(default_factory=dict)

    def _get(self, peer, now: float) -> _Peer:
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _Peer(updated=now)
        p.score = min(0.0, p.score + (now - p.updated) * self.recover_per_second)
        p.updated = now
        return p

    def penalize(self, peer, reason: Reason, now: float) -> bool:
        """Record a penalty; True if the peer should now be disconnected and banned."""
        p = self._get(peer, now)
        p.score -= WEIGHTS.get(reason, 5.0)
        if p.score <= self.disconnect_below:
            p.banned_until = now + self.ban_seconds
            p.score = 0.0
            return True
        return False

    def score(self, peer, now: float) -> float:
        return self._get(peer, now).score

    def banned(self, peer, now: float) -> bool:
        p = self._peers.get(peer)
        return p is not None and p.banned_until > now

    def forget_idle(self, now: float) -> None:
        for peer in [k for k, p in self._peers.items() if p.banned_until <= now and p.score >= 0]:
            del self._peers[peer]


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float, n: float = 1.0) -> bool:
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False
