"""Connection limits and bans: inbound bounds per source address and in total,
checked at accept before any cryptography; bans by peer id and by address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IMuxedConn
from libp2p.network.connection.raw_connection import RawConnection

from ..errors import LocalError
from .sockets import _remote_ip

logger = logging.getLogger(__name__)


# Room for outbound connections above the default inbound bound in the default
# total (``ConnectionLimits.max_connections``, which counts both directions).
MAX_OUTBOUND_CONNECTIONS = 512


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds on inbound connections, checked when a connection is accepted.

    ``max_inbound`` counts every inbound connection from accept to close
    (handshaking or established); ``max_inbound_per_ip`` the same per source
    address (IPv6: per /64). ``max_handshakes_per_ip`` bounds connections from
    one address whose Noise/Yamux handshake has not finished: that is what
    half-open or silent connections hold, while established honest
    connections from one address (many nodes on one machine) only meet the
    much larger per-IP cap. A handshake not finished within
    ``handshake_timeout`` seconds is dropped. ``max_connections`` bounds
    connections in both directions together: an inbound one is refused at
    accept, a dial of ours before it starts (and libp2p's own dials by its
    swarm, which shares the bound).
    """

    max_inbound: int = 512
    max_inbound_per_ip: int = 384
    max_handshakes_per_ip: int = 128
    handshake_timeout: float = 5.0
    max_bans: int = 4096
    max_connections: int = 512 + MAX_OUTBOUND_CONNECTIONS

    def __post_init__(self) -> None:
        if not self.max_inbound <= self.max_connections:
            raise LocalError("limits: need max_inbound <= max_connections")
        if not 1 <= self.max_inbound_per_ip <= self.max_inbound:
            raise LocalError("limits: need 1 <= max_inbound_per_ip <= max_inbound")
        if not 1 <= self.max_handshakes_per_ip <= self.max_inbound_per_ip:
            raise LocalError("limits: need 1 <= max_handshakes_per_ip <= max_inbound_per_ip")
        if not self.handshake_timeout > 0:
            raise LocalError("limits: handshake_timeout must be positive")
        if self.max_bans < 1:
            raise LocalError("limits: max_bans must be >= 1")


# Reasons a connection is refused (label values of hydra_connections_refused).
REFUSED_INBOUND_LIMIT = "inbound_limit"
REFUSED_INBOUND_PER_IP = "inbound_per_ip_limit"
REFUSED_HANDSHAKES_PER_IP = "handshake_limit"
REFUSED_HANDSHAKE_TIMEOUT = "handshake_timeout"
REFUSED_BANNED = "banned"
REFUSED_STREAM_LIMIT = "stream_limit"
REFUSED_CONNECTION_LIMIT = "connection_limit"


def _ip_group(ip: str | None) -> str:
    """The unit per-IP limits count in: the IPv4 address, or the IPv6 /64."""
    if not ip:
        return "?"
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


