"""Real nodes on loopback: gossip, DHT, anti-entropy, joining, bad input, restarts."""

import gc
import math
import time

import pytest
import trio

from overlay import collector, runtime
from overlay.crypto import SigningKey
from overlay.net import framing
from overlay.net.host import DialTimeout, Libp2pHost
from overlay.records import Role, make_record
from overlay.runtime import RECORDS_TOPIC, SYNC_PROTOCOL, Node, dht_key
from overlay.services import peers as peers_service
from overlay.testing import join_addr, light_services, make_home, overlay, wait_until
from tests.recgen import ONION

pytestmark = pytest.mark.slow


def _seqs(nodes, node_id):
    return [n.view.seq_of(node_id) for n in nodes]


@pytest.mark.xfail(
    reason="load-sensitive: 20 nodes in one process saturate a 2-core machine while they"
    " start (joins and rounds time out; see docs/performance.md, Lean node); passed 7 of 8"
    " runs here, two at a time",
    strict=False,
)
async def test_twenty_nodes_new_updated_and_withdrawn_record(tmp_path):
    # 20 nodes share one CPU here: probe liveness gently, this test is about records.
    # Gossip brings each record at once; anti-entropy repairs what it missed within
    # about sync_idle_interval (30 s, docs/protocol.md): hence 60 s bounds.
    async with overlay(tmp_path, 20, probe_interval=5.0, probe_timeout=2.5) as nodes:
        await wait_until(lambda: all(len(n.view) == 20 for n in nodes), 180)
        # an updated record (seq+1) reaches everyone
        target = nodes[7]
        rec = await target.publish_own("test update", roles=Role.RELAY | Role.ENTRY)
        await wait_until(lambda: _seqs(nodes, target.node_id) == [rec.seq] * 20, 60)
        assert all(Role.ENTRY in n.view.get(target.node_id).roles for n in nodes)
        # a brand-new node's record reaches everyone
        home = make_home(tmp_path / "late")
        async with Node(home, join=[join_addr(nodes[3])], services=light_services()) as late:
            everyone = [*nodes, late]
            await wait_until(lambda: all(late.node_id in n.view for n in everyone), 60)
            # a tombstone removes the node everywhere
            tomb = await late.withdraw()
            await wait_until(
                lambda: all(n.view.get(late.node_id).seq == tomb.seq for n in nodes), 60
            )
            for n in nodes:
                assert late.node_id not in {r.node_id for r in n.view.snapshot(time.time()).live()}


async def test_join_through_exactly_one_peer_learns_everything(tmp_path):
    async with overlay(tmp_path, 8) as nodes:
        await wait_until(lambda: all(len(n.view) == 8 for n in nodes), 30)
        home = make_home(tmp_path / "newcomer")
        async with Node(home, join=[join_addr(nodes[5])], services=light_services()) as newcomer:
            # the join itself pulls the full membership through that one peer
            assert len(newcomer.view) == 9
            assert newcomer.joined_via == join_addr(nodes[5])
            await wait_until(lambda: len(newcomer.connected()) >= 4, 20)


async def test_a_starting_node_sets_the_collector_thresholds_of_its_process(tmp_path):
    saved = gc.get_threshold()
    gc.set_threshold(*collector.DEFAULTS)
    try:
        async with Node(make_home(tmp_path / "a"), services=light_services()):
            assert gc.get_threshold() == collector.THRESHOLDS
    finally:
        gc.set_threshold(*saved)


async def test_join_tries_addresses_in_turn(tmp_path):
    async with overlay(tmp_path, 2) as nodes:
        dead = "/ip4/127.0.0.1/tcp/9/p2p/" + SigningKey.generate().node_id.peer_id()
        home = make_home(tmp_path / "x")
        async with Node(home, join=[dead, join_addr(nodes[1])], services=light_services()) as node:
            assert node.joined_via == join_addr(nodes[1])
            assert len(node.view) == 3


def _outsider():
    """A key and a relay record of it that no node of the overlay holds yet."""
    outsider = SigningKey.generate()
    rec = make_record(
        outsider,
        seq=1,
        now=time.time(),
        roles=Role.RELAY,
        feeds=["/ip4/127.0.0.1/tcp/9"],
        onion_key=ONION.public,
        onion_epoch=0,
    )
    return outsider, rec


