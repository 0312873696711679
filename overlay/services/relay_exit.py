"""The relay's exit side: forward messages that end here, and their acks.

Part of ``services.relay.RelayService`` (a mixin). A ``DeliverExit`` from the
relay core is queued on a bounded intake (full: dropped, ``exit_intake_full``);
``_exit_loop`` decodes each ``ExitMessage`` and hands it to the
``DeliveryWorker`` (persisted, de-duplicating queue in ``HOME/exit-queue.db``,
run with ``ack_when="delivered"``); the "queued" ack goes back through the
message's queued SURB at once and the final ack (delivered / rejected) through
its final SURB; a node that is not currently an exit answers ``rejected:
not_exit`` instead. Undecodable messages are counted, never penalised (the
hop cannot tell who made them).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..errors import DecodeError, LocalError, OverlayError
from ..exits import DeliveryEvent, DeliveryQueue, DeliveryWorker, RetryPolicy, build_dispatcher
from ..onion.params import LARGE, SMALL
from ..onion.surb import use_surb
from ..records import EXIT_ROLES, Role
from ..wire import delivery
from ..wire import relay as wire
from ..wire.delivery import Ack, AckStatus
from .notices import DeliveryNotices
from .relay_metrics import RelayMetrics

if TYPE_CHECKING:
    from .context import NodeContext

log = logging.getLogger("hydra.relay")


class ExitSide:
    """The exit duties of ``RelayService`` (see the module docstring)."""

    node: NodeContext
    metrics: RelayMetrics
    notices: DeliveryNotices | None
    exit_retry: RetryPolicy | None
    exit_concurrency: int
    smtp_relay: str | None
    maildir_root: str | None
    fault_drop_acks: bool

    def _init_exit(self, intake: int) -> None:
        self.worker: DeliveryWorker | None = None
        self.exit_queue: DeliveryQueue | None = None
        self._exit_send, self._exit_recv = trio.open_memory_channel(intake)

    def _on_exit_event(self, ev: DeliveryEvent) -> None:
        if ev.kind == "delivered":
            self.notices.delivered(ev.message_id)

    @property
    def exit_capable(self) -> bool:
        cfg = self.node.config
        return bool(cfg.role_flags & EXIT_ROLES) and bool(cfg.exit_policy)

    def _open_exit(self) -> None:
        """The exit queue and its worker, if this node may be an exit."""
        if not self.exit_capable:
            return
        node, cfg = self.node, self.node.config
        self.exit_queue = DeliveryQueue(
            node.home.path / "exit-queue.db", retry=self.exit_retry, rng=node.rng
        )
        self.worker = DeliveryWorker(
            self.exit_queue,
            build_dispatcher(
                cfg.exit_policy,
                config=cfg,
                smtp_relay=cfg.smtp_relay if self.smtp_relay is None else self.smtp_relay,
                maildir_root=cfg.maildir_root if self.maildir_root is None else self.maildir_root,
            ),
            concurrency=self.exit_concurrency,
            send_ack=self._worker_ack,
            on_event=self._on_exit_event,
            ack_when="delivered",
            clock=node.clock,
            check_delivered=self.notices.ask,
            gate=node.caps.delivery_slot,  # [limits] exit_deliveries_per_minute
        )

    def _to_exit(self, payload: bytes) -> None:
        try:
            self._exit_send.send_nowait(payload)
        except trio.WouldBlock:
            self.metrics.dropped.labels("exit_intake_full").inc()

    async def _exit_loop(self) -> None:
        async for payload in self._exit_recv:
            try:
                await self._exit_deliver(payload)
            except Exception:  # noqa: BLE001 - one bad message must not stop the exit
                log.exception("exit: handling a delivered message failed")

    async def _exit_deliver(self, payload: bytes) -> None:
        try:
            msg = delivery.decode(payload)
        except DecodeError as e:
            self._reject("exit", f"bad_message_{e.reason.value}", None, penalize=False)
            return
        blocks = None
        if msg.reply_block:
            try:
                blocks = wire.decode_reply_blocks(msg.reply_block)
            except DecodeError:
                self._reject("exit", "bad_reply_block", None, penalize=False)
        if self.worker is None or Role.EXIT not in self.node.roles:
            self._reject("exit", "not_exit", None, penalize=False)
            if blocks is not None:
                await self._send_ack(
                    blocks.final, Ack.make(msg.message_id, AckStatus.REJECTED, "not_exit")
                )
            return
        try:
            ack = await self.worker.submit(msg)
        except LocalError as e:  # queue unavailable: no ack, the sender resends
            log.error("exit: cannot accept a message (%s); check HOME and disk space", e)
            return
        if ack.status is AckStatus.QUEUED and blocks is not None and blocks.queued:
            await self._send_ack(blocks.queued, ack)

    async def _worker_ack(self, reply_block: bytes, ack: Ack) -> None:
        try:
            blocks = wire.decode_reply_blocks(reply_block)
        except DecodeError:
            return
        await self._send_ack(blocks.final, ack)

    async def _send_ack(self, surb: bytes, ack: Ack) -> None:
        if self.fault_drop_acks:
            return
        params = LARGE if surb[:1] == bytes([LARGE.format]) else SMALL
        try:
            first, packet = use_surb(params, surb, ack.encode())
        except OverlayError as e:
            log.info("exit: unusable reply block: %s", e)
            return
        self.metrics.acks.labels(ack.status.name.lower()).inc()
        self.forward(first, packet)
