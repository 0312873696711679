"""Exit resilience with real nodes on loopback: detection, promotion, false accusations."""

import time

import pytest
import trio

from overlay.core.effects import Send
from overlay.core.liveness import PROTOCOL, TOPIC
from overlay.crypto import SigningKey
from overlay.net.host import Libp2pHost
from overlay.records import Role
from overlay.services.feeds import FeedMonitor
from overlay.testing import (
    fleet,
    join_addr,
    light_client,
    light_services,
    make_home,
    overlay,
    wait_until,
)
from overlay.wire import liveness as wire

pytestmark = pytest.mark.slow

EXIT = ("exit", "relay")
STANDBY = ("standby-exit", "relay")


def live_exit_count(node) -> int:
    return node.resilience.exits(time.time())["live_exits"]


def live_exit_ids(node) -> set[str]:
    view = node.resilience.exits(time.time())
    return {x["peer_id"] for x in view["exits"] if x["state"] != "dead"}


async def wait_settled(nodes, timeout: float = 90) -> None:
    """Every node's exit pool has looked at the membership after its settle period
    (before that it decides nothing, so "nobody promoted" would prove nothing)."""
    await wait_until(lambda: all(n.resilience.settled.is_set() for n in nodes), timeout)


def promotions(node) -> float:
    return node.resilience.m_promotions.labels("promote")._value.get()


def sees_enough_exits(node) -> bool:
    """The node's exit pool has looked (settled) and sees no deficit (a deficit it
    saw while still verifying the exits has been restored)."""
    pool = node.resilience.pool
    kinds = [ev.kind for ev in pool.events if ev.kind in ("deficit", "restored")]
    return (
        node.resilience.settled.is_set()
        and pool.live_exits >= pool.target
        and (not kinds or kinds[-1] == "restored")
    )


async def _entry_two_exits_two_relays(f, smtp: dict):
    """An entry, two exits and two relays delivering to ``smtp``, settled."""
    entry = await f.add("entry", ("entry", "relay"), **smtp)
    exits = [await f.add(f"exit{i}", EXIT, **smtp) for i in range(2)]
    relays = [await f.add(f"relay{i}", ("relay",), **smtp) for i in range(2)]
    everyone = [entry, *exits, *relays]
    await wait_until(lambda: all(len(n.view) == 5 for n in everyone), 90)
    await wait_settled(everyone)
    return entry, exits


async def test_entry_pushes_a_promoted_standby_so_the_client_syncs_at_once(tmp_path):
    """The exits in an entry's view changing (a standby promoted) is pushed to its
    light clients at once (a DEAD frame, on which a client syncs), whatever the
    dead set does: here the entry's dead set stays empty and the client would
    not sync again on its own for two minutes."""
    async with fleet(tmp_path) as f:
        entry = await f.add("entry", ("entry", "relay"), target_live_exits=1)
        exit_node = await f.add("exit", EXIT, target_live_exits=1)
        standby = await f.add("standby", STANDBY, target_live_exits=1)
        relay = await f.add("relay", ("relay",), target_live_exits=1)
        everyone = [entry, exit_node, standby, relay]
        await wait_until(lambda: all(len(n.view) == 4 for n in everyone), 90)
        await wait_settled(everyone)
        entry.relay.dead_nodes = lambda: []  # only the exits can make it push
        async with light_client(tmp_path / "client", entry, sync_interval=120.0) as c:
            await wait_until(lambda: len(c.view) == 4, 60)
            await trio.sleep(1.0)  # the session's first pushes are out
            pushes = c.stats["dead_pushes"]
            await f.stop(exit_node)
            await wait_until(lambda: Role.EXIT in standby.roles, 60)
            await wait_until(lambda: Role.EXIT in entry.view.get(standby.node_id).roles, 60)
            await wait_until(lambda: c.stats["dead_pushes"] > pushes, 30)
            assert not c.dead  # the push carried the (empty) dead set

            def client_sees_new_exit() -> bool:
                r = c.view.get(standby.node_id)
                return r is not None and Role.EXIT in r.roles

            await wait_until(client_sees_new_exit, 60)


