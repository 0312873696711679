"""Which light-client session gets which reply: the SURB registry. Plain class, no I/O.

A relay that is a light client's entry node pushes replies (the end of a SURB
path) back to the session that registered the reply's surb id. The registry
maps surb ids to sessions, with a time to live and bounds; sessions are
opaque hashable owners (``ReplySink``), and pushing to one is its caller's
business (``overlay.core.relaycore`` returns it as a ``PushReply`` effect).

Invariants: no I/O, no clock (``now`` is a parameter); bounded in
registrations (``max_total``), per session (``max_per_session``) and in
buffered replies (``max_buffered``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class ReplySink:
    """Something a reply can be pushed to (a client session). ``push`` must not block."""

    def push(self, surb_id: bytes, payload: bytes) -> bool:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass(slots=True)
class _Registration:
    owner: ReplySink | None
    expires_at: float
    buffered: bytes | None = None


class SurbRegistry:
    """surb id -> the session that waits for its reply. Plain class, no I/O.

    A registration lasts ``ttl`` seconds and is used once. When its session
    ends it stays (owner-less) until it expires, and a reply arriving then is
    buffered (at most ``max_buffered`` of them) until a new session registers
    the same id: a client that reconnects loses nothing. Knowing a surb id is
    what entitles a session to its reply (ids are 16 random bytes, and the
    payload is encrypted for the SURB's creator anyway).
    """

    def __init__(
        self,
        *,
        ttl: float = 3600.0,
        max_per_session: int = 4096,
        max_total: int = 65536,
        max_buffered: int = 256,
    ) -> None:
        self.ttl = ttl
        self.max_per_session = max_per_session
        self.max_total = max_total
        self.max_buffered = max_buffered
        self._regs: dict[bytes, _Registration] = {}
        self._owned: dict[ReplySink, dict[bytes, None]] = {}
        self._buffered = 0

    def __len__(self) -> int:
        return len(self._regs)

    def register(
        self, owner: ReplySink, surb_ids: Iterable[bytes], now: float
    ) -> list[tuple[bytes, bytes]]:
        """Register ids for ``owner``; returns buffered replies to push to it now."""
        owned = self._owned.setdefault(owner, {})
        ready = []
        for sid in surb_ids:
            reg = self._regs.get(sid)
            if reg is None:
                if len(self._regs) >= self.max_total:
                    self.expire(now)
                    if len(self._regs) >= self.max_total:
                        continue
                reg = self._regs[sid] = _Registration(owner, now + self.ttl)
            else:
                if reg.owner is not None and reg.owner is not owner:
                    self._owned.get(reg.owner, {}).pop(sid, None)
                reg.owner = owner
                reg.expires_at = now + self.ttl
            owned[sid] = None
            if len(owned) > self.max_per_session:  # drop the session's oldest
                old = next(iter(owned))
                del owned[old]
                self._drop(old)
            if reg.buffered is not None:
                ready.append((sid, reg.buffered))
                self._drop(sid)
                owned.pop(sid, None)
        return ready

    def route(self, surb_id: bytes, payload: bytes, now: float) -> ReplySink | None:
        """The live owner of ``surb_id`` (registration consumed), or None (buffered/unknown)."""
        reg = self._regs.get(surb_id)
        if reg is None or reg.expires_at <= now:
            if reg is not None:
                self._drop(surb_id)
            return None
        if reg.owner is not None:
            owner = reg.owner
            self._drop(surb_id)
            return owner
        if reg.buffered is None and self._buffered < self.max_buffered:
            reg.buffered = payload
            self._buffered += 1
        return None

    def knows(self, surb_id: bytes) -> bool:
        return surb_id in self._regs

    def detach(self, owner: ReplySink) -> None:
        for sid in self._owned.pop(owner, {}):
            reg = self._regs.get(sid)
            if reg is not None and reg.owner is owner:
                reg.owner = None

    def expire(self, now: float) -> int:
        gone = [sid for sid, r in self._regs.items() if r.expires_at <= now]
        for sid in gone:
            self._drop(sid)
        return len(gone)

    def _drop(self, sid: bytes) -> None:
        reg = self._regs.pop(sid, None)
        if reg is None:
            return
        if reg.buffered is not None:
            self._buffered -= 1
        if reg.owner is not None:
            self._owned.get(reg.owner, {}).pop(sid, None)
