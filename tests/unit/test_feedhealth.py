"""The sans-I/O feed health core (overlay/core/feedhealth.py) and the dial policy."""

from __future__ import annotations

import random

import pytest

from overlay.core.feedhealth import (
    Backoff,
    ConnSample,
    FeedState,
    FeedTable,
    RelayCandidate,
    choose_relays,
    expand_listen,
    feed_ip,
    feed_port,
    feed_transport,
    relay_feed,
    relay_of,
    usable_addresses,
)
from overlay.records import MAX_FEEDS, check_feed
from overlay.services.feeds import DialMemory

RELAY1 = "12D3KooWGrZjCkWB1MKKbKEN9kKZ8N7gbtV7zWmFuQmevCExE9NU"
RELAY2 = "12D3KooWHMdjjz1DiS8heWeexGudmXJ99ETneVW691X6b3n5LTsw"

A_TCP = "/ip4/10.11.2.2/tcp/4001"
A_QUIC = "/ip4/10.11.2.2/udp/4001/quic-v1"
A_WS = "/ip4/10.11.2.2/tcp/4002/ws"
B_TCP = "/ip4/10.12.2.2/tcp/4001"
R1 = f"/ip4/10.11.1.2/tcp/4001/p2p/{RELAY1}/p2p-circuit"
R2 = f"/ip4/10.12.3.2/tcp/4001/p2p/{RELAY2}/p2p-circuit"


def test_usable_addresses():
    addrs = {
        "lo": ["127.0.0.1", "::1"],
        "ethA": ["10.11.2.2", "fe80::1%ethA"],
        "ethB": ["10.12.2.2"],
        "ethC": ["10.13.2.2", "not an address"],
        "ethD": ["10.11.2.2"],  # the same address on a device that is down
        "eth9": [],
    }
    running = {"lo": True, "ethA": True, "ethB": False, "ethD": False}  # ethC unknown
    assert usable_addresses(addrs, running) == {
        "127.0.0.1": True,
        "::1": True,
        "10.11.2.2": True,
        "10.12.2.2": False,
        "10.13.2.2": False,
    }
    assert usable_addresses({}, {}) == {}


def test_local_addresses_of_this_machine():
    """Read through psutil (no process spawned): loopback is there and usable."""
    from overlay.services.feeds import _read_interfaces

    found = _read_interfaces()
    assert found is not None and found.get("127.0.0.1") is True


def test_multiaddr_helpers():
    assert feed_ip(A_TCP) == "10.11.2.2"
    assert feed_port(A_QUIC) == 4001
    assert [feed_transport(f) for f in (A_TCP, A_QUIC, A_WS, R1)] == ["tcp", "quic", "ws", "relay"]
    assert relay_of(R1) == RELAY1 and relay_of(A_TCP) is None
    feed = relay_feed(f"/ip4/10.11.1.2/tcp/4001/p2p/{RELAY1}", RELAY1)
    assert feed == R1
    assert check_feed(feed) == feed  # a relay feed is a valid record feed


def test_expand_listen_wildcards_and_skips_port_zero():
    local = {"127.0.0.1": True, "10.11.2.2": True, "10.12.2.2": False}
    got = expand_listen(
        ["/ip4/0.0.0.0/tcp/4001/p2p/x", "/ip4/0.0.0.0/udp/4001/quic-v1", "/ip4/1.2.3.4/tcp/0"],
        local,
    )
    assert got == [
        "/ip4/10.11.2.2/tcp/4001",
        "/ip4/10.12.2.2/tcp/4001",
        "/ip4/10.11.2.2/udp/4001/quic-v1",
        "/ip4/10.12.2.2/udp/4001/quic-v1",
    ]
    # only loopback: a wildcard falls back to it
    assert expand_listen(["/ip4/0.0.0.0/tcp/5"], {"127.0.0.1": True}) == ["/ip4/127.0.0.1/tcp/5"]


def table_with(listen=(A_TCP, A_QUIC, B_TCP), local=None, now=0.0, **kw) -> FeedTable:
    t = FeedTable(**kw)
    t.update_local(list(listen), local or {"10.11.2.2": True, "10.12.2.2": True}, now)
    return t


