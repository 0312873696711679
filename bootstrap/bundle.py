"""Seed bundle: a signed, expiring list of entry peers, co-signed by k of n operators.

Wire format (``VERSION`` 1; byte-level description in docs/operator.md): one
canonical CBOR map (the strict subset of ``overlay.wire.cbor``, shared with every
wire format) with integer keys::

    0 version     uint, == 1
    1 seq         uint64, grows with every new bundle from the same operators
    2 issued_at   uint, unix seconds
    3 expires_at  uint, unix seconds, issued_at < expires_at <= issued_at + MAX_VALIDITY
    4 peers       array (1..MAX_PEERS) of maps {0: peer key (bstr 32, Ed25519),
                  1: array (1..MAX_ADDRS) of multiaddr text strings}; peer keys unique
    5 operators   array (1..MAX_OPERATORS) of bstr 32 (Ed25519 keys), strictly ascending
    6 threshold   uint, 1 <= threshold <= len(operators)
    7 signatures  map bstr 32 (signer key) -> bstr 64 (Ed25519 signature), may be empty

Every signature covers ``SIGNING_DOMAIN || canonical CBOR of the map without
key 7``, so operators co-sign one body independently and adding a signature
never invalidates another.

Three steps, as for membership records (design principle 5):
``decode(raw) -> UnverifiedBundle``; ``.verify(pinned, k) -> VerifiedBundle``;
``.check_valid_at(now) -> ValidBundle``. Only a ``ValidBundle`` should be
used to join. Shortcuts are named ``dangerously_*`` and belong in tests.

Invariants:
- ``decode`` checks the size before parsing and raises only ``DecodeError``;
  it accepts exactly the bytes ``encode`` produces (canonical, no unknown keys);
- verification raises ``BadSignature`` (reason ``under_signed``,
  ``unknown_operator`` or ``bad_signature``), never returns a bool;
- freshness raises ``Expired`` or ``InvalidRecord(issued_in_future)``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from overlay.crypto import NodeId, SigningKey
from overlay.errors import (
    BadSignature,
    DecodeError,
    Expired,
    InvalidRecord,
    LocalError,
    Reason,
)
from overlay.wire.cbor import dumps as _dumps
from overlay.wire.cbor import loads_canonical

VERSION = 1
MAX_SIZE = 32 * 1024
MAX_PEERS = 64
MAX_ADDRS = 8
MAX_OPERATORS = 16
MAX_SIGNATURES = 32
MAX_JOIN_ADDR = 247  # "dnsaddr=" + addr must fit one 255-byte TXT string
MAX_VALIDITY = 400 * 86400
U64_MAX = 2**64 - 1
DEFAULT_SKEW = 300  # seconds of clock skew tolerated for issued_at
SIGNING_DOMAIN = b"hydra/seed-bundle/v1\x00"
MEDIA_TYPE = "application/cbor"

# field keys
K_VERSION, K_SEQ, K_ISSUED, K_EXPIRES, K_PEERS, K_OPERATORS, K_THRESHOLD, K_SIGS = range(8)
E_PEER, E_ADDRS = 0, 1
_BODY_KEYS = {K_VERSION, K_SEQ, K_ISSUED, K_EXPIRES, K_PEERS, K_OPERATORS, K_THRESHOLD}

# Printable multiaddr characters that are safe inside a quoted zone-file string.
_ADDR_RE = re.compile(r"^(/[A-Za-z0-9._~:%+=@,\-]+)+$")


def addr_problem(addr: object, peer: NodeId) -> str | None:
    if type(addr) is not str:
        return "multiaddr is not a text string"
    if len(addr) > MAX_JOIN_ADDR:  # before any parsing: base58 decoding is quadratic
        return "multiaddr too long"
    if not _ADDR_RE.match(addr):
        return f"invalid multiaddr {addr[:60]!r}"
    parts = addr.split("/")
    if len(parts) >= 3 and parts[-2] in ("p2p", "ipfs"):
        try:
            if NodeId.from_peer_id(parts[-1]) != peer:
                return "multiaddr ends in another peer's /p2p/ id"
        except ValueError:
            return "multiaddr ends in an invalid /p2p/ id"
    if len(_join_addr(addr, peer)) > MAX_JOIN_ADDR:
        return "multiaddr too long"
    return None


def _join_addr(addr: str, peer: NodeId) -> str:
    parts = addr.split("/")
    if len(parts) >= 3 and parts[-2] in ("p2p", "ipfs"):
        return addr
    return f"{addr}/p2p/{peer.peer_id()}"


def strip_own_p2p(addr: str, peer: NodeId) -> str:
    """Drop a trailing ``/p2p/<peer>`` (the canonical stored form is /p2p/-less)."""
    suffix = f"/p2p/{peer.peer_id()}"
    return addr[: -len(suffix)] if addr.endswith(suffix) else addr


@dataclass(frozen=True)
class Entry:
    """One entry peer: its Ed25519 key (= libp2p peer id) and its multiaddrs."""

    peer: NodeId
    addrs: tuple[str, ...]

    def join_addrs(self) -> list[str]:
        """Full multiaddrs ending in ``/p2p/<peer id>``, in the bundle's order."""
        return [_join_addr(a, self.peer) for a in self.addrs]


