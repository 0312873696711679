import logging
import os

import pytest
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
