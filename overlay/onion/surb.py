"""Single-use reply blocks (SURBs).

A SURB lets whoever holds it (the exit, or the final recipient) send one
packet back along a return path chosen by the SURB's creator, without learning
that path beyond its first hop.

Invariants:
- SURB bytes = format(1) | first hop NodeId(32) | reply key k~(32) | header;
  the header is an ordinary Sphinx header whose final routing block says
  "reply" and carries the 16-byte surb id;
- the replier sends ``header | LIONESS_enc(k~, pad(reply))``; every hop removes
  one layer as for any packet (hops cannot tell replies from forward
  messages); the final hop returns ``Deliver(payload, surb_id=id)`` and the
  creator restores the layers and removes k~ with ``open_reply``, checking
  the zero tag, so a tampered reply is always detected;
- single use: a second packet made from the same SURB carries the same
  header, so every hop of the return path rejects it as a replay;
- a SURB is only usable while the return path's onion-key epochs are live.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..crypto import NodeId
from ..errors import DecodeError, LocalError, Reason
from .header import Rng, build_header
from .params import (
    FLAG_REPLY,
    KEY_SIZE,
    NODE_SIZE,
    SURB_ID_SIZE,
    Hop,
    PacketParams,
    PacketRejected,
)
from .payload import (
    lioness_decrypt,
    lioness_encrypt,
    lioness_key,
    lioness_key_bytes,
    lioness_key_from_bytes,
    pad,
    unpad,
)

_LION_KEY_BYTES = 128


@dataclass(frozen=True, slots=True)
class SurbSecret:
    """What the SURB's creator keeps (keyed by ``surb_id``) to open the reply.

    Secret material: store it like a private key (the outbox), never send it.
    """

    format: int
    surb_id: bytes
    reply_key: bytes = field(repr=False)  # k~, also inside the SURB
    hop_keys: tuple[bytes, ...] = field(repr=False)  # 128-byte LIONESS keys, path order

    def to_bytes(self) -> bytes:
        """format(1) | hops(1) | surb id(16) | k~(32) | hops x 128."""
        return b"".join(
            (
                bytes([self.format, len(self.hop_keys)]),
                self.surb_id,
                self.reply_key,
                *self.hop_keys,
            )
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> SurbSecret:
        head = 2 + SURB_ID_SIZE + KEY_SIZE
        if len(raw) < head or raw[1] < 1 or len(raw) != head + raw[1] * _LION_KEY_BYTES:
            raise DecodeError(Reason.MALFORMED, "SurbSecret length")
        keys = tuple(
            bytes(raw[o : o + _LION_KEY_BYTES]) for o in range(head, len(raw), _LION_KEY_BYTES)
        )
        return cls(
            raw[0], bytes(raw[2 : 2 + SURB_ID_SIZE]), bytes(raw[2 + SURB_ID_SIZE : head]), keys
        )


class SurbPacket(NamedTuple):
    first_hop: NodeId
    packet: bytes


def make_surb(
    params: PacketParams,
    return_path: Sequence[Hop | tuple],
    rng: Rng = os.urandom,
    *,
    delays_ms: Sequence[int] | None = None,
    surb_id: bytes | None = None,
) -> tuple[bytes, SurbSecret]:
    """Make a SURB for ``return_path`` (its last hop is where the reply is delivered).

    Returns ``(surb bytes to embed in a message, SurbSecret to keep)``.
    rng draws: surb id (16, unless ``surb_id`` is given), k~ (32), then the
    header's (32 + fill).
    """
    surb_id = rng(SURB_ID_SIZE) if surb_id is None else bytes(surb_id)
    reply_key = rng(KEY_SIZE)
    if len(surb_id) != SURB_ID_SIZE or len(reply_key) != KEY_SIZE:
        raise LocalError("rng returned the wrong number of bytes")
    header, keys = build_header(params, return_path, bytes([FLAG_REPLY]) + surb_id, rng, delays_ms)
    first = Hop(*return_path[0]).node
    surb = b"".join((bytes([params.format]), bytes(first), reply_key, header))
    secret = SurbSecret(
        params.format, surb_id, reply_key, tuple(lioness_key_bytes(k) for k in keys)
    )
    return surb, secret


def use_surb(params: PacketParams, surb: bytes, reply_payload: bytes) -> SurbPacket:
    """Build the reply packet from SURB bytes alone; returns ``(first_hop, packet)``.

    Raises ``PacketRejected`` (``MALFORMED``) for SURB bytes that are not of
    this class and ``MessageTooLong`` if the reply does not fit.
    """
    if not isinstance(surb, bytes | bytearray | memoryview):
        raise PacketRejected(Reason.MALFORMED, "SURB must be bytes")
    surb = bytes(surb)
    if len(surb) != params.surb_size:
        raise PacketRejected(Reason.MALFORMED, f"SURB is {len(surb)} bytes, not {params.surb_size}")
    hdr_at = 1 + NODE_SIZE + KEY_SIZE
    if surb[0] != params.format or surb[hdr_at] != params.format:
        raise PacketRejected(Reason.MALFORMED, "SURB format byte")
    first = NodeId(surb[1 : 1 + NODE_SIZE])
    reply_key = surb[1 + NODE_SIZE : hdr_at]
    body = lioness_encrypt(lioness_key(reply_key), pad(params, bytes(reply_payload)))
    return SurbPacket(first, surb[hdr_at:] + body)


def open_reply(params: PacketParams, secret: SurbSecret, payload: bytes) -> bytes:
    """Decrypt and verify the payload of ``Deliver(surb_id=secret.surb_id)``.

    Raises ``PacketRejected`` (``BAD_MAC``) if the reply was tampered with
    anywhere on the return path (or opened with the wrong secret).
    """
    if secret.format != params.format:
        raise LocalError("SurbSecret belongs to another packet class")
    if len(payload) != params.payload_size:
        raise PacketRejected(Reason.MALFORMED, "reply payload length")
    body = bytes(payload)
    for raw in reversed(secret.hop_keys):
        body = lioness_encrypt(lioness_key_from_bytes(raw), body)
    return unpad(params, lioness_decrypt(lioness_key(secret.reply_key), body))
