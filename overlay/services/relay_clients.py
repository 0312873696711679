"""The relay's light-client sessions (``/hydra/client/1.0.0``).

Part of ``services.relay.RelayService`` (a mixin). A client SUBMITs packets
(this node is their first hop), REGISTERs the surb ids whose replies should be
pushed back as REPLY frames, and is sent DEAD hints about nodes this node
believes dead: when that set changes, or the exits this node's view holds
change (the client syncs its membership on every DEAD frame). At most
``clients_per_peer`` sessions per client identity and ``max_clients`` in all
(a new one closes the session idle longest when all slots are taken); a
session silent for ``client_idle`` seconds, and a stream stalled mid-frame for
``frame_timeout``, is closed (``idle_timeout``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..core.relaycore import RelayCore
from ..core.surbs import ReplySink
from ..crypto import NodeId
from ..errors import DecodeError, Reason
from ..net.framing import FrameDecoder, encode_frame
from ..net.host import NetError, Stream
from ..records import Role
from ..wire import relay as wire
from .relay_links import BATCH
from .relay_metrics import RelayMetrics

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("hydra.relay")

CLIENT_PROTOCOL = wire.CLIENT_PROTOCOL
#: how often a session's writer checks the dead set for a change to push
DEAD_PUSH_INTERVAL = 0.25


@dataclass(eq=False)
class _Session(ReplySink):
    peer: NodeId
    send: trio.MemorySendChannel
    recv: trio.MemoryReceiveChannel
    dropped: int = 0
    last_dead: frozenset = field(default_factory=frozenset)
    last_exits: frozenset = field(default_factory=frozenset)  # our view's, last push
    last_active: float = 0.0  # trio time of the last complete frame from the client
    scope: trio.CancelScope | None = None

    def push(self, surb_id: bytes, payload: bytes) -> bool:
        try:
            self.send.send_nowait(wire.encode(wire.Reply(surb_id, payload)))
            return True
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped += 1
            return False


class ClientSessions:
    """Light-client sessions of ``RelayService`` (see the module docstring)."""

    node: NodeContext
    core: RelayCore
    metrics: RelayMetrics
    max_clients: int
    clients_per_peer: int
    client_idle: float
    client_evict_idle: float
    _closed: bool
    _ready: trio.Event

    def _init_clients(self, dead_nodes: Callable[[], Iterable[NodeId]] | None) -> None:
        self._sessions: set[_Session] = set()
        self._sessions_of: dict[NodeId, int] = {}
        self._dead_nodes = dead_nodes
        self._dead_cache: tuple[float, frozenset] | None = None
        self._exits_cache: tuple[int, frozenset] | None = None

    async def _serve_client(self, stream: Stream, remote_peer: str) -> None:
        peer = self._peer(remote_peer)
        if peer is None:
            return
        await self._ready.wait()
        if self._sessions_of.get(peer, 0) >= self.clients_per_peer:
            self._reject("client", Reason.CLIENT_LIMIT, peer, penalize=False)
            return
        if len(self._sessions) >= self.max_clients and not self._evict_session():
            self._reject("client", Reason.CLIENT_LIMIT, peer, penalize=False)
            return
        send, recv = trio.open_memory_channel(256)
        # the exits we hold now reach the client in its first sync: no push for them
        session = _Session(
            peer, send, recv, last_active=trio.current_time(), last_exits=self._exits()
        )
        self._sessions.add(session)
        self._sessions_of[peer] = self._sessions_of.get(peer, 0) + 1
        self.metrics.sessions.set(len(self._sessions))
        try:
            async with trio.open_nursery() as n:
                session.scope = n.cancel_scope
                n.start_soon(self._client_writer, stream, session, n.cancel_scope)
                await self._client_reader(stream, session)
                n.cancel_scope.cancel()
        finally:
            self._sessions.discard(session)
            left = self._sessions_of.get(peer, 1) - 1
            if left > 0:
                self._sessions_of[peer] = left
            else:
                self._sessions_of.pop(peer, None)
            self.core.detach(session)
            send.close()
            self.metrics.sessions.set(len(self._sessions))

    def _evict_session(self) -> bool:
        """Close the session idle longest, if idle ``client_evict_idle`` s; else False."""
        now = trio.current_time()
        oldest = min(self._sessions, key=lambda x: x.last_active, default=None)
        if oldest is None or now - oldest.last_active < self.client_evict_idle:
            return False
        self._sessions.discard(oldest)  # its slot is free now; its task ends soon
        if oldest.scope is not None:
            oldest.scope.cancel()
        self._closed_for("client", Reason.CLIENT_LIMIT)
        return True

    async def _client_reader(self, stream: Stream, session: _Session) -> None:
        peer = session.peer
        decoder = FrameDecoder(wire.MAX_SIZE)
        while not self._closed:
            deadline = session.last_active + self.client_idle
            bodies = await self._frames(stream, decoder, deadline, "client", "client", peer)
            if bodies is None:
                return
            if bodies:
                session.last_active = trio.current_time()
            packets = []
            for body in bodies:
                try:
                    frame = wire.decode(body)
                except DecodeError as e:
                    self._reject("client", e.reason, peer, penalize=True)
                    return
                if isinstance(frame, wire.Submit):
                    packets.append(frame.packet)
                elif isinstance(frame, wire.Register):
                    for push in self.core.register(session, frame.surb_ids, self.node.clock()):
                        session.push(push.surb_id, push.payload)
                else:
                    self._reject("client", Reason.MALFORMED, peer, penalize=True)
                    return
            if packets:
                self._handle_batch(packets, peer, "client")

    async def _client_writer(self, stream: Stream, session: _Session, scope) -> None:
        try:
            while True:
                frames = []
                # wake now and then to push a changed dead set (the client's failover hint)
                with trio.move_on_after(DEAD_PUSH_INTERVAL):
                    frames.append(await session.recv.receive())
                    while len(frames) < BATCH:
                        try:
                            frames.append(session.recv.receive_nowait())
                        except trio.WouldBlock:
                            break
                dead, exits = self._dead_set(), self._exits()
                if dead != session.last_dead or exits != session.last_exits:
                    # a new exit in our view (a standby promoted) is pushed too: the
                    # client syncs on any push, and must not wait for its next round
                    session.last_dead, session.last_exits = dead, exits
                    nodes = sorted(dead, key=bytes)[: wire.MAX_DEAD]
                    frames.append(wire.encode(wire.Dead(tuple(nodes))))
                if frames:
                    await stream.write(b"".join(encode_frame(f, wire.MAX_SIZE) for f in frames))
        except (NetError, trio.EndOfChannel, trio.ClosedResourceError):
            scope.cancel()

    @property
    def dead_nodes(self) -> Callable[[], Iterable[NodeId]] | None:
        """The hook naming the nodes this node believes dead (see ``__init__``)."""
        return self._dead_nodes

    @dead_nodes.setter
    def dead_nodes(self, hook: Callable[[], Iterable[NodeId]] | None) -> None:
        self._dead_nodes = hook
        self._dead_cache = None  # the next push asks the new hook

    def _dead_set(self) -> frozenset:
        """The dead set, computed at most once per half push interval for all sessions
        (every session's writer asks every DEAD_PUSH_INTERVAL)."""
        now = trio.current_time()
        if self._dead_cache is not None and now - self._dead_cache[0] < DEAD_PUSH_INTERVAL / 2:
            return self._dead_cache[1]
        dead: frozenset = frozenset()
        if self._dead_nodes is not None:
            try:
                dead = frozenset(self._dead_nodes())
            except Exception:  # noqa: BLE001 - a broken hook must not break sessions
                log.exception("dead_nodes hook failed")
        self._dead_cache = (now, dead)
        return dead

    def _exits(self) -> frozenset:
        """The exits our view holds, recomputed only when the view changed."""
        node = self.node
        if self._exits_cache is None or self._exits_cache[0] != node.changes:
            snap = node.view.snapshot(node.clock())
            exits = frozenset(r.node_id for r in snap.with_role(Role.EXIT))
            self._exits_cache = (node.changes, exits)
        return self._exits_cache[1]

    def _dead_from_liveness(self) -> list[NodeId]:
        """Nodes the node's liveness view holds DEAD."""
        liveness = self.node.resilience.liveness
        return [n for n, state in liveness.states().items() if state == "dead"]
