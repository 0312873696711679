"""Exactly once through exit restarts and slow mail servers, with real node processes
(``overlay run``), the ``overlay`` command line as a user runs it, and a real SMTP
server (aiosmtpd) on loopback.

One overlay (an entry, two exits, two relays) goes through, in order:

(d) an ``.eml`` file with Unix line endings arrives with its Subject kept and the
    sender's identity replaced;
(c) a message queued at an exit (mail server down) that is then SIGKILLed is
    finished by ``overlay outbox --flush --wait 60`` alone, through the other exit;
(a) the killed exit, restarted afterwards, delivers nothing from its saved queue;
(b) an exit SIGKILLed while the mail server holds its end-of-data reply: after the
    flush and its restart there are at most two copies, all with one Message-ID,
    and the restarted exit added none.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from overlay.devtools.cluster import Cluster

pytestmark = pytest.mark.slow

OVERLAY = [sys.executable, "-m", "overlay"]
TOKEN = re.compile(rb"hydra-test-(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """Records every message when its end of data arrives (as a mail server that
    delivers what it received even if the client goes away before the reply),
    then waits ``delay`` seconds before answering 250."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: list[tuple[bytes, float]] = []
        self.delay = 0.0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd API
        with self.lock:
            self.got.append((envelope.original_content, time.time()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return "250 OK"

    def copies(self, n: int) -> list[bytes]:
        with self.lock:
            return [c for c, _ in self.got if (m := TOKEN.search(c)) and int(m.group(1)) == n]


def wait_for(pred, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
        except Exception:  # noqa: BLE001 - a node busy or restarting
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {pred}")


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*OVERLAY, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def queue_state(node, message_id: str) -> tuple[int, str] | None:
    """(state, reason) of a message in a node's exit queue, read-only."""
    path = node.home.path / "exit-queue.db"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute(
            "SELECT state, reason FROM deliveries WHERE message_id = ?",
            (bytes.fromhex(message_id),),
        ).fetchone()
    finally:
        db.close()
    return None if row is None else (row[0], row[1])


def message_ids(copies: list[bytes]) -> set[bytes]:
    return {m.group(1) for c in copies if (m := re.search(rb"(?im)^message-id:\s*(\S+)", c))}


def test_exactly_once_through_exit_restarts_and_slow_mail_servers(tmp_path: Path):
    sink = Sink()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    roles = [["entry", "relay"], ["exit", "relay"], ["exit", "relay"], ["relay"], ["relay"]]
    settings = {"smtp_relay": f"127.0.0.1:{port}", "target_live_exits": 2}
    client = tmp_path / "client"
    try:
        with Cluster(tmp_path / "nodes", roles, settings=settings) as cluster:
            entry, exits = cluster.nodes[0], cluster.nodes[1:3]
            via = ["--via", entry.addrs[0]]

            def alive_exits() -> int:
                xs = entry.get("/exits")["exits"]
                return sum(1 for x in xs if x["state"] == "alive" and "exit" in x["roles"])

            wait_for(lambda: alive_exits() == 2, 90)

            def send(n: int, body: bytes, *extra) -> dict:
                f = tmp_path / f"m{n}.eml"
                f.write_bytes(body)
                p = cli("send", "--home", client, *via, "--to", "smtp:u@example.org",
                        "--file", f, "--json", "--timeout", "60", *extra)  # fmt: skip
                assert p.returncode == 0, p.stdout + p.stderr
                return json.loads(p.stdout)

            def flush() -> None:
                p = cli("outbox", "--home", client, *via, "--flush", "--wait", "60", "--json")
                assert p.returncode == 0, p.stdout + p.stderr
                assert json.loads(p.stdout)["messages"] == []  # nothing left unfinished

            def by_peer(peer_id: str):
                (node,) = [x for x in exits if x.peer_id == peer_id]
                return node

            # (d) an LF .eml keeps its Subject; the sender's identity does not travel
            eml = b"From: Me <me@my.home>\nSubject: Hello over LF\nX-Mailer: mine\n\nhydra-test-1\n"
            assert send(1, eml)["state"] == "delivered"
            (copy,) = sink.copies(1)
            assert b"\r\nSubject: Hello over LF\r\n" in copy and b"\r\n\r\nhydra-test-1\r\n" in copy
            assert b"my.home" not in copy and b"X-Mailer" not in copy
            assert copy.startswith(b"From: hydra-exit@localhost\r\n")

            # (c) queued at an exit that dies: the flush alone finishes it elsewhere
            ctl.stop()  # the mail server goes down
            queued = send(2, b"hydra-test-2\n", "--until", "queued")
            assert queued["state"] == "queued", queued
            victim = by_peer(queued["queued_at"])
            cluster.kill(victim, signal.SIGKILL)
            ctl = Controller(sink, hostname="127.0.0.1", port=port)
            ctl.start()  # the mail server is back
            flush()
            assert len(sink.copies(2)) == 1

            # (a) the killed exit comes back: it asks, hears "delivered", sends nothing
            cluster.start_node(victim, [entry.addrs[0]], timeout=60)
            state = wait_for(lambda: queue_state(victim, queued["message_id"]), 30)
            state = wait_for(
                lambda: (s := queue_state(victim, queued["message_id"]))[0] != 0 and s, 90
            )
            assert state == (1, "delivered_elsewhere"), state
            time.sleep(2)
            assert len(sink.copies(2)) == 1
            wait_for(lambda: alive_exits() == 2, 90)

            # (b) killed inside the end-of-data window (the server answers after 8 s)
            sink.delay = 8.0
            queued = send(3, b"hydra-test-3\n", "--until", "queued")
            assert queued["state"] == "queued", queued
            victim = by_peer(queued["queued_at"])
            wait_for(lambda: sink.copies(3), 60, 0.05)  # the end of data reached the server
            time.sleep(2.0)
            cluster.kill(victim, signal.SIGKILL)
            flush()
            cluster.start_node(victim, [entry.addrs[0]], timeout=60)
            state = wait_for(lambda: queue_state(victim, queued["message_id"]), 30)
            assert state[0] == 1, state  # finished at start, never attempted again
            assert state[1] == "interrupted_after_data", state
            time.sleep(sink.delay + 2)
            copies = sink.copies(3)
            assert 1 <= len(copies) <= 2, copies
            assert len(message_ids(copies)) == 1, copies
            print(f"(b) copies of the message killed in its end-of-data window: {len(copies)}")
    finally:
        ctl.stop()
