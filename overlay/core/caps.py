"""Operator caps as plain values: a byte token bucket and a sliding-window count.

Sans-I/O: every method takes ``now`` (seconds, any monotonic origin); nothing
here sleeps or reads a clock. A clock that steps backwards is treated as
standing still, so a bucket never loses tokens and a window never forgets an
event early because of it.

- ``ByteBucket`` bounds a *rate* with a *burst* (relayed onion bytes): it fills
  at ``rate`` units per second up to ``burst``; taking more than it holds is
  refused. ``rate == 0`` means no cap.
- ``WindowCap`` bounds how many events happen in any ``window`` seconds (exit
  deliveries per minute). ``limit == 0`` means no cap.

Both can be reconfigured in place (a SIGHUP reload) and keep what they have
counted; both hold O(1) state, except ``WindowCap``, which holds at most
``limit`` timestamps.
"""

from __future__ import annotations

import math
from collections import deque


class ByteBucket:
    """A token bucket: ``rate`` per second, at most ``burst`` at once; 0 rate: no cap."""

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate = 0.0
        self.burst = 0.0
        self._tokens = 0.0
        self._updated = now
        self.configure(rate, burst, now)
        self._tokens = self.burst
        self.taken = 0.0  # units admitted, in total
        self.refused = 0  # takes refused
        self.refused_units = 0.0

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def configure(self, rate: float, burst: float, now: float) -> None:
        """New rate and burst; the level is kept (clipped to the new burst)."""
        if not (math.isfinite(rate) and math.isfinite(burst)) or rate < 0 or burst < 0:
            raise ValueError("rate and burst must be finite and >= 0")
        if rate > 0 and burst <= 0:
            raise ValueError("a capped bucket needs burst > 0")
        self._refill(now)
        self.rate, self.burst = float(rate), float(burst)
        self._tokens = min(self._tokens, self.burst)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._updated = max(self._updated, now)
        if self.rate > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def level(self, now: float) -> float:
        """Units that could be taken now (``inf`` without a cap)."""
        if self.unlimited:
            return math.inf
        self._refill(now)
        return self._tokens

    def take(self, now: float, n: float) -> bool:
        """Take ``n`` units if the bucket holds them; False (nothing taken) if not."""
        if not self.unlimited:
            self._refill(now)
            if self._tokens < n:
                self.refused += 1
                self.refused_units += n
                return False
            self._tokens -= n
        self.taken += n
        return True

    def wait(self, now: float, n: float) -> float:
        """Seconds until ``n`` units can be taken (0: now; ``inf``: never, n > burst)."""
        if self.unlimited:
            return 0.0
        if n > self.burst:
            return math.inf
        self._refill(now)
        return max(0.0, (n - self._tokens) / self.rate)


class WindowCap:
    """At most ``limit`` events in any ``window`` seconds; ``limit == 0``: no cap."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        if not window > 0:
            raise ValueError("window must be > 0")
        self.window = float(window)
        self.limit = 0
        self._times: deque[float] = deque()
        self._latest = -math.inf
        self.taken = 0  # events admitted, in total
        self.configure(limit)

    @property
    def unlimited(self) -> bool:
        return self.limit <= 0

    def configure(self, limit: int) -> None:
        """A new limit; events already counted stay counted until they age out."""
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = int(limit)

    def _expire(self, now: float) -> float:
        now = max(now, self._latest)  # a clock stepping back stands still
        self._latest = now
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        return now

    def used(self, now: float) -> int:
        """Events in the window that ends at ``now``."""
        self._expire(now)
        return len(self._times)

    def wait(self, now: float) -> float:
        """Seconds until one more event fits (0: now)."""
        now = self._expire(now)
        if self.unlimited or len(self._times) < self.limit:
            return 0.0
        # the oldest events must age out until one slot is free
        oldest = self._times[len(self._times) - self.limit]
        return max(0.0, oldest + self.window - now)

    def take(self, now: float) -> bool:
        """Count one event if it fits in the window now; False (nothing counted) if not."""
        now = self._expire(now)
        if not self.unlimited and len(self._times) >= self.limit:
            return False
        self._times.append(now)
        if self.unlimited:  # no cap: remember only what ``used`` can still report
            while len(self._times) > 65536:
                self._times.popleft()
        self.taken += 1
        return True
