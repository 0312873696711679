"""Feed links across real network namespaces: cut a node's feeds, it stays on the overlay.

Nodes are ``overlay run`` processes inside lab hosts (see overlay/testing/netns/),
each listening on both of its addresses; every node runs the feed monitor
(overlay/services/feeds.py). The control endpoint binds 127.0.0.1 inside each node's
namespace, so the tests query it with a small client run in that namespace.

Network rule: traffic goes only to addresses of namespaces these tests create.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlay.control import token_path
from overlay.home import Home
from overlay.testing.netns import Host, Lab

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PORT = 4001
TRANSPORTS = {"tcp": f"tcp/{PORT}", "quic": f"udp/{PORT}/quic-v1", "ws": f"tcp/{PORT + 1}/ws"}

_GET = (
    "import sys, urllib.request\n"
    "token = open(sys.argv[3]).read().strip()\n"
    "req = urllib.request.Request(sys.argv[1] + sys.argv[2],"
    " headers={'Authorization': 'Bearer ' + token})\n"
    "print(urllib.request.urlopen(req, timeout=3).read().decode())"
)


@dataclass
class LabNode:
    name: str
    lab: Lab
    host: Host
    home: Home
    proc: subprocess.Popen
    log: Path
    url: str = ""
    peer_id: str = ""

    def get(self, route: str) -> dict:
        out = self.lab.run(
            self.host,
            [sys.executable, "-S", "-c", _GET, self.url, route, str(token_path(self.home.path))],
            timeout=10,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{self.name} {route}: {out.stderr.strip()[-300:]}")
        return json.loads(out.stdout)

    def addr(self, provider: str, transport: str = "tcp") -> str:
        return f"/ip4/{self.host.addrs[provider]}/{TRANSPORTS[transport]}"

    def addrs(self, *providers: str, transports=("tcp", "quic", "ws")) -> list[str]:
        return sorted(self.addr(p, t) for p in providers for t in transports)

    def join_addr(self, provider: str) -> str:
        return f"{self.addr(provider)}/p2p/{self.peer_id}"

    def record_of(self, other: LabNode) -> dict | None:
        for r in self.get("/records")["records"]:
            if r.get("peer_id") == other.peer_id:
                return r
        return None

    def feeds_of(self, other: LabNode) -> list[str]:
        rec = self.record_of(other)
        return list(rec["feeds"]) if rec else []

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_node(
    lab: Lab,
    host: Host,
    root: Path,
    name: str,
    roles: list[str],
    *,
    join: list[str] = (),
    providers: tuple[str, ...] = ("A", "B"),
    transports: tuple[str, ...] = ("tcp",),
) -> LabNode:
    listen = [f"/ip4/{host.addrs[p]}/{TRANSPORTS[t]}" for p in providers for t in transports]
    home = Home.init(
        root / name,
        roles=roles,
        listen=listen,
        extra={"control_listen": "127.0.0.1:0", "sync_interval": 1.0},
        force=True,
    )
    log = root / f"{name}.log"
    argv = [sys.executable, "-m", "overlay", "run", "--home", str(home.path)]
    for a in join:
        argv += ["--join", a]
    with open(log, "wb") as out:
        proc = lab.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    node = LabNode(name, lab, host, home, proc, log)
    deadline = time.monotonic() + 30
    no_monitor = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{node.tail()}")
        try:
            info = json.loads(home.control_path.read_text())
            node.url, node.peer_id = info["url"], info["peer_id"]
            st = node.get("/status")
            if not join or st.get("joined_via"):
                rows = st.get("feeds") or [{}]
                if "kind" in rows[0]:  # the feed monitor made its first scan
                    return node
                no_monitor = True
        except (OSError, ValueError, KeyError, RuntimeError):
            pass
        time.sleep(0.1)
    assert not no_monitor, "`overlay run` runs no feed monitor: Node must start FeedMonitor"
    raise RuntimeError(f"{name} did not start:\n{node.tail()}")


def wait_for(what: str, predicate: Callable[[], object], timeout: float, *nodes: LabNode):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (RuntimeError, subprocess.SubprocessError) as e:
            last = e
        if last:
            return last
        time.sleep(0.2)
    logs = "\n".join(f"--- {n.name}\n{n.tail()}" for n in nodes)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})\n{logs}")


# Dial a node through each given feed with a fresh libp2p host: "ok" or the error name.
_DIAL = """
import json, sys, trio
from overlay.crypto import SigningKey
from overlay.net.host import Libp2pHost

