"""A mail exit an operator can run: its [exit] keys, MX delivery against a real DNS
server, smarthost login, what it advertises, and the end-of-data window in the
worker. Real servers on loopback (aiosmtpd, dnslib), real SQLite queues; the
multi-node runs are in test_mail_exit_nodes.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from aiosmtpd.controller import Controller

from overlay import config
from overlay.errors import ConfigError
from overlay.exits import (
    DeliveryQueue,
    DeliveryWorker,
    Dispatcher,
    MessageState,
    PermanentFailure,
    RetryPolicy,
    SmtpHandler,
    TemporaryFailure,
    build_dispatcher,
)
from overlay.exits.mx import MxResolver
from overlay.exits.worker import MAYBE_DELIVERED, Verdict
from overlay.storage.delivery_queue import INTERRUPTED
from overlay.wire.delivered import notice_key
from overlay.wire.delivery import AckStatus, ExitMessage
from tests.ports import free_udp_and_tcp_port

dnslib_server = pytest.importorskip("dnslib.server")
zoneresolver = pytest.importorskip("dnslib.zoneresolver")

FAST = RetryPolicy(base_delay=0.05, factor=2.0, max_delay=0.2, jitter=0.1, max_attempts=50)
OVERLAY = [sys.executable, "-m", "overlay"]


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """aiosmtpd handler: records (envelope, when the end of data arrived)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.got: list = []
        self.delay = delay

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd API
        import asyncio

        self.got.append((envelope, time.monotonic()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return "250 OK"


@contextlib.contextmanager
def smtp_sink(port: int | None = None, **kw):
    sink = Sink()
    port = port or free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port, **kw)
    ctl.start()
    try:
        yield sink, port
    finally:
        ctl.stop()


# ---- [exit] keys ------------------------------------------------------------------


def _load(tmp_path: Path, exit_section: str) -> config.Config:
    path = tmp_path / "config.toml"
    path.write_text('[node]\nroles = ["exit"]\n[exit]\npolicy = ["smtp:*"]\n' + exit_section)
    return config.load(path)


BAD_EXIT = {
    "from not an address": ('smtp_from = "exit"\n', "smtp_from must be an address"),
    "from with spaces": ('smtp_from = "a b@example.org"\n', "smtp_from must be an address"),
    "helo junk": ('smtp_helo = "bad name!"\n', "smtp_helo must be a host name"),
    "tls mode": ('smtp_starttls = "maybe"\n', "smtp_starttls must be one of"),
    "relay port": ('smtp_relay = "smtp.example.net:99999"\n', "smtp_relay must be HOST[:PORT]"),
    "relay v6 unbracketed": ('smtp_relay = "::1:25"\n', "smtp_relay must be HOST[:PORT]"),
    "user without relay": (
        'smtp_username = "u"\nsmtp_password_env = "P"\n',
        "smtp_username needs smtp_relay",
    ),
    "user without password": (
        'smtp_relay = "smtp.example.net:587"\nsmtp_username = "u"\nsmtp_starttls = "required"\n',
        "exactly one of smtp_password_file or smtp_password_env",
    ),
    "two password sources": (
        'smtp_relay = "smtp.example.net:587"\nsmtp_username = "u"\nsmtp_starttls = "required"\n'
        'smtp_password_env = "P"\nsmtp_password_file = "/p"\n',
        "exactly one of",
    ),
    "auth in clear": (
        'smtp_relay = "smtp.example.net:587"\nsmtp_username = "u"\nsmtp_password_env = "P"\n',
        "must not cross the network in clear",
    ),
    "password without user": ('smtp_password_env = "P"\n', "need smtp_username"),
    "bad env name": (
        'smtp_relay = "smtp.example.net:587"\nsmtp_username = "u"\nsmtp_starttls = "tls"\n'
        'smtp_password_env = "1-x"\n',
        "must name an environment variable",
    ),
}


@pytest.mark.parametrize(("section", "expect"), BAD_EXIT.values(), ids=BAD_EXIT.keys())
def test_bad_exit_keys_are_config_errors(tmp_path, section, expect):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, section)
    assert expect in str(info.value) and "config.toml" in str(info.value)


