"""Feed links on 127.0.0.1: circuit relay v2, AutoNAT, DCUtR, connection accounting,
the feed monitor and the happy-eyeballs dial policy.

Tests named ``test_upstream_*`` are canaries for the py-libp2p 0.8.1 behaviour a
WORKAROUND in ``overlay/net/`` exists for (see tests/integration/test_host.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.tools.anyio_service import background_trio_service

from overlay.core.feedhealth import relay_of
from overlay.crypto import SigningKey
from overlay.net.host import (
    TCP_USER_TIMEOUT_MS,
    Libp2pHost,
    RelayError,
    ReservationError,
)
from overlay.net.sockets import _conn_socket
from overlay.records import Role
from overlay.runtime import Node
from overlay.services.feeds import FeedMonitor, dial_record
from overlay.testing import light_services, make_home, overlay, silent_listener, wait_until

TCP = "/ip4/127.0.0.1/tcp/0"
ECHO = "/hydra-test/echo/1.0.0"
DEAD = "/ip4/127.0.0.1/tcp/9"  # discard port: nobody listens in the test environment


@pytest.fixture(autouse=True)
def _quiet_libp2p() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def make_host(*, relay: bool | None = None, dcutr: bool = False, autonat: bool = False, **kw):
    kw.setdefault("dial_timeout", 3.0)
    kw.setdefault("enable_dht", False)
    h = Libp2pHost(SigningKey.generate(), kw.pop("listen", [TCP]), **kw)
    if relay is not None:
        h.enable_relay(hop=relay)
    if dcutr:
        h.enable_dcutr()
    if autonat:
        h.enable_autonat()
    return h


@contextlib.asynccontextmanager
async def running(*hosts: Libp2pHost) -> AsyncIterator[tuple[Libp2pHost, ...]]:
    async with contextlib.AsyncExitStack() as stack:
        for h in hosts:
            await stack.enter_async_context(h)
        yield hosts


async def echo(stream, peer: str) -> None:
    data = await stream.read()
    await stream.write(b"echo:" + data)


async def roundtrip(a: Libp2pHost, b: Libp2pHost, payload: bytes = b"hello") -> bytes:
    async with await a.open_stream(b.peer_id, ECHO) as st:
        await st.write(payload)
        await st.close_write()
        want, out = len(payload) + 5, b""
        while len(out) < want and (chunk := await st.read()):
            out += chunk
        return out


def socket_of(host: Libp2pHost, peer_id: str):
    for conn in host._swarm.connections.get(ID.from_base58(peer_id), []):
        found = _conn_socket(conn)
        if found is not None:
            return found[0]
    raise AssertionError("no direct connection")


# ---- circuit relay v2 ---------------------------------------------------------------


async def test_circuit_through_a_reservation() -> None:
    relay, target, dialer = make_host(relay=True), make_host(relay=False), make_host(relay=False)
    target.set_stream_handler(ECHO, echo)
    async with running(relay, target, dialer):
        relay_addr = relay.listen_addrs()[0]
        await target.connect(relay_addr)
        r = await target.reserve(relay.peer_id)
        assert r.relay_peer_id == relay.peer_id and r.expires_at > time.time() + 60
        assert r.relay_addrs == (relay_addr,)
        assert relay.relay_stats()["reservations"] == 1
        assert set(target.reservations()) == {relay.peer_id}
        with trio.fail_after(10):
            peer = await dialer.connect(f"{relay_addr}/p2p-circuit/p2p/{target.peer_id}")
        assert peer == target.peer_id
        assert await roundtrip(dialer, target) == b"echo:hello"
        (out,) = [c for c in dialer.connections() if c.peer_id == target.peer_id]
        assert (out.transport, out.relay_peer_id, out.direction) == (
            "relay",
            relay.peer_id,
            "outbound",
        )
        assert out.remote.endswith(f"/p2p-circuit/p2p/{target.peer_id}")
        (inb,) = [c for c in target.connections() if c.peer_id == dialer.peer_id]
        assert (inb.transport, inb.relay_peer_id) == ("relay", relay.peer_id)
        assert target.connection_addrs(dialer.peer_id) == [inb.remote]
        assert [c.key for c in target.connections(dialer.peer_id)] == [inb.key]
        assert target.connection_keys(dialer.peer_id) == {inb.key}
        assert target.connections("not a peer id") == []
        # an existing connection to the relay is enough: no address needed
        again = make_host(relay=False)
        async with running(again):
            await again.connect(relay_addr)
            await again.connect(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{target.peer_id}")
            assert target.peer_id in again.connected_peers()


async def test_relayed_inbound_conn_names_the_relay() -> None:
    """WORKAROUND (relayed inbound address): the target sees which relay a circuit used."""
    relay, target, dialer = make_host(relay=True), make_host(relay=False), make_host(relay=False)
    async with running(relay, target, dialer):
        await target.connect(relay.listen_addrs()[0])
        await target.reserve(relay.peer_id)
        await dialer.connect(f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{target.peer_id}")
        addrs = [
            str(a)
            for c in target._swarm.connections[ID.from_base58(dialer.peer_id)]
            for a in c.get_transport_addresses()
        ]
        assert addrs == [f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{dialer.peer_id}"]


async def test_upstream_relayed_inbound_conn_names_itself_as_relay() -> None:
    relay, target, dialer = make_host(relay=True), make_host(), make_host(relay=False)
    async with running(relay, target, dialer):
        upstream = CircuitV2Protocol(target._host, allow_hop=False)
        async with background_trio_service(upstream):
            await upstream.event_started.wait()
            await target.connect(relay.listen_addrs()[0])
            await _raw_reserve(target, relay)
            await dialer.connect(f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{target.peer_id}")
            addrs = [
                str(a)
                for c in target._swarm.connections[ID.from_base58(dialer.peer_id)]
                for a in c.get_transport_addresses()
            ]
            assert addrs == [f"/p2p/{target.peer_id}/p2p-circuit/p2p/{dialer.peer_id}"]


async def _raw_reserve(host: Libp2pHost, relay: Libp2pHost) -> None:
    # reserve() refuses without enable_relay(); do the same exchange by hand.
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    raw = await host._host.new_stream(ID.from_base58(relay.peer_id), [PROTOCOL_ID])
    await write_delimited_msg(raw, HopMessage(type=HopMessage.RESERVE))
    resp = await read_delimited_msg(raw, HopMessage)
    assert resp.status == 100
    await raw.close()


async def test_circuit_refusals() -> None:
    relay, target, dialer = make_host(relay=True), make_host(relay=False), make_host(relay=False)
    plain = make_host(relay=False)  # relays nothing
    async with running(relay, target, dialer, plain):
        relay_addr = relay.listen_addrs()[0]
        with pytest.raises(RelayError) as info:
            await dialer.connect(f"{relay_addr}/p2p-circuit/p2p/{target.peer_id}")
        assert info.value.status == "NO_RESERVATION"
        await target.connect(plain.listen_addrs()[0])
        with pytest.raises(ReservationError):
            await target.reserve(plain.peer_id)
        assert target.reservations() == {}
        # a reservation dies with the connection to the relay
        await target.connect(relay_addr)
        await target.reserve(relay.peer_id)
        await target.disconnect(relay.peer_id)
        assert target.reservations() == {}
        with pytest.raises(RelayError):
            await dialer.connect(f"{relay_addr}/p2p-circuit/p2p/{target.peer_id}")


async def test_reserve_needs_enable_relay() -> None:
    a, b = make_host(), make_host(relay=True)
    async with running(a, b):
        await a.connect(b.listen_addrs()[0])
        with pytest.raises(Exception, match="enable_relay"):
            await a.reserve(b.peer_id)
    with pytest.raises(Exception, match="before the host starts"):
        a.enable_relay()


# ---- DCUtR ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_dcutr_upgrades_a_relayed_connection() -> None:
    relay = make_host(relay=True)
    target, dialer = make_host(relay=False, dcutr=True), make_host(relay=False, dcutr=True)
    async with running(relay, target, dialer):
        await target.connect(relay.listen_addrs()[0])
        await target.reserve(relay.peer_id)
        await dialer.connect(f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{target.peer_id}")
        kinds = {c.transport for c in dialer.connections() if c.peer_id == target.peer_id}
        assert kinds == {"relay"}

        def direct() -> bool:
            return any(
                c.transport == "tcp" for c in dialer.connections() if c.peer_id == target.peer_id
            )

        await wait_until(direct, 20)


# ---- AutoNAT ---------------------------------------------------------------------------


async def test_autonat_dials_back_each_address_for_real() -> None:
    """WORKAROUND (AutoNAT dial-back): a dead address is reported as such."""
    server, client = make_host(autonat=True), make_host()
    async with running(server, client):
        await client.connect(server.listen_addrs()[0])
        live = client.listen_addrs()[0]
        res = await client.autonat_probe(server.peer_id, [live])
        assert res.status == "ok" and res.addr == live.split("/p2p/")[0]
        assert (await client.autonat_probe(server.peer_id, [DEAD])).status == "dial_error"
        # the spec's rule: only the requester's observed IP is dialed
        assert (await client.autonat_probe(server.peer_id, ["/ip4/10.9.9.9/tcp/1"])).status == (
            "refused"
        )
        # the dial-back connection was closed again; ours is intact
        await wait_until(
            lambda: len([c for c in client.connections() if c.peer_id == server.peer_id]) == 1, 5
        )


async def test_autonat_allow_policy_extends_dialable_addresses() -> None:
    allowed: list[tuple[str, str]] = []

    def allow(peer: str, addr: str) -> bool:
        allowed.append((peer, addr))
        return addr.startswith("/ip4/10.9.9.9/")

    server, client = make_host(dial_timeout=1.0), make_host()
    server.enable_autonat(allow)
    async with running(server, client):
        await client.connect(server.listen_addrs()[0])
        res = await client.autonat_probe(server.peer_id, ["/ip4/10.9.9.9/tcp/1"])
        assert res.status == "dial_error"  # it was dialed (and failed), not refused
        assert allowed == [(client.peer_id, "/ip4/10.9.9.9/tcp/1")]


async def test_upstream_autonat_dial_back_reuses_connection() -> None:
    client = make_host()
    async with running(client), raw_host() as upstream:
        AutoNATService(upstream)
        server_addr = f"{upstream.get_transport_addrs()[0]}/p2p/{upstream.get_id()}"
        await client.connect(server_addr)
        res = await client.autonat_probe(str(upstream.get_id()), [DEAD])
        assert res.status == "ok"  # nothing listens there, yet "reachable"


# ---- connections -------------------------------------------------------------------------


async def test_tcp_connections_get_keepalive() -> None:
    """WORKAROUND (dead connections): keepalive and a user timeout on every TCP socket."""
    a, b = make_host(listen=[TCP, "/ip4/127.0.0.1/tcp/0/ws"]), make_host()
    async with running(a, b):
        for addr in a.listen_addrs():
            await b.connect(addr, reuse=False)
        await trio.sleep(0.1)
        socks = [
            _conn_socket(c)
            for conns in a._swarm.connections.values()
            for c in conns
            if _conn_socket(c) is not None
        ]
        assert {kind for _, kind in socks} == {"tcp", "ws"}
        for sock, _ in socks:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert timeout == TCP_USER_TIMEOUT_MS


async def test_upstream_tcp_has_no_keepalive() -> None:
    async with raw_host() as x, raw_host() as y:
        await y.connect(PeerInfo(x.get_id(), x.get_transport_addrs()))
        (conn,) = y.get_network().connections[x.get_id()]
        sock, _ = _conn_socket(conn)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


async def test_connection_info_and_close_by_local_address() -> None:
    quic = "/ip4/127.0.0.1/udp/0/quic-v1"
    a = make_host(listen=[TCP, quic, "/ip4/127.0.0.1/tcp/0/ws"])
    b = make_host()
    async with running(a, b):
        for addr in a.listen_addrs():
            await b.connect(addr, reuse=False)
        await roundtrip_setup(a, b)
        infos = [c for c in a.connections() if c.peer_id == b.peer_id]
        assert sorted(c.transport for c in infos) == ["quic", "tcp", "ws"]
        for c in infos:
            assert c.direction == "inbound" and c.local[0] == "127.0.0.1"
            if c.transport == "quic":
                assert c.bytes_in is None
            else:
                assert c.bytes_in > 0 and c.bytes_out > 0
                assert c.remote.startswith("/ip4/127.0.0.1/tcp/")
        assert len(a.connection_addrs(b.peer_id)) == 3
        assert await a.close_connections_from("10.99.99.99") == 0
        assert await a.close_connections_from("127.0.0.1") == 3
        await wait_until(lambda: b.peer_id not in a.connected_peers(), 5)


async def roundtrip_setup(a: Libp2pHost, b: Libp2pHost) -> None:
    a.set_stream_handler(ECHO, echo)
    assert await roundtrip(b, a) == b"echo:hello"


@contextlib.asynccontextmanager
async def raw_host():
    """An unmodified py-libp2p host."""
    kp = create_new_key_pair(os.urandom(32))
    listen = [multiaddr.Multiaddr(TCP)]
    h = new_host(key_pair=kp, listen_addrs=listen)
    async with h.run(listen):
        try:
            yield h
        finally:
            await h.close()


# ---- the feed monitor and the dial policy --------------------------------------------------


def relay_feeds(node) -> list[str]:
    return [f for f in (node.own.feeds if node.own else ()) if "/p2p-circuit" in f]


@pytest.mark.slow
async def test_monitor_holds_two_relay_reservations_and_is_reachable_through_them(tmp_path):
    def services(i, home):
        return [FeedMonitor(probe_interval=0)]

    roles = [["relay"], ["relay"], ["relay"], ["entry"]]
    async with overlay(tmp_path, 4, roles=roles, services_for=services) as nodes:
        home = nodes[3]
        await wait_until(lambda: len(relay_feeds(home)) == 2, 20)
        feeds = relay_feeds(home)
        relays = {relay_of(f) for f in feeds}
        assert len(relays) == 2 and home.node_id.peer_id() not in relays
        for n in nodes[:3]:
            assert n.host.relay_hop
        assert not home.host.relay_hop
        rows = {r["addr"]: r for r in home.status()["feeds"]}
        for f in feeds:
            assert rows[f]["state"] == "up" and rows[f]["kind"] == "relay"
            assert rows[f]["announced"] and rows[f]["expires_in"] > 60
        # the others learn the relay feeds from the record
        await wait_until(lambda: all(relay_feeds_of(n, home) == set(feeds) for n in nodes[:3]), 10)
        # a newcomer with no direct route to it connects through a relay feed
        stranger = Libp2pHost(SigningKey.generate(), [TCP], enable_dht=False, dial_timeout=3)
        stranger.enable_relay()
        async with stranger:
            with trio.fail_after(10):
                await stranger.connect(f"{feeds[0]}/p2p/{home.node_id.peer_id()}")
            (c,) = [x for x in stranger.connections() if x.peer_id == home.node_id.peer_id()]
            assert c.transport == "relay"
        # lose one relay: the monitor replaces it with the third
        gone = relay_of(feeds[0])
        (monitor,) = [s for s in home.services if isinstance(s, FeedMonitor)]
        downs = monitor._metrics["changes"].labels("down")
        before = downs._value.get()
        await home.host.disconnect(gone)
        await wait_until(lambda: gone not in home.host.reservations(), 5)
        # its relay feed goes down at once: the closed connection drops the
        # reservation and brings a scan, long before the periodic one (CONN_EVERY)
        # or the relay loop's own look (a reconnection may bring it back up soon)
        await wait_until(lambda: downs._value.get() > before, 10)
        await wait_until(lambda: len(relay_feeds(home)) == 2, 20)
        # when the lost relay comes back (the peer loop redials it), it does not
        # become a third reservation
        await wait_until(lambda: gone in home.host.connected_peers(), 10)
        await trio.sleep(3)
        assert len(home.host.reservations()) == 2 and len(relay_feeds(home)) == 2


def relay_feeds_of(viewer, node) -> set[str]:
    rec = viewer.view.get(node.node_id)
    return {f for f in rec.feeds if "/p2p-circuit" in f} if rec else set()


def monitor_services(i, home):
    """The feed monitor with relay reservations (no AutoNAT probes)."""
    return [FeedMonitor(probe_interval=0)]


@pytest.mark.slow
async def test_dial_record_skips_dead_feed_and_remembers_the_working_one(tmp_path):
    async with overlay(tmp_path, 2, services_for=lambda i, h: [FeedMonitor(relays=0)]) as (a, b):
        await a.host.disconnect(b.node_id.peer_id())
        await wait_until(lambda: b.node_id.peer_id() not in a.host.connected_peers(), 5)
        live = b.own.feeds[0]
        # the dead feed first, one that accepts TCP and never answers: a dial to it
        # ends only at the dial timeout. Happy eyeballs must not wait for that: the
        # live feed wins while the dead one is still pending (so it is never
        # recorded as failed), which a dialer trying one feed after the other
        # could not do.
        async with silent_listener() as (dead, held):
            feeds = [dead, live]
            record = SimpleNamespace(node_id=b.node_id, feeds=tuple(feeds))
            with trio.fail_after(60):
                assert await dial_record(a, record) == live
            assert held, "the dead feed was dialled first"
        monitor = a.services[[isinstance(s, FeedMonitor) for s in a.services].index(True)]
        peer = b.node_id.peer_id()
        assert not monitor.memory.recently_failed(peer, dead, time.monotonic())
        assert monitor.memory.good(peer) == live
        assert monitor.memory.order(peer, feeds, time.monotonic())[0] == live


async def test_monitor_status_rows_without_reservations(tmp_path):
    async with overlay(
        tmp_path, 1, roles=[["relay"]], services_for=lambda i, h: [FeedMonitor(relays=0)]
    ) as (n,):
        rows = n.status()["feeds"]
        assert [r["addr"] for r in rows] == list(n.own.feeds[:1])
        (row,) = rows
        assert row["state"] == "up" and row["kind"] == "direct" and row["announced"]
        assert set(row) >= {"addr", "network", "state", "last_ok", "bytes_in", "bytes_out"}
        assert Role.RELAY in n.roles and n.host.relay_hop
        assert b"hydra_feeds" in n.metrics.render()


async def test_watched_scans_reuse_the_last_reading_of_the_addresses(tmp_path, monkeypatch):
    """While rtnetlink announces no change, the periodic scans use the last reading
    of the machine's addresses (no read, no worker thread); an announced change
    reads them again, and so does a reading older than LOCAL_EVERY."""
    from overlay.services import feeds

    monitor = FeedMonitor(relays=0, probe_interval=0)
    async with overlay(tmp_path, 1, services_for=lambda i, h: [monitor]):
        reads = []
        real = monitor._local

        async def counted(listen, *, fresh=False):
            reads.append(fresh)
            return await real(listen, fresh=fresh)

        monkeypatch.setattr(monitor, "_local", counted)
        await monitor.scan(watched=True, fresh=True)  # a change was announced: read
        await monitor.scan(watched=True)
        await monitor.scan(watched=True)
        assert reads == [True]  # the two quiet scans read nothing
        await monitor.scan()  # not watched (no rtnetlink): read every time
        assert reads == [True, False]
        monkeypatch.setattr(feeds, "LOCAL_EVERY", 0.0)
        await monitor.scan(watched=True)  # the last reading is too old: read
        assert reads == [True, False, False]
        assert [r["state"] for r in monitor.feed_status()] == ["up"]


@pytest.mark.slow
async def test_dial_record_tries_a_relay_feed_only_after_every_direct_feed_failed(tmp_path):
    """A circuit costs three nodes a handshake: a slow direct feed (here a silent
    one, which fails only at the dial timeout) must not start one in parallel."""

    roles = [["relay"], ["relay"], ["entry"]]
    async with overlay(tmp_path, 3, roles=roles, services_for=monitor_services) as nodes:
        target = nodes[2]
        await wait_until(lambda: len(relay_feeds(target)) == 2, 30)
        via = relay_feeds(target)[0]
        # a node of its own (alone: it dials nobody by itself)
        home = make_home(tmp_path / "dialer", ("entry",))
        async with (
            silent_listener() as (dead, held),
            Node(home, services=light_services()) as dialer,
        ):
            record = SimpleNamespace(node_id=target.node_id, feeds=(dead, via))
            seen: list[tuple[str, str]] = []
            report = dialer.dial_outcome

            def note(feed: str, outcome: str) -> None:
                seen.append(("relay" if feed == via else "direct", outcome))
                report(feed, outcome)

            dialer.dial_outcome = note
            with trio.fail_after(60):
                assert await dial_record(dialer, record) == via
            assert held, "the direct feed was dialled"
        assert seen == [
            ("direct", "started"),
            ("direct", "failed"),
            ("relay", "started"),
            ("relay", "ok"),
        ]


async def test_dial_record_runs_one_dial_per_member_and_finishes_it_for_late_callers(tmp_path):
    """A caller that gives up does not cut the dial short, and callers that come
    while it runs wait for it instead of dialling again."""
    async with overlay(tmp_path, 1) as (target,):
        rec = target.own
        async with Node(
            make_home(tmp_path / "dialer", ("entry",)), services=light_services()
        ) as dialer:
            seen: list[tuple[str, str]] = []
            report = dialer.dial_outcome

            def note(feed: str, outcome: str) -> None:
                seen.append((feed, outcome))
                report(feed, outcome)

            dialer.dial_outcome = note
            with trio.move_on_after(0):  # gives up at once
                await dial_record(dialer, rec)
            results: list[str | None] = []

            async def call() -> None:
                results.append(await dial_record(dialer, rec))

            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    n.start_soon(call)
                    n.start_soon(call)
            assert results == [rec.feeds[0], rec.feeds[0]]
            assert seen == [(rec.feeds[0], "started"), (rec.feeds[0], "ok")]
            assert target.node_id.peer_id() in dialer.host.connected_peers()


async def test_a_joining_node_announces_one_record_with_its_relay_feeds(tmp_path):
    """The record a node starts with has no relay feeds; they come seconds after its
    join. The join's announcement waits for them, so the overlay carries one
    record of the newcomer instead of two."""

    roles = [["relay"], ["relay"], ["relay"]]
    async with overlay(tmp_path, 3, roles=roles, services_for=monitor_services) as nodes:
        new = nodes[2]
        await wait_until(lambda: len(relay_feeds(new)) == 2, 30)
        want = set(relay_feeds(new))
        await wait_until(lambda: all(relay_feeds_of(n, new) == want for n in nodes[:2]), 20)
        await trio.sleep(1)
        gossiped = new.metrics.gossip_messages.labels("out")._value.get()
        assert gossiped == 1, f"{gossiped} records of the newcomer gossiped"
        assert new.own.seq == 2  # the start record, then the one with relay feeds
