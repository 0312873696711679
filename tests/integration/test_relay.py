"""Relay protocol, exits and the light client on real nodes over loopback.

Multi-node tests are marked slow; the frame codec and the surb registry at the
top are plain unit tests.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path as FsPath

import pytest
import trio
from aiosmtpd.controller import Controller
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap.bundle import Entry, SeedBundle
from overlay.client import Client, State
from overlay.core.paths import Path
from overlay.crypto import NodeId, SigningKey
from overlay.errors import DecodeError, Reason
from overlay.exits import RetryPolicy
from overlay.net.framing import encode_frame, encode_uvarint
from overlay.net.host import Libp2pHost, StreamOpenTimeout
from overlay.onion import build_packet
from overlay.onion.params import LARGE, SMALL, Hop
from overlay.runtime import Node
from overlay.services.relay import RELAY_PROTOCOL, RelayService, SurbRegistry
from overlay.testing import (
    LOOPBACK,
    join_addr,
    light_client,
    light_services,
    make_home,
    overlay,
    wait_until,
)
from overlay.wire import relay as wire
from overlay.wire.delivery import ExitMessage

FAST_RETRY = RetryPolicy(base_delay=0.2, factor=2.0, max_delay=0.5, jitter=0.1)
BODY = (
    b"From: sender@example.org\r\nTo: alice@example.org\r\nSubject: via hydra\r\n"
    b"Message-ID: <1@example.org>\r\n\r\nexact bytes \xe2\x9c\x93 survive\r\n"
)


# ---- frames and registry (unit) ------------------------------------------------------


def test_client_frames_round_trip():
    pkt = bytes([SMALL.format]) + bytes(SMALL.packet_size - 1)
    big = bytes([LARGE.format]) + bytes(LARGE.packet_size - 1)
    nodes = (SigningKey(b"\x01" * 32).node_id, SigningKey(b"\x02" * 32).node_id)
    for f in (
        wire.Submit(pkt),
        wire.Submit(big),
        wire.Register((b"a" * 16, b"b" * 16)),
        wire.Reply(b"c" * 16, bytes(SMALL.payload_size)),
        wire.Reply(b"c" * 16, bytes(LARGE.payload_size)),
        wire.Dead(nodes),
        wire.Dead(()),
    ):
        assert wire.decode(wire.encode(f)) == f
    assert len(wire.encode(wire.Submit(big))) <= wire.MAX_SIZE


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", Reason.MALFORMED),
        (b"\x09abc", Reason.MALFORMED),
        (b"\x01" + bytes(100), Reason.MALFORMED),
        (b"\x01" + bytes([LARGE.format]) + bytes(SMALL.packet_size - 1), Reason.MALFORMED),
        (b"\x01" + bytes(LARGE.packet_size + 1), Reason.OVERSIZED),
        (b"\x02", Reason.MALFORMED),
        (b"\x02" + b"x" * 17, Reason.MALFORMED),
        (b"\x02" + b"x" * 16 * 65, Reason.MALFORMED),
        (b"\x03" + b"x" * 16 + b"y" * 100, Reason.MALFORMED),
        (b"\x04" + b"z" * 31, Reason.MALFORMED),
    ],
)
def test_client_frame_rejections_are_typed(data, reason):
    with pytest.raises(DecodeError) as e:
        wire.decode(data)
    assert e.value.reason is reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_give_a_frame_or_decode_error(data):
    try:
        f = wire.decode(data)
    except DecodeError:
        return
    assert wire.encode(f) == data


def test_reply_blocks():
    surb = bytes([SMALL.format]) + bytes(wire.SURB_SIZE - 1)
    two = wire.encode_reply_blocks(surb, surb)
    assert len(two) <= 1024
    assert wire.decode_reply_blocks(two) == wire.ReplyBlocks(surb, surb)
    assert wire.decode_reply_blocks(wire.encode_reply_blocks(surb)) == wire.ReplyBlocks(surb)
    assert wire.decode_reply_blocks(surb) == wire.ReplyBlocks(surb)  # a bare SURB
    for bad in (b"", b"\x80", b"\x81\x41x", b"\x83" + b"\x40" * 3, surb[:-1]):
        with pytest.raises(DecodeError):
            wire.decode_reply_blocks(bad)


class Sink:
    def __init__(self):
        self.got = []

    def push(self, surb_id, payload):
        self.got.append((surb_id, payload))
        return True


def test_surb_registry_routes_once_buffers_for_reconnects_and_expires():
    reg = SurbRegistry(ttl=10.0, max_per_session=3, max_buffered=1)
    a, b = Sink(), Sink()
    assert reg.register(a, [b"1" * 16, b"2" * 16], now=0.0) == []
    assert reg.route(b"1" * 16, b"p1", now=1.0) is a
    assert reg.route(b"1" * 16, b"again", now=1.0) is None  # single use
    assert reg.route(b"9" * 16, b"unknown", now=1.0) is None and not reg.knows(b"9" * 16)
    # the session goes away: a reply is kept until someone registers the id again
    reg.detach(a)
    assert reg.route(b"2" * 16, b"p2", now=2.0) is None
    assert reg.register(b, [b"2" * 16], now=3.0) == [(b"2" * 16, b"p2")]
    assert not reg.knows(b"2" * 16)
    # bounded per session: the oldest registration goes
    reg.register(b, [b"a" * 16, b"b" * 16, b"c" * 16, b"d" * 16], now=4.0)
    assert not reg.knows(b"a" * 16) and reg.knows(b"d" * 16)
    assert reg.expire(now=100.0) == 3 and len(reg) == 0


# ---- helpers for real nodes -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpSink:
    def __init__(self):
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 OK"

    def count(self, body: bytes) -> int:
        """Envelopes carrying ``body``: after the exit's headers, or (a message) its
        body part under headers rebuilt by the exit's header policy."""
        part = body.split(b"\r\n\r\n", 1)[-1]
        return sum(
            1
            for e in self.envelopes
            if e.original_content.endswith(b"\r\n\r\n" + body)
            or e.original_content.split(b"\r\n\r\n", 1)[-1] == part
        )


