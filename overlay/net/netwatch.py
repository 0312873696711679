"""Wake-ups when the machine's addresses or links change (Linux rtnetlink).

The feed monitor used to read every interface once a second to notice a lost
address. The kernel announces every such change on a route netlink socket
(``RTMGRP_LINK``, ``RTMGRP_IPV4_IFADDR``, ``RTMGRP_IPV6_IFADDR``), so a node
can sleep until one happens. The messages themselves are not parsed: a wake-up
only says "read the addresses again" (the reading stays in
``overlay.services.feeds``), so nothing in them is trusted. Only the kernel
writes to this socket (in the node's own network namespace).

``AddressEvents.open()`` returns None where rtnetlink is unavailable (not
Linux, or refused); the caller then polls as before.
"""

from __future__ import annotations

import contextlib
import socket

import trio

__all__ = ["AddressEvents"]

_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100
_GROUPS = _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR

MAX_DRAIN = 64
"""Messages read per wake-up at most; the rest wake the next wait at once."""


class AddressEvents:
    """A route netlink socket subscribed to link and address changes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def open(cls) -> AddressEvents | None:
        """Subscribe, or None where the platform or the sandbox does not allow it."""
        family = getattr(socket, "AF_NETLINK", None)
        if family is None:
            return None
        try:
            sock = socket.socket(family, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        except OSError:
            return None
        try:
            sock.setblocking(False)
            sock.bind((0, _GROUPS))
        except OSError:
            sock.close()
            return None
        return cls(sock)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if a change was announced (all
        pending announcements are consumed, up to ``MAX_DRAIN``)."""
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self._sock)
            self._drain()
            return True
        return False

    def _drain(self) -> None:
        for _ in range(MAX_DRAIN):
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                # ENOBUFS: the kernel dropped announcements (too many at once);
                # the caller reads the addresses anyway
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
