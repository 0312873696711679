"""The console's pure parts: the event ring, the history, login tickets and sessions,
and the control app's console routes (called as ASGI, no network)."""

import json

import pytest
import trio

from overlay.console import EventRing, History
from overlay.control import SESSION_TTL, TICKET_TTL, ConsoleSessions, make_app


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_event_ring_is_bounded_and_numbered():
    ring = EventRing(size=3, clock=Clock())
    assert ring.since(0) == [] and ring.dropped_before == 1
    for i in range(5):
        ring.add("join", f"member {i}", at=100.0 + i)
    assert len(ring) == 3 and ring.last_seq == 5
    assert [e.seq for e in ring.since(0)] == [3, 4, 5]
    assert ring.dropped_before == 3  # 1 and 2 were dropped
    assert [e.text for e in ring.since(3)] == ["member 3", "member 4"]
    assert ring.since(5) == [] and ring.since(99) == []
    assert [e.seq for e in ring.since(0, limit=2)] == [4, 5]
    assert [e.seq for e in ring.recent(1)] == [5]
    ev = ring.add("dead", "x" * 1000, peer="12D3Koo", role="exit")
    assert ev.at == 1000.0 and len(ev.text) == 200  # the ring's clock; text capped
    assert ev.to_json() == {
        "seq": 6,
        "at": 1000.0,
        "kind": "dead",
        "text": "x" * 200,
        "peer": "12D3Koo",
        "role": "exit",
    }
    with pytest.raises(ValueError):
        EventRing(size=3).add("join", "no clock, no time")


def test_history_keeps_one_hour_of_samples_and_rates():
    h = History(span=60, interval=10)
    assert h.offer(0, {"peers": 1}, {"gossip": 0}) is not None
    assert h.offer(5, {"peers": 2}, {"gossip": 50}) is None  # not due yet
    s = h.offer(10, {"peers": 3}, {"gossip": 100})
    assert s == {"t": 10, "peers": 3, "rates": {"gossip": 10.0}}
    s = h.offer(20, {"peers": 3}, {"gossip": 40})  # the counter went back: no rate
    assert s["rates"] == {"gossip": None}
    for t in range(30, 200, 10):
        h.offer(t, {"peers": 1}, {"gossip": t})
    assert len(h.samples) == 6  # span / interval
    assert [s["t"] for s in h.since(170)] == [180, 190]
    with pytest.raises(ValueError):
        History(span=5, interval=10)


def test_tickets_are_one_time_and_expire_and_sessions_are_bounded():
    clock = Clock()
    s = ConsoleSessions(clock)
    t = s.ticket()
    session = s.redeem(t)
    assert session and s.valid(session)
    assert s.redeem(t) is None  # one use
    late = s.ticket()
    clock.t += TICKET_TTL + 1
    assert s.redeem(late) is None
    assert not s.valid("not a session") and s.redeem("not a ticket") is None
    clock.t += SESSION_TTL
    assert not s.valid(session)
    # at most 16 sessions: the oldest goes first
    sessions = [s.redeem(s.ticket()) for _ in range(17)]
    assert not s.valid(sessions[0]) and all(s.valid(x) for x in sessions[1:])


class FakeConsole:
    def __init__(self) -> None:
        self.asked: list[dict] = []

    def asset(self, path):
        return (b"<html>", "text/html; charset=utf-8") if path == "/console" else None

    def state(self, query):
        self.asked.append(query)
        return {"ok": True}

    def stream_open(self):
        return False


async def call(app, method, path, headers=(), query=b""):
    sent = []

    async def receive():
        await trio.sleep_forever()

    async def send(msg):
        sent.append(msg)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": [(b"host", b"127.0.0.1:9000"), *headers],
    }
    await app(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), sent[1]["body"]


async def test_console_routes_and_their_access_rule():
    token = "ab" * 32
    refused = []
    console = FakeConsole()
    app = make_app(
        lambda what: {"what": what},
        lambda: b"metrics",
        token=token,
        port=9000,
        on_refused=refused.append,
        console=console,
        sessions=ConsoleSessions(Clock()),
    )
    bearer = [(b"authorization", f"Bearer {token}".encode())]
    assert (await call(app, "GET", "/console"))[0] == 401
    assert (await call(app, "GET", "/console/ticket", bearer))[0] == 405  # POST only
    status, _, body = await call(app, "POST", "/console/ticket", bearer)
    ticket = json.loads(body)["ticket"]
    status, headers, _ = await call(app, "GET", "/console/login", query=f"ticket={ticket}".encode())
    assert status == 303 and headers[b"location"] == b"/console"
    cookie = headers[b"set-cookie"].split(b";")[0]
    assert cookie.startswith(b"hydra_console_9000=")
    jar = [(b"cookie", b"other=1; " + cookie)]
    status, headers, body = await call(app, "GET", "/console", jar)
    assert status == 200 and body == b"<html>"
    assert b"default-src 'none'" in headers[b"content-security-policy"]
    assert headers[b"x-content-type-options"] == b"nosniff"
    status, _, body = await call(app, "GET", "/console/state", jar, b"since=7&history=1")
    assert status == 200 and console.asked[-1] == {"since": "7", "history": "1"}
    assert (await call(app, "GET", "/console/nope", jar))[0] == 404
    assert (await call(app, "GET", "/console/stream", jar))[0] == 503  # no room left
    # the cookie opens the console, nothing else; a cookie of another port, nothing
    assert (await call(app, "GET", "/status", jar))[0] == 401
    other = [(b"cookie", cookie.replace(b"9000", b"9001"))]
    assert (await call(app, "GET", "/console", other))[0] == 401
    assert refused.count("token") == 3
    # the ticket was used up
    status, _, body = await call(app, "GET", "/console/login", query=f"ticket={ticket}".encode())
    assert status == 401 and b"overlay console" in body and refused[-1] == "ticket"
