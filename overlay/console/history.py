"""The last hour of a node, one sample every few seconds (sans-I/O).

``History.offer(now, values)`` keeps one sample per ``interval`` seconds and at
most ``span / interval`` of them, so memory stays bounded (360 samples of a few
numbers each by default: some tens of kilobytes). Counters (bytes, packets) are
turned into rates per second over the interval between two samples; a counter
that went down (a restart of the thing counting) gives no rate for that sample.

No I/O and no clock: the caller passes ``now``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

SPAN = 3600.0  # seconds of history kept
INTERVAL = 10.0  # seconds between two samples


class History:
    """See the module docstring."""

    def __init__(self, span: float = SPAN, interval: float = INTERVAL) -> None:
        if interval <= 0 or span < interval:
            raise ValueError("need 0 < interval <= span")
        self.span = span
        self.interval = interval
        self.samples: deque[dict] = deque(maxlen=int(span // interval))
        self._last_at: float | None = None
        self._last_counters: dict[str, float] = {}

    def due(self, now: float) -> bool:
        return self._last_at is None or now - self._last_at >= self.interval

    def offer(
        self, now: float, gauges: Mapping[str, float], counters: Mapping[str, float]
    ) -> dict | None:
        """Take a sample if one is due: the gauges as they are, the counters as
        rates per second since the previous sample. Returns the sample taken."""
        if not self.due(now):
            return None
        sample: dict = {"t": round(now, 3)}
        sample.update({k: v for k, v in gauges.items()})
        rates: dict[str, float | None] = {}
        elapsed = None if self._last_at is None else now - self._last_at
        for k, v in counters.items():
            prev = self._last_counters.get(k)
            if elapsed and prev is not None and v >= prev:
                rates[k] = round((v - prev) / elapsed, 2)
            else:
                rates[k] = None
        sample["rates"] = rates
        self._last_at = now
        self._last_counters = dict(counters)
        self.samples.append(sample)
        return sample

    def since(self, t: float) -> list[dict]:
        """Samples taken after time ``t``, oldest first."""
        out = []
        for s in reversed(self.samples):
            if s["t"] <= t:
                break
            out.append(s)
        out.reverse()
        return out
