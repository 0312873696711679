"""Tests of the network-namespace lab itself (overlay/testing/netns/).

Network rule: traffic goes only to addresses of namespaces these tests create.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from overlay.testing.netns import (
    Lab,
    LabError,
    cleanup_stale,
    list_namespaces,
    netns_available,
)
from overlay.testing.netns import ip as netns_ip

REPO = Path(__file__).resolve().parents[2]


def _all_addrs(lab: Lab) -> list[str]:
    return [a for h in lab.hosts for a in h.addrs.values()]


def test_topology_and_addressing(lab):
    h1, h2, h3 = lab.hosts
    assert lab.provider_names == ["A", "B"]
    assert h2.addrs == {"A": "10.11.2.2", "B": "10.12.2.2"}
    assert h2.links == {"A": "ethA", "B": "ethB"}
    assert len(set(_all_addrs(lab))) == 6
    for ns in lab.namespaces:
        assert ns.startswith(lab.prefix)
        lo = lab.run(ns, ["ip", "-o", "link", "show", "lo"]).stdout
        assert "UP" in lo.split("<", 1)[1].split(">", 1)[0].split(",")
        # nothing routes out of the lab: no default route anywhere
        assert lab.run(ns, ["ip", "-4", "route", "show", "default"]).stdout.strip() == ""
    out = lab.run(h2, ["ip", "-4", "-o", "addr", "show", "dev", "ethB"]).stdout
    assert "10.12.2.2/24" in out
    assert lab.reachable(h1, "127.0.0.1")


def test_reachable_over_both_links(lab):
    for src in lab.hosts:
        for dst in lab.hosts:
            for addr in dst.addrs.values():
                assert lab.reachable(src, addr), f"{src.name} -> {dst.name} {addr}"


def test_cut_and_restore_host_side(lab):
    h1, h2, h3 = lab.hosts
    lab.cut(h2, "A")
    assert not lab.link_up(h2, "A")
    for src in (h1, h3):
        assert not lab.reachable(src, h2.addrs["A"])
        assert lab.reachable(src, h2.addrs["B"])
    # h2 still reaches everyone, through B (its own A link is down)
    assert lab.reachable(h2, h1.addrs["A"])
    assert lab.reachable(h2, h3.addrs["B"])
    # other hosts are unaffected
    assert lab.reachable(h1, h3.addrs["A"])
    lab.restore(h2, "A")
    assert lab.link_up(h2, "A")
    assert lab.reachable(h1, h2.addrs["A"])
    assert lab.reachable(h3, h2.addrs["A"])
    assert lab.reachable(h1, h2.addrs["B"])


def test_cut_provider_side(lab):
    h1, h2, _ = lab.hosts
    lab.cut(h2, "B", side="provider")
    assert not lab.reachable(h1, h2.addrs["B"])
    assert lab.reachable(h1, h2.addrs["A"])
    # host side still "up" but without carrier: h2 falls back to A for everything
    assert lab.reachable(h2, h1.addrs["B"])
    lab.restore(h2, "B")
    assert lab.reachable(h1, h2.addrs["B"])


def test_cut_both_links_isolates_host(lab):
    h1, h2, _ = lab.hosts
    lab.cut(h2, "A")
    lab.cut(h2, "B")
    for addr in h2.addrs.values():
        assert not lab.reachable(h1, addr)
    lab.restore(h2, "B")
    assert lab.reachable(h1, h2.addrs["B"])
    assert not lab.reachable(h1, h2.addrs["A"])


def test_popen_server_reachable_on_namespace_address(lab, tmp_path):
    h1, h2, _ = lab.hosts
    (tmp_path / "hello.txt").write_text("hello from h2\n")
    server = lab.popen(
        h2,
        [sys.executable, "-m", "http.server", "8080", "--bind", h2.addrs["A"]],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert lab.wait_reachable(h1, h2.addrs["A"], port=8080, timeout=10)
    # plain TCP on the other feed: nothing listens there
    assert not lab.reachable(h1, h2.addrs["B"], port=8080)
    fetch = textwrap.dedent(
        """
        import sys, urllib.request
        print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end="")
        """
    )
    url = f"http://{h2.addrs['A']}:8080/hello.txt"
    res = lab.run(h1, [sys.executable, "-c", fetch, url])
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from h2\n"
    # the server is only reachable inside the lab, and dies with the lab
    lab.cut(h2, "A")
    assert not lab.reachable(h1, h2.addrs["A"], port=8080)
    lab.close()
    assert server.poll() is not None


def test_teardown_removes_everything(netns):
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with Lab(hosts=2) as lab:
        created = lab.namespaces
        assert set(created) <= set(list_namespaces(lab.prefix))
        inner = lab.popen(lab.hosts[0], ["sleep", "300"])
        # a process started behind the harness's back is killed too
        stray = subprocess.Popen(lab.exec_argv(lab.hosts[1], ["sleep", "300"]))
    assert list_namespaces(lab.prefix) == []
    assert lab.leftovers == []
    assert inner.poll() is not None
    assert stray.wait(timeout=5) is not None
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert len(links_after.splitlines()) == len(links_before.splitlines())


def test_cleanup_after_exception(netns):
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(hosts=2) as lab:
            lab.popen(lab.hosts[0], ["sleep", "300"])
            lab.cut(lab.hosts[1], "A")
            raise RuntimeError("boom")
    assert list_namespaces(lab.prefix) == []


def test_cleanup_after_failed_setup(netns, monkeypatch):
    def broken(self, h, only=None):
        return ["route add 10.0.0.0/8 via 192.0.2.1 dev nosuchdev"]

    monkeypatch.setattr(Lab, "_host_routes", broken)
    lab = Lab(hosts=2)
    with pytest.raises(LabError):
        lab.__enter__()
    assert list_namespaces(lab.prefix) == []


def test_cleanup_stale_only_removes_dead_owners(netns):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"hy{dead.pid}x0-h1"
    foreign = f"hy-not-ours-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Lab(hosts=1) as live:
            assert stale not in cleanup_stale()  # too young: owner may be elsewhere
            removed = cleanup_stale(min_age=0)
            # gone (removed by us, or by a concurrent test run doing the same)
            assert stale not in list_namespaces()
            assert set(live.namespaces) <= set(list_namespaces(live.prefix))
            assert not set(removed) & set(live.namespaces)
            subprocess.run(["ip", "netns", "add", foreign], check=True)
            assert foreign not in cleanup_stale(min_age=0)  # not an owner-tagged name
            assert cleanup_stale(foreign, force=True) == [foreign]
    finally:
        for ns in (stale, foreign):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_parallel_labs_do_not_collide(make_lab):
    a = make_lab(hosts=2)
    b = make_lab(hosts=2)
    assert a.prefix != b.prefix
    assert a.reachable(a.hosts[0], a.hosts[1].addrs["B"])
    assert b.reachable(b.hosts[1], b.hosts[0].addrs["A"])


def test_netns_available_reasons(monkeypatch):
    # the probes below store their (false) verdicts: put the real one back after
    monkeypatch.setattr(netns_ip, "_avail_cache", netns_ip._avail_cache)
    monkeypatch.setenv("HYDRA_NETNS_DISABLE", "1")
    assert netns_available() == (False, "disabled by HYDRA_NETNS_DISABLE")
    monkeypatch.delenv("HYDRA_NETNS_DISABLE")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ok, reason = netns_available(use_cache=False)
    assert not ok and "not root" in reason
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns_ip, "_ip_bin", lambda: None)
    ok, reason = netns_available(use_cache=False)
    assert not ok and "iproute2" in reason


def test_fixtures_skip_with_reason_when_unavailable():
    env = dict(os.environ, HYDRA_NETNS_DISABLE="1")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/netns/test_harness.py::test_reachable_over_both_links",
            "tests/netns/test_harness.py::test_teardown_removes_everything",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 skipped" in res.stdout
    assert "ip netns unavailable: disabled by HYDRA_NETNS_DISABLE" in res.stdout