async def test_killed_exits_are_replaced_by_standbys(tmp_path):
    async with fleet(tmp_path) as f:
        exits = [await f.add(f"exit{i}", EXIT, target_live_exits=3) for i in range(3)]
        standby = [await f.add(f"standby{i}", STANDBY, target_live_exits=3) for i in range(4)]
        relays = [await f.add(f"relay{i}", ("relay",), target_live_exits=3) for i in range(3)]
        everyone = exits + standby + relays
        await wait_until(lambda: all(len(n.view) == 10 for n in everyone), 90)
        await wait_settled(everyone)
        # enough exits: nobody promotes
        assert all(promotions(s) == 0 and Role.EXIT not in s.roles for s in standby)
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

        def unsent(n) -> float:  # probes of the killed exits that could not go out
            get = n.metrics.registry.get_sample_value
            return sum(
                get("hydra_liveness_sends_failed_total", {"why": why}) or 0.0
                for why in ("error", "timeout")
            )

        await wait_until(lambda: sum(unsent(n) for n in survivors) > 0, 60)


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
            before = [n.resilience.liveness.accusations_heard for n in others]

            def all_heard() -> bool:
                now = [n.resilience.liveness.accusations_heard for n in others]
                return all(a > b for a, b in zip(now, before, strict=True))

            # at least 40 forged accusations, more (at most 400) until every other
            # member has taken some into account: they must arrive to prove anything
            for i in range(400):
                inc = exit_node.resilience.liveness.incarnation
                frame_t = wire.Suspect if i % 2 else wire.Dead
                frame = frame_t(exit_node.node_id, inc, liar.node_id, wire.ts_of(time.time()))
                await mouth.publish(TOPIC, wire.encode(frame.signed_with(key.sign)))
                await trio.sleep(0.1)
                if i >= 40 and all_heard():
                    break
            assert all_heard(), "the forged accusations never reached every member"
            await trio.sleep(3)
        # ... and none of them removed the healthy exit
        for n in others:
            state, _ = n.resilience.liveness.state(exit_node.node_id)
            assert state == "alive", (n.node_id, state)
            assert live_exit_count(n) == 1


async def test_a_healthy_exit_refutes_two_accusers_before_anyone_declares_it_dead(tmp_path):
    """Two members accuse a healthy exit once each, at the incarnation the others
    know (0: a node starts at its clock in ms and nobody knows that until it says
    so). Enough for DEAD after the suspicion timer, unless the exit hears of it and
    refutes: it does, with an Alive at the incarnation it holds, which every node
    learns, and no node ever holds it dead (here they are all connected to it, so
    its answers to their pings clear it too; in a larger overlay most are not)."""
    async with fleet(tmp_path) as f:
        exit_node = await f.add("exit", EXIT)
        others = [await f.add(f"n{i}", ("relay",)) for i in range(3)]
        liars = [await f.add(f"liar{i}", ("relay",)) for i in range(2)]
        everyone = [exit_node, *others, *liars]
        await wait_until(lambda: all(len(n.view) == 6 for n in everyone), 90)
        await wait_settled(everyone)
        assert exit_node.resilience.liveness.incarnation > 0
        async with Libp2pHost(
            SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"], gossip_topics=[TOPIC]
        ) as mouth:
            await mouth.connect(join_addr(others[0]))
            await trio.sleep(1.5)  # its gossip mesh forms
            before = [n.resilience.liveness.accusations_heard for n in others]
            for liar in liars:
                frame = wire.Suspect(exit_node.node_id, 0, liar.node_id, wire.ts_of(time.time()))
                await mouth.publish(TOPIC, wire.encode(frame.signed_with(liar.key.sign)))
            seen_dead = set()
            for _ in range(200):  # 10 s: well past the suspicion timer (4 s at most)
                for n in others:
                    if n.resilience.liveness.state(exit_node.node_id)[0] == "dead":
                        seen_dead.add(n.node_id.short())
                await trio.sleep(0.05)
            heard = [n.resilience.liveness.accusations_heard for n in others]
            assert any(a > b for a, b in zip(heard, before, strict=True)), "never arrived"
        assert not seen_dead
        # the exit said which incarnation it holds, and everyone heard it
        inc = exit_node.resilience.liveness.incarnation
        for n in others:
            assert n.resilience.liveness.incarnation_of(exit_node.node_id) == inc
        assert all(live_exit_count(n) == 1 for n in others)


