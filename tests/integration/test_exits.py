"""Exit delivery against real servers on loopback: SMTP (aiosmtpd), HTTP, Maildir.

Also the persisted queue: de-duplication across restarts, retry/backoff,
cancellation, policy denial.
"""

from __future__ import annotations

import base64
import email
import email.policy
import http.server
import os
import random
import socket
import sqlite3
import threading

import pytest
import trio
from aiosmtpd.controller import Controller

from overlay.errors import LocalError, Reason
from overlay.exits import (
    DeliveryEvent,
    DeliveryQueue,
    DeliveryWorker,
    Dispatcher,
    MaildirHandler,
    MessageState,
    PermanentFailure,
    QueueFull,
    RetryPolicy,
    SmtpHandler,
    TemporaryFailure,
    WebhookHandler,
    build_dispatcher,
)
from overlay.exits.smtp import looks_like_message, render
from overlay.wire.delivery import (
    Ack,
    AckStatus,
    ExitMessage,
    InvalidDestination,
    parse_destination,
)

FAST = RetryPolicy(base_delay=0.05, factor=2.0, max_delay=0.2, jitter=0.1, max_attempts=50)

# ---- helpers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Recorder:
    """Collects worker events and acks; ``wait`` polls until a predicate holds."""

    def __init__(self) -> None:
        self.events: list[DeliveryEvent] = []
        self.acks: list[tuple[bytes, Ack]] = []

    def on_event(self, ev: DeliveryEvent) -> None:
        self.events.append(ev)

    async def send_ack(self, reply_block: bytes, ack: Ack) -> None:
        self.acks.append((reply_block, ack))

    def kinds(self, message_id: bytes) -> list[str]:
        return [e.kind for e in self.events if e.message_id == message_id]

    async def wait(self, pred, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while not pred():
                await trio.sleep(0.01)


class SmtpSink:
    """aiosmtpd handler that records every accepted envelope."""

    def __init__(self) -> None:
        self.envelopes: list = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp_server():
    sink = SmtpSink()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    yield sink, port
    ctl.stop()


class Hook(http.server.BaseHTTPRequestHandler):
    """Test webhook: answers with the next scripted status (default 200)."""

    server: HookServer

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.requests.append((dict(self.headers), body))
            status = srv.script.pop(0) if srv.script else 200
        if status == "stall":
            srv.stalled.set()
            srv.release.wait(10)
            status = 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if 200 <= status < 300:
            with srv.lock:
                srv.delivered.append(body)

    def log_message(self, *args):
        pass


class HookServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), Hook)
        self.lock = threading.Lock()
        self.script = list(script)
        self.requests: list = []
        self.delivered: list[bytes] = []
        self.stalled = threading.Event()
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture
def hook_server():
    servers = []

    def make(*script):
        srv = HookServer(script)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def smtp_dispatcher(**kw) -> Dispatcher:
    return Dispatcher(["smtp:*@127.0.0.1"], {"smtp": SmtpHandler(timeout=5.0, **kw)})


# ---- SMTP -------------------------------------------------------------------------

RFC5322_BODY = b".a line that starts with a dot\r\n..and two\r\n8-bit: \xc3\xa9t\xc3\xa9\r\n"
RFC5322 = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: rcpt@127.0.0.1\r\n"
    b"Subject: verbatim\r\n"
    b"X-Folded: one\r\n two\r\n"
    b"Content-Type: text/plain;\r\n charset=utf-8\r\n"
    b"\r\n" + RFC5322_BODY
)


def check_message_form(content: bytes, message_id: bytes, rcpt: str = "rcpt@127.0.0.1") -> None:
    """RFC5322 as the header policy sends it: the exit's From/To/Date/Message-ID,
    the safe fields (Subject, Content-Type with its folding), the body unchanged."""
    head, body = content.split(b"\r\n\r\n", 1)
    assert body == RFC5322_BODY
    names = [ln.split(b":")[0] for ln in head.split(b"\r\n") if not ln.startswith(b" ")]
    assert names == [b"From", b"To", b"Date", b"Message-ID", b"Subject", b"Content-Type"]
    assert b"\r\nSubject: verbatim\r\nContent-Type: text/plain;\r\n charset=utf-8" in head
    assert head.startswith(f"From: hydra-exit@localhost\r\nTo: {rcpt}\r\n".encode())
    assert f"Message-ID: <{message_id.hex()}@hydra.invalid>".encode() in head
    assert b"alice" not in head and b"X-Folded" not in head


