"""Streams: ``Stream`` (one libp2p stream, bytes in and out), per-peer stream
slots, and the host's custom protocol handlers and outbound stream opens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from ..errors import LocalError
from .errors import (
    _LIBP2P_IO_ERRORS,
    NetError,
    StreamBroken,
    StreamLimitReached,
    StreamOpenError,
    StreamOpenTimeout,
)
from .limits import REFUSED_STREAM_LIMIT

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


async def one_request(
    host: Any,
    peer: ID,
    protocol: TProtocol,
    talk: Callable[[INetStream], Awaitable[_T]],
    deadline: float,
    what: str,
    error: type[NetError] = NetError,
    open_error: type[NetError] | None = None,
) -> _T:
    """Open a raw libp2p stream to ``peer``, ``talk`` on it and close it, all
    within ``deadline`` seconds (for a libp2p protocol spoken once: AutoNAT's
    dial-back, a relay v2 reservation). Every failure is an ``error`` naming
    ``what`` and the peer (``open_error``, if given, when no stream opens);
    the stream is closed whatever happens.
    """
    with trio.move_on_after(deadline):
        try:
            raw = await host.new_stream(peer, [protocol])
        except Exception as e:
            raise (open_error or error)(f"no {what} stream to {peer}: {e!r}") from e
        try:
            return await talk(raw)
        except Exception as e:
            raise error(f"{what} with {peer} failed: {e!r}") from e
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                with contextlib.suppress(Exception):
                    await raw.close()
    raise error(f"{what} with {peer} timed out after {deadline:g} s")


# Upstream's Yamux refuses (by blocking forever) a 257th concurrent outbound
# stream on one connection; our bound must stay below this.
YAMUX_STREAM_BACKLOG = 256


class Stream:
    """One libp2p stream to ``remote_peer_id`` speaking ``protocol``.

    ``read`` returns ``b""`` at end of stream; I/O failures raise
    ``StreamBroken``. Use as ``async with``: leaving it closes the stream
    (resets it if the block raised), which also frees the peer's stream slot.
    """

    __slots__ = ("_raw", "remote_peer_id", "protocol", "_release", "_done")

    def __init__(
        self,
        raw: INetStream,
        remote_peer_id: str,
        protocol: str,
        release: Callable[[], None],
    ) -> None:
        self._raw = raw
        self.remote_peer_id = remote_peer_id
        self.protocol = protocol
        self._release = release
        self._done = False

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return 1..max_bytes bytes, or ``b""`` once the remote has closed its side."""
        try:
            return await self._raw.read(max_bytes)
        except StreamEOF:
            return b""
        except _LIBP2P_IO_ERRORS as e:
            raise StreamBroken(f"read from {self.remote_peer_id} failed: {e!r}") from e

    async def write(self, data: bytes) -> None:
        try:
            await self._raw.write(data)
        except _LIBP2P_IO_ERRORS as e:
            raise StreamBroken(f"write to {self.remote_peer_id} failed: {e!r}") from e

    async def close_write(self) -> None:
        """Half-close: the remote reads EOF, we can still read its answer."""
        try:
            await self._raw.close_write()
        except _LIBP2P_IO_ERRORS as e:
            raise StreamBroken(f"close_write to {self.remote_peer_id} failed: {e!r}") from e

    async def close(self) -> None:
        """Close both directions and free the stream slot. Idempotent, never raises I/O errors."""
        if self._done:
            return
        self._done = True
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await self._raw.close()
        except _LIBP2P_IO_ERRORS:
            pass
        finally:
            self._release()

    async def reset(self) -> None:
        """Abort the stream (the remote sees a reset) and free the slot. Idempotent."""
        if self._done:
            return
        self._done = True
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                await self._raw.reset()
        except _LIBP2P_IO_ERRORS:
            pass
        finally:
            self._release()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.reset()

    @property
    def connection_closed(self) -> bool:
        """The connection under this stream has closed (the stream went with it)."""
        conn = getattr(self._raw, "muxed_conn", None)
        return bool(getattr(conn, "is_closed", False))

    def __repr__(self) -> str:
        return f"Stream({self.protocol!r} with {self.remote_peer_id[-8:]})"


StreamHandler = Callable[[Stream, str], Awaitable[None]]
"""``async handler(stream, remote_peer_id)``; the stream is closed when it returns."""


