"""The node's event ring: what happened, when, in order (sans-I/O).

Joins, deaths, promotions, feed changes... are recorded where the node already
logs them (``Node.events.add``) and read by the console (``overlay status
--watch``, the web console, ``overlay demo``).

Invariants:
- at most ``size`` events are held; the oldest go first;
- every event gets the next sequence number (1, 2, ...), so a reader asks for
  what came after the last number it saw (``since``) and learns from
  ``dropped_before`` whether it missed some;
- ``at`` is the time the event happened (the caller's clock, wall-clock seconds
  in a node), not the time it was read; no I/O, no clock of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# what the console shows, and how the page marks it
KINDS = (
    "joined",  # this node joined the overlay
    "join",  # a new member appeared
    "leave",  # a member withdrew its record (tombstone)
    "peer-up",  # a peer connected
    "peer-down",  # a peer disconnected
    "alive",  # liveness: a monitored member is alive (again)
    "suspect",
    "dead",
    "deficit",  # exit pool: live exits below target
    "restored",  # exit pool: back at target
    "promote",  # this node became an exit
    "step-back",  # this node went back to standby
    "promoted",  # another member became an exit
    "stepped-back",  # another member went back to standby
    "feed",  # a feed of this node changed state
)
MAX_TEXT = 200


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    at: float
    kind: str
    text: str
    peer: str = ""  # the peer id the event is about, if any
    role: str = ""  # "exit" / "standby" when the event is about an exit or a standby

    def to_json(self) -> dict:
        d = {"seq": self.seq, "at": round(self.at, 3), "kind": self.kind, "text": self.text}
        if self.peer:
            d["peer"] = self.peer
        if self.role:
            d["role"] = self.role
        return d


class EventRing:
    """A bounded, numbered list of recent events. See the module docstring."""

    def __init__(self, size: int = 256, clock: Callable[[], float] | None = None) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._events: deque[Event] = deque(maxlen=size)
        self._clock = clock
        self.last_seq = 0

    def __len__(self) -> int:
        return len(self._events)

    def add(
        self, kind: str, text: str, *, peer: str = "", role: str = "", at: float | None = None
    ) -> Event:
        """Record an event (``at`` defaults to the ring's clock; one of them is needed)."""
        if at is None:
            if self._clock is None:
                raise ValueError("no time given and no clock")
            at = self._clock()
        self.last_seq += 1
        ev = Event(self.last_seq, float(at), kind, text[:MAX_TEXT], peer, role)
        self._events.append(ev)
        return ev

    @property
    def dropped_before(self) -> int:
        """The lowest sequence number still held (events before it were dropped)."""
        return self._events[0].seq if self._events else self.last_seq + 1

    def since(self, seq: int, limit: int | None = None) -> list[Event]:
        """Events with a sequence number above ``seq``, oldest first (the newest
        ``limit`` of them if given)."""
        if seq >= self.last_seq:
            return []
        out: list[Event] = []
        for ev in reversed(self._events):
            if ev.seq <= seq or (limit is not None and len(out) >= limit):
                break
            out.append(ev)
        out.reverse()
        return out

    def recent(self, n: int) -> list[Event]:
        """The newest ``n`` events, oldest first."""
        return self.since(0, limit=n)
