"""Local-only control endpoint: JSON state and Prometheus metrics over HTTP on 127.0.0.1.

Routes: ``/status``, ``/peers``, ``/exits``, ``/records``, ``/metrics``, and the
console under ``/console`` (``overlay/console/web.py``).
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
- a browser cannot send that header, so the console has a second way in: a
  holder of the token asks for a one-time ticket (``POST /console/ticket``,
  valid ``TICKET_TTL`` seconds); ``GET /console/login?ticket=...`` trades it for
  a session cookie (HttpOnly, SameSite=Strict, named after the port so that two
  nodes on one machine keep theirs apart) valid ``SESSION_TTL`` seconds; the
  cookie opens the ``/console`` routes only, never the JSON routes; tickets and
  sessions are bounded in number (the oldest go first) and held in memory only
  (a restart logs every browser out);
- refusals are counted (``on_refused``) and never reach the node's state.

The client half (``control_get``) reads the URL from ``HOME/control.json`` and
the token from ``HOME/control.token``, so local tools need no setup.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio

from .errors import ConfigError, LocalError
from .storage.files import write_atomic

log = logging.getLogger("hydra.control")

JSON_ROUTES = ("/status", "/peers", "/exits", "/records")
OPEN_ROUTES = ("/metrics",)  # served without the token (Prometheus scrapes stay simple)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
TOKEN_FILE = "control.token"
URL_FILE = "control.json"
TOKEN_BYTES = 32
CONSOLE = "/console"
TICKET_TTL = 60.0  # seconds a one-time console login link stays valid
SESSION_TTL = 12 * 3600.0  # seconds a console session cookie stays valid
MAX_TICKETS = 16
MAX_SESSIONS = 16
# sent with every console file: the browser loads nothing from anywhere but the node
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# ---------------------------------------------------------------- token file
def token_path(home: Path) -> Path:
    return Path(home) / TOKEN_FILE


async def lifespan(receive: Callable, send: Callable) -> None:
    """Answer an ASGI server's lifespan messages (nothing to set up or tear down)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


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
        write_atomic(path, token.encode(), mode=0o600)
    except OSError as e:
        raise LocalError(f"cannot write {path}: {e.strerror or e}") from None
    return token