def test_link_down_drops_feed_and_restore_brings_it_back():
    t = table_with()
    assert t.announced() == [A_TCP, A_QUIC, B_TCP]
    t.take_events()
    t.update_local([A_TCP, A_QUIC, B_TCP], {"10.11.2.2": False, "10.12.2.2": True}, 5.0)
    assert t.announced() == [B_TCP]
    assert t.take_events() == [(A_TCP, "up", "down"), (A_QUIC, "up", "down")]
    assert t.rows[A_TCP].since == 5.0
    # address disappears entirely: still down
    t.update_local([A_TCP, A_QUIC, B_TCP], {"10.12.2.2": True}, 6.0)
    assert t.announced() == [B_TCP] and t.take_events() == []
    t.update_local([A_TCP, A_QUIC, B_TCP], {"10.11.2.2": True, "10.12.2.2": True}, 9.0)
    assert t.announced() == [A_TCP, A_QUIC, B_TCP]
    assert t.take_events() == [(A_TCP, "down", "up"), (A_QUIC, "down", "up")]


def test_never_announces_nothing():
    t = table_with()
    t.update_local([A_TCP, A_QUIC, B_TCP], {}, 1.0)
    assert all(r.state is FeedState.DOWN for r in t.rows.values())
    assert t.announced() == [A_TCP, A_QUIC, B_TCP]  # the last non-empty list
    assert t.reachability() == "private"


def test_wildcard_feeds_follow_interfaces():
    listen = ["/ip4/0.0.0.0/tcp/4001"]
    t = FeedTable()
    t.update_local(listen, {"10.11.2.2": True, "10.12.2.2": True}, 0.0)
    assert t.announced() == [A_TCP, B_TCP]
    t.update_local(listen, {"10.12.2.2": True}, 1.0)  # address removed
    assert t.announced() == [B_TCP]
    assert t.rows[A_TCP].state is FeedState.DOWN and not t.rows[A_TCP].present
    t.forget_absent(older_than=10, now=5.0)
    assert A_TCP in t.rows
    t.forget_absent(older_than=10, now=20.0)
    assert A_TCP not in t.rows


def test_announce_config_external_addresses_are_kept_unless_probes_fail():
    t = FeedTable(probe_failures=2)
    public = "/ip4/203.0.113.7/tcp/4001"
    t.update_local([A_TCP], {"10.11.2.2": True}, 0.0, announce=[public, A_TCP])
    assert t.announced() == [public, A_TCP]
    assert t.rows[public].kind == "external" and t.rows[A_TCP].kind == "direct"
    t.probe_result(public, "p1", False, 1.0)
    t.probe_result(public, "p1", False, 2.0)  # same peer twice counts once
    assert t.rows[public].state is FeedState.UP
    t.probe_result(public, "p2", False, 3.0)
    assert t.rows[public].state is FeedState.UNREACHABLE
    assert t.announced() == [A_TCP]
    t.probe_result(public, "p3", True, 4.0)
    assert t.rows[public].state is FeedState.UP and t.rows[public].failures == set()
    assert t.announced() == [public, A_TCP]


def test_probe_success_in_between_resets_failures_and_sets_public():
    t = table_with()
    assert t.reachability() == "unknown"
    t.probe_result(A_TCP, "p1", False, 1.0)
    t.probe_result(A_TCP, "p2", True, 2.0)
    t.probe_result(A_TCP, "p3", False, 3.0)
    assert t.rows[A_TCP].state is FeedState.UP
    assert t.reachability() == "public"
    # a down feed ignores probe failures
    t.update_local([A_TCP, A_QUIC, B_TCP], {"10.12.2.2": True}, 4.0)
    t.probe_result(A_TCP, "p1", False, 5.0)
    t.probe_result(A_TCP, "p2", False, 5.0)
    assert t.rows[A_TCP].state is FeedState.DOWN