async def test_smtp_delivers_exact_bytes_once(tmp_path, smtp_server):
    sink, port = smtp_server
    rec = Recorder()
    dest = f"smtp:rcpt@127.0.0.1:{port}"
    bodies = {
        1: RFC5322,  # verbatim
        2: b"plain ascii\r\n.dot\r\n",  # wrapped, 7bit
        3: b"unix text\nwith LF only\n\xe2\x9c\x93\n",  # wrapped, base64 text/plain utf-8
        4: bytes(range(256)),  # wrapped, base64 octet-stream
        5: b"",  # wrapped, empty
    }
    with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
        worker = DeliveryWorker(q, smtp_dispatcher(), send_ack=rec.send_ack, on_event=rec.on_event)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            for n, body in bodies.items():
                ack = await worker.submit(ExitMessage.make(mid(n), dest, body, b"surb%d" % n))
                assert ack.status is AckStatus.QUEUED
            await rec.wait(lambda: len(sink.envelopes) == len(bodies))
            await trio.sleep(0.2)  # nothing more arrives
            nursery.cancel_scope.cancel()
    assert len(sink.envelopes) == len(bodies)
    assert sorted(rb for rb, _ in rec.acks) == sorted(b"surb%d" % n for n in bodies)
    assert all(a.status is AckStatus.QUEUED for _, a in rec.acks)
    by_id = {}
    for env in sink.envelopes:
        assert env.mail_from == "hydra-exit@localhost"
        assert env.rcpt_tos == ["rcpt@127.0.0.1"]
        content = env.original_content
        if b"Subject: verbatim" in content:
            check_message_form(content, mid(1))
            by_id[1] = RFC5322
            continue
        parsed = email.message_from_bytes(content, policy=email.policy.compat32)
        n = int(parsed["Message-ID"].strip("<>").split("@")[0], 16)
        assert parsed["Message-ID"] == f"<{mid(n).hex()}@hydra.invalid>"
        assert parsed["From"] == "hydra-exit@localhost" and parsed["To"] == "rcpt@127.0.0.1"
        assert parsed["Subject"] == "Message via Hydra" and parsed["Date"]
        by_id[n] = parsed.get_payload(decode=True)
        if n in (2, 5):  # raw body after the blank line, byte for byte
            assert content.split(b"\r\n\r\n", 1)[1] == bodies[n]
            assert parsed["Content-Transfer-Encoding"] == "7bit"
        else:
            assert parsed["Content-Transfer-Encoding"] == "base64"
    assert by_id == bodies
    for n in bodies:
        assert rec.kinds(mid(n)) == ["accepted", "delivered"]


async def test_smtp_down_then_up_delivered_once(tmp_path):
    port = free_port()  # nothing listens yet
    sink = SmtpSink()
    rec = Recorder()
    msg = ExitMessage.make(mid(7), f"smtp:rcpt@127.0.0.1:{port}", RFC5322)
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    with DeliveryQueue(tmp_path / "q.db", retry=FAST, rng=random.Random(1)) as q:
        worker = DeliveryWorker(q, smtp_dispatcher(), on_event=rec.on_event)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await worker.submit(msg)
            await rec.wait(lambda: rec.kinds(msg.message_id).count("retry") >= 2)
            assert all(
                e.reason.startswith("connect_refused") for e in rec.events if e.kind == "retry"
            )
            await trio.to_thread.run_sync(ctl.start)
            try:
                await rec.wait(lambda: "delivered" in rec.kinds(msg.message_id))
                await trio.sleep(0.3)
            finally:
                await trio.to_thread.run_sync(ctl.stop)
            nursery.cancel_scope.cancel()
        assert q.lookup(msg.message_id) == (MessageState.DELIVERED, "")
    (env,) = sink.envelopes
    check_message_form(env.original_content, mid(7))


async def test_smtp_5xx_is_permanent_and_4xx_temporary(tmp_path):
    class Picky(SmtpSink):
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if address.startswith("gone@"):
                return "550 5.1.1 no such user"
            if address.startswith("busy@"):
                return "451 4.3.0 try later"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    sink = Picky()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        handler = SmtpHandler(timeout=5.0)
        with pytest.raises(PermanentFailure) as e:
            await handler.deliver(ExitMessage.make(mid(1), f"smtp:gone@127.0.0.1:{port}", b"x"))
        assert e.value.code == "smtp_550" and "no such user" in e.value.detail
        with pytest.raises(TemporaryFailure) as e:
            await handler.deliver(ExitMessage.make(mid(2), f"smtp:busy@127.0.0.1:{port}", b"x"))
        assert e.value.temporary and e.value.code == "smtp_451"
        # through a relay: the destination host is only the envelope recipient
        relayed = SmtpHandler(relay=("127.0.0.1", port), timeout=5.0)
        await relayed.deliver(ExitMessage.make(mid(3), "smtp:ok@example.org", RFC5322))
        assert sink.envelopes[-1].rcpt_tos == ["ok@example.org"]
        check_message_form(sink.envelopes[-1].original_content, mid(3), "ok@example.org")
    finally:
        ctl.stop()


