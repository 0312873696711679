"""Test kit: node homes on loopback and running overlays (like ``trio.testing``).

Used by the test suite, benchmarks and the demo. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from .home import Home
from .runtime import Node

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def make_home(
    path: Path,
    roles: Sequence[str] = ("relay",),
    *,
    listen: Sequence[str] = LOOPBACK,
    policy: Sequence[str] | None = None,
    **settings,
) -> Home:
    """A node home bound to loopback with a free port and a local control endpoint."""
    extra = {"control_listen": "127.0.0.1:0", "sync_interval": 0.5, **settings}
    return Home.init(path, roles=list(roles), listen=list(listen), exit_policy=policy, extra=extra)


def join_addr(node: Node) -> str:
    return node.host.listen_addrs()[0]


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
            services = services_for(i, home) if services_for is not None else ()
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
