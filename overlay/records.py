"""Signed membership records: the unit of Hydra's membership gossip.

Wire format (docs/protocol.md has the byte-level description):
    record = canonical CBOR map, integer keys
      0 version  uint (=1)            1 node key  bstr 32 (Ed25519)
      2 seq      uint64               3 issued_at uint (unix s)
      4 expires  uint (unix s)        5 kind      uint (0 record, 1 tombstone)
      6 roles    uint bitmask         7 feeds     [1..8 tstr multiaddr]
      8 onion pk bstr 32 (X25519)     9 epoch     uint32
     10 policy   [0..16 tstr rule], sorted, unique
     15 sig      bstr 64: Ed25519 over SIGN_DOMAIN || canonical CBOR of the map without key 15
    A tombstone carries keys 0-5 and 15 only.

Invariants:
- ``decode`` checks the size cap before parsing, accepts only the canonical
  encoding (so one record has exactly one byte string), and raises only
  ``DecodeError`` with a ``Reason``.
- Three steps, each a type: ``decode() -> UnverifiedRecord``,
  ``.verify() -> SignedRecord``, ``.check_valid_at(now) -> ValidRecord``.
  Only ``ValidRecord`` may be stored or forwarded.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import multiaddr

from .crypto import NodeId, OnionPublicKey, SigningKey
from .errors import DecodeError, Expired, InvalidRecord, Reason, Stale
from .wire import cbor

VERSION = 1
MAX_SIZE = 1024
MAX_FEEDS = 8
MAX_FEED_LEN = 128
MAX_POLICY_RULES = 16
MAX_RULE_LEN = 96
CLOCK_SKEW = 120  # seconds a record may be issued "in the future"
MAX_LIFETIME = 7 * 24 * 3600
DEFAULT_TTL = 3600
SIGN_DOMAIN = b"hydra/record/v1\x00"

K_VERSION, K_NODE, K_SEQ, K_ISSUED, K_EXPIRES, K_KIND = 0, 1, 2, 3, 4, 5
K_ROLES, K_FEEDS, K_ONION, K_EPOCH, K_POLICY, K_SIG = 6, 7, 8, 9, 10, 15
_TOMB_KEYS = {K_VERSION, K_NODE, K_SEQ, K_ISSUED, K_EXPIRES, K_KIND, K_SIG}
_FULL_KEYS = _TOMB_KEYS | {K_ROLES, K_FEEDS, K_ONION, K_EPOCH, K_POLICY}

DELIVERY_KINDS = ("smtp", "maildir", "http", "https")
_FEED_FIRST = {"ip4", "ip6", "dns", "dns4", "dns6"}


class Role(enum.IntFlag):
    ENTRY = 1
    RELAY = 2
    EXIT = 4
    STANDBY_EXIT = 8

    @classmethod
    def parse(cls, names: Iterable[str]) -> Role:
        out = cls(0)
        for n in names:
            try:
                out |= cls[n.strip().upper().replace("-", "_")]
            except KeyError:
                raise ValueError(f"unknown role {n!r} (entry, relay, exit, standby-exit)") from None
        return out

    def names(self) -> list[str]:
        return [r.name.lower().replace("_", "-") for r in Role if r in self]


_ALL_ROLES = int(Role.ENTRY | Role.RELAY | Role.EXIT | Role.STANDBY_EXIT)
EXIT_ROLES = Role.EXIT | Role.STANDBY_EXIT  # exits and standbys: what the exit pool watches


class Kind(enum.IntEnum):
    RECORD = 0
    TOMBSTONE = 1


def check_feed(text: str) -> str:
    """Return ``text`` if it is a canonical multiaddr usable as a feed, else raise."""
    if type(text) is not str or not text or len(text) > MAX_FEED_LEN:
        raise DecodeError(Reason.INVALID_MULTIADDR, "feed must be a short text multiaddr")
    try:
        ma = multiaddr.Multiaddr(text)
        protos = [p.name for p in ma.protocols()]
        canonical = str(ma)
        again = str(multiaddr.Multiaddr(ma.to_bytes()))
    except Exception:
        raise DecodeError(Reason.INVALID_MULTIADDR, f"cannot parse {text[:40]!r}") from None
    if canonical != text or again != text:
        raise DecodeError(Reason.INVALID_MULTIADDR, f"not canonical: {text[:40]!r}")
    if not protos or protos[0] not in _FEED_FIRST:
        raise DecodeError(Reason.INVALID_MULTIADDR, "feed must start with an ip/dns component")
    if "tcp" not in protos and "udp" not in protos:
        raise DecodeError(Reason.INVALID_MULTIADDR, "feed has no transport")
    if "p2p" in protos and "p2p-circuit" not in protos:
        raise DecodeError(Reason.INVALID_MULTIADDR, "only relay feeds may name a peer")
    return text


def check_rule(rule: str) -> str:
    if type(rule) is not str or not rule or len(rule) > MAX_RULE_LEN:
        raise DecodeError(Reason.MALFORMED, "policy rule must be short text")
    kind, sep, pattern = rule.partition(":")
    if not sep or kind not in DELIVERY_KINDS or not pattern or not pattern.isprintable():
        raise DecodeError(Reason.MALFORMED, f"bad policy rule {rule[:40]!r}")
    return rule


def policy_allows(policy: Iterable[str], kind: str, destination: str) -> bool:
    """Whether an exit policy serves ``destination`` (an address, host or path) of ``kind``."""
    for rule in policy:
        rk, _, pattern = rule.partition(":")
        if rk == kind and fnmatch.fnmatchcase(destination.lower(), pattern.lower()):
            return True
    return False


@dataclass(frozen=True, slots=True)
class UnverifiedRecord:
    """Parsed and well-formed, signature not yet checked."""

    node_id: NodeId
    seq: int
    issued_at: int
    expires_at: int
    kind: Kind = Kind.RECORD
    roles: Role = Role(0)
    feeds: tuple[str, ...] = ()
    onion_key: OnionPublicKey | None = None
    onion_epoch: int = 0
    exit_policy: tuple[str, ...] = ()
    signature: bytes = b""
    version: int = VERSION

    @property
    def is_tombstone(self) -> bool:
        return self.kind is Kind.TOMBSTONE

    def body_map(self) -> dict:
        m = {
            K_VERSION: self.version,
            K_NODE: bytes(self.node_id),
            K_SEQ: self.seq,
            K_ISSUED: self.issued_at,
            K_EXPIRES: self.expires_at,
            K_KIND: int(self.kind),
        }
        if not self.is_tombstone:
            m[K_ROLES] = int(self.roles)
            m[K_FEEDS] = list(self.feeds)
            m[K_ONION] = bytes(self.onion_key)
            m[K_EPOCH] = self.onion_epoch
            m[K_POLICY] = list(self.exit_policy)
        return m

    def signing_input(self) -> bytes:
        return SIGN_DOMAIN + cbor.dumps(self.body_map())

    def encode(self) -> bytes:
        m = self.body_map()
        m[K_SIG] = self.signature
        return cbor.dumps(m)

    def verify(self) -> SignedRecord:
        """Check the signature; raise ``BadSignature`` if it is not the node key's."""
        self.node_id.verify(self.signing_input(), self.signature)
        return SignedRecord(**_fields(self))

    def summary(self) -> dict:
        d = {
            "node_id": self.node_id.hex(),
            "peer_id": self.node_id.peer_id(),
            "seq": self.seq,
            "kind": self.kind.name.lower(),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }
        if not self.is_tombstone:
            d.update(
                roles=self.roles.names(),
                feeds=list(self.feeds),
                onion_key=bytes(self.onion_key).hex(),
                onion_epoch=self.onion_epoch,
                exit_policy=list(self.exit_policy),
            )
        return d


