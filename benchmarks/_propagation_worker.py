"""Worker process of ``bench_propagation.py --procs P`` (not meant to be run by hand).

Runs a share of the benchmark's nodes (Hydra nodes, or bare ``Libp2pHost``s for
the baseline) in one trio loop and answers the parent over stdin/stdout, one
JSON object per line, one reply per command, in order. Commands:

    reset        {}                                   -> {}   (stop all nodes)
    hydra_start  {i, home, join, seed, target_peers, settings} -> {addr, peer}
    base_start   {i}                                  -> {addr, peer}
    base_connect {i, addrs}                           -> {}
    counts       {}                                   -> {counts: [[i, len(view)], ...]}
    graph        {}                                   -> {graph: {peer: [peer, ...]}}
    traffic      {}                                   -> {traffic: {counter: total}}
    next_seq     {i}                                  -> {seq}
    watch        {src, peer, seq | payload}           -> {}   (arm arrival watchers)
    publish      {i, roles | payload}                 -> {t0, seq}
    wait         {until}                              -> {arrivals: [[i, t], ...]}
    stop         {}                                   -> {}   (then exit)

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every
process on Linux), so the parent compares arrivals with the publisher's t0.
The worker exits on ``stop``, on stdin EOF (parent gone) and after ``--limit``
seconds; a watchdog thread ends the process if shutdown itself hangs.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path

import trio
from bench_propagation import TOPIC, JsonLines, _counter, _traffic

from overlay.crypto import SigningKey
from overlay.net.errors import DialTimeout
from overlay.net.host import Libp2pHost
from overlay.records import Role
from overlay.runtime import Node
from overlay.testing import default_services, join_addr, make_home

SHUTDOWN_GRACE = 30.0  # seconds a stopping worker may take before it is ended hard
COMMANDS = frozenset(
    ["reset", "hydra_start", "base_start", "base_connect", "counts", "graph", "traffic"]
    + ["next_seq", "watch", "publish", "wait"]
)


def _exit_hard(code: int) -> None:
    print(f"propagation worker {os.getpid()}: shutdown timed out, exiting", file=sys.stderr)
    os._exit(code)


def _watchdog(seconds: float) -> None:
    t = threading.Timer(seconds, _exit_hard, args=(3,))
    t.daemon = True
    t.start()


class Worker:
    """The nodes of one phase (Hydra, then baseline) and the commands on them."""

    def __init__(self, outer: trio.Nursery) -> None:
        self.outer = outer
        self.nursery: trio.Nursery | None = None  # the current phase's nodes run here
        self.phase_done = trio.Event()
        self.nodes: dict[int, Node] = {}
        self.hosts: dict[int, Libp2pHost] = {}
        self.subs: dict[int, object] = {}
        self.arrivals: dict[int, float] = {}
        self.expect: set[int] = set()
        self.complete = trio.Event()
        self.watch_scope: trio.CancelScope | None = None

    async def _phase(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        done = self.phase_done = trio.Event()
        try:
            async with trio.open_nursery() as n:
                task_status.started(n)
                await trio.sleep_forever()
        finally:
            done.set()

    async def reset(self):
        """Stop every node of the current phase (all at once) and start an empty one."""
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
            with trio.fail_after(SHUTDOWN_GRACE):
                await self.phase_done.wait()
        self.nodes, self.hosts, self.subs = {}, {}, {}
        self.watch_scope = None
        self.nursery = await self.outer.start(self._phase)
        return {}

    # ------------------------------------------------------------ start-up
    async def hydra_start(
        self, i: int, home: str, join: list[str], seed: int, target_peers: int, settings: dict
    ):
        h = make_home(Path(home), ("relay",), target_peers=target_peers, **settings)
        node = Node(h, join=join, rng=random.Random(seed * 1000 + i), services=default_services())

        async def run(*, task_status=trio.TASK_STATUS_IGNORED):
            async with node:
                task_status.started()
                await trio.sleep_forever()

        await self.nursery.start(run)
        self.nodes[i] = node
        return {"addr": join_addr(node), "peer": node.node_id.peer_id()}

    async def base_start(self, i: int):
        h = Libp2pHost(
            SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"], gossip_topics=[TOPIC], enable_dht=False
        )
        await self.nursery.start(h.run)
        self.hosts[i] = h
        self.subs[i] = await h.subscribe(TOPIC)
        return {"addr": h.listen_addrs()[0], "peer": h.peer_id}

    async def base_connect(self, i: int, addrs: list[str]):
        """Dial each address; a dial that timed out (a machine busy with the Hydra
        nodes alongside) is tried twice more, as a node's join does."""
        for a in addrs:
            for attempt in range(3):
                try:
                    await self.hosts[i].connect(a)
                    break
                except DialTimeout:
                    if attempt == 2:
                        raise
                    await trio.sleep(1.0)
        return {}

    # ------------------------------------------------------------ state
    async def counts(self):
        return {
            "counts": [[i, len(x.view)] for i, x in self.nodes.items()],
            "peers": [len(x.connected()) for x in self.nodes.values()],
            "sync": {
                r: sum(
                    _counter(x.metrics.sync_rounds, side="initiator", result=r)
                    for x in self.nodes.values()
                )
                for r in ("ok", "failed")
            },
            "liveness": {
                state: sum(
                    _counter(x.resilience.m_states, state=state) for x in self.nodes.values()
                )
                for state in ("suspect", "dead")
            },
        }

    async def graph(self):
        return {
            "graph": {
                x.node_id.peer_id(): [p.peer_id() for p in x.connected()]
                for x in self.nodes.values()
            }
        }

    async def traffic(self):
        return {"traffic": _traffic(self.nodes.values())}

    async def next_seq(self, i: int):
        return {"seq": self.nodes[i].home.last_seq() + 1}

    # ------------------------------------------------------------ trials
    def _arrived(self, i: int) -> None:
        self.arrivals.setdefault(i, time.monotonic())
        if len(self.arrivals) >= len(self.expect):
            self.complete.set()

    async def watch(self, src: int, peer: str = "", seq: int = 0, payload: str = ""):
        """Arm one watcher per local node but ``src``, before the parent publishes."""
        self.arrivals, self.complete = {}, trio.Event()
        base_phase = bool(payload)  # Hydra nodes may still run beside the baseline hosts
        if base_phase:
            chans = {i: s for i, s in self.subs.items() if i != src}
        else:
            chans = {i: x.record_events() for i, x in self.nodes.items() if i != src}
        self.expect = set(chans)
        if not self.expect:
            self.complete.set()
        data = bytes.fromhex(payload)

        async def hydra(i, ch):
            async for rec in ch:
                if rec.node_id.peer_id() == peer and rec.seq == seq:
                    return self._arrived(i)

        async def base(i, sub):
            while True:
                msg = await sub.receive()
                if msg.data == data:
                    return self._arrived(i)

        async def watchers(*, task_status=trio.TASK_STATUS_IGNORED):
            async with trio.open_nursery() as n:
                for i, ch in chans.items():
                    n.start_soon(base if base_phase else hydra, i, ch)
                task_status.started(n.cancel_scope)

        self.watch_scope = await self.nursery.start(watchers)
        return {}

    async def publish(self, i: int, roles: int = 0, payload: str = ""):
        if not payload:
            t0 = time.monotonic()
            rec = await self.nodes[i].publish_own("bench", roles=Role(roles))
            return {"t0": t0, "seq": rec.seq}
        t0 = time.monotonic()
        await self.hosts[i].publish(TOPIC, bytes.fromhex(payload))
        return {"t0": t0, "seq": 0}

    async def wait(self, until: float):
        """Wait until every armed watcher saw it or ``until`` (monotonic) passed."""
        with trio.move_on_after(max(0.0, until - time.monotonic())):
            await self.complete.wait()
        if self.watch_scope is not None:
            self.watch_scope.cancel()
        for x in self.nodes.values():
            x._record_events.clear()
        return {"arrivals": sorted(self.arrivals.items())}