async def test_record_missed_by_gossip_arrives_by_anti_entropy(tmp_path):
    async with overlay(tmp_path, 6) as nodes:
        await wait_until(lambda: all(len(n.view) == 6 for n in nodes), 30)
        # a record that only node 0 holds: it was never gossiped
        outsider, rec = _outsider()
        assert nodes[0].ingest(rec.encode(), "local")
        await wait_until(lambda: all(outsider.node_id in n.view for n in nodes), 30)
        pulled = sum(n.metrics.sync_records._value.get() for n in nodes[1:])
        assert pulled >= 5


async def test_a_record_gossip_missed_is_repaired_after_rounds_backed_off(tmp_path):
    """Rounds back off while summaries match; a record that one node holds and no
    gossip or kick announced (put straight into its view) still reaches every node,
    by the backed-off rounds alone."""
    idle = 4.0
    async with overlay(tmp_path, 5, sync_idle_interval=idle) as nodes:
        await wait_until(lambda: all(len(n.view) == 5 for n in nodes), 60)
        # every node's rounds have backed off to the idle gap
        await wait_until(lambda: all(n.sync.schedule.interval >= idle for n in nodes), 120)
        kicks = [n.sync.schedule.kicks for n in nodes]
        outsider, rec = _outsider()
        assert nodes[0].view.accept(rec, time.time())  # no gossip, no kick
        await wait_until(lambda: all(outsider.node_id in n.view for n in nodes), 120)
        assert sum(n.metrics.sync_records._value.get() for n in nodes[1:]) >= 4
        # nobody was told to hurry: the first copies moved on backed-off rounds
        # (later ones may come faster, as rounds that move records speed up)
        assert nodes[0].sync.schedule.kicks == kicks[0]


def _rounds(nodes, result: str = "ok") -> float:
    return sum(
        n.metrics.registry.get_sample_value(
            "hydra_sync_rounds_total", {"side": "initiator", "result": result}
        )
        or 0.0
        for n in nodes
    )


def _streams(nodes) -> float:
    return sum(n.metrics.sync_streams._value.get() for n in nodes)


async def test_anti_entropy_rounds_reuse_one_stream_per_peer(tmp_path):
    async with overlay(tmp_path, 3, sync_idle_interval=0.5) as nodes:
        await wait_until(lambda: all(len(n.view) == 3 for n in nodes), 30)
        await wait_until(lambda: _rounds(nodes) >= 30, 120)
        failed = _rounds(nodes, "failed")
        assert failed <= 2  # a busy machine may time one out
        # one stream per ordered pair of nodes, a spare for a reconnect, and a new
        # one after each failed round
        assert _streams(nodes) <= 3 * 2 + 2 + failed


async def test_a_kept_stream_the_responder_closed_is_replaced_within_the_round(
    tmp_path, monkeypatch
):
    """Responders close idle streams after 0.2 s here, before the next round
    comes: each round finds its kept stream closed, opens a new one, and succeeds."""
    import overlay.services.sync as sync_service

    monkeypatch.setattr(sync_service, "IDLE_TIMEOUT", 0.2)
    async with overlay(tmp_path, 3, sync_idle_interval=0.5) as nodes:
        await wait_until(lambda: all(len(n.view) == 3 for n in nodes), 30)
        ok0, opened0 = _rounds(nodes), _streams(nodes)
        await wait_until(lambda: _rounds(nodes) >= ok0 + 20, 120)
        assert _streams(nodes) - opened0 >= 10  # kept streams were found closed
        # not one failure per closed stream (a busy machine may time a round out)
        assert _rounds(nodes, "failed") <= 2


def _count_dht_puts(monkeypatch) -> list[tuple[str, int]]:
    """Every DHT store from now on: its key, and at how many peers it was stored."""
    puts: list[tuple[str, int]] = []
    real_put = Libp2pHost.dht_put_at

    async def counting_put(self, key: str, value: bytes, peer_ids) -> int:
        accepted = await real_put(self, key, value, peer_ids)
        puts.append((key, accepted))
        return accepted

    monkeypatch.setattr(Libp2pHost, "dht_put_at", counting_put)
    return puts


