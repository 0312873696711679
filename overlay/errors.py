"""Error tree for Hydra, split by blame.

``OverlayError`` -> ``LocalError`` (our own misuse or environment)
                 -> ``RemoteError`` (a peer or file sent something bad: penalise/drop)

Every ``RemoteError`` carries a ``Reason`` whose ``value`` is a stable
snake_case string used in logs, metrics labels and CLI output.
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    """Why an input was rejected. Values are stable: metrics and scripts use them."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    NON_CANONICAL = "non_canonical"
    UNKNOWN_VERSION = "unknown_version"
    BAD_SIGNATURE = "bad_signature"
    STALE_SEQ = "stale_seq"
    EXPIRED = "expired"
    FUTURE = "issued_in_future"
    TOO_MANY_FEEDS = "too_many_feeds"
    INVALID_MULTIADDR = "invalid_multiaddr"
    ROLE_POLICY_MISMATCH = "role_policy_mismatch"
    # seed bundles
    UNDER_SIGNED = "under_signed"
    UNKNOWN_OPERATOR = "unknown_operator"
    ROLLED_BACK = "rolled_back"
    # onion packets
    BAD_MAC = "bad_mac"
    REPLAY = "replay"
    UNKNOWN_EPOCH = "unknown_epoch"
    # transport / rate limiting
    RATE_LIMITED = "rate_limited"
    POLICY_DENIED = "policy_denied"
    # strict decoding (wire/cbor.py)
    UNSUPPORTED_TYPE = "unsupported_type"  # CBOR tags, floats, simple values, indefinite lengths
    TOO_DEEP = "too_deep"  # nesting or item count beyond the decoder's bound
    # admission of new members (core/admission.py)
    ADMISSION_LIMIT = "admission_limit"  # too many new identities, from this source or at all
    TABLE_FULL = "table_full"  # the bounded table of unverified members is full
    # connection and stream bounds (net/)
    CONNECTION_LIMIT = "connection_limit"
    BANNED = "banned"
    IDLE_TIMEOUT = "idle_timeout"
    # relay bounds (relay.py)
    UNKNOWN_NEXT_HOP = "unknown_next_hop"
    LINK_LIMIT = "link_limit"
    CLIENT_LIMIT = "client_limit"
    # control endpoint
    UNAUTHORIZED = "unauthorized"


class OverlayError(Exception):
    """Root of every error Hydra raises on purpose."""


class LocalError(OverlayError):
    """We misused an API or the local environment is wrong (missing home, bad config)."""


class ConfigError(LocalError):
    """The node home or config file is missing or invalid."""


class RemoteError(OverlayError):
    """Input from outside (a peer, a file, a seed source) is unacceptable."""

    default_reason: Reason = Reason.MALFORMED

    def __init__(self, reason: Reason | None = None, detail: str = "") -> None:
        self.reason = reason or self.default_reason
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)


class DecodeError(RemoteError):
    """Bytes that are not the canonical encoding of a well-formed value."""

    default_reason = Reason.MALFORMED


class BadSignature(RemoteError):
    default_reason = Reason.BAD_SIGNATURE


class Expired(RemoteError):
    default_reason = Reason.EXPIRED


class Stale(RemoteError):
    default_reason = Reason.STALE_SEQ


class Replay(RemoteError):
    default_reason = Reason.REPLAY


class InvalidRecord(RemoteError):
    """A well-formed, signed value whose content breaks a rule (future, feeds, policy)."""
