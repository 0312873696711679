"""The network model: latency, loss, bandwidth, reachability, partitions; traffic counters.

Model (per message, at send time):
- the sender must be running and reachable (have at least one working feed),
  the receiver too, and both must be in the same partition group; otherwise
  the message is not delivered (a stream cannot be opened; nothing is sent);
- the sender's uplink serializes its messages: a message starts when the
  previous one finished and takes ``size / bandwidth`` seconds; a message
  that would wait more than ``max_queue`` seconds is dropped (bounded queues);
- the link latency is a fixed per-pair draw from a lognormal distribution
  (median ``latency_median``, shape ``latency_sigma``: by default most links
  are 20-80 ms), times ``1 + jitter * U(0, 1)`` per message;
- loss: each transmission is lost with probability ``loss``. With
  ``loss_mode = "retransmit"`` (TCP/QUIC streams, which every Hydra protocol
  uses) a loss costs a retransmission timeout (``max(0.2 s, 2 RTT)``, doubling),
  and six losses in a row break the connection (the message is dropped); with
  ``"drop"`` (datagram semantics, a stress setting) a loss drops the message.

Counters (``Traffic``): messages and bytes sent, per traffic class, per node
and per 10-second bin — every message the sender puts on its uplink counts,
whether or not it arrives.

Invariants: all randomness comes from the ``rng`` given; per-pair latency is a
pure function of the two node indices and the seed.
"""

from __future__ import annotations

import math
import random
from array import array

CLASSES = (
    "gossip-records",  # record messages pushed through the gossip mesh
    "gossip-liveness",  # signed Suspect/Alive/Dead statements through the mesh
    "gossip-control",  # GRAFT/PRUNE/IHAVE/IWANT
    "sync",  # anti-entropy rounds (summary, entries, want, records)
    "liveness",  # direct probes: Ping, Ack, PingReq, Nack, hints
    "client",  # onion packets and acknowledgements of the client traffic
)
C_GOSSIP_RECORDS, C_GOSSIP_LIVENESS, C_GOSSIP_CONTROL, C_SYNC, C_LIVENESS, C_CLIENT = range(6)
TRANSPORT_OVERHEAD = 32  # Noise + yamux framing per message, bytes
BIN = 10.0  # seconds per traffic bin
_TABLE = 4096


class Traffic:
    __slots__ = ("msgs", "bytes", "node_bytes", "bins_msgs", "bins_bytes", "dropped")

    def __init__(self, capacity: int) -> None:
        self.msgs = [0] * len(CLASSES)
        self.bytes = [0] * len(CLASSES)
        self.node_bytes = array("d", bytes(8 * capacity))
        self.bins_msgs: list[list[int]] = []
        self.bins_bytes: list[list[int]] = []
        self.dropped = 0

    def count(self, cls: int, src: int, size: int, now: float) -> None:
        self.msgs[cls] += 1
        self.bytes[cls] += size
        self.node_bytes[src] += size
        b = int(now / BIN)
        if b >= len(self.bins_msgs):
            self.grow(b)
        self.bins_msgs[b][cls] += 1
        self.bins_bytes[b][cls] += size

    def grow(self, b: int) -> None:
        while len(self.bins_msgs) <= b:
            self.bins_msgs.append([0] * len(CLASSES))
            self.bins_bytes.append([0] * len(CLASSES))


