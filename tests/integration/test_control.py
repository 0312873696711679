"""The control endpoint of a real node: loopback Host names only, a bearer token for
everything but /metrics, and the CLI sending that token for the volunteer."""

import json
import os
import stat
import sys

import httpx
import trio

from overlay.control import read_token, token_path
from overlay.runtime import Node
from overlay.testing import light_services, make_home


def refused(metrics_text: str, check: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("hydra_control_refused_total{") and f'check="{check}"' in line:
            assert 'reason="unauthorized"' in line
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def overlay_cli(*args: str):
    return await trio.run_process(
        [sys.executable, "-m", "overlay", *args], capture_stdout=True, capture_stderr=True
    )


async def test_host_and_token_checks(tmp_path):
    home = make_home(tmp_path / "n")
    with trio.fail_after(60):
        async with Node(home, services=light_services()) as node:
            url = node.control_url
            port = int(url.rsplit(":", 1)[1])
            token = node.control_token
            assert read_token(home.path) == token and len(bytes.fromhex(token)) == 32
            assert stat.S_IMODE(os.stat(token_path(home.path)).st_mode) == 0o600
            auth = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=5) as c:
                # no token, a wrong token, another scheme: 401 on every route but /metrics
                for route in ("/status", "/peers", "/exits", "/records", "/", "/nope"):
                    assert (await c.get(route)).status_code == 401
                wrong = "0" * 64 if token != "0" * 64 else "1" * 64
                r = await c.get("/status", headers={"Authorization": f"Bearer {wrong}"})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                r = await c.get("/status", headers={"Authorization": f"Basic {token}"})
                assert r.status_code == 401
                # DNS rebinding: the page's own name, or the right name on another port
                for host in ("attacker.example", f"attacker.example:{port}", "localhost:1"):
                    for route in ("/status", "/metrics"):
                        r = await c.get(route, headers={**auth, "Host": host})
                        assert r.status_code == 421, (host, route)
                # loopback names with the token: served
                for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
                    r = await c.get("/status", headers={**auth, "Host": host})
                    assert r.status_code == 200 and r.json()["peer_id"] == node.node_id.peer_id()
                r = await c.get("/status", headers={"authorization": f"bearer {token}"})
                assert r.status_code == 200
                # Prometheus scrapes need no token; the refusals are counted there
                r = await c.get("/metrics")
                assert r.status_code == 200
                assert refused(r.text, "token") == 8
                assert refused(r.text, "host") == 6


async def test_cli_sends_the_token(tmp_path):
    home = make_home(tmp_path / "n")
    with trio.fail_after(90):
        async with Node(home, services=light_services()) as node:
            p = await overlay_cli("status", "--json", "--home", str(home.path))
            st = json.loads(p.stdout)
            assert st["peer_id"] == node.node_id.peer_id() and st["control"] == node.control_url
            p = await overlay_cli("peers", "--json", "--home", str(home.path))
            assert json.loads(p.stdout) == {"peers": []}
            p = await overlay_cli("exits", "--json", "--home", str(home.path))
            assert "exits" in json.loads(p.stdout)
            token = node.control_token
        # a restart keeps the token, so scripts holding it keep working
        async with Node(home, services=light_services()) as node:
            assert node.control_token == token
            # a token another user could read is replaced on the next start
        os.chmod(token_path(home.path), 0o644)
        async with Node(home, services=light_services()) as node:
            assert node.control_token != token
            assert stat.S_IMODE(os.stat(token_path(home.path)).st_mode) == 0o600
            # a wrong token in the home: the CLI says so in one line
            token_path(home.path).write_text("ab" * 32)
            p = await trio.run_process(
                [sys.executable, "-m", "overlay", "status", "--home", str(home.path)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert p.returncode == 1
            assert p.stderr.decode().strip().splitlines() == [
                f"error: control endpoint {node.control_url} refused the token in "
                f"{token_path(home.path)}"
            ]