def _as_node_id(key: NodeId | bytes) -> NodeId:
    return key if isinstance(key, NodeId) else NodeId(bytes(key))


@dataclass(frozen=True)
class SeedBundle:
    """The content of a bundle. Plain data: it says nothing about trust.

    Build one with ``SeedBundle.create`` (raises ``LocalError``), get one from
    ``decode`` (raises ``DecodeError``). ``signatures`` is keyed by signer.
    """

    seq: int
    issued_at: int
    expires_at: int
    entries: tuple[Entry, ...]
    operators: tuple[NodeId, ...]
    threshold: int
    signatures: Mapping[NodeId, bytes] = field(default_factory=dict, hash=False)
    version: int = VERSION

    @classmethod
    def create(
        cls,
        *,
        seq: int,
        issued_at: int,
        expires_at: int,
        entries: Iterable[Entry],
        operators: Iterable[NodeId | bytes],
        threshold: int,
    ) -> SeedBundle:
        """A new unsigned bundle; operators are sorted. Raises ``LocalError`` if invalid."""
        b = cls(
            seq=seq,
            issued_at=issued_at,
            expires_at=expires_at,
            entries=tuple(
                Entry(e.peer, tuple(strip_own_p2p(a, e.peer) for a in e.addrs)) for e in entries
            ),
            operators=tuple(sorted({_as_node_id(k) for k in operators})),
            threshold=threshold,
            signatures={},
        )
        problem = _problem(b)
        if problem:
            raise LocalError(f"invalid seed bundle: {problem}")
        return b

    # ---- encoding ------------------------------------------------------------

    def _body(self) -> dict[int, Any]:
        return {
            K_VERSION: self.version,
            K_SEQ: self.seq,
            K_ISSUED: self.issued_at,
            K_EXPIRES: self.expires_at,
            K_PEERS: [{E_PEER: bytes(e.peer), E_ADDRS: list(e.addrs)} for e in self.entries],
            K_OPERATORS: [bytes(k) for k in self.operators],
            K_THRESHOLD: self.threshold,
        }

    def signing_message(self) -> bytes:
        """What every operator signs: the domain tag, then the body without signatures."""
        return SIGNING_DOMAIN + _dumps(self._body())

    def encode(self) -> bytes:
        body = self._body()
        body[K_SIGS] = {bytes(k): bytes(v) for k, v in self.signatures.items()}
        data = _dumps(body)
        if len(data) > MAX_SIZE:
            raise LocalError(f"seed bundle is {len(data)} bytes, over MAX_SIZE {MAX_SIZE}")
        return data

    # ---- signing ---------------------------------------------------------------

    def signed_by(self, key: SigningKey) -> SeedBundle:
        """A copy with ``key``'s signature added (or replaced). Others stay valid."""
        sigs = dict(self.signatures)
        sigs[key.node_id] = key.sign(self.signing_message())
        if len(sigs) > MAX_SIGNATURES:
            raise LocalError(f"a bundle carries at most {MAX_SIGNATURES} signatures")
        return SeedBundle(
            seq=self.seq,
            issued_at=self.issued_at,
            expires_at=self.expires_at,
            entries=self.entries,
            operators=self.operators,
            threshold=self.threshold,
            signatures=sigs,
            version=self.version,
        )

    def valid_signers(self) -> tuple[frozenset[NodeId], frozenset[NodeId]]:
        """(keys whose signature verifies, keys whose signature does not)."""
        msg = self.signing_message()
        good: set[NodeId] = set()
        bad: set[NodeId] = set()
        for key, sig in self.signatures.items():
            try:
                key.verify(msg, sig)
            except BadSignature:
                bad.add(key)
            else:
                good.add(key)
        return frozenset(good), frozenset(bad)

    # ---- convenience -----------------------------------------------------------

    def join_addrs(self) -> list[str]:
        """Every entry's full multiaddrs (``.../p2p/<peer id>``), entry by entry."""
        return [a for e in self.entries for a in e.join_addrs()]


def digest(raw: bytes) -> bytes:
    """BLAKE2b-256 of the encoded bundle: names one exact bundle (ETag, DNS chunks)."""
    return hashlib.blake2b(raw, digest_size=32, person=b"hydra-seeds").digest()


def etag(raw: bytes) -> str:
    """The strong HTTP ETag the server sends and the client sends back."""
    return '"' + digest(raw)[:16].hex() + '"'


