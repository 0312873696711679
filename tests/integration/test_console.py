"""The console of real nodes: the web page in a real headless Chromium, ``overlay status
--watch`` in a pseudo-terminal, and the console's reach (loopback only, nothing external).

The browser test needs Debian's ``chromium`` and ``chromium-driver`` and the
``selenium`` package; ``scripts/test`` installs them when missing and sets
``HYDRA_REQUIRE_BROWSER=1``, so that there the test fails instead of skipping.
"""

from __future__ import annotations

import errno
import fcntl
import html.parser
import json
import os
import re
import socket
import struct
import subprocess
import sys
import termios
import time

import httpx
import psutil
import pytest
import trio

from overlay.console import browser
from overlay.testing import fleet, wait_until

ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def _need_browser() -> None:
    why = browser.missing()
    if why is None:
        return
    if os.environ.get("HYDRA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"scripts/test could not install {why}")
    pytest.skip(f"needs {why}; scripts/test installs it")


async def _exit_pool_ready(node, exits, timeout=90.0) -> None:
    """``node`` counts every exit in ``exits`` as a verified, live member of its pool."""
    want = {e.node_id.peer_id() for e in exits}

    def ready() -> bool:
        pool = node.console.snapshot()["pool"]
        alive = {
            m["peer_id"]
            for m in pool.get("members", [])
            if m["state"] == "alive" and m["verified"] and m["role"] == "exit"
        }
        return want <= alive

    await wait_until(ready, timeout, interval=0.2)


def _dead_event(node, peer_id: str):
    return next(
        (e for e in node.events.recent(256) if e.kind == "dead" and e.peer == peer_id), None
    )


@pytest.mark.slow
async def test_console_in_chromium(tmp_path):
    _need_browser()
    from selenium.webdriver.common.by import By

    run = trio.to_thread.run_sync
    with trio.fail_after(300):
        async with fleet(tmp_path) as f:
            settings = {"target_live_exits": 2}
            watched = await f.add("n0", ("relay",), **settings)
            exit1 = await f.add("e1", ("exit", "relay"), policy=["smtp:*"], **settings)
            exit2 = await f.add("e2", ("exit", "relay"), policy=["smtp:*"], **settings)
            await f.add("r3", ("relay",), **settings)
            await _exit_pool_ready(watched, [exit1, exit2])
            await wait_until(lambda: len(watched.peers) >= 2, 60)

            url = await run(browser.login_url, watched.control_url, watched.control_token)
            drv = await run(browser.chromium)
            try:
                await run(drv.get, url)
                assert (await run(lambda: drv.current_url)).endswith("/console")

                def page() -> dict:
                    rows = drv.find_elements(By.CSS_SELECTOR, "#pool tbody tr")
                    return {
                        "peers": drv.find_element(By.ID, "peers-count").text,
                        "feeds": drv.find_element(By.ID, "feeds").get_attribute("data-states"),
                        "pool": {
                            r.get_attribute("data-peer"): r.get_attribute("data-state")
                            for r in rows
                        },
                        "conn": drv.find_element(By.ID, "conn").text,
                    }

                # the page shows the node's actual peer count and feed states
                shown = {}
                for _ in range(120):
                    shown = await run(page)
                    feeds = " ".join(x["state"] for x in watched.console.snapshot()["feeds"])
                    if shown["peers"] == str(len(watched.peers)) and shown["feeds"] == feeds:
                        break
                    await trio.sleep(0.5)
                else:
                    raise AssertionError(f"page {shown} != node peers {len(watched.peers)}")
                assert feeds and "up" in feeds.split()
                assert shown["conn"].startswith("live")
                assert shown["pool"].get(exit1.node_id.peer_id()) == "alive"

                # an exit dies: the page shows it within 5 s of the node noting it
                e1 = exit1.node_id.peer_id()
                await f.stop(exit1)
                await wait_until(lambda: _dead_event(watched, e1) is not None, 90, interval=0.1)
                died = _dead_event(watched, e1)
                seen_at = None
                for _ in range(200):  # bounded: 200 polls; the assertion below is the limit
                    row = await run(
                        drv.find_elements,
                        By.CSS_SELECTOR,
                        f'#events li[data-kind="dead"][data-peer="{e1}"]',
                    )
                    if row and (await run(page))["pool"].get(e1) == "dead":
                        seen_at = time.time()
                        break
                    if time.time() - died.at > 30:
                        break
                    await trio.sleep(0.1)
                assert seen_at is not None, "the page never showed the exit's death"
                assert seen_at - died.at <= 5.0, f"shown {seen_at - died.at:.1f} s after the death"
                await run(drv.save_screenshot, str(tmp_path / "console.png"))
                assert (tmp_path / "console.png").stat().st_size > 10_000

                # no errors in the page's console (script errors, failed loads, CSP refusals)
                logs = await run(drv.get_log, "browser")
                errors = [e for e in logs if e.get("level") == "SEVERE"]
                assert not errors, errors
            finally:
                await run(drv.quit)


def _spawn_in_pty(args: list[str], rows: int = 50, cols: int = 160):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    os.set_blocking(master, False)
    return proc, master


def _read_pty(master: int, buf: bytearray) -> None:
    while True:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            return
        except OSError as e:  # EIO: the child closed the terminal
            if e.errno == errno.EIO:
                return
            raise
        if not chunk:
            return
        buf.extend(chunk)


def _screen(buf: bytearray) -> str:
    return ANSI.sub(b"", bytes(buf)).decode("utf-8", "replace")


@pytest.mark.slow
async def test_status_watch_in_a_pty(tmp_path):
    with trio.fail_after(240):
        async with fleet(tmp_path) as f:
            watched = await f.add("n0")
            others = [await f.add(f"n{i}") for i in (1, 2)]
            await wait_until(lambda: len(watched.peers) == 2, 60)
            home = str(watched.home.path)
            proc, master = _spawn_in_pty(
                [sys.executable, "-m", "overlay", "status", "--watch", "--home", home]
            )
            buf = bytearray()
            try:

                async def until(pattern: str, timeout: float) -> str:
                    deadline = trio.current_time() + timeout
                    while True:
                        _read_pty(master, buf)
                        screen = _screen(buf)
                        if re.search(pattern, screen):
                            return screen
                        assert proc.poll() is None, screen[-2000:]
                        if trio.current_time() > deadline:
                            compact = re.sub(r"\s*\n\s*", "\n", re.sub(r" +", " ", screen))
                            raise AssertionError(f"no {pattern!r} on the screen: {compact[-3000:]}")
                        await trio.sleep(0.2)

                # peers, and the events so far, with their times
                await until(r"peers 2\b", 60)
                await until(r"\d\d:\d\d:\d\d\s+peer-up\s+peer \w{8} connected", 30)
                # a new event shows up while watching
                gone = others[0].node_id.short()
                await f.stop(others[0])
                await until(rf"\d\d:\d\d:\d\d\s+dead\s+member {gone} is dead", 90)
                # q quits, and the terminal is given back
                os.write(master, b"q")
                with trio.fail_after(20):
                    while proc.poll() is None:
                        _read_pty(master, buf)
                        await trio.sleep(0.1)
                assert proc.returncode == 0, _screen(buf)[-2000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                os.close(master)


async def test_status_watch_plain_lines_without_a_terminal(tmp_path):
    with trio.fail_after(120):
        async with fleet(tmp_path) as f:
            watched = await f.add("n0")
            watched.events.add("feed", "feed /ip4/127.0.0.1/tcp/1: up -> down")
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "overlay",
                    "status",
                    "--watch",
                    "--home",
                    str(watched.home.path),
                ],
                stdout=subprocess.PIPE,
            )
            out = b""
            try:
                with trio.fail_after(60):
                    while b"up -> down" not in out:
                        chunk = await proc.stdout.receive_some(65536)
                        assert chunk, out
                        out += chunk
            finally:
                proc.kill()
                await proc.wait()
            text = out.decode()
            assert "\x1b[" not in text  # no escape codes in a file or a pipe
            assert re.search(r"^\d\d:\d\d:\d\d  peers 0  members 1  records 1", text, re.M)
            assert re.search(
                r"^\d\d:\d\d:\d\d  feed\s+feed /ip4/127.0.0.1/tcp/1: up -> down", text, re.M
            )


