"""The web half of the console: the page and its files, the JSON snapshot, the event stream.

Served by the control endpoint (``overlay/control.py``) under ``/console``, behind
the endpoint's access rule (a loopback ``Host`` and the bearer token, or the
session cookie a one-time login link sets). Every file the page uses is in
``overlay/console/static`` and served from here: no script, style, font or image
comes from anywhere else, and the Content-Security-Policy sent with the page
(``control.CSP``: ``'self'`` only) makes the browser enforce it.

``/console/stream`` is a Server-Sent Events stream: a first message with the
whole snapshot and the last hour of history, then one message every
``interval`` seconds with the facts, the events since the previous message and
any new history samples. At most ``max_streams`` streams are served at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "/console": ("console.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
    "/console/icon.svg": ("icon.svg", "image/svg+xml"),
}
STREAM_INTERVAL = 1.0
MAX_STREAMS = 8


class ConsoleWeb:
    """Routes ``/console*`` of the control endpoint for a ``ConsoleService``."""

    def __init__(
        self, service, *, interval: float = STREAM_INTERVAL, max_streams: int = MAX_STREAMS
    ) -> None:
        self.service = service
        self.interval = interval
        self.max_streams = max_streams
        self.streams = 0
        self._files: dict[str, bytes] = {}

    def asset(self, path: str) -> tuple[bytes, str] | None:
        """The file served at ``path`` and its content type, or None."""
        entry = ASSETS.get(path)
        if entry is None:
            return None
        name, ctype = entry
        body = self._files.get(name)
        if body is None:
            body = self._files[name] = (STATIC / name).read_bytes()
        return body, ctype

    def state(self, query: dict[str, str]) -> dict:
        """``/console/state?since=SEQ&history=1``."""
        try:
            since = max(0, int(query.get("since", "0")))
        except ValueError:
            since = 0
        return self.service.snapshot(since=since, history=query.get("history") == "1")

    def stream_open(self) -> bool:
        return self.streams < self.max_streams

    async def stream(self, send, receive, headers: list) -> None:
        """Serve one event stream until the client goes away."""
        self.streams += 1
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-store"),
                        *headers,
                    ],
                }
            )
            async with trio.open_nursery() as n:

                async def until_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    n.cancel_scope.cancel()

                n.start_soon(until_disconnect)
                await self._feed(send)
                n.cancel_scope.cancel()
        finally:
            self.streams -= 1

    async def _feed(self, send) -> None:
        svc = self.service
        seq, last_t = 0, 0.0
        first = True
        await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
        while True:
            snap = svc.snapshot(since=seq, history=first)
            if first:
                samples = snap.get("history") or []
            else:
                samples = svc.history.since(last_t)
                snap["samples"] = samples
            if samples:
                last_t = samples[-1]["t"]
            seq = snap["last_seq"]
            data = json.dumps(snap, separators=(",", ":"), default=str).encode()
            try:
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + data + b"\n\n",
                        "more_body": True,
                    }
                )
            except Exception:  # noqa: BLE001 - the client went away
                return
            first = False
            await trio.sleep(self.interval)
