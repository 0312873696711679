"""Sockets under libp2p connections: finding the OS socket of a connection,
TCP keepalive and user-timeout tuning, kernel traffic counters, and the
per-connection view (``ConnInfo``) that feed accounting reads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID

logger = logging.getLogger(__name__)


# TCP liveness for every TCP/WebSocket connection (see _tune_tcp_socket):
# keepalive probes after 5 s idle, every 2 s, 3 lost probes = dead; and any data
# left unacknowledged for 12 s aborts the connection.
TCP_KEEPIDLE_S = 5
TCP_KEEPINTVL_S = 2
TCP_KEEPCNT = 3
TCP_USER_TIMEOUT_MS = 12_000


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """One live connection, for feed accounting.

    ``local`` is the socket's local ``(ip, port)`` (``None`` for relayed
    connections); ``bytes_in``/``bytes_out`` are the kernel's TCP counters
    (``tcpi_bytes_received``/``tcpi_bytes_acked``) for TCP and WebSocket
    connections on Linux and ``None`` where no per-connection count exists
    (QUIC shares one UDP socket per listener; relayed connections are streams).
    ``key`` identifies the connection object while it lives.
    """

    key: int
    peer_id: str
    transport: str  # "tcp" | "ws" | "quic" | "relay" | "unknown"
    direction: str  # "inbound" | "outbound" | "unknown"
    local: tuple[str, int] | None
    remote: str
    relay_peer_id: str | None
    bytes_in: int | None
    bytes_out: int | None


_SOCKET_PATH = (
    "muxed_conn",
    "secured_conn",
    "conn",
    "stream",
    "_stream",
    "_ws",
    "_wrapped",
    "socket",
    "_socket",
)


def _is_relayed(conn: Any) -> bool:
    with contextlib.suppress(Exception):
        kind = conn.get_connection_type()
        if kind in (ConnectionType.RELAYED, ConnectionType.DIRECT):
            return kind == ConnectionType.RELAYED  # known: no address strings to build
    with contextlib.suppress(Exception):
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    return False


def _conn_socket(conn: Any) -> tuple[Any, str] | None:
    """The OS socket under a direct connection and its transport kind, else None.

    Walks upstream's wrapper chain (SwarmConn -> muxer -> secure session ->
    raw connection -> trio stream -> socket) through a fixed set of attribute
    names; relayed connections are skipped (their "socket" is the relay's).
    """
    if _is_relayed(conn):
        return None
    kind = "quic" if type(getattr(conn, "muxed_conn", None)).__name__ == "QUICConnection" else "tcp"
    frontier: list[Any] = [conn]
    seen: set[int] = set()
    for _ in range(10):
        nxt: list[Any] = []
        for obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, socket.socket | trio.socket.SocketType):
                return obj, kind
            for name in _SOCKET_PATH:
                child = getattr(obj, "__dict__", {}).get(name)
                if child is None:
                    continue
                if name == "_ws":
                    kind = "ws"
                nxt.append(child)
        if not nxt:
            return None
        frontier = nxt
    return None


def _tcp_counters(sock: Any) -> tuple[int, int] | None:
    """``(bytes_received, bytes_acked)`` from Linux ``TCP_INFO``, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    # struct tcp_info: 8 x u8, 24 x u32, then u64 pacing_rate, max_pacing_rate,
    # bytes_acked (offset 120), bytes_received (offset 128) since Linux 4.1.
    if len(info) < 136:
        return None
    acked, received = struct.unpack_from("=QQ", info, 120)
    return received, acked


def _tune_tcp_socket(sock: Any) -> bool:
    """Enable keepalive and a user timeout so a dead path closes the connection."""
    try:
        if sock.type != socket.SOCK_STREAM:
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPIDLE_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPINTVL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPCNT)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
        return True
    except (OSError, AttributeError):
        return False


