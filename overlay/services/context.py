"""What a service may use of the node that runs it: ``NodeContext``.

Services (liveness and the exit pool, onion relaying, delivery notices, feed
health) are built by the runtime, the composition root, and attached to the
node there. They see it through this Protocol only, never import the runtime,
and never write onto it; ``overlay.runtime.Node`` provides every member.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import trio

from ..caps import Caps
from ..config import Config
from ..core.admission import Admission
from ..core.liveness import Liveness
from ..core.membership import MembershipView
from ..crypto import NodeId, SigningKey
from ..errors import Reason
from ..home import Home
from ..metrics import Metrics
from ..net.host import Libp2pHost
from ..records import Role, ValidRecord


class HasLiveness(Protocol):
    """A service that runs the node's failure detector (``Resilience``)."""

    liveness: Liveness


class EventSink(Protocol):
    """The node's event ring (joins, deaths, promotions... for the console)."""

    def add(self, kind: str, text: str, **fields: Any) -> Any: ...


class NodeContext(Protocol):
    # identity, configuration, files
    node_id: NodeId
    key: SigningKey
    config: Config
    home: Home
    roles: Role
    own: ValidRecord | None
    started_at: float
    # the network, the membership and the other services
    host: Libp2pHost
    view: MembershipView
    admission: Admission
    changes: int
    ready: trio.Event
    events: EventSink
    metrics: Metrics
    caps: Caps
    services: Sequence[object]
    resilience: HasLiveness
    # time and randomness
    rng: random.Random
    clock: Callable[[], float]

    def penalize(self, peer: NodeId | str, reason: Reason) -> None: ...

    def confirm(self, peer: NodeId) -> None: ...

    async def publish_own(self, why: str, roles: Role | None = None) -> ValidRecord: ...

    def request_republish(self) -> None: ...

    async def lookup(self, node_id: NodeId) -> ValidRecord | None: ...

    async def connect_record(self, rec: ValidRecord) -> bool: ...

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None: ...

    def connected(self) -> list[NodeId]: ...

    def record_events(self, size: int = 1000) -> trio.MemoryReceiveChannel: ...

    def permitted_feeds(self, rec: ValidRecord, feeds: Sequence[str]) -> list[str]: ...

    def dial_outcome(self, feed: str, outcome: str) -> None: ...
