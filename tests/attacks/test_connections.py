"""Attacks on connections and streams, against real nodes on loopback.

The attacker dials from 127.0.0.2 or 127.0.0.3 (Linux routes all of 127/8 to
loopback); honest nodes live on 127.0.0.1, as in every test and benchmark.
Each attack is bounded in count and time; afterwards the node answers status
and honest peers still connect.
"""

from __future__ import annotations

import contextlib
import logging
import os

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from overlay.crypto import SigningKey
from overlay.errors import Reason
from overlay.net import encode_frame
from overlay.net.host import DialError, Libp2pHost, NetError
from overlay.runtime import RECORDS_TOPIC, SYNC_PROTOCOL, Node
from overlay.services.relay import CLIENT_PROTOCOL
from overlay.services.resilience import PROTOCOL as LIVENESS_PROTOCOL
from overlay.testing import join_addr, light_services, make_home, wait_until

pytestmark = pytest.mark.slow

TCP = "/ip4/127.0.0.1/tcp/0"


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def _tcp_target(node: Node) -> tuple[str, int]:
    addr = multiaddr.Multiaddr(join_addr(node))
    return addr.value_for_protocol("ip4"), int(addr.value_for_protocol("tcp"))


def _dial_from(host: Libp2pHost, ip: str) -> None:
    """Make ``host``'s TCP dials leave from ``ip`` (the kernel would pick 127.0.0.1)."""
    for transport in host._swarm.transport_manager.get_transports():
        if type(transport).__name__ == "TCP":
            orig = transport._dial_resolved

            async def dial(maddr, source=None, _orig=orig):
                return await _orig(maddr, source=source or (ip, 0))

            transport._dial_resolved = dial


def _attacker(ip: str, **kw) -> Libp2pHost:
    host = Libp2pHost(SigningKey.generate(), [TCP], dial_timeout=3.0, **kw)
    _dial_from(host, ip)
    return host


async def _honest_dials(node: Node, tries: int) -> int:
    ok = 0
    for _ in range(tries):
        async with Libp2pHost(SigningKey.generate(), [TCP], dial_timeout=5.0) as newcomer:
            with contextlib.suppress(NetError):
                await newcomer.connect(join_addr(node))
                ok += 1
    return ok


async def test_half_open_flood_does_not_starve_newcomers(tmp_path) -> None:
    """1,000 silent TCP connections from one address, reopened as the node closes them;
    honest newcomers still connect."""
    async with Node(make_home(tmp_path / "n"), services=light_services()) as node:
        host, port = _tcp_target(node)
        opened = 0
        stop = trio.Event()

        async def keep_one_open() -> None:
            nonlocal opened
            while not stop.is_set() and opened < 50_000:
                s = trio.socket.socket()
                try:
                    opened += 1
                    with contextlib.suppress(OSError):
                        await s.bind(("127.0.0.2", 0))
                        with trio.move_on_after(5):
                            await s.connect((host, port))
                        with trio.move_on_after(30):
                            while await s.recv(4096):  # until the node closes it
                                pass
                finally:
                    s.close()
                await trio.sleep(0.5)

        with trio.fail_after(180):
            async with trio.open_nursery() as attack:
                for _ in range(1000):
                    attack.start_soon(keep_one_open)
                await wait_until(lambda: opened >= 1000, 60)
                # the address holds at most its handshake bound; the rest is refused at accept
                refused = node.host.refused
                await wait_until(lambda: refused.get("handshake_limit", 0) >= 900, 60)
                gate = node.host._gate
                assert gate.handshakes("127.0.0.2") <= node.host.limits.max_handshakes_per_ip
                assert await _honest_dials(node, 8) == 8
                stop.set()
                attack.cancel_scope.cancel()
        # the silent ones time out or are closed; nothing stays held
        await wait_until(lambda: node.host._gate.inbound("127.0.0.2") == 0, 30)
        assert node.status()["peer_id"] == node.node_id.peer_id()
        text = node.metrics.render().decode()
        assert 'hydra_connections_refused_total{reason="handshake_limit"}' in text
        assert 'hydra_connections{direction="inbound"}' in text


async def test_per_ip_inbound_cap_holds(tmp_path) -> None:
    """Identities dialling from 127.0.0.3 meet its cap; nodes on 127.0.0.1 do not."""
    home = make_home(tmp_path / "n", max_inbound_per_ip=4, max_handshakes_per_ip=4)
    async with Node(home, services=light_services()) as node:
        attackers = [_attacker("127.0.0.3") for _ in range(8)]
        async with contextlib.AsyncExitStack() as stack:
            for a in attackers:
                await stack.enter_async_context(a)
            ok = 0
            with trio.fail_after(60):
                for a in attackers:
                    with contextlib.suppress(NetError):
                        await a.connect(join_addr(node))
                        ok += 1
                await trio.sleep(0.5)
                assert ok <= 4
                assert node.host._gate.inbound("127.0.0.3") <= 4
                assert node.host.refused.get("inbound_per_ip_limit", 0) >= 4
                # honest nodes on 127.0.0.1 are not affected
                async with Node(
                    make_home(tmp_path / "h1"), join=[join_addr(node)], services=light_services()
                ) as h1:
                    assert h1.joined_via == join_addr(node)
                assert await _honest_dials(node, 6) == 6