def _addr_ip(addr: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        with contextlib.suppress(Exception):
            value = addr.value_for_protocol(proto)
            if value:
                return str(ipaddress.ip_address(value))
    return None


def _remote_ip(rwc: Any) -> str | None:
    """The source IP of an accepted connection (TCP stream, WebSocket, QUIC)."""
    with contextlib.suppress(Exception):
        remote = rwc.get_remote_address()
        if remote:
            return str(remote[0])
    # WebSocket connections report no address upstream: ask the socket.
    found = _conn_socket(rwc)
    if found is not None:
        with contextlib.suppress(OSError, IndexError):
            return str(found[0].getpeername()[0])
    return None


class ConnectionsPart:
    """Per-connection view and socket tuning of ``Libp2pHost``."""

    _swarm: Any

    def connections(self, peer_id: str | None = None) -> list[ConnInfo]:
        """Every live connection (or only those to ``peer_id``) with its transport,
        local socket address and traffic."""
        if peer_id is not None:
            return [self._conn_info(peer_id, c) for c in self._conns_to(peer_id)]
        out: list[ConnInfo] = []
        for pid, conns in list(self._swarm.connections.items()):
            for conn in list(conns):
                out.append(self._conn_info(str(pid), conn))
        return out

    def is_connected(self, peer_id: str) -> bool:
        """A live connection to ``peer_id`` is open (in a disconnect listener: one
        other than the connection that closed)."""
        return bool(self._conns_to(peer_id))

    def connection_keys(self, peer_id: str) -> set[int]:
        """The keys (``ConnInfo.key``) of our live connections to ``peer_id``."""
        return {id(c) for c in self._conns_to(peer_id)}

    def _conns_to(self, peer_id: str) -> list[Any]:
        """The swarm's live connections to ``peer_id`` (none for an invalid id)."""
        try:
            pid = ID.from_base58(peer_id)
        except ValueError:
            return []
        return list(self._swarm.connections.get(pid, []))

    def connection_addrs(self, peer_id: str) -> list[str]:
        """Remote multiaddrs of our connections to ``peer_id`` (circuit addresses for relayed ones)."""
        return [c.remote for c in self.connections(peer_id) if c.remote]

    def _conn_info(self, peer: str, conn: Any) -> ConnInfo:
        addrs: list[str] = []
        with contextlib.suppress(Exception):
            addrs = [str(a) for a in conn.get_transport_addresses()]
        direction = getattr(getattr(conn, "direction", None), "name", "unknown").lower()
        if _is_relayed(conn):
            relay_peer = None
            for a in addrs:
                head = a.partition("/p2p-circuit")[0]
                if "/p2p/" in head:
                    relay_peer = head.rpartition("/p2p/")[2]
                    break
            return ConnInfo(
                id(conn), peer, "relay", direction, None, addrs[0] if addrs else "",
                relay_peer, None, None,
            )  # fmt: skip
        local: tuple[str, int] | None = None
        bytes_in = bytes_out = None
        transport = "unknown"
        remote = addrs[0] if addrs else ""
        found = _conn_socket(conn)
        if found is not None:
            sock, transport = found
            with contextlib.suppress(OSError):
                name = sock.getsockname()
                local = (str(name[0]), int(name[1]))
            if transport != "quic":
                counters = _tcp_counters(sock)
                if counters is not None:
                    bytes_in, bytes_out = counters
                if not remote:
                    # WebSocket connections report no transport address upstream.
                    with contextlib.suppress(OSError):
                        ip, port = sock.getpeername()[:2]
                        proto = "ip6" if ":" in ip else "ip4"
                        suffix = "/ws" if transport == "ws" else ""
                        remote = f"/{proto}/{ip}/tcp/{port}{suffix}"
        return ConnInfo(
            id(conn), peer, transport, direction, local, remote, None, bytes_in, bytes_out
        )

    def _tune_connection(self, conn: Any) -> None:
        # WORKAROUND (dead connections): upstream sets neither TCP keepalive nor
        # a user timeout, and Yamux only measures RTT (a missing pong closes
        # nothing), so a connection whose path was cut stays "open" until the
        # kernel gives up retransmitting (~15 min) and new streams on it hang.
        # Every TCP/WebSocket socket gets keepalive + TCP_USER_TIMEOUT, so a dead
        # feed's connections close within ~12 s and traffic moves to the others.
        # test_tcp_connections_get_keepalive / test_upstream_tcp_has_no_keepalive.
        found = _conn_socket(conn)
        if found is not None and found[1] in ("tcp", "ws"):
            _tune_tcp_socket(found[0])

    async def close_connections_from(self, local_ip: str) -> int:
        """Close every direct connection whose local socket address is ``local_ip``.

        For a feed that just went down: its connections cannot carry traffic
        any more, and closing them at once (instead of waiting for timeouts)
        moves streams to the remaining connections and lets peers redial.
        Returns how many were closed.
        """
        victims = []
        for conns in list(self._swarm.connections.values()):
            for conn in list(conns):
                found = _conn_socket(conn)
                if found is None:
                    continue
                with contextlib.suppress(OSError):
                    if str(found[0].getsockname()[0]) == local_ip:
                        victims.append(conn)

        async def _close(conn: Any) -> None:
            with contextlib.suppress(Exception), trio.move_on_after(2.0):
                await conn.close()

        if victims:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    for conn in victims:
                        nursery.start_soon(_close, conn)
        return len(victims)