class _InboundGate:
    """Counts inbound connections per source address, from accept to close."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self._per_ip: dict[str, int] = {}
        self._handshaking: dict[str, int] = {}

    def refusal(self, group: str, outbound: int = 0) -> str | None:
        """Why a new connection from ``group`` must be refused now, or None
        (``outbound``: our established outbound connections, for the total)."""
        if self.total >= self.limits.max_inbound:
            return REFUSED_INBOUND_LIMIT
        if self.total + outbound >= self.limits.max_connections:
            return REFUSED_CONNECTION_LIMIT
        if self._per_ip.get(group, 0) >= self.limits.max_inbound_per_ip:
            return REFUSED_INBOUND_PER_IP
        if self._handshaking.get(group, 0) >= self.limits.max_handshakes_per_ip:
            return REFUSED_HANDSHAKES_PER_IP
        return None

    def opened(self, group: str) -> None:
        self.total += 1
        self._per_ip[group] = self._per_ip.get(group, 0) + 1
        self._handshaking[group] = self._handshaking.get(group, 0) + 1

    def handshake_done(self, group: str) -> None:
        _decrement(self._handshaking, group)

    def closed(self, group: str, handshaking: bool) -> None:
        self.total -= 1
        _decrement(self._per_ip, group)
        if handshaking:
            _decrement(self._handshaking, group)

    def handshakes(self, group: str | None = None) -> int:
        if group is None:
            return sum(self._handshaking.values())
        return self._handshaking.get(group, 0)

    def inbound(self, group: str | None = None) -> int:
        return self.total if group is None else self._per_ip.get(group, 0)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 1) - 1
    if left <= 0:
        counts.pop(key, None)
    else:
        counts[key] = left


class _BanList:
    """Peer ids (or address groups) refused until a deadline; bounded in size."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}

    def ban(self, key: str, seconds: float, now: float) -> None:
        until = now + max(0.0, float(seconds))
        if until <= now:
            self._until.pop(key, None)
            return
        self._until[key] = max(until, self._until.get(key, 0.0))
        if len(self._until) > self.max_entries:
            for k in [k for k, t in self._until.items() if t <= now]:
                del self._until[k]
            while len(self._until) > self.max_entries:
                # the ban that ends first goes first
                del self._until[min(self._until, key=self._until.__getitem__)]

    def unban(self, key: str) -> None:
        self._until.pop(key, None)

    def banned(self, key: str, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)


