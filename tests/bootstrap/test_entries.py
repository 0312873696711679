"""Choosing healthy, diverse entry peers from a node's /records view."""

from __future__ import annotations

from bootstrap.entries import choose_entries, components, is_public, network_group, transport

from .helpers import key

RELAY = key(150).node_id.peer_id()


def test_address_classification():
    assert components("/ip4/1.2.3.4/udp/9/quic-v1") == [
        ("ip4", "1.2.3.4"),
        ("udp", "9"),
        ("quic-v1", None),
    ]
    assert transport("/ip4/1.2.3.4/udp/9/quic-v1") == "udp/quic-v1"
    assert transport("/ip6/2001:db8::1/tcp/443/wss") == "tcp/wss"
    assert transport(f"/ip4/5.6.7.8/tcp/1/p2p/{RELAY}/p2p-circuit") == "p2p-circuit"
    assert network_group("/ip4/45.1.200.3/tcp/1") == "ip4:45.1.0.0/16"
    assert network_group("/ip6/2a01:4f8::1/tcp/1") == "ip6:2a01:4f8::/32"
    assert network_group("/dns4/a.seeds.example.org/tcp/1") == "dns:example.org"
    assert not is_public("/ip4/10.1.2.3/tcp/1") and not is_public("/ip6/::1/tcp/1")
    assert is_public("/ip4/45.1.2.3/tcp/1") and is_public("/dns4/example.org/tcp/1")


def test_healthy_and_diverse_first():
    now = 1_000_000

    def rec(n, *feeds, live=True, expires=now + 3600):
        return {
            "peer_id": key(100 + n).node_id.peer_id(),
            "feeds": list(feeds),
            "live": live,
            "expires_at": expires,
        }

    records = [
        rec(0, "/ip4/45.1.0.1/tcp/1"),
        rec(1, "/ip4/45.1.0.2/tcp/1", expires=now + 7200),
        rec(2, "/ip4/77.1.0.1/tcp/1"),
        rec(3, f"/ip4/88.1.0.1/tcp/1/p2p/{RELAY}/p2p-circuit", "/ip4/88.1.0.1/udp/1/quic-v1"),
        rec(4, "/ip4/99.1.0.1/tcp/1", live=False),
        rec(5, "/ip4/99.2.0.1/tcp/1", expires=now + 60),
        rec(6, *[f"/ip4/66.1.0.{i}/tcp/{i}" for i in range(1, 12)]),
        rec(0, "/ip4/33.3.3.3/tcp/1"),  # duplicate peer: first record wins
    ]
    picked = choose_entries(records, now=now, max_peers=4)
    ids = [e.peer for e in picked]
    assert ids[0] == key(103).node_id  # two new transports and a new network
    assert key(104).node_id not in ids and key(105).node_id not in ids
    assert len(ids) == 4 and not ({key(100).node_id, key(101).node_id} <= set(ids))
    six = next(
        e for e in choose_entries(records, now=now, max_peers=10) if e.peer == key(106).node_id
    )
    assert len(six.addrs) == 8
    assert len(choose_entries(records, now=now, max_peers=10)) == 5