# ---- validation --------------------------------------------------------------


def _is_uint(v: object, limit: int = U64_MAX) -> bool:
    return type(v) is int and 0 <= v <= limit


def _problem(b: SeedBundle) -> str | None:
    """Why ``b`` breaks a structural rule, or None. Shared by create and decode."""
    if type(b.version) is not int or b.version != VERSION:
        return f"unknown version {b.version}"
    for name in ("seq", "issued_at", "expires_at", "threshold"):
        if not _is_uint(getattr(b, name)):
            return f"{name} must be a uint64"
    if not b.issued_at < b.expires_at <= b.issued_at + MAX_VALIDITY:
        return "expires_at must be after issued_at and within MAX_VALIDITY"
    if not 1 <= len(b.entries) <= MAX_PEERS:
        return f"a bundle lists 1..{MAX_PEERS} peers"
    seen: set[NodeId] = set()
    for e in b.entries:
        if e.peer in seen:
            return "duplicate peer"
        seen.add(e.peer)
        if not 1 <= len(e.addrs) <= MAX_ADDRS:
            return f"a peer has 1..{MAX_ADDRS} multiaddrs"
        if len(set(e.addrs)) != len(e.addrs):
            return "duplicate multiaddr"
        for a in e.addrs:
            p = addr_problem(a, e.peer)
            if p:
                return p
    if not 1 <= len(b.operators) <= MAX_OPERATORS:
        return f"a bundle names 1..{MAX_OPERATORS} operators"
    if list(b.operators) != sorted(set(b.operators)):
        return "operators must be strictly ascending"
    if not 1 <= b.threshold <= len(b.operators):
        return "threshold must be between 1 and the number of operators"
    if len(b.signatures) > MAX_SIGNATURES:
        return "too many signatures"
    for sig in b.signatures.values():
        if type(sig) is not bytes or len(sig) != 64:
            return "signature must be 64 bytes"
    return None


def _map(v: object, required: set[int], what: str) -> dict:
    if type(v) is not dict:
        raise DecodeError(Reason.MALFORMED, f"{what}: expected a map")
    keys = set(v)
    if keys != required:
        extra = keys - required
        if extra:
            raise DecodeError(Reason.MALFORMED, f"{what}: unknown keys")
        raise DecodeError(Reason.MALFORMED, f"{what}: missing keys {sorted(required - keys)}")
    return v


def _key32(v: object, what: str) -> NodeId:
    if type(v) is not bytes or len(v) != 32:
        raise DecodeError(Reason.MALFORMED, f"{what}: expected 32 bytes")
    return NodeId(v)


def decode(data: bytes) -> UnverifiedBundle:
    """Parse and structurally check a bundle. Raises only ``DecodeError``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(Reason.MALFORMED, "input is not bytes")
    data = bytes(data)
    top = loads_canonical(data, MAX_SIZE)  # size cap, strict subset, canonical form
    if type(top) is dict and K_VERSION in top and top[K_VERSION] != VERSION:
        raise DecodeError(Reason.UNKNOWN_VERSION, f"version {top[K_VERSION]!r:.40}")
    top = _map(top, _BODY_KEYS | {K_SIGS}, "bundle")
    peers = top[K_PEERS]
    if type(peers) is not list or len(peers) > MAX_PEERS:
        raise DecodeError(Reason.MALFORMED, "peers: expected a short array")
    entries = []
    for p in peers:
        p = _map(p, {E_PEER, E_ADDRS}, "peer")
        addrs = p[E_ADDRS]
        if type(addrs) is not list or len(addrs) > MAX_ADDRS:
            raise DecodeError(Reason.MALFORMED, "addrs: expected a short array")
        if not all(type(a) is str for a in addrs):
            raise DecodeError(Reason.MALFORMED, "addrs: multiaddrs must be text strings")
        entries.append(Entry(_key32(p[E_PEER], "peer"), tuple(addrs)))
    ops = top[K_OPERATORS]
    if type(ops) is not list or len(ops) > MAX_OPERATORS:
        raise DecodeError(Reason.MALFORMED, "operators: expected a short array")
    sigs = top[K_SIGS]
    if type(sigs) is not dict or len(sigs) > MAX_SIGNATURES:
        raise DecodeError(Reason.MALFORMED, "signatures: expected a short map")
    bundle = SeedBundle(
        version=top[K_VERSION],
        seq=top[K_SEQ],
        issued_at=top[K_ISSUED],
        expires_at=top[K_EXPIRES],
        entries=tuple(entries),
        operators=tuple(_key32(k, "operator") for k in ops),
        threshold=top[K_THRESHOLD],
        signatures={_key32(k, "signer"): v for k, v in sigs.items()},
    )
    problem = _problem(bundle)
    if problem:
        raise DecodeError(Reason.MALFORMED, problem)
    if bundle.encode() != data:
        raise DecodeError(Reason.NON_CANONICAL, "not the canonical CBOR encoding")
    return UnverifiedBundle(bundle, data)


def encode(bundle: SeedBundle) -> bytes:
    return bundle.encode()


# ---- the three stages ------------------------------------------------------------


class _View:
    """Read access shared by the three stages."""

    __slots__ = ("bundle", "raw")

    bundle: SeedBundle
    raw: bytes

    @property
    def seq(self) -> int:
        return self.bundle.seq

    @property
    def issued_at(self) -> int:
        return self.bundle.issued_at

    @property
    def expires_at(self) -> int:
        return self.bundle.expires_at

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self.bundle.entries

    @property
    def operators(self) -> tuple[NodeId, ...]:
        return self.bundle.operators

    @property
    def threshold(self) -> int:
        return self.bundle.threshold

    def join_addrs(self) -> list[str]:
        return self.bundle.join_addrs()

    def digest(self) -> bytes:
        return digest(self.raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seq={self.seq}, peers={len(self.entries)})"


def pinned_set(operators: Iterable[NodeId | bytes], threshold: int) -> frozenset[NodeId]:
    """Check a caller's pinned operator configuration; raises ``LocalError``."""
    try:
        keys = frozenset(_as_node_id(k) for k in operators)
    except ValueError as e:
        raise LocalError(f"pinned operator key: {e}") from None
    if not keys:
        raise LocalError("no operator keys pinned")
    if not 1 <= threshold <= len(keys):
        raise LocalError(f"threshold {threshold} not in 1..{len(keys)} pinned operators")
    return keys


