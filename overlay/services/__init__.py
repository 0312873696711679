"""Node services: what a node runs beside membership and anti-entropy.

Each service is built by the runtime (the composition root), attached to the
node there and driven in its nursery; it sees the node only through
``context.NodeContext`` and imports nothing of the runtime.

- ``resilience``: ``Resilience``, the liveness core (SWIM) and the exit pool;
- ``relay``: ``RelayService``, onion relaying, SURB replies, exit intake;
- ``notices``: ``DeliveryNotices``, "delivered elsewhere" notices between exits;
- ``feeds``: ``FeedMonitor``, feed health, relay reservations, AutoNAT probes,
  and ``dial_record``, the dialing policy.

Beside them, the node's own drivers, built and run by the runtime the same way:

- ``sync``: ``AntiEntropySync``, anti-entropy rounds (``core.syncround``), and
  ``PeerInfo``, a connected peer;
- ``peers``: ``PeerManager``, joining, the peer loop, verification dials;
- ``status``: what the node reports (``overlay status``, the control endpoint).
"""