def smtp_server(port: int) -> tuple[SmtpSink, Controller]:
    sink = SmtpSink()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    return sink, ctl


def relays_for(port: int):
    def services(i, home):
        return [
            RelayService(smtp_relay=f"127.0.0.1:{port}", exit_retry=FAST_RETRY),
            *light_services(),
        ]

    return services


def metric(node: Node, name: str, **labels) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


def rejected(node: Node, reason: str, source: str = "relay") -> float:
    return metric(node, "hydra_relay_rejected_total", source=source, reason=reason)


def hop(node: Node) -> Hop:
    key = node.home.onion_key()
    return Hop(node.node_id, key.public, key.epoch)


async def settle(nodes, n: int, timeout: float = 30.0) -> None:
    await wait_until(lambda: all(len(x.view) >= n for x in nodes), timeout)


async def raw_relay_stream(host: Libp2pHost, node: Node):
    await host.connect(join_addr(node))
    return await host.open_stream(node.node_id.peer_id(), RELAY_PROTOCOL)


EIGHT = [["relay"]] * 6 + [["exit"]] * 2


# ---- real nodes -----------------------------------------------------------------------


@pytest.mark.slow
async def test_three_hops_to_smtp_replay_tamper_and_garbage(tmp_path):
    port = free_port()
    sink, ctl = smtp_server(port)
    try:
        async with overlay(
            tmp_path, 8, EIGHT, policy=["smtp:*"], services_for=relays_for(port)
        ) as nodes:
            await settle(nodes, 8)
            entry, relay, relay2, exit_ = nodes[0], nodes[1], nodes[2], nodes[6]
            async with light_client(tmp_path / "c", entry, timeout=2.0) as c:
                mid = await c.send("smtp:alice@example.org", BODY)
                got = await c.wait_acked(mid, 20)
                assert got.state is State.DELIVERED  # the ack reached the sender
                assert sink.count(BODY) == 1  # its body, once
                assert len(got.last_path) == 3 and got.last_path[0] == entry.node_id
                exits = {nodes[6].node_id, nodes[7].node_id}
                assert got.last_path[-1] in exits and got.exit in exits

                async with Libp2pHost(SigningKey.generate(), LOOPBACK, enable_dht=False) as h:
                    # replay: the same packet twice on one stream
                    pkt, _ = build_packet(SMALL, [hop(relay), hop(relay2)], b"replay me")
                    s = await raw_relay_stream(h, relay)
                    fwd = metric(relay, "hydra_relay_forwarded_total")
                    await s.write(encode_frame(pkt) + encode_frame(pkt))
                    await wait_until(lambda: rejected(relay, "replay") == 1, 10)
                    # (>=: other nodes' loop cover may pass through the relay meanwhile)
                    assert metric(relay, "hydra_relay_forwarded_total") >= fwd + 1
                    # tampered header: refused by the first hop
                    pkt, _ = build_packet(SMALL, [hop(relay), hop(exit_)], b"x")
                    bad = bytearray(pkt)
                    bad[100] ^= 1
                    await s.write(encode_frame(bytes(bad)))
                    await wait_until(lambda: rejected(relay, "bad_mac") == 1, 10)
                    # tampered payload: forwarded (no per-hop payload MAC), refused by the exit
                    bad = bytearray(pkt)
                    bad[-5] ^= 0x40
                    before = rejected(exit_, "bad_mac")
                    await s.write(encode_frame(bytes(bad)))
                    await wait_until(lambda: rejected(exit_, "bad_mac") == before + 1, 10)
                    # garbage: a frame of no packet size, then a huge length prefix
                    penalties = metric(relay, "hydra_peer_penalties_total", reason="malformed")
                    await s.write(encode_frame(os.urandom(100)))
                    await wait_until(lambda: rejected(relay, "malformed") >= 1, 10)
                    assert (
                        metric(relay, "hydra_peer_penalties_total", reason="malformed") > penalties
                    )
                    await s.write(encode_uvarint(1 << 40) + os.urandom(64))
                    await wait_until(lambda: rejected(relay, "oversized") == 1, 10)
                    assert await s.read() == b""  # the node closed that stream
                    # a non-minimal prefix on a fresh stream, then random noise on another
                    s2 = await h.open_stream(relay.node_id.peer_id(), RELAY_PROTOCOL)
                    await s2.write(b"\x85\x00")
                    await wait_until(lambda: rejected(relay, "non_canonical") == 1, 10)
                    s3 = await h.open_stream(relay.node_id.peer_id(), RELAY_PROTOCOL)
                    await s3.write(os.urandom(5000))
                    await s3.close()

                # the node is still fine: another message goes through it
                body2 = b"second message\r\n"
                c.fault_paths = _through(c, {relay.node_id})
                mid2 = await c.send("smtp:bob@example.org", body2)
                assert (await c.wait_acked(mid2, 20)).state is State.DELIVERED
                assert sink.count(body2) == 1
    finally:
        ctl.stop()


