"""The relay's outbound links: one long-lived stream per neighbour, and the way to it.

Part of ``services.relay.RelayService`` (a mixin: it uses the service's node,
core, metrics and nursery). ``forward`` queues a packet for its next hop in a
bounded per-neighbour queue (full: dropped and counted); the next hop must be a
live member of the view, one that is not is looked up in the DHT within a small
budget (else refused as ``unknown_next_hop``); at most ``max_links`` links, the
least recently used idle one closed to make room (``link_limit`` when none is
idle); dials through the hop's feeds run ``max_dials`` at a time. A link writes
its queue in batches, drops packets older than ``max_hold``, and closes when
idle for ``idle_timeout``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..core.relaycore import RelayCore
from ..core.scores import TokenBucket
from ..crypto import NodeId
from ..errors import LocalError, Reason
from ..net.framing import encode_frame
from ..net.host import NetError, Stream, StreamOpenTimeout
from ..wire import relay as wire
from .relay_metrics import RelayMetrics

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("hydra.relay")

RELAY_PROTOCOL = wire.RELAY_PROTOCOL
#: frames written to a stream at once
BATCH = 64


class _NoRoute(LocalError):
    """A next hop that is neither in the view nor found in the DHT."""


@dataclass(eq=False)
class _Link:
    peer: NodeId
    send: trio.MemorySendChannel
    recv: trio.MemoryReceiveChannel
    failures: int = 0
    resolving: bool = False  # the next hop is not in the view: a DHT lookup first
    busy: bool = False  # opening a stream or writing: not idle
    stream: Stream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def idle(self) -> bool:
        return not self.busy and self.send.statistics().current_buffer_used == 0


class Links:
    """Outbound links of ``RelayService`` (see the module docstring)."""

    node: NodeContext
    core: RelayCore
    metrics: RelayMetrics
    queue_size: int
    max_hold: float
    idle_timeout: float
    connect_timeout: float
    stream_timeout: float
    max_links: int
    lookup_concurrency: int
    lookup_bucket: TokenBucket
    _nursery: trio.Nursery | None

    def _init_links(self, max_dials: int) -> None:
        self._links: dict[NodeId, _Link] = {}
        self._unreachable: dict[NodeId, float] = {}
        self._dials = trio.Semaphore(max_dials)
        self._lookups = 0

    def forward(
        self,
        node_id: NodeId,
        packet: bytes,
        delay_ms: int = 0,
        now: float = 0.0,
        *,
        source: str = "local",
    ) -> None:
        """Queue ``packet`` for ``node_id`` (non-blocking; drops and counts when it cannot).

        The next hop must be a live member of the view; one that is not is
        looked up in the DHT within the lookup budget, else refused
        (``unknown_next_hop``, counted against ``source`` but nobody is
        penalised: the packet's sender chose the hop, not the previous one).
        """
        if self._nursery is None:
            self.metrics.dropped.labels("stopped").inc()
            return
        now = now or self.node.clock()
        if delay_ms > 0:  # the core holds it (if it may), then hands it back to send
            self._apply(self.core.forward(node_id, packet, delay_ms, now, source, self._routable))
            return
        if node_id == self.node.node_id:
            try:
                self._loop_send.send_nowait(packet)
            except trio.WouldBlock:
                self.metrics.dropped.labels("queue_full").inc()
            return
        if not self._routable(node_id):
            self._reject(source, Reason.UNKNOWN_NEXT_HOP, None, penalize=False)
            return
        if self._unreachable.get(node_id, 0) > now:
            self.metrics.dropped.labels("unreachable").inc()
            return
        link = self._links.pop(node_id, None)
        if link is not None:
            self._links[node_id] = link  # most recently used last
        else:
            resolving = not self._known(node_id)
            if resolving and not self._take_lookup(now):
                self._reject(source, Reason.UNKNOWN_NEXT_HOP, None, penalize=False)
                return
            if len(self._links) >= self.max_links and not self._evict_link():
                self._reject(source, Reason.LINK_LIMIT, None, penalize=False)
                self.metrics.dropped.labels(Reason.LINK_LIMIT.value).inc()
                return
            send, recv = trio.open_memory_channel(self.queue_size)
            link = self._links[node_id] = _Link(node_id, send, recv, resolving=resolving)
            if resolving:
                self._lookups += 1
                self.metrics.lookups.set(self._lookups)
                self.metrics.lookups_started.inc()
            self.metrics.links.set(len(self._links))
            self._nursery.start_soon(self._run_link, link)
        try:
            link.send.send_nowait((now, packet))
        except trio.WouldBlock:
            self.metrics.dropped.labels("queue_full").inc()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.metrics.dropped.labels("link_closed").inc()

    def _routable(self, node_id: NodeId) -> bool:
        """May a packet go to ``node_id``: this node, a link, a member, or a lookup slot free."""
        return (
            node_id == self.node.node_id
            or node_id in self._links
            or self._known(node_id)
            or self._lookup_allowed()
        )

    def _known(self, node_id: NodeId) -> bool:
        rec = self.node.view.get(node_id)
        return rec is not None and not rec.is_tombstone

    def _lookup_allowed(self) -> bool:
        return self._lookups < self.lookup_concurrency

    def _take_lookup(self, now: float) -> bool:
        return self._lookup_allowed() and self.lookup_bucket.take(now)

    def _evict_link(self) -> bool:
        """Close the least recently used idle link; False if every link is busy."""
        for peer, link in self._links.items():
            if link.idle():
                del self._links[peer]
                link.scope.cancel()
                self._closed_for("link", Reason.LINK_LIMIT)
                return True
        return False

    async def _open_link(self, link: _Link) -> Stream:
        """A relay stream to ``link.peer``, dialling it through its feeds if needed.

        A next hop missing from the view is looked up in the DHT (the link holds
        one of the few lookup slots meanwhile). Dials run at most
        ``max_dials`` at once. A stream that does not open within
        ``stream_timeout`` on an existing connection means a wedged connection
        (seen with py-libp2p when both sides dialled at once): drop the
        connection and dial afresh, once. The drop is a trim (GO_AWAY 0x1005):
        the peer may only be slow, and must not take it for our crash.
        """
        node = self.node
        peer = link.peer
        pid = peer.peer_id()
        with trio.fail_after(self.connect_timeout * 2 + self.stream_timeout * 2 + 10):
            for fresh in (False, True):
                if pid not in set(node.host.connected_peers()):
                    rec = node.view.get(peer)
                    if (rec is None or rec.is_tombstone) and link.resolving:
                        rec = await node.lookup(peer)
                    self._lookup_done(link)
                    if rec is None or rec.is_tombstone:
                        raise _NoRoute(f"no route to {peer.short()}")
                    async with self._dials:
                        self.metrics.dials.inc()
                        with trio.fail_after(self.connect_timeout):
                            if not await node.connect_record(rec):
                                raise LocalError(f"{peer.short()} unreachable through its feeds")
                self._lookup_done(link)
                try:
                    return await node.host.open_stream(
                        pid, RELAY_PROTOCOL, timeout=self.stream_timeout
                    )
                except StreamOpenTimeout:
                    if fresh:
                        raise
                    log.info("relay stream to %s hung; reconnecting", peer.short())
                    self.metrics.reconnects.inc()
                    await node.host.trim(pid)
        raise LocalError("unreachable")  # pragma: no cover

    def _lookup_done(self, link: _Link) -> None:
        if link.resolving:
            link.resolving = False
            self._lookups -= 1
            self.metrics.lookups.set(self._lookups)

    async def _run_link(self, link: _Link) -> None:
        try:
            with link.scope:
                await self._link_loop(link)
        finally:
            self._lookup_done(link)
            if self._links.get(link.peer) is link:
                del self._links[link.peer]
            link.send.close()
            link.recv.close()
            dropped = 0
            while True:
                try:
                    link.recv.receive_nowait()
                    dropped += 1
                except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                    break
            if dropped:
                self.metrics.dropped.labels("unreachable").inc(dropped)
            self.metrics.links.set(len(self._links))
            if link.stream is not None:
                with trio.move_on_after(1, shield=True):
                    await link.stream.close()
                link.stream = None

    async def _link_loop(self, link: _Link) -> None:
        while True:
            link.busy = False
            with trio.move_on_after(self.idle_timeout) as idle:
                try:
                    first = await link.recv.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
            if idle.cancelled_caught:
                self._closed_for("link", Reason.IDLE_TIMEOUT)
                return
            link.busy = True
            batch = [first]
            size = len(first[1])
            while len(batch) < BATCH and size < 1 << 20:
                try:
                    item = link.recv.receive_nowait()
                except trio.WouldBlock:
                    break
                batch.append(item)
                size += len(item[1])
            now = self.node.clock()
            fresh = [p for t, p in batch if now - t <= self.max_hold]
            if len(fresh) < len(batch):
                self.metrics.dropped.labels("stale").inc(len(batch) - len(fresh))
            if not fresh:
                continue
            data = b"".join(encode_frame(p, wire.MAX_RELAY_FRAME) for p in fresh)
            sent = False
            for _ in range(2):  # a broken stream gets one fresh replacement
                if link.stream is None:
                    try:
                        t0 = trio.current_time()
                        link.stream = await self._open_link(link)
                        log.debug(
                            "relay link to %s open in %.3f s",
                            link.peer.short(),
                            trio.current_time() - t0,
                        )
                    except _NoRoute as e:  # not a member, not in the DHT: give up on it
                        log.debug("relay link to %s: %s", link.peer.short(), e)
                        self.metrics.dropped.labels("no_route").inc(len(fresh))
                        self._unreachable[link.peer] = self.node.clock() + 10.0
                        return
                    except Exception as e:  # noqa: BLE001 - dial/lookup/libp2p errors
                        log.debug("relay link to %s: %r", link.peer.short(), e)
                        break
                try:
                    await link.stream.write(data)
                    sent = True
                    break
                except NetError as e:
                    log.debug("relay write to %s failed: %r", link.peer.short(), e)
                    await link.stream.reset()
                    link.stream = None
            if sent:
                link.failures = 0
                self.metrics.packets_out.inc(len(fresh))
                self.metrics.bytes_out.inc(len(data))
                continue
            self.metrics.dropped.labels("unreachable").inc(len(fresh))
            link.failures += 1
            if link.failures >= 2:
                self._unreachable[link.peer] = self.node.clock() + 2.0
                return
            await trio.sleep(0.2)
