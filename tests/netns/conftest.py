"""Fixtures for tests that need real network namespaces (see overlay/testing/netns/).

``make_lab(hosts=3, providers=2)`` builds a :class:`~overlay.testing.netns.Lab` that is
torn down after the test (even if it fails); ``lab`` is a ready 3-host lab.  Tests in
this directory are marked ``netns``; fixtures skip with a clear reason where
``ip netns`` cannot be used (not root, no iproute2, no CAP_SYS_ADMIN, or
``HYDRA_NETNS_DISABLE=1``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.testing.netns import Lab, cleanup_stale, netns_available

_HERE = Path(__file__).parent
_stale_cleaned = False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture
def netns():
    """Skip unless network namespaces can be used; remove leftovers of dead runs once."""
    global _stale_cleaned
    ok, reason = netns_available()
    if not ok:
        pytest.skip(f"ip netns unavailable: {reason}")
    if not _stale_cleaned:
        _stale_cleaned = True
        cleanup_stale()
    return True


@pytest.fixture
def make_lab(netns):
    """Factory: ``make_lab(hosts=3, providers=2, prefix=None) -> Lab`` (already started)."""
    labs: list[Lab] = []

    def factory(hosts: int = 3, providers: int = 2, prefix: str | None = None) -> Lab:
        lab = Lab(hosts=hosts, providers=providers, prefix=prefix)
        labs.append(lab)
        return lab.start()

    yield factory
    leftovers = []
    for lab in reversed(labs):
        leftovers += lab.close()
    assert not leftovers, f"netns lab teardown left namespaces behind: {leftovers}"


@pytest.fixture
def lab(make_lab) -> Lab:
    """A started lab: hosts h1..h3, each linked to providers A and B."""
    return make_lab(hosts=3)