def _through(c: Client, relays: set[NodeId], first_only: set[bytes] = frozenset()):
    """A ``Client.fault_paths`` hook: the forward paths use one of ``relays`` in the
    middle (for the messages in ``first_only``: on their first attempt only)."""

    def paths(e, a, path, rf, rq):
        if e.message_id in first_only and e.attempts > 0:
            return path, rf, rq
        forced = c.view.get(sorted(relays, key=bytes)[0])
        if path.middle[0].node_id not in relays:
            path = Path((path.first, forced, path.last))
        return path, rf, rq

    return paths


@pytest.mark.slow
async def test_relay_killed_mid_stream_resent_through_another_path_once(tmp_path):
    port = free_port()
    sink, ctl = smtp_server(port)
    seven = [["relay"]] * 5 + [["exit"]] * 2
    try:
        async with overlay(
            tmp_path, 7, seven, policy=["smtp:*"], services_for=relays_for(port)
        ) as nodes:
            victim_home = make_home(tmp_path / "victim", ["relay"])
            stop, stopped = trio.Event(), trio.Event()

            async def run_victim(task_status=trio.TASK_STATUS_IGNORED):
                try:
                    async with Node(
                        victim_home, join=[join_addr(nodes[3])], services=[RelayService()]
                    ) as v:
                        task_status.started(v)
                        await stop.wait()
                finally:
                    stopped.set()

            async with trio.open_nursery() as bg:
                victim = await bg.start(run_victim)
                await settle([*nodes, victim], 8)
                async with light_client(tmp_path / "c", nodes[0], timeout=3.0) as c:
                    await wait_until(lambda: len(c.view) >= 8, 10)
                    two = os.urandom(16)
                    c.fault_paths = _through(c, {victim.node_id}, first_only={two})
                    # a first message through the victim: the entry's stream to it is open
                    one = await c.send("smtp:a@example.org", b"one\r\n")
                    assert (await c.wait_acked(one, 20)).state is State.DELIVERED
                    assert victim.node_id in c.status(one).last_path
                    # kill the relay, then send through it again
                    stop.set()
                    await stopped.wait()
                    await c.send("smtp:a@example.org", b"two\r\n", message_id=two)
                    got = await c.wait_acked(two, 30)
            assert got.state is State.DELIVERED
            assert got.attempts >= 2 and victim.node_id not in got.last_path
            assert sink.count(b"one\r\n") == 1 and sink.count(b"two\r\n") == 1
            dropped = sum(metric(n, "hydra_relay_dropped_total", why="unreachable") for n in nodes)
            assert dropped >= 1
    finally:
        ctl.stop()