def test_smtp_render_forms():
    d = parse_destination("smtp:a@example.org")
    assert looks_like_message(RFC5322)
    assert not looks_like_message(b"Note: not a known header\r\n\r\nbody\r\n")
    assert not looks_like_message(b"Subject: lf only\n\nbody\n")
    assert not looks_like_message(b" Subject: folded first\r\n\r\n")
    assert not looks_like_message(b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n")
    assert not looks_like_message(b"Subject: no final crlf\r\n\r\nbody")
    m = ExitMessage.make(mid(9), "smtp:a@example.org", RFC5322)
    assert render(m, d).form == "message" and render(m, d).eight_bit
    check_message_form(render(m, d).data, mid(9), "a@example.org")
    # Unix line endings (an .eml file, echo): normalised, the Subject kept
    for eml in (b"Subject: lf only\nFrom: me@home\n\nbody\n", b"Subject: lf only\n\nbody"):
        lf = render(ExitMessage.make(mid(9), "smtp:a@example.org", eml), d)
        assert lf.form == "message" and lf.data.endswith(b"\r\nSubject: lf only\r\n\r\nbody\r\n")
        assert b"me@home" not in lf.data
    # a "message" SMTP cannot carry is wrapped; so is plain text, LF or not
    long = ExitMessage.make(mid(9), "smtp:a@example.org", b"Subject: x\n\n" + b"y" * 999)
    assert render(long, d).form == "wrapped-base64-text"
    plain = render(ExitMessage.make(mid(9), "smtp:a@example.org", b"hi\nthere"), d)
    assert plain.form == "wrapped-7bit" and plain.data.endswith(b"\r\n\r\nhi\r\nthere\r\n")
    wrapped = render(m, d, verbatim=False, now=0)
    assert wrapped.form == "wrapped-base64-text"
    assert b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n" in wrapped.data
    payload = wrapped.data.split(b"\r\n\r\n", 1)[1]
    assert base64.b64decode(payload) == RFC5322
    assert max(map(len, wrapped.data.split(b"\r\n"))) <= 998


# ---- Maildir ----------------------------------------------------------------------


async def test_maildir_delivery_and_escapes_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    rec = Recorder()
    disp = Dispatcher(["maildir:*"], {"maildir": MaildirHandler(root)})
    body = b"From: x@y\nSubject: lf is fine here\n\n\x00binary\xff"
    msgs = {
        "ok": ExitMessage.make(mid(1), "maildir:inbox/alice", body),
        "abs": ExitMessage.make(mid(2), f"maildir:{outside}/box", body),
        "link": ExitMessage.make(mid(3), "maildir:evil/box", body),
        "abs_in": ExitMessage.make(mid(4), f"maildir:{root}/bob", b"2"),
    }
    with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
        worker = DeliveryWorker(q, disp, on_event=rec.on_event)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            for m in msgs.values():
                await worker.submit(m)
            await rec.wait(
                lambda: all(
                    {"delivered", "gave_up"} & set(rec.kinds(m.message_id)) for m in msgs.values()
                )
            )
            nursery.cancel_scope.cancel()
    new = list((root / "inbox" / "alice" / "new").iterdir())
    assert len(new) == 1 and new[0].read_bytes() == body
    assert mid(1).hex() in new[0].name and oct(new[0].stat().st_mode & 0o777) == "0o600"
    assert list((root / "inbox" / "alice" / "tmp").iterdir()) == []
    assert (root / "inbox" / "alice" / "cur").is_dir()
    assert [p.read_bytes() for p in (root / "bob" / "new").iterdir()] == [b"2"]
    for key in ("abs", "link"):
        gave_up = [e for e in rec.events if e.message_id == msgs[key].message_id]
        assert [e.kind for e in gave_up] == ["accepted", "gave_up"]
        assert (
            gave_up[-1].reason.startswith("path_outside_root")
            and str(root) not in gave_up[-1].reason
        )
    assert list(outside.iterdir()) == []
    with pytest.raises(InvalidDestination):  # '..' never even parses
        ExitMessage.make(mid(5), "maildir:../outside", b"")


# ---- HTTP webhook ------------------------------------------------------------------


async def test_webhook_2xx_500_then_200_and_4xx(tmp_path, hook_server):
    ok, flaky, gone = hook_server(201), hook_server(500, 502, 200), hook_server(404)
    rec = Recorder()
    disp = Dispatcher(["http:127.0.0.1"], {"http": WebhookHandler(timeout=5.0)})
    body = bytes(range(256)) * 4
    msgs = [
        ExitMessage.make(mid(i), srv.url, body + bytes([i]), b"rb")
        for i, srv in enumerate((ok, flaky, gone))
    ]
    with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
        worker = DeliveryWorker(
            q, disp, on_event=rec.on_event, send_ack=rec.send_ack, ack_when="delivered"
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            for m in msgs:
                assert (await worker.submit(m)).status is AckStatus.QUEUED
            await rec.wait(lambda: len(rec.acks) == 3)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert ok.delivered == [msgs[0].body] and len(ok.requests) == 1
    headers = ok.requests[0][0]
    assert headers["Idempotency-Key"] == mid(0).hex() == headers["X-Hydra-Message-Id"]
    assert headers["Content-Type"] == "application/octet-stream"
    assert flaky.delivered == [msgs[1].body] and len(flaky.requests) == 3
    assert rec.kinds(mid(1)) == ["accepted", "retry", "retry", "delivered"]
    assert gone.delivered == [] and len(gone.requests) == 1
    assert rec.kinds(mid(2)) == ["accepted", "gave_up"]
    acks = {a.message_id: a for _, a in rec.acks}
    assert acks[mid(0)].status is acks[mid(1)].status is AckStatus.DELIVERED
    assert acks[mid(2)].status is AckStatus.REJECTED and acks[mid(2)].reason.startswith("http_404")


async def test_webhook_connection_refused_is_temporary():
    url = f"http://127.0.0.1:{free_port()}/x"
    with pytest.raises(TemporaryFailure) as e:
        await WebhookHandler(timeout=2.0).deliver(ExitMessage.make(mid(1), url, b""))
    assert e.value.temporary and e.value.code == "connect_failed"


# ---- de-duplication, restarts, cancellation ------------------------------------------


async def test_duplicates_delivered_once_across_restart(tmp_path, hook_server):
    srv = hook_server()
    db = tmp_path / "q.db"
    disp = Dispatcher(["http:127.0.0.1"], {"http": WebhookHandler(timeout=5.0)})
    msg = ExitMessage.make(mid(42), srv.url, b"once", b"surb-1")
    rec = Recorder()
    with DeliveryQueue(db, retry=FAST) as q:
        worker = DeliveryWorker(q, disp, on_event=rec.on_event, send_ack=rec.send_ack)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            a1 = await worker.submit(msg)
            a2 = await worker.submit(msg)  # resent before delivery
            await rec.wait(lambda: "delivered" in rec.kinds(msg.message_id))
            a3 = await worker.submit(msg)  # resent after delivery
            nursery.cancel_scope.cancel()
    assert [a1.status, a2.status, a3.status] == [
        AckStatus.QUEUED,
        AckStatus.QUEUED,
        AckStatus.DELIVERED,
    ]
    # exit restarts: a new queue object and worker on the same file
    rec2 = Recorder()
    with DeliveryQueue(db, retry=FAST) as q:
        worker = DeliveryWorker(q, disp, on_event=rec2.on_event, send_ack=rec2.send_ack)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            again = ExitMessage.make(mid(42), srv.url, b"once", b"surb-2")
            assert (await worker.submit(again)).status is AckStatus.DELIVERED
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        assert q.counts() == {"pending": 0, "delivered": 1, "failed": 0}
    assert srv.delivered == [b"once"] and len(srv.requests) == 1
    assert rec2.acks == [(b"surb-2", Ack(mid(42), AckStatus.DELIVERED))]
    assert rec2.kinds(mid(42)) == ["duplicate"]


async def test_worker_cancelled_mid_attempt_then_new_worker_delivers_once(tmp_path, hook_server):
    srv = hook_server("stall", 200)
    db = tmp_path / "q.db"
    disp = Dispatcher(["http:127.0.0.1"], {"http": WebhookHandler(timeout=10.0)})
    msg = ExitMessage.make(mid(5), srv.url, b"survives a restart")
    with DeliveryQueue(db, retry=FAST) as q:
        worker = DeliveryWorker(q, disp)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await worker.submit(msg)
            await trio.to_thread.run_sync(srv.stalled.wait, 5)
            nursery.cancel_scope.cancel()  # the exit stops while the attempt is in flight
        assert q.lookup(msg.message_id) == (MessageState.PENDING, "")
    srv.release.set()
    rec = Recorder()
    with DeliveryQueue(db, retry=FAST) as q:
        worker = DeliveryWorker(q, disp, on_event=rec.on_event)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await rec.wait(lambda: "delivered" in rec.kinds(msg.message_id))
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        assert q.lookup(msg.message_id) == (MessageState.DELIVERED, "")
    assert srv.delivered == [b"survives a restart"]


async def test_accepted_without_worker_is_delivered_after_restart(tmp_path):
    db = tmp_path / "q.db"
    root = tmp_path / "mail"
    disp = Dispatcher(["maildir:box"], {"maildir": MaildirHandler(root)})
    msg = ExitMessage.make(mid(6), "maildir:box", b"queued while down")
    with DeliveryQueue(db) as q:
        assert (await DeliveryWorker(q, disp).submit(msg)).status is AckStatus.QUEUED
    rec = Recorder()
    with DeliveryQueue(db) as q:
        worker = DeliveryWorker(q, disp, on_event=rec.on_event)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await rec.wait(lambda: "delivered" in rec.kinds(msg.message_id))
            nursery.cancel_scope.cancel()
    assert [p.read_bytes() for p in (root / "box" / "new").iterdir()] == [b"queued while down"]


# ---- policy ------------------------------------------------------------------------


async def test_policy_denied_before_any_attempt(tmp_path, smtp_server):
    sink, port = smtp_server
    rec = Recorder()
    disp = smtp_dispatcher()
    with DeliveryQueue(tmp_path / "q.db") as q:
        worker = DeliveryWorker(q, disp, on_event=rec.on_event, send_ack=rec.send_ack)
        for n, dest in enumerate([f"smtp:x@example.org:{port}", "http://127.0.0.1/x", "maildir:a"]):
            msg = ExitMessage.make(mid(n), dest, b"no", b"rb")
            ack = await worker.submit(msg)
            assert ack.status is AckStatus.REJECTED and ack.reason.startswith("policy_denied")
            assert q.lookup(msg.message_id) is None
        assert q.counts()["pending"] == 0
    assert len(rec.acks) == 3 and sink.envelopes == []
    with pytest.raises(PermanentFailure) as e:
        await disp.deliver(ExitMessage.make(mid(9), f"smtp:x@example.org:{port}", b"no"))
    assert e.value.reason is Reason.POLICY_DENIED
    assert sink.envelopes == []
    # a kind the policy names but that has no handler is denied too
    assert not Dispatcher(["http:*"], {}).allows(parse_destination("http://a.org/"))


def test_build_dispatcher_from_config(tmp_path):
    disp = build_dispatcher(
        ["https:*.example.org", "maildir:*", "smtp:*"],
        smtp_relay="127.0.0.1:2525",
        maildir_root=str(tmp_path),
    )
    assert set(disp.handlers) == {"smtp", "maildir", "https"}
    assert disp.handlers["smtp"].relay == ("127.0.0.1", 2525)
    assert disp.allows(parse_destination("https://hook.example.org/x"))
    assert not disp.allows(parse_destination("http://hook.example.org/x"))
    assert not build_dispatcher(["maildir:*"]).allows(parse_destination("maildir:x"))


# ---- the queue core (no I/O but SQLite) ----------------------------------------------


def test_backoff_schedule_and_give_up(tmp_path):
    policy = RetryPolicy(base_delay=10, factor=2, max_delay=60, jitter=0.25, max_attempts=5)
    with DeliveryQueue(tmp_path / "q.db", retry=policy, rng=random.Random(7)) as q:
        m = ExitMessage.make(mid(1), "maildir:x", b"")
        assert q.accept(m, 1000).accepted
        assert [x.message_id for x in q.due(1000)] == [mid(1)]
        now, delays = 1000.0, []
        for n in range(1, 5):
            out = q.mark_failed(mid(1), now, temporary=True, reason="connect_refused")
            assert out.attempts == n and not out.gave_up
            delays.append(out.retry_at - now)
            assert q.due(out.retry_at - 0.001) == [] and q.next_due(now) == out.retry_at
            now = out.retry_at
            assert q.due(now)[0].attempts == n
        for d, nominal in zip(delays, (10, 20, 40, 60), strict=True):
            assert nominal * 0.75 <= d <= nominal * 1.25
        out = q.mark_failed(mid(1), now, temporary=True, reason="connect_refused")
        assert out.gave_up and "too many attempts" in out.reason
        assert q.due(now + 1e6) == [] and q.lookup(mid(1))[0] is MessageState.FAILED
        assert not q.mark_delivered(mid(1), now)
        with pytest.raises(LocalError):
            q.mark_failed(mid(1), now, temporary=True, reason="x")
    # same seed, same schedule
    with DeliveryQueue(tmp_path / "q2.db", retry=policy, rng=random.Random(7)) as q:
        q.accept(m, 1000)
        assert q.mark_failed(mid(1), 1000, temporary=True, reason="r").retry_at == delays[0] + 1000


def test_max_age_permanent_retention_and_full(tmp_path):
    policy = RetryPolicy(base_delay=1, max_delay=10, max_age=100)
    with DeliveryQueue(tmp_path / "q.db", retry=policy, retention=1000, max_pending=2) as q:
        a, b, c = (ExitMessage.make(mid(i), "maildir:x", b"%d" % i) for i in range(3))
        q.accept(a, 0)
        q.accept(b, 0)
        with pytest.raises(QueueFull):
            q.accept(c, 0)
        assert q.accept(a, 1).duplicate  # duplicates are answered even when full
        assert q.mark_failed(mid(0), 100, temporary=True, reason="t").gave_up  # too old
        out = q.mark_failed(mid(1), 1, temporary=False, reason="http_404")
        assert out.gave_up and out.reason == "http_404"
        res = q.accept(b, 2)
        assert res.duplicate and res.state is MessageState.FAILED and res.reason == "http_404"
        assert q.accept(c, 3).accepted and q.mark_delivered(mid(2), 3)
        # finished at: b 1, c 3, a 100; retention 1000
        assert q.purge(1000.5) == 0
        assert q.purge(1002) == 1 and q.lookup(mid(1)) is None
        assert q.lookup(mid(2)) == (MessageState.DELIVERED, "")
        assert q.purge(1004) == 1 and q.lookup(mid(2)) is None
        assert q.accept(c, 1005).accepted  # forgotten after the retention window
        assert q.purge(1101) == 1 and q.counts() == {"pending": 1, "delivered": 0, "failed": 0}


def test_duplicate_refreshes_reply_block_and_corrupt_rows_are_dropped(tmp_path):
    db = tmp_path / "q.db"
    with DeliveryQueue(db) as q:
        q.accept(ExitMessage.make(mid(1), "maildir:x", b"a", b"old"), 0)
        assert q.accept(ExitMessage.make(mid(1), "maildir:x", b"a", b"new"), 1).duplicate
        assert q.due(1)[0].message.reply_block == b"new"
        q.accept(ExitMessage.make(mid(2), "maildir:x", b"b"), 0)
    con = sqlite3.connect(db)
    con.execute("UPDATE deliveries SET raw = X'00' WHERE message_id = ?", (mid(2),))
    con.commit()
    con.close()
    with DeliveryQueue(db) as q:
        assert [x.message_id for x in q.due(5)] == [mid(1)]
        assert q.lookup(mid(2))[0] is MessageState.FAILED


def test_queue_file_is_wal(tmp_path):
    with DeliveryQueue(tmp_path / "q.db") as q:
        q.accept(ExitMessage.make(mid(1), "maildir:x", b""), 0)
        assert os.path.exists(tmp_path / "q.db-wal")
        (mode,) = q._db.execute("PRAGMA journal_mode").fetchone()
        assert mode == "wal"


def test_delivered_elsewhere_answers_resends_and_finishes_pending_copies(tmp_path):
    from overlay.storage.delivery_queue import ELSEWHERE
    from overlay.wire.delivered import notice_key

    policy = RetryPolicy(max_age=100)
    with DeliveryQueue(tmp_path / "q.db", retry=policy, retention=1000) as q:
        q.accept(ExitMessage.make(mid(1), "maildir:x", b"mine"), 0)
        q.accept(ExitMessage.make(mid(2), "maildir:x", b"still mine"), 0)
        # another exit delivered 1 (which we also hold) and 3 (which we never saw)
        assert q.note_delivered_elsewhere([notice_key(mid(1)), notice_key(mid(3))], 5) == 1
        assert q.lookup(mid(1)) == (MessageState.DELIVERED, ELSEWHERE)
        assert [x.message_id for x in q.due(6)] == [mid(2)]  # 1 is never delivered here
        res = q.accept(ExitMessage.make(mid(3), "maildir:x", b"resent"), 6)
        assert res.duplicate and res.state is MessageState.DELIVERED and res.reason == ELSEWHERE
        assert q.lookup(mid(3)) is None  # answered, not stored
        assert q.note_delivered_elsewhere([notice_key(mid(3))], 7) == 0  # idempotent
        q.purge(1006)  # the notice is forgotten after the retention window
        assert q.accept(ExitMessage.make(mid(3), "maildir:x", b"much later"), 1006).accepted


async def test_worker_acks_a_message_delivered_elsewhere_without_delivering(tmp_path):
    from overlay.wire.delivered import notice_key

    rec = Recorder()
    maildir = tmp_path / "md"
    maildir.mkdir()
    disp = Dispatcher(["maildir:*"], {"maildir": MaildirHandler(maildir)})
    with DeliveryQueue(tmp_path / "q.db") as q:
        worker = DeliveryWorker(q, disp, send_ack=rec.send_ack, on_event=rec.on_event)
        q.note_delivered_elsewhere([notice_key(mid(9))], 0)
        ack = await worker.submit(ExitMessage.make(mid(9), "maildir:inbox", b"x", b"rb"))
        assert ack.status is AckStatus.DELIVERED and ack.reason == "delivered_elsewhere"
        assert rec.acks == [(b"rb", ack)]
        assert [e.kind for e in rec.events] == ["duplicate"]
        assert not any(maildir.rglob("*"))


async def test_a_late_message_is_checked_with_other_exits_before_delivery(tmp_path):
    """A message that waited at this exit (paused, cut off) is delivered only if
    no other exit says it delivered it meanwhile; fresh ones are not held up."""
    from overlay.storage.delivery_queue import ELSEWHERE
    from overlay.wire.delivered import Answer, notice_key

    rec = Recorder()
    root = tmp_path / "md"
    root.mkdir()
    asked: list[list[bytes]] = []
    elsewhere = {notice_key(mid(1))}

    async def check(keys, earlier):
        asked.append(keys)
        return Answer(tuple(k for k in keys if k in elsewhere))

    clock = [1000.0]
    with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
        worker = _handover_worker(q, root, rec, clock, check)  # late_after: 2 s
        for n in (1, 2):  # accepted, then this exit was paused for 10 s
            await worker.submit(ExitMessage.make(mid(n), "maildir:inbox", b"%d" % n, b"rb%d" % n))
        clock[0] += 10
        await worker.submit(ExitMessage.make(mid(3), "maildir:inbox", b"3", b"rb3"))  # fresh
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await rec.wait(lambda: len(rec.acks) == 3)
            nursery.cancel_scope.cancel()
        acks = {ack.message_id: ack for _, ack in rec.acks}
        assert acks[mid(1)].status is AckStatus.DELIVERED and acks[mid(1)].reason == ELSEWHERE
        assert acks[mid(2)].status is AckStatus.DELIVERED and acks[mid(2)].reason == ""
        assert acks[mid(3)].status is AckStatus.DELIVERED
        assert q.lookup(mid(1)) == (MessageState.DELIVERED, ELSEWHERE)
        assert sorted(asked) == sorted([[notice_key(mid(1))], [notice_key(mid(2))]])  # not 3
        assert len(list(root.rglob("new/*"))) == 2  # 2 and 3; never 1
        # what we delivered, we can vouch for when another exit asks
        keys = [notice_key(mid(n)) for n in (1, 2, 3, 4)]
        assert q.delivered_among(keys) == set(keys[:3])


def test_pending_keys_postpone_and_older_queue_files(tmp_path):
    from overlay.wire.delivered import notice_key

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)  # a queue file from before the notice_key column
    db.executescript(
        "CREATE TABLE deliveries (message_id BLOB PRIMARY KEY, state INTEGER NOT NULL,"
        " raw BLOB, accepted_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " next_at REAL, finished_at REAL, reason TEXT NOT NULL DEFAULT '');"
    )
    raw = ExitMessage.make(mid(1), "maildir:x", b"old").encode()
    db.execute("INSERT INTO deliveries VALUES (?, 0, ?, 0, 0, 0, NULL, '')", (mid(1), raw))
    db.commit()
    db.close()
    with DeliveryQueue(path) as q:
        q.accept(ExitMessage.make(mid(2), "maildir:x", b"new"), 1)
        keys = [notice_key(mid(n)) for n in (1, 2, 3)]
        assert q.pending_among(keys) == {keys[0]: mid(1), keys[1]: mid(2)}
        assert q.postpone(mid(2), 50) and not q.postpone(mid(3), 50)
        assert [x.message_id for x in q.due(10)] == [mid(1)]
        assert q.next_due(10) == 50
        assert q.note_delivered_elsewhere(keys[:1], 11) == 1  # found through the column
        assert q.pending_among(keys) == {keys[1]: mid(2)}