def test_good_exit_keys_reach_the_smtp_handler_and_the_password_stays_out(tmp_path, monkeypatch):
    secret = "s3cret-Pa55"
    (tmp_path / "pw").write_text(secret + "\n")
    cfg = _load(
        tmp_path,
        'smtp_from = "exit@mail.example.org"\nsmtp_helo = "mail.example.org"\n'
        'smtp_relay = "smtp.example.net:587"\nsmtp_starttls = "required"\n'
        f'smtp_username = "me"\nsmtp_password_file = "{tmp_path / "pw"}"\n',
    )
    smtp = build_dispatcher(cfg.exit_policy, smtp_relay=cfg.smtp_relay, config=cfg).handlers["smtp"]
    assert (smtp.exit_address, smtp.helo_name, smtp.relay) == (
        "exit@mail.example.org",
        "mail.example.org",
        ("smtp.example.net", 587),
    )
    assert (smtp.starttls, smtp.username, smtp.password) == ("required", "me", secret)
    assert secret not in repr(smtp) and secret not in config.render(cfg)
    # from the environment instead; a missing one is a ConfigError naming the variable
    cfg.smtp_password_file, cfg.smtp_password_env = "", "HYDRA_TEST_SMTP_PW"
    monkeypatch.setenv("HYDRA_TEST_SMTP_PW", secret)
    assert build_dispatcher(cfg.exit_policy, config=cfg).handlers["smtp"].password == secret
    monkeypatch.delenv("HYDRA_TEST_SMTP_PW")
    with pytest.raises(ConfigError, match="HYDRA_TEST_SMTP_PW"):
        build_dispatcher(cfg.exit_policy, config=cfg)


def _cli(*args, check=True):
    p = subprocess.run([*OVERLAY, *map(str, args)], capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed: {p.stdout}\n{p.stderr}")
    return p


def test_a_standby_exit_initialised_as_the_docs_say_advertises_only_what_it_delivers(tmp_path):
    """(e) docs/volunteer.md: `overlay init --role standby-exit --role relay`."""
    home = tmp_path / "node"
    _cli("init", "--home", home, "--role", "standby-exit", "--role", "relay")
    text = (home / "config.toml").read_text()
    for key in ("smtp_from", "smtp_helo", "smtp_relay", "smtp_starttls", "smtp_username"):
        assert f"# {key}: " in text and f"# {key} = " in text  # documented, defaulted
    assert "smtp_password_file" in text and "smtp_password_env" in text
    shown = json.loads(_cli("record", "show", "--home", home, "--json").stdout)
    assert shown["exit_policy"] == ["smtp:*"], shown
    # with a root, maildir is offered
    (home / "config.toml").write_text(
        text.replace('# maildir_root = ""', f'maildir_root = "{tmp_path / "mail"}"')
    )
    rec = config.load(home / "config.toml")
    assert rec.advertised_policy() == ["maildir:*", "smtp:*"]


# ---- MX resolution against a real DNS server -------------------------------------------


@contextlib.contextmanager
def dns_server(zone_text: str, *, servfail: set[str] = frozenset()):
    """dnslib on 127.0.0.1 (UDP and TCP) serving ``zone_text``; names in
    ``servfail`` answer SERVFAIL; a name with records of other types answers
    NOERROR without data, as real servers do (dnslib's own says NXDOMAIN)."""
    from dnslib import RCODE

    base = zoneresolver.ZoneResolver(zone_text)
    names = {str(name).rstrip(".").lower() for name, _, _ in base.zone}

    class Resolver:
        def resolve(self, request, handler):
            qname = str(request.q.qname).rstrip(".").lower()
            if qname in servfail:
                reply = request.reply()
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            reply = base.resolve(request, handler)
            if reply.header.rcode == RCODE.NXDOMAIN and qname in names:
                reply.header.rcode = RCODE.NOERROR  # the name exists: no data of this type
            return reply

    logger = dnslib_server.DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda s: None)
    port = free_udp_and_tcp_port()
    servers = [
        dnslib_server.DNSServer(Resolver(), port=port, address="127.0.0.1", logger=logger),
        dnslib_server.DNSServer(
            Resolver(), port=port, address="127.0.0.1", logger=logger, tcp=True
        ),
    ]
    for s in servers:
        s.start_thread()
    try:
        yield port
    finally:
        for s in servers:
            s.stop()