@pytest.mark.slow
async def test_destination_down_then_back_delivered_once_and_cli(tmp_path):
    port = free_port()  # nothing listens there yet
    five = [["relay"]] * 4 + [["exit"]]
    ctl = None
    try:
        async with overlay(
            tmp_path, 5, five, policy=["smtp:*"], services_for=relays_for(port)
        ) as nodes:
            await settle(nodes, 5)
            exit_ = nodes[4]
            async with light_client(tmp_path / "c", nodes[0], timeout=1.5) as c:
                mid = await c.send("smtp:alice@example.org", BODY)
                queued = await c.wait_acked(mid, 15, until="queued")
                assert queued.state is State.QUEUED and queued.queued_at == exit_.node_id
                await trio.sleep(1.5)  # the exit retries against a closed port meanwhile
                sink, ctl = smtp_server(port)
                got = await c.wait_acked(mid, 20)
                assert got.state is State.DELIVERED
            assert sink.count(BODY) == 1

            # the command line, in a separate process: send reads stdin, outbox lists
            home = tmp_path / "cli"
            proc = await _cli(
                [
                    "send",
                    "--home",
                    str(home),
                    "--via",
                    join_addr(nodes[1]),
                    "--to",
                    "smtp:bob@example.org",
                    "--timeout",
                    "20",
                    "--json",
                ],
                stdin=b"from the command line\r\n",
            )
            assert proc.returncode == 0, proc.stderr.decode()
            out = json.loads(proc.stdout)
            assert out["state"] == "delivered"
            assert sink.count(b"from the command line\r\n") == 1
            proc = await _cli(["outbox", "--home", str(home), "--all", "--json"])
            assert proc.returncode == 0, proc.stderr.decode()
            rows = json.loads(proc.stdout)["messages"]
            assert [r["state"] for r in rows] == ["delivered"]
            assert rows[0]["message_id"] == out["message_id"]
            # entering through a signed seed bundle instead of --via
            op = SigningKey.generate()
            now = int(time.time())
            bundle = SeedBundle.create(
                seq=1,
                issued_at=now - 60,
                expires_at=now + 3600,
                entries=[Entry(nodes[2].node_id, (join_addr(nodes[2]),))],
                operators=[op.node_id],
                threshold=1,
            ).signed_by(op)
            (tmp_path / "seeds.cbor").write_bytes(bundle.encode())
            proc = await _cli(
                [
                    "send",
                    "--home",
                    str(home),
                    "--seeds",
                    str(tmp_path / "seeds.cbor"),
                    "--operator",
                    op.node_id.hex(),
                    "--to",
                    "smtp:carol@example.org",
                    "--file",
                    str(tmp_path / "seeds.cbor"),
                    "--until",
                    "queued",
                    "--json",
                ],
            )
            assert proc.returncode == 0, proc.stderr.decode()
            assert json.loads(proc.stdout)["state"] in ("queued", "delivered")
    finally:
        if ctl is not None:
            ctl.stop()