def test_relay_feeds_and_slots():
    many = [f"/ip4/10.11.2.2/tcp/{4000 + i}" for i in range(8)]
    t = FeedTable(relay_slots=2)
    t.update_local(many, {"10.11.2.2": True}, 0.0)
    assert t.announced() == many
    t.update_relays({R1: 1000.0, R2: 1000.0}, 1.0)
    ann = t.announced()
    assert len(ann) == MAX_FEEDS and ann[-2:] == [R1, R2] and ann[:6] == many[:6]
    assert t.rows[R1].last_ok == 1.0
    r3 = relay_feed(
        "/ip4/10.13.1.2/tcp/4001", "12D3KooWQ2G6mf7x8iuqM3e42Wfbb7s8QSWLVo5WnRKDRehowMM2"
    )
    t.update_relays({R1: 1000.0, R2: 1000.0, r3: 1000.0}, 1.5)  # never more than relay_slots
    assert t.announced()[-2:] == [R1, R2] and r3 not in t.announced()
    t.update_relays({R1: 1000.0, R2: 1000.0}, 1.6)
    t.update_relays({R2: 1000.0}, 2.0)  # lost R1's reservation
    assert t.rows[R1].state is FeedState.DOWN
    assert t.announced()[-1] == R2 and R1 not in t.announced()
    t.update_relays({R2: 1600.0}, 3.0)  # refreshed
    assert t.rows[R2].last_ok == 3.0 and t.rows[R2].expires_at == 1600.0
    # all direct feeds down: relay feeds alone
    t.update_local(many, {}, 4.0)
    assert t.announced() == [R2]
    assert t.reachability() == "private"


def test_connections_are_attributed_to_feeds_with_traffic():
    t = table_with(listen=(A_TCP, A_QUIC, A_WS, B_TCP))
    t.update_relays({R1: 1e9}, 0.0)
    samples = [
        ConnSample(1, "tcp", "inbound", ("10.11.2.2", 4001), None, 100, 50),
        ConnSample(2, "ws", "inbound", ("10.11.2.2", 4002), None, 10, 5),
        ConnSample(3, "tcp", "outbound", ("10.12.2.2", 40123), None, 7, 3),
        ConnSample(4, "quic", "inbound", ("10.11.2.2", 4001), None, None, None),
        ConnSample(5, "relay", "inbound", None, RELAY1, None, None),
        ConnSample(6, "tcp", "outbound", ("10.99.0.1", 5555), None, 1, 1),  # no such feed
        ConnSample(7, "relay", "inbound", None, RELAY2, None, None),  # not our relay
    ]
    t.observe_connections(samples, 1.0)
    rows = t.rows
    assert (rows[A_TCP].conns, rows[A_TCP].bytes_in, rows[A_TCP].bytes_out) == (1, 100, 50)
    assert (rows[A_WS].conns, rows[A_WS].bytes_in) == (1, 10)
    assert (rows[B_TCP].conns, rows[B_TCP].bytes_in) == (1, 7)
    assert (rows[A_QUIC].conns, rows[A_QUIC].bytes_in) == (1, None)
    assert rows[R1].conns == 1
    assert rows[A_TCP].last_ok == 1.0 and rows[A_QUIC].last_ok == 1.0
    # next sample: deltas are added, a closed connection keeps its bytes counted
    t.observe_connections(
        [ConnSample(1, "tcp", "inbound", ("10.11.2.2", 4001), None, 130, 60)], 2.0
    )
    assert (rows[A_TCP].bytes_in, rows[A_TCP].bytes_out, rows[A_TCP].conns) == (130, 60, 1)
    assert rows[B_TCP].conns == 0 and rows[B_TCP].bytes_in == 7
    # no bytes received: the feed gets no new "last ok"
    t.observe_connections(
        [ConnSample(1, "tcp", "inbound", ("10.11.2.2", 4001), None, 130, 90)], 3.0
    )
    assert rows[A_TCP].last_ok == 2.0
    status = {r["addr"]: r for r in t.status(4.0)}
    assert status[A_TCP]["traffic"] == "tcp_info" and status[A_TCP]["last_ok"] == 2.0
    assert status[A_QUIC]["traffic"] == "connections" and status[A_QUIC]["bytes_in"] is None
    assert status[R1]["kind"] == "relay" and status[R1]["announced"]


def test_wildcard_quic_socket_matched_by_port_only_when_unique():
    t = table_with(listen=(A_QUIC, "/ip4/10.12.2.2/udp/4001/quic-v1"))
    ambiguous = ConnSample(1, "quic", "outbound", ("0.0.0.0", 4001), None, None, None)
    assert t.match(ambiguous) is None
    t2 = table_with(listen=(A_QUIC, B_TCP))
    assert t2.match(ambiguous).addr == A_QUIC


