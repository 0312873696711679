"""What a node reports about itself: ``overlay status`` and the control endpoint.

Assembled from the node's parts (membership snapshot, peers, services, caps,
admission) on each request; plain dictionaries, the JSON the control
endpoint serves. Seen through ``StatusNode``; nothing of the runtime is imported.
"""

from __future__ import annotations

from typing import Protocol

from ..core.peering import feed_network
from ..core.scores import PeerScores
from ..crypto import NodeId
from ..records import Role
from .context import HasLiveness, NodeContext
from .sync import PeerInfo


class HasStatus(Protocol):
    def status(self) -> dict: ...


class HasExits(HasLiveness, Protocol):
    def exits(self, now: float) -> dict: ...


class StatusNode(NodeContext, Protocol):
    """What the reports read of the node beyond ``NodeContext``."""

    peers: dict[NodeId, PeerInfo]
    scores: PeerScores
    control_url: str
    relay: HasStatus
    resilience: HasExits

    @property
    def joined_via(self) -> str | None: ...

    def status(self) -> dict: ...


def control_state(node: StatusNode, what: str) -> dict:
    """What the control endpoint serves under ``what``: status, peers, exits, records."""
    now = node.clock()
    snap = node.view.snapshot(now)
    if what == "status":
        return node.status()
    if what == "peers":
        return {
            "peers": [
                {
                    "peer_id": p.peer.peer_id(),
                    "address": p.address,
                    "connected_for": round(now - p.connected_at, 1),
                    "sync_ok": p.sync_ok,
                    "sync_failed": p.sync_failed,
                    "score": round(node.scores.score(p.peer, now), 1),
                    "roles": (snap.get(p.peer).roles.names() if snap.get(p.peer) else []),
                }
                for p in list(node.peers.values())
            ]
        }
    if what == "exits":
        return node.resilience.exits(now)
    if what == "records":
        return {
            "records": [r.summary() | {"live": not r.is_tombstone} for r in snap.records.values()]
        }
    return {}


def node_status(node: StatusNode) -> dict:
    """The node at a glance (``overlay status``, the console)."""
    now = node.clock()
    snap = node.view.snapshot(now)
    return {
        "peer_id": node.node_id.peer_id(),
        "roles": node.roles.names(),
        "seq": node.own.seq if node.own else None,
        "uptime": round(now - node.started_at, 1),
        "listen": node.host.listen_addrs() if node.host else [],
        "feeds": next(
            (svc.feed_status() for svc in node.services if hasattr(svc, "feed_status")),
            [
                {"addr": f, "network": feed_network(f), "state": "up"}
                for f in (node.own.feeds if node.own else ())
            ],
        ),
        "members": len(snap.live()),
        "records": len(snap.records),
        "exits": len(snap.with_role(Role.EXIT)),
        "peers": len(node.peers),
        "joined_via": node.joined_via,
        "control": node.control_url,
        "relay": node.relay.status(),
        "limits": node.caps.status(),
        "admission": {
            "verified": node.admission.verified,
            "unverified": node.admission.unverified,
            "max_unverified": node.admission.limits.max_unverified,
            "rejected": node.admission.rejected,
        },
    }
