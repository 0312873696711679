"""A newcomer joins from seed bundles: real HTTP and DNS seed servers, real nodes, `overlay run`."""

import json
import sys
import time

import httpx
import pytest
import trio

from bootstrap import publish
from bootstrap.bundle import Entry, SeedBundle
from overlay.control import auth_headers
from overlay.errors import LocalError
from overlay.testing import fleet, make_home, wait_until
from tests.bootstrap.helpers import OPS, PINNED, closed_port, forged_copy

pytestmark = pytest.mark.slow


def bundle_for(nodes, seq: int) -> SeedBundle:
    now = int(time.time()) - 60
    b = SeedBundle.create(
        seq=seq,
        issued_at=now,
        expires_at=now + 86400,
        entries=[Entry(n.node_id, tuple(n.own.feeds)) for n in nodes],
        operators=[k.node_id for k in OPS],
        threshold=2,
    )
    return b.signed_by(OPS[0]).signed_by(OPS[2])


async def run_until_joined(home, sources, timeout=60) -> dict:
    """Start `overlay run --seeds ...` and return its /status once it has joined."""
    args = [sys.executable, "-m", "overlay", "run", "--home", str(home.path)]
    for s in sources:
        args += ["--seeds", s]
    home.control_path.unlink(missing_ok=True)
    proc = await trio.lowlevel.open_process(args, stdout=None, stderr=None)
    try:
        with trio.fail_after(timeout):
            while True:
                assert proc.poll() is None, "overlay run exited"
                try:
                    url = json.loads(home.control_path.read_text())["url"]
                    headers = auth_headers(home.path)
                    async with httpx.AsyncClient(headers=headers, trust_env=False) as c:
                        st = (await c.get(url + "/status", timeout=2)).json()
                    if st["joined_via"] and st["members"] >= 4:
                        return st
                except (OSError, ValueError, KeyError, httpx.HTTPError, LocalError):
                    pass
                await trio.sleep(0.2)
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.poll() is None:
            proc.kill()


def seeds_home(tmp_path, name):
    return make_home(tmp_path / name, seed_operators=[k.hex() for k in PINNED], seed_threshold=2)


async def test_join_from_http_seeds_with_hostile_sources_then_from_cache(tmp_path):
    async with fleet(tmp_path) as f:
        nodes = [await f.add(f"n{i}") for i in range(3)]
        await wait_until(lambda: all(len(n.view) == 3 for n in nodes), 60)
        good = bundle_for(nodes, 20)
        old = bundle_for(nodes[:1], 10)  # validly signed but rolled back
        forged = forged_copy(good)  # signatures over other content
        urls = []
        async with trio.open_nursery() as servers:
            for name, b in (("good", good), ("old", old), ("forged", forged)):
                path = tmp_path / f"{name}.cbor"
                path.write_bytes(b.encode())
                bound = await servers.start(publish.serve, path, "127.0.0.1:0")
                urls.append(bound[0] + "/seeds.cbor")
            down = f"http://127.0.0.1:{closed_port()}/seeds.cbor"
            home = seeds_home(tmp_path, "newcomer")
            # hostile and dead sources first: the client must still pick the good bundle
            st = await run_until_joined(home, [down, urls[2], urls[1], urls[0]])
            good_addrs = set(good.join_addrs())
            assert st["joined_via"] in good_addrs
            cache = home.path / "seeds-cache.cbor"
            assert cache.read_bytes() == good.encode()
            servers.cancel_scope.cancel()
        # every source down now: the cached bundle still gets the newcomer in
        st = await run_until_joined(home, [down, f"http://127.0.0.1:{closed_port()}/"])
        assert st["joined_via"] in good_addrs


async def test_join_from_dns_name(tmp_path):
    from tests.bootstrap.test_dns_source import dns_server, export_zone

    async with fleet(tmp_path) as f:
        nodes = [await f.add(f"n{i}") for i in range(3)]
        await wait_until(lambda: all(len(n.view) == 3 for n in nodes), 60)
        good = bundle_for(nodes, 30)
        zone = export_zone(tmp_path, good)
        with dns_server(zone) as port:
            home = seeds_home(tmp_path, "dnsnewcomer")
            st = await run_until_joined(home, [f"dns:seeds.hydra.test@127.0.0.1:{port}"])
            assert st["joined_via"] in set(good.join_addrs())
