"""Test kit: node homes on loopback and running overlays (like ``trio.testing``).

Used by the test suite, benchmarks and the demo. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from ..client import Client
from ..home import Home
from ..runtime import Node
from ..services.feeds import FeedMonitor

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
# how long a test's light client may take to reach its entry (``Client(connect_timeout=)``):
# the 10 s a user gets is one attempt on a busy machine, and tests must hold on one
CONNECT_TIMEOUT = 60.0


def make_home(
    path: Path,
    roles: Sequence[str] = ("relay",),
    *,
    listen: Sequence[str] = LOOPBACK,
    policy: Sequence[str] | None = None,
    defaults: bool = False,
    **settings,
) -> Home:
    """A node home bound to loopback with a free port and a local control endpoint.

    Tests probe less often than a real node (many nodes share one CPU in a test
    process); ``defaults=True`` keeps the node's default configuration instead
    (benchmarks), apart from ``settings``."""
    timing = {} if defaults else {"sync_interval": 0.5, "probe_interval": 2.0, "probe_timeout": 1.0}
    extra = {"control_listen": "127.0.0.1:0", **timing, **settings}
    return Home.init(path, roles=list(roles), listen=list(listen), exit_policy=policy, extra=extra)


def light_services() -> list:
    """Services for many nodes sharing one test process: the feed monitor watches
    interfaces only (no relay reservations, AutoNAT probes or hole punching, which
    the netns and relay-v2 tests cover), so dozens of nodes fit on one core."""
    return [FeedMonitor(relays=0, probe_interval=0, dcutr=False, autonat=False, scan_interval=5.0)]


def default_services(*_: object) -> list:
    """No services given: a ``Node`` then runs every default one (the relay, the
    full feed monitor with relay reservations, AutoNAT and DCUtR, the console),
    as a volunteer's node does. The benchmarks use this (``services_for`` of
    ``overlay``, ``services`` of ``Fleet.start``/``add``)."""
    return []


def join_addr(node: Node) -> str:
    return node.host.listen_addrs()[0]


def light_client(home: Path, entry: Node, **kw) -> Client:
    """A light client (not yet started) whose entry is ``entry``; it gets
    ``CONNECT_TIMEOUT`` to reach it unless ``connect_timeout`` is given."""
    kw.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return Client(home, via=[join_addr(entry)], **kw)


@asynccontextmanager
async def silent_listener():
    """A TCP listener that accepts and never answers, so a dial to it ends only at
    the dial timeout: yields its address and the list of streams it accepted."""
    (silent,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def accept_and_stay_silent() -> None:
        while True:
            held.append(await silent.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_and_stay_silent)
        try:
            yield f"/ip4/127.0.0.1/tcp/{silent.socket.getsockname()[1]}", held
        finally:
            nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()
    await silent.aclose()


@asynccontextmanager
async def overlay(
    tmp: Path,
    n: int,
    roles: Sequence[Sequence[str]] | None = None,
    *,
    seed: int = 1,
    services_for: Callable[[int, Home], list] | None = None,
    **settings,
) -> AsyncIterator[list[Node]]:
    """Start ``n`` nodes; each joins through one random earlier node.

    ``services_for(i, home)``, if given, returns the services of node ``i``.
    """
    rng = random.Random(seed)
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(n):
            r = roles[i] if roles else ("relay",)
            home = make_home(tmp / f"n{i}", r, **settings)
            join = [join_addr(rng.choice(nodes))] if nodes else []
            services = services_for(i, home) if services_for is not None else light_services()
            node = await stack.enter_async_context(
                Node(home, join=join, rng=random.Random(seed * 1000 + i), services=services)
            )
            nodes.append(node)
        yield nodes


async def wait_until(predicate, timeout: float, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; raise ``trio.TooSlowError`` after ``timeout``."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


class Fleet:
    """Nodes that each run in their own task, so any one can be stopped at any time."""

    def __init__(self, nursery: trio.Nursery, root: Path, seed: int = 1) -> None:
        self.nursery = nursery
        self.root = root
        self.rng = random.Random(seed)
        self.nodes: list[Node] = []
        self._scopes: dict[int, tuple[trio.CancelScope, trio.Event]] = {}

    async def start(self, home: Home, join: Sequence[str] | None = None, **kw) -> Node:
        """Start a node; by default it joins through a random running node."""
        if join is None:
            running = [n for n in self.nodes if self.running(n)]
            join = [join_addr(self.rng.choice(running))] if running else []

        kw.setdefault("services", light_services())

        async def runner(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            done = trio.Event()
            try:
                with trio.CancelScope() as scope:
                    async with Node(
                        home, join=join, rng=random.Random(self.rng.random()), **kw
                    ) as node:
                        task_status.started((node, scope, done))
                        await trio.sleep_forever()
            finally:
                done.set()

        node, scope, done = await self.nursery.start(runner)
        self._scopes[id(node)] = (scope, done)
        self.nodes.append(node)
        return node

    async def add(
        self, name: str, roles: Sequence[str] = ("relay",), *, services=None, **settings
    ) -> Node:
        kw = {} if services is None else {"services": services}
        return await self.start(make_home(self.root / name, roles, **settings), **kw)

    def running(self, node: Node) -> bool:
        return not self._scopes[id(node)][1].is_set()

    async def stop(self, node: Node) -> None:
        """Stop a node abruptly (no tombstone): to the overlay it looks like a crash."""
        scope, done = self._scopes[id(node)]
        scope.cancel()
        await done.wait()


@asynccontextmanager
async def fleet(root: Path, seed: int = 1) -> AsyncIterator[Fleet]:
    async with trio.open_nursery() as nursery:
        f = Fleet(nursery, root, seed)
        try:
            yield f
        finally:
            nursery.cancel_scope.cancel()
