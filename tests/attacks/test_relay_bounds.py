"""Relay bounds against one attacker machine: links, next-hop lookups, client slots.

Real nodes on 127.0.0.1; the attacker is a py-libp2p identity on 127.0.0.2/.3
that speaks the relay and client protocols directly. After each attack the
node answers status, honest messages are delivered, and links, sessions and
memory stay within their bounds.
"""

from __future__ import annotations

import gc

import pytest
import trio

from overlay.client import State
from overlay.crypto import OnionKey, SigningKey
from overlay.errors import Reason
from overlay.net.framing import encode_frame, encode_uvarint
from overlay.net.host import Libp2pHost, NetError
from overlay.onion import build_packet
from overlay.onion.params import SMALL, Hop
from overlay.services.relay import CLIENT_PROTOCOL, RELAY_PROTOCOL, RelayService
from overlay.testing import join_addr, light_client, light_services, overlay, wait_until
from overlay.wire.delivery import ExitMessage
from tests.integration.test_relay import (
    FAST_RETRY,
    free_port,
    hop,
    metric,
    rejected,
    settle,
    smtp_server,
)

FIVE = [["relay"]] * 3 + [["exit"]] * 2
FLOOD = 2000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def attacker(ip: str) -> Libp2pHost:
    return Libp2pHost(SigningKey.generate(), [f"/ip4/{ip}/tcp/0"], enable_dht=False)


def closed(node, what: str, why: Reason) -> float:
    return metric(node, "hydra_relay_closed_total", what=what, why=why.value)


def services(port: int, **relay):
    def make(i, home):
        return [
            RelayService(smtp_relay=f"127.0.0.1:{port}", exit_retry=FAST_RETRY, **relay),
            *light_services(),
        ]

    return make


async def honest_message(tmp, entry, sink, body: bytes) -> None:
    async with light_client(tmp, entry, timeout=2.0) as c:
        mid = await c.send("smtp:alice@example.org", body)
        got = await c.wait_acked(mid, 40)
    assert got.state is State.DELIVERED
    assert sink.count(body) == 1


@pytest.mark.slow
async def test_packets_to_fresh_next_hops_open_no_links(tmp_path):
    port = free_port()
    sink, ctl = smtp_server(port)
    try:
        with trio.fail_after(240):
            async with overlay(
                tmp_path, 5, FIVE, policy=["smtp:*"], services_for=services(port)
            ) as nodes:
                await settle(nodes, 5)
                r = nodes[0]
                await honest_message(tmp_path / "c0", r, sink, b"before\r\n")
                gc.collect()
                rss0, links0 = rss_mb(), r.relay.status()["links"]
                # 2,000 valid packets, each naming a fresh node as next hop
                payload = ExitMessage.make(b"f" * 16, "smtp:x@example.org", b"x").encode()
                fresh = [SigningKey.generate().node_id for _ in range(FLOOD)]
                packets = [
                    build_packet(SMALL, [hop(r), Hop(f, OnionKey.generate().public, 1)], payload)[0]
                    for f in fresh
                ]
                peak = 0
                t0 = trio.current_time()
                async with attacker("127.0.0.2") as h:
                    await h.connect(join_addr(r))
                    s = await h.open_stream(r.node_id.peer_id(), RELAY_PROTOCOL)
                    for k in range(0, FLOOD, 100):
                        await s.write(b"".join(encode_frame(p) for p in packets[k : k + 100]))
                        await trio.sleep(0.05)
                        peak = max(peak, r.relay.status()["links"])
                    await wait_until(
                        lambda: metric(r, "hydra_relay_packets_in_total", source="relay") >= FLOOD,
                        60,
                    )
                    elapsed = trio.current_time() - t0
                    peak = max(peak, r.relay.status()["links"])
                    await s.close()
                started = metric(r, "hydra_relay_next_hop_lookups_started_total")
                refused = rejected(r, Reason.UNKNOWN_NEXT_HOP.value)
                # lookups within the budget (burst 4, 1/s), every other packet refused
                assert started <= 4 + elapsed * 1.0 + 1
                assert refused + started >= FLOOD - 1 and refused >= FLOOD - 4 - elapsed - 1
                assert metric(r, "hydra_relay_dials_total") == 0  # nobody dialled
                # links: the honest neighbours plus at most the lookup slots
                assert peak <= links0 + 2 + 2
                assert r.relay.status()["links"] <= r.relay.max_links
                # none of the flood is held for later (the node's own loop cover may be)
                assert not set(fresh) & {node for node, _ in r.relay.mix.held()}
                # honest traffic still flows; the node answers status
                await honest_message(tmp_path / "c1", r, sink, b"after\r\n")
                st = r.status()
                assert st["relay"]["links"] <= links0 + 2 + 2
                await wait_until(lambda: r.relay.status()["lookups"] == 0, 30)
                gc.collect()
                grown = rss_mb() - rss0
                print(
                    f"flood: peak links {peak} (before {links0}), lookups {started:.0f}, "
                    f"refused {refused:.0f}, {elapsed:.1f} s, RSS +{grown:.1f} MB"
                )
                assert grown < 40, f"RSS grew by {grown:.1f} MB"
    finally:
        ctl.stop()