# ---------------------------------------------------------------- console sessions
def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class ConsoleSessions:
    """One-time login tickets and the browser sessions they open (see the module
    docstring). Only digests of tickets and sessions are held; lookups are by digest."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._tickets: dict[bytes, float] = {}  # digest -> expires at
        self._sessions: dict[bytes, float] = {}

    @staticmethod
    def _add(table: dict[bytes, float], secret: str, until: float, limit: int) -> None:
        while len(table) >= limit:
            del table[next(iter(table))]  # oldest first (dicts keep insertion order)
        table[_digest(secret)] = until

    def ticket(self) -> str:
        t = secrets.token_urlsafe(24)
        self._add(self._tickets, t, self.clock() + TICKET_TTL, MAX_TICKETS)
        return t

    def redeem(self, ticket: str) -> str | None:
        """A new session for a valid ticket (used up), else None."""
        until = self._tickets.pop(_digest(ticket), None)
        if until is None or self.clock() > until:
            return None
        session = secrets.token_urlsafe(32)
        self._add(self._sessions, session, self.clock() + SESSION_TTL, MAX_SESSIONS)
        return session

    def valid(self, session: str) -> bool:
        until = self._sessions.get(_digest(session))
        if until is None:
            return False
        if self.clock() > until:
            self._sessions.pop(_digest(session), None)
            return False
        return True


def cookie_name(port: int) -> bytes:
    return f"hydra_console_{port}".encode()


def _cookies(headers) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for k, v in headers:
        if k.lower() == b"cookie":
            for part in v.split(b";"):
                name, _, value = part.strip().partition(b"=")
                out.setdefault(name, value)
    return out


_LOGIN_FAILED = (
    b"<!doctype html><meta charset=utf-8><title>Hydra console</title>"
    b"<p>This console link was used already or has expired. Run <code>overlay console</code>"
    b" again for a new one.</p>"
)


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
    console=None,
    sessions: ConsoleSessions | None = None,
):
    """The ASGI app. ``on_refused(check)`` is called with ``"host"`` or ``"token"``.

    ``console``: a ``overlay.console.web.ConsoleWeb`` serving ``/console*`` (none:
    those routes answer 404); ``sessions`` its login tickets and cookies.
    """
    hosts = allowed_hosts(port)
    secret = token.encode()
    warned: set[str] = set()
    cookie = cookie_name(port)
    if sessions is None:
        sessions = ConsoleSessions(time.time)
    page_headers = [
        (b"content-security-policy", CSP.encode()),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    ]

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

    def has_token(headers) -> bool:
        given = [_bearer(v) for k, v in headers if k.lower() == b"authorization"]
        return len(given) == 1 and given[0] is not None and hmac.compare_digest(given[0], secret)

    def has_session(headers) -> bool:
        value = _cookies(headers).get(cookie)
        try:
            return value is not None and sessions.valid(value.decode("ascii"))
        except UnicodeDecodeError:
            return False

    def route(scope):
        headers = scope.get("headers") or []
        host = [v.strip().lower() for k, v in headers if k.lower() == b"host"]
        if len(host) != 1 or host[0] not in hosts:
            return refuse("host", scope)
        path = scope["path"].rstrip("/") or "/"
        method = scope["method"]
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if path == CONSOLE + "/login" and console is not None:
            # the ticket is the credential here: a link `overlay console` printed
            if method != "GET":
                return 405, b'{"error": "method not allowed"}', []
            session = sessions.redeem(query.get("ticket", ""))
            if session is None:
                on_refused("ticket")
                log.info("console login refused: unknown or expired ticket")
                return 401, _LOGIN_FAILED, [(b"content-type", b"text/html; charset=utf-8")]
            set_cookie = (
                cookie + b"=" + session.encode() + b"; HttpOnly; SameSite=Strict; Path=/"
                b"; Max-Age=" + str(int(SESSION_TTL)).encode()
            )
            return 303, b"", [(b"location", CONSOLE.encode()), (b"set-cookie", set_cookie)]
        in_console = path == CONSOLE or path.startswith(CONSOLE + "/")
        if path not in OPEN_ROUTES:
            if not (has_token(headers) or (in_console and has_session(headers))):
                return refuse("token", scope)
        if in_console and console is not None:
            if path == CONSOLE + "/ticket":
                if method != "POST" or not has_token(headers):
                    return 405, b'{"error": "POST with the bearer token"}', []
                ticket = sessions.ticket()
                body = {"ticket": ticket, "path": f"{CONSOLE}/login?ticket={ticket}"}
                return 200, json.dumps(body | {"expires_in": TICKET_TTL}).encode(), []
            if method != "GET":
                return 405, b'{"error": "method not allowed"}', []
            if path == CONSOLE + "/state":
                return 200, json.dumps(console.state(query), default=str).encode(), []
            if path == CONSOLE + "/stream":
                if not console.stream_open():
                    return 503, b'{"error": "too many console streams"}', []
                return "stream", b"", []
            found = console.asset(path)
            if found is None:
                return 404, b'{"error": "not found"}', []
            body, ctype = found
            return 200, body, [(b"content-type", ctype.encode()), *page_headers]
        if method != "GET":
            return 405, b'{"error": "method not allowed"}', []
        if path == "/metrics":
            return 200, metrics(), [(b"content-type", b"text/plain; version=0.0.4")]
        if path in JSON_ROUTES:
            return 200, json.dumps(state(path[1:]), default=str).encode(), []
        if path == "/":
            routes = [*JSON_ROUTES, *OPEN_ROUTES] + ([CONSOLE] if console is not None else [])
            return 200, json.dumps({"routes": routes}).encode(), []
        return 404, b'{"error": "not found"}', []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        status, body, extra = route(scope)
        base = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
        if status == "stream":
            await console.stream(send, receive, base[1:])
            return
        headers = [*base, *extra]
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
    console=None,
    sessions: ConsoleSessions | None = None,
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
    app = make_app(
        state,
        metrics,
        token=token,
        port=port,
        on_refused=on_refused,
        console=console,
        sessions=sessions,
    )
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


def control_answer(url: str, route: str, send: Callable[[], Any], home: Path | None = None) -> Any:
    """The JSON the control endpoint at ``url`` answers to ``send()`` (an httpx call
    to ``route``), or a ``LocalError`` saying in one line why there is none."""
    import httpx

    try:
        r = send()
        if r.status_code == 401:
            where = f" in {token_path(home)}" if home is not None else ""
            raise LocalError(f"control endpoint {url} refused the token{where}")
        if r.status_code == 404:
            raise LocalError(f"the node at {url} does not serve {route} (an older version?)")
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise LocalError(f"control endpoint {url} did not answer: {e}") from None


def control_get(home: Path, route: str, timeout: float = 5.0) -> Any:
    """GET ``route`` from the node running from ``home``; its JSON. Raises ``LocalError``."""
    import httpx

    url = control_url(home)
    headers = auth_headers(home)
    # no proxies from the environment: the token must not leave this machine
    return control_answer(
        url,
        route,
        lambda: httpx.get(url + route, headers=headers, timeout=timeout, trust_env=False),
        home,
    )