@pytest.mark.parametrize("protocol", [CLIENT_PROTOCOL, LIVENESS_PROTOCOL])
async def test_idle_streams_of_two_identities_leave_slots(tmp_path, protocol) -> None:
    """2 identities x 128 idle streams of one protocol hold only their per-peer share;
    an honest light client still gets a session and an honest node still joins."""
    async with Node(make_home(tmp_path / "n"), services=light_services()) as node:
        relay = node.relay
        per_peer = node.host._max_streams_per_protocol
        attackers = [_attacker("127.0.0.2", max_streams_per_conn=128) for _ in range(2)]
        async with contextlib.AsyncExitStack() as stack:
            for a in attackers:
                await stack.enter_async_context(a)
            held = []
            in_use = []

            async def hold(a: Libp2pHost) -> None:
                with contextlib.suppress(NetError):
                    held.append(await a.open_stream(node.node_id.peer_id(), protocol))

            with trio.fail_after(120):
                for a in attackers:
                    await a.connect(join_addr(node))
                    async with trio.open_nursery() as n:
                        for _ in range(128):
                            n.start_soon(hold, a)
                    in_use.append(node.host._slots.inbound_in_use(a.peer_id, protocol))
                # the host never serves more than per_peer of them at once per identity
                assert max(in_use) <= per_peer
                if protocol == LIVENESS_PROTOCOL:  # held open by the service: refused
                    assert node.host.refused.get("stream_limit", 0) >= 2 * (128 - per_peer) - 16
                assert len(relay._sessions) <= 2 * per_peer < relay.max_clients
                # an honest light client still gets a session
                before = len(relay._sessions)
                async with Libp2pHost(SigningKey.generate(), [TCP]) as honest:
                    await honest.connect(join_addr(node))
                    async with await honest.open_stream(node.node_id.peer_id(), CLIENT_PROTOCOL):
                        await wait_until(lambda: len(relay._sessions) >= before + 1, 10)
                # and an honest node joins (one anti-entropy round on its own slots)
                async with Node(
                    make_home(tmp_path / "h"), join=[join_addr(node)], services=light_services()
                ) as h:
                    assert h.joined_via == join_addr(node)
            for st in held:
                await st.close()
        await wait_until(lambda: not relay._sessions, 30)


async def _sync_garbage_until_dropped(attacker: Libp2pHost, node: Node) -> int:
    """Open sync streams carrying garbage until the node drops us; return how many."""
    sent = 0
    for _ in range(40):
        if node.node_id.peer_id() not in attacker.connected_peers():
            break
        with contextlib.suppress(NetError):
            async with await attacker.open_stream(
                node.node_id.peer_id(), SYNC_PROTOCOL, timeout=2.0
            ) as s:
                await s.write(encode_frame(b"\xff" * 40))
                sent += 1
                with trio.move_on_after(2.0):
                    while await s.read():
                        pass
        await trio.sleep(0.05)
    return sent


async def test_penalised_peer_is_banned_and_its_reconnect_refused(tmp_path) -> None:
    async with Node(make_home(tmp_path / "n"), services=light_services()) as node:
        attacker = _attacker("127.0.0.2")
        async with attacker:
            await attacker.connect(join_addr(node))
            with trio.fail_after(90):
                sent = await _sync_garbage_until_dropped(attacker, node)
                await wait_until(lambda: node.host.is_banned(attacker.peer_id), 10)
            assert 0 < sent < 40
            assert node.metrics.disconnects._value.get() >= 1
            await wait_until(lambda: attacker.peer_id not in node.host.connected_peers(), 10)
            refused = node.host.refused.get("banned", 0)
            # the same identity dials straight back in: refused after the handshake
            with pytest.raises(DialError):
                await attacker.connect(join_addr(node))
            await trio.sleep(0.3)
            assert attacker.peer_id not in node.host.connected_peers()
            assert node.host.refused.get("banned", 0) > refused
            # and the node does not dial it either
            with pytest.raises(DialError, match="banned"):
                await node.host.connect(attacker.listen_addrs()[0])
        # honest peers are not affected
        async with Node(
            make_home(tmp_path / "h"), join=[join_addr(node)], services=light_services()
        ) as honest:
            assert honest.joined_via == join_addr(node)


@contextlib.asynccontextmanager
async def _secp256k1_gossiper():
    """A plain py-libp2p host with a secp256k1 key (not a Hydra identity) in RECORDS_TOPIC."""
    kp = secp256k1_key_pair(os.urandom(32))
    listen = [multiaddr.Multiaddr(TCP)]
    sec = {NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=x25519_key_pair().private_key)}
    host = new_host(key_pair=kp, sec_opt=sec, listen_addrs=listen)
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1
    )
    pubsub = Pubsub(host, router)
    async with host.run(listen):
        try:
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                await pubsub.subscribe(RECORDS_TOPIC)
                yield host, pubsub
        finally:
            await host.close()


async def test_garbage_from_a_non_ed25519_peer_is_penalised(tmp_path) -> None:
    async with Node(make_home(tmp_path / "n"), services=light_services()) as node:
        async with _secp256k1_gossiper() as (host, pubsub):
            peer = str(host.get_id())
            addr = multiaddr.Multiaddr(join_addr(node))
            await host.connect(PeerInfo(ID.from_base58(node.node_id.peer_id()), [addr]))
            node_id = ID.from_base58(node.node_id.peer_id())
            await wait_until(lambda: node_id in pubsub.peer_topics.get(RECORDS_TOPIC, ()), 15)
            with trio.fail_after(60):
                for i in range(40):
                    if node.host.is_banned(peer):
                        break
                    with contextlib.suppress(Exception):
                        await pubsub.publish(RECORDS_TOPIC, b"\xa1garbage" + bytes([i]))
                    await trio.sleep(0.1)
            assert node.host.is_banned(peer)
            rejected = node.metrics.records_rejected.labels("gossip", Reason.MALFORMED.value)
            assert rejected._value.get() >= 1
            await wait_until(lambda: peer not in node.host.connected_peers(), 10)