@pytest.mark.slow
async def test_idle_client_streams_from_two_identities_do_not_lock_out(tmp_path):
    port = free_port()
    sink, ctl = smtp_server(port)
    try:
        with trio.fail_after(180):
            async with overlay(
                tmp_path, 5, FIVE, policy=["smtp:*"], services_for=services(port)
            ) as nodes:
                await settle(nodes, 5)
                r = nodes[0]
                per_peer = r.relay.clients_per_peer
                async with attacker("127.0.0.2") as a, attacker("127.0.0.3") as b:
                    held = []
                    for h in (a, b):
                        await h.connect(join_addr(r))
                        for _ in range(64):
                            held.append(await h.open_stream(r.node_id.peer_id(), CLIENT_PROTOCOL))
                    await wait_until(
                        lambda: (
                            rejected(r, Reason.CLIENT_LIMIT.value, "client") >= 2 * (64 - per_peer)
                        ),
                        30,
                    )
                    assert r.relay.status()["clients"] <= 2 * per_peer
                    # an honest light client gets in at once and is served
                    await honest_message(tmp_path / "c", r, sink, b"not locked out\r\n")
                    assert r.status()["relay"]["clients"] <= 2 * per_peer
                    for s in held:
                        await s.reset()
    finally:
        ctl.stop()


@pytest.mark.slow
async def test_idle_and_stalled_streams_closed_and_full_table_evicts(tmp_path):
    port = free_port()
    sink, ctl = smtp_server(port)
    short = dict(client_idle=2.0, frame_timeout=1.0, max_clients=6, client_evict_idle=0.5)
    try:
        with trio.fail_after(180):
            async with overlay(
                tmp_path, 5, FIVE, policy=["smtp:*"], services_for=services(port, **short)
            ) as nodes:
                await settle(nodes, 5)
                r = nodes[0]
                pid = r.node_id.peer_id()
                async with attacker("127.0.0.2") as a, attacker("127.0.0.3") as b:
                    await a.connect(join_addr(r))
                    await b.connect(join_addr(r))
                    # silent sessions are closed after client_idle
                    idle = [await a.open_stream(pid, CLIENT_PROTOCOL) for _ in range(3)]
                    await wait_until(lambda: r.relay.status()["clients"] == 3, 10)
                    await wait_until(lambda: r.relay.status()["clients"] == 0, 10)
                    assert closed(r, "client", Reason.IDLE_TIMEOUT) == 3
                    # a frame begun and never finished: closed after frame_timeout
                    cs = await b.open_stream(pid, CLIENT_PROTOCOL)
                    rs = await b.open_stream(pid, RELAY_PROTOCOL)
                    for s in (cs, rs):
                        await s.write(encode_uvarint(SMALL.packet_size + 1) + b"\x01" * 10)
                    with trio.fail_after(10):
                        for s in (cs, rs):
                            try:
                                while await s.read(1024):
                                    pass
                            except NetError:
                                pass
                    assert closed(r, "client", Reason.IDLE_TIMEOUT) == 4
                    assert closed(r, "relay_stream", Reason.IDLE_TIMEOUT) == 1
                    for s in (*idle, cs, rs):
                        await s.reset()

                    # a full table: the session idle longest makes room for a newcomer
                    r.relay.client_idle = 120.0
                    held = [await a.open_stream(pid, CLIENT_PROTOCOL) for _ in range(4)]
                    held += [await b.open_stream(pid, CLIENT_PROTOCOL) for _ in range(2)]
                    await wait_until(lambda: r.relay.status()["clients"] == 6, 10)
                    await trio.sleep(1.0)
                    await honest_message(tmp_path / "c", r, sink, b"room made\r\n")
                    assert closed(r, "client", Reason.CLIENT_LIMIT) >= 1
                    assert r.relay.status()["clients"] <= 6
                    for s in held:
                        await s.reset()
    finally:
        ctl.stop()


@pytest.mark.slow
async def test_link_cap_closes_least_recently_used_idle_link(tmp_path):
    with trio.fail_after(180):
        four = [["relay"]] * 4

        def make(i, home):
            # no loop cover: only the attacker's packets open links here
            cap = 2 if i == 0 else None
            return [RelayService(max_links=cap, loop_rate=0.0), *light_services()]

        async with overlay(tmp_path, 4, four, services_for=make) as nodes:
            await settle(nodes, 4)
            r, others = nodes[0], nodes[1:]
            async with attacker("127.0.0.2") as h:
                await h.connect(join_addr(r))
                s = await h.open_stream(r.node_id.peer_id(), RELAY_PROTOCOL)
                for round_ in range(2):
                    for i, n in enumerate(others):
                        msg = ExitMessage.make(
                            bytes([round_, i]) * 8, "smtp:x@example.org", b"x"
                        ).encode()
                        pkt, _ = build_packet(SMALL, [hop(r), hop(n)], msg)
                        await s.write(encode_frame(pkt))
                        await wait_until(
                            lambda n=n, k=round_: rejected(n, "not_exit", "exit") == k + 1, 20
                        )
                        assert r.relay.status()["links"] <= 2
                assert closed(r, "link", Reason.LINK_LIMIT) >= 4
                await s.close()