class Network:
    def __init__(
        self,
        rng: random.Random,
        capacity: int,
        *,
        latency_median: float = 0.04,
        latency_sigma: float = 0.35,
        jitter: float = 0.1,
        loss: float = 0.01,
        loss_mode: str = "retransmit",
        bandwidth: float = 1.25e6,
        max_queue: float = 2.0,
    ) -> None:
        if loss_mode not in ("retransmit", "drop"):
            raise ValueError("loss_mode must be 'retransmit' or 'drop'")
        self.rng = rng
        self.capacity = capacity
        mu = math.log(latency_median)
        self._lat = [rng.lognormvariate(mu, latency_sigma) for _ in range(_TABLE)]
        self._salt = rng.getrandbits(32) | 1
        self.jitter = jitter
        self.loss = loss
        self.drop = loss_mode == "drop"
        self.bandwidth = bandwidth
        self.max_queue = max_queue
        self.up = bytearray(capacity)  # process running
        self.reach = bytearray(capacity)  # at least one working feed
        self.group: list[int] | None = None  # partition group per node
        self.busy = array("d", bytes(8 * capacity))  # uplink busy until
        self.traffic = Traffic(capacity)

    # ---- state ----------------------------------------------------------------
    def ok(self, i: int) -> bool:
        """Running and reachable."""
        return bool(self.up[i] and self.reach[i])

    def connected(self, a: int, b: int) -> bool:
        """Whether ``a`` can currently reach ``b`` at all."""
        if not (self.up[a] and self.reach[a] and self.up[b] and self.reach[b]):
            return False
        g = self.group
        return g is None or g[a] == g[b]

    def partition(self, groups: list[int] | None) -> None:
        """``groups[i]``: the partition group of node ``i`` (None heals)."""
        self.group = groups

    # ---- links -----------------------------------------------------------------
    def latency(self, a: int, b: int) -> float:
        """The base one-way latency of the link a-b (symmetric, fixed per seed)."""
        if a > b:
            a, b = b, a
        h = ((a * 0x9E3779B1) ^ (b * 0x85EBCA77) ^ self._salt) * 0xC2B2AE35
        return self._lat[(h >> 13) & (_TABLE - 1)]

    def send(self, cls: int, src: int, dst: int, size: int, now: float) -> float | None:
        """Put one message on ``src``'s uplink; its arrival time at ``dst``, or None if lost."""
        up, reach = self.up, self.reach
        if not (up[src] and reach[src] and up[dst] and reach[dst]):
            return None
        g = self.group
        if g is not None and g[src] != g[dst]:
            return None
        size += TRANSPORT_OVERHEAD
        busy = self.busy[src]
        start = busy if busy > now else now
        if start - now > self.max_queue:
            self.traffic.dropped += 1
            return None
        done = start + size / self.bandwidth
        self.busy[src] = done
        tr = self.traffic  # (Traffic.count, inlined: this is the hottest path)
        tr.msgs[cls] += 1
        tr.bytes[cls] += size
        tr.node_bytes[src] += size
        k = int(now / BIN)
        if k >= len(tr.bins_msgs):
            tr.grow(k)
        tr.bins_msgs[k][cls] += 1
        tr.bins_bytes[k][cls] += size
        a, b = (src, dst) if src < dst else (dst, src)
        h = ((a * 0x9E3779B1) ^ (b * 0x85EBCA77) ^ self._salt) * 0xC2B2AE35
        lat = self._lat[(h >> 13) & (_TABLE - 1)]
        rng = self.rng
        t = done + lat * (1.0 + self.jitter * rng.random())
        loss = self.loss
        if loss and rng.random() < loss:
            if self.drop:
                return None
            rto = max(0.2, 4 * lat)
            for _ in range(6):
                t += rto
                if rng.random() >= loss:
                    return t
                rto *= 2
            return None
        return t

    def occupy(self, cls: int, src: int, size: int, n: int, now: float) -> None:
        """Send ``n`` messages whose arrival does not matter (the receivers already have
        them): count them and take their uplink time, without drawing latency or loss."""
        size += TRANSPORT_OVERHEAD
        busy = self.busy[src]
        start = busy if busy > now else now
        self.busy[src] = start + n * size / self.bandwidth
        tr = self.traffic
        tr.count(cls, src, size, now)  # one, and it makes sure the bin exists
        extra = n - 1
        if extra:
            tr.msgs[cls] += extra
            tr.bytes[cls] += extra * size
            tr.node_bytes[src] += extra * size
            b = int(now / BIN)
            tr.bins_msgs[b][cls] += extra
            tr.bins_bytes[b][cls] += extra * size

    def path_time(self, cls: int, hops: list[int], size: int, now: float) -> float | None:
        """Send one packet hop by hop along ``hops``; arrival time at the last, or None."""
        t = now
        for a, b in zip(hops, hops[1:], strict=False):
            t = self.send(cls, a, b, size, t)
            if t is None:
                return None
        return t