async def test_a_join_costs_one_record_stored_once(tmp_path, monkeypatch):
    """A joining node gossips the record it signed at start (no second seq) once,
    when joined (not also at start, to nobody: GossipSub would replay it to the
    join peer and the overlay would carry it twice), and hands each record to
    the DHT once, after its join."""
    puts = _count_dht_puts(monkeypatch)
    monkeypatch.setattr(runtime, "DHT_FIRST_SPREAD", 0.0)
    async with overlay(tmp_path, 3) as nodes:
        await wait_until(lambda: all(len(n.view) == 3 for n in nodes), 30)
        await trio.sleep(4.0)  # DHT_PUBLISH_DELAY is at most 3 s
        for node in nodes:
            assert node.own is not None and node.own.seq == 1
            mine = [peers for key, peers in puts if key == dht_key(node.node_id)]
            assert len(mine) == 1, mine
        # the joiners stored theirs once connected, not while alone
        for node in nodes[1:]:
            assert [p for k, p in puts if k == dht_key(node.node_id)][0] >= 1
        for node in nodes:  # the first node at its start, the joiners once joined
            assert node.metrics.gossip_messages.labels("out")._value.get() == 1


async def test_only_exits_store_their_first_record_in_the_dht_at_once(tmp_path, monkeypatch):
    """Other nodes store their first record within DHT_FIRST_SPREAD of their start
    (here: not within the test), so a starting overlay is not meshed by stores."""
    puts = _count_dht_puts(monkeypatch)
    monkeypatch.setattr(runtime, "DHT_FIRST_SPREAD", 3600.0)
    roles = [("relay",), ("relay", "exit"), ("relay",)]
    async with overlay(tmp_path, 3, roles, policy=["smtp:*"]) as nodes:
        await wait_until(lambda: all(len(n.view) == 3 for n in nodes), 30)
        with trio.move_on_after(15):
            while dht_key(nodes[1].node_id) not in [key for key, _ in puts]:
                await trio.sleep(0.1)
        assert [key for key, _ in puts] == [dht_key(nodes[1].node_id)]


async def test_dht_lookup_by_node_id(tmp_path, monkeypatch):
    """A record is stored at the DHT_REPLICAS members closest to its key (known
    from the view, no lookup), and a node that holds no copy finds it."""
    monkeypatch.setattr(runtime, "DHT_FIRST_SPREAD", 0.0)
    monkeypatch.setattr(runtime, "DHT_REPLICAS", 2)
    roles = [("relay",), ("relay",), ("relay", "entry"), ("relay",), ("relay",)]
    async with overlay(tmp_path, 5, roles) as nodes:
        await wait_until(lambda: all(len(n.view) == 5 for n in nodes), 30)
        target = nodes[4]
        key = dht_key(target.node_id)

        def holders() -> list:
            return [n for n in nodes[:4] if n.host._dht.value_store.get(key.encode()) is not None]

        # stored once the target's (late) record was published: at two of the four others
        await wait_until(lambda: len(holders()) >= 2, 30)
        await trio.sleep(1.0)
        expected = target.host.dht_closest(key, [n.node_id.peer_id() for n in nodes[:4]], 2)
        assert sorted(n.node_id.peer_id() for n in holders()) == sorted(expected)
        seeker = next(n for n in nodes[:4] if n not in holders())
        raw = None
        with trio.move_on_after(15):
            while raw is None:
                raw = await seeker.host.dht_get(key)
                await trio.sleep(0.2)
        assert raw is not None
        assert seeker.ingest(raw, "dht")
        # role discovery: the entry announced itself; relays (every node) do not
        providers: list[str] = []
        with trio.move_on_after(15):
            while nodes[2].node_id.peer_id() not in providers:
                providers = await nodes[0].host.find_providers("hydra-role/entry")
                await trio.sleep(0.2)
        assert nodes[2].node_id.peer_id() in providers
        assert await nodes[0].host.find_providers("hydra-role/relay") == []


