"""Check that listen addresses can be bound before a node starts.

py-libp2p binds TCP and QUIC listeners with ``SO_REUSEPORT``, so on Linux a
second process of the same user binds a port another node already listens
on without any error, and the kernel then splits incoming connections (or,
for QUIC, datagrams) between the two. Binding a plain socket (no
``SO_REUSEPORT``) to each fixed address first fails with ``EADDRINUSE`` in
exactly that case, and for every other reason the real bind would fail.

Addresses with port 0 and non-IP addresses (``/dns``...) are not checked.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket

from ..errors import ConfigError, LocalError

_ADDR = re.compile(r"^/(ip4|ip6)/([^/]+)/(tcp|udp)/(\d+)(/.*)?$")


class BindError(LocalError):
    """A listen address cannot be bound (port in use, address not on this machine...)."""


def split_listen(addr: str) -> tuple[int, str, int, int] | None:
    """(family, host, socket type, port) of an IP listen multiaddr, else None."""
    m = _ADDR.match(addr)
    if m is None:
        return None
    proto, host, transport, port = m.group(1), m.group(2), m.group(3), int(m.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"bad listen address {addr}: {host!r} is not an IP address") from None
    if port > 65535:
        raise ConfigError(f"bad listen address {addr}: port {port} is out of range")
    family = socket.AF_INET if proto == "ip4" else socket.AF_INET6
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    return family, host, kind, port


def check_bindable(listen: list[str]) -> None:
    """Raise ``BindError`` naming the first listen address that cannot be bound."""
    for addr in listen:
        parts = split_listen(addr)
        if parts is None or parts[3] == 0:
            continue
        family, host, kind, port = parts
        sock = socket.socket(family, kind)
        try:
            if kind == socket.SOCK_STREAM:
                # like the real listener: a port whose old connections linger in
                # TIME_WAIT is free, one with a listening socket is not
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
        except OSError as e:
            what = "TCP" if kind == socket.SOCK_STREAM else "UDP"
            hint = (
                "another program (or another node) uses it; stop it or change [node] listen"
                if e.errno == errno.EADDRINUSE
                else "change [node] listen in config.toml"
            )
            raise BindError(
                f"cannot listen on {addr}: {what} {host} port {port}: {e.strerror}; {hint}"
            ) from None
        finally:
            sock.close()
