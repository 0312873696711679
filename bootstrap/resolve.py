"""Pick the newest valid seed bundle from what several sources returned. Sans-I/O.

Input: for each source, what fetching it gave (``Fetched`` blobs,
``NotModified`` for an HTTP 304 on the cached bundle's ETag, or ``Failed``),
the caller's pinned operator keys and threshold, the cached bundle's bytes (or
None) and ``now`` (unix seconds). Output: a ``Resolution`` naming the chosen
bundle and one ``SourceReport`` per source with a typed reason.

Rules:
- every blob goes through decode -> verify(pinned, k) -> check_valid_at(now);
- the cache is re-checked the same way (it is never trusted blindly); an
  expired cache still sets the rollback floor and is offered separately as
  ``expired_cache``, never as ``bundle``;
- a valid bundle whose seq is lower than the best seq known (the cache or
  another source) is rejected as ``rolled_back``;
- the best bundle is the highest (seq, expires_at, number of pinned signers,
  digest); a source bundle wins over an equal cached one, so extra cosignatures
  picked up from a source replace the cache.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from overlay.crypto import NodeId
from overlay.errors import Reason, RemoteError

from .bundle import UnverifiedBundle, ValidBundle, VerifiedBundle, decode, pinned_set


class SourceError(enum.Enum):
    """Why a source gave nothing to check (transport, not content). Values are stable."""

    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    NOT_FOUND = "not_found"
    HTTP_STATUS = "http_status"
    INVALID_SOURCE = "invalid_source"


@dataclass(frozen=True)
class Fetched:
    """Candidate bundle bytes (a DNS name may publish several during a change-over)."""

    blobs: tuple[bytes, ...]


@dataclass(frozen=True)
class NotModified:
    """The source confirmed it still serves the cached bundle (HTTP 304)."""


@dataclass(frozen=True)
class Failed:
    """Nothing to check: a transport failure, or content rejected before it was a bundle
    (e.g. oversized HTTP body, incomplete DNS chunks)."""

    error: SourceError | Reason
    detail: str = ""


SourceResult = Fetched | NotModified | Failed


@dataclass(frozen=True)
class SourceReport:
    """What one source contributed. ``reason`` is None only when ``ok``."""

    source: str
    ok: bool
    reason: Reason | SourceError | None = None
    detail: str = ""
    seq: int | None = None
    chosen: bool = False

    @property
    def reason_text(self) -> str:
        return self.reason.value if self.reason is not None else "ok"

    def __str__(self) -> str:
        """One printable line: ``SOURCE: chosen (seq 12)``, ``SOURCE: ok (seq 11)`` or
        ``SOURCE: skipped: REASON: DETAIL`` (no reprs; control characters replaced)."""
        if self.ok:
            state = "chosen" if self.chosen else "ok"
            seq = f" (seq {self.seq})" if self.seq is not None else ""
            return f"{_printable(self.source, 120)}: {state}{seq}"
        detail = f": {_printable(self.detail, 160)}" if self.detail else ""
        return f"{_printable(self.source, 120)}: skipped: {self.reason_text}{detail}"


def _printable(text: str, limit: int) -> str:
    """``text`` on one line: non-printable characters become ``?``, cut to ``limit``."""
    clean = "".join(c if c.isprintable() else "?" for c in str(text)[: limit + 1])
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


@dataclass(frozen=True)
class Resolution:
    bundle: ValidBundle | None
    from_cache: bool
    outcomes: tuple[SourceReport, ...]
    cache_status: str  # "none", "valid", "expired" or a rejection reason value
    expired_cache: VerifiedBundle | None = None
    write_cache: bool = False  # the caller should store bundle.raw as the new cache


def _rank(b: VerifiedBundle) -> tuple[int, int, int, bytes]:
    return (b.seq, b.expires_at, len(b.signers), b.digest())


def _check(
    raw: bytes, pinned: frozenset[NodeId], threshold: int, now: float
) -> tuple[VerifiedBundle | None, ValidBundle | None, RemoteError | None]:
    """(verified, valid, error): verified is set even if only freshness failed."""
    try:
        unverified: UnverifiedBundle = decode(raw)
        verified = unverified.verify(pinned, threshold)
    except RemoteError as e:
        return None, None, e
    try:
        return verified, verified.check_valid_at(now), None
    except RemoteError as e:
        return verified, None, e


def resolve(
    results: Sequence[tuple[str, SourceResult]],
    operators: Iterable[NodeId | bytes],
    threshold: int,
    cache: bytes | None,
    now: float,
) -> Resolution:
    """Choose the bundle to use. Raises ``LocalError`` only for a bad pinned configuration."""
    pinned = pinned_set(operators, threshold)

    cache_verified: VerifiedBundle | None = None
    cache_valid: ValidBundle | None = None
    cache_status = "none"
    if cache is not None:
        cache_verified, cache_valid, err = _check(cache, pinned, threshold, now)
        if cache_valid is not None:
            cache_status = "valid"
        elif cache_verified is not None:
            cache_status = "expired" if err and err.reason is Reason.EXPIRED else err.reason.value
        else:
            cache_status = err.reason.value if err else "rejected"

    # per source: its best valid bundle, or why it had none
    best_per_source: list[ValidBundle | None] = []
    provisional: list[SourceReport] = []
    for source, result in results:
        if isinstance(result, NotModified):
            if cache is None:
                result = Failed(SourceError.HTTP_STATUS, "304 without a cached bundle")
            else:
                result = Fetched((cache,))
        if isinstance(result, Fetched) and not result.blobs:
            result = Failed(SourceError.NOT_FOUND, "no bundle")
        if isinstance(result, Failed):
            best_per_source.append(None)
            provisional.append(SourceReport(source, False, result.error, result.detail))
            continue
        best: ValidBundle | None = None
        first_error: RemoteError | None = None
        first_seq: int | None = None
        for blob in result.blobs:
            verified, valid, err = _check(blob, pinned, threshold, now)
            if valid is not None:
                if best is None or _rank(valid) > _rank(best):
                    best = valid
            elif first_error is None:
                first_error = err
                first_seq = verified.seq if verified is not None else None
        best_per_source.append(best)
        if best is not None or first_error is None:
            provisional.append(SourceReport(source, True, seq=best.seq if best else None))
        else:
            provisional.append(
                SourceReport(source, False, first_error.reason, first_error.detail, first_seq)
            )

    floor = cache_verified.seq if cache_verified is not None else -1
    candidates = [b for b in best_per_source if b is not None and b.seq >= floor]
    chosen: ValidBundle | None = max(candidates, key=_rank, default=None)
    from_cache = False
    if cache_valid is not None and (chosen is None or _rank(cache_valid) > _rank(chosen)):
        chosen, from_cache = cache_valid, True

    outcomes = []
    for out, b in zip(provisional, best_per_source, strict=True):
        if b is not None and chosen is not None and b.seq < chosen.seq:
            out = SourceReport(
                out.source, False, Reason.ROLLED_BACK, f"seq {b.seq} < {chosen.seq}", b.seq
            )
        elif b is not None and b.seq < floor:
            out = SourceReport(
                out.source, False, Reason.ROLLED_BACK, f"seq {b.seq} < cached {floor}", b.seq
            )
        elif b is not None and chosen is not None and not from_cache and b.raw == chosen.raw:
            out = SourceReport(out.source, True, seq=b.seq, chosen=True)
        outcomes.append(out)

    write = chosen is not None and not from_cache and chosen.raw != cache
    expired = cache_verified if cache_valid is None and cache_verified is not None else None
    return Resolution(
        bundle=chosen,
        from_cache=from_cache,
        outcomes=tuple(outcomes),
        cache_status=cache_status,
        expired_cache=expired if chosen is None else None,
        write_cache=write,
    )