async def test_a_connection_dialled_for_a_dht_store_is_trimmed_not_taken_for_a_crash(
    tmp_path, monkeypatch
):
    """The members a DHT store dialled are let go once the store is done and the
    connection has lingered: the far end hears "no longer needed" (a trim), not
    a crash, so its failure detector does not rush to probe us."""
    monkeypatch.setattr(runtime, "DHT_FIRST_SPREAD", 0.0)
    monkeypatch.setattr(peers_service, "TRIM_LINGER", 0.5)
    async with overlay(tmp_path, 6, target_peers=2) as nodes:
        await wait_until(lambda: all(len(n.view) == 6 for n in nodes), 30)
        me = nodes[0]
        heard: list[tuple[int, str, bool]] = []
        for i, n in enumerate(nodes):
            n.host.on_disconnect(lambda pid, trimmed, i=i: heard.append((i, pid, trimmed)))
        monkeypatch.setattr(runtime, "DHT_REPLICAS", 5)  # every other member
        with trio.fail_after(30):
            while not (far := [n for n in nodes[1:] if n.node_id not in me.connected()]):
                await me.host.trim(me.connected()[0].peer_id())  # make room for a dial
        heard.clear()  # from here on, only what the store's connections do
        await me._dht_store(dht_key(me.node_id), me.own.encode())
        dialled = [nodes.index(n) for n in far if n.node_id in me.peering._transient]
        assert dialled, "the store dialled nobody"
        me_pid = me.node_id.peer_id()
        await wait_until(lambda: all((i, me_pid, True) in heard for i in dialled), 30)
        assert (0, nodes[dialled[0]].node_id.peer_id(), True) in heard  # our own side too
        for i in dialled:
            m = nodes[i].resilience.liveness._members.get(me.node_id)
            assert m is None or m.hinted_at == -math.inf  # no probe after the close


async def test_malicious_peer_is_rejected_counted_and_disconnected(tmp_path):
    async with overlay(tmp_path, 4) as nodes:
        await wait_until(lambda: all(len(n.view) == 4 for n in nodes), 30)
        evil_key = SigningKey.generate()
        victim = SigningKey.generate()
        good = make_record(
            victim,
            seq=5,
            now=time.time(),
            roles=Role.RELAY,
            feeds=["/ip4/127.0.0.1/tcp/9"],
            onion_key=ONION.public,
            onion_epoch=0,
        ).encode()
        forged = bytearray(good)
        forged[-2] ^= 1
        expired = make_record(
            victim,
            seq=6,
            now=time.time() - 7200,
            roles=Role.RELAY,
            feeds=["/ip4/127.0.0.1/tcp/9"],
            onion_key=ONION.public,
            onion_epoch=0,
        ).encode()
        async with Libp2pHost(
            evil_key, ["/ip4/127.0.0.1/tcp/0"], gossip_topics=[RECORDS_TOPIC]
        ) as evil:
            await evil.connect(join_addr(nodes[0]))
            await trio.sleep(1.5)  # let the gossip mesh form
            bad = [expired, b"\xa0", bytes(forged), b"garbage" * 10, good[:-1]]
            for i in range(40):  # paced under libp2p's own per-peer rate limit
                await evil.publish(RECORDS_TOPIC, bad[i % len(bad)])
                await trio.sleep(0.12)
                if nodes[0].metrics.disconnects._value.get():
                    break
            # garbage on the sync stream too
            for _ in range(3):
                try:
                    s = await evil.open_stream(nodes[0].node_id.peer_id(), SYNC_PROTOCOL)
                    await s.write(framing.encode_uvarint(10**9) + b"junk")
                    await s.close()
                except Exception:
                    break
            await wait_until(lambda: nodes[0].metrics.disconnects._value.get() >= 1, 20)
        for n in nodes:
            assert victim.node_id not in n.view  # nothing invalid stored anywhere
            with n.store._lock:
                pass
            assert n.store.get(victim.node_id, time.time()) is None
        rejected = nodes[0].metrics.records_rejected
        reasons = {s.labels["reason"] for m in rejected.collect() for s in m.samples if s.value}
        assert {"bad_signature", "expired", "malformed"} <= reasons
        # the node still works: a real update still propagates
        rec = await nodes[2].publish_own("still alive")
        await wait_until(lambda: _seqs(nodes, nodes[2].node_id) == [rec.seq] * 4, 20)