ZONE = """
$TTL 60
mail.test.        IN SOA ns.mail.test. admin.mail.test. 1 60 60 60 60
pref.mail.test.   IN MX 20 second.mail.test.
pref.mail.test.   IN MX 10 first.mail.test.
pref.mail.test.   IN MX 30 broken.mail.test.
first.mail.test.  IN A 127.0.0.1
second.mail.test. IN A 127.0.0.2
second.mail.test. IN AAAA ::1
broken.mail.test. IN A 127.0.0.3
bare.mail.test.   IN A 127.0.0.4
bare.mail.test.   IN AAAA ::1
nomail.mail.test. IN MX 0 .
noaddr.mail.test. IN TXT "nothing here"
flaky.mail.test.  IN MX 10 sick.mail.test.
"""


def test_mx_preference_order_implicit_mx_null_mx_and_dns_errors():
    with dns_server(ZONE, servfail={"sick.mail.test", "down.mail.test"}) as port:
        r = MxResolver([("127.0.0.1", port)], timeout=3.0)
        hosts = r.mail_hosts("pref.mail.test")
        assert [(h.name, h.preference) for h in hosts] == [
            ("first.mail.test", 10),
            ("second.mail.test", 20),
            ("broken.mail.test", 30),
        ]
        assert hosts[0].addresses == ("127.0.0.1",)
        assert hosts[1].addresses == ("127.0.0.2", "::1")  # IPv4 first
        # no MX: the domain's own A/AAAA addresses (RFC 5321 5.1)
        (bare,) = r.mail_hosts("bare.mail.test")
        assert (bare.name, bare.addresses) == ("bare.mail.test", ("127.0.0.4", "::1"))
        with pytest.raises(PermanentFailure) as e:
            r.mail_hosts("nomail.mail.test")  # null MX (RFC 7505)
        assert e.value.code == "null_mx"
        with pytest.raises(PermanentFailure) as e:
            r.mail_hosts("gone.mail.test")
        assert e.value.code == "no_such_domain"
        with pytest.raises(PermanentFailure) as e:
            r.mail_hosts("noaddr.mail.test")
        assert e.value.code == "no_mail_host"
        for name in ("down.mail.test", "flaky.mail.test"):  # SERVFAIL: for the MX, its host
            with pytest.raises(TemporaryFailure) as e:
                r.mail_hosts(name)
            assert e.value.code == "dns_error"
    # nobody answers at all: temporary
    with pytest.raises(TemporaryFailure) as e:
        MxResolver([("127.0.0.1", free_udp_and_tcp_port())], timeout=0.5).mail_hosts("x.test")
    assert e.value.code == "dns_error"


async def test_smtp_without_smarthost_goes_to_the_mx_hosts_in_order(tmp_path):
    """The first MX refuses connections; the second (an address the first host
    does not use) takes the message."""
    with smtp_sink(free_port()) as (sink, port):
        zone = (
            "$TTL 60\n"
            "ex.test. IN SOA ns.ex.test. a.ex.test. 1 60 60 60 60\n"
            "ex.test. IN MX 5 dead.ex.test.\n"
            "ex.test. IN MX 10 live.ex.test.\n"
            "dead.ex.test. IN A 127.0.0.9\n"
            "live.ex.test. IN A 127.0.0.1\n"
        )
        with dns_server(zone) as dns_port:
            resolver = MxResolver([("127.0.0.1", dns_port)], timeout=3.0)
            handler = SmtpHandler(timeout=5.0, resolver=resolver)
            # the MX port is 25; on loopback the test's sink listens elsewhere
            orig = handler._targets

            def on_sink_port(dest):
                for t, last in orig(dest):
                    yield type(t)(t.address, port, t.name), last

            handler._targets = on_sink_port
            await handler.deliver(ExitMessage.make(mid(1), "smtp:bob@ex.test", b"hi\n"))
    (env, _), *_ = sink.got
    assert env.rcpt_tos == ["bob@ex.test"]
    assert b"\r\n\r\nhi\r\n" in env.original_content


# ---- smarthost login --------------------------------------------------------------


