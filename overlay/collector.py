"""The cyclic garbage collector's thresholds for a process that runs nodes.

CPython's defaults, ``(700, 10, 10)``, collect the youngest generation after
every 700 net container allocations. A node allocates many medium-lived
objects (frames in send queues, pending probes, trio tasks, stream state)
that outlive two such collections and so reach the oldest generation, where
each counts towards a full collection: one runs whenever those promotions
reach a quarter of the long-lived objects. Measured (docs/performance.md,
"Lean node: the garbage collector"): 48 nodes in one process spent 36 % of
their CPU in the collector while starting, in full collections of 0.4–0.65 s
every 3–5 s, each a pause in which no node reads its acks; 24 settled nodes
spent 13.5 % of theirs in it.

``tune()`` sets ``THRESHOLDS``: objects that die within 50,000 allocations
(most of the above) are freed by reference counting before they are ever
promoted, and the collections of the older generations become rare. Rare
enough that cyclic garbage which had first grown old (a connection's objects,
dropped after minutes) could wait hours in a quiet single-node process, so
``collect_if_due()``, called from the node's maintenance loop, runs one full
collection per process every ``FULL_EVERY`` seconds (45 ms in a process
running one node, 106,000 objects; 0.4–0.65 s for 48 nodes in one process).
A program that chose its own thresholds keeps them, and gets no forced
collections: both functions act only on the interpreter's defaults.
"""

from __future__ import annotations

import gc
import time

DEFAULTS = (700, 10, 10)  # CPython's own
THRESHOLDS = (50_000, 20, 100)
FULL_EVERY = 1800.0  # seconds between the full collections a tuned process runs itself

_next_full: float | None = None  # when the next one is due; None: not tuned here


def tune() -> bool:
    """Set ``THRESHOLDS`` if the process still has CPython's; True if set now."""
    global _next_full
    if gc.get_threshold() != DEFAULTS:
        return False
    gc.set_threshold(*THRESHOLDS)
    _next_full = time.monotonic() + FULL_EVERY
    return True


def collect_if_due() -> bool:
    """One full collection if ``FULL_EVERY`` seconds have passed since the last one
    this module ran (or since ``tune``) and the thresholds are still ours; True if
    it ran. Every node of a process may call it: the process collects once."""
    global _next_full
    now = time.monotonic()
    if _next_full is None or now < _next_full or gc.get_threshold() != THRESHOLDS:
        return False
    _next_full = now + FULL_EVERY
    gc.collect()
    return True