def _fields(rec: UnverifiedRecord) -> dict:
    return {f.name: getattr(rec, f.name) for f in dataclasses.fields(UnverifiedRecord)}


@dataclass(frozen=True, slots=True)
class SignedRecord(UnverifiedRecord):
    """Signature checked; freshness not yet checked."""

    def check_valid_at(self, now: float, skew: int = CLOCK_SKEW) -> ValidRecord:
        if self.issued_at > now + skew:
            raise InvalidRecord(Reason.FUTURE, f"issued {int(self.issued_at - now)} s ahead")
        if self.expires_at <= now:
            raise Expired(detail=f"expired {int(now - self.expires_at)} s ago")
        return ValidRecord(**_fields(self))


@dataclass(frozen=True, slots=True)
class ValidRecord(SignedRecord):
    """Parsed, signed by its node key and fresh at the time it was checked."""

    def supersedes(self, other: UnverifiedRecord | None) -> bool:
        return other is None or self.seq > other.seq

    def dangerously_refresh(self) -> ValidRecord:  # pragma: no cover - tests only
        return self


def decode(data: bytes) -> UnverifiedRecord:
    """Parse a record; raise ``DecodeError`` unless ``data`` is a canonical, well-formed record."""
    raw = cbor.loads_versioned(data, MAX_SIZE, VERSION, "record")
    kind_v = raw.get(K_KIND)
    if kind_v not in (0, 1) or type(kind_v) is not int:
        raise DecodeError(Reason.MALFORMED, "bad kind")
    kind = Kind(kind_v)
    if kind is Kind.TOMBSTONE:
        cbor.expect_map(raw, _TOMB_KEYS)
    else:
        cbor.expect_map(raw, _FULL_KEYS)
    node_id = NodeId(cbor.bstr(raw[K_NODE], "node key", 32))
    seq = cbor.uint(raw[K_SEQ], "seq")
    issued = cbor.uint(raw[K_ISSUED], "issued_at")
    expires = cbor.uint(raw[K_EXPIRES], "expires_at")
    if expires <= issued or expires - issued > MAX_LIFETIME:
        raise DecodeError(Reason.MALFORMED, "lifetime must be in (0, 7 days]")
    sig = cbor.bstr(raw[K_SIG], "signature", 64)
    if kind is Kind.TOMBSTONE:
        return UnverifiedRecord(node_id, seq, issued, expires, kind, signature=sig)
    roles_v = cbor.uint(raw[K_ROLES], "roles", 8)
    if roles_v & ~_ALL_ROLES or roles_v == 0:
        raise DecodeError(Reason.MALFORMED, "unknown or empty roles")
    roles = Role(roles_v)
    feeds_v = raw[K_FEEDS]
    if type(feeds_v) is not list or not feeds_v:
        raise DecodeError(Reason.MALFORMED, "feeds must be a non-empty array")
    if len(feeds_v) > MAX_FEEDS:
        raise DecodeError(Reason.TOO_MANY_FEEDS, f"{len(feeds_v)} > {MAX_FEEDS}")
    feeds = tuple(check_feed(f) for f in feeds_v)
    if len(set(feeds)) != len(feeds):
        raise DecodeError(Reason.MALFORMED, "duplicate feeds")
    onion = OnionPublicKey(cbor.bstr(raw[K_ONION], "onion key", 32))
    epoch = cbor.uint(raw[K_EPOCH], "epoch", 32)
    policy_v = cbor.array(raw[K_POLICY], "exit policy", MAX_POLICY_RULES)
    policy = tuple(check_rule(r) for r in policy_v)
    if list(policy) != sorted(set(policy)):
        raise DecodeError(Reason.MALFORMED, "policy rules must be sorted and unique")
    exitish = bool(roles & EXIT_ROLES)
    if exitish != bool(policy):
        raise DecodeError(
            Reason.ROLE_POLICY_MISMATCH,
            "exits need a policy" if exitish else "non-exits must have an empty policy",
        )
    return UnverifiedRecord(
        node_id, seq, issued, expires, kind, roles, feeds, onion, epoch, policy, sig
    )