def _handover_worker(q, root, rec, clock, check):
    """A maildir exit on a fake clock that asks ``check`` before late or resent deliveries."""
    disp = Dispatcher(["maildir:*"], {"maildir": MaildirHandler(root)})
    return DeliveryWorker(
        q,
        disp,
        send_ack=rec.send_ack,
        on_event=rec.on_event,
        ack_when="delivered",
        clock=lambda: clock[0],
        check_delivered=check,
    )


async def test_a_resent_message_waits_for_the_exit_that_holds_it(tmp_path):
    """A message the sender handed to another exit before is not delivered while
    that exit says it holds it; the holder's notice finishes it, and when the
    holder goes silent, it is delivered here."""
    from overlay.wire.delivered import Answer, notice_key

    rec = Recorder()
    root = tmp_path / "md"
    root.mkdir()
    other = b"o" * 32
    holder_alive = [True]
    asked: list[tuple] = []

    async def check(keys, earlier):
        asked.append((tuple(keys), tuple(earlier)))
        return Answer((), tuple(keys)) if holder_alive[0] else Answer()

    clock = [1000.0]
    with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
        worker = _handover_worker(q, root, rec, clock, check)
        for n in (1, 2):
            msg = ExitMessage.make(mid(n), "maildir:inbox", b"%d" % n, b"rb%d" % n, (other,))
            await worker.submit(msg)
        await worker.submit(ExitMessage.make(mid(3), "maildir:inbox", b"3", b"rb3"))  # first copy
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await rec.wait(lambda: [e.kind for e in rec.events].count("deferred") == 2)
            await rec.wait(lambda: len(rec.acks) == 1)  # 3 is ours alone: delivered at once
            assert sorted(asked) == sorted(((notice_key(mid(n)),), (other,)) for n in (1, 2))
            assert len(list(root.rglob("new/*"))) == 1
            # the holder delivered 1 and says so; then it dies before delivering 2
            assert q.note_delivered_elsewhere([notice_key(mid(1))], clock[0]) == 1
            holder_alive[0] = False
            clock[0] += 2.0  # still within the wait: nothing happens
            worker.wake()
            await trio.sleep(0.2)
            assert len(asked) == 2
            clock[0] += 60.0
            worker.wake()
            await rec.wait(lambda: len(rec.acks) == 2)
            nursery.cancel_scope.cancel()
        acks = {ack.message_id: ack for _, ack in rec.acks}
        assert set(acks) == {mid(2), mid(3)}
        assert all(a.status is AckStatus.DELIVERED and not a.reason for a in acks.values())
        assert len(list(root.rglob("new/*"))) == 2 and len(asked) == 3