class LimitsPart:
    """Connection bounds and bans of ``Libp2pHost``.

    Inbound connections are bounded (``ConnectionLimits``) per source
    address, in total, and in unfinished handshakes per address; a slot is
    held exactly as long as its connection lives. Connections in both
    directions together stay within ``max_connections``. Banned peer ids are
    never dialed, and their connections (either direction) are closed right
    after the handshake authenticates them.
    """

    _swarm: Any
    _nursery: trio.Nursery | None
    limits: ConnectionLimits
    _gate: _InboundGate
    _bans: _BanList
    _refused_listeners: list[Callable[[str], None]]
    refused: dict[str, int]

    async def _handle_inbound(self, rwc: Any, maddr: multiaddr.Multiaddr) -> None:
        """Accept one inbound connection: bounds first, then the upgrade, then wait for it to end.

        Runs in the listener's task for the connection (the listener closes the
        socket when this returns), so it lives as long as the connection.
        """
        group = _ip_group(_remote_ip(rwc))
        if self._bans.banned("ip:" + group, time.monotonic()):
            reason: str | None = REFUSED_BANNED
        else:
            reason = self._gate.refusal(group, self._outbound_count())
        if reason is not None:
            self._count_refused(reason)
            logger.debug("refusing inbound connection from %s: %s", group, reason)
            with contextlib.suppress(Exception), trio.move_on_after(1.0):
                await rwc.close()
            return
        gate = self._gate
        gate.opened(group)
        handshaking = True
        try:
            if isinstance(rwc, IMuxedConn):  # QUIC: secured and multiplexed already
                gate.handshake_done(group)
                handshaking = False
                peer = str(getattr(rwc, "peer_id", ""))
                if peer and self.is_banned(peer):
                    self._count_refused(REFUSED_BANNED)
                    with contextlib.suppress(Exception), trio.move_on_after(1.0):
                        await rwc.close()
                    return
                await self._swarm.add_conn(rwc, direction="inbound")
                muxed: Any = rwc
            else:
                raw = RawConnection(rwc, False)
                started = trio.current_time()
                try:
                    # the upgrade carries its own deadline (inbound_upgrade_timeout)
                    muxed = await self._swarm.upgrade_inbound_raw_conn(raw, maddr)
                except Exception as e:
                    if trio.current_time() - started >= self.limits.handshake_timeout:
                        self._count_refused(REFUSED_HANDSHAKE_TIMEOUT)
                    logger.debug("inbound connection from %s failed: %r", group, e)
                    with contextlib.suppress(Exception), trio.move_on_after(1.0):
                        await raw.close()
                    return
                gate.handshake_done(group)
                handshaking = False
            await self._wait_closed(muxed)
        finally:
            gate.closed(group, handshaking)

    async def _wait_closed(self, muxed: Any) -> None:
        peer = getattr(muxed, "peer_id", None)
        conn = None
        for c in list(self._swarm.connections.get(peer, [])):
            if getattr(c, "muxed_conn", None) is muxed:
                conn = c
                break
        if conn is None:
            return
        event = conn.event_closed
        while not event.is_set():
            with trio.move_on_after(5.0):
                await event.wait()
            if conn not in self._swarm.connections.get(peer, []):
                return

    def _count_refused(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        for listener in self._refused_listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001 - a metrics hook must not break the swarm
                logger.exception("refusal listener failed")

    def on_refused(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` for every connection or stream refused by a bound or ban.

        Reasons: ``inbound_limit``, ``inbound_per_ip_limit``, ``handshake_limit``,
        ``handshake_timeout``, ``banned``, ``stream_limit``, ``connection_limit``.
        """
        self._refused_listeners.append(listener)

    def connection_counts(self) -> dict[str, int]:
        """Live connections by direction, inbound handshakes in progress, and the
        ``total`` that ``max_connections`` bounds (inbound from accept, outbound)."""
        counts = {"inbound": 0, "outbound": 0, "handshakes": self._gate.handshakes()}
        for conns in list(self._swarm.connections.values()):
            for conn in list(conns):
                name = getattr(getattr(conn, "direction", None), "name", "").lower()
                if name in counts:
                    counts[name] += 1
        counts["total"] = self._gate.inbound() + counts["outbound"]
        return counts

    def _outbound_count(self) -> int:
        n = 0
        for conns in list(self._swarm.connections.values()):
            for conn in conns:
                if getattr(getattr(conn, "direction", None), "name", "") == "OUTBOUND":
                    n += 1
        return n

    def _at_connection_limit(self) -> bool:
        return self._gate.inbound() + self._outbound_count() >= self.limits.max_connections

    def set_limits(self, limits: ConnectionLimits) -> None:
        """New connection bounds (a reload). They apply to connections accepted or
        dialled from now on; connections already open stay. ``handshake_timeout``
        and ``max_bans`` keep their values from the start."""
        limits = dataclasses.replace(
            limits, handshake_timeout=self.limits.handshake_timeout, max_bans=self.limits.max_bans
        )
        self.limits = limits
        self._gate.limits = limits
        cfg = self._swarm.connection_config
        cfg.max_connections = limits.max_connections
        cfg.high_watermark = limits.max_connections

    def ban(self, peer_id: str, seconds: float) -> None:
        """Refuse ``peer_id`` for ``seconds``: no dials to it, and its connections
        (either direction, any transport) are closed right after the handshake.

        Does not close existing connections (``disconnect`` does). The ban list
        holds at most ``limits.max_bans`` entries (the earliest to end go first).
        """
        self._bans.ban(peer_id, seconds, time.monotonic())

    def ban_ip(self, ip: str, seconds: float) -> None:
        """Refuse inbound connections from ``ip`` (IPv6: its /64) for ``seconds``, at accept."""
        self._bans.ban("ip:" + _ip_group(ip), seconds, time.monotonic())

    def unban(self, peer_id: str) -> None:
        self._bans.unban(peer_id)

    def is_banned(self, peer_id: str) -> bool:
        return self._bans.banned(peer_id, time.monotonic())

    def _refuse_if_banned(self, conn: Any) -> bool:
        """Close a new connection of a banned peer (QUIC skips the security hook)."""
        peer = str(conn.muxed_conn.peer_id)
        if not self.is_banned(peer):
            return False
        self._count_refused(REFUSED_BANNED)

        async def _close() -> None:
            with contextlib.suppress(Exception), trio.move_on_after(2.0):
                await conn.close()

        if self._nursery is not None:
            self._nursery.start_soon(_close)
        return True
