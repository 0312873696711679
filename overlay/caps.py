"""A node's operator caps (``[limits]``): relayed bandwidth, connections, exit deliveries.

The accounting is plain (``overlay.core.caps``); this class applies a node's
config to it, is asked where the work happens, reports for ``overlay status``
(``status()``) and ``/metrics`` (``hydra_limit*``), and takes a reloaded config
(``apply``, on SIGHUP).

- **Relayed bandwidth** (``bandwidth_rate`` bytes/s, ``bandwidth_burst``): a
  token bucket over the onion packets this node takes from peers and light
  clients (each one is forwarded, or delivered here). The relay asks
  ``relay_allows(size)`` once per packet, before any cryptography. Over the cap
  the packet is **dropped** and counted (``hydra_limit_refused{limit=
  "bandwidth_rate"}``), not delayed: holding packets would need memory that
  grows with the excess, and would add queueing delay to everybody's traffic;
  a dropped packet is one a sender's retry (its ack never comes) sends again,
  possibly through another path. The peer is not penalised: the cap is ours.
- **Connections** (``max_connections``, both directions; ``max_inbound`` and
  the per-address bounds): enforced by the host (``Libp2pHost.set_limits``);
  inbound over the cap is refused at accept, our dials before they start.
- **Exit deliveries** (``exit_deliveries_per_minute``): a sliding window. The
  exit's delivery worker awaits ``delivery_slot()`` before each delivery
  attempt; over the cap the attempt **waits** (the message stays queued,
  nothing is dropped) until the window has room, and the wait is visible
  (``waiting``, ``hydra_limit_waiting``, ``hydra_limit_delayed``).

0 for bandwidth or deliveries means no cap. Time is ``clock`` (monotonic).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

import trio

from .core.caps import ByteBucket, WindowCap
from .net.host import (
    REFUSED_CONNECTION_LIMIT,
    REFUSED_INBOUND_LIMIT,
    ConnectionLimits,
)

MIN_AUTO_BURST = 65536  # bytes: burst 0 means twice the rate, but at least this
RATE_WINDOW = 10  # seconds over which the relayed rate is shown


def effective_burst(rate: int, burst: int) -> int:
    """The bucket size for ``[limits] bandwidth_burst`` (0: twice the rate, >= 64 KiB)."""
    if rate <= 0:
        return 0
    return burst if burst > 0 else max(2 * rate, MIN_AUTO_BURST)


class Caps:
    """The caps of one node. See the module docstring."""

    LIMITS = (
        "bandwidth_rate",
        "bandwidth_burst",
        "max_connections",
        "max_inbound",
        "exit_deliveries_per_minute",
    )

    def __init__(self, config, metrics=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.config = config
        now = clock()
        self.bandwidth = ByteBucket(
            config.bandwidth_rate,
            effective_burst(config.bandwidth_rate, config.bandwidth_burst),
            now,
        )
        self.deliveries = WindowCap(config.exit_deliveries_per_minute, 60.0)
        self.waiting = 0  # deliveries waiting for the window now
        self.delayed = 0  # deliveries that had to wait, in total
        self.host = None
        self._recent: deque[list[int]] = deque(maxlen=RATE_WINDOW + 1)  # [second, bytes]
        self._changed = trio.Event()
        self.metrics = metrics
        self._m_relayed = self._m_dropped = self._m_delayed = None
        if metrics is not None:
            metrics.watch_caps(self)
            self._m_relayed = metrics.limit_relayed
            self._m_dropped = metrics.limit_refused.labels("bandwidth_rate")
            self._m_delayed = metrics.limit_delayed

    # ---- configuration -------------------------------------------------------------

    def connection_limits(self, config=None) -> ConnectionLimits:
        cfg = config or self.config
        return ConnectionLimits(
            max_inbound=int(cfg.max_inbound),
            max_inbound_per_ip=int(cfg.max_inbound_per_ip),
            max_handshakes_per_ip=int(cfg.max_handshakes_per_ip),
            handshake_timeout=float(cfg.handshake_timeout),
            max_connections=int(cfg.max_connections),
        )

    def attach_host(self, host) -> None:
        """Watch ``host`` (a ``Libp2pHost`` built with ``connection_limits()``)."""
        self.host = host
        if self.metrics is not None:
            refused = self.metrics.limit_refused
            names = {
                REFUSED_CONNECTION_LIMIT: "max_connections",
                REFUSED_INBOUND_LIMIT: "max_inbound",
            }

            def on_refused(reason: str) -> None:
                if reason in names:
                    refused.labels(names[reason]).inc()

            host.on_refused(on_refused)

    def apply(self, config) -> None:
        """Take the ``[limits]`` of a reloaded (validated) config; counts are kept."""
        now = self.clock()
        self.config = config
        self.bandwidth.configure(
            config.bandwidth_rate,
            effective_burst(config.bandwidth_rate, config.bandwidth_burst),
            now,
        )
        self.deliveries.configure(config.exit_deliveries_per_minute)
        if self.host is not None:
            self.host.set_limits(self.connection_limits(config))
        self._changed.set()  # waiting deliveries look again
        self._changed = trio.Event()

    # ---- enforcement ---------------------------------------------------------------

    def relay_allows(self, nbytes: int) -> bool:
        """One onion packet of ``nbytes`` from a peer or light client: True to process
        it, False to drop it (over the bandwidth cap; counted here)."""
        now = self.clock()
        if not self.bandwidth.take(now, nbytes):
            if self._m_dropped is not None:
                self._m_dropped.inc()
            return False
        sec = int(now)
        if self._recent and self._recent[-1][0] == sec:
            self._recent[-1][1] += nbytes
        else:
            self._recent.append([sec, nbytes])
        if self._m_relayed is not None:
            self._m_relayed.inc(nbytes)
        return True

    async def delivery_slot(self) -> None:
        """Return when the exit may start one more delivery (counted in the window).

        Over the cap this waits (cancellable) until the window has room or the
        cap is raised; the caller's message stays queued meanwhile.
        """
        if self.deliveries.take(self.clock()):
            return
        self.waiting += 1
        self.delayed += 1
        if self._m_delayed is not None:
            self._m_delayed.inc()
        try:
            while True:
                changed = self._changed
                wait = self.deliveries.wait(self.clock())
                with trio.move_on_after(max(wait, 0.01)):
                    await changed.wait()
                if self.deliveries.take(self.clock()):
                    return
        finally:
            self.waiting -= 1

    # ---- reporting -----------------------------------------------------------------

    def relayed_rate(self) -> float:
        """Bytes per second taken under the bandwidth cap, over the last 10 s."""
        now = int(self.clock())
        total = sum(b for s, b in self._recent if now - RATE_WINDOW < s <= now)
        return total / RATE_WINDOW

    def _connections(self) -> dict[str, int]:
        host = self.host
        if host is None:
            return {"inbound": 0, "outbound": 0, "handshakes": 0, "total": 0}
        try:
            return host.connection_counts()
        except Exception:  # noqa: BLE001 - a host shutting down: nothing to count
            return {"inbound": 0, "outbound": 0, "handshakes": 0, "total": 0}

    def configured(self, name: str) -> float:
        if name == "bandwidth_rate":
            return self.bandwidth.rate
        if name == "bandwidth_burst":
            return self.bandwidth.burst
        if name == "exit_deliveries_per_minute":
            return self.deliveries.limit
        return float(getattr(self.config, name))

    def use(self, name: str) -> float:
        now = self.clock()
        if name == "bandwidth_rate":
            return self.relayed_rate()
        if name == "bandwidth_burst":
            level = self.bandwidth.level(now)
            return 0.0 if math.isinf(level) else self.bandwidth.burst - level
        if name == "exit_deliveries_per_minute":
            return self.deliveries.used(now)
        counts = self._connections()
        if name == "max_connections":
            return counts["total"]
        return counts["total"] - counts["outbound"]

    def status(self) -> dict:
        """For ``overlay status``: each cap's configured value and current use."""
        now = self.clock()
        level = self.bandwidth.level(now)
        counts = self._connections()
        return {
            "bandwidth": {
                "rate": self.bandwidth.rate,  # bytes/s, 0: no cap
                "burst": self.bandwidth.burst,
                "available": None if math.isinf(level) else round(level),
                "bytes_per_s": round(self.relayed_rate()),
                "relayed_bytes": round(self.bandwidth.taken),
                "dropped_packets": self.bandwidth.refused,
            },
            "connections": {
                "max_connections": int(self.config.max_connections),
                "total": counts["total"],
                "max_inbound": int(self.config.max_inbound),
                "inbound": counts["total"] - counts["outbound"],
                "outbound": counts["outbound"],
                "refused": {
                    "max_connections": self._refused(REFUSED_CONNECTION_LIMIT),
                    "max_inbound": self._refused(REFUSED_INBOUND_LIMIT),
                },
            },
            "exit_deliveries": {
                "per_minute": self.deliveries.limit,  # 0: no cap
                "last_minute": self.deliveries.used(now),
                "waiting": self.waiting,
                "delayed": self.delayed,
                "over_cap": self.waiting > 0,
            },
        }

    def _refused(self, reason: str) -> int:
        host = self.host
        return 0 if host is None else int(host.refused.get(reason, 0))