async def test_smarthost_auth_with_password_from_a_file(tmp_path):
    from aiosmtpd.smtp import AuthResult

    seen = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        seen.append((auth_data.login, auth_data.password))
        ok = auth_data.login == b"me" and auth_data.password == b"pw!"
        return AuthResult(success=ok, handled=False)

    kw = {"authenticator": authenticator, "auth_require_tls": False, "auth_required": True}
    with smtp_sink(**kw) as (sink, port):
        (tmp_path / "pw").write_text("pw!\n")
        cfg = config.Config(roles=["exit"], exit_policy=["smtp:*"])
        cfg.smtp_relay, cfg.smtp_username = f"127.0.0.1:{port}", "me"
        cfg.smtp_password_file, cfg.smtp_from = str(tmp_path / "pw"), "exit@example.org"
        cfg.smtp_helo = "exit.example.org"
        cfg.validate()  # AUTH without TLS: allowed to a smarthost on loopback only
        disp = build_dispatcher(cfg.exit_policy, smtp_relay=cfg.smtp_relay, config=cfg)
        await disp.deliver(ExitMessage.make(mid(1), "smtp:u@example.org", b"x"))
        (env, _), *_ = sink.got
        assert env.mail_from == "exit@example.org" and seen == [(b"me", b"pw!")]
        assert b"From: exit@example.org\r\n" in env.original_content
        (tmp_path / "pw").write_text("wrong\n")
        disp = build_dispatcher(cfg.exit_policy, smtp_relay=cfg.smtp_relay, config=cfg)
        with pytest.raises(TemporaryFailure) as e:
            await disp.deliver(ExitMessage.make(mid(2), "smtp:u@example.org", b"x"))
        assert e.value.code == "smtp_auth_failed" and "wrong" not in str(e.value)
    # required STARTTLS from a server that offers none: temporary, nothing sent
    with smtp_sink() as (sink, port):
        h = SmtpHandler(relay=("127.0.0.1", port), starttls="required", timeout=5.0)
        with pytest.raises(TemporaryFailure) as e:
            await h.deliver(ExitMessage.make(mid(3), "smtp:u@example.org", b"x"))
        assert e.value.code == "smtp_no_starttls" and not sink.got


# ---- the end-of-data window -----------------------------------------------------------


async def test_on_commit_runs_before_the_final_dot_and_the_window_is_measured(tmp_path):
    """The commit hook runs after the content and before the final dot: the server
    has not taken the message yet. The window (dot to reply) is what the server
    takes to answer. The hook that does not send the dot itself leaves it to the
    handler."""
    for delay in (0.0, 1.0):
        with smtp_sink() as (sink, port):
            sink.delay = delay
            h = SmtpHandler(relay=("127.0.0.1", port), timeout=10.0)
            marks = []

            async def on_commit(end_of_data, marks=marks, sink=sink):
                marks.append((time.monotonic(), len(sink.got)))

            t0 = time.monotonic()
            await h.deliver(ExitMessage.make(mid(1), "smtp:u@example.org", b"x\n"), on_commit)
            done = time.monotonic()
        ((at, seen_then),) = marks
        (_, data_at), *_ = sink.got
        assert seen_then == 0 and at <= data_at <= done
        assert done - at >= delay
        print(
            f"server delay {delay:.1f} s: whole attempt {done - t0:.3f} s, window {done - at:.3f} s"
        )


async def test_end_of_data_sends_the_dot_at_once_from_the_commit_hook():
    """``end_of_data`` hands the server the final dot right where the hook calls it
    (the worker: right after its mark is written), while the hook has not
    returned and the delivery thread still waits; called twice, or followed by
    the handler's own rest, it sends one dot: one message, one reply."""
    with smtp_sink() as (sink, port):
        h = SmtpHandler(relay=("127.0.0.1", port), timeout=10.0)
        seen = []

        async def on_commit(end_of_data):
            before = len(sink.got)
            await trio.sleep(0.2)
            assert len(sink.got) == before  # no dot yet
            end_of_data()
            end_of_data()
            with trio.fail_after(20):
                while len(sink.got) == before:  # the server took it before the hook returned
                    await trio.sleep(0.01)
            seen.append(len(sink.got))

        with trio.fail_after(30):
            await h.deliver(ExitMessage.make(mid(1), "smtp:u@example.org", b"x\n"), on_commit)
            await h.deliver(ExitMessage.make(mid(2), "smtp:u@example.org", b"y\n"), on_commit)
    assert seen == [1, 2] and len(sink.got) == 2


def _worker(q, disp, **kw):
    return DeliveryWorker(q, disp, ack_when="delivered", **kw)


class Acks:
    def __init__(self):
        self.acks = []
        self.events = []

    async def send_ack(self, rb, ack):
        self.acks.append(ack)

    def on_event(self, ev):
        self.events.append(ev)


