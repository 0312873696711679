"""One-way frames to peers, each peer's written in order on one long-lived stream.

``FrameSender.send(peer, frame)`` never waits: the frame goes into that peer's
bounded queue (or is dropped, with the reason returned), and one task per peer
opens the stream once and writes what its queue holds. A slow open or a slow
write never resets a working stream and never spawns a task per frame, so a
starved process does not turn lateness into stream churn (every reset stream
is one more stream to negotiate on both sides). What cannot go out in time is
dropped, as a lossy link drops it:

- ``full``: the peer's queue holds ``queue_size`` frames, or ``max_links``
  peers have a task already and each has frames queued (otherwise the least
  recently used link ends to make room);
- ``stale``: the frame waited longer than ``max_age`` in the queue;
- ``backoff``: opening a stream to the peer failed less than ``retry_after``
  ago (a dead peer costs one failed open per ``retry_after``, not one per frame);
  an ``urgent`` frame (a probe's ping, whose loss would read as the peer's
  silence) tries to open one anyway;
- ``timeout`` / ``error``: the open or the write failed (the stream is
  dropped; the next frame opens a new one, after ``retry_after`` if the open failed).

A peer's task ends after ``idle`` seconds without a frame, closing its stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger("hydra.frames")

Opener = Callable[[Any], Awaitable[Any]]  # peer -> stream with write/reset/close


@dataclass(slots=True)
class _Link:
    send: trio.MemorySendChannel
    stream: Any = None
    drop_stream: bool = False  # the connection went: reopen before the next write


class FrameSender:
    def __init__(
        self,
        open_stream: Opener,
        *,
        clock: Callable[[], float] = trio.current_time,
        on_drop: Callable[[str], None] = lambda why: None,
        on_sent: Callable[[], None] = lambda: None,
        queue_size: int = 8,
        max_links: int = 256,
        max_age: float = 2.0,
        open_timeout: float = 5.0,
        write_timeout: float = 5.0,
        retry_after: float = 2.0,
        idle: float = 30.0,
        stream_gone: Callable[[Any], bool] = lambda stream: True,
    ) -> None:
        self._open = open_stream
        self._clock = clock
        self._on_drop = on_drop
        self._on_sent = on_sent
        self.queue_size = queue_size
        self.max_links = max_links
        self.max_age = max_age
        self.open_timeout = open_timeout
        self.write_timeout = write_timeout
        self.retry_after = retry_after
        self.idle = idle
        self._stream_gone = stream_gone
        self._links: dict[Hashable, _Link] = {}
        self._retry_at: dict[Hashable, float] = {}  # peers whose last open failed
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery | None) -> None:
        """Run the per-peer tasks in ``nursery`` (``None``: stopped, frames are dropped)."""
        self._nursery = nursery

    @property
    def links(self) -> int:
        return len(self._links)

    def send(self, peer: Hashable, frame: bytes, *, urgent: bool = False) -> str | None:
        """Queue ``frame`` for ``peer``; None if queued, else why it was dropped.
        ``urgent`` (a probe's ping): not dropped for a back-off, it opens a stream."""
        now = self._clock()
        if not urgent and self._backing_off(peer, now):
            return self._drop("backoff")
        link = self._links.pop(peer, None)
        if link is not None:
            self._links[peer] = link  # the most recently used last
        else:
            if self._nursery is None or not self._room_for_one():
                return self._drop("full")
            send, recv = trio.open_memory_channel(self.queue_size)
            link = self._links[peer] = _Link(send)
            try:
                self._nursery.start_soon(self._run, peer, link, recv)
            except RuntimeError:  # nursery closing
                del self._links[peer]
                return self._drop("full")
        try:
            link.send.send_nowait((frame, now, urgent))
        except trio.WouldBlock:
            return self._drop("full")
        return None

    def _room_for_one(self) -> bool:
        """Below ``max_links``, or made so by ending the least recently used link
        with nothing queued (its task writes what it holds, then closes its stream)."""
        if len(self._links) < self.max_links:
            return True
        for peer, link in self._links.items():
            if link.send.statistics().current_buffer_used == 0:
                del self._links[peer]
                link.send.close()
                return True
        return False

    def connection_closed(self, peer: Hashable) -> None:
        """A connection to the peer went: before the next write, its stream is
        dropped if it ran over that connection (``stream_gone``; by default always)."""
        link = self._links.get(peer)
        if link is not None:
            link.drop_stream = True

    def _backing_off(self, peer: Hashable, now: float) -> bool:
        return self._retry_at.get(peer, -float("inf")) > now

    def _drop(self, why: str) -> str:
        self._on_drop(why)
        return why

    async def _run(self, peer: Hashable, link: _Link, recv: trio.MemoryReceiveChannel) -> None:
        try:
            while True:
                item = None
                with trio.move_on_after(self.idle):
                    try:
                        item = await recv.receive()
                    except trio.EndOfChannel:
                        return  # ended to make room for another peer
                if item is None:
                    return  # idle; no checkpoint since the timeout, so nothing is queued
                frame, queued_at, urgent = item
                if link.drop_stream:
                    link.drop_stream = False
                    if link.stream is not None and self._stream_gone(link.stream):
                        await self._discard(link)
                if self._clock() - queued_at > self.max_age:
                    self._drop("stale")
                else:
                    await self._write(peer, link, frame, urgent)
        finally:
            if self._links.get(peer) is link:
                del self._links[peer]
            with trio.CancelScope(shield=True):
                await self._discard(link, close=True)

    async def _write(self, peer: Hashable, link: _Link, frame: bytes, urgent: bool) -> None:
        if link.stream is None:
            if not urgent and self._backing_off(peer, self._clock()):
                self._drop("backoff")  # queued before the open failed
                return
            with trio.move_on_after(self.open_timeout) as scope:
                try:
                    link.stream = await self._open(peer)
                except Exception as e:  # noqa: BLE001 - an unreachable peer is data for the caller
                    log.debug("no stream to %s: %r", peer, e)
            if link.stream is None:
                self._back_off(peer)
                self._drop("timeout" if scope.cancelled_caught else "error")
                return
            self._retry_at.pop(peer, None)
        with trio.move_on_after(self.write_timeout) as scope:
            try:
                await link.stream.write(frame)
                self._on_sent()
                return
            except Exception as e:  # noqa: BLE001 - a broken stream: open another
                log.debug("frame to %s not written: %r", peer, e)
        # failed or cut short mid-write: the stream's framing is unknown, drop it
        self._drop("timeout" if scope.cancelled_caught else "error")
        await self._discard(link)

    @staticmethod
    async def _discard(link: _Link, *, close: bool = False) -> None:
        stream, link.stream = link.stream, None
        if stream is None:
            return
        with trio.move_on_after(0.5), contextlib.suppress(Exception):
            await (stream.close() if close else stream.reset())

    def _back_off(self, peer: Hashable) -> None:
        """No open to ``peer`` for ``retry_after``; the table holds at most
        ``4 * max_links`` peers (past back-offs go first, then all of them)."""
        now = self._clock()
        self._retry_at[peer] = now + self.retry_after
        if len(self._retry_at) > 4 * self.max_links:
            for p in [p for p, t in self._retry_at.items() if t <= now]:
                del self._retry_at[p]
            if len(self._retry_at) > 4 * self.max_links:
                self._retry_at.clear()