@pytest.mark.parametrize("seed", range(8))
async def test_two_exits_asking_each_other_deliver_exactly_once(tmp_path, seed):
    """Two exits hold the same resent message and ask each other at about the
    same time: exactly one of them delivers it, the other waits for its notice."""
    from overlay.wire.delivered import notice_key

    rng = random.Random(seed)
    root = tmp_path / "md"
    root.mkdir()
    clock = [1000.0]
    workers: dict[bytes, DeliveryWorker] = {}
    ids = (b"\x01" * 32, b"\x02" * 32)  # the first sorts first

    def asker(me: bytes):
        async def check(keys, earlier):
            (peer,) = earlier
            await trio.sleep(rng.uniform(0, 0.02))  # the question in flight
            answer = workers[peer].answer(keys, me, asker_first=me < peer)
            await trio.sleep(rng.uniform(0, 0.02))  # the answer in flight
            return answer

        return check

    recs = [Recorder(), Recorder()]
    with (
        DeliveryQueue(tmp_path / "a.db", retry=FAST) as qa,
        DeliveryQueue(tmp_path / "b.db", retry=FAST) as qb,
    ):
        for me, peer, q, rec in ((ids[0], ids[1], qa, recs[0]), (ids[1], ids[0], qb, recs[1])):
            workers[me] = _handover_worker(q, root, rec, clock, asker(me))
            msg = ExitMessage.make(mid(7), "maildir:inbox", b"once", b"rb", (peer,))
            await workers[me].submit(msg)

        def notice(ev, other):
            if ev.kind == "delivered":
                other.queue.note_delivered_elsewhere([notice_key(ev.message_id)], clock[0])

        workers[ids[0]].on_event = lambda ev: (recs[0].on_event(ev), notice(ev, workers[ids[1]]))
        workers[ids[1]].on_event = lambda ev: (recs[1].on_event(ev), notice(ev, workers[ids[0]]))
        async with trio.open_nursery() as nursery:
            for w in workers.values():
                await nursery.start(w.run)
            for r in recs:
                await r.wait(lambda r=r: {"delivered", "deferred"} & set(r.kinds(mid(7))))
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        kinds = [e.kind for r in recs for e in r.events if e.kind != "accepted"]
        assert sorted(kinds) == ["deferred", "delivered"]
        assert len(list(root.rglob("new/*"))) == 1
        assert {q.lookup(mid(7))[0] for q in (qa, qb)} == {MessageState.DELIVERED}


