"""Real libp2p hosts on 127.0.0.1: the adapter's behaviour and each workaround.

Tests named ``test_upstream_*`` are canaries: they show the py-libp2p 0.8.1
behaviour a workaround in ``overlay/net/`` exists for. When one starts
failing, upstream has changed and the matching workaround can probably go.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import libp2p.network.swarm as libp2p_swarm
import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
from libp2p.tools.anyio_service import background_trio_service

from overlay.crypto import SigningKey
from overlay.errors import DecodeError, LocalError, Reason
from overlay.net import (
    DialError,
    DialTimeout,
    FrameDecoder,
    FrameReader,
    GossipMessage,
    Libp2pHost,
    StreamBroken,
    StreamLimitReached,
    StreamOpenError,
    encode_frame,
    encode_uvarint,
    read_exactly,
    read_frame,
    upstream,
    write_frame,
)
from overlay.net.upstream import new_gossipsub, upgrade_deadline
from overlay.testing import silent_listener

TCP = "/ip4/127.0.0.1/tcp/0"
QUIC = "/ip4/127.0.0.1/udp/0/quic-v1"
WS = "/ip4/127.0.0.1/tcp/0/ws"
ECHO = "/hydra-test/echo/1.0.0"


@pytest.fixture(autouse=True)
def _quiet_libp2p() -> None:
    # libp2p logs expected failures (refused dials, resets) at ERROR level.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def make_host(listen: list[str] | None = None, **kw) -> Libp2pHost:
    kw.setdefault("dial_timeout", 3.0)
    return Libp2pHost(SigningKey.generate(), listen or [TCP], **kw)


@contextlib.asynccontextmanager
async def running(*hosts: Libp2pHost) -> AsyncIterator[tuple[Libp2pHost, ...]]:
    async with contextlib.AsyncExitStack() as stack:
        for h in hosts:
            await stack.enter_async_context(h)
        yield hosts


def addr_of(host: Libp2pHost, marker: str) -> str:
    """First listen address of ``host`` whose transport part matches ``marker``."""
    for a in host.listen_addrs():
        parts = a.split("/")
        if marker == "tcp" and "tcp" in parts and "ws" not in parts:
            return a
        if marker != "tcp" and marker in parts:
            return a
    raise AssertionError(f"no {marker} address in {host.listen_addrs()}")


def conn_layers(host: Libp2pHost, peer_id: str) -> list[list[str]]:
    """Class names down each connection to ``peer_id``: SwarmConn -> muxer -> security -> raw."""
    out = []
    for conn in host._swarm.connections.get(ID.from_base58(peer_id), []):
        chain, x = [], conn
        for _ in range(10):
            if x is None:
                break
            chain.append(type(x).__name__)
            nxt = None
            for attr in ("muxed_conn", "secured_conn", "conn", "stream", "read_write_closer"):
                cand = getattr(x, attr, None)
                if cand is not None and cand is not x:
                    nxt = cand
                    break
            x = nxt
        out.append(chain)
    return out


async def echo_handler(stream, remote_peer_id: str) -> None:
    async for frame in FrameReader(stream):
        await write_frame(stream, frame)


async def wait_until(pred, timeout: float = 10.0, step: float = 0.05) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(step)


def raw_key_pair():
    return create_new_key_pair(os.urandom(32))


@contextlib.asynccontextmanager
async def raw_host(**kw):
    """An unmodified py-libp2p host (for canaries and hostile dialers)."""
    kp = kw.pop("key_pair", None) or raw_key_pair()
    listen = [multiaddr.Multiaddr(TCP)]
    h = new_host(key_pair=kp, listen_addrs=listen, **kw)
    async with h.run(listen):
        try:
            yield h
        finally:
            await h.close()


def count_tasks() -> int:
    def walk(task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


# ---- identity, transports, streams ---------------------------------------------


async def test_peer_id_is_the_signing_key() -> None:
    key = SigningKey.generate()
    host = Libp2pHost(key, [TCP])
    assert host.peer_id == key.node_id.peer_id()
    async with host:
        assert str(host._host.get_id()) == key.node_id.peer_id()
        (addr,) = host.listen_addrs()
        assert addr.endswith(f"/p2p/{key.node_id.peer_id()}")
        assert "/tcp/0/" not in addr  # the real port, not the requested 0


@pytest.mark.parametrize(
    ("listen", "marker", "bottom"),
    [
        (TCP, "tcp", "SocketStream"),
        (QUIC, "quic-v1", "QUICConnection"),
        (WS, "ws", "P2PWebSocketConnection"),
    ],
)
async def test_connect_and_echo_over_each_transport(listen: str, marker: str, bottom: str) -> None:
    a, b = make_host([TCP, QUIC, WS]), make_host([listen])
    async with running(a, b):
        b.set_stream_handler(ECHO, echo_handler)
        pid = await a.connect(addr_of(b, marker))
        assert pid == b.peer_id
        assert b.peer_id in a.connected_peers()
        (layers,) = conn_layers(a, b.peer_id)
        assert layers[-1] == bottom
        if marker != "quic-v1":  # QUIC has its own TLS 1.3 and streams
            assert layers[1:4] == ["Yamux", "SecureSession", "NoiseTransportReadWriter"]
        async with await a.open_stream(b.peer_id, ECHO) as s:
            reader = FrameReader(s)
            for payload in (b"", b"hello", os.urandom(50_000)):
                await write_frame(s, payload)
                assert await reader.read_frame() == payload
        await a.disconnect(b.peer_id)
        assert b.peer_id not in a.connected_peers()


async def test_one_peer_over_several_transports() -> None:
    a, b = make_host([TCP]), make_host([TCP, QUIC, WS])
    async with running(a, b):
        for marker in ("tcp", "quic-v1", "ws"):
            await a.connect(addr_of(b, marker), reuse=False)
        bottoms = sorted(chain[-1] for chain in conn_layers(a, b.peer_id))
        assert bottoms == ["P2PWebSocketConnection", "QUICConnection", "SocketStream"]


async def test_disconnect_listeners_hear_a_peer_that_goes_away() -> None:
    a, b = make_host([TCP]), make_host([TCP])
    gone: list[tuple[str, bool]] = []
    a.on_disconnect(lambda peer, trimmed: gone.append((peer, trimmed)))
    a.on_disconnect(lambda peer, trimmed: 1 / 0)  # a broken listener is logged, not fatal
    async with a:
        async with b:
            await a.connect(addr_of(b, "tcp"))
            assert gone == []
        with trio.fail_after(10):  # b stopped: its sockets closed, a notices
            while (b.peer_id, False) not in gone:
                await trio.sleep(0.02)
        assert b.peer_id not in a.connected_peers()


async def test_trimmed_connection_is_told_apart() -> None:
    """``trim`` closes a connection with the "no longer needed" notice: both ends'
    listeners hear ``trimmed``, while a plain close (and a stopped peer, above)
    is not a trim. ``stream_protocols`` shows what is open on a connection."""
    a, b = make_host([TCP]), make_host([TCP])
    heard_a: list[tuple[str, bool]] = []
    heard_b: list[tuple[str, bool]] = []
    a.on_disconnect(lambda peer, trimmed: heard_a.append((peer, trimmed)))
    b.on_disconnect(lambda peer, trimmed: heard_b.append((peer, trimmed)))
    async with running(a, b):
        b.set_stream_handler(ECHO, echo_handler)
        assert a.stream_protocols(b.peer_id) == []
        await a.connect(addr_of(b, "tcp"))
        async with await a.open_stream(b.peer_id, ECHO) as s:
            reader = FrameReader(s)
            await write_frame(s, b"hello")
            assert await reader.read_frame() == b"hello"
            assert ECHO in a.stream_protocols(b.peer_id)
        assert await a.trim(b.peer_id) == 1
        with trio.fail_after(10):
            while (a.peer_id, True) not in heard_b or (b.peer_id, True) not in heard_a:
                await trio.sleep(0.02)
        assert b.peer_id not in a.connected_peers()
        assert await a.trim(b.peer_id) == 0  # nothing left to close
        # a plain close is not a trim, at either end
        await a.connect(addr_of(b, "tcp"))
        await a.disconnect(b.peer_id)
        with trio.fail_after(10):
            while (a.peer_id, False) not in heard_b:
                await trio.sleep(0.02)
        assert (b.peer_id, False) in heard_a


async def test_reads_from_counts_authenticated_reads() -> None:
    """``reads_from`` grows when the peer sends us something, stays put while it
    is silent, and is None without a connection (the liveness probes' ``heard``)."""
    a, b = make_host([TCP]), make_host([TCP])
    async with running(a, b):
        b.set_stream_handler(ECHO, echo_handler)
        assert a.reads_from(b.peer_id) is None
        assert a.reads_from("not a peer id") is None
        await a.connect(addr_of(b, "tcp"))
        async with await a.open_stream(b.peer_id, ECHO) as s:
            reader = FrameReader(s)
            await write_frame(s, b"hello")
            assert await reader.read_frame() == b"hello"
            await trio.sleep(0.5)  # whatever else was under way has been read
            before = a.reads_from(b.peer_id)
            assert before is not None
            await trio.sleep(0.5)
            assert a.reads_from(b.peer_id) == before  # b said nothing meanwhile
            await write_frame(s, b"again")
            assert await reader.read_frame() == b"again"
            assert a.reads_from(b.peer_id) > before
        await a.disconnect(b.peer_id)
        assert a.reads_from(b.peer_id) is None


async def test_handshakes_with_counts_completed_handshakes() -> None:
    """``handshakes_with`` grows at both ends with each secured connection, also a
    further one to a peer already connected, and stays when connections close
    (the liveness probes' ``secured``)."""
    a, b = make_host([TCP]), make_host([TCP])
    async with running(a, b):
        assert a.handshakes_with(b.peer_id) == 0
        assert a.handshakes_with("not a peer id") == 0
        await a.connect(addr_of(b, "tcp"))
        await wait_until(lambda: b.handshakes_with(a.peer_id) == 1, 10)
        assert a.handshakes_with(b.peer_id) == 1
        await a.connect(addr_of(b, "tcp"), reuse=False)
        assert a.handshakes_with(b.peer_id) == 2
        await a.disconnect(b.peer_id)
        assert a.handshakes_with(b.peer_id) == 2


async def test_dials_answered_counts_accepted_dials() -> None:
    """``dials_answered`` grows when the peer's address accepts our TCP connection
    (here a listener that accepts and stays silent: the dial itself then times
    out) and not when the port refuses it (the liveness probes' ``answered``: a
    crashed process refuses)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    silent = SigningKey.generate().node_id.peer_id()
    a = make_host(dial_timeout=2.0)
    async with a, trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda s: trio.sleep_forever(), listeners)
        assert a.dials_answered(silent) == 0 and a.dials_answered("not a peer id") == 0
        with trio.fail_after(60), pytest.raises(DialError):
            await a.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{silent}")
        assert a.dials_answered(silent) >= 1
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        refused = sock.getsockname()[1]
        sock.close()
        gone = SigningKey.generate().node_id.peer_id()
        with trio.fail_after(60), pytest.raises(DialError):
            await a.connect(f"/ip4/127.0.0.1/tcp/{refused}/p2p/{gone}")
        assert a.dials_answered(gone) == 0
        nursery.cancel_scope.cancel()


def test_per_peer_counts_forget_the_least_recently_counted_peer(monkeypatch) -> None:
    """Handshake and answered-dial counts hold at most ``MAX_COUNTED_PEERS``
    peers (many identities cannot grow them); a peer counted again is newest."""
    monkeypatch.setattr(upstream, "MAX_COUNTED_PEERS", 3)
    swarm = SimpleNamespace()
    for i in range(5):
        upstream.note_answer(swarm, f"p{i}")
        upstream.note_handshake(swarm, f"p{i}")
    upstream.note_answer(swarm, "p2")
    upstream.note_answer(swarm, "p5")
    assert list(swarm.hydra_answers) == ["p4", "p2", "p5"]
    assert [upstream.answers_from(swarm, p) for p in ("p2", "p3", "p5")] == [2, 0, 1]
    assert list(swarm.hydra_handshakes) == ["p2", "p3", "p4"]


async def test_connect_rejects_bad_input() -> None:
    a = make_host()
    async with a:
        with pytest.raises(LocalError):
            await a.connect("/ip4/127.0.0.1/tcp/1")  # no /p2p/
        with pytest.raises(LocalError):
            await a.connect("not a multiaddr")
        with pytest.raises(LocalError):
            await a.connect(a.listen_addrs()[0])  # ourselves


async def test_dial_wrong_peer_id_fails() -> None:
    a, b = make_host(), make_host()
    async with running(a, b):
        wrong = SigningKey.generate().node_id.peer_id()
        addr = b.listen_addrs()[0].replace(b.peer_id, wrong)
        with pytest.raises(DialError):
            await a.connect(addr)


async def test_dial_refused_port_fails_fast() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    a = make_host(dial_timeout=120.0)
    async with a:
        with trio.fail_after(60), pytest.raises(DialError) as info:
            await a.connect(
                f"/ip4/127.0.0.1/tcp/{port}/p2p/{SigningKey.generate().node_id.peer_id()}"
            )
        # the refusal itself ends the dial: a retry loop inside the adapter would
        # keep dialing until the (long) dial timeout
        assert not isinstance(info.value, DialTimeout)


async def test_a_long_dial_lifts_the_upgrade_deadline_for_its_time() -> None:
    """WORKAROUND (upgrade deadline): upstream bounds each upgrade step of every
    dial by one ``outbound_upgrade_timeout`` (our dial_timeout), so a join's
    longer dial would still lose a saturated peer's handshake at 5 s; while a
    dial with a longer timeout runs, the bound is that timeout, then it is back."""
    a = make_host(dial_timeout=1.0)
    seen = []
    async with silent_listener() as (where, held), trio.open_nursery() as nursery, a:
        cfg = a._swarm.connection_config
        assert cfg.outbound_upgrade_timeout == 1.0

        async def watch() -> None:
            await wait_until(lambda: held, 10)
            seen.append(cfg.outbound_upgrade_timeout)

        nursery.start_soon(watch)
        addr = f"{where}/p2p/{SigningKey.generate().node_id.peer_id()}"
        with trio.fail_after(60), pytest.raises(DialTimeout):
            await a.connect(addr, timeout=3.0)
        assert seen == [3.0]  # while the long dial ran
        assert cfg.outbound_upgrade_timeout == 1.0  # and back after it
        with trio.fail_after(60), pytest.raises(DialTimeout):
            await a.connect(addr)  # an ordinary dial changes nothing
        assert cfg.outbound_upgrade_timeout == 1.0
    # overlapping long dials: the longest one's bound, until the last ends
    swarm = SimpleNamespace(connection_config=SimpleNamespace(outbound_upgrade_timeout=5.0))
    with upgrade_deadline(swarm, 10.0):
        with upgrade_deadline(swarm, 30.0):
            assert swarm.connection_config.outbound_upgrade_timeout == 30.0
        assert swarm.connection_config.outbound_upgrade_timeout == 10.0
    assert swarm.connection_config.outbound_upgrade_timeout == 5.0


async def test_dial_to_silent_listener_times_out() -> None:
    """WORKAROUND (dial hangs): a peer that accepts TCP but never speaks costs dial_timeout."""
    a = make_host(dial_timeout=1.0)
    async with silent_listener() as (where, held), a:
        start = time.monotonic()
        # upstream the dial waits forever; a generous bound tells the two apart
        with trio.fail_after(60), pytest.raises(DialTimeout):
            await a.connect(f"{where}/p2p/{SigningKey.generate().node_id.peer_id()}")
        assert time.monotonic() - start >= 0.9  # it did wait for the dial timeout
        assert held, "the silent listener did accept the TCP connection"
        # The host is still healthy afterwards.
        b = make_host()
        async with b:
            assert await a.connect(b.listen_addrs()[0]) == b.peer_id


async def _dial_via_peerstore(a: Libp2pHost, b: Libp2pHost) -> None:
    """Dial ``b`` the way libp2p does internally (Swarm.dial_peer from the peerstore)."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(b.listen_addrs()[0]))
    a._host.get_peerstore().add_addrs(info.peer_id, info.addrs, 60)
    await a._swarm.dial_peer(info.peer_id)


async def test_connect_is_fast() -> None:
    """WORKAROUND (happy eyeballs): libp2p's internal dials (DHT, open_stream) are not delayed.

    No stopwatch (a busy machine makes any dial slow): upstream waits the delay out
    even after the dial succeeded, so with a delay of an hour its dial never returns,
    while ours (no delay) does."""
    assert libp2p_swarm._HAPPY_EYEBALLS_DELAY == 0
    a, b, c = make_host(), make_host(), make_host()
    async with running(a, b, c):
        with trio.fail_after(60):
            await _dial_via_peerstore(a, b)
        assert b.peer_id in a.connected_peers()
        libp2p_swarm._HAPPY_EYEBALLS_DELAY = 3600.0
        try:
            with trio.move_on_after(2) as waited:
                await _dial_via_peerstore(a, c)
        finally:
            libp2p_swarm._HAPPY_EYEBALLS_DELAY = 0.0
        assert waited.cancelled_caught, "upstream no longer waits out its dial delay"


def test_upstream_happy_eyeballs_delay_is_250ms() -> None:
    from overlay.net.host import UPSTREAM_HAPPY_EYEBALLS_DELAY

    assert UPSTREAM_HAPPY_EYEBALLS_DELAY == 0.25


# ---- sender records ------------------------------------------------------------


def _sender_record_rpc(host):
    from libp2p.peer.peerstore import issue_and_cache_local_record
    from libp2p.pubsub.pb import rpc_pb2

    return rpc_pb2.RPC(senderRecord=issue_and_cache_local_record(host))


def _count_envelope_checks(monkeypatch, utils=None) -> list[int]:
    """Count upstream's envelope verifications in ``utils`` (default: pubsub's)."""
    if utils is None:
        import libp2p.pubsub.utils as utils

    calls = [0]
    real = utils.consume_envelope

    def counting(data, domain):
        calls[0] += 1
        return real(data, domain)

    monkeypatch.setattr(utils, "consume_envelope", counting)
    return calls


def test_sender_record_is_verified_once_per_peer(monkeypatch) -> None:
    """WORKAROUND (sender records): the same record bytes from the same peer are
    verified once per receiving host; another peer's record, a forgery or
    another receiver goes through upstream's checks again."""
    import libp2p.pubsub.gossipsub as gossipsub_module
    import libp2p.pubsub.pubsub as pubsub_module

    consume = pubsub_module.maybe_consume_signed_record
    assert gossipsub_module.maybe_consume_signed_record is consume  # both readers patched
    calls = _count_envelope_checks(monkeypatch)
    sender, other, receiver, receiver2 = new_host(), new_host(), new_host(), new_host()
    rpc = _sender_record_rpc(sender)
    for _ in range(5):
        assert consume(rpc, receiver, sender.get_id())
    assert calls[0] == 1
    assert consume(rpc, receiver2, sender.get_id())  # another node in the same process
    assert calls[0] == 2
    # the record claims to be sender's but arrives from other: refused, every time
    for _ in range(3):
        assert not consume(rpc, receiver, other.get_id())
    assert calls[0] == 5
    # a tampered record is refused even from the peer whose record was cached
    forged = _sender_record_rpc(sender)
    raw = bytearray(forged.senderRecord)
    raw[-1] ^= 1
    forged.senderRecord = bytes(raw)
    assert not consume(forged, receiver, sender.get_id())
    # and the cached one still passes without another check
    before = calls[0]
    assert consume(rpc, receiver, sender.get_id())
    assert calls[0] == before


def test_dht_peer_records_are_verified_once(monkeypatch) -> None:
    """WORKAROUND (DHT peer records): a sender's record and the records of peers
    listed in an answer are verified once per receiving host; a record listed
    under another peer's id, a forgery or another receiver is checked again."""
    import libp2p.kad_dht.peer_routing as routing_module
    import libp2p.kad_dht.utils as kad_utils
    from libp2p.kad_dht.pb.kademlia_pb2 import Message

    from overlay.net.upstream import UPSTREAM_CONSUME_DHT_RECORD

    consume = routing_module.maybe_consume_signed_record
    assert consume is not UPSTREAM_CONSUME_DHT_RECORD
    calls = _count_envelope_checks(monkeypatch, kad_utils)
    sender, listed, receiver, receiver2 = new_host(), new_host(), new_host(), new_host()
    message = Message(senderRecord=_sender_record_rpc(sender).senderRecord)
    peer = Message.Peer(
        id=listed.get_id().to_bytes(), signedRecord=_sender_record_rpc(listed).senderRecord
    )
    for _ in range(5):
        assert consume(message, receiver, sender.get_id())
        assert consume(peer, receiver)
    assert calls[0] == 2
    assert consume(peer, receiver2)  # another node in the same process
    assert calls[0] == 3
    # the listed record under another peer's id: refused, every time
    liar = Message.Peer(id=sender.get_id().to_bytes(), signedRecord=peer.signedRecord)
    for _ in range(3):
        assert not consume(liar, receiver)
    assert not consume(message, receiver, listed.get_id())  # sender's record from listed
    assert calls[0] == 7
    # the last byte flipped (set to a fixed value, it is unchanged 1 time in 256)
    raw = message.senderRecord
    forged = Message(senderRecord=raw[:-1] + bytes([raw[-1] ^ 1]))
    assert not consume(forged, receiver, sender.get_id())
    before = calls[0]
    assert consume(message, receiver, sender.get_id())  # the cached one still passes
    assert calls[0] == before
    # upstream itself checks every time
    for _ in range(2):
        assert UPSTREAM_CONSUME_DHT_RECORD(peer, receiver)
    assert calls[0] == before + 2


def test_own_sender_record_is_built_once_per_ttl(monkeypatch) -> None:
    """WORKAROUND (own sender record): the signed record a host attaches to what it
    sends is looked up (addresses rebuilt) once per OWN_RECORD_TTL, not per RPC."""
    import libp2p.kad_dht.kad_dht as kad_module
    import libp2p.pubsub.gossipsub as gossipsub_module

    from overlay.net import upstream

    clock = [1000.0]
    monkeypatch.setattr(upstream.time, "monotonic", lambda: clock[0])
    calls = [0]
    real = upstream.UPSTREAM_ENV_TO_SEND

    def counting(host):
        calls[0] += 1
        return real(host)

    monkeypatch.setattr(upstream, "UPSTREAM_ENV_TO_SEND", counting)
    host, other = new_host(), new_host()
    env = gossipsub_module.env_to_send_in_RPC
    assert kad_module.env_to_send_in_RPC is env
    first, _ = env(host)
    for _ in range(10):
        assert env(host)[0] == first
    assert calls[0] == 1
    assert env(other)[0] != first  # per host
    clock[0] += upstream.OWN_RECORD_TTL + 0.1
    assert env(host)[0] == first  # looked up again: same addresses, same record
    assert calls[0] == 3


def test_upstream_verifies_the_sender_record_of_every_rpc(monkeypatch) -> None:
    from overlay.net.upstream import UPSTREAM_CONSUME_SENDER_RECORD

    calls = _count_envelope_checks(monkeypatch)
    sender, receiver = new_host(), new_host()
    rpc = _sender_record_rpc(sender)
    for _ in range(3):
        assert UPSTREAM_CONSUME_SENDER_RECORD(rpc, receiver, sender.get_id())
    assert calls[0] == 3, "upstream no longer re-verifies a known sender record"


async def _credits_for_reading(total: int, size: int) -> list[int]:
    """Send ``total`` bytes in frames of ``size`` over a fresh stream; return the
    window credits the reading side sent (each increment), once all is read."""
    a, b = make_host([TCP]), make_host([TCP])
    credits: list[int] = []
    done = trio.Event()

    async def reader(stream, remote_peer_id: str) -> None:
        muxed = stream._raw.muxed_stream
        send = muxed.send_window_update

        async def counted(increment: int, skip_lock: bool = False) -> None:
            credits.append(increment)
            await send(increment, skip_lock=skip_lock)

        muxed.send_window_update = counted
        got = 0
        async for frame in FrameReader(stream):
            got += len(frame)
            if got >= total:
                break
        await write_frame(stream, b"done")
        done.set()

    async with running(a, b):
        b.set_stream_handler(ECHO, reader)
        await a.connect(b.listen_addrs()[0])
        async with await a.open_stream(b.peer_id, ECHO) as s:
            for _ in range(total // size):
                await write_frame(s, os.urandom(size))
            with trio.fail_after(30):
                await done.wait()
                assert await FrameReader(s).read_frame() == b"done"
    return credits


class _FakePubsub:
    """Just enough of a Pubsub for ``send_recent_messages``: who we are, one peer's
    stream, and a ``write_msg`` that records what was sent."""

    def __init__(self, me: ID, peer: ID) -> None:
        self.my_id, self.peers, self.sent = me, {peer: object()}, []
        self.scorer = None

    async def write_msg(self, stream, rpc) -> None:
        self.sent.extend(m.data for m in rpc.publish)


def _replayed(router, topic: str = "t") -> list[bytes]:
    from libp2p.pubsub.pb import rpc_pb2

    me, other, newcomer = (
        ID(create_new_key_pair(os.urandom(32)).public_key.serialize()) for _ in range(3)
    )
    fake = router.pubsub = _FakePubsub(me, newcomer)
    for origin, data in ((me, b"ours"), (other, b"forwarded")):
        router.mcache.put(
            rpc_pb2.Message(
                from_id=origin.to_bytes(), seqno=os.urandom(8), data=data, topicIDs=[topic]
            )
        )
    trio.run(router.send_recent_messages, newcomer, topic)
    return fake.sent


def test_only_own_messages_are_replayed_to_a_new_subscriber() -> None:
    assert _replayed(new_gossipsub((6, 4, 12), 1.0, 100.0)) == [b"ours"]


def test_upstream_replays_forwarded_messages_to_a_new_subscriber() -> None:
    router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12)
    assert sorted(_replayed(router)) == [b"forwarded", b"ours"]


def test_concurrent_copies_are_handled_once(monkeypatch) -> None:
    """WORKAROUND (concurrent copies): while one copy of a message is being
    validated, an identical copy is dropped; a copy with other bytes (a forgery
    under the same id) and a later copy still go to upstream's checks."""
    from libp2p.pubsub import pubsub as pubsub_module
    from libp2p.pubsub.pb import rpc_pb2

    from overlay.net.upstream import OncePubsub

    handled = []

    async def slow_push(self, forwarder, msg) -> None:
        handled.append((forwarder, msg.data))
        await trio.sleep(0.1)  # an async validator at work

    monkeypatch.setattr(pubsub_module.Pubsub, "push_msg", slow_push)
    ps = object.__new__(OncePubsub)
    ps._hydra_in_flight = set()

    def msg(data: bytes) -> rpc_pb2.Message:
        return rpc_pb2.Message(from_id=b"origin", seqno=b"\x01", data=data, topicIDs=["t"])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for forwarder in ("a", "b", "c"):
                nursery.start_soon(ps.push_msg, forwarder, msg(b"record"))
            nursery.start_soon(ps.push_msg, "d", msg(b"forged"))
        await ps.push_msg("e", msg(b"record"))  # the first is done: upstream decides

    trio.run(main)
    first, forged = sorted(handled[:2], key=lambda h: h[1], reverse=True)
    assert first in {("a", b"record"), ("b", b"record"), ("c", b"record")}  # one of three
    assert forged == ("d", b"forged") and handled[2:] == [("e", b"record")]
    assert ps._hydra_in_flight == set()


async def test_yamux_credits_the_window_once_half_of_it_is_read() -> None:
    # 200 small frames (21 KB, under half of the 256 KiB window): no credit at all
    assert await _credits_for_reading(200 * 100, 100) == []
    # 1 MB in 8 KB frames: the writer never stalls, credited in half windows
    credits = await _credits_for_reading(1_000_000, 8000)
    assert 2 <= len(credits) <= 1_000_000 // (128 * 1024) + 1
    assert min(credits) >= 128 * 1024


async def test_upstream_yamux_credits_every_read(monkeypatch) -> None:
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    from overlay.net import upstream

    monkeypatch.setattr(
        YamuxStream, "_auto_tune_and_send_window_update", upstream.UPSTREAM_WINDOW_UPDATE
    )
    credits = await _credits_for_reading(200 * 100, 100)
    assert len(credits) >= 100  # about one WINDOW_UPDATE frame per message read


# ---- security and muxer options ----------------------------------------------


async def test_plaintext_dialer_is_refused() -> None:
    """WORKAROUND (security): a /plaintext/2.0.0-only peer cannot connect, either way."""
    ours = make_host()
    kp = raw_key_pair()
    async with (
        ours,
        raw_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)}) as plain,
    ):
        info = info_from_p2p_addr(multiaddr.Multiaddr(ours.listen_addrs()[0]))
        with trio.fail_after(15), pytest.raises(Exception):  # noqa: B017 - any libp2p dial error
            await plain.connect(info)
        assert ours.peer_id not in [str(p) for p in plain.get_connected_peers()]
        plain_addr = f"{plain.get_transport_addrs()[0]}/p2p/{plain.get_id()}"
        with pytest.raises(DialError):
            await ours.connect(plain_addr)
        assert ours.connected_peers() == []


