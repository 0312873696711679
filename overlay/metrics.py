"""Prometheus metrics, one registry per node (several nodes may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.records_accepted = Counter(
            "hydra_records_accepted", "Records accepted into the view", ["source"], registry=r
        )
        self.records_rejected = Counter(
            "hydra_records_rejected",
            "Records rejected, by reason",
            ["source", "reason"],
            registry=r,
        )
        self.records_known = Gauge("hydra_records_known", "Records in the view", registry=r)
        self.records_unverified = Gauge(
            "hydra_records_unverified",
            "Members in the view that never authenticated to this node",
            registry=r,
        )
        self.peers = Gauge("hydra_peers_connected", "Connected peers", registry=r)
        self.trimmed = Counter(
            "hydra_connections_trimmed",
            "Connections closed once an errand (a DHT store, a verification) was done",
            registry=r,
        )
        self.gossip_messages = Counter(
            "hydra_gossip_messages", "Gossip messages", ["direction"], registry=r
        )
        self.gossip_bytes = Counter("hydra_gossip_bytes", "Gossip bytes", ["direction"], registry=r)
        self.sync_rounds = Counter(
            "hydra_sync_rounds", "Anti-entropy rounds", ["side", "result"], registry=r
        )
        self.sync_bytes = Counter(
            "hydra_sync_bytes", "Anti-entropy bytes", ["direction"], registry=r
        )
        self.sync_streams = Counter(
            "hydra_sync_streams_opened",
            "Anti-entropy streams opened (rounds reuse one per peer)",
            registry=r,
        )
        self.sync_records = Counter(
            "hydra_sync_records_pulled", "Records pulled by anti-entropy", registry=r
        )
        self.sync_pushed = Counter(
            "hydra_sync_records_pushed", "Records pushed by anti-entropy", registry=r
        )
        self.penalties = Counter("hydra_peer_penalties", "Peer penalties", ["reason"], registry=r)
        self.disconnects = Counter(
            "hydra_peer_disconnects", "Peers disconnected for misbehaviour", registry=r
        )
        self.publishes = Counter("hydra_record_publishes", "Own record publications", registry=r)
        self.exits_live = Gauge("hydra_exits_live", "Exits this node sees as live", registry=r)
        self.control_refused = Counter(
            "hydra_control_refused",
            "Control endpoint requests refused (check: host or token)",
            ["reason", "check"],
            registry=r,
        )

    def watch_caps(self, caps) -> None:
        """The ``[limits]`` caps of a node (``overlay.caps.Caps``): configured values,
        current use, and what they refused or held back."""
        r = self.registry
        configured = Gauge(
            "hydra_limit", "Configured cap from [limits] (0: no cap)", ["limit"], registry=r
        )
        use = Gauge(
            "hydra_limit_use",
            "Current use of a cap (bytes/s over 10 s, bytes drawn from the burst, "
            "connections, deliveries started in the last minute)",
            ["limit"],
            registry=r,
        )
        self.limit_refused = Counter(
            "hydra_limit_refused",
            "Packets dropped (bandwidth) or connections refused (connections) by a cap",
            ["limit"],
            registry=r,
        )
        self.limit_delayed = Counter(
            "hydra_limit_delayed", "Exit deliveries held back by the per-minute cap", registry=r
        )
        Gauge(
            "hydra_limit_waiting", "Exit deliveries waiting for the per-minute cap now", registry=r
        ).set_function(lambda: caps.waiting)
        self.limit_relayed = Counter(
            "hydra_limit_relayed_bytes",
            "Onion bytes from peers and light clients taken under the bandwidth cap",
            registry=r,
        )
        for name in caps.LIMITS:
            configured.labels(name).set_function(lambda n=name: caps.configured(n))
            use.labels(name).set_function(lambda n=name: caps.use(n))

    def watch_connections(self, host) -> None:
        """Connection refusals and live connection counts of a ``Libp2pHost``."""
        r = self.registry
        refused = Counter(
            "hydra_connections_refused",
            "Connections and streams refused by a bound or a ban, by reason",
            ["reason"],
            registry=r,
        )
        live = Gauge("hydra_connections", "Live connections", ["direction"], registry=r)
        host.on_refused(lambda reason: refused.labels(reason).inc())
        for direction in ("inbound", "outbound", "handshakes"):
            live.labels(direction).set_function(lambda d=direction: host.connection_counts()[d])

    def render(self) -> bytes:
        return generate_latest(self.registry)
