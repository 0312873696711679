"""overlay.core.relaycore: the relay's decisions as effect values, on a given clock."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from overlay.core.mixing import LoopLost
from overlay.core.relaycore import (
    Count,
    DeliverExit,
    ForwardPacket,
    PushReply,
    Reject,
    RelayCore,
)
from overlay.crypto import OnionKey, SigningKey
from overlay.errors import Reason
from overlay.onion import LARGE, SMALL, Hop, build_packet, make_surb, use_surb
from overlay.records import Role, make_record
from overlay.wire import cover
from tests.recgen import NOW, ONION

EPOCH = 7
KEY = OnionKey(bytes(range(32)), EPOCH)
ME = SigningKey(b"\x01" * 32).node_id
PEER = SigningKey(b"\x02" * 32).node_id
NEXT = SigningKey(b"\x03" * 32).node_id
NEXT_KEY = OnionKey(bytes(range(1, 33)), EPOCH)


def core(**kw) -> RelayCore:
    c = RelayCore(**kw)
    c.keys = {EPOCH: KEY}
    return c


def me() -> Hop:
    return Hop(ME, KEY.public, EPOCH)


def to_next(delay_ms: int = 0) -> bytes:
    """A packet this node forwards to NEXT (held ``delay_ms`` first)."""
    path = [me(), Hop(NEXT, NEXT_KEY.public, EPOCH)]
    return build_packet(SMALL, path, b"onward", delays_ms=[delay_ms]).packet


def ending_here(payload: bytes, delay_ms: int | None = None) -> bytes:
    delays = None if delay_ms is None else [delay_ms]
    return build_packet(SMALL, [me()], payload, delays_ms=delays).packet


def run(c: RelayCore, frames, now=100.0, peer=PEER, source="relay", routable=None):
    """receive + act, as the shell does (tags persisted in between)."""
    intake = c.receive(frames, peer, source, now)
    acted = c.act(intake.accepted, now, source, routable or (lambda n: True))
    return intake, intake.effects + acted


def test_a_packet_to_forward_is_sent_on_and_its_tag_handed_back():
    c = core()
    intake, effects = run(c, [to_next()])
    assert len(intake.tags) == 1 and intake.tags[0][0] == EPOCH
    assert effects[0] == Count("forwarded")
    (fwd,) = effects[1:]
    assert isinstance(fwd, ForwardPacket) and fwd.node == NEXT and fwd.source == "relay"
    assert len(fwd.packet) == SMALL.packet_size
    assert len(c.mix) == 0 and c.next_wakeup() is None


def test_a_forward_message_goes_to_the_exit_and_drop_cover_is_discarded():
    c = core()
    _, effects = run(c, [ending_here(b"hello")])
    assert effects == [Count("delivered", "exit"), DeliverExit(b"hello")]
    _, effects = run(c, [ending_here(cover.encode(cover.DROP))])
    assert effects == [Count("delivered", "drop_cover")]


def test_a_reply_is_pushed_to_its_session_once_and_an_unknown_one_dropped():
    c = core()
    sink = object()
    surb, secret = make_surb(SMALL, [me()])
    assert c.register(sink, [secret.surb_id], 100.0) == []
    _, packet = use_surb(SMALL, surb, b"reply")
    _, effects = run(c, [packet])
    assert effects[0] == Count("delivered", "reply")
    push = effects[1]
    assert isinstance(push, PushReply) and push.sink is sink
    assert push.surb_id == secret.surb_id and len(effects) == 2
    # a second reply to the same (used) surb id: nobody waits for it any more
    surb2, secret2 = make_surb(SMALL, [me()])
    _, effects = run(c, [use_surb(SMALL, surb2, b"x")[1]])
    assert effects == [Count("delivered", "reply"), Count("dropped", "unknown_surb")]


def test_a_reply_for_a_detached_session_is_buffered_for_the_next_one():
    c = core()
    old, new = object(), object()
    surb, secret = make_surb(SMALL, [me()])
    c.register(old, [secret.surb_id], 100.0)
    c.detach(old)
    _, effects = run(c, [use_surb(SMALL, surb, b"later")[1]])
    assert effects == [Count("delivered", "reply")]  # buffered, not dropped
    (push,) = c.register(new, [secret.surb_id], 101.0)
    assert push.sink is new and push.surb_id == secret.surb_id


def test_the_relays_own_loop_coming_back_is_counted_not_pushed():
    c = core()
    surb, secret = make_surb(SMALL, [me()])
    assert c.loops.sent(secret.surb_id, [NEXT], 100.0, 0.0)
    _, effects = run(c, [use_surb(SMALL, surb, cover.encode(cover.LOOP))[1]])
    assert effects == [Count("loops", "returned")]
    assert c.loops.stats["returned"] == 1


def test_a_replay_is_rejected_without_blame_and_adds_no_tag():
    c = core()
    packet = to_next()
    run(c, [packet])
    intake, effects = run(c, [packet])
    assert effects == [Reject("relay", Reason.REPLAY, PEER, False)]
    assert intake.tags == [] and intake.accepted == []
    # within one batch too: the first copy is accepted, the second refused
    c2 = core()
    intake, effects = run(c2, [packet, packet])
    assert len(intake.tags) == 1 and len(intake.accepted) == 1
    assert Reject("relay", Reason.REPLAY, PEER, False) in effects


def test_a_bad_frame_is_rejected_and_blamed_on_the_peer_not_on_this_node():
    c = core()
    _, effects = run(c, [b"\x00" * 100])
    assert effects == [Reject("relay", Reason.MALFORMED, PEER, True)]
    _, effects = run(c, [b"\x00" * (LARGE.packet_size + 1)])
    assert effects == [Reject("relay", Reason.OVERSIZED, PEER, True)]
    _, effects = run(c, [b"\x00" * 100], peer=None, source="local")
    assert effects == [Reject("local", Reason.MALFORMED, None, False)]
    # the right size, someone else's key: the packet's sender's doing, not the peer's
    other = build_packet(SMALL, [Hop(NEXT, NEXT_KEY.public, EPOCH)], b"x").packet
    _, effects = run(c, [other])
    assert effects == [Reject("relay", Reason.BAD_MAC, PEER, False)]
    stale = build_packet(SMALL, [Hop(ME, KEY.public, EPOCH + 1)], b"x").packet
    _, effects = run(c, [stale])
    assert effects == [Reject("relay", Reason.UNKNOWN_EPOCH, PEER, False)]


def test_an_over_rate_peer_is_refused_and_penalised_at_most_once_a_second():
    c = core(rate=1.0, burst=2.0, client_rate=1.0, client_burst=1.0)
    packets = [to_next() for _ in range(6)]
    intake, effects = run(c, packets[:4], now=100.0)
    assert len(intake.accepted) == 2
    limited = [e for e in effects if isinstance(e, Reject)]
    assert limited == [
        Reject("relay", Reason.RATE_LIMITED, PEER, True),
        Reject("relay", Reason.RATE_LIMITED, PEER, False),
    ]
    # a light client has its own, smaller bucket
    intake, _ = run(c, packets[4:5], now=100.0, source="client")
    assert len(intake.accepted) == 1
    # 1.5 s later: one token back, the next refusal is penalised again
    intake, effects = run(c, [to_next(), to_next()], now=101.5)
    assert len(intake.accepted) == 1
    assert [e for e in effects if isinstance(e, Reject)] == [
        Reject("relay", Reason.RATE_LIMITED, PEER, True)
    ]
    # large packets cost more
    c2 = core(rate=0.0, burst=16.0)
    big = build_packet(LARGE, [me()], b"big").packet
    intake, effects = run(c2, [big, to_next()])
    assert len(intake.accepted) == 1 and effects[0].reason is Reason.RATE_LIMITED


def test_the_bandwidth_cap_drops_quietly_before_any_processing():
    c = core()
    intake = c.receive([to_next()], PEER, "relay", 100.0, admit=lambda size: False)
    assert intake.effects == [] and intake.accepted == [] and intake.tags == []
    intake = c.receive([to_next()], None, "local", 100.0, admit=lambda size: False)
    assert len(intake.accepted) == 1  # our own packets are not capped


def test_held_packets_are_released_in_due_order_on_the_given_clock():
    c = core()
    _, effects = run(c, [to_next(delay_ms=3000)], now=100.0)
    assert effects == [Count("forwarded")] and len(c.mix) == 1
    assert c.next_wakeup() == 103.0
    for name, delay in (("b", 1000), ("c", 2000), ("d", 1000)):
        assert c.hold(NEXT, name, delay, 10, 100.5) == []
    assert c.next_wakeup() == 101.5
    assert c.tick(101.4) == []
    assert c.tick(101.5) == [ForwardPacket(NEXT, "b"), ForwardPacket(NEXT, "d")]
    assert c.next_wakeup() == 102.5
    assert c.tick(102.9) == [ForwardPacket(NEXT, "c")]
    (last,) = c.tick(103.0)
    assert last.node == NEXT and len(last.packet) == SMALL.packet_size
    assert c.next_wakeup() is None and c.mix.released == 4


def test_the_last_hop_holds_before_delivering_and_delays_are_cut():
    c = core(max_delay_ms=500)
    _, effects = run(c, [ending_here(b"late", delay_ms=2000)], now=10.0)
    assert effects == [] and c.next_wakeup() == 10.5  # cut at max_delay_ms
    assert c.tick(10.5) == [Count("delivered", "exit"), DeliverExit(b"late")]


def test_a_packet_for_a_hop_that_cannot_be_routed_is_not_held():
    c = core()
    _, effects = run(c, [to_next(delay_ms=1000)], routable=lambda n: False)
    assert effects == [Count("forwarded"), Reject("relay", Reason.UNKNOWN_NEXT_HOP, None, False)]
    assert len(c.mix) == 0
    # sent at once, it is the shell's to check as it sends
    _, effects = run(c, [to_next()], routable=lambda n: False)
    assert isinstance(effects[-1], ForwardPacket)


def test_a_full_pool_refuses_the_arriving_packet_and_keeps_the_held_ones():
    c = core(max_held=2, max_held_bytes=5000)
    assert c.hold(NEXT, "a", 5000, 2048, 0.0) == []
    assert c.hold(NEXT, "b", 5000, 2048, 0.0) == []
    # full in packets: refused even though it would be due first
    assert c.hold(NEXT, "c", 10, 100, 0.0) == [Count("dropped", "hold_full")]
    assert [item for _, item in c.mix.held()] == ["a", "b"] and c.mix.overflows == 1
    c2 = core(max_held=10, max_held_bytes=5000)
    assert c2.hold(NEXT, "a", 10, 4096, 0.0) == []
    assert c2.hold(NEXT, "b", 10, 2048, 0.0) == [Count("dropped", "hold_full")]  # bytes
    # through act: the refusal is counted, the packet is gone
    c3 = core(max_held=1)
    _, effects = run(c3, [to_next(delay_ms=100), to_next(delay_ms=100)])
    assert effects.count(Count("dropped", "hold_full")) == 1 and len(c3.mix) == 1


def test_sweep_reports_lost_loops_and_bounds_the_buckets():
    c = core(max_buckets=3)
    assert c.loops.sent(b"L" * 16, [NEXT, PEER], 0.0, 1.0)
    for i in range(5):
        c.receive([to_next()], SigningKey(bytes([i + 10]) * 32).node_id, "relay", 0.0)
    effects = c.sweep(100.0)
    assert effects[0] == Count("loops", "lost")
    assert isinstance(effects[1], LoopLost) and effects[1].relays == (NEXT, PEER)
    assert c._buckets == {}


def test_loop_packet_needs_a_path_and_goes_out_through_its_first_hop():
    def rec(i: int, onion: OnionKey):
        return make_record(
            SigningKey(bytes([i]) * 32),
            seq=1,
            now=NOW,
            roles=Role.RELAY,
            feeds=(f"/ip4/10.0.0.{i}/tcp/4001",),
            onion_key=onion.public,
            onion_epoch=onion.epoch,
        )

    c = core()
    mine = rec(1, KEY)
    relays = [rec(i, ONION) for i in range(20, 23)]
    rng = random.Random(1)
    assert c.loop_packet([mine], ME, rng, 0.5, 1e9, NOW) is None  # no relays: no path
    loop = c.loop_packet([mine, *relays], ME, rng, 0.5, 1e9, NOW)
    assert loop is not None and c.loops.knows(loop.loop_id)
    assert loop.first in {r.node_id for r in relays} and len(loop.packet) == SMALL.packet_size
    first = core()
    first.keys = {ONION.epoch: ONION}
    intake, _ = run(first, [loop.packet])
    (fwd,) = intake.accepted
    assert fwd.next_node in {r.node_id for r in relays} - {loop.first}
    # bounded: a monitor that is full sends no more loops
    c.loops.max_inflight = 1
    assert c.loop_packet([mine, *relays], ME, rng, 0.5, 1e9, NOW) is None


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=SMALL.packet_size + 64),
            st.binary(min_size=SMALL.packet_size, max_size=SMALL.packet_size).map(
                lambda b: bytes([SMALL.format]) + EPOCH.to_bytes(4, "big") + b[5:]
            ),
            st.sampled_from([b"", bytes(SMALL.packet_size), bytes(LARGE.packet_size)]),
        ),
        max_size=8,
    ),
    st.sampled_from([(PEER, "relay"), (PEER, "client"), (None, "local")]),
    st.floats(min_value=0, max_value=1e9, allow_nan=False),
)
def test_random_bytes_give_only_rejections(frames, who, now):
    c = core()
    peer, source = who
    intake, effects = run(c, frames, now=now, peer=peer, source=source)
    assert intake.accepted == [] and intake.tags == []
    assert all(isinstance(e, Reject) for e in effects) and len(effects) == len(frames)
    assert len(c.mix) == 0