async def test_upstream_default_accepts_plaintext() -> None:
    kp = raw_key_pair()
    async with (
        raw_host() as default,
        raw_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)}) as plain,
    ):
        info = PeerInfo(default.get_id(), default.get_transport_addrs())
        with trio.fail_after(15):
            await plain.connect(info)
        assert default.get_id() in plain.get_connected_peers()


async def test_mplex_only_dialer_is_refused() -> None:
    """WORKAROUND (muxer): Mplex is not offered, so an Mplex-only peer cannot connect."""
    ours = make_host()
    kp = raw_key_pair()
    sec = {NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=x25519_key_pair().private_key)}
    async with ours, raw_host(key_pair=kp, sec_opt=sec, muxer_opt={MPLEX_PROTOCOL_ID: Mplex}) as mp:
        info = info_from_p2p_addr(multiaddr.Multiaddr(ours.listen_addrs()[0]))
        with trio.fail_after(15), pytest.raises(Exception):  # noqa: B017
            await mp.connect(info)
        assert ours.connected_peers() == []


async def test_upstream_default_offers_mplex() -> None:
    kp = raw_key_pair()
    sec = {NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=x25519_key_pair().private_key)}
    async with (
        raw_host() as default,
        raw_host(key_pair=kp, sec_opt=sec, muxer_opt={MPLEX_PROTOCOL_ID: Mplex}) as mp,
    ):
        with trio.fail_after(15):
            await mp.connect(PeerInfo(default.get_id(), default.get_transport_addrs()))
        assert default.get_id() in mp.get_connected_peers()


