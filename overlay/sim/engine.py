"""The discrete-event loop: a fake clock and a heap of timed events.

Invariants:
- events run in (time, insertion order): two events at the same time run in
  the order they were scheduled, so a run is a pure function of the seed;
- time never goes backwards: an event scheduled in the past runs "now";
- handlers take exactly three positional arguments (unused ones are None),
  which keeps the hot loop free of ``*args`` packing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

Handler = Callable[[object, object, object], None]


class Engine:
    """``at(t, fn, a, b, c)`` schedules ``fn(a, b, c)`` at simulated time ``t``."""

    __slots__ = ("now", "_heap", "_seq", "events")

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self.events = 0

    def at(self, t: float, fn: Handler, a=None, b=None, c=None) -> None:
        if t < self.now:
            t = self.now
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, a, b, c))

    def after(self, delay: float, fn: Handler, a=None, b=None, c=None) -> None:
        self.at(self.now + delay, fn, a, b, c)

    def run(self, until: float) -> None:
        """Run every event due at or before ``until``; leave the clock at ``until``."""
        heap = self._heap
        pop = heapq.heappop
        n = 0
        while heap and heap[0][0] <= until:
            t, _, fn, a, b, c = pop(heap)
            self.now = t
            fn(a, b, c)
            n += 1
        self.events += n
        self.now = max(self.now, until)

    def pending(self) -> int:
        return len(self._heap)