async def test_a_delayed_first_copy_asks_the_exit_that_asked_about_it(tmp_path):
    """The sender's resend overtook its first attempt: exit B asked A about the
    message before A had it. When A's (delayed) copy arrives, A asks B first."""
    from overlay.wire.delivered import Answer, notice_key

    rec = Recorder()
    root = tmp_path / "md"
    root.mkdir()
    b_id = b"b" * 32
    asked: list[tuple] = []

    async def check(keys, earlier):
        asked.append(tuple(earlier))
        return Answer(tuple(keys)) if b_id in earlier else Answer()  # B delivered it

    clock = [1000.0]
    with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
        a = _handover_worker(q, root, rec, clock, check)
        key = notice_key(mid(5))
        assert a.answer([key], b_id, asker_first=True) == Answer()  # A knows nothing yet
        await a.submit(ExitMessage.make(mid(5), "maildir:inbox", b"5", b"rb5"))  # no earlier
        await a.submit(ExitMessage.make(mid(6), "maildir:inbox", b"6", b"rb6"))  # unrelated
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await rec.wait(lambda: len(rec.acks) == 2)
            nursery.cancel_scope.cancel()
        assert asked == [(b_id,)]  # only for the message B asked about
        assert q.lookup(mid(5))[1] == "delivered_elsewhere"
        assert len(list(root.rglob("new/*"))) == 1  # 6 only
        # claims expire
        assert a.answer([notice_key(mid(8))], b_id, asker_first=True) == Answer()
        clock[0] += 10_000
        await a.submit(ExitMessage.make(mid(8), "maildir:inbox", b"8", b"rb8"))
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await rec.wait(lambda: len(rec.acks) == 3)
            nursery.cancel_scope.cancel()
        assert asked == [(b_id,)]