# ---- stream bounds and handlers ------------------------------------------------


@pytest.mark.slow
async def test_many_concurrent_streams_do_not_hang() -> None:
    """WORKAROUND (stream bound): 300 concurrent opens: 128 succeed, the rest fail in
    time (each open may take 10 s: generous for 128 opens on a busy machine)."""
    a = make_host(max_streams_per_conn=128, stream_timeout=10.0)
    b = make_host(max_streams_per_protocol=128)  # one protocol may use every slot here
    release = trio.Event()

    async def hold(stream, peer: str) -> None:
        await release.wait()

    opened, limited = [], []

    async def opener() -> None:
        try:
            opened.append(await a.open_stream(b.peer_id, "/hold/1"))
        except StreamLimitReached:
            limited.append(1)

    async with running(a, b):
        b.set_stream_handler("/hold/1", hold)
        await a.connect(b.listen_addrs()[0])
        with trio.fail_after(120):  # would hang forever without the bound
            async with trio.open_nursery() as nursery:
                for _ in range(300):
                    nursery.start_soon(opener)
        assert len(opened) == 128
        assert len(limited) == 172
        release.set()
        for s in opened:
            await s.close()
        # Slots are free again.
        b.set_stream_handler(ECHO, echo_handler)
        async with await a.open_stream(b.peer_id, ECHO) as s:
            await write_frame(s, b"ping")
            assert await read_frame(s) == b"ping"


