"""Real libp2p hosts on 127.0.0.1: connection bounds, bans, the peerstore, DHT keys, gossip streams.

Like ``test_host.py``: each WORKAROUND in ``overlay/net/`` has a test
here, and ``test_upstream_*`` canaries show the py-libp2p 0.8.1 behaviour it
compensates for (they fail once upstream changes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStore
from libp2p.records.validator import NamespacedValidator
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from overlay.crypto import SigningKey
from overlay.errors import DecodeError, Reason
from overlay.net import FrameReader, Libp2pHost, read_exactly, read_frame, write_frame
from overlay.net.host import ConnectionLimits, DialError, StreamBroken, StreamOpenError
from overlay.runtime import DHT_NAMESPACE, _DhtRecordValidator, dht_key
from tests.integration.test_host import (
    ECHO,
    TCP,
    echo_handler,
    make_host,
    raw_key_pair,
    running,
    wait_until,
)
from tests.recgen import relay_record

GOSSIP = "hydra-test/limits"


@pytest.fixture(autouse=True)
def _quiet_libp2p() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


@contextlib.asynccontextmanager
async def raw_host(**kw):
    kp = kw.pop("key_pair", None) or raw_key_pair()
    listen = [multiaddr.Multiaddr(TCP)]
    h = new_host(key_pair=kp, listen_addrs=listen, **kw)
    async with h.run(listen):
        try:
            yield h
        finally:
            await h.close()


# ---- inbound connection slots ----------------------------------------------------


async def test_upstream_inbound_slots_leak() -> None:
    """Upstream keeps an inbound slot for every connection ever accepted, open or not."""
    config = ConnectionConfig(
        max_connections=6, min_connections=2, low_watermark=3, high_watermark=5
    )  # 4 inbound slots
    async with raw_host(connection_config=config) as server:
        addr = info_from_p2p_addr(multiaddr.Multiaddr(f"{server.get_addrs()[0]}"))
        results = []
        for _ in range(6):  # one at a time: never more than one open
            async with raw_host() as client:
                try:
                    with trio.fail_after(30):
                        await client.connect(addr)
                    await wait_until(lambda: bool(server.get_network().connections), 5)
                    results.append(True)
                except Exception:  # noqa: BLE001 - refused: what the canary shows
                    results.append(False)
            await wait_until(lambda: not server.get_network().connections, 5)
        assert results == [True, True, True, True, False, False]


async def test_inbound_slots_are_given_back() -> None:
    """WORKAROUND (inbound slots): a closed connection frees its slot."""
    limits = ConnectionLimits(max_inbound=3, max_inbound_per_ip=3, max_handshakes_per_ip=3)
    server = make_host(limits=limits)
    async with server:
        for _ in range(6):
            async with make_host() as client:
                await client.connect(server.listen_addrs()[0])
                await wait_until(lambda: server.connection_counts()["inbound"] == 1, 5)
            await wait_until(lambda: server._gate.inbound() == 0, 10)
        assert server.refused == {}


async def test_total_inbound_bound_refuses_at_accept() -> None:
    limits = ConnectionLimits(max_inbound=2, max_inbound_per_ip=2, max_handshakes_per_ip=2)
    server = make_host(limits=limits)
    clients = [make_host() for _ in range(3)]
    async with running(server, *clients):
        for c in clients[:2]:
            await c.connect(server.listen_addrs()[0])
        with pytest.raises(DialError):
            await clients[2].connect(server.listen_addrs()[0])
        assert server.refused.get("inbound_limit", 0) >= 1
        assert server.connection_counts()["inbound"] == 2


# ---- bans ---------------------------------------------------------------------------


async def test_ban_refuses_dials_and_connections_both_ways() -> None:
    a, b = make_host(), make_host()
    async with running(a, b):
        a.ban(b.peer_id, 30)
        assert a.is_banned(b.peer_id)
        with pytest.raises(DialError, match="banned"):
            await a.connect(b.listen_addrs()[0])
        with pytest.raises(DialError):  # b dials in: refused after the handshake
            await b.connect(a.listen_addrs()[0])
        assert not a.connected_peers()
        assert a.refused.get("banned", 0) >= 2
        a.unban(b.peer_id)
        await b.connect(a.listen_addrs()[0])
        await wait_until(lambda: b.peer_id in a.connected_peers(), 5)


async def test_a_failed_dial_does_not_block_the_next_stream_open() -> None:
    """A stream open to a peer whose last dial failed dials it again at once (no
    upstream negative cache: a liveness ping must reach a member that was
    briefly unreachable, or its probe reads as the member's silence)."""
    a, b = make_host(), make_host()
    async with running(a, b):
        b.set_stream_handler(ECHO, echo_handler)
        await a.connect(b.listen_addrs()[0])  # a learns b's address
        await a.disconnect(b.peer_id)
        b.ban(a.peer_id, 30)  # b refuses a after the handshake: a's dial fails
        with pytest.raises(StreamOpenError):
            await a.open_stream(b.peer_id, ECHO)
        b.unban(a.peer_id)
        with trio.fail_after(30):
            async with await a.open_stream(b.peer_id, ECHO) as s:
                await write_frame(s, b"again")
                assert await FrameReader(s).read_frame() == b"again"


async def test_ban_expires_and_list_is_bounded() -> None:
    a, b = make_host(limits=ConnectionLimits(max_bans=3)), make_host()
    async with running(a, b):
        a.ban(b.peer_id, 0.3)
        with pytest.raises(DialError):
            await b.connect(a.listen_addrs()[0])
        await trio.sleep(0.4)
        await b.connect(a.listen_addrs()[0])
        for _ in range(10):
            a.ban(SigningKey.generate().node_id.peer_id(), 60)
        assert len(a._bans) == 3


# ---- streams ------------------------------------------------------------------------


async def test_inbound_streams_bounded_per_protocol() -> None:
    server, client = make_host(max_streams_per_protocol=3), make_host()
    release = trio.Event()

    async def hold(stream, peer: str) -> None:
        await release.wait()

    async with running(server, client):
        server.set_stream_handler("/hold/1", hold)
        server.set_stream_handler(ECHO := "/hydra-test/echo/1.0.0", echo_handler)
        await client.connect(server.listen_addrs()[0])
        held = []
        for _ in range(3):
            s = await client.open_stream(server.peer_id, "/hold/1")
            await s.write(b"x")
            held.append(s)
        await wait_until(lambda: server._slots.inbound_in_use(client.peer_id, "/hold/1") == 3, 5)
        try:  # reset at once: the open fails, or the stream ends
            extra = await client.open_stream(server.peer_id, "/hold/1")
            await extra.write(b"x")
            assert await extra.read() == b""
            await extra.close()
        except (StreamOpenError, StreamBroken):
            pass
        assert server.refused.get("stream_limit") == 1
        # another protocol from the same peer still has room
        async with await client.open_stream(server.peer_id, ECHO) as s:
            await write_frame(s, b"ping")
            assert await read_frame(s) == b"ping"
        release.set()
        for s in held:
            await s.close()


class _Stalling:
    """Sends ``data`` and then never another byte."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, max_bytes: int) -> bytes:
        if self.data:
            out, self.data = self.data[:max_bytes], self.data[max_bytes:]
            return out
        await trio.sleep_forever()
        raise AssertionError


async def test_partial_frame_times_out() -> None:
    # 100-byte frame announced, 3 bytes sent, then silence
    with trio.fail_after(5):
        with pytest.raises(DecodeError) as info:
            await read_frame(_Stalling(b"\x64abc"), frame_timeout=0.2)
    assert info.value.reason is Reason.IDLE_TIMEOUT
    with trio.fail_after(5):
        with pytest.raises(DecodeError) as info:
            await FrameReader(_Stalling(b"\x03ab"), frame_timeout=0.2).read_frame()
    assert info.value.reason is Reason.IDLE_TIMEOUT
    with trio.fail_after(5):
        with pytest.raises(DecodeError) as info:
            await read_exactly(_Stalling(b"ab"), 4, frame_timeout=0.2)
    assert info.value.reason is Reason.IDLE_TIMEOUT
    # waiting between frames is the caller's deadline, not an error
    with trio.move_on_after(0.5) as scope:
        await read_frame(_Stalling(b""), frame_timeout=0.1)
    assert scope.cancelled_caught


# ---- the peerstore ----------------------------------------------------------------


def test_upstream_peerstore_evicts_itself() -> None:
    kp = raw_key_pair()
    own = ID.from_pubkey(kp.public_key)
    store = PeerStore(max_peers=1000)
    store.add_key_pair(own, kp)
    for _ in range(1001):
        store.add_addrs(
            ID.from_pubkey(raw_key_pair().public_key),
            [multiaddr.Multiaddr("/ip4/127.0.0.2/tcp/9")],
            3600,
        )
    assert own not in store.peer_ids()


def _flood_peerstore(host: Libp2pHost, n: int) -> None:
    store = host._host.get_peerstore()
    addr = multiaddr.Multiaddr("/ip4/127.0.0.2/tcp/9")
    for i in range(n):
        pid = ID.from_pubkey(raw_key_pair().public_key)
        if i < n // 2:
            store.add_protocols(pid, ["/x/1"])  # entries without addresses
        else:
            store.add_addrs(pid, [addr], 3600)  # each of these enforces max_peers


@pytest.mark.slow
async def test_peerstore_flood_keeps_own_entry() -> None:
    """WORKAROUND (own peerstore entry): 1,500+ peers; publish and identify still work."""
    a, b = make_host(gossip_topics=[GOSSIP]), make_host(gossip_topics=[GOSSIP])
    async with running(a, b):
        await b.connect(a.listen_addrs()[0])
        sub = await b.subscribe(GOSSIP)
        b_id = ID.from_base58(b.peer_id)
        await wait_until(lambda: b_id in a._pubsub.peer_topics.get(GOSSIP, ()), 10)
        _flood_peerstore(a, 1600)
        store = a._host.get_peerstore()
        assert len(store.peer_ids()) <= store.max_peers
        own = ID.from_base58(a.peer_id)
        assert own in store.peer_ids()
        assert ID.from_base58(b.peer_id) in store.peer_ids()  # connected: kept
        got = []
        with trio.fail_after(10):
            while not got:
                await a.publish(GOSSIP, b"after the flood")
                with trio.move_on_after(1.0):
                    got.append(await sub.receive())
        assert got[0].data == b"after the flood"
        # a newcomer's identify of `a` (an inbound identify) works, and `a` lives on
        async with make_host() as c:
            await c.connect(a.listen_addrs()[0])
            cstore = c._host.get_peerstore()
            await wait_until(lambda: bool(c.peer_protocols(a.peer_id)), 10)
            assert cstore.pubkey(own) == store.pubkey(own)
        assert a._nursery is not None


def _upstream_handler_error_scenario() -> None:
    """A plain py-libp2p host whose protocol handler raises."""

    async def scenario() -> None:
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
        async with raw_host() as server, raw_host() as client:

            async def boom(stream) -> None:
                raise KeyError("handler bug")

            server.set_stream_handler("/boom/1", boom)
            await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
            stream = await client.new_stream(server.get_id(), ["/boom/1"])
            await stream.write(b"x")
            await trio.sleep(2)

    trio.run(scenario)


@pytest.mark.slow
async def test_upstream_handler_errors_end_trio_run() -> None:
    with pytest.raises(BaseException) as info:  # noqa: B017
        await trio.to_thread.run_sync(_upstream_handler_error_scenario)
    assert "handler bug" in repr(info.value) or "KeyError" in repr(info.value)


async def test_upstream_handler_errors_are_contained() -> None:
    """WORKAROUND (handler exceptions): a raising libp2p handler resets one stream only."""
    a, b = make_host(), make_host()

    async def boom(stream) -> None:
        raise KeyError("handler bug")

    async with running(a, b):
        a._host.set_stream_handler("/boom/1", boom)
        a.set_stream_handler("/hydra-test/echo/1.0.0", echo_handler)
        await b.connect(a.listen_addrs()[0])
        with contextlib.suppress(Exception):  # the stream is reset, nothing else
            raw = await b._host.new_stream(ID.from_base58(a.peer_id), ["/boom/1"])
            await raw.write(b"x")
        await trio.sleep(0.5)
        assert b.peer_id in a.connected_peers()
        async with await b.open_stream(a.peer_id, "/hydra-test/echo/1.0.0") as s:
            await write_frame(s, b"still here")
            assert await read_frame(s) == b"still here"


# ---- DHT -----------------------------------------------------------------------------


def test_dht_key_is_short_and_names_its_node() -> None:
    node = SigningKey.generate().node_id
    key = dht_key(node)
    assert key.startswith(f"/{DHT_NAMESPACE}/")
    assert len(key.encode()) == 50  # py-libp2p's FIND_NODE accepts 2..50-byte keys
    assert key != dht_key(SigningKey.generate().node_id)


async def _kad_exchange(stream, message: Message) -> Message:
    await stream.write(encode_varint_prefixed(message.SerializeToString()))
    reply = Message()
    reply.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 1 << 20))
    return reply


@contextlib.asynccontextmanager
async def _hydra_dht_pair():
    a = make_host(dht_validators={DHT_NAMESPACE: _DhtRecordValidator(time.time)})
    b = make_host(dht_validators={DHT_NAMESPACE: _DhtRecordValidator(time.time)})
    async with running(a, b):
        await a.connect(b.listen_addrs()[0])
        await wait_until(lambda: b._dht.get_routing_table_size() > 0, 10)
        yield a, b


@pytest.mark.slow
async def test_hydra_dht_keys_round_trip_through_upstream_handler() -> None:
    """FIND_NODE, PUT_VALUE and GET_VALUE on a Hydra key, against py-libp2p's own handler."""
    key_pair = SigningKey.generate()
    rec = relay_record(seq=3, now=int(time.time()), key=key_pair)
    key = dht_key(key_pair.node_id).encode()
    async with _hydra_dht_pair() as (a, b):
        b_id = ID.from_base58(b.peer_id)
        stream = await a._host.new_stream(b_id, [KAD_PROTOCOL_ID])
        find = Message(type=Message.MessageType.FIND_NODE, key=key)
        reply = await _kad_exchange(stream, find)
        assert reply.type == Message.MessageType.FIND_NODE
        put = Message(
            type=Message.MessageType.PUT_VALUE,
            key=key,
            record=Record(key=key, value=rec.encode()),
        )
        reply = await _kad_exchange(stream, put)
        assert reply.type == Message.MessageType.PUT_VALUE
        get = Message(type=Message.MessageType.GET_VALUE, key=key)
        reply = await _kad_exchange(stream, get)
        assert reply.record.value == rec.encode()
        await stream.close()
        # and through the adapter, both ways
        assert await a.dht_get(key.decode()) == rec.encode()
        newer = relay_record(seq=4, now=int(time.time()), key=key_pair)
        await a.dht_put(key.decode(), newer.encode())
        assert b._dht.value_store.get(key).value == newer.encode()


@pytest.mark.slow
async def test_upstream_find_node_resets_long_keys() -> None:
    """The former 71-byte key (/hydra/<64 hex>) is reset by py-libp2p's FIND_NODE handler."""
    async with _hydra_dht_pair() as (a, b):
        stream = await a._host.new_stream(ID.from_base58(b.peer_id), [KAD_PROTOCOL_ID])
        long_key = f"/hydra/{os.urandom(32).hex()}".encode()
        with pytest.raises(Exception):  # noqa: B017 - reset: any read error
            with trio.fail_after(30):
                await _kad_exchange(
                    stream, Message(type=Message.MessageType.FIND_NODE, key=long_key)
                )


async def test_dht_validator_checks_the_key() -> None:
    me, other = SigningKey.generate(), SigningKey.generate()
    rec = relay_record(seq=1, now=int(time.time()), key=me)
    validator = _DhtRecordValidator(time.time)
    validator.validate(dht_key(me.node_id), rec.encode())
    with pytest.raises(DecodeError):
        validator.validate(dht_key(other.node_id), rec.encode())


@contextlib.asynccontextmanager
async def _client_mode_dht():
    """A plain py-libp2p host with a client-mode DHT (asks, never answers)."""
    async with raw_host() as h:
        dht = KadDHT(h, DHTMode.CLIENT, validator=NamespacedValidator({}), strict_validation=False)
        async with background_trio_service(dht):
            yield h, dht


async def _identified(peerstore, peer: ID) -> None:
    """Wait until identify has told ``peerstore`` the peer's addresses."""

    def known() -> bool:
        try:
            return bool(peerstore.addrs(peer))
        except Exception:  # noqa: BLE001 - not in the peerstore yet
            return False

    await wait_until(known, 10)


async def _ask_find_node(client, server_id: ID) -> None:
    stream = await client.new_stream(server_id, [KAD_PROTOCOL_ID])
    await _kad_exchange(stream, Message(type=Message.MessageType.FIND_NODE, key=b"ab" * 10))
    await stream.close()


@pytest.mark.slow
async def test_upstream_dht_adds_clients_as_servers() -> None:
    async with raw_host() as server, _client_mode_dht() as (client, _):
        dht = KadDHT(server, DHTMode.SERVER, validator=NamespacedValidator({}))
        async with background_trio_service(dht):
            await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
            await _identified(server.get_peerstore(), client.get_id())
            await _ask_find_node(client, server.get_id())
            await wait_until(lambda: dht.routing_table.peer_in_table(client.get_id()), 5)


@pytest.mark.slow
async def test_dht_clients_stay_out_of_the_routing_table() -> None:
    """WORKAROUND (DHT clients as servers)."""
    server, peer = make_host(), make_host()
    async with running(server, peer), _client_mode_dht() as (client, _):
        server_id = ID.from_base58(server.peer_id)
        await client.connect(
            PeerInfo(server_id, [multiaddr.Multiaddr(server.listen_addrs()[0].split("/p2p/")[0])])
        )
        await _identified(server._host.get_peerstore(), client.get_id())
        await _ask_find_node(client, server_id)
        await peer.connect(server.listen_addrs()[0])  # a real server is admitted
        table = server._dht.routing_table
        await wait_until(lambda: table.peer_in_table(ID.from_base58(peer.peer_id)), 10)
        assert not table.peer_in_table(client.get_id())


# ---- gossip streams ----------------------------------------------------------------


async def _drop_the_gossip_connection(a: Libp2pHost, b: Libp2pHost) -> None:
    """Give b a second connection to a, then close the one a's gossip stream to b uses."""
    a_id, b_id = ID.from_base58(a.peer_id), ID.from_base58(b.peer_id)
    await wait_until(
        lambda: b_id in a._pubsub.peers and a_id in b._pubsub.peer_topics.get(GOSSIP, ()), 10
    )
    await b.connect(a.listen_addrs()[0], reuse=False)
    await wait_until(lambda: len(a._swarm.connections.get(b_id, [])) >= 2, 5)
    stream = a._pubsub.peers[b_id]
    victim = next(c for c in a._swarm.connections[b_id] if c.muxed_conn is stream.muxed_conn)
    await victim.close()


def _gossip_stream_live(a: Libp2pHost, b: Libp2pHost) -> bool:
    stream = a._pubsub.peers.get(ID.from_base58(b.peer_id))
    return stream is not None and not stream.muxed_conn.is_closed


@pytest.mark.slow
async def test_upstream_gossip_stream_not_reopened_after_reconnect() -> None:
    a, b = make_host(gossip_topics=[GOSSIP]), make_host(gossip_topics=[GOSSIP])
    a._reopen_gossip_stream = lambda conn: None  # upstream behaviour alone
    async with running(a, b):
        await b.connect(a.listen_addrs()[0])
        await _drop_the_gossip_connection(a, b)
        await trio.sleep(3.0)
        assert not _gossip_stream_live(a, b)


@pytest.mark.slow
async def test_gossip_stream_reopened_after_reconnect() -> None:
    """WORKAROUND (gossip stream after a reconnect)."""
    a, b = make_host(gossip_topics=[GOSSIP]), make_host(gossip_topics=[GOSSIP])
    async with running(a, b):
        await b.connect(a.listen_addrs()[0])
        sub = await b.subscribe(GOSSIP)
        await _drop_the_gossip_connection(a, b)
        await wait_until(lambda: _gossip_stream_live(a, b), 10)
        await a.publish(GOSSIP, b"hello again")
        with trio.fail_after(10):
            assert (await sub.receive()).data == b"hello again"
