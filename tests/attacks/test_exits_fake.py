"""Fake exits: records that merely claim the exit role (issue 14, item 2).

100 such records made the honest standby step back (101 "live" exits, 100 of
them fake). An exit must count for pool decisions only once it has earned it.
"""

from __future__ import annotations

import signal

import pytest
import trio

from .harness import (
    RECORDS_TOPIC,
    Attacker,
    FeedSink,
    HonestOverlay,
    RecordForge,
    check_held,
    take_baseline,
    wait_views_settled,
)

# these runs bound themselves at 900 s (fail_after): the per-test limit lies beyond
pytestmark = [pytest.mark.slow, pytest.mark.timeout(960)]

FAKES = 100
# once the fakes have spread (record counts settled): > the pool's 10 s step-back
# hysteresis, with a margin for the pool's next evaluation
HYSTERESIS_WAIT = 15.0


async def push_fakes(ov: HonestOverlay, sink: FeedSink) -> dict:
    """100 fake exit records: half by gossip, half over anti-entropy, into the relay."""
    fakes = RecordForge(b"fake-exits", [sink.feed]).batch(0, FAKES, exit=True)
    async with Attacker(0) as attacker:
        peer = await attacker.connect(ov.relay.addr)
        assert peer is not None, "the attacker could not even connect"
        await trio.sleep(2.0)  # subscriptions exchanged, so gossip has somewhere to go
        gossiped = await attacker.gossip(RECORDS_TOPIC, fakes[: FAKES // 2], rate=20.0)
        stats = await attacker.sync_push([peer], fakes[FAKES // 2 :], deadline=120)
    return {"gossiped": gossiped, "synced": stats.records}


async def test_fake_exits_do_not_make_the_promoted_standby_step_back(tmp_path):
    with trio.fail_after(900), FeedSink() as sink:
        async with HonestOverlay(tmp_path, target_live_exits=2) as ov:
            base = await take_baseline(ov, sink)
            pushed = await push_fakes(ov, sink)
            await wait_views_settled(ov)
            await trio.sleep(HYSTERESIS_WAIT)
            report = await check_held(ov, base, sink=sink)
            report.numbers["pushed"] = pushed
            assert not report.failures, report.text()


async def test_fake_exits_do_not_stop_the_standby_taking_over(tmp_path):
    """The standby stands by (target 1); fake exits arrive; the real exit dies:
    the standby must still promote itself."""
    with trio.fail_after(900), FeedSink() as sink:
        async with HonestOverlay(tmp_path, target_live_exits=1) as ov:
            pushed = await push_fakes(ov, sink)
            await wait_views_settled(ov, at_most=15.0)  # the fakes have spread
            ov.exit.stop(signal.SIGKILL)
            roles = []
            with trio.move_on_after(120):
                while "exit" not in roles:
                    st = await ov.standby.status()
                    roles = (st or {}).get("roles", [])
                    await trio.sleep(1.0)
            exits = await ov.relay.exits()
            live = None if exits is None else exits.get("live_exits")
            assert "exit" in roles, (
                f"the honest standby did not take over within 120 s of the only real exit "
                f"dying: roles {roles}, the relay counts {live} live exits; pushed {pushed}"
            )
            for n in (ov.relay, ov.standby):
                assert n.alive, f"{n.name} died"