@pytest.mark.slow
async def test_upstream_yamux_257th_stream_blocks() -> None:
    release = trio.Event()

    async def hold(stream) -> None:
        await release.wait()

    raw_streams: list = []
    async with raw_host() as client, raw_host() as server:
        server.set_stream_handler("/hold/1", hold)
        await client.connect(PeerInfo(server.get_id(), server.get_transport_addrs()))
        with trio.move_on_after(4) as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(260):
                    nursery.start_soon(
                        _append, raw_streams, client.new_stream(server.get_id(), ["/hold/1"])
                    )
        # Upstream Yamux: 256 streams open (a few may be taken by identify), the rest block forever.
        assert scope.cancelled_caught
        assert 250 <= len(raw_streams) <= 256
        release.set()
        for s in raw_streams:
            with contextlib.suppress(Exception):
                await s.reset()


async def _append(out: list, coro) -> None:
    out.append(await coro)


async def test_inbound_limit_enforced() -> None:
    server, client = make_host(max_streams_per_conn=2), make_host(max_streams_per_conn=8)
    release = trio.Event()
    served = []

    async def hold(stream, peer: str) -> None:
        served.append(peer)
        await write_frame(stream, b"hi")
        await release.wait()

    async with running(server, client):
        server.set_stream_handler("/hold/1", hold)
        await client.connect(server.listen_addrs()[0])
        streams = [await client.open_stream(server.peer_id, "/hold/1") for _ in range(2)]
        for s in streams:
            assert await read_frame(s) == b"hi"
        # The third concurrent stream is reset by the server before its handler runs.
        with trio.fail_after(30):
            try:
                extra = await client.open_stream(server.peer_id, "/hold/1")
            except StreamOpenError:
                pass
            else:
                try:
                    frame = await read_frame(extra)
                except (StreamBroken, DecodeError):
                    frame = None
                assert frame is None
                await extra.close()
        assert len(served) == 2
        release.set()
        for s in streams:
            await s.close()
        # Slots are released: a new stream is served again.
        async with await client.open_stream(server.peer_id, "/hold/1") as s:
            assert await read_frame(s) == b"hi"


