"""Liveness frames (stream protocol ``/hydra/liveness/1``, gossip topic ``hydra/liveness``).

Wire format: one canonical CBOR map per frame, small integer keys::

    0 version  uint (=1)
    1 type     uint: 0 ping, 1 ack, 2 ping-req, 3 suspect, 4 alive, 5 dead, 6 nack,
                     7 dead-req (no other keys)
    2 nonce    uint64                ping, ack, ping-req, nack
    3 subject  bstr 32 (NodeId)      ping-req (the node to probe), suspect/dead
                                     (the accused), alive (the refuting node)
    4 inc      uint64 incarnation    suspect, alive, dead
    5 observer bstr 32 (NodeId)      suspect, dead: the accuser, who signs
    6 ts       uint64 milliseconds   suspect, alive, dead: the signer's own clock
   15 sig      bstr 64               suspect, alive, dead: Ed25519 by the observer
                                     (suspect, dead) or the subject (alive) over
                                     SIGN_DOMAIN || canonical CBOR of the map
                                     without key 15

Ping, Ack, PingReq, Nack and DeadReq travel on direct (Noise-authenticated)
streams and are unsigned; the transport tells the receiver who sent them. Suspect, Alive and
Dead are statements about a third party and are gossiped, so each carries the
signature of the node that makes the statement. ``ts`` is never compared with
the receiver's clock (nodes may pass a monotonic clock); it only orders one
signer's statements and makes each signature distinct.

Invariants:
- ``decode`` caps the size before parsing, accepts only the canonical
  encoding with exactly the keys of its type, and raises only ``DecodeError``;
- ``decode(encode(f)) == f`` for every frame built by this module;
- ``decode`` never checks signatures: ``Signed.verify()`` (or the caller's
  verifier over ``signing_input()``) is the second, separate step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..crypto import NodeId
from ..errors import DecodeError, Reason
from . import cbor

VERSION = 1
MAX_SIZE = 256  # the largest frames (signed Suspect, Dead) are 162 bytes
SIGN_DOMAIN = b"hydra/liveness/v1\x00"
SIG_SIZE = 64

T_PING, T_ACK, T_PING_REQ, T_SUSPECT, T_ALIVE, T_DEAD, T_NACK, T_DEAD_REQ = range(8)
K_VERSION, K_TYPE, K_NONCE, K_SUBJECT, K_INC, K_OBSERVER, K_TS, K_SIG = 0, 1, 2, 3, 4, 5, 6, 15

_BASE = {K_VERSION, K_TYPE}
_KEYS = {
    T_PING: _BASE | {K_NONCE},
    T_ACK: _BASE | {K_NONCE},
    T_NACK: _BASE | {K_NONCE},
    T_DEAD_REQ: _BASE,
    T_PING_REQ: _BASE | {K_NONCE, K_SUBJECT},
    T_SUSPECT: _BASE | {K_SUBJECT, K_INC, K_OBSERVER, K_TS, K_SIG},
    T_ALIVE: _BASE | {K_SUBJECT, K_INC, K_TS, K_SIG},
    T_DEAD: _BASE | {K_SUBJECT, K_INC, K_OBSERVER, K_TS, K_SIG},
}
_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you there? The receiver answers ``Ack(nonce)`` to the sender."""

    nonce: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to ``Ping(nonce)``, or relayed answer to ``PingReq(_, nonce)``."""

    nonce: int


@dataclass(frozen=True, slots=True)
class Nack:
    """A relay asked by ``PingReq(_, nonce)`` got no answer from the target in time.

    Tells the requester its own link works (Lifeguard: only missing nacks make a
    node doubt its own health)."""

    nonce: int


@dataclass(frozen=True, slots=True)
class PingReq:
    """Please ping ``target`` for me and send me ``Ack(nonce)`` if it answers."""

    target: NodeId
    nonce: int


@dataclass(frozen=True, slots=True)
class DeadReq:
    """Send me your signed statements about the members you hold dead.

    Asked by a node that has just started (it holds every member alive until it
    learns otherwise) and now and then by every node, so that deaths announced
    while it was away or cut off reach it. The answer is a series of ordinary
    ``Dead``/``Suspect`` frames on the same stream."""


@dataclass(frozen=True, slots=True)
class _Signed:
    def _body(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def signer(self) -> NodeId:  # pragma: no cover - overridden
        raise NotImplementedError

    def signing_input(self) -> bytes:
        return SIGN_DOMAIN + cbor.dumps(self._body())

    def verify(self) -> None:
        """Raise ``BadSignature`` unless ``signer`` signed this statement."""
        self.signer.verify(self.signing_input(), self.signature)  # type: ignore[attr-defined]

    def signed_with(self, sign: Callable[[bytes], bytes]):
        """A copy carrying ``sign(signing_input())`` as its signature."""
        return dataclasses.replace(self, signature=sign(self.signing_input()))


@dataclass(frozen=True, slots=True)
class _Accusation(_Signed):
    """A statement by ``observer`` about ``subject`` at ``incarnation`` (signed by the observer)."""

    subject: NodeId
    incarnation: int
    observer: NodeId
    ts: int
    signature: bytes = b""
    TYPE: ClassVar[int]

    @property
    def signer(self) -> NodeId:
        return self.observer

    def _body(self) -> dict:
        return {
            K_VERSION: VERSION,
            K_TYPE: self.TYPE,
            K_SUBJECT: bytes(self.subject),
            K_INC: self.incarnation,
            K_OBSERVER: bytes(self.observer),
            K_TS: self.ts,
        }


@dataclass(frozen=True, slots=True)
class Suspect(_Accusation):
    """``observer`` could not reach ``subject`` (at incarnation ``incarnation``)."""

    TYPE: ClassVar[int] = T_SUSPECT


@dataclass(frozen=True, slots=True)
class Dead(_Accusation):
    """``observer`` declared ``subject`` dead (at ``incarnation``) after its suspicion timed out."""

    TYPE: ClassVar[int] = T_DEAD


@dataclass(frozen=True, slots=True)
class Alive(_Signed):
    """``subject`` is alive at ``incarnation``: refutes every accusation at a lower one."""

    subject: NodeId
    incarnation: int
    ts: int
    signature: bytes = b""

    @property
    def signer(self) -> NodeId:
        return self.subject

    def _body(self) -> dict:
        return {
            K_VERSION: VERSION,
            K_TYPE: T_ALIVE,
            K_SUBJECT: bytes(self.subject),
            K_INC: self.incarnation,
            K_TS: self.ts,
        }


Accusation = Suspect | Dead
Signed = Suspect | Dead | Alive
Frame = Ping | Ack | Nack | PingReq | DeadReq | Suspect | Alive | Dead
_NONCE_ONLY = {Ping: T_PING, Ack: T_ACK, Nack: T_NACK}


def encode(frame: Frame) -> bytes:
    """Canonical bytes of ``frame``; signed frames must carry their 64-byte signature."""
    t = _NONCE_ONLY.get(type(frame))
    if t is not None:
        return cbor.dumps({K_VERSION: VERSION, K_TYPE: t, K_NONCE: frame.nonce})
    if isinstance(frame, DeadReq):
        return cbor.dumps({K_VERSION: VERSION, K_TYPE: T_DEAD_REQ})
    if isinstance(frame, PingReq):
        return cbor.dumps(
            {K_VERSION: VERSION, K_TYPE: T_PING_REQ, K_NONCE: frame.nonce,
             K_SUBJECT: bytes(frame.target)}
        )  # fmt: skip
    m = frame._body()
    m[K_SIG] = frame.signature
    return cbor.dumps(m)


def decode(data: bytes) -> Frame:
    """Parse one frame; raise ``DecodeError`` unless ``data`` is canonical and well-formed.

    Signatures are *not* checked here (see ``Signed.verify``).
    """
    raw = cbor.loads_versioned(data, MAX_SIZE, VERSION, "liveness frame")
    t = raw.get(K_TYPE)
    if type(t) is not int or t not in _KEYS:
        raise DecodeError(Reason.MALFORMED, f"unknown liveness frame type {t!r}")
    cbor.expect_map(raw, _KEYS[t])
    if t == T_PING:
        return Ping(cbor.uint(raw[K_NONCE], "nonce"))
    if t == T_ACK:
        return Ack(cbor.uint(raw[K_NONCE], "nonce"))
    if t == T_NACK:
        return Nack(cbor.uint(raw[K_NONCE], "nonce"))
    if t == T_DEAD_REQ:
        return DeadReq()
    subject = NodeId(cbor.bstr(raw[K_SUBJECT], "subject", NodeId.SIZE))
    if t == T_PING_REQ:
        return PingReq(subject, cbor.uint(raw[K_NONCE], "nonce"))
    inc = cbor.uint(raw[K_INC], "incarnation")
    ts = cbor.uint(raw[K_TS], "ts")
    sig = cbor.bstr(raw[K_SIG], "signature", SIG_SIZE)
    if t == T_ALIVE:
        return Alive(subject, inc, ts, sig)
    observer = NodeId(cbor.bstr(raw[K_OBSERVER], "observer", NodeId.SIZE))
    if observer == subject:
        raise DecodeError(Reason.MALFORMED, "a node cannot accuse itself")
    cls = Suspect if t == T_SUSPECT else Dead
    return cls(subject, inc, observer, ts, sig)


def ts_of(now: float) -> int:
    """The ``ts`` field for a statement made at local time ``now`` (seconds)."""
    return min(max(int(now * 1000), 0), _U64 - 1)