async def test_restart_keeps_store_and_catches_up(tmp_path):
    async with overlay(tmp_path, 4) as nodes:
        await wait_until(lambda: all(len(n.view) == 4 for n in nodes), 30)
        home = make_home(tmp_path / "restarter")
        async with Node(home, join=[join_addr(nodes[0])], services=light_services()) as node:
            await wait_until(lambda: all(node.node_id in n.view for n in nodes), 20)
            seq_before = node.own.seq
        # while it is down, another node changes its record
        changed = await nodes[1].publish_own("while you were away", roles=Role.RELAY | Role.ENTRY)
        async with Node(home, services=light_services()) as node:  # no --join: only its store
            assert len(node.view) >= 5  # store intact before any network contact
            assert node.own.seq > seq_before
            await node.join([join_addr(nodes[2])])
            await wait_until(lambda: node.view.seq_of(nodes[1].node_id) == changed.seq, 20)


async def test_a_silent_join_address_costs_the_next_one_a_single_dial(tmp_path):
    """Join addresses are dialled in rounds: a first address that accepts TCP but
    never answers (a busy peer, a black hole) times out once, and the node joins
    through the second at once instead of after the first one's retries."""
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    nobody = SigningKey(bytes([9]) * 32).node_id.peer_id()
    silent_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{nobody}"
    held = []

    async def hold() -> None:  # accept and never answer
        while True:
            conn, _ = await silent.accept()
            held.append(conn)

    async with trio.open_nursery() as n, overlay(tmp_path / "a", 2) as nodes:
        n.start_soon(hold)
        with pytest.raises(DialTimeout):  # how many connections one dial makes
            await nodes[0].host.connect(silent_addr)
        one_dial, held[:] = len(held), []
        home = make_home(tmp_path / "x")
        good = join_addr(nodes[1])
        async with Node(home, join=[silent_addr, good], services=light_services()) as x:
            assert x.peering.joined_via == good
            assert len(held) == one_dial  # one dial to the silent address, not one per retry
            await wait_until(lambda: len(x.view) == 3, 20)
        n.cancel_scope.cancel()
    for conn in held:
        conn.close()
    silent.close()


async def test_restart_after_the_join_peer_is_gone_and_joining_again_when_alone(tmp_path):
    """A node restarted after its join peer was taken down starts from its store
    (a fresh node with only a dead join address still fails); a node left with no
    reachable member keeps trying its join address and gets back in when it answers."""
    import socket

    from overlay.errors import LocalError

    def dead_addr(key_seed: int) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pid = SigningKey(bytes([key_seed]) * 32).node_id.peer_id()
        return f"/ip4/127.0.0.1/tcp/{port}/p2p/{pid}"

    with pytest.raises(LocalError, match="could not join"):
        async with Node(
            make_home(tmp_path / "fresh"), join=[dead_addr(7)], services=light_services()
        ):
            pass

    home = make_home(tmp_path / "x")
    async with overlay(tmp_path / "a", 3) as old:
        async with Node(home, join=[join_addr(old[0])], services=light_services()) as x:
            await wait_until(lambda: len(x.view) == 4, 20)
        ports = [int(join_addr(n).split("/")[4]) for n in old]
    # every member x knows is gone now, and their ports stay shut (bound, not
    # listening), so no new node can take one of them; x's join address will be y's
    blockers = []
    for port in ports:
        b = socket.socket()
        b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        b.bind(("127.0.0.1", port))
        blockers.append(b)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    y_home = make_home(tmp_path / "y", listen=[f"/ip4/127.0.0.1/tcp/{port}"])
    y_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{y_home.signing_key().node_id.peer_id()}"
    async with Node(home, join=[y_addr], services=light_services()) as x:  # y is not up yet
        assert x.ready.is_set() and len(x.view) >= 4  # started from its store
        async with overlay(tmp_path / "b", 2) as new:
            async with Node(y_home, join=[join_addr(new[0])], services=light_services()):
                # through the join address: the peer loop joins again (or libp2p's
                # own redial of that address gets there first)
                await wait_until(lambda: all(n.node_id in x.view for n in new), 60)
                assert y_home.signing_key().node_id in x.connected()
    for b in blockers:
        b.close()