async def test_raising_stream_handler_resets_only_its_stream() -> None:
    a, b = make_host(), make_host()

    async def broken(stream, peer: str) -> None:
        raise RuntimeError("handler bug")

    async with running(a, b):
        b.set_stream_handler("/broken/1", broken)
        b.set_stream_handler(ECHO, echo_handler)
        await a.connect(b.listen_addrs()[0])
        with trio.fail_after(30):  # refused, EOF or reset: never a hang
            try:
                s = await a.open_stream(b.peer_id, "/broken/1")
            except StreamOpenError:
                pass
            else:
                async with s:
                    with contextlib.suppress(StreamBroken):
                        assert await s.read() == b""
        async with await a.open_stream(b.peer_id, ECHO) as s:
            await write_frame(s, b"still fine")
            assert await read_frame(s) == b"still fine"


# ---- lifecycle -------------------------------------------------------------------


async def test_close_releases_ports() -> None:
    """WORKAROUND (shutdown): after exit the same TCP and UDP ports can be bound again."""
    a = make_host([TCP, QUIC])
    async with a:
        addrs = [x.split("/p2p/")[0] for x in a.listen_addrs()]
    tcp_addr = next(x for x in addrs if "/tcp/" in x)
    quic_addr = next(x for x in addrs if "/quic-v1" in x)
    b = make_host([tcp_addr, quic_addr])
    async with b:
        assert sorted(x.split("/p2p/")[0] for x in b.listen_addrs()) == sorted(addrs)


async def test_listen_failure_raises() -> None:
    """WORKAROUND (listen errors): upstream swallows a failed bind; we raise."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    try:
        host = make_host([f"/ip4/127.0.0.1/tcp/{port}"])
        with pytest.raises(LocalError, match="could not listen"):
            async with host:
                pass
    finally:
        sock.close()


async def test_no_tasks_leak() -> None:
    await trio.sleep(0.05)
    before = count_tasks()
    a, b = make_host([TCP, QUIC], gossip_topics=["t"]), make_host([TCP], gossip_topics=["t"])
    async with running(a, b):
        await a.connect(b.listen_addrs()[0])
        b.set_stream_handler(ECHO, echo_handler)
        async with await a.open_stream(b.peer_id, ECHO) as s:
            await write_frame(s, b"x")
            await read_frame(s)
        await a.subscribe("t")
    await trio.sleep(0.2)
    assert count_tasks() <= before


async def test_run_as_service_and_cancel() -> None:
    a, b = make_host(), make_host()
    async with trio.open_nursery() as nursery:
        assert await nursery.start(a.run) is a
        assert await nursery.start(b.run) is b
        await a.connect(b.listen_addrs()[0])
        port_addr = a.listen_addrs()[0].split("/p2p/")[0]
        nursery.cancel_scope.cancel()
    again = make_host([port_addr])
    async with again:
        pass
    with pytest.raises(LocalError):
        async with a:  # single use
            pass


async def test_ws_shutdown_is_bounded() -> None:
    """WORKAROUND (WebSocket close): peers shutting down together do not wait on each other."""
    hosts = [make_host([WS]) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for h in hosts:
            await nursery.start(h.run)
        await hosts[1].connect(hosts[0].listen_addrs()[0])
        await hosts[2].connect(hosts[1].listen_addrs()[0])
        # upstream: unbounded (the close handshake is never answered); a generous
        # bound tells the two apart on a busy machine
        start = time.monotonic()
        nursery.cancel_scope.cancel()
    assert time.monotonic() - start < 60


async def test_auto_connector_is_stopped() -> None:
    """WORKAROUND (auto-dialer): the swarm's AutoConnector does not dial on its own."""
    a = make_host()
    async with a:
        assert a._swarm.auto_connector._started is False
    b = make_host(auto_connect=True)
    async with b:
        assert b._swarm.auto_connector._started is True


