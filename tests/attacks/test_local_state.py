"""Local state under attack or accident: a corrupt ``state.json``, records of ours from an
earlier life still in the overlay, a non-UTF-8 ``config.toml``, and a web page reading
the control endpoint through DNS rebinding. Real nodes on loopback."""

import json
import subprocess
import sys
import time

import httpx
import pytest
import trio

from overlay.home import time_floor
from overlay.records import Role, make_record
from overlay.testing import fleet, join_addr, make_home, wait_until

pytestmark = pytest.mark.slow

SOURCES = ("gossip", "sync", "dht", "local")


def stale_rejections(node) -> float:
    get = node.metrics.registry.get_sample_value
    return sum(
        get("hydra_records_rejected_total", {"source": s, "reason": "stale_seq"}) or 0.0
        for s in SOURCES
    )


def holds(node, other, seq: int, role: Role) -> bool:
    rec = node.view.get(other.node_id)
    return rec is not None and rec.seq == seq and role in rec.roles


async def test_corrupt_state_then_restart_and_promotion_is_accepted(tmp_path):
    with trio.fail_after(180):
        async with fleet(tmp_path) as f:
            b = await f.add("b")
            home = make_home(tmp_path / "a", ["relay"], policy=["smtp:*"])
            a = await f.start(home, join=[join_addr(b)])
            for i in range(3):
                await a.publish_own(f"update {i}")
            old = a.own.seq
            await wait_until(lambda: b.view.seq_of(a.node_id) == old, 60)
            await f.stop(a)

            # the state file is corrupted and the record store lost
            home.state_path.write_bytes(b"\x00\xff not json")
            for suffix in ("", "-wal", "-shm"):
                home.path.joinpath("records.db" + suffix).unlink(missing_ok=True)
            floor = time_floor()
            stale_before = stale_rejections(b)

            a = await f.start(home, join=[join_addr(b)])
            promoted = await a.publish_own("promote", roles=Role.RELAY | Role.EXIT)
            assert promoted.seq > floor > old
            await wait_until(lambda: holds(b, a, promoted.seq, Role.EXIT), 60)
            # every record of the new life was accepted: none was stale
            assert stale_rejections(b) == stale_before
            assert json.loads(home.state_path.read_text())["seq"] == promoted.seq


async def test_own_record_from_an_earlier_life_is_superseded(tmp_path):
    """The overlay holds a record of ours with a higher seq than we know (signed before
    our state was rolled back): we see it through anti-entropy and publish above it."""
    with trio.fail_after(180):
        async with fleet(tmp_path) as f:
            b = await f.add("b")
            home = make_home(tmp_path / "a", ["relay"], policy=["smtp:*"])
            a = await f.start(home, join=[join_addr(b)])
            now = await a.publish_own("promote", roles=Role.RELAY | Role.EXIT)
            await wait_until(lambda: holds(b, a, now.seq, Role.EXIT), 60)
            onion = home.onion_key()
            earlier = make_record(
                home.signing_key(),
                seq=now.seq + 1000,
                now=time.time(),
                roles=Role.RELAY,
                feeds=list(now.feeds),
                onion_key=onion.public,
                onion_epoch=onion.epoch,
            )
            # b learnt it long ago (it is a valid record of a, so b keeps it)
            assert b.ingest(earlier.encode(), "sync")
            assert Role.EXIT not in b.view.get(a.node_id).roles

            def republished() -> bool:
                return a.own.seq > earlier.seq and holds(b, a, a.own.seq, Role.EXIT)

            await wait_until(republished, 60)
            assert home.last_seq() == a.own.seq


async def test_own_record_conflicts_only_with_our_signature(tmp_path):
    """A record of ours with the seq we hold but other content (state lost, same seq signed
    twice) makes us publish above it; a forged one with our id does not."""
    with trio.fail_after(60):
        async with fleet(tmp_path) as f:
            home = make_home(tmp_path / "a", ["relay"], policy=["smtp:*"])
            a = await f.start(home, join=[])
            own = a.own
            onion = home.onion_key()

            def signed(key, seq, roles):
                return make_record(
                    key,
                    seq=seq,
                    now=time.time(),
                    roles=roles,
                    feeds=list(own.feeds),
                    onion_key=onion.public,
                    onion_epoch=onion.epoch,
                    exit_policy=["smtp:*"] if Role.EXIT in roles else (),
                ).encode()

            # forged: our node id, seq >= ours, signature broken
            forged = bytearray(signed(home.signing_key(), own.seq, Role.RELAY | Role.EXIT))
            forged[-3] ^= 0x01
            assert not a.ingest(bytes(forged), "gossip")
            await trio.sleep(2.5)  # two turns of the republish loop
            assert a.own is own

            # genuine: the same seq signed twice
            twin = signed(home.signing_key(), own.seq, Role.RELAY | Role.EXIT)
            assert not a.ingest(twin, "gossip")  # not forwarded
            await wait_until(lambda: a.own.seq > own.seq, 20)
            assert a.view.get(a.node_id).seq == a.own.seq
            assert a.metrics.registry.get_sample_value(
                "hydra_peer_penalties_total", {"reason": "stale_seq"}
            ) in (None, 0.0)


def test_non_utf8_config_is_one_line(tmp_path):
    home = make_home(tmp_path / "a")
    content = b'[node]\nroles = ["relay"]\n# caf\xe9 \xff\xfe\n'
    home.config_path.write_bytes(content)
    bad_at = content.index(b"\xe9")
    for args in (["run"], ["record", "show"]):
        p = subprocess.run(
            [sys.executable, "-m", "overlay", *args, "--home", str(home.path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 78  # EX_CONFIG, docs/volunteer.md exit codes
        assert p.stderr.splitlines() == [
            f"error: {home.config_path}: not UTF-8 text (byte {bad_at})"
        ], p.stderr
        assert p.stdout == ""


async def test_dns_rebinding_request_is_refused(tmp_path):
    """A page on rebind.attacker.example whose name now resolves to 127.0.0.1: the
    browser connects to the node's port but names the page's host and sends no token."""
    with trio.fail_after(120):
        async with fleet(tmp_path) as f:
            a = await f.add("a")
            port = int(a.control_url.rsplit(":", 1)[1])
            page = f"rebind.attacker.example:{port}"
            browser = {
                "Host": page,
                "Origin": f"http://{page}",
                "Referer": f"http://{page}/",
                "Accept": "*/*",
            }
            async with httpx.AsyncClient(base_url=a.control_url, trust_env=False) as c:
                for route in ("/status", "/peers", "/exits", "/records", "/metrics", "/"):
                    r = await c.get(route, headers=browser, timeout=5)
                    assert r.status_code == 421, route
                    assert a.node_id.peer_id() not in r.text
                    assert "access-control-allow-origin" not in r.headers
                r = await c.request("OPTIONS", "/status", headers=browser, timeout=5)
                assert r.status_code == 421
                # the page guessing the host right still lacks the token
                r = await c.get("/status", headers={**browser, "Host": f"127.0.0.1:{port}"})
                assert r.status_code == 401 and a.node_id.peer_id() not in r.text
            get = a.metrics.registry.get_sample_value
            assert get("hydra_control_refused_total", {"reason": "unauthorized", "check": "host"})
            # the node is fine and `overlay status` answers
            p = await trio.run_process(
                [sys.executable, "-m", "overlay", "status", "--json", "--home", str(a.home.path)],
                capture_stdout=True,
            )
            assert json.loads(p.stdout)["peer_id"] == a.node_id.peer_id()