@pytest.mark.slow
async def test_queued_exit_taken_down_message_moves_to_another_exit_once(tmp_path):
    """Queued at exit X while the destination is down; X is killed (no tombstone):
    the entry's liveness reports it dead, the client resends through exit Y,
    which delivers once when the destination is back."""
    port = free_port()
    five = [["relay"]] * 4 + [["exit"]]
    ctl = None
    try:
        async with overlay(
            tmp_path, 5, five, policy=["smtp:*"], services_for=relays_for(port)
        ) as nodes:
            x_home = make_home(tmp_path / "x", ["exit"], policy=["smtp:*"])
            stop, stopped = trio.Event(), trio.Event()

            async def run_x(task_status=trio.TASK_STATUS_IGNORED):
                try:
                    services = relays_for(port)(5, x_home)
                    async with Node(x_home, join=[join_addr(nodes[1])], services=services) as x:
                        task_status.started(x)
                        await stop.wait()
                finally:
                    stopped.set()

            async with trio.open_nursery() as bg:
                x = await bg.start(run_x)
                await settle([*nodes, x], 6)
                async with light_client(tmp_path / "c", nodes[0], timeout=2.0) as c:
                    await wait_until(lambda: len(c.view) >= 6, 10)

                    def first_to_x(e, a, path, rf, rq):
                        if e.attempts == 0:
                            path = Path((*path.hops[:-1], c.view.get(x.node_id)))
                        return path, rf, rq

                    c.fault_paths = first_to_x
                    mid = await c.send("smtp:alice@example.org", BODY)
                    got = await c.wait_acked(mid, 15, until="queued")
                    assert got.queued_at == x.node_id
                    stop.set()  # X is taken down with the message in its queue
                    await stopped.wait()
                    await wait_until(lambda: x.node_id in c.dead, 30)
                    await wait_until(lambda: c.status(mid).queued_at == nodes[4].node_id, 20)
                    sink, ctl = smtp_server(port)
                    got = await c.wait_acked(mid, 20)
            assert got.state is State.DELIVERED and got.exit == nodes[4].node_id
            assert x.node_id in got.exits_failed
            assert sink.count(BODY) == 1
    finally:
        if ctl is not None:
            ctl.stop()


_CLI = (
    "import typer\n"
    "from overlay.cli.send import outbox, send\n"
    "app = typer.Typer()\n"
    "app.command()(send)\n"
    "app.command()(outbox)\n"
    "app()\n"
)


