"""The relay service's Prometheus metrics (``hydra_relay_*``, ``hydra_onion_*``, exit acks)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge


class RelayMetrics:
    """The relay's Prometheus metrics (names and labels are part of the interface)."""

    def __init__(self, registry) -> None:
        r = registry
        self.packets_in = Counter(
            "hydra_relay_packets_in", "Packets received", ["source"], registry=r
        )
        self.packets_out = Counter(
            "hydra_relay_packets_out", "Packets written to neighbours", registry=r
        )
        self.bytes_out = Counter("hydra_relay_bytes_out", "Relay bytes written", registry=r)
        self.rejected = Counter(
            "hydra_relay_rejected",
            "Packets or frames rejected, by reason",
            ["source", "reason"],
            registry=r,
        )
        self.dropped = Counter(
            "hydra_relay_dropped", "Accepted packets dropped, by cause", ["why"], registry=r
        )
        self.forwarded = Counter("hydra_relay_forwarded", "Packets forwarded", registry=r)
        self.delivered = Counter(
            "hydra_relay_delivered", "Packets ending here", ["kind"], registry=r
        )
        self.reconnects = Counter(
            "hydra_relay_reconnects", "Wedged connections dropped and redialled", registry=r
        )
        self.links = Gauge("hydra_relay_links", "Open outbound relay links", registry=r)
        self.loops = Counter(
            "hydra_relay_loops",
            "This relay's own loop-cover packets, by fate (sent, returned, lost)",
            ["result"],
            registry=r,
        )
        self.cover_bytes = Counter(
            "hydra_relay_cover_bytes", "Bytes of loop cover this relay sent", registry=r
        )
        self.held = Gauge(
            "hydra_relay_held_packets", "Packets held by the mix for their delay", registry=r
        )
        self.sessions = Gauge("hydra_relay_client_sessions", "Light-client sessions", registry=r)
        self.acks = Counter("hydra_exit_acks", "Acks sent by this exit", ["status"], registry=r)
        self.closed = Counter(
            "hydra_relay_closed",
            "Relay links and client sessions closed by this node, by cause",
            ["what", "why"],
            registry=r,
        )
        self.lookups = Gauge(
            "hydra_relay_next_hop_lookups", "DHT lookups for unknown next hops running", registry=r
        )
        self.lookups_started = Counter(
            "hydra_relay_next_hop_lookups_started",
            "DHT lookups started for next hops missing from the view",
            registry=r,
        )
        self.dials = Counter("hydra_relay_dials", "Dials to next hops", registry=r)
        self.epoch = Gauge("hydra_onion_epoch", "Current onion key epoch", registry=r)
        self.epochs = Gauge("hydra_onion_epochs", "Onion key epochs accepted", registry=r)
        self.replay_tags = Gauge(
            "hydra_onion_replay_tags", "Replay tags held, all accepted epochs", registry=r
        )
        self.rotations = Counter(
            "hydra_onion_rotations", "Onion key switches, by cause", ["why"], registry=r
        )
