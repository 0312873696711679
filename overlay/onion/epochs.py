"""Onion key epochs: when a node switches keys and which old keys it still accepts.

A pure schedule, no I/O and no clock: the caller passes ``now`` (unix time),
the epochs whose keys it holds and how full each epoch's replay cache is, and
gets a ``KeyPlan`` back (which key is current, which to keep, which to erase).

Rules (docs/protocol.md, "Onion key epochs"):

- the *scheduled* epoch is ``floor(now / length)`` (``length`` is overlay-wide,
  default ``EPOCH_LENGTH`` = 24 h); a node's current epoch ``c`` is never below
  it: when the schedule passes ``c`` the node switches to the scheduled epoch;
- early rotation: when ``c``'s replay cache holds ``ROTATE_AT`` of its bound,
  the node switches to ``c + 1`` at once (so running ahead of the schedule),
  instead of failing honest packets once the cache is full;
- overlap: a key of epoch ``e < c`` stays accepted while the scheduled epoch is
  at most ``e + 1`` -- at least one full epoch after the node moved on, however
  early it did -- and while its replay cache is not full; at most
  ``max_epochs`` keys (the current one included) are kept, newest first;
- a key that is not kept is erased, and its replay cache with it (a packet
  for an erased epoch is ``unknown_epoch``, so no replay gets through).

Invariants: ``plan`` is deterministic in its inputs, so a node that restarts
recomputes the same plan from the key files it holds; ``current`` is always
kept; ``keep`` and ``drop`` partition the held epochs (plus a new current one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import LocalError

EPOCH_LENGTH = 86400.0  # seconds; the default, overlay-wide
MIN_EPOCH_LENGTH = 1.0
ROTATE_AT = 0.5  # share of the replay bound that triggers an early rotation
MAX_EPOCH = (1 << 32) - 1  # the record's epoch field is a uint32


def scheduled_epoch(now: float, length: float = EPOCH_LENGTH) -> int:
    """``floor(now / length)``, clamped to the record's uint32 range."""
    if not length >= MIN_EPOCH_LENGTH:
        raise LocalError(f"epoch length must be >= {MIN_EPOCH_LENGTH} s")
    return min(MAX_EPOCH, max(0, math.floor(now / length)))


def epoch_start(epoch: int, length: float = EPOCH_LENGTH) -> float:
    """Unix time at which ``epoch`` begins on the schedule."""
    return epoch * length


def key_retired(epoch: int, now: float, length: float = EPOCH_LENGTH) -> bool:
    """True once the schedule has moved past ``epoch``'s overlap: a key announced for
    ``epoch`` is then no longer accepted by any node keeping to this schedule."""
    return epoch + 1 < scheduled_epoch(now, length)


def record_key_retired(
    epoch: int, issued_at: float, now: float, length: float = EPOCH_LENGTH
) -> bool:
    """True if a record issued at ``issued_at`` announcing ``epoch`` names a key its
    node no longer accepts. A record whose epoch is below the schedule at its
    issue time keeps another schedule (an older node, another epoch length):
    nothing can be concluded, so False."""
    if epoch < scheduled_epoch(issued_at, length):
        return False
    return key_retired(epoch, now, length)


@dataclass(frozen=True, slots=True)
class KeyPlan:
    current: int
    keep: tuple[int, ...]  # newest first, ``current`` included
    drop: tuple[int, ...]
    rotated: str | None = None  # None, "schedule" or "early": why ``current`` is new

    @property
    def next(self) -> int:
        """The epoch whose key to prepare ahead of time."""
        return min(MAX_EPOCH, self.current + 1)


def plan(
    held: Iterable[int],
    now: float,
    length: float = EPOCH_LENGTH,
    *,
    cache_sizes: Mapping[int, int] | None = None,
    max_per_epoch: int = 1 << 20,
    max_epochs: int = 4,
) -> KeyPlan:
    """Which onion key is current and which keys stay, given those held at ``now``."""
    if max_epochs < 2:
        raise LocalError("max_epochs must be >= 2 (a current and a previous key)")
    sizes = cache_sizes or {}
    held = sorted(set(held), reverse=True)
    sched = scheduled_epoch(now, length)
    rotated = None
    if not held or held[0] < sched:
        current, rotated = sched, "schedule"
    else:
        current = held[0]
        if sizes.get(current, 0) >= max_per_epoch * ROTATE_AT and current < MAX_EPOCH:
            current, rotated = current + 1, "early"
    keep = [current]
    for e in held:
        if e == current or e > current:
            continue
        if len(keep) >= max_epochs:
            break
        if e + 1 >= sched and sizes.get(e, 0) < max_per_epoch:
            keep.append(e)
    drop = tuple(e for e in held if e not in keep)
    return KeyPlan(current, tuple(keep), drop, rotated)