async def test_all_exits_killed_standbys_take_over_and_nothing_is_lost(tmp_path):
    from overlay.devtools.demo import SmtpSink

    sink = SmtpSink()
    port = sink.start()
    smtp = {"smtp_relay": f"127.0.0.1:{port}", "target_live_exits": 3}
    try:
        async with fleet(tmp_path) as f:
            entry = await f.add("entry", ("entry", "relay"), **smtp)
            exits = [await f.add(f"exit{i}", EXIT, **smtp) for i in range(3)]
            standby = [await f.add(f"standby{i}", STANDBY, **smtp) for i in range(3)]
            relays = [await f.add(f"relay{i}", ("relay",), **smtp) for i in range(2)]
            everyone = [entry, *exits, *standby, *relays]
            await wait_until(lambda: all(len(n.view) == 9 for n in everyone), 90)
            await wait_settled(everyone)
            tokens = []
            async with light_client(tmp_path / "client", entry) as client:

                async def send(i):
                    token = f"hydra-demo-{i}-{i:08x}"
                    tokens.append(token)
                    return await client.send("smtp:u@example.org", f"{token}\r\n".encode())

                before = [await send(i) for i in range(5)]
                for mid in before:
                    await client.wait_acked(mid, timeout=60)
                during = [await send(i) for i in range(5, 10)]
                for x in exits:
                    await f.stop(x)
                after = []
                for i in range(10, 20):
                    after.append(await send(i))
                    await trio.sleep(0.3)
                entries = {}
                for mid, token in zip(before + during + after, tokens, strict=True):
                    e = await client.wait_acked(mid, timeout=90)
                    assert e.state.name == "DELIVERED", e
                    entries[token] = e
            assert sum(Role.EXIT in s.roles for s in standby) == 3
        await trio.sleep(1)
        assert set(sink.counts) == set(tokens)  # none lost
        # Messages sent before the takedown and after it arrive exactly once. A message an
        # exit delivered with its ack still unsent is resent through another exit, which
        # answers from the first exit's delivery notice (see the next test); only if the
        # exit died in the instant between delivering and publishing that notice can it
        # arrive twice — always with the same Message-ID, so the recipient's mail system
        # can drop the copy (see docs/user.md).
        in_flight = set(tokens[5:10])
        for t in tokens:
            if t not in in_flight:
                assert sink.counts[t] == 1, (t, sink.counts[t], entries[t])
            assert len(sink.message_ids[t]) == 1 and "" not in sink.message_ids[t]
    finally:
        sink.stop()


async def test_exit_on_lossy_link_is_not_declared_dead(tmp_path):
    from overlay.services.resilience import Resilience

    async with fleet(tmp_path) as f:
        lossy = await f.start(
            make_home(tmp_path / "x", EXIT),
            join=[],
            services=[Resilience(fault_drop=0.2), *light_services()],
        )
        others = [await f.add(f"n{i}", ("relay",)) for i in range(4)]
        await wait_until(lambda: all(len(n.view) == 5 for n in [lossy, *others]), 90)
        deadline = trio.current_time() + 25
        while trio.current_time() < deadline:
            for n in others:
                state, _ = n.resilience.liveness.state(lossy.node_id)
                assert state != "dead", f"{n.node_id.short()} declared the lossy exit dead"
            await trio.sleep(0.2)
        # the link was lossy: frames were lost both ways, yet frames also got through
        assert lossy.resilience.fault_dropped > 0
        assert lossy.resilience.m_frames.labels("in")._value.get() > 0


