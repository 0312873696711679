"""Publish a seed bundle: serve it over HTTP (hypercorn on trio), export DNS TXT.

HTTP: ``GET``/``HEAD`` on ``/`` and ``/seeds.cbor`` return the encoded bundle
(``Content-Type: application/cbor``) with a strong ``ETag`` (a digest of the
bytes, see ``bundle.etag``), ``Cache-Control: public, max-age=N`` (N is at
most the bundle's remaining lifetime) and ``X-Hydra-Seed-Seq``. A request
whose ``If-None-Match`` names the current ETag gets ``304 Not Modified``.
The file is re-checked (mtime, size, inode) on every request: when an
operator replaces it (e.g. after adding a cosignature) the next request gets
the new bundle. A replacement that does not decode is not served: the
previous good bundle stays up and a warning is logged.

The server never verifies signatures (it has no pinned keys): serving is
publishing whatever the operators put in the file; clients verify.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from overlay.control import lifespan
from overlay.errors import DecodeError, LocalError

from .bundle import MAX_SIZE, MEDIA_TYPE, SeedBundle, decode, etag
from .dnstxt import DEFAULT_TTL, zone_text
from .files import read_capped

log = logging.getLogger("bootstrap.publish")

DEFAULT_MAX_AGE = 300
PATHS = ("/", "/seeds.cbor")


@dataclass(frozen=True)
class Published:
    raw: bytes
    bundle: SeedBundle
    etag: str


class BundleFile:
    """The bundle file being served; ``current()`` reloads it when it has changed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key: tuple[int, int, int] | None = None
        self._current: Published | None = None
        self.reloads = 0

    def _load(self) -> Published | None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._key is not None:
                log.warning(
                    "seed bundle %s unavailable (%s); serving the last good one", self.path, e
                )
                self._key = None
            return self._current
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._key:
            return self._current
        self._key = key
        try:
            raw = read_capped(self.path, MAX_SIZE)
            unverified = decode(raw)
        except (OSError, DecodeError) as e:
            log.warning("seed bundle %s not served: %s; keeping the last good one", self.path, e)
            return self._current
        self._current = Published(raw, unverified.bundle, etag(raw))
        self.reloads += 1
        return self._current

    async def current(self) -> Published | None:
        return await trio.to_thread.run_sync(self._load)


def _etag_matches(header: str, tag: str) -> bool:
    for item in header.split(","):
        item = item.strip()
        if item == "*" or item.removeprefix("W/") == tag:
            return True
    return False


def make_app(source: BundleFile, *, max_age: int = DEFAULT_MAX_AGE, paths: Sequence[str] = PATHS):
    """The ASGI application serving ``source``."""

    async def respond(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b""):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive, send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        text = [(b"content-type", b"text/plain; charset=utf-8")]
        if scope["path"] not in paths:
            await respond(send, 404, text, b"not found\n")
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await respond(send, 405, [*text, (b"allow", b"GET, HEAD")], b"method not allowed\n")
            return
        pub = await source.current()
        if pub is None:
            await respond(send, 503, [*text, (b"retry-after", b"30")], b"no seed bundle yet\n")
            return
        remaining = max(0, int(pub.bundle.expires_at - time.time()))
        headers = [
            (b"etag", pub.etag.encode()),
            (b"cache-control", f"public, max-age={min(max_age, remaining)}".encode()),
            (b"x-hydra-seed-seq", str(pub.bundle.seq).encode()),
        ]
        inm = next((v for k, v in scope["headers"] if k.lower() == b"if-none-match"), None)
        if inm is not None and _etag_matches(inm.decode("latin-1"), pub.etag):
            await respond(send, 304, headers)
            return
        headers += [
            (b"content-type", MEDIA_TYPE.encode()),
            (b"content-length", str(len(pub.raw)).encode()),
        ]
        await respond(send, 200, headers, pub.raw if method == "GET" else b"")

    return app


def _config(listen: Sequence[str]):
    from hypercorn.config import Config

    config = Config()
    config.bind = list(listen)
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 30
    return config


async def serve(
    path: Path,
    listen: str | Sequence[str],
    *,
    max_age: int = DEFAULT_MAX_AGE,
    shutdown_trigger=None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the bundle file at ``path`` on ``listen`` ("HOST:PORT", port 0 picks one).

    ``task_status.started`` receives the bound URLs (e.g. ``["http://127.0.0.1:8080"]``).
    Returns after a graceful shutdown once ``shutdown_trigger()`` (an async
    callable) returns; cancelling the caller's scope stops it at once.
    Raises ``LocalError`` if the file does not hold a decodable bundle at start.
    """
    from hypercorn.trio import serve as hypercorn_serve

    source = BundleFile(path)
    if await source.current() is None:
        raise LocalError(f"{path} does not hold a seed bundle")
    binds = [listen] if isinstance(listen, str) else list(listen)
    app = make_app(source, max_age=max_age)
    await hypercorn_serve(
        app, _config(binds), shutdown_trigger=shutdown_trigger, task_status=task_status, mode="asgi"
    )


def export_dns(raw: bytes, domain: str, *, ttl: int = DEFAULT_TTL) -> str:
    """Zone-file text for the encoded bundle ``raw`` (see ``bootstrap.dnstxt``)."""
    try:
        unverified = decode(raw)
    except DecodeError as e:
        raise LocalError(f"not a seed bundle: {e}") from None
    return zone_text(unverified.bundle, raw, domain, ttl=ttl)