def test_choose_relays_prefers_diverse_networks():
    rng = random.Random(1)
    cands = [
        RelayCandidate("a1", frozenset({"ip4:10.11"}), connected=True),
        RelayCandidate("a2", frozenset({"ip4:10.11"})),
        RelayCandidate("b1", frozenset({"ip4:10.12"})),
        RelayCandidate("ab", frozenset({"ip4:10.11", "ip4:10.12"})),
    ]
    assert choose_relays(cands, {}, 2, rng)[0] == "ab"
    # holding a 10.11 relay: the next one should bring 10.12
    assert choose_relays(cands, {"a1": frozenset({"ip4:10.11"})}, 2, rng) == ["b1"] or (
        choose_relays(cands, {"a1": frozenset({"ip4:10.11"})}, 2, rng) == ["ab"]
    )
    assert choose_relays(cands, {"x": frozenset(), "y": frozenset()}, 2, rng) == []
    # avoid our own networks when all else is equal
    own = frozenset({"ip4:10.11"})
    two = [
        RelayCandidate("a", frozenset({"ip4:10.11"})),
        RelayCandidate("b", frozenset({"ip4:10.12"})),
    ]
    assert choose_relays(two, {}, 1, rng, own_networks=own) == ["b"]


def test_backoff():
    b = Backoff(base=2.0, cap=8.0)
    assert b.ready("r", 0.0)
    assert b.failed("r", 0.0) == 2.0 and not b.ready("r", 1.0) and b.ready("r", 2.0)
    assert b.failed("r", 2.0) == 4.0
    assert b.failed("r", 6.0) == 8.0 and b.failed("r", 14.0) == 8.0
    b.ok("r")
    assert b.ready("r", 14.0) and b.failed("r", 14.0) == 2.0


def test_dial_memory_orders_feeds():
    m = DialMemory(fail_memory=30.0)
    feeds = [R1, A_WS, A_QUIC, A_TCP]
    assert m.order("p", feeds, 0.0) == [A_TCP, A_QUIC, A_WS, R1]
    m.succeeded("p", A_WS)
    assert m.order("p", feeds, 1.0)[0] == A_WS
    m.failed("p", A_WS, 2.0)
    m.failed("p", A_TCP, 2.0)
    assert m.good("p") is None
    assert m.order("p", feeds, 3.0) == [A_QUIC, R1, A_TCP, A_WS]
    assert m.order("p", feeds, 40.0) == [A_TCP, A_QUIC, A_WS, R1]  # failures forgotten


def test_bad_limits():
    with pytest.raises(ValueError):
        FeedTable(max_feeds=9)


async def test_dial_back_rounds_back_off_while_nothing_changes_and_return_on_a_change(
    autojump_clock,
):
    """A round that confirmed every feed doubles the wait (to the cap); one that
    changed something, or a change of the direct feeds, brings the base back."""
    import trio

    from overlay.services.feeds import PROBE_SOON, FeedMonitor

    m = FeedMonitor(probe_interval=1.0, probe_max_interval=8.0, rng=random.Random(3))
    t = m.table
    t.update_local(["/ip4/10.0.0.1/tcp/4001"], {"10.0.0.1": True}, 0.0)
    feed = "/ip4/10.0.0.1/tcp/4001"
    rounds: list[float] = []
    fail = [False]

    async def probe_round() -> int:
        rounds.append(trio.current_time())
        t.probe_result(feed, f"p{len(rounds)}", not fail[0], trio.current_time())
        return 1

    m.probe_round = probe_round
    async with trio.open_nursery() as n:
        n.start_soon(m._probe_loop)
        await trio.sleep(40)
        gaps = [b - a for a, b in zip(rounds, rounds[1:], strict=False)]
        # 2, 4, 8 (±25 %), then at the cap
        assert [round(g / 2 ** min(i + 1, 3), 1) for i, g in enumerate(gaps)] == [
            pytest.approx(1.0, abs=0.26)
        ] * len(gaps)
        assert len(gaps) >= 5
        fail[0] = True  # the next rounds find the feed unreachable: base interval
        last = len(rounds)
        await trio.sleep(15)
        gaps = [b - a for a, b in zip(rounds[last:], rounds[last + 1 :], strict=False)]
        assert gaps and all(g <= 1.25 for g in gaps)
        fail[0] = False
        await trio.sleep(30)  # settled again, backed off again
        at = trio.current_time()
        m._probe_soon.set()  # e.g. a new address
        await trio.sleep(PROBE_SOON + 0.5)
        assert rounds[-1] >= at
        n.cancel_scope.cancel()