class _PeerSlots:
    """Per-peer stream slots: bounded outbound (waitable) and inbound (refuse when full).

    Inbound streams are bounded twice: ``limit`` per peer over all protocols
    served through this class, and a per-protocol bound per peer (so one
    identity cannot hold every slot of one service with idle streams).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._outbound: dict[str, trio.Semaphore] = {}
        self._inbound: dict[str, int] = {}
        self._per_protocol: dict[tuple[str, str], int] = {}

    def outbound(self, peer: str) -> trio.Semaphore:
        sem = self._outbound.get(peer)
        if sem is None:
            sem = self._outbound[peer] = trio.Semaphore(self.limit)
        return sem

    def release_outbound(self, peer: str) -> None:
        sem = self._outbound[peer]
        sem.release()
        if sem.value == self.limit and sem.statistics().tasks_waiting == 0:
            del self._outbound[peer]

    def try_inbound(self, peer: str, protocol: str = "", protocol_limit: int | None = None) -> bool:
        used = self._inbound.get(peer, 0)
        if used >= self.limit:
            return False
        key = (peer, protocol)
        in_protocol = self._per_protocol.get(key, 0)
        if protocol_limit is not None and in_protocol >= protocol_limit:
            return False
        self._inbound[peer] = used + 1
        self._per_protocol[key] = in_protocol + 1
        return True

    def release_inbound(self, peer: str, protocol: str = "") -> None:
        used = self._inbound.get(peer, 1) - 1
        if used <= 0:
            self._inbound.pop(peer, None)
        else:
            self._inbound[peer] = used
        key = (peer, protocol)
        in_protocol = self._per_protocol.get(key, 1) - 1
        if in_protocol <= 0:
            self._per_protocol.pop(key, None)
        else:
            self._per_protocol[key] = in_protocol

    def inbound_in_use(self, peer: str, protocol: str | None = None) -> int:
        if protocol is None:
            return self._inbound.get(peer, 0)
        return self._per_protocol.get((peer, protocol), 0)


class StreamsPart:
    """Custom stream protocols of ``Libp2pHost``: serving and opening streams.

    At most ``max_streams_per_conn`` of our outbound streams, and as many
    inbound ones, are open per peer at a time; inbound ones also at most
    ``max_streams_per_protocol`` per peer and protocol.
    """

    _host: Any
    _slots: _PeerSlots
    _max_streams_per_protocol: int
    _stream_timeout: float

    def set_stream_handler(
        self,
        protocol_id: str,
        handler: StreamHandler,
        *,
        max_per_peer: int | None = None,
    ) -> None:
        """Serve ``protocol_id``: ``await handler(stream, remote_peer_id)`` per inbound stream.

        The stream is closed when the handler returns and reset if it raises
        (the exception is logged, never propagated into libp2p). A peer may
        hold at most ``max_per_peer`` concurrent streams of this protocol
        (default ``max_streams_per_protocol``) and ``max_streams_per_conn``
        over all protocols served here; streams beyond either bound are reset
        before the handler runs (counted as ``stream_limit`` refusals).
        """
        slots = self._slots
        limit = self._max_streams_per_protocol if max_per_peer is None else int(max_per_peer)
        if not 1 <= limit <= slots.limit:
            raise LocalError(f"max_per_peer must be in 1..{slots.limit}")

        async def _serve(raw: INetStream) -> None:
            peer = str(raw.muxed_conn.peer_id)
            if not slots.try_inbound(peer, protocol_id, limit):
                logger.debug("inbound %s stream limit for %s reached; resetting", protocol_id, peer)
                self._count_refused(REFUSED_STREAM_LIMIT)
                with contextlib.suppress(*_LIBP2P_IO_ERRORS):
                    await raw.reset()
                return
            stream = Stream(
                raw, peer, protocol_id, lambda: slots.release_inbound(peer, protocol_id)
            )
            try:
                await handler(stream, peer)
            except Exception:
                logger.exception("handler for %s from %s raised", protocol_id, peer)
                await stream.reset()
            finally:
                await stream.close()

        self._host.set_stream_handler(TProtocol(protocol_id), _serve)

    def remove_stream_handler(self, protocol_id: str) -> None:
        self._host.remove_stream_handler(TProtocol(protocol_id))

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, timeout: float | None = None
    ) -> Stream:
        """Open a stream to ``peer_id`` speaking ``protocol_id``.

        Dials the peer from known addresses if not connected. Waits for one of
        the peer's ``max_streams_per_conn`` slots; raises ``StreamLimitReached``
        if none frees up in time, ``StreamOpenTimeout`` if opening and
        negotiating take too long, ``StreamOpenError`` otherwise.
        """
        self._require_running()
        deadline = self._stream_timeout if timeout is None else timeout
        try:
            pid = ID.from_base58(peer_id)
        except Exception as e:
            raise LocalError(f"invalid peer id {peer_id!r}") from e
        # WORKAROUND (stream bound): Yamux blocks forever in open_stream() once
        # 256 streams are open on a connection. Our own per-peer slots
        # (<= 128) make the 257th attempt fail after the deadline instead.
        # test_many_concurrent_streams_do_not_hang /
        # test_upstream_yamux_257th_stream_blocks.
        sem = self._slots.outbound(peer_id)
        have_slot = False
        with trio.move_on_after(deadline):
            await sem.acquire()
            have_slot = True
            try:
                raw = await self._host.new_stream(pid, [TProtocol(protocol_id)])
            except BaseException as e:
                self._slots.release_outbound(peer_id)
                if isinstance(e, _LIBP2P_IO_ERRORS):
                    raise StreamOpenError(f"open {protocol_id} to {peer_id} failed: {e!r}") from e
                raise
            return Stream(raw, peer_id, protocol_id, lambda: self._slots.release_outbound(peer_id))
        if not have_slot:
            raise StreamLimitReached(
                f"{self._slots.limit} streams to {peer_id} busy for {deadline:g} s"
            )
        raise StreamOpenTimeout(f"open {protocol_id} to {peer_id} timed out after {deadline:g} s")