async def test_upstream_auto_connector_runs_by_default() -> None:
    async with raw_host() as h:
        assert h.get_network().auto_connector._started is True


# ---- gossipsub ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def gossip_line(n: int, topic: str, **kw) -> AsyncIterator[list[Libp2pHost]]:
    hosts = [make_host(gossip_topics=[topic], enable_dht=False, **kw) for _ in range(n)]
    async with running(*hosts):
        for i in range(1, n):
            await hosts[i].connect(hosts[i - 1].listen_addrs()[0])
        # Mesh forms on heartbeats (~1 s).
        await wait_until(lambda: all(h.gossip_mesh_peers(topic) for h in hosts), timeout=15)
        yield hosts


async def collect(sub, out: list, n: int) -> None:
    async for msg in sub:
        out.append(msg)
        if len(out) >= n:
            return


@pytest.mark.slow
async def test_gossip_reaches_all_hosts_in_a_line() -> None:
    async with gossip_line(5, "hydra/test") as hosts:
        subs = [await h.subscribe("hydra/test") for h in hosts]
        got: list[list[GossipMessage]] = [[] for _ in hosts]
        await hosts[0].publish("hydra/test", b"record-1")
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for sub, out in zip(subs, got, strict=True):
                    nursery.start_soon(collect, sub, out, 1)
        for out in got:
            assert [m.data for m in out] == [b"record-1"]
            assert out[0].origin == hosts[0].peer_id
            assert out[0].topic == "hydra/test"
        for sub in subs:
            await sub.aclose()


async def test_gossip_heartbeat_is_configured() -> None:
    """WORKAROUND (heartbeat, adaptive gossip): 1 s heartbeat that stays 1 s."""
    h = make_host(gossip_heartbeat=1.0)
    assert h._gossipsub.heartbeat_interval == 1.0
    assert h._gossipsub.adaptive_gossip_enabled is False
    h._gossipsub._adapt_gossip_parameters()
    assert h._gossipsub.heartbeat_interval == 1.0


@pytest.mark.slow
async def test_own_messages_are_flooded_to_every_topic_peer() -> None:
    """WORKAROUND (flood publish): a hub with more topic peers than D_high sends
    its own message to all of them; upstream (and forwarded messages) use the
    mesh only."""
    topic = "hydra/flood"
    hub = make_host(gossip_topics=[topic], enable_dht=False, gossip_degree=(2, 1, 3))
    leaves = [make_host(gossip_topics=[topic], enable_dht=False) for _ in range(6)]
    async with running(hub, *leaves):
        for leaf in leaves:
            await leaf.connect(hub.listen_addrs()[0])
        router = hub._gossipsub
        me = router.pubsub.my_id
        ids = {ID.from_base58(leaf.peer_id) for leaf in leaves}
        await wait_until(lambda: set(router.pubsub.peer_topics.get(topic, ())) == ids, 15)
        await wait_until(lambda: 0 < len(router.mesh.get(topic, ())) <= 3, 15)
        mesh = set(router.mesh[topic])
        assert set(router._get_peers_to_send([topic], me, me)) == ids  # own: every peer
        other = next(iter(ids))
        forwarded = set(router._get_peers_to_send([topic], other, other))
        assert forwarded == mesh - {other}  # someone else's: the mesh
        upstream = set(GossipSub._get_peers_to_send(router, [topic], me, me))
        assert upstream == mesh and upstream != ids  # why the workaround exists


async def test_upstream_adaptive_gossip_stretches_heartbeat() -> None:
    default = GossipSub(protocols=[PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12)
    assert default.heartbeat_interval == 120
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1
    )
    router._adapt_heartbeat_parameters(0.5)  # a mesh below target degree
    assert router.heartbeat_interval >= 30


def _crowded_router(router):
    """``router`` with a mesh of 5 peers in topic t, above its D_high of 3."""
    from types import SimpleNamespace

    peers = [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(5)]
    router.pubsub = SimpleNamespace(peer_topics={"t": set(peers)})
    router.peer_protocol = dict.fromkeys(peers, PROTOCOL_ID_V11)
    router.mesh = {"t": set(peers)}
    return peers


def _prune_then_graft(router) -> tuple[set, set]:
    _, prune = router.mesh_heartbeat()
    pruned = {p for p, topics in prune.items() if "t" in topics}
    for p in list(router.mesh["t"]):  # the peers left in the mesh go: below D_low
        router.mesh["t"].discard(p)
        router.pubsub.peer_topics["t"].discard(p)
    newcomer = ID.from_pubkey(create_new_key_pair().public_key)
    router.pubsub.peer_topics["t"].add(newcomer)
    router.peer_protocol[newcomer] = PROTOCOL_ID_V11
    graft, _ = router.mesh_heartbeat()
    return pruned, {p for p, topics in graft.items() if "t" in topics}


async def test_upstream_heartbeat_prunes_without_backoff() -> None:
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11], degree=2, degree_low=2, degree_high=3, heartbeat_interval=1
    )
    _crowded_router(router)
    pruned, grafted = _prune_then_graft(router)
    assert len(pruned) == 3 and pruned & grafted  # pruned one heartbeat, grafted the next


async def test_pruned_mesh_peers_are_not_grafted_again_at_once() -> None:
    """WORKAROUND (prune without backoff): peers our heartbeat pruned are backed
    off from, so the next heartbeat does not GRAFT them again (the GRAFT flood
    their side would punish)."""
    router = new_gossipsub((2, 2, 3), 1.0, 100.0)
    _crowded_router(router)
    pruned, grafted = _prune_then_graft(router)
    assert len(pruned) == 3 and grafted and not pruned & grafted  # the newcomer only


async def _burst(n: int, **kw) -> int:
    async with gossip_line(2, "t", **kw) as (a, b):
        sub = await b.subscribe("t")
        for i in range(n):
            await a.publish("t", b"%d" % i)
        got = 0
        with trio.move_on_after(1.5):
            async for _ in sub:
                got += 1
                if got == n:
                    break
        return got


@pytest.mark.slow
async def test_publish_burst_is_forwarded() -> None:
    """WORKAROUND (gossip rate limit): 30 quick publishes all arrive."""
    assert await _burst(30) == 30


@pytest.mark.slow
async def test_upstream_rate_limit_drops_own_publishes() -> None:
    assert await _burst(30, gossip_rate_limit=10.0) == 10


async def test_publish_size_cap() -> None:
    h = make_host(gossip_max_message_size=1024, enable_dht=False)
    async with h:
        with pytest.raises(LocalError):
            await h.publish("t", b"x" * 1025)