async def main(peer, feeds):
    host = Libp2pHost(SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"], enable_dht=False,
                      dial_timeout=3.0)
    host.enable_relay()
    out = {}
    async with host:
        for feed in feeds:
            try:
                with trio.fail_after(10):
                    await host.connect(feed + "/p2p/" + peer, reuse=False)
                out[feed] = "ok"
            except Exception as e:
                out[feed] = type(e).__name__
            await host.disconnect(peer)
    print(json.dumps(out))

trio.run(main, sys.argv[1], sys.argv[2:])
"""


def dial_from(lab: Lab, host: Host, node: LabNode, feeds: list[str]) -> dict[str, str]:
    """Try to connect to ``node`` over each of ``feeds`` from a fresh host inside ``host``."""
    out = lab.run(host, [sys.executable, "-c", _DIAL, node.peer_id, *feeds], cwd=REPO, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def direct(feeds: list[str]) -> list[str]:
    return sorted(f for f in feeds if "/p2p-circuit" not in f)


def relayed(feeds: list[str]) -> list[str]:
    return sorted(f for f in feeds if "/p2p-circuit" in f)


def block(lab: Lab, a: Host, b: Host) -> None:
    """No direct traffic between hosts ``a`` and ``b`` (unreachable routes on both)."""
    for src, dst in ((a, b), (b, a)):
        for ip in dst.addrs.values():
            out = lab.run(src, ["ip", "route", "add", "unreachable", f"{ip}/32"])
            assert out.returncode == 0, out.stderr


def own_feed_state(node: LabNode, feed: str) -> str | None:
    for row in node.get("/status")["feeds"]:
        if row["addr"] == feed:
            return row["state"]
    return None


def test_relay_link_cut_and_restored(make_lab, tmp_path):
    """(1) a relay loses one of its two links: gossip keeps flowing through it and it
    re-announces without the dead feed; (3) the link comes back, so does the feed."""
    lab = make_lab(hosts=3)
    h1, h2, h3 = lab.hosts
    block(lab, h2, h3)  # the leaf and the observer can only meet through the relay
    # the relay listens on TCP, QUIC and WebSocket on both of its addresses
    relay = start_node(lab, h1, tmp_path, "relay", ["relay"], transports=("tcp", "quic", "ws"))
    leaf = start_node(lab, h2, tmp_path, "leaf", ["entry"], join=[relay.join_addr("A")])
    obs = start_node(lab, h3, tmp_path, "observer", ["entry"], join=[relay.join_addr("A")])
    nodes = (relay, leaf, obs)
    both = relay.addrs("A", "B")
    wait_for("the relay's six feeds", lambda: direct(obs.feeds_of(relay)) == both, 20, *nodes)
    wait_for(
        "the leaf's record with both feeds at the observer",
        lambda: direct(obs.feeds_of(leaf)) == sorted([leaf.addr("A"), leaf.addr("B")]),
        20,
        *nodes,
    )
    seq0 = obs.record_of(relay)["seq"]

    lab.cut(h1, "A")
    t0 = time.monotonic()
    wait_for(
        "the relay's record without its cut feed",
        lambda: direct(obs.feeds_of(relay)) == relay.addrs("B"),
        60,  # generous (a busy machine): how fast is for benchmarks
        *nodes,
    )
    took = time.monotonic() - t0
    assert obs.record_of(relay)["seq"] > seq0
    for feed in relay.addrs("A"):
        assert own_feed_state(relay, feed) == "down"
    # the live TCP feed carries the traffic now, counted from the kernel's TCP counters
    row = wait_for(
        "traffic on the relay's B feed",
        lambda: next(
            (
                r
                for r in relay.get("/status")["feeds"]
                if r["addr"] == relay.addr("B") and r["conns"] > 0 and r["bytes_in"]
            ),
            None,
        ),
        10,
        *nodes,
    )
    assert row["state"] == "up" and row["traffic"] == "tcp_info" and row["last_ok"] < 10
    print(f"re-announced after {took:.1f} s")

    # a record update from the leaf (its own link A cut) reaches the observer,
    # whose only way to the leaf is through the relay
    seq_leaf = obs.record_of(leaf)["seq"]
    lab.cut(h2, "A")
    wait_for(
        "the leaf's update through the relay",
        lambda: direct(obs.feeds_of(leaf)) == [leaf.addr("B")],
        20,
        *nodes,
    )
    assert obs.record_of(leaf)["seq"] > seq_leaf
    peers = {p["peer_id"] for p in obs.get("/peers")["peers"]}
    assert relay.peer_id in peers

    # (3) restore: the feeds come back into the records
    lab.restore(h1, "A")
    lab.restore(h2, "A")
    wait_for("the relay's feed back", lambda: direct(obs.feeds_of(relay)) == both, 20, *nodes)
    wait_for(
        "the leaf's feed back",
        lambda: direct(obs.feeds_of(leaf)) == sorted([leaf.addr("A"), leaf.addr("B")]),
        20,
        *nodes,
    )
    for feed in relay.addrs("A"):
        assert own_feed_state(relay, feed) == "up"


def test_node_with_all_direct_feeds_cut_stays_reachable_through_relays(make_lab, tmp_path):
    """(2) both direct links of a node holding relay reservations are cut: its record
    keeps only relay feeds, and another node connects to it through one; (3) one link
    is restored and its feed comes back.

    Hosts have three links here; the node listens on (announces) only A and B, so
    link C is its outbound-only uplink, as behind a NAT."""
    lab = make_lab(hosts=4, providers=3)
    h1, h2, h3, h4 = lab.hosts
    r1 = start_node(lab, h1, tmp_path, "relay1", ["relay"])
    r2 = start_node(lab, h2, tmp_path, "relay2", ["relay"], join=[r1.join_addr("A")])
    home = start_node(lab, h3, tmp_path, "home", ["entry"], join=[r1.join_addr("B")])
    obs = start_node(lab, h4, tmp_path, "observer", ["entry"], join=[r2.join_addr("A")])
    nodes = (r1, r2, home, obs)
    wait_for(
        "two relay feeds in the home node's record",
        lambda: len(relayed(obs.feeds_of(home))) == 2,
        25,
        *nodes,
    )
    assert {f.split("/p2p/")[1].split("/")[0] for f in relayed(obs.feeds_of(home))} == {
        r1.peer_id,
        r2.peer_id,
    }
    seq0 = obs.record_of(home)["seq"]

    lab.cut(h3, "A")
    lab.cut(h3, "B")
    t0 = time.monotonic()
    rec = wait_for(
        "the home node's record with relay feeds only",
        lambda: (r := obs.record_of(home)) and not direct(r["feeds"]) and relayed(r["feeds"]) and r,
        60,  # generous (a busy machine): how fast is for benchmarks
        *nodes,
    )
    assert rec["seq"] > seq0
    took = time.monotonic() - t0

    # another node reaches it through each relay feed, while its direct feeds are dead
    feeds = relayed(rec["feeds"])
    wait_for(
        "connections through every relay feed",
        lambda: set(dial_from(lab, h4, home, feeds).values()) == {"ok"},
        30,
        *nodes,
    )
    dead = dial_from(lab, h4, home, [home.addr("A"), home.addr("B")])
    assert "ok" not in dead.values(), dead
    # and it is still on the overlay: connected to the observer (it dials out itself)
    wait_for(
        "the home node among the observer's peers",
        lambda: home.peer_id in {p["peer_id"] for p in obs.get("/peers")["peers"]},
        20,
        *nodes,
    )
    rows = {r["addr"]: r for r in home.get("/status")["feeds"]}
    assert rows[home.addr("A")]["state"] == "down" and rows[home.addr("B")]["state"] == "down"
    print(f"re-announced after {took:.1f} s")

    # (3) restore one link: its feed returns
    lab.restore(h3, "A")
    wait_for(
        "the restored feed in the record",
        lambda: home.addr("A") in obs.feeds_of(home),
        20,
        *nodes,
    )
