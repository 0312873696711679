import logging

import pytest


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
