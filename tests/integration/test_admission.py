"""A record flood against real nodes on loopback: admission bounds, dial budget, fake exits.

A separate py-libp2p identity pushes 2,000 fresh self-signed records (100 of
them claiming the exit role) into a relay over /hydra/sync/1.0.0. Every record
claims addresses where this test listens with plain TCP listeners, so every
dial a node makes to them is counted.
"""

from __future__ import annotations

import time

import pytest
import trio

from overlay.core.antientropy import AntiEntropy
from overlay.core.membership import MembershipView
from overlay.crypto import SigningKey
from overlay.net import framing
from overlay.net.host import Libp2pHost
from overlay.records import Role, make_record
from overlay.runtime import SYNC_PROTOCOL
from overlay.testing import join_addr, overlay, wait_until
from overlay.wire import sync
from tests.recgen import ONION

pytestmark = pytest.mark.slow

MAX_UNVERIFIED = 200
FLOOD = 2000
FAKE_EXITS = 100
PORTS = 40  # distinct claimed addresses besides the one every other record claims


class Listeners:
    """Plain TCP listeners on attacker-chosen addresses, counting accepted connections."""

    def __init__(self) -> None:
        self.accepts: dict[str, int] = {}
        self.addrs: list[str] = []

    async def start(self, nursery: trio.Nursery, host: str, n: int) -> list[str]:
        out = []
        for _ in range(n):
            (listener,) = await trio.open_tcp_listeners(0, host=host)
            port = listener.socket.getsockname()[1]
            feed = f"/ip4/{host}/tcp/{port}"
            self.accepts[feed] = 0
            nursery.start_soon(self._serve, listener, feed)
            out.append(feed)
        self.addrs += out
        return out

    async def _serve(self, listener, feed: str) -> None:
        async with listener:
            while True:
                conn = await listener.accept()
                self.accepts[feed] += 1
                await conn.aclose()

    def total(self) -> int:
        return sum(self.accepts.values())


def forge(n: int, reflect: str, spread: list[str], now: float) -> list[bytes]:
    out = []
    for i in range(n):
        exitish = i < FAKE_EXITS
        feeds = (reflect,) if i % 2 else (spread[i % len(spread)],)
        rec = make_record(
            SigningKey.generate(),
            seq=1,
            now=int(now),
            roles=Role.EXIT | Role.RELAY if exitish else Role.RELAY,
            feeds=feeds,
            onion_key=ONION.public,
            onion_epoch=0,
            exit_policy=("smtp:*", "maildir:*") if exitish else (),
        )
        out.append(rec.encode())
    return out


async def push(attacker: Libp2pHost, peer_id: str, records: list[bytes]) -> int:
    """Anti-entropy rounds that push ``records`` (the responder takes what the
    initiator offers after the pull); paced under the responder's round limit."""
    empty = AntiEntropy(MembershipView()).summary()
    sent = 0
    for k in range(0, len(records), sync.MAX_RECORDS):
        batch = tuple(records[k : k + sync.MAX_RECORDS])
        with trio.move_on_after(10):
            stream = await attacker.open_stream(peer_id, SYNC_PROTOCOL)
            try:
                await stream.write(framing.encode_frame(sync.encode(empty), sync.MAX_SIZE))
                entries = await framing.read_frame(stream, sync.MAX_SIZE)
                assert isinstance(sync.decode(entries), sync.Entries)
                want = sync.Want(())
                await stream.write(framing.encode_frame(sync.encode(want), sync.MAX_SIZE))
                frame = sync.encode(sync.Records(batch))
                await stream.write(framing.encode_frame(frame, sync.MAX_SIZE))
                sent += len(batch)
            finally:
                await stream.close()
        await trio.sleep(0.6)
    return sent


async def test_record_flood_is_bounded_budgeted_and_fake_exits_count_for_nothing(tmp_path):
    roles = [("relay",), ("exit", "relay"), ("standby-exit", "relay")]
    with trio.fail_after(400):
        async with trio.open_nursery() as bg:
            listeners = Listeners()
            (reflect,) = await listeners.start(bg, "127.0.0.2", 1)
            spread = await listeners.start(bg, "127.0.0.3", PORTS)
            async with overlay(
                tmp_path, 3, roles, target_live_exits=2, max_unverified=MAX_UNVERIFIED
            ) as nodes:
                relay, exit_node, standby = nodes
                await wait_until(lambda: all(len(n.view) == 3 for n in nodes), 90)
                # one honest exit for a target of two: the standby promotes
                await wait_until(lambda: Role.EXIT in standby.roles, 60)
                await wait_until(lambda: standby.resilience.pool.live_exits == 2, 30)
                await wait_until(lambda: all(n.view.counts() == (3, 0) for n in nodes), 60)
                assert listeners.total() == 0

                records = forge(FLOOD, reflect, spread, time.time())
                t0 = trio.current_time()
                async with Libp2pHost(SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as evil:
                    pid = await evil.connect(join_addr(relay))
                    sent = await push(evil, pid, records)
                assert sent == FLOOD
                # long enough for budgeted dials, anti-entropy between the honest
                # nodes, and a step back (hysteresis 10 s) if fake exits counted
                await trio.sleep(30)

                for n in nodes:
                    status = n.status()  # the node is alive and answers
                    adm = status["admission"]
                    assert set(adm) == {"verified", "unverified", "max_unverified", "rejected"}
                    assert adm["max_unverified"] == MAX_UNVERIFIED
                    assert adm["unverified"] <= MAX_UNVERIFIED, adm
                    assert adm["verified"] == 3, adm  # the attacker's records never verify
                    assert n.store.count_unverified() <= MAX_UNVERIFIED
                    assert n.store.count() <= 3 + MAX_UNVERIFIED
                    gauge = n.metrics.records_unverified._value.get()
                    assert gauge == adm["unverified"]
                assert relay.status()["admission"]["rejected"] > 0
                refused = {
                    s.labels["reason"]
                    for m in relay.metrics.records_rejected.collect()
                    for s in m.samples
                    if s.value and s.name.endswith("_total")
                }
                assert refused & {"admission_limit", "table_full"}, refused
                # the attacker was not penalised for forwarding valid records
                assert relay.metrics.disconnects._value.get() == 0

                # dials to what the records claim: within the budget
                elapsed = trio.current_time() - t0
                per_addr = len(nodes) * (int(elapsed // 60) + 1)
                assert listeners.accepts[reflect] <= per_addr, (listeners.accepts, elapsed)
                budget = len(nodes) * (8 + 1.0 * elapsed)
                assert listeners.total() <= budget, (listeners.total(), budget)
                assert max(listeners.accepts[a] for a in spread) <= per_addr

                # fake exits count for nothing: the promoted standby stays an exit
                assert Role.EXIT in standby.roles
                assert standby.resilience.pool.live_exits == 2
                assert not [e for e in standby.resilience.pool.events if e.kind == "step-back"]
                for n in nodes:
                    view = n.resilience.exits(time.time())
                    assert view["live_exits"] == 2, view["live_exits"]

                # honest records still propagate
                rec = await exit_node.publish_own("after the flood")
                await wait_until(
                    lambda: all(n.view.seq_of(exit_node.node_id) == rec.seq for n in nodes), 30
                )
                print(
                    f"flood {FLOOD}: unverified {[n.admission.unverified for n in nodes]}, "
                    f"rejected {[n.admission.rejected for n in nodes]}, "
                    f"dials to claimed addresses {listeners.total()} in {elapsed:.0f} s "
                    f"(reflection address {listeners.accepts[reflect]})"
                )
            bg.cancel_scope.cancel()
