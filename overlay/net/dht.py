"""The Kademlia DHT for Hydra: namespaced values under caller-supplied
validators, providers, and routing-table upkeep.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from ..errors import LocalError
from . import upstream
from .errors import DhtError, DhtTimeout

logger = logging.getLogger(__name__)


class RecordValidator(Protocol):
    """Validation hooks for one DHT namespace (same shape as libp2p's ``Validator``).

    ``validate`` raises (any ``Exception``) to reject a value; ``select``
    returns the index of the best value among candidates that each passed
    ``validate`` (e.g. the highest ``seq``).
    """

    def validate(self, key: str, value: bytes) -> None: ...

    def select(self, key: str, values: list[bytes]) -> int: ...


class _GuardedValidator(Validator):
    """Adapts a ``RecordValidator`` so a buggy ``select`` cannot break a lookup."""

    def __init__(self, inner: RecordValidator) -> None:
        self.inner = inner

    def validate(self, key: str, value: bytes) -> None:
        self.inner.validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        try:
            idx = int(self.inner.select(key, values))
        except Exception:
            logger.exception("DHT select() for %s raised; keeping the first value", key)
            return 0
        return idx if 0 <= idx < len(values) else 0


def _namespace(key: str) -> str:
    parts = key.split("/", 2)
    if len(parts) != 3 or parts[0] != "" or not parts[1] or not parts[2]:
        raise LocalError(f"DHT key must look like /<namespace>/<name>: {key!r}")
    return parts[1]


def _provider_key(name: str) -> str:
    # WORKAROUND (provider keys): KadDHT._encode_key guesses the key format
    # (CID, else hex, else UTF-8), so a name such as "beef" or "cafe01" is
    # silently hex-decoded. We always pass the hex of a sha2-256 multihash of
    # the name: deterministic and what other libp2p implementations expect.
    # test_provider_names_are_hashed.
    return (b"\x12\x20" + hashlib.sha256(name.encode("utf-8")).digest()).hex()


class DhtPart:
    """Kad-DHT operations of ``Libp2pHost`` (each within ``dht_timeout``)."""

    _host: Any
    _dht: KadDHT | None
    _dht_namespaces: dict[str, _GuardedValidator]
    _dht_key_locks: dict[str, trio.Lock]
    _dht_peer_send: trio.MemorySendChannel[ID]
    _dht_peer_recv: trio.MemoryReceiveChannel[ID]
    _dht_pending: set[ID]
    _dht_timeout: float

    def _require_dht(self, key: str | None = None) -> tuple[KadDHT, _GuardedValidator | None]:
        self._require_running()
        if self._dht is None:
            raise LocalError("DHT is disabled on this host")
        if key is None:
            return self._dht, None
        ns = _namespace(key)
        validator = self._dht_namespaces.get(ns)
        if validator is None:
            raise LocalError(f"no validator registered for DHT namespace {ns!r}")
        return self._dht, validator

    async def dht_put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (``/<ns>/<name>``) locally and at the closest peers.

        The namespace validator runs first; whatever it raises propagates.
        Raises ``LocalError`` if a better value is already stored locally and
        ``DhtTimeout`` after ``dht_timeout``.
        """
        dht, validator = self._require_dht(key)
        assert validator is not None
        validator.validate(key, value)
        with trio.move_on_after(self._dht_timeout) as scope:
            try:
                await dht.put_value(key, bytes(value))
            except ValueError as e:  # "Refusing to replace newer value with the older one"
                raise LocalError(f"DHT put for {key} refused: {e}") from e
            except BaseLibp2pError as e:
                raise DhtError(f"DHT put for {key} failed: {e}") from e
        if scope.cancelled_caught:
            raise DhtTimeout(f"DHT put for {key} timed out after {self._dht_timeout:g} s")

    def dht_closest(self, key: str, peer_ids: Iterable[str], count: int) -> list[str]:
        """The ``count`` of ``peer_ids`` closest to ``key`` in the DHT's keyspace
        (XOR of SHA-256 hashes, the measure of upstream's lookups), closest first."""
        ids: dict[ID, str] = {}
        for pid in peer_ids:
            with contextlib.suppress(Exception):  # not a peer id: not a candidate
                ids[ID.from_base58(pid)] = pid
        ranked = upstream.sort_by_distance(key.encode("utf-8"), list(ids))
        return [ids[p] for p in ranked[: max(0, count)]]

    async def dht_put_at(self, key: str, value: bytes, peer_ids: Sequence[str]) -> int:
        """Store ``value`` under ``key`` locally and at exactly ``peer_ids`` (no lookup).

        For a caller that knows the key's closest peers already (``dht_closest``
        over a full membership): upstream's ``put_value`` first looks them up,
        which connects to every peer the lookup asks. Same validation and
        refusals as ``dht_put``; returns how many peers accepted the value
        within ``dht_timeout``.
        """
        dht, validator = self._require_dht(key)
        assert validator is not None
        validator.validate(key, value)
        key_bytes, value = key.encode("utf-8"), bytes(value)
        stored = dht.value_store.get(key_bytes)
        if stored is not None and stored.value != value:
            if validator.select(key, [value, stored.value]) != 0:
                raise LocalError(f"DHT put for {key} refused: a newer value is stored")
        dht.value_store.put(key_bytes, value)
        accepted = 0

        async def store(pid: str) -> None:
            nonlocal accepted
            with contextlib.suppress(Exception):  # best effort, as upstream's put
                if await upstream.store_at_peer(dht, ID.from_base58(pid), key_bytes, value):
                    accepted += 1

        with trio.move_on_after(self._dht_timeout):
            async with trio.open_nursery() as nursery:
                for pid in dict.fromkeys(peer_ids):
                    nursery.start_soon(store, pid)
        return accepted

    async def dht_get(self, key: str) -> bytes | None:
        """Best valid value for ``key`` from the network and our own store, or ``None``.

        Every candidate passes the namespace ``validate`` and the namespace
        ``select`` picks the winner, which is then kept locally. If the network
        lookup times out, the best local value (if any) is returned.
        """
        dht, validator = self._require_dht(key)
        assert validator is not None
        key_bytes = key.encode("utf-8")
        store: dict[bytes, tuple[Any, float]] = dht.value_store.store
        lock = self._dht_key_locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                # WORKAROUND (stale DHT reads): KadDHT.get_value returns the
                # local copy whenever one exists and never asks the network, so
                # a node keeps serving its own stale record forever. Hide the
                # local copy during the lookup, then select among all candidates
                # (local, network, anything PUT to us meanwhile) ourselves.
                # test_dht_get_prefers_newer_network_value.
                hidden = store.pop(key_bytes, None)
                remote: bytes | None = None
                try:
                    with trio.move_on_after(self._dht_timeout):
                        remote = await dht.get_value(key)
                except BaseLibp2pError as e:
                    logger.debug("DHT get for %s failed: %s", key, e)
                finally:
                    best = self._select_and_store(key, validator, store, hidden, remote)
                return best
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._dht_key_locks.pop(key, None)

    def _select_and_store(
        self,
        key: str,
        validator: _GuardedValidator,
        store: dict[bytes, tuple[Any, float]],
        hidden: tuple[Any, float] | None,
        remote: bytes | None,
    ) -> bytes | None:
        """Synchronous (cancellation-safe) merge of the candidates for ``key``."""
        key_bytes = key.encode("utf-8")
        entries: list[tuple[bytes, tuple[Any, float] | None]] = []
        current = store.get(key_bytes)
        for entry in (hidden, current):
            if entry is not None:
                entries.append((bytes(entry[0].value), entry))
        if remote is not None:
            entries.append((remote, None))
        valid: list[tuple[bytes, tuple[Any, float] | None]] = []
        for value, entry in entries:
            try:
                validator.validate(key, value)
            except Exception:
                continue
            valid.append((value, entry))
        if not valid:
            store.pop(key_bytes, None)
            return None
        best_value, best_entry = valid[validator.select(key, [v for v, _ in valid])]
        if best_entry is not None:
            store[key_bytes] = best_entry
        # else: the network value won; get_value() normally stored its record
        # already, and if something else is stored now we leave it (re-putting
        # would re-sign the value as ours).
        return best_value

    async def provide(self, name: str) -> bool:
        """Announce that we provide ``name`` (e.g. ``"hydra/role/exit"``).

        Returns whether at least one other peer accepted the announcement.
        """
        dht, _ = self._require_dht()
        accepted = False
        with trio.move_on_after(self._dht_timeout) as scope:
            try:
                accepted = await dht.provide(_provider_key(name))
            except BaseLibp2pError as e:
                raise DhtError(f"provide {name!r} failed: {e}") from e
        if scope.cancelled_caught:
            raise DhtTimeout(f"provide {name!r} timed out after {self._dht_timeout:g} s")
        return bool(accepted)

    async def find_providers(self, name: str, count: int = 20) -> list[str]:
        """Peer ids announced as providers of ``name`` (their addresses go to the peerstore).

        Upstream answers from the local provider store alone when it holds any
        provider for the key (including ourselves) and only otherwise asks the
        network.
        """
        dht, _ = self._require_dht()
        infos: list[Any] = []
        with trio.move_on_after(self._dht_timeout) as scope:
            try:
                infos = await dht.find_providers(_provider_key(name), count)
            except BaseLibp2pError as e:
                raise DhtError(f"find_providers {name!r} failed: {e}") from e
        if scope.cancelled_caught:
            raise DhtTimeout(f"find_providers {name!r} timed out after {self._dht_timeout:g} s")
        out: list[str] = []
        for info in infos:
            pid = str(info.peer_id)
            if pid not in out:
                out.append(pid)
        return out

    def _on_connected(self, peer: ID) -> None:
        if self._dht is None or peer in self._dht_pending:
            return
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            self._dht_peer_send.send_nowait(peer)
            self._dht_pending.add(peer)

    async def _dht_peer_adder(self) -> None:
        # WORKAROUND (empty routing table): KadDHT adds a peer to its routing
        # table only when that peer opens a DHT stream to us, not when we
        # connect; a node that only dialed or was dialed cannot look anything
        # up. Add every connected peer once identify has told us its listen
        # addresses and protocols. test_dht_put_get_across_hosts.
        async with trio.open_nursery() as nursery:
            async for peer in self._dht_peer_recv:
                nursery.start_soon(self._add_dht_peer, peer)

    async def _add_dht_peer(self, peer: ID) -> None:
        assert self._dht is not None
        peerstore = self._host.get_peerstore()
        try:
            with trio.move_on_after(5.0):
                while True:
                    with contextlib.suppress(Exception):
                        if peerstore.addrs(peer) and peerstore.get_protocols(peer):
                            break
                    await trio.sleep(0.05)
            try:
                await self._dht.add_peer(peer)
            except Exception:
                logger.debug("could not add %s to the DHT routing table", peer, exc_info=True)
        finally:
            self._dht_pending.discard(peer)
