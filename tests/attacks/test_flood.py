"""Record floods: fresh self-signed records pushed over anti-entropy into real nodes.

Issue 14, item 1: 1,500 such records were all admitted and stored; nodes dialled
every one of them, their peerstores evicted their own keys, and all three died.
"""

from __future__ import annotations

import pytest
import trio

from .harness import (
    ATTACKER_IPS,
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

SETTLE = 20.0  # at most this long after the flood for it to spread through the overlay


async def test_flood_5000_records_from_one_identity(tmp_path):
    with trio.fail_after(900), FeedSink() as sink:
        async with HonestOverlay(tmp_path) as ov:
            base = await take_baseline(ov, sink)
            records = RecordForge(b"flood-one", [sink.feed]).batch(0, 5000)
            async with Attacker(0) as attacker:
                peer = await attacker.connect(ov.relay.addr)
                assert peer is not None, "the attacker could not even connect"
                stats = await attacker.sync_push([peer], records, deadline=300)
            settled = await wait_views_settled(ov, at_most=SETTLE)
            report = await check_held(ov, base, sink=sink)
            report.numbers["push"] = stats
            report.numbers["settled_s"] = round(settled, 1)
            assert not report.failures, report.text()


async def test_flood_500_records_from_each_of_10_identities(tmp_path):
    with trio.fail_after(900), FeedSink() as sink:
        async with HonestOverlay(tmp_path) as ov:
            base = await take_baseline(ov, sink)
            forge = RecordForge(b"flood-ten", [sink.feed])
            stats = {}

            async def one(i: int) -> None:
                records = forge.batch(i * 500, 500)
                async with Attacker(i, ATTACKER_IPS[i]) as attacker:
                    peers = [await attacker.connect(n.addr) for n in ov.nodes]
                    peers = [p for p in peers if p is not None]
                    if peers:
                        stats[i] = await attacker.sync_push(peers, records, deadline=300)

            async with trio.open_nursery() as n:
                for i in range(10):
                    n.start_soon(one, i)
            settled = await wait_views_settled(ov, at_most=SETTLE)
            report = await check_held(ov, base, sink=sink)
            report.numbers["settled_s"] = round(settled, 1)
            report.numbers["pushed"] = sum(s.records for s in stats.values())
            report.numbers["push_refused_rounds"] = sum(s.refused for s in stats.values())
            assert not report.failures, report.text()
