"""Sans-I/O standby-exit policy: promote when live exits fall below target, step back on surplus.

Every node runs one ``ExitPool``; only nodes with the STANDBY_EXIT role ever
act. All of them see (nearly) the same membership snapshot and liveness view,
and rank the standby candidates the same way, so they agree on *which*
standbys should promote without talking to each other.

Definitions (evaluated on the last ``update``):
- a *live exit* is a record with EXIT that is not a tombstone, not DEAD in
  the liveness view (SUSPECT and unmonitored nodes still count: promotion
  waits for a death, not a doubt) and, when ``update`` is given
  ``verified_since``, verified at this node (it authenticated to us itself:
  see ``overlay.core.admission``) — a record merely claiming the role counts
  for nothing; our own roles replace our own record, which may lag behind in
  the snapshot;
- a *candidate* is a live standby: STANDBY_EXIT without EXIT, not a
  tombstone, not DEAD, verified likewise (ourselves included);
- a *seasoned* live exit has been verified for at least ``min_verified_age``
  seconds; only seasoned exits (and ourselves) count towards a surplus, so
  exits that just appeared cannot make a standby step back;
- the *rank* of a candidate is its position when candidates are sorted by
  ``BLAKE2b(rank_salt || node id)``; rank 0 is the most preferred;
- ``deficit = target - live``; in chain mode ``target = 1`` and ``surplus = 0``
  (exactly one public exit; the next standby comes online only when none is
  left).

Promotion rule: a standby promotes iff ``deficit > 0`` and its rank is below
the deficit, re-checked when its timer fires (after a small random jitter, so
the announcements of the needed standbys are spread out). Standbys with rank
``>= deficit`` wait: they promote only if the deficit has lasted
``patience + (rank - deficit) * promote_delay_unit`` seconds (the preferred
standbys may be dead without the liveness view knowing yet, or may not act);
each re-checks first, so once the earlier ones' new records are seen they stand
down.

Invariants:
- with identical views, exactly ``deficit`` standbys promote (no overshoot);
  views that disagree about which standbys are alive can overshoot by the
  number of disagreeing standbys; the backstop can overshoot only if a record
  takes longer than ``promote_delay_unit`` to propagate;
- a node only ever announces its own roles; an original exit (no
  STANDBY_EXIT) never steps back;
- step back happens only after seasoned live exits exceeded ``target + surplus``
  continuously for ``hysteresis`` seconds, and only by the least preferred
  promoted standby in our view, so the pool shrinks one exit at a time;
- no I/O, no wall clock; randomness only from the given ``rng``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..crypto import NodeId, hash32
from ..errors import LocalError
from ..records import EXIT_ROLES, Role, ValidRecord
from .effects import Announce, Effect

MODES = ("all-public", "chain")
DEAD = "dead"
PROMOTE, STEP_BACK, DEFICIT, RESTORED = "promote", "step-back", "deficit", "restored"


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """Something the pool noticed or did, for the demo, logs and metrics.

    ``kind``: ``"deficit"`` (live exits fell below target), ``"restored"``
    (back at target), ``"promote"`` / ``"step-back"`` (this node announced).
    """

    at: float
    kind: str
    live: int
    target: int
    why: str = ""


class ExitPool:
    """The promotion / step-back policy of one node. See the module docstring."""

    def __init__(
        self,
        me: NodeId,
        my_roles: Role,
        rng: random.Random,
        *,
        target_live_exits: int = 3,
        mode: str = "all-public",
        promote_delay_unit: float = 0.3,
        hysteresis: float = 10.0,
        surplus: int = 1,
        patience: float = 3.0,
        jitter: float | None = None,
        rank_salt: bytes = b"",
        max_events: int = 256,
        min_verified_age: float = 60.0,
    ) -> None:
        if mode not in MODES:
            raise LocalError(f"exit_policy_mode must be one of {MODES}, not {mode!r}")
        if target_live_exits < 1 or surplus < 0 or promote_delay_unit <= 0 or hysteresis < 0:
            raise LocalError("need target_live_exits >= 1, surplus >= 0, delays > 0")
        self.me = me
        self._roles = Role(my_roles)
        self._rng = rng
        self.mode = mode
        self.target = 1 if mode == "chain" else target_live_exits
        self.surplus = 0 if mode == "chain" else surplus
        self.unit = promote_delay_unit
        self.hysteresis = hysteresis
        self.patience = patience
        self.jitter = promote_delay_unit / 3 if jitter is None else jitter
        self._salt = rank_salt
        self.min_verified_age = min_verified_age
        self.events: deque[PoolEvent] = deque(maxlen=max_events)

        self._keys: dict[NodeId, bytes] = {}
        self._live_others: set[NodeId] = set()  # live exits other than us
        self._candidates_others: list[NodeId] = []  # live standbys other than us
        self._promoted_others: list[NodeId] = []  # live EXIT|STANDBY_EXIT other than us
        self._seasoned_others = 0  # live exits other than us verified for min_verified_age
        self._seasons_at: float | None = None  # when the next live exit becomes seasoned
        self._deficit_since: float | None = None
        self._surplus_since: float | None = None
        self._fire_at: float | None = None
        self._jit: float | None = None

    # -- public surface -------------------------------------------------------

    @property
    def roles(self) -> Role:
        """Our roles as we last announced them (or were constructed with)."""
        return self._roles

    @property
    def promoted(self) -> bool:
        """We are a standby currently serving as an exit."""
        return Role.EXIT in self._roles and Role.STANDBY_EXIT in self._roles

    @property
    def live_exits(self) -> int:
        return len(self._live_others) + (1 if Role.EXIT in self._roles else 0)

    @property
    def seasoned_exits(self) -> int:
        """Live exits that count towards a surplus (verified long enough, and us)."""
        return self._seasoned_others + (1 if Role.EXIT in self._roles else 0)

    def set_roles(self, roles: Role) -> None:
        """Our roles changed outside this policy (config reload)."""
        self._roles = Role(roles)
        self._fire_at = None

    def rank_key(self, node: NodeId) -> bytes:
        key = self._keys.get(node)
        if key is None:
            key = self._keys[node] = hash32(self._salt + bytes(node), person=b"hydra-exitrank")
        return key

    def rank(self) -> int | None:
        """Our rank among live standby candidates (None unless we are one)."""
        if not self._is_candidate():
            return None
        mine = self.rank_key(self.me)
        return sum(1 for n in self._candidates_others if self.rank_key(n) < mine)

    def update(
        self,
        records: Iterable[ValidRecord],
        liveness: Mapping[NodeId, str | tuple[str, float]],
        now: float,
        verified_since: Callable[[NodeId], float | None] | None = None,
    ) -> list[Effect]:
        """Take a new membership snapshot and liveness view; act if due.

        ``liveness`` maps node ids to ``"alive" | "suspect" | "dead"`` (or to
        ``(state, since)`` as ``Liveness.view()`` gives); absent nodes count
        as alive. ``verified_since(node)`` gives when this node verified a
        member (``None``: not verified, so it counts for nothing); without it
        every record counts, as verified forever.
        """
        live: set[NodeId] = set()
        cands: list[NodeId] = []
        promoted: list[NodeId] = []
        seasoned = 0
        seasons_at = None
        for r in records:
            if r.is_tombstone or r.node_id == self.me:
                continue
            if not r.roles & EXIT_ROLES:
                continue
            st = liveness.get(r.node_id)
            if isinstance(st, tuple):
                st = st[0]
            if st == DEAD:
                continue
            since = -float("inf")
            if verified_since is not None:
                since = verified_since(r.node_id)
                if since is None:
                    continue
            if Role.EXIT in r.roles:
                live.add(r.node_id)
                if now - since >= self.min_verified_age:
                    seasoned += 1
                elif seasons_at is None or since + self.min_verified_age < seasons_at:
                    seasons_at = since + self.min_verified_age
                if Role.STANDBY_EXIT in r.roles:
                    promoted.append(r.node_id)
            else:
                cands.append(r.node_id)
        self._live_others = live
        self._candidates_others = cands
        self._promoted_others = promoted
        self._seasoned_others = seasoned
        self._seasons_at = seasons_at
        return self.tick(now)

    def next_update(self) -> float | None:
        """When ``update`` with the same inputs would count differently (a live exit
        becomes seasoned: verified for ``min_verified_age``); None: only new inputs
        matter."""
        return self._seasons_at

    def next_wakeup(self) -> float | None:
        """When ``tick`` next has something to do (None: only a new ``update`` matters)."""
        t = self._fire_at
        if self.promoted and self._surplus_since is not None:
            s = self._surplus_since + self.hysteresis
            t = s if t is None else min(t, s)
        return t

    def tick(self, now: float) -> list[Effect]:
        """Fire due promotion / step-back decisions against the last view."""
        out: list[Effect] = []
        live = self.live_exits
        deficit = self.target - live
        if deficit > 0 and self._deficit_since is None:
            self._deficit_since = now
            self._log(now, DEFICIT, live, f"live exits {live} < target {self.target}")
        elif deficit <= 0 and self._deficit_since is not None:
            self._deficit_since = None
            self._log(now, RESTORED, live, f"live exits {live} >= target {self.target}")
        if self.seasoned_exits > self.target + self.surplus:
            if self._surplus_since is None:
                self._surplus_since = now
        else:
            self._surplus_since = None

        if self._is_candidate() and deficit > 0:
            if self._jit is None:  # one draw per deficit episode
                self._jit = self._rng.uniform(0, self.jitter)
            # re-evaluated on every tick: rank and deficit move as records and deaths arrive
            self._fire_at = self._due(self.rank(), deficit) + self._jit
            if now >= self._fire_at:
                self._promote(now, live, out)
            return out
        self._fire_at = None
        if deficit <= 0:
            self._jit = None
        if self.promoted and self._should_step_back(now):
            self._step_back(now, live, out)
        return out

    # -- policy -----------------------------------------------------------------

    def _is_candidate(self) -> bool:
        return Role.STANDBY_EXIT in self._roles and Role.EXIT not in self._roles

    def _due(self, rank: int, deficit: int) -> float:
        """Earliest time a candidate of ``rank`` may promote in the current deficit."""
        if rank < deficit:
            return self._deficit_since
        return self._deficit_since + self.patience + (rank - deficit) * self.unit

    def _should_step_back(self, now: float) -> bool:
        if self._surplus_since is None or now < self._surplus_since + self.hysteresis:
            return False
        mine = self.rank_key(self.me)
        return all(self.rank_key(n) < mine for n in self._promoted_others)

    def _promote(self, now: float, live: int, out: list[Effect]) -> None:
        why = f"promote: live exits {live} < target {self.target}"
        self._roles |= Role.EXIT
        self._fire_at = None
        out.append(Announce(tuple(self._roles.names()), why))
        self._log(now, PROMOTE, live, why)

    def _step_back(self, now: float, live: int, out: list[Effect]) -> None:
        why = (
            f"step back: live exits {live} > {self.target + self.surplus} for {self.hysteresis:g} s"
        )
        self._roles &= ~Role.EXIT
        self._surplus_since = None
        out.append(Announce(tuple(self._roles.names()), why))
        self._log(now, STEP_BACK, live, why)

    def _log(self, now: float, kind: str, live: int, why: str) -> None:
        self.events.append(PoolEvent(now, kind, live, self.target, why))
