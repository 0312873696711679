"""Free loopback ports for servers the tests start."""

import socket


def free_udp_and_tcp_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (a DNS server serves both)."""
    for _ in range(50):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            t.close()
            u.close()
        return port
    raise RuntimeError("no free port")
