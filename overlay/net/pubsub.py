"""GossipSub for Hydra: topics, subscriptions with their own bounded buffers
(drops are counted, never silent), publishing and guarded validators.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub

from ..errors import LocalError
from . import upstream

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """A GossipSub message as Hydra sees it (``origin`` is the signing publisher)."""

    topic: str
    data: bytes
    origin: str
    seqno: int


GossipValidator = Callable[[str, GossipMessage], Awaitable[bool]]
"""``async validator(forwarder_peer_id, message) -> bool``; raising counts as ``False``."""


@dataclass(eq=False)
class _SubSlot:
    send: trio.MemorySendChannel[GossipMessage]
    dropped: int = 0


@dataclass(eq=False)
class Subscription:
    """Messages of one topic, in arrival order; an async iterator and context manager.

    Each subscription has its own bounded buffer; when the consumer falls
    behind, new messages are dropped and counted in ``dropped`` (gossip is
    lossy by design; anti-entropy above repairs).
    """

    topic: str
    _recv: trio.MemoryReceiveChannel[GossipMessage]
    _slot: _SubSlot
    _on_close: Callable[[_SubSlot], None] = field(repr=False)

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    async def receive(self) -> GossipMessage:
        """Next message; raises ``trio.EndOfChannel`` after ``aclose`` or host shutdown."""
        return await self._recv.receive()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> GossipMessage:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Stop receiving. The host stays joined to the topic (keeps relaying)."""
        self._on_close(self._slot)
        await self._recv.aclose()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class GossipPart:
    """GossipSub topics of ``Libp2pHost``."""

    _pubsub: Pubsub
    _gossipsub: GossipSub
    _joined: dict[str, list[_SubSlot]]
    _gossip_max: int
    _gossip_buffer: int

    async def join(self, topic: str) -> None:
        """Join ``topic``: take part in its mesh and relay it (idempotent)."""
        nursery = self._require_running()
        if topic in self._joined:
            return
        self._joined[topic] = []
        upstream = await self._pubsub.subscribe(topic)
        # The pump drains pubsub's own 32-message queue at once (upstream drops
        # silently when it is full) into per-subscriber buffers that count drops.
        nursery.start_soon(self._pump, topic, upstream)

    async def _pump(self, topic: str, upstream: Any) -> None:
        async for msg in upstream:
            slots = self._joined.get(topic)
            if not slots:
                continue
            gm = GossipMessage(
                topic=topic,
                data=bytes(msg.data),
                origin=str(ID(msg.from_id)),
                seqno=int.from_bytes(msg.seqno, "big"),
            )
            for slot in list(slots):
                try:
                    slot.send.send_nowait(gm)
                except trio.WouldBlock:
                    slot.dropped += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def subscribe(self, topic: str) -> Subscription:
        """Join ``topic`` if needed and return a new ``Subscription`` to it."""
        await self.join(topic)
        send, recv = trio.open_memory_channel[GossipMessage](self._gossip_buffer)
        slot = _SubSlot(send)
        self._joined[topic].append(slot)

        def _remove(s: _SubSlot) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._joined[topic].remove(s)
            s.send.close()

        return Subscription(topic, recv, slot, _remove)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` (signed by our key) to ``topic``.

        Local subscribers receive it too. If a validator is set for the topic it
        also runs on our own message, and a rejected message is dropped silently
        (upstream behaviour).
        """
        self._require_running()
        if len(data) > self._gossip_max:
            raise LocalError(f"gossip message of {len(data)} bytes exceeds {self._gossip_max}")
        await self._pubsub.publish(topic, bytes(data))

    def set_topic_validator(self, topic: str, validator: GossipValidator) -> None:
        """Validate every message of ``topic`` before it is delivered or relayed.

        ``await validator(forwarder_peer_id, message)`` returns True to accept.
        """

        # WORKAROUND (validators): a synchronous topic validator that raises
        # propagates out of Pubsub.push_msg and crashes the whole trio.run.
        # Always register an async validator that turns exceptions into False.
        # test_rejecting_and_raising_validators.
        async def _guarded(forwarder: ID, msg: Any) -> bool:
            try:
                gm = GossipMessage(
                    topic=topic,
                    data=bytes(msg.data),
                    origin=str(ID(msg.from_id)),
                    seqno=int.from_bytes(msg.seqno, "big"),
                )
                return bool(await validator(str(forwarder), gm))
            except Exception:
                logger.exception("gossip validator for %s raised; rejecting", topic)
                return False

        self._pubsub.set_topic_validator(topic, _guarded, is_async_validator=True)

    def remove_topic_validator(self, topic: str) -> None:
        self._pubsub.remove_topic_validator(topic)

    def _reopen_gossip_stream(self, conn: Any) -> None:
        """A connection closed: drop pubsub's stream if it ran over it (see upstream.py)."""
        upstream.reopen_gossip_stream(self._pubsub, conn)

    def gossip_mesh_peers(self, topic: str) -> list[str]:
        """Peers in our GossipSub mesh for ``topic`` (diagnostics)."""
        return [str(p) for p in self._gossipsub.mesh.get(topic, ())]