async def test_an_exit_restarted_inside_the_window_never_hands_the_message_over_again(tmp_path):
    """A crash after the commit point (simulated: the mark is left in the queue
    file) makes the next worker finish the message without an attempt."""
    with smtp_sink() as (sink, port):
        disp = Dispatcher(["smtp:*"], {"smtp": SmtpHandler(relay=("127.0.0.1", port))})
        with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
            msg = ExitMessage.make(mid(1), "smtp:u@example.org", b"x", b"rb")
            q.accept(msg, time.time())
            q.accept(ExitMessage.make(mid(2), "smtp:u@example.org", b"y", b"rb2"), time.time())
            assert q.committing(mid(1), time.time())
            assert [m.message_id for m in q.interrupted()] == [mid(1)]
        with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
            rec = Acks()
            w = _worker(q, disp, send_ack=rec.send_ack, on_event=rec.on_event)
            async with trio.open_nursery() as n:
                await n.start(w.run)
                with trio.fail_after(10):
                    while len(rec.acks) < 2:
                        await trio.sleep(0.02)
                n.cancel_scope.cancel()
            assert q.lookup(mid(1)) == (MessageState.DELIVERED, INTERRUPTED)
            assert q.lookup(mid(2)) == (MessageState.DELIVERED, "")
            assert {(a.message_id, a.reason) for a in rec.acks} == {
                (mid(1), INTERRUPTED),
                (mid(2), ""),
            }
            assert not q.interrupted()
    assert len(sink.got) == 1  # message 2 only


async def test_stale_messages_wait_for_an_answer_and_marks_stop_a_second_copy(tmp_path):
    """Nobody answering postpones a message from the saved queue; ``alone`` or an
    answer lets it go; an unanswered in-flight mark finishes it undelivered."""
    with smtp_sink() as (sink, port):
        disp = Dispatcher(["smtp:*"], {"smtp": SmtpHandler(relay=("127.0.0.1", port))})
        clock = [1000.0]
        verdicts: dict[bytes, Verdict] = {}
        asked = []

        async def check(keys, earlier):
            asked.append(keys[0])
            return verdicts.get(keys[0], Verdict())

        with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
            for n in (1, 2, 3, 4):
                q.accept(ExitMessage.make(mid(n), "smtp:u@example.org", b"%d" % n, b"rb"), 999)
            verdicts[notice_key(mid(2))] = Verdict(alone=True)
            verdicts[notice_key(mid(3))] = Verdict(answered=2)
            verdicts[notice_key(mid(4))] = Verdict(in_flight=(notice_key(mid(4)),), answered=1)
            rec = Acks()
            w = _worker(
                q,
                disp,
                send_ack=rec.send_ack,
                on_event=rec.on_event,
                clock=lambda: clock[0],
                check_delivered=check,
            )
            async with trio.open_nursery() as n:
                await n.start(w.run)  # every message predates this start: the saved queue
                with trio.fail_after(10):
                    while len(rec.acks) < 3 or "deferred" not in [e.kind for e in rec.events]:
                        await trio.sleep(0.02)
                n.cancel_scope.cancel()
            assert q.lookup(mid(1)) == (MessageState.PENDING, "")  # nobody answered: waits
            assert q.lookup(mid(4)) == (MessageState.DELIVERED, MAYBE_DELIVERED)
            acks = {a.message_id: a for a in rec.acks}
            assert acks[mid(4)].status is AckStatus.DELIVERED
            assert acks[mid(4)].reason == MAYBE_DELIVERED
            assert set(asked) == {notice_key(mid(n)) for n in (1, 2, 3, 4)}
    assert sorted(env.original_content.split(b"\r\n\r\n")[1] for env, _ in sink.got) == [
        b"2\r\n",
        b"3\r\n",
    ]


def test_policy_denied_tries_another_exit_then_fails():
    from overlay.core.outbox import Attempt, Outbox, State
    from overlay.crypto import SigningKey

    x1, x2 = (SigningKey.generate().node_id for _ in range(2))
    ob = Outbox()
    ob.add(mid(1), "maildir:inbox", b"x", 0)
    ob.sent(mid(1), [x1], x1, 0)
    out = ob.on_ack(mid(1), AckStatus.REJECTED, "policy_denied: this exit does not deliver", x1, 1)
    e = ob.get(mid(1))
    assert e.state is State.PENDING and x1 in e.exits_failed and out
    (a,) = [d for d in ob.tick(1) if isinstance(d, Attempt)]
    assert x1 in a.avoid and a.exit_hint is None  # another exit, please
    ob.sent(mid(1), [x2], x2, 1)
    ob.on_ack(mid(1), AckStatus.REJECTED, "policy_denied: not in policy", x2, 2)
    ob.give_up(mid(1), ob.get(mid(1)).reason, 3)  # the client found no exit left
    assert ob.get(mid(1)).state is State.FAILED
    # --flush: a queued message is resubmitted at the next tick
    ob.add(mid(2), "smtp:a@b.org", b"y", 0)
    ob.sent(mid(2), [x1], x1, 0)
    ob.on_ack(mid(2), AckStatus.QUEUED, "", x1, 1)
    assert not [d for d in ob.tick(2, {x1}) if isinstance(d, Attempt)]
    ob.due_now(2)
    (a,) = [d for d in ob.tick(2, {x1}) if isinstance(d, Attempt)]
    assert a.refresh and a.exit_hint == x1


