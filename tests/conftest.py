import functools
import inspect
import logging
import os

import pytest
import trio
from hypothesis import settings

# Hypothesis profiles, chosen once for the whole run. Tests that pin their own
# max_examples keep it; the rest (the fuzz tests in tests/fuzz) follow the profile:
#   HYPOTHESIS_PROFILE=ci (default, small: fast in CI) | dev | fuzz (long, by hand)
#   HYDRA_FUZZ_EXAMPLES=N  the chosen profile with max_examples=N
settings.register_profile("ci", max_examples=100, deadline=None)  # Hypothesis default count
settings.register_profile("dev", max_examples=500, deadline=None)
settings.register_profile("fuzz", max_examples=20_000, deadline=None)
_profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if os.environ.get("HYDRA_FUZZ_EXAMPLES"):
    settings.register_profile(
        "hydra-env",
        settings.get_profile(_profile),
        max_examples=int(os.environ["HYDRA_FUZZ_EXAMPLES"]),
    )
    _profile = "hydra-env"
settings.load_profile(_profile)


@pytest.fixture(autouse=True, scope="session")
def _quiet_libp2p():
    """py-libp2p logs routine dial/stream failures of a churning overlay at WARNING/ERROR.

    The tests assert on behaviour and metrics instead; set after libp2p's own
    logging set-up has run (it configures its loggers at import).
    """
    import libp2p  # noqa: F401

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("libp2p"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    yield


# Per-test time limit (pytest-timeout, `timeout` in pyproject.toml). Its signal
# fires wherever the main thread is; inside trio's run loop that would leave
# trio's state broken for the next test. So a trio test gets the limit less a
# margin as a trio deadline: it fails with TooSlowError, cleanly cancelled; the
# signal stays the backstop for code that never yields to trio (a test that
# never returns to trio's loop is the only kind that can still upset the next).
TRIO_MARGIN = 30.0


def _limit(item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        return float(item.config.getini("timeout") or 0)
    except ValueError:
        return 0.0


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    limit = _limit(item)
    fn = getattr(item, "obj", None)
    if (
        limit > 0
        and item.get_closest_marker("trio") is not None
        and inspect.iscoroutinefunction(fn)
        and not hasattr(fn, "hypothesis")
    ):

        @functools.wraps(fn)
        async def with_deadline(**kwargs):
            with trio.fail_after(limit - min(TRIO_MARGIN, limit / 2)):
                return await fn(**kwargs)

        item.obj = with_deadline
    yield