class UnverifiedBundle(_View):
    """Decoded, structurally valid, signatures not checked."""

    __slots__ = ()

    def __init__(self, bundle: SeedBundle, raw: bytes) -> None:
        self.bundle = bundle
        self.raw = raw

    def verify(self, operators: Iterable[NodeId | bytes], threshold: int) -> VerifiedBundle:
        """Require >= ``threshold`` valid signatures from the caller's pinned ``operators``.

        The bundle must also carry >= its own ``threshold`` valid signatures from
        its own operator set (operators agreed on it by their own rule).
        Signatures by other keys are ignored. Raises ``BadSignature`` with reason
        ``bad_signature`` (a pinned key's signature does not verify: tampered),
        ``unknown_operator`` (signed only by keys nobody pinned) or ``under_signed``.
        """
        pinned = pinned_set(operators, threshold)
        good, bad = self.bundle.valid_signers()
        trusted = good & pinned
        if len(trusted) < threshold:
            if bad & pinned:
                raise BadSignature(
                    Reason.BAD_SIGNATURE,
                    f"{len(bad & pinned)} pinned operator signature(s) do not verify",
                )
            if good and not trusted:
                raise BadSignature(Reason.UNKNOWN_OPERATOR, "signed only by keys not pinned")
            raise BadSignature(
                Reason.UNDER_SIGNED, f"{len(trusted)} of {threshold} required pinned signatures"
            )
        own = good & set(self.bundle.operators)
        if len(own) < self.bundle.threshold:
            raise BadSignature(
                Reason.UNDER_SIGNED,
                f"{len(own)} of the {self.bundle.threshold} signatures its own operator set requires",
            )
        return VerifiedBundle(self.bundle, self.raw, trusted)

    def dangerously_assume_verified(self) -> VerifiedBundle:
        """Skip signature checks. Tests only."""
        return VerifiedBundle(self.bundle, self.raw, frozenset())


class VerifiedBundle(_View):
    """Signed by enough pinned operators; freshness not yet checked."""

    __slots__ = ("signers",)

    def __init__(self, bundle: SeedBundle, raw: bytes, signers: frozenset[NodeId]) -> None:
        self.bundle = bundle
        self.raw = raw
        self.signers = signers

    def check_valid_at(self, now: float, *, skew: float = DEFAULT_SKEW) -> ValidBundle:
        """Raise ``Expired`` at or after ``expires_at``, ``InvalidRecord(issued_in_future)``
        if issued more than ``skew`` seconds ahead of ``now``."""
        if now >= self.bundle.expires_at:
            raise Expired(Reason.EXPIRED, f"expired at {self.bundle.expires_at}")
        if self.bundle.issued_at > now + skew:
            raise InvalidRecord(Reason.FUTURE, f"issued at {self.bundle.issued_at}")
        return ValidBundle(self.bundle, self.raw, self.signers)

    def dangerously_assume_valid(self) -> ValidBundle:
        """Skip the freshness check. Tests only."""
        return ValidBundle(self.bundle, self.raw, self.signers)


class ValidBundle(VerifiedBundle):
    """Verified and fresh: usable to join."""

    __slots__ = ()
