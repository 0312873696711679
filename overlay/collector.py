"""The cyclic garbage collector's thresholds for a process that runs nodes.

CPython's defaults, ``(700, 10, 10)``, collect the youngest generation after
every 700 net container allocations. A node allocates many medium-lived
objects (frames in send queues, pending probes, trio tasks, stream state)
that outlive two such collections and so reach the oldest generation, where
each counts towards a full collection: one runs whenever those promotions
reach a quarter of the long-lived objects. Measured (docs/performance.md,
"Lean node: the garbage collector"): 48 nodes in one process spent 36 % of
their CPU in the collector while starting, in full collections of 0.4–0.6 s
every 4 s, each a pause in which no node reads its acks; 24 settled nodes
spent 13.5 % of theirs in it.

``tune()`` raises the first threshold to ``THRESHOLDS[0]``: objects that die
within that many allocations (most of the above) are freed by reference
counting before they are ever promoted, and full collections become rare
(the quarter rule still bounds how much cyclic garbage can wait in the oldest
generation). A program that chose its own thresholds keeps them: ``tune``
changes only the interpreter's defaults.
"""

from __future__ import annotations

import gc

DEFAULTS = (700, 10, 10)  # CPython's own
THRESHOLDS = (50_000, 20, 100)


def tune() -> bool:
    """Set ``THRESHOLDS`` if the process still has CPython's; True if set now."""
    if gc.get_threshold() != DEFAULTS:
        return False
    gc.set_threshold(*THRESHOLDS)
    return True