def validate(
    data: bytes, now: float, known_seq: int | None = None, skew: int = CLOCK_SKEW
) -> ValidRecord:
    """Decode, verify, check freshness and (optionally) that ``seq`` beats ``known_seq``."""
    rec = decode(data).verify().check_valid_at(now, skew)
    if known_seq is not None and rec.seq <= known_seq:
        raise Stale(detail=f"seq {rec.seq} <= known {known_seq}")
    return rec


def make_record(
    key: SigningKey,
    *,
    seq: int,
    now: float,
    roles: Role,
    feeds: Iterable[str],
    onion_key: OnionPublicKey,
    onion_epoch: int,
    exit_policy: Iterable[str] = (),
    ttl: int = DEFAULT_TTL,
) -> ValidRecord:
    """Build and sign a record; raises ``DecodeError`` if the result would not decode."""
    issued = int(now)
    rec = UnverifiedRecord(
        key.node_id,
        seq,
        issued,
        issued + ttl,
        Kind.RECORD,
        Role(roles),
        tuple(feeds),
        onion_key,
        onion_epoch,
        tuple(sorted(set(exit_policy))),
    )
    return _sign(key, rec, now)


def make_tombstone(
    key: SigningKey, *, seq: int, now: float, ttl: int = MAX_LIFETIME
) -> ValidRecord:
    issued = int(now)
    return _sign(key, UnverifiedRecord(key.node_id, seq, issued, issued + ttl, Kind.TOMBSTONE), now)


def _sign(key: SigningKey, rec: UnverifiedRecord, now: float) -> ValidRecord:
    signed = dataclasses.replace(rec, signature=key.sign(rec.signing_input()))
    # round-trip through the decoder so we never publish what peers would reject
    return decode(signed.encode()).verify().check_valid_at(now)
