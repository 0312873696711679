"""Local-only control endpoint: JSON state and Prometheus metrics over HTTP on 127.0.0.1.

Routes: ``/status``, ``/peers``, ``/exits``, ``/records``, ``/metrics``.
Served by hypercorn on trio from a socket bound here, so port 0 works and the
real port is known before the server starts.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from .errors import ConfigError

JSON_ROUTES = ("/status", "/peers", "/exits", "/records")


def make_app(state: Callable[[str], Any], metrics: Callable[[], bytes]):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        status, ctype = 200, b"application/json"
        if scope["method"] != "GET":
            status, body = 405, b'{"error": "method not allowed"}'
        elif path == "/metrics":
            body, ctype = metrics(), b"text/plain; version=0.0.4"
        elif path in JSON_ROUTES:
            body = json.dumps(state(path[1:]), default=str).encode()
        elif path == "/":
            body = json.dumps({"routes": [*JSON_ROUTES, "/metrics"]}).encode()
        else:
            status, body = 404, b'{"error": "not found"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"cache-control", b"no-store")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def bind_local(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"control endpoint must be local-only, not {listen!r}")
    fam = socket.AF_INET6 if host == "::1" else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host if host != "localhost" else "127.0.0.1", int(port or 0)))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


async def serve_control(
    sock: socket.socket,
    state: Callable[[str], Any],
    metrics: Callable[[], bytes],
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    cfg = HyperConfig()
    # hypercorn wraps the fd in a socket object of its own and closes it at shutdown;
    # detach ours so the same fd is never closed twice (a second close can hit an fd
    # number the process has reused meanwhile, e.g. a libp2p connection).
    cfg.bind = [f"fd://{sock.detach()}"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = 0.5
    await serve(make_app(state, metrics), cfg, task_status=task_status)
