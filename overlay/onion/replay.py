"""Replay cache for Sphinx replay tags, partitioned by onion-key epoch.

Invariants:
- pure in-memory state, no I/O and no clock: the caller persists ``tags()``
  and restores them with ``load()``, and calls ``drop_epoch`` when it erases
  that epoch's onion key (a packet for a dropped epoch can no longer be
  opened, so its tags are useless);
- bounded: at most ``max_epochs`` epochs and ``max_per_epoch`` tags each;
  when an epoch is full ``check_and_add`` fails closed (``ReplayCacheFull``)
  rather than evicting, since eviction would re-admit replays. The relay
  never lets it come to that for honest traffic: it switches to a new key
  epoch when the current one is half full and erases an older epoch (key and
  tags) once full (``overlay.onion.epochs``);
- ``check_and_add`` raises ``Replay`` for a tag already seen in that epoch.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import LocalError, Replay
from .params import TAG_SIZE, ReplayCacheFull


class ReplayCache:
    __slots__ = ("max_per_epoch", "max_epochs", "_epochs")

    def __init__(self, max_per_epoch: int = 1 << 20, max_epochs: int = 4) -> None:
        if max_per_epoch < 1 or max_epochs < 1:
            raise LocalError("ReplayCache bounds must be >= 1")
        self.max_per_epoch = max_per_epoch
        self.max_epochs = max_epochs
        self._epochs: dict[int, set[bytes]] = {}

    def _bucket(self, epoch: int) -> set[bytes]:
        bucket = self._epochs.get(epoch)
        if bucket is None:
            if len(self._epochs) >= self.max_epochs:
                raise ReplayCacheFull(
                    f"already {len(self._epochs)} epochs cached: drop_epoch() retired keys"
                )
            bucket = self._epochs[epoch] = set()
        return bucket

    def check_and_add(self, epoch: int, tag: bytes) -> None:
        """Record ``tag`` for ``epoch``; raise ``Replay`` if it was already there."""
        bucket = self._bucket(epoch)
        if tag in bucket:
            raise Replay(detail=f"epoch {epoch}")
        if len(bucket) >= self.max_per_epoch:
            raise ReplayCacheFull(f"epoch {epoch} holds {len(bucket)} tags: rotate the onion key")
        bucket.add(tag)

    __call__ = check_and_add  # so a cache can be passed as process(..., replay=cache)

    def seen(self, epoch: int, tag: bytes) -> bool:
        bucket = self._epochs.get(epoch)
        return bucket is not None and tag in bucket

    def drop_epoch(self, epoch: int) -> None:
        self._epochs.pop(epoch, None)

    def epochs(self) -> list[int]:
        return sorted(self._epochs)

    def size(self, epoch: int) -> int:
        return len(self._epochs.get(epoch, ()))

    def sizes(self) -> dict[int, int]:
        """Tags held per epoch."""
        return {e: len(b) for e, b in self._epochs.items()}

    def full(self, epoch: int) -> bool:
        return self.size(epoch) >= self.max_per_epoch

    def tags(self, epoch: int) -> frozenset[bytes]:
        """A snapshot of one epoch's tags, for persisting."""
        return frozenset(self._epochs.get(epoch, ()))

    def load(self, epoch: int, tags: Iterable[bytes]) -> None:
        """Restore saved tags (e.g. after a restart); same bounds apply."""
        bucket = self._bucket(epoch)
        for t in tags:
            if len(t) != TAG_SIZE:
                raise LocalError("replay tags are 16 bytes")
            if t not in bucket and len(bucket) >= self.max_per_epoch:
                raise ReplayCacheFull(f"epoch {epoch}: saved tags exceed max_per_epoch")
            bucket.add(bytes(t))

    def __len__(self) -> int:
        return sum(len(b) for b in self._epochs.values())

    def __repr__(self) -> str:
        return f"ReplayCache({ {e: len(b) for e, b in sorted(self._epochs.items())} })"
