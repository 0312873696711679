"""The kernel's address and link announcements wake a waiting node (rtnetlink).

A small program inside a lab host waits on ``AddressEvents``; the test cuts
and restores that host's link and watches what the program reports. Once the
new lab has settled, nothing changes, so a wait there must time out.

Network rule: no traffic at all; only the lab's own namespaces change.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

_WATCH = """
import sys, trio
from overlay.net.netwatch import AddressEvents

async def main():
    ev = AddressEvents.open()
    print("open", ev is not None, flush=True)
    # a new lab's links still announce for a moment (IPv6 addresses, carrier)
    for _ in range(20):
        quiet = await ev.wait(1.0)
        if not quiet:
            break
    print("quiet", quiet, flush=True)
    for _ in range(2):
        print("woke", await ev.wait(30.0), flush=True)
        await trio.sleep(0.5)  # let the rest of the burst arrive; the next wait drains it
        await ev.wait(0.2)
    ev.close()

trio.run(main)
"""


def _line(proc: subprocess.Popen, prefix: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.split()[1]
    raise AssertionError(f"no {prefix!r} line from the watcher (exit {proc.poll()})")


def test_address_and_link_changes_wake_the_watcher(make_lab):
    lab = make_lab(hosts=1)
    (host,) = lab.hosts
    proc = lab.popen(
        host,
        [sys.executable, "-c", _WATCH],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    assert _line(proc, "open") == "True"
    assert _line(proc, "quiet") == "False"  # nothing changed: the wait times out
    lab.cut(host, "A")
    assert _line(proc, "woke") == "True"
    lab.restore(host, "A")
    assert _line(proc, "woke") == "True"
    assert proc.wait(timeout=30) == 0
