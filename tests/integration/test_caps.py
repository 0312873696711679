"""The ``[limits]`` caps hold under load, on real nodes on loopback (issue 18, "Caps").

- relayed bandwidth: a peer writes packets faster than the cap; what the node
  takes stays within burst + rate x time, the rest is dropped and counted;
- connections: inbound and our own dials stop at ``max_connections`` (both
  directions together), refusals counted;
- exit deliveries per minute: beyond the cap deliveries wait in the queue (none
  is dropped), the wait is visible, and raising the cap delivers them all, once;
- the caps show in ``overlay status`` (text and JSON) and ``/metrics``, and
  SIGHUP applies a changed ``[limits]`` to a running ``overlay run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from overlay.client import State
from overlay.crypto import SigningKey
from overlay.net.framing import encode_frame
from overlay.net.host import DialError, Libp2pHost, NetError
from overlay.onion.params import SMALL
from overlay.runtime import Node
from overlay.services.relay import RELAY_PROTOCOL
from overlay.testing import (
    join_addr,
    light_client,
    light_services,
    make_home,
    overlay,
    wait_until,
)
from tests.integration.test_relay import free_port, metric, relays_for, smtp_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def small_packet() -> bytes:
    """A frame of the small packet class (format byte, size): it passes the size check
    and the per-peer bucket, so it reaches the bandwidth cap; its MAC fails later."""
    return bytes([SMALL.format]) + os.urandom(SMALL.packet_size - 1)


async def test_bandwidth_cap_drops_beyond_burst_plus_rate(tmp_path):
    rate, burst = 20 * 2048, 40 * 2048  # 20 small packets a second, 40 at once
    home = make_home(tmp_path / "r", ["relay"], bandwidth_rate=rate, bandwidth_burst=burst)
    sent = 600
    with trio.fail_after(120):
        async with Node(home, services=light_services()) as r:
            async with Libp2pHost(SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as peer:
                await peer.connect(join_addr(r))
                s = await peer.open_stream(r.node_id.peer_id(), RELAY_PROTOCOL)
                t0 = trio.current_time()
                for _ in range(sent // 50):  # 200 packets a second for 3 s: 10x the cap
                    await s.write(b"".join(encode_frame(small_packet()) for _ in range(50)))
                    await trio.sleep(0.25)
                await wait_until(
                    lambda: metric(r, "hydra_relay_packets_in_total", source="relay") >= sent, 60
                )
                elapsed = trio.current_time() - t0
                taken = metric(r, "hydra_limit_relayed_bytes_total")
                dropped = metric(r, "hydra_limit_refused_total", limit="bandwidth_rate")
                assert taken <= burst + rate * elapsed + 2048, (taken, elapsed)
                assert taken >= burst  # the burst passes at once
                assert taken / 2048 + dropped == sent
                assert dropped >= sent - (burst + rate * elapsed) / 2048 - 1
                # the peer is not blamed for our cap
                assert (
                    metric(r, "hydra_relay_rejected_total", source="relay", reason="rate_limited")
                    == 0
                )
                st = r.status()["limits"]["bandwidth"]
                assert st["rate"] == rate and st["burst"] == burst
                assert st["dropped_packets"] == dropped and st["relayed_bytes"] == taken
                assert 0 < st["bytes_per_s"] <= (burst + rate * elapsed) / 10 + 2048
                body = r.metrics.render().decode()
                assert f'hydra_limit{{limit="bandwidth_rate"}} {float(rate)}' in body
                assert 'hydra_limit_use{limit="bandwidth_burst"}' in body

                # a reload lifts the cap: nothing more is dropped
                r.caps.apply(dataclasses.replace(r.config, bandwidth_rate=0))
                await s.write(b"".join(encode_frame(small_packet()) for _ in range(100)))
                await wait_until(
                    lambda: metric(r, "hydra_relay_packets_in_total", source="relay") >= sent + 100,
                    30,
                )
                assert metric(r, "hydra_limit_refused_total", limit="bandwidth_rate") == dropped
                assert r.status()["limits"]["bandwidth"]["rate"] == 0
                await s.close()


async def _dial(stack: contextlib.AsyncExitStack, node: Node) -> bool:
    """A fresh identity dials ``node``: True if it holds a connection after a moment
    (a refused one is closed right after accept). The stack closes the host."""
    h = await stack.enter_async_context(
        Libp2pHost(SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"], dial_timeout=5.0)
    )
    try:
        await h.connect(join_addr(node))
    except NetError:
        return False
    await trio.sleep(0.3)
    return bool(h.connected_peers())


async def test_total_connection_cap_bounds_inbound_and_our_dials(tmp_path):
    cap = dict(max_connections=4, max_inbound=4, max_inbound_per_ip=4, max_handshakes_per_ip=4)
    with trio.fail_after(180):
        async with overlay(tmp_path, 2, [["relay"], ["relay"]]) as (b, c):
            a_home = make_home(tmp_path / "a", ["relay"], target_peers=1, **cap)
            async with (
                Node(a_home, join=[join_addr(b)], services=light_services()) as a,
                contextlib.AsyncExitStack() as stack,
            ):
                await wait_until(lambda: a.host.connection_counts()["outbound"] >= 1, 20)
                out0 = a.host.connection_counts()["outbound"]
                admitted, peak = 0, 0
                for _ in range(8):  # twice what the cap leaves
                    admitted += await _dial(stack, a)
                    peak = max(peak, a.host.connection_counts()["total"])
                counts = a.host.connection_counts()
                assert peak <= 4 and counts["total"] == 4, (peak, counts)  # full, not beyond
                assert 1 <= admitted <= 4 - out0
                print(f"connections: {counts}, admitted {admitted} of 8, outbound before {out0}")
                refused = metric(a, "hydra_limit_refused_total", limit="max_connections")
                refused_in = metric(a, "hydra_limit_refused_total", limit="max_inbound")
                assert refused + refused_in >= 8 - admitted - 1, (refused, refused_in)
                # at the cap our own dials are refused before they start
                with pytest.raises(DialError, match="max_connections"):
                    await a.host.connect(join_addr(c), reuse=False)
                st = a.status()["limits"]["connections"]
                assert st["max_connections"] == 4 and st["total"] <= 4
                assert st["refused"]["max_connections"] >= refused
                # a reload (as SIGHUP does) with a higher cap admits newcomers again
                a.caps.apply(
                    dataclasses.replace(
                        a.config,
                        max_connections=32,
                        max_inbound=16,
                        max_inbound_per_ip=16,
                        max_handshakes_per_ip=16,
                    )
                )
                assert await _dial(stack, a), "a raised cap still refused a newcomer"
                assert a.status()["limits"]["connections"]["max_connections"] == 32


async def test_exit_delivery_cap_holds_deliveries_queued_then_delivers_each_once(tmp_path):
    port = free_port()
    sink, ctl = smtp_server(port)
    four = [["relay"]] * 3 + [["exit"]]
    cap, n = 3, 7
    try:
        with trio.fail_after(240):
            async with overlay(
                tmp_path,
                4,
                four,
                policy=["smtp:*"],
                services_for=relays_for(port),
                exit_deliveries_per_minute=cap,
            ) as nodes:
                ex = nodes[3]
                await wait_until(lambda: all(len(x.view) >= 4 for x in nodes), 30)
                bodies = [f"capped {i}\r\n".encode() for i in range(n)]
                async with light_client(tmp_path / "c", nodes[0], timeout=3.0) as c:
                    await wait_until(lambda: len(c.view) >= 4, 20)
                    mids = [await c.send("smtp:a@example.org", b) for b in bodies]
                    # the first `cap` are delivered; the rest wait at the cap, queued
                    # (each reaches the exit when its path's mix delays are over)
                    await wait_until(lambda: len(sink.envelopes) >= cap, 60)
                    await wait_until(lambda: ex.relay.exit_queue.counts()["pending"] == n - cap, 60)
                    await wait_until(lambda: ex.caps.waiting >= 1, 30)
                    await trio.sleep(3.0)  # held: no more deliveries meanwhile
                    assert len(sink.envelopes) == cap
                    lim = ex.status()["limits"]["exit_deliveries"]
                    assert lim["per_minute"] == cap and lim["last_minute"] == cap
                    assert lim["over_cap"] and lim["waiting"] >= 1 and lim["delayed"] >= 1
                    pending = ex.relay.exit_queue.counts()["pending"]
                    assert pending == n - cap, pending
                    assert metric(ex, "hydra_limit_delayed_total") >= 1
                    assert metric(ex, "hydra_limit_waiting") >= 1
                    # SIGHUP-style reload raises the cap: every held message goes out, once
                    ex.caps.apply(dataclasses.replace(ex.config, exit_deliveries_per_minute=100))
                    for mid in mids:
                        assert (await c.wait_acked(mid, 60)).state is State.DELIVERED
                assert all(sink.count(b) == 1 for b in bodies), [sink.count(b) for b in bodies]
                assert ex.status()["limits"]["exit_deliveries"]["waiting"] == 0
    finally:
        ctl.stop()


# ---- the CLI: status text and JSON, /metrics, SIGHUP --------------------------------------


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "overlay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=True,
    )


def _set_limits(cfg: Path, **values) -> None:
    text = cfg.read_text()
    for key, value in values.items():
        lines = [ln for ln in text.splitlines() if ln.lstrip("# ").startswith(f"{key} =")]
        assert len(lines) == 1, (key, lines)
        text = text.replace(lines[0], f"{key} = {value}")
    cfg.write_text(text)


def test_limits_in_status_metrics_and_reloaded_by_sighup(tmp_path):
    home = tmp_path / "n"
    _cli("init", "--home", str(home), "--role", "relay", "--listen", "/ip4/127.0.0.1/tcp/0")
    template = (home / "config.toml").read_text()
    for key in (
        "max_connections",
        "bandwidth_rate",
        "bandwidth_burst",
        "exit_deliveries_per_minute",
    ):
        assert f"# {key} = " in template  # documented in the template, default commented
    _set_limits(home / "config.toml", bandwidth_rate=100000, max_connections=600)
    err = open(tmp_path / "node.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "overlay", "run", "--home", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=err,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 90
        st = None
        while time.monotonic() < deadline and st is None:
            assert proc.poll() is None, (tmp_path / "node.err").read_text()
            with contextlib.suppress(subprocess.CalledProcessError, OSError, ValueError):
                info = json.loads((home / "control.json").read_text())
                if info.get("pid") == proc.pid:
                    st = json.loads(_cli("status", "--home", str(home), "--json").stdout)
            time.sleep(0.3)
        assert st is not None, (tmp_path / "node.err").read_text()
        lim = st["limits"]
        assert lim["bandwidth"]["rate"] == 100000 and lim["bandwidth"]["burst"] == 200000
        assert lim["connections"]["max_connections"] == 600
        assert lim["exit_deliveries"]["per_minute"] == 600
        text = _cli("status", "--home", str(home)).stdout
        assert "limits" in text and "bandwidth_rate" in text and "100000" in text
        assert "exit_deliveries_per_minute" in text
        body = httpx.get(info["url"].rstrip("/") + "/metrics", timeout=10).text
        assert 'hydra_limit{limit="max_connections"} 600.0' in body
        assert 'hydra_limit_use{limit="max_connections"}' in body

        _set_limits(home / "config.toml", bandwidth_rate=0, exit_deliveries_per_minute=5)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lim = json.loads(_cli("status", "--home", str(home), "--json").stdout)["limits"]
            if lim["exit_deliveries"]["per_minute"] == 5:
                break
            time.sleep(0.5)
        assert lim["exit_deliveries"]["per_minute"] == 5
        assert lim["bandwidth"]["rate"] == 0 and lim["bandwidth"]["available"] is None
        logged = (tmp_path / "node.err").read_text()
        assert "[limits] exit_deliveries_per_minute = 5" in logged
        assert "restart" not in logged.split("SIGHUP: reloaded", 1)[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        err.close()
