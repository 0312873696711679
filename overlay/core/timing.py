"""Timing constants of a node that the simulator must model the same way.

Defined once here; ``overlay.runtime``, ``overlay.services.resilience`` and
``overlay.sim`` import them (a copy in the simulator would drift).
"""

SYNC_TIMEOUT = 5.0  # one anti-entropy round, dial included, at most this long
JOIN_ROUNDS = 20  # sync rounds with the join peer at most (each moves <= sync.MAX_WANT records)
# the exit pool acts only this long after the node joined, so that a standby does
# not promote itself on the partial membership it holds while still syncing
SETTLE = 5.0
