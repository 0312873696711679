"""Effects: what a sans-I/O core asks the runtime to do. Frozen values, no behaviour.

Cores expose ``receive(peer, frame, now) -> list[Effect]`` and
``tick(now) -> list[Effect]``; one runtime executes the effects.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..crypto import NodeId
from ..errors import Reason


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``frame`` to ``peer`` on the Hydra stream protocol ``protocol``.

    ``urgent``: a probe's ping, whose absence would read as the peer's silence:
    sent even while opening streams to the peer backs off after a failed open.
    """

    peer: NodeId
    protocol: str
    frame: bytes
    urgent: bool = False


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Publish ``data`` on a gossip topic."""

    topic: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Penalize:
    """A peer sent bad input: count it, down-score, maybe disconnect."""

    peer: NodeId
    reason: Reason


@dataclass(frozen=True, slots=True)
class Announce:
    """Re-publish our own record (seq+1) with these roles (role names)."""

    roles: tuple[str, ...]
    why: str


@dataclass(frozen=True, slots=True)
class StateChanged:
    """A monitored node changed liveness state (for metrics, logs and views)."""

    node: NodeId
    state: str
    since: float


Effect = Send | Broadcast | Penalize | Announce | StateChanged