class _Refs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        for name, value in attrs:
            if name in ("src", "href", "action", "srcset", "poster", "data") and value:
                self.refs.append(value)


def _non_loopback_addresses() -> list[tuple[int, str]]:
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                out.append((socket.AF_INET, a.address))
            elif a.family == socket.AF_INET6 and a.address != "::1":
                out.append((socket.AF_INET6, a.address.split("%")[0]))
    return out


async def test_console_is_local_and_self_contained(tmp_path):
    with trio.fail_after(120):
        async with fleet(tmp_path) as f:
            node = await f.add("n0")
            url = node.control_url
            port = int(url.rsplit(":", 1)[1])
            assert url.startswith("http://127.0.0.1:")

            # not reachable on any other address of this machine
            for family, addr in _non_loopback_addresses():
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    target = (addr, port, 0, 0) if family == socket.AF_INET6 else (addr, port)
                    try:
                        await trio.to_thread.run_sync(s.connect, target)
                    except OSError:
                        continue
                    raise AssertionError(f"control endpoint answers on {addr}:{port}")

            auth = {"Authorization": f"Bearer {node.control_token}"}
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as c:
                # a page on another name (DNS rebinding) or a LAN name is refused
                for host in (f"192.168.1.10:{port}", f"hydra.example:{port}"):
                    r = await c.get("/console", headers={**auth, "Host": host})
                    assert r.status_code == 421
                # nothing without the token or a session; the cookie opens the console only
                for route in (
                    "/console",
                    "/console/state",
                    "/console/stream",
                    "/console/console.js",
                ):
                    assert (await c.get(route)).status_code == 401
                assert (await c.get("/console/ticket")).status_code == 401
                r = await c.post("/console/ticket", headers=auth)
                ticket_path = r.json()["path"]
                assert (await c.get(ticket_path.replace("ticket=", "ticket=x"))).status_code == 401
                r = await c.get(ticket_path)
                assert r.status_code == 303 and r.headers["location"] == "/console"
                set_cookie = r.headers["set-cookie"]
                assert f"hydra_console_{port}=" in set_cookie
                for attr in ("HttpOnly", "SameSite=Strict", "Path=/"):
                    assert attr in set_cookie
                assert (await c.get(ticket_path)).status_code == 401  # one use only
                cookie = {"Cookie": set_cookie.split(";")[0]}
                assert (await c.get("/status", headers=cookie)).status_code == 401
                r = await c.get("/console", headers=cookie)
                assert r.status_code == 200

                # the page: every reference is a path on this endpoint, and every one loads
                csp = r.headers["content-security-policy"]
                assert "default-src 'none'" in csp
                for d in ("script-src 'self'", "style-src 'self'", "connect-src 'self'"):
                    assert d in csp
                parser = _Refs()
                parser.feed(r.text)
                assert len(parser.refs) >= 3, parser.refs
                for ref in parser.refs:
                    assert ref.startswith("/") and not ref.startswith("//"), ref
                    got = await c.get(ref, headers=cookie)
                    assert got.status_code == 200, ref
                    body = got.text
                    if ref.endswith(".js"):
                        assert 'EventSource("/console/stream")' in body
                        # the only absolute URL is the SVG namespace, an identifier
                        urls = set(re.findall(r"[a-z]+://[^\s\"')]+", body))
                        assert urls <= {"http://www.w3.org/2000/svg"}, urls
                        assert "import(" not in body and "fetch(" not in body
                    if ref.endswith(".css"):
                        assert "url(" not in body and "@import" not in body
                    if ref.endswith(".svg"):
                        assert not re.search(
                            r"(href|src)=", body.replace('xmlns="http://www.w3.org/2000/svg"', "")
                        )

                # the event stream: a first message with the history, then updates
                async with c.stream("GET", "/console/stream", headers=cookie) as s:
                    assert s.headers["content-type"].startswith("text/event-stream")
                    datas = []
                    with trio.fail_after(20):
                        async for line in s.aiter_lines():
                            if line.startswith("data: "):
                                datas.append(line)
                            if len(datas) == 2:
                                break
                    first, second = (json.loads(d[6:]) for d in datas)
                    assert "history" in first and first["peer_id"] == node.node_id.peer_id()
                    assert "history" not in second and "samples" in second


@pytest.mark.slow
async def test_demo_counts_the_promotions_its_nodes_make(tmp_path):
    """The demo's summary counts every ``exit pool: promote`` its nodes logged."""
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the demo's directory goes here
    args = ["demo", "--nodes", "5", "--exits", "1", "--standby", "1", "--duration", "24"]
    with trio.fail_after(300):
        p = await trio.run_process(
            [sys.executable, "-m", "overlay", *args, "--json"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    summary = json.loads(p.stdout)
    (root,) = tmp_path.glob("hydra-demo-*")
    logged = sum(
        log.read_text().count("exit pool: promote") for log in (root / "logs").glob("*.log")
    )
    # the only exit is taken down: the standby must promote itself
    assert summary["takedowns"] and logged >= 1
    assert summary["promotions"] == logged == len(summary["promoted"]), summary
    assert summary["promoted"][0]["node"] == "node02"  # the standby
    assert summary["lost"] == 0 and summary["duplicates"] == 0 and summary["ok"], summary
    assert summary["not_delivered"] == []