@pytest.mark.slow
async def test_rejecting_and_raising_validators() -> None:
    """WORKAROUND (validators): a raising validator rejects; nothing crashes; rejected is not relayed."""
    async with gossip_line(3, "t") as (first, middle, last):

        async def picky(forwarder: str, msg: GossipMessage) -> bool:
            if msg.data == b"boom":
                raise RuntimeError("validator bug")
            return msg.data != b"bad"

        middle.set_topic_validator("t", picky)
        sub_mid, sub_last = await middle.subscribe("t"), await last.subscribe("t")
        for payload in (b"bad", b"boom", b"good"):
            await first.publish("t", payload)
        got_mid: list[GossipMessage] = []
        got_last: list[GossipMessage] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, sub_mid, got_mid, 1)
                nursery.start_soon(collect, sub_last, got_last, 1)
        await trio.sleep(0.5)  # let any wrongly relayed message arrive
        assert [m.data for m in got_mid] == [b"good"]
        assert [m.data for m in got_last] == [b"good"]
        # Everything is still running: the next good message flows on.
        await first.publish("t", b"after")
        with trio.fail_after(30):
            assert (await sub_mid.receive()).data == b"after"
            assert (await sub_last.receive()).data == b"after"


def _upstream_sync_validator_scenario() -> None:
    """Two plain py-libp2p nodes; the receiver's sync validator raises."""

    async def scenario() -> None:
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
        listen = [multiaddr.Multiaddr(TCP)]
        hosts, routers = [], []
        for _ in range(2):
            kp = raw_key_pair()
            sec = {
                NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=x25519_key_pair().private_key)
            }
            hosts.append(new_host(key_pair=kp, sec_opt=sec, listen_addrs=listen))
            routers.append(
                GossipSub(
                    protocols=[PROTOCOL_ID_V11],
                    degree=6,
                    degree_low=4,
                    degree_high=12,
                    heartbeat_interval=1,
                )
            )
        pubsubs = [Pubsub(h, r) for h, r in zip(hosts, routers, strict=True)]

        def raising(forwarder, msg) -> bool:
            raise RuntimeError("sync validator bug")

        pubsubs[1].set_topic_validator("t", raising, is_async_validator=False)
        async with contextlib.AsyncExitStack() as stack:
            for h, p, r in zip(hosts, pubsubs, routers, strict=True):
                await stack.enter_async_context(h.run(listen))
                await stack.enter_async_context(background_trio_service(p))
                await stack.enter_async_context(background_trio_service(r))
            await hosts[0].connect(PeerInfo(hosts[1].get_id(), hosts[1].get_transport_addrs()))
            for p in pubsubs:
                await p.subscribe("t")
            await trio.sleep(2.5)
            for _ in range(3):
                await pubsubs[0].publish("t", b"x")
                await trio.sleep(0.5)
            for h in hosts:
                await h.close()

    trio.run(scenario)


@pytest.mark.slow
async def test_upstream_raising_sync_validator_crashes_trio_run() -> None:
    # Runs in its own thread with its own trio.run: the crash must not take this test down.
    with pytest.raises(BaseException) as info:  # noqa: B017
        await trio.to_thread.run_sync(_upstream_sync_validator_scenario)
    assert _mentions(info.value, "sync validator bug")


def _mentions(exc: BaseException, text: str) -> bool:
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if text in str(e):
            return True
        stack.extend(getattr(e, "exceptions", ()))
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                stack.append(nxt)
    return False


# ---- DHT -------------------------------------------------------------------------


class SeqValidator:
    """Values look like b"v<seq>"; the highest seq wins."""

    def validate(self, key: str, value: bytes) -> None:
        if not value.startswith(b"v") or not value[1:].isdigit():
            raise ValueError("not a seq value")

    def select(self, key: str, values: list[bytes]) -> int:
        return max(range(len(values)), key=lambda i: int(values[i][1:]))


@contextlib.asynccontextmanager
async def dht_line(n: int) -> AsyncIterator[list[Libp2pHost]]:
    hosts = [make_host(dht_validators={"hydra": SeqValidator()}, dht_timeout=10) for _ in range(n)]
    async with running(*hosts):
        for i in range(1, n):
            await hosts[i].connect(hosts[i - 1].listen_addrs()[0])
        # Routing tables fill once identify has run on each connection.
        await wait_until(lambda: all(h._dht.get_routing_table_size() > 0 for h in hosts))
        yield hosts


@pytest.mark.slow
async def test_dht_put_get_across_hosts() -> None:
    """WORKAROUND (empty routing table): connected peers are in the routing table."""
    async with dht_line(5) as hosts:
        await hosts[0].dht_put("/hydra/node-a", b"v1")
        assert await hosts[-1].dht_get("/hydra/node-a") == b"v1"
        assert await hosts[2].dht_get("/hydra/missing") is None
        assert await hosts[1].provide("role/exit") is True
        assert await hosts[3].provide("role/exit") is True
        found = await hosts[4].find_providers("role/exit")
        assert hosts[1].peer_id in found or hosts[3].peer_id in found
        assert set(found) <= {hosts[1].peer_id, hosts[3].peer_id}


@pytest.mark.slow
async def test_dht_get_prefers_newer_network_value() -> None:
    """WORKAROUND (stale DHT reads): a stale local copy does not hide a newer record."""
    async with dht_line(4) as hosts:
        key = "/hydra/node-b"
        await hosts[0].dht_put(key, b"v1")
        await hosts[3].dht_put(key, b"v2")
        # hosts[0] missed the update: its own store still holds v1.
        hosts[0]._dht.value_store.put(key.encode(), b"v1")
        # Upstream get_value answers from the local store without asking anyone.
        assert await hosts[0]._dht.get_value(key) == b"v1"
        assert await hosts[0].dht_get(key) == b"v2"
        # ...and the newer value replaced the stale local copy.
        assert hosts[0]._dht.value_store.get(key.encode()).value == b"v2"
        # A newer local value is kept when the network only has older ones.
        hosts[1]._dht.value_store.put(key.encode(), b"v9")
        assert await hosts[1].dht_get(key) == b"v9"


@pytest.mark.slow
async def test_dht_put_at_stores_at_exactly_the_given_peers() -> None:
    """A caller that knows the key's closest peers stores there without a lookup:
    those peers (and we) hold the value, nobody else does, nobody else is
    dialled, and a lookup from the far end of the line finds it."""
    async with dht_line(5) as hosts:
        key = "/hydra/node-c"
        ids = [h.peer_id for h in hosts]
        closest = hosts[0].dht_closest(key, ids[1:] + ["not a peer id"], 2)
        assert len(closest) == 2 and set(closest) <= set(ids[1:])
        assert hosts[0].dht_closest(key, ids[1:], 9) == hosts[3].dht_closest(key, ids[1:], 9)
        assert hosts[0].dht_closest(key, ids[1:], 9)[:2] == closest
        for h in hosts[1:]:  # the caller dials them first (a node: through their feeds)
            if h.peer_id in closest:
                await hosts[0].connect(h.listen_addrs()[0])
        before = set(hosts[0].connected_peers())
        assert await hosts[0].dht_put_at(key, b"v3", closest) == 2
        holders = {h.peer_id for h in hosts if h._dht.value_store.get(key.encode()) is not None}
        assert holders == {ids[0], *closest}
        assert set(hosts[0].connected_peers()) == before  # no lookup: nobody else dialled
        assert await hosts[4].dht_get(key) == b"v3"
        with pytest.raises(LocalError):
            await hosts[0].dht_put_at(key, b"v2", closest)  # older than what we hold
        with pytest.raises(ValueError, match="seq"):
            await hosts[0].dht_put_at(key, b"garbage", closest)


