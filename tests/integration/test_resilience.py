"""Exit resilience with real nodes on loopback: detection, promotion, false accusations."""

import time

import pytest
import trio

from overlay.core.liveness import TOPIC
from overlay.crypto import SigningKey
from overlay.net.host import Libp2pHost
from overlay.records import Role
from overlay.testing import fleet, join_addr, wait_until
from overlay.wire import liveness as wire

pytestmark = pytest.mark.slow

EXIT = ("exit", "relay")
STANDBY = ("standby-exit", "relay")


def live_exit_count(node) -> int:
    return node.resilience.exits(time.time())["live_exits"]


def live_exit_ids(node) -> set[str]:
    view = node.resilience.exits(time.time())
    return {x["peer_id"] for x in view["exits"] if x["state"] != "dead"}


async def test_killed_exits_are_replaced_by_standbys(tmp_path):
    async with fleet(tmp_path) as f:
        exits = [await f.add(f"exit{i}", EXIT, target_live_exits=3) for i in range(3)]
        standby = [await f.add(f"standby{i}", STANDBY, target_live_exits=3) for i in range(4)]
        relays = [await f.add(f"relay{i}", ("relay",), target_live_exits=3) for i in range(3)]
        everyone = exits + standby + relays
        await wait_until(lambda: all(len(n.view) == 10 for n in everyone), 90)
        await trio.sleep(2)
        assert all(Role.EXIT not in s.roles for s in standby)  # enough exits: nobody promotes
        t0 = time.monotonic()
        for x in exits:
            await f.stop(x)
        survivors = standby + relays
        killed = {x.node_id.peer_id() for x in exits}

        def replaced(n) -> bool:
            live = live_exit_ids(n)
            return len(live) == 3 and not live & killed

        await wait_until(lambda: all(replaced(n) for n in survivors), 90, 0.1)
        elapsed = time.monotonic() - t0
        promoted = [s for s in standby if Role.EXIT in s.roles]
        assert len(promoted) == 3, [s.roles for s in standby]
        for n in survivors:
            view = n.resilience.exits(time.time())
            dead = {x["peer_id"] for x in view["exits"] if x["state"] == "dead"}
            assert dead == {x.node_id.peer_id() for x in exits}
        print(f"live exits back at target {elapsed:.1f} s after the kill")


async def test_single_false_accuser_cannot_remove_healthy_exit(tmp_path):
    async with fleet(tmp_path) as f:
        exit_node = await f.add("exit", EXIT)
        others = [await f.add(f"n{i}", ("relay",)) for i in range(4)]
        everyone = [exit_node, *others]
        await wait_until(lambda: all(len(n.view) == 5 for n in everyone), 90)
        # the liar is a member too (accusations from unknown keys never count)
        liar = await f.add("liar", ("relay",))
        await wait_until(lambda: all(len(n.view) == 6 for n in everyone), 90)
        key = liar.key
        async with Libp2pHost(
            SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"], gossip_topics=[TOPIC]
        ) as mouth:
            await mouth.connect(join_addr(others[0]))
            await trio.sleep(1.5)
            for i in range(40):
                inc = exit_node.resilience.liveness.incarnation
                frame_t = wire.Suspect if i % 2 else wire.Dead
                frame = frame_t(exit_node.node_id, inc, liar.node_id, wire.ts_of(time.time()))
                await mouth.publish(TOPIC, wire.encode(frame.signed_with(key.sign)))
                await trio.sleep(0.1)
            await trio.sleep(3)
        for n in others:
            state, _ = n.resilience.liveness.state(exit_node.node_id)
            assert state == "alive", (n.node_id, state)
            assert live_exit_count(n) == 1