async def read_commands(io: JsonLines, send: trio.MemorySendChannel, stop: trio.CancelScope):
    """Pass commands on; at EOF (the parent is gone) stop everything, even mid-command."""
    async with send:
        while (msg := await io.receive()) is not None:
            await send.send(msg)
    _watchdog(SHUTDOWN_GRACE)
    stop.cancel()


async def serve(limit: float) -> None:
    io = JsonLines(trio.lowlevel.FdStream(os.dup(1)), trio.lowlevel.FdStream(os.dup(0)))
    os.dup2(2, 1)  # stray prints must not corrupt the protocol on stdout
    with trio.move_on_after(limit) as timer:
        async with trio.open_nursery() as nursery:
            w = Worker(nursery)
            await w.reset()
            send, recv = trio.open_memory_channel(0)
            nursery.start_soon(read_commands, io, send, nursery.cancel_scope)
            async for msg in recv:
                cmd = str(msg.pop("cmd", ""))
                if cmd == "stop":
                    await io.send({})
                    break
                try:
                    if cmd not in COMMANDS:
                        raise ValueError(f"unknown command {cmd!r}")
                    reply = await getattr(w, cmd)(**msg)
                except Exception as e:  # noqa: BLE001 - reported to the parent
                    reply = {"error": f"{cmd}: {e!r}"}
                await io.send(reply)
            _watchdog(SHUTDOWN_GRACE)
            nursery.cancel_scope.cancel()
    if timer.cancelled_caught:
        print(f"propagation worker {os.getpid()}: time limit {limit:g} s", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--limit", type=float, default=1800.0, help="hard time limit, seconds")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    _watchdog(args.limit + SHUTDOWN_GRACE)
    try:
        trio.run(serve, args.limit)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