def test_provider_names_are_hashed() -> None:
    """WORKAROUND (provider keys): names are never guessed to be hex or CIDs."""
    from libp2p.kad_dht.kad_dht import _encode_key

    from overlay.net.dht import _provider_key

    assert _encode_key("beef") == b"\xbe\xef"  # upstream: a hex-looking name is decoded
    key = _encode_key(_provider_key("beef"))
    assert len(key) == 34 and key[:2] == b"\x12\x20"
    assert _provider_key("beef") != _provider_key("bee")


async def test_dht_rejects_bad_keys_and_values() -> None:
    h = make_host(dht_validators={"hydra": SeqValidator()})
    async with h:
        with pytest.raises(LocalError, match="namespace"):
            await h.dht_put("/other/x", b"v1")
        with pytest.raises(LocalError):
            await h.dht_put("no-namespace", b"v1")
        with pytest.raises(ValueError, match="seq"):
            await h.dht_put("/hydra/x", b"garbage")
        await h.dht_put("/hydra/x", b"v5")  # alone in the network: stored locally
        assert await h.dht_get("/hydra/x") == b"v5"
        with pytest.raises(LocalError):
            await h.dht_put("/hydra/x", b"v4")  # older than what we hold
    no_dht = make_host(enable_dht=False)
    async with no_dht:
        with pytest.raises(LocalError):
            await no_dht.dht_get("/hydra/x")


# ---- framing (pure) -----------------------------------------------------------------


class ChunkedReader:
    """A byte source returning at most ``chunk`` bytes per read; counts what was read."""

    def __init__(self, data: bytes, chunk: int = 3) -> None:
        self.data, self.pos, self.chunk = data, 0, chunk

    async def read(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        n = min(max_bytes, self.chunk, len(self.data) - self.pos)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


async def test_frames_round_trip_with_short_reads() -> None:
    payloads = [b"", b"a", b"x" * 127, b"y" * 128, os.urandom(20_000)]
    reader = FrameReader(ChunkedReader(b"".join(encode_frame(p) for p in payloads), chunk=7))
    assert [f async for f in reader] == payloads


async def test_oversized_frame_rejected_before_body() -> None:
    body = b"z" * 5000
    src = ChunkedReader(encode_uvarint(len(body)) + body, chunk=1)
    with pytest.raises(DecodeError) as info:
        await read_frame(src, max_size=4096)
    assert info.value.reason is Reason.OVERSIZED
    assert src.pos <= 2  # only the length prefix was consumed
    with pytest.raises(DecodeError) as info:
        FrameDecoder(max_size=10).feed(b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f")
    assert info.value.reason is Reason.OVERSIZED


async def test_malformed_frames() -> None:
    with pytest.raises(DecodeError) as info:
        FrameDecoder().feed(b"\x81\x00")  # non-minimal varint for 1
    assert info.value.reason is Reason.NON_CANONICAL
    with pytest.raises(DecodeError):
        await read_frame(ChunkedReader(encode_frame(b"hello")[:-1]))  # truncated body
    with pytest.raises(DecodeError):
        await read_frame(ChunkedReader(b"\x80"))  # truncated prefix
    assert await read_frame(ChunkedReader(b"")) is None  # clean end
    with pytest.raises(LocalError):
        encode_frame(b"x" * 11, max_size=10)
    with pytest.raises(DecodeError):
        FrameDecoder(max_size=2**70).feed(b"\x80" * 9 + b"\x01")


async def test_read_exactly() -> None:
    src = ChunkedReader(b"0123456789", chunk=3)
    assert await read_exactly(src, 4) == b"0123"
    assert await read_exactly(src, 6) == b"456789"
    with pytest.raises(DecodeError):
        await read_exactly(ChunkedReader(b"abc"), 4)


def test_uvarint_encoding() -> None:
    assert encode_uvarint(0) == b"\x00"
    assert encode_uvarint(127) == b"\x7f"
    assert encode_uvarint(128) == b"\x80\x01"
    assert encode_uvarint(300) == b"\xac\x02"
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(b"ab")[:1]) == []
    assert decoder.feed(encode_frame(b"ab")[1:] + encode_frame(b"c")) == [b"ab", b"c"]


def test_shutdown_noise_filter() -> None:
    """WORKAROUND (listener shutdown race): only closed-socket errors are swallowed."""
    import errno

    from overlay.net.upstream import only_shutdown_noise as _only_shutdown_noise

    noise = BaseExceptionGroup("x", [OSError(errno.EBADF, "bad fd"), OSError(errno.EINVAL, "inv")])
    assert _only_shutdown_noise(BaseExceptionGroup("outer", [noise]))
    real = BaseExceptionGroup("x", [OSError(errno.EBADF, "bad fd"), ValueError("bug")])
    assert not _only_shutdown_noise(real)
    assert not _only_shutdown_noise(BaseExceptionGroup("x", [OSError(errno.ECONNRESET, "r")]))


async def test_close_under_load_is_clean() -> None:
    """A host closing while a peer keeps dialing it exits without raising."""

    connected = 0

    async def hammer(dialer, addr) -> None:
        nonlocal connected
        while True:
            try:
                await dialer.connect(addr, reuse=False)
                connected += 1
            except Exception:  # noqa: BLE001 - the target is going away
                pass
            await trio.sleep(0)

    for _ in range(5):
        a = make_host([TCP])
        b = make_host([TCP])
        async with b, trio.open_nursery() as n:
            async with a:
                before = connected
                n.start_soon(hammer, b, a.listen_addrs()[0])
                # a closes while b's dials are landing: at least two got through
                await wait_until(lambda before=before: connected >= before + 2, 60)
            await trio.sleep(0.1)  # a is gone; b still dials it
            n.cancel_scope.cancel()
    assert connected >= 10


async def test_listen_addrs_after_close() -> None:
    """WORKAROUND (closed listeners): listen_addrs() still answers after shutdown."""
    a = make_host([TCP])
    async with a:
        before = a.listen_addrs()
    assert a.listen_addrs() == before


def test_every_workaround_is_indexed() -> None:
    """Every ``WORKAROUND (label)`` in overlay/net/ is listed in upstream.py's
    table under the module it lives in, and names a guarding test that exists."""
    from pathlib import Path

    import overlay.net

    net = Path(overlay.net.__file__).parent
    tests = Path(__file__).parent
    defined = set()
    for path in tests.glob("test_*.py"):
        defined |= set(re.findall(r"def (test_\w+)", path.read_text()))
    found: dict[str, str] = {}
    for path in sorted(net.glob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"WORKAROUND \(([^)]+)\)", text):
            found[m.group(1)] = path.name
            block = text[m.start() :].split("\n\n", 1)[0]  # the comment or docstring
            named = re.findall(r"\btest_\w+", block)
            assert named, f"{path.name}: WORKAROUND ({m.group(1)}) names no test"
            missing = [t for t in named if t not in defined]
            assert not missing, f"{path.name}: WORKAROUND ({m.group(1)}) names {missing}"
    assert len(found) >= 30
    index = (net / "upstream.py").read_text().split('"""', 2)[1]
    rows = {}
    for line in index.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] not in ("label", "---"):
            where = "upstream.py" if cells[1] == "here" else cells[1].split("``")[1]
            for label in cells[0].split(", "):
                rows[label] = where
    assert rows == found