def test_paused_exit_is_suspected_then_refutes(tmp_path):
    """Real processes: SIGSTOP an exit (it goes silent), then SIGCONT it."""
    import signal

    from overlay.devtools.cluster import Cluster

    def exit_state(entry, peer_id):
        for x in entry.get("/exits")["exits"]:
            if x["peer_id"] == peer_id:
                return x["state"]
        return None

    def wait_for(pred, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if pred():
                    return True
            except Exception:  # noqa: BLE001 - control endpoint busy
                pass
            time.sleep(0.2)
        return False

    roles = [["entry", "relay"], list(EXIT), ["relay"], ["relay"]]
    with Cluster(tmp_path, roles, settings={"target_live_exits": 1}) as cluster:
        entry, exit_node = cluster.nodes[0], cluster.nodes[1]
        assert wait_for(lambda: exit_state(entry, exit_node.peer_id) == "alive", 60)
        cluster.kill(exit_node, signal.SIGSTOP)
        try:
            assert wait_for(
                lambda: exit_state(entry, exit_node.peer_id) in ("suspect", "dead"), 30
            ), "a silent exit was never suspected"
        finally:
            cluster.kill(exit_node, signal.SIGCONT)
        assert wait_for(lambda: exit_state(entry, exit_node.peer_id) == "alive", 45), (
            "the resumed exit did not refute"
        )
        # every other member agrees it is alive again
        for n in cluster.nodes[2:]:
            assert wait_for(lambda n=n: exit_state(n, exit_node.peer_id) == "alive", 30)


async def test_exit_that_died_before_acking_is_not_followed_by_a_second_delivery(tmp_path):
    """An exit delivers, its acks are lost, it dies; the client resends through the
    other exit, which heard the first one's delivery notice and answers 'delivered'
    without delivering again."""
    from overlay.devtools.demo import SmtpSink
    from overlay.exits import MessageState
    from overlay.storage.delivery_queue import ELSEWHERE

    sink = SmtpSink()
    port = sink.start()
    smtp = {"smtp_relay": f"127.0.0.1:{port}", "target_live_exits": 2}
    token = "hydra-demo-1-0000beef"

    try:
        async with fleet(tmp_path) as f:
            entry, exits = await _entry_two_exits_two_relays(f, smtp)
            for x in exits:
                x.relay.fault_drop_acks = True  # the acks of both exits never leave them
            async with light_client(tmp_path / "client", entry) as client:
                mid = await client.send("smtp:u@example.org", f"{token}\r\n".encode())
                await wait_until(lambda: token in sink.counts, 60, 0.02)

                def deliverers():
                    done = (MessageState.DELIVERED, "")
                    return [x for x in exits if x.relay.exit_queue.lookup(mid) == done]

                # the sink sees the message a moment before the exit records its delivery
                await wait_until(deliverers, 10, 0.01)
                (first,) = deliverers()
                (other,) = [x for x in exits if x is not first]
                notices = other.relay.notices.m_notices.labels("accepted")
                await wait_until(lambda: notices._value.get() >= 1, 10)
                other.relay.fault_drop_acks = False  # the survivor's acks work again
                await f.stop(first)
                e = await client.wait_acked(mid, timeout=60)
                assert e.state.name == "DELIVERED", e
                # the survivor answered from the notice: it never stored the message
                assert e.reason == ELSEWHERE, e
                assert other.relay.exit_queue.lookup(mid) is None
        await trio.sleep(0.5)
        assert sink.counts == {token: 1}
    finally:
        sink.stop()


async def test_an_exit_falsely_declared_dead_while_delivering_is_waited_for(tmp_path):
    """The client's entry wrongly holds the exit that queued a message dead (as on
    a starved machine) while that exit is still delivering it (a slow mail
    server). The client resends through the other exit, naming the first; the
    second asks it, hears "held", and waits for its notice: one copy arrives."""
    import asyncio
    import threading

    from overlay.devtools.demo import SmtpSink
    from overlay.exits import MessageState
    from overlay.storage.delivery_queue import ELSEWHERE

    sink = SmtpSink()
    handler = sink.controller.handler
    fast = handler.handle_DATA
    release = threading.Event()

    async def slow(server, session, envelope):  # the mail server answers when released
        for _ in range(1200):  # at most 60 s
            if release.is_set():
                break
            await asyncio.sleep(0.05)
        return await fast(server, session, envelope)

    handler.handle_DATA = slow
    port = sink.start()
    smtp = {"smtp_relay": f"127.0.0.1:{port}", "target_live_exits": 2}
    token = "hydra-demo-2-0000cafe"
    try:
        async with fleet(tmp_path) as f:
            entry, exits = await _entry_two_exits_two_relays(f, smtp)
            async with light_client(tmp_path / "client", entry) as client:
                mid = await client.send("smtp:u@example.org", f"{token}\r\n".encode())
                e = await client.wait_acked(mid, timeout=60, until="queued")
                (first,) = [x for x in exits if x.node_id == e.queued_at]
                (other,) = [x for x in exits if x is not first]
                assert first.relay.exit_queue.lookup(mid) == (MessageState.PENDING, "")
                entry.relay.dead_nodes = lambda: [first.node_id]  # a false death
                held = other.relay.notices.m_notices.labels("asked_held")
                await wait_until(lambda: held._value.get() >= 1, 30, 0.02)
                release.set()  # the slow mail server answers the first exit now
                e = await client.wait_acked(mid, timeout=60)
                assert e.state.name == "DELIVERED", e
                await wait_until(
                    lambda: (
                        other.relay.exit_queue.lookup(mid) == (MessageState.DELIVERED, ELSEWHERE)
                    ),
                    30,
                )
                assert first.relay.exit_queue.lookup(mid) == (MessageState.DELIVERED, "")
        await trio.sleep(0.5)
        assert sink.counts == {token: 1}
    finally:
        release.set()
        sink.stop()


async def test_delivery_notices_from_non_exits_and_garbage_are_rejected(tmp_path):
    from overlay.wire import delivered

    key = delivered.notice_key(b"\x07" * 16)
    async with fleet(tmp_path) as f:
        exit_node = await f.add("exit", EXIT)
        relay = await f.add("relay", ("relay",))
        await wait_until(lambda: all(len(n.view) == 2 for n in (exit_node, relay)), 60)
        await trio.sleep(2)  # gossip mesh
        m = exit_node.relay.notices.m_notices
        for _ in range(3):  # a relay claiming deliveries, then garbage
            await relay.host.publish(delivered.TOPIC, delivered.encode(delivered.Delivered((key,))))
            await relay.host.publish(delivered.TOPIC, b"\xa1\x00\x09garbage")
            await trio.sleep(0.3)
        await wait_until(lambda: m.labels("rejected_not_exit")._value.get() >= 1, 20)
        await wait_until(lambda: m.labels("rejected_malformed")._value.get() >= 1, 20)
        assert m.labels("accepted")._value.get() == 0
        (row,) = exit_node.relay.exit_queue._db.execute(
            "SELECT COUNT(*) FROM elsewhere WHERE notice_key = ?", (key,)
        ).fetchone()
        assert row == 0


async def test_chain_mode_keeps_exactly_one_public_exit_through_takedowns(tmp_path):
    """exit_policy_mode = "chain": one public exit; the next standby takes over only
    when it is gone, one at a time, and the client's messages follow."""
    from overlay.devtools.demo import SmtpSink

    sink = SmtpSink()
    port = sink.start()
    cfg = {"smtp_relay": f"127.0.0.1:{port}", "exit_policy_mode": "chain"}
    try:
        async with fleet(tmp_path) as f:
            entry = await f.add("entry", ("entry", "relay"), **cfg)
            relays = [await f.add(f"relay{i}", ("relay",), **cfg) for i in range(2)]
            exit_node = await f.add("exit", EXIT, **cfg)
            standby = [await f.add(f"standby{i}", STANDBY, **cfg) for i in range(2)]
            everyone = [entry, *relays, exit_node, *standby]
            await wait_until(lambda: all(len(n.view) == 6 for n in everyone), 90)
            await wait_settled(everyone)
            await wait_until(lambda: all(sees_enough_exits(s) for s in standby), 60)
            # one exit is enough
            assert all(promotions(s) == 0 and Role.EXIT not in s.roles for s in standby)
            assert all(live_exit_count(n) == 1 for n in everyone)
            n_sent = 0
            async with light_client(tmp_path / "client", entry) as client:

                async def deliver_one() -> None:
                    nonlocal n_sent
                    token = f"hydra-demo-{n_sent}-{n_sent:08x}"
                    n_sent += 1
                    mid = await client.send("smtp:u@example.org", f"{token}\r\n".encode())
                    e = await client.wait_acked(mid, timeout=60)
                    assert e.state.name == "DELIVERED", e

                await deliver_one()
                current = exit_node
                for _ in range(2):
                    await f.stop(current)
                    survivors = [n for n in everyone if f.running(n)]
                    await deliver_one()  # sent at once: it waits for the next exit
                    await wait_until(
                        lambda survivors=survivors: all(live_exit_count(n) == 1 for n in survivors),
                        30,
                    )
                    promoted = [s for s in standby if f.running(s) and Role.EXIT in s.roles]
                    assert len(promoted) == 1, [s.roles for s in standby]  # one, not all
                    current = promoted[0]
                    await trio.sleep(2)
                    # still exactly one: the other standby did not join in late
                    assert [s for s in standby if f.running(s) and Role.EXIT in s.roles] == [
                        current
                    ]
        await trio.sleep(0.5)
        assert sorted(sink.counts.values()) == [1] * n_sent
    finally:
        sink.stop()


async def test_withdrawn_exit_is_replaced_by_a_standby(tmp_path):
    """An exit that leaves in good order (a signed tombstone) is replaced at once:
    no suspicion period, the tombstone itself removes it from the live exits."""
    async with fleet(tmp_path) as f:
        exit_node = await f.add("exit", EXIT, target_live_exits=1)
        standby = await f.add("standby", STANDBY, target_live_exits=1)
        relays = [await f.add(f"relay{i}", ("relay",), target_live_exits=1) for i in range(2)]
        everyone = [exit_node, standby, *relays]
        await wait_until(lambda: all(len(n.view) == 4 for n in everyone), 60)
        await wait_settled(everyone)
        assert Role.EXIT not in standby.roles
        await exit_node.withdraw()
        others = [standby, *relays]
        await wait_until(lambda: Role.EXIT in standby.roles, 20)
        await wait_until(
            lambda: all(live_exit_ids(n) == {standby.node_id.peer_id()} for n in others), 20
        )
        # nobody had to declare the withdrawn exit dead for this
        for n in others:
            assert n.resilience.liveness.state(exit_node.node_id)[0] != "dead"


async def test_an_exit_can_ask_other_exits_what_they_delivered(tmp_path):
    from overlay.wire.delivered import notice_key
    from overlay.wire.delivery import ExitMessage

    async with fleet(tmp_path) as f:
        a = await f.add("a", EXIT)
        b = await f.add("b", EXIT)
        relay = await f.add("relay", ("relay",))
        await wait_until(lambda: all(len(n.view) == 3 for n in (a, b, relay)), 60)
        q = b.relay.exit_queue
        done, held, other = b"\x01" * 16, b"\x03" * 16, b"\x02" * 16
        q.accept(ExitMessage.make(done, "smtp:u@example.org", b"x"), time.time())
        assert q.mark_delivered(done, time.time())
        q.postpone(done, 0)  # no-op: finished
        # held: pending at b, not due for a while (its destination is down, say)
        q.accept(ExitMessage.make(held, "smtp:u@example.org", b"x"), time.time())
        assert q.postpone(held, time.time() + 3600)
        keys = [notice_key(done), notice_key(other), notice_key(held)]
        answer = await a.relay.notices.ask(keys)
        assert answer.delivered == (notice_key(done),)
        assert answer.holding == ()  # b never had it as far as this question knows
        answer = await a.relay.notices.ask(keys, [bytes(b.node_id)])
        assert answer.holding == (notice_key(held),)
        unknown = await a.relay.notices.ask([notice_key(other)])
        assert (unknown.delivered, unknown.holding, unknown.answered) == ((), (), 1)
        # b remembers that exit a asked about a message b does not have yet ...
        assert b.relay.worker._claims[notice_key(other)][0] == bytes(a.node_id)
        never = b"\x04" * 16
        await relay.relay.notices.ask([notice_key(never)])
        assert notice_key(never) not in b.relay.worker._claims  # ... but not a relay's question
        # any node may ask; only exit-capable peers (here a and b) are asked, and
        # with two of them asked, one alone cannot vouch for a delivery
        assert (await relay.relay.notices.ask(keys)).delivered == ()
        a.relay.exit_queue.note_delivered_elsewhere([notice_key(done)], time.time())
        assert (await relay.relay.notices.ask(keys)).delivered == (notice_key(done),)
        # a message's earlier exits are asked first; ourselves and garbage are skipped
        earlier = [bytes(b.node_id), bytes(a.node_id), b"\x00" * 5]
        answer = await a.relay.notices.ask([notice_key(held)], earlier)
        assert answer.holding == (notice_key(held),)


async def test_a_dial_back_closing_keeps_the_liveness_stream_and_brings_no_probe(tmp_path):
    """An AutoNAT dial-back (a second connection that closes) leaves the liveness
    stream on the first connection in place and probes nobody at once; the last
    connection closing drops the stream and brings the probe."""

    def services(*_):
        return [FeedMonitor(relays=0, probe_interval=0, dcutr=False, scan_interval=5.0)]

    async with overlay(tmp_path, 2, services_for=services) as (a, b):
        await wait_until(lambda: a.host.is_connected(b.node_id.peer_id()), 30)
        probed: list[tuple[str, str]] = []
        for me in (a, b):
            real = me.resilience.liveness.probe_now

            def spy(peer, now, real=real, me=me):
                probed.append((me.node_id.short(), peer.short()))
                return real(peer, now)

            me.resilience.liveness.probe_now = spy
        # a frame to b: a holds a liveness stream to it
        a.resilience._send(Send(b.node_id, PROTOCOL, wire.encode(wire.Ping(1))))
        link = a.resilience._out._links[b.node_id]
        await wait_until(lambda: link.stream is not None, 30)
        stream = link.stream
        res = await a.host.autonat_probe(b.node_id.peer_id(), [join_addr(a)])
        assert res.status == "ok", res
        a.resilience._send(Send(b.node_id, PROTOCOL, wire.encode(wire.Ping(2))))
        await trio.sleep(1.0)  # the dial-back's close has been seen on both sides
        assert link.stream is stream and not stream.connection_closed
        assert probed == []
        # now every connection closes (and none comes back: a bans b): the stream
        # goes, and a probes b at once
        a.host.ban(b.node_id.peer_id(), 60)
        await a.host.disconnect(b.node_id.peer_id())
        await wait_until(lambda: (a.node_id.short(), b.node_id.short()) in probed, 30)
        assert stream.connection_closed