def test_outbox_drop(tmp_path):
    from overlay.core.outbox import Entry
    from overlay.storage.outbox import OutboxStore

    with OutboxStore.in_home(tmp_path) as st:
        st.save(Entry(mid(0xABCDEF), "smtp:a@b.org", b"x", 0.0), durable=True)
    p = subprocess.run(
        [*OVERLAY, "outbox", "--home", str(tmp_path), "--drop", "0000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 64 and "8 hex digits" in p.stderr
    hexid = mid(0xABCDEF).hex()
    p = subprocess.run(
        [*OVERLAY, "outbox", "--home", str(tmp_path), "--drop", hexid[:12]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert p.returncode == 0 and f"dropped {hexid}" in p.stdout, p.stderr
    with OutboxStore.in_home(tmp_path) as st:
        assert st.load(unfinished_only=False) == []


async def test_an_attempt_stalled_before_the_end_of_data_asks_again_and_never_sends_the_dot(
    tmp_path,
):
    """An exit frozen or starved inside an attempt (here: its clock jumps 10 s while
    it talks to the mail server) asks the other exits again before it marks the
    message in flight and sends the final dot; one of them delivered the message
    meanwhile, so no mark goes out, the dot is never sent, the server drops the
    transaction, and the message ends delivered elsewhere. An attempt without a
    stall is not asked about."""
    from overlay.storage.delivery_queue import ELSEWHERE

    class Stalling:
        """The SMTP handler, with a stall (a clock jump) inside its first attempt."""

        def __init__(self, inner):
            self.inner = inner

        async def deliver(self, msg, on_commit=None):
            if msg.message_id == mid(1) and jump[0] == 0.0:
                jump[0] = 10.0
            await self.inner.deliver(msg, on_commit)

    with smtp_sink() as (sink, port):
        jump = [0.0]
        disp = Dispatcher(["smtp:*"], {"smtp": Stalling(SmtpHandler(relay=("127.0.0.1", port)))})
        base = 1000.0 - time.monotonic()

        def clock():
            return base + time.monotonic() + jump[0]

        asked = []

        async def check(keys, earlier):
            asked.append(keys[0])
            return Verdict(delivered=(notice_key(mid(1)),), answered=1)

        marked = []

        async def mark(key, earlier, ended, then):
            marked.append((key, ended))
            if then is not None:
                then()
            return 0

        with DeliveryQueue(tmp_path / "q.db", retry=FAST) as q:
            rec = Acks()
            w = _worker(
                q,
                disp,
                send_ack=rec.send_ack,
                on_event=rec.on_event,
                clock=clock,
                check_delivered=check,
                mark_in_flight=mark,
            )
            async with trio.open_nursery() as n:
                await n.start(w.run)
                q.accept(ExitMessage.make(mid(1), "smtp:u@example.org", b"one", b"rb"), clock())
                w.wake()
                with trio.fail_after(20):
                    while not rec.acks:
                        await trio.sleep(0.02)
                q.accept(ExitMessage.make(mid(2), "smtp:u@example.org", b"two", b"rb"), clock())
                w.wake()
                with trio.fail_after(20):
                    while len(rec.acks) < 2:
                        await trio.sleep(0.02)
                n.cancel_scope.cancel()
            assert q.lookup(mid(1)) == (MessageState.DELIVERED, ELSEWHERE)
            assert q.lookup(mid(2)) == (MessageState.DELIVERED, "")
            assert any(e.reason.startswith("superseded") for e in rec.events if e.kind == "retry")
            assert notice_key(mid(2)) not in asked
            assert (notice_key(mid(1)), False) not in marked  # no mark left behind
    assert [env.original_content.split(b"\r\n\r\n")[1] for env, _ in sink.got] == [b"two\r\n"]
