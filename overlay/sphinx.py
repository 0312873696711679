"""Sphinx packet format (re-exports ``overlay.onion``): pure functions, no I/O.

``build_packet`` / ``make_surb`` / ``use_surb`` (senders and repliers),
``process`` (each hop), ``open_reply`` (a SURB's creator), ``ReplayCache``
(callers own it). Layout and rationale: docs/sphinx.md.
"""

from .onion import *  # noqa: F403 - this module is the package's public face under its issue name
from .onion import __all__ as __all__
