"""Local-only control endpoint: JSON state and Prometheus metrics over HTTP on 127.0.0.1.

Routes: ``/status``, ``/peers``, ``/exits``, ``/records``, ``/metrics``.
Served by hypercorn on trio from a socket bound here, so port 0 works and the
real port is known before the server starts.

Invariants:
- the socket is bound to a loopback address only;
- every request must name a loopback host with the bound port in its ``Host``
  header (``localhost``, ``127.0.0.1``, ``[::1]``), else it is refused with 421:
  a web page that rebinds its own DNS name to 127.0.0.1 cannot read the endpoint;
- every route but ``/metrics`` needs ``Authorization: Bearer <token>``, the token
  being 32 random bytes in hex in ``HOME/control.token`` (mode 0600, created on
  first start); it is compared in constant time. Refusals answer 401;
- refusals are counted (``on_refused``) and never reach the node's state.

The client half (``control_get``) reads the URL from ``HOME/control.json`` and
the token from ``HOME/control.token``, so local tools need no setup.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .errors import ConfigError, LocalError
from .home import write_atomic

log = logging.getLogger("hydra.control")

JSON_ROUTES = ("/status", "/peers", "/exits", "/records")
OPEN_ROUTES = ("/metrics",)  # served without the token (Prometheus scrapes stay simple)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
TOKEN_FILE = "control.token"
URL_FILE = "control.json"
TOKEN_BYTES = 32


# ---------------------------------------------------------------- token file
def token_path(home: Path) -> Path:
    return Path(home) / TOKEN_FILE


def read_token(home: Path) -> str | None:
    """The control token of the node home ``home``, or None if missing or malformed."""
    try:
        with open(token_path(home), "rb") as f:
            raw = f.read(4 * TOKEN_BYTES)
        token = raw.decode("ascii").strip()
        bytes.fromhex(token)
    except (OSError, ValueError):
        return None
    return token if len(token) == 2 * TOKEN_BYTES else None


def ensure_token(home: Path) -> str:
    """The control token, created (mode 0600) if missing, malformed or readable by others."""
    path = token_path(home)
    token = read_token(home)
    if token is not None:
        try:
            if stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0:
                return token
            log.warning("%s was readable by other users; a new token replaces it", path)
        except OSError:
            pass
    token = secrets.token_hex(TOKEN_BYTES)
    try:
        write_atomic(path, token.encode(), 0o600)
    except OSError as e:
        raise LocalError(f"cannot write {path}: {e.strerror or e}") from None
    return token


# ---------------------------------------------------------------- server
def allowed_hosts(port: int) -> frozenset[bytes]:
    """``Host`` header values naming this endpoint (lowercase)."""
    hosts = {f"{name}:{port}".encode() for name in LOOPBACK_NAMES}
    if port == 80:
        hosts |= {name.encode() for name in LOOPBACK_NAMES}
    return frozenset(hosts)


def _bearer(value: bytes) -> bytes | None:
    scheme, _, credentials = value.strip().partition(b" ")
    return credentials.strip() if scheme.lower() == b"bearer" else None


def make_app(
    state: Callable[[str], Any],
    metrics: Callable[[], bytes],
    *,
    token: str,
    port: int,
    on_refused: Callable[[str], None] = lambda check: None,
):
    """The ASGI app. ``on_refused(check)`` is called with ``"host"`` or ``"token"``."""
    hosts = allowed_hosts(port)
    secret = token.encode()
    warned: set[str] = set()

    def refuse(check: str, scope) -> tuple[int, bytes, list]:
        on_refused(check)
        level = logging.DEBUG if check in warned else logging.WARNING
        warned.add(check)
        log.log(
            level,
            "control request refused (%s): %s %s; use `overlay status` or send the token "
            "in HOME/control.token",
            check,
            scope["method"],
            scope["path"],
        )
        if check == "host":
            return 421, b'{"error": "unknown host"}', []
        return 401, b'{"error": "unauthorized"}', [(b"www-authenticate", b"Bearer")]

    def route(scope) -> tuple[int, bytes, list]:
        headers = scope.get("headers") or []
        host = [v.strip().lower() for k, v in headers if k.lower() == b"host"]
        if len(host) != 1 or host[0] not in hosts:
            return refuse("host", scope)
        path = scope["path"].rstrip("/") or "/"
        if path not in OPEN_ROUTES:
            given = [_bearer(v) for k, v in headers if k.lower() == b"authorization"]
            if len(given) != 1 or given[0] is None or not hmac.compare_digest(given[0], secret):
                return refuse("token", scope)
        if scope["method"] != "GET":
            return 405, b'{"error": "method not allowed"}', []
        if path == "/metrics":
            return 200, metrics(), [(b"content-type", b"text/plain; version=0.0.4")]
        if path in JSON_ROUTES:
            return 200, json.dumps(state(path[1:]), default=str).encode(), []
        if path == "/":
            return 200, json.dumps({"routes": [*JSON_ROUTES, *OPEN_ROUTES]}).encode(), []
        return 404, b'{"error": "not found"}', []

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
        status, body, extra = route(scope)
        headers = [(b"cache-control", b"no-store"), *extra]
        if not any(k == b"content-type" for k, _ in headers):
            headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
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


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_control(
    sock: socket.socket,
    state: Callable[[str], Any],
    metrics: Callable[[], bytes],
    *,
    token: str,
    on_refused: Callable[[str], None] = lambda check: None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve

    port = sock.getsockname()[1]
    cfg = HyperConfig()
    # hypercorn wraps the fd in a socket object of its own and closes it at shutdown;
    # detach ours so the same fd is never closed twice (a second close can hit an fd
    # number the process has reused meanwhile, e.g. a libp2p connection).
    cfg.bind = [f"fd://{sock.detach()}"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = 0.5
    app = make_app(state, metrics, token=token, port=port, on_refused=on_refused)
    await serve(app, cfg, task_status=task_status)


# ---------------------------------------------------------------- client
def control_url(home: Path) -> str:
    """The URL of the node running from ``home`` (from ``HOME/control.json``)."""
    path = Path(home) / URL_FILE
    try:
        info = json.loads(path.read_text())
        url = info["url"]
    except PermissionError:
        raise LocalError(
            f"cannot read {path}: permission denied (run as the node's user or root)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise LocalError(f"no running node for {home} (is `overlay run` running?)") from None
    pid = info.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise LocalError(
                f"no running node for {home} (its control.json is from process {pid},"
                " which has exited)"
            ) from None
        except PermissionError:
            pass  # runs as another user (e.g. the service's): ask it
    return url


def auth_headers(home: Path) -> dict[str, str]:
    """Headers that authenticate a local tool to the node running from ``home``."""
    token = read_token(home)
    if token is None:
        raise LocalError(f"no control token in {token_path(home)} (is `overlay run` running?)")
    return {"Authorization": f"Bearer {token}"}


def control_get(home: Path, route: str, timeout: float = 5.0) -> Any:
    """GET ``route`` from the node running from ``home``; its JSON. Raises ``LocalError``."""
    import httpx

    url = control_url(home)
    try:
        # no proxies from the environment: the token must not leave this machine
        r = httpx.get(url + route, headers=auth_headers(home), timeout=timeout, trust_env=False)
        if r.status_code == 401:
            raise LocalError(f"control endpoint {url} refused the token in {token_path(home)}")
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise LocalError(f"control endpoint {url} did not answer: {e}") from None