async def _cli(args: list[str], stdin: bytes = b""):
    return await trio.run_process(
        [sys.executable, "-c", _CLI, *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=str(FsPath(__file__).resolve().parents[2]),
    )


@pytest.mark.slow
async def test_replay_refused_after_restart(tmp_path):
    home = make_home(tmp_path / "a", ["relay"])
    msg = ExitMessage.make(b"r" * 16, "smtp:a@example.org", b"one hop").encode()
    pkt, _ = build_packet(SMALL, [hop_of(home)], msg)
    async with Libp2pHost(SigningKey.generate(), LOOPBACK, enable_dht=False) as h:
        async with Node(home, services=[RelayService()]) as a:
            s = await raw_relay_stream(h, a)
            await s.write(encode_frame(pkt))
            # it opened (and was refused: this node is no exit); its tag is stored
            await wait_until(lambda: rejected(a, "not_exit", "exit") == 1, 10)
            await s.close()
        async with Node(home, services=[RelayService()]) as a:
            s = await raw_relay_stream(h, a)
            await s.write(encode_frame(pkt))
            await wait_until(lambda: rejected(a, "replay") == 1, 10)
            assert rejected(a, "not_exit", "exit") == 0


def hop_of(home) -> Hop:
    key = home.onion_key()
    return Hop(home.signing_key().node_id, key.public, key.epoch)


@pytest.mark.slow
async def test_non_exit_answers_not_exit_and_client_moves_on(tmp_path):
    """A SURB ack from a node that stopped being an exit sends the client elsewhere."""
    port = free_port()
    sink, ctl = smtp_server(port)
    five = [["relay"]] * 3 + [["exit"]] * 2
    try:
        async with overlay(
            tmp_path, 5, five, policy=["smtp:*"], services_for=relays_for(port)
        ) as nodes:
            await settle(nodes, 5)
            stale = nodes[3]
            async with light_client(tmp_path / "c", nodes[0], timeout=3.0) as c:
                # the first pull can be cut short on a busy machine; later rounds fill in
                await wait_until(lambda: c.view.get(stale.node_id) is not None, 60)
                # the exit steps down locally, its record still says exit
                from overlay.records import Role

                stale.roles = Role.RELAY

                def first_to_stale(e, a, path, rf, rq):
                    if e.attempts == 0:
                        path = Path((*path.hops[:-1], c.view.get(stale.node_id)))
                    return path, rf, rq

                c.fault_paths = first_to_stale
                mid = await c.send("smtp:x@example.org", b"move on\r\n")
                got = await c.wait_acked(mid, 20)
            assert got.state is State.DELIVERED and got.exit == nodes[4].node_id
            assert stale.node_id in got.exits_failed
            assert rejected(stale, "not_exit", "exit") == 1
            assert sink.count(b"move on\r\n") == 1
    finally:
        ctl.stop()


async def test_a_hung_relay_stream_is_redialled_after_a_trim_not_a_crash(tmp_path):
    """A relay stream that does not open in time drops the connection and dials
    afresh; the drop is a trim, so the next hop (maybe only slow) does not take
    it for our crash and rush to probe us."""
    services = []

    def with_relay(i, home):
        services.append(RelayService())
        return [services[-1], *light_services()]

    async with overlay(tmp_path, 3, services_for=with_relay) as nodes:
        await wait_until(lambda: all(len(n.view) == 3 for n in nodes), 30)
        a, b = nodes[0], nodes[1]
        relay = services[0]
        await a.host.connect(b.host.listen_addrs()[0])
        heard: list[tuple[str, bool]] = []
        b.host.on_disconnect(lambda pid, trimmed: heard.append((pid, trimmed)))
        real_open = a.host.open_stream
        hangs = []

        async def open_stream(peer_id, protocol, **kw):
            if protocol == RELAY_PROTOCOL and not hangs:
                hangs.append(peer_id)
                raise StreamOpenTimeout(f"{protocol} to {peer_id} did not open")
            return await real_open(peer_id, protocol, **kw)

        a.host.open_stream = open_stream
        relay.forward(b.node_id, os.urandom(64), now=a.clock())
        a_pid = a.node_id.peer_id()
        await wait_until(lambda: any(pid == a_pid for pid, _ in heard), 30)
        assert hangs == [b.node_id.peer_id()]
        assert [t for pid, t in heard if pid == a_pid][0] is True
        assert metric(a, "hydra_relay_reconnects_total") == 1
        await wait_until(lambda: b.node_id in a.connected(), 30)  # dialled afresh
