"""Relay and client stream frames, and the reply-block bundle inside exit messages.

Two stream protocols carry onion packets (docs/user.md, "Protocols"):

``/hydra/relay/1.0.0`` (node to node). Each frame is ``uvarint(len) || packet``
(``overlay.net.framing``) and a packet is exactly one Sphinx size class
(2048 or 32768 bytes, format byte matching). Nothing else is ever sent on it,
so there is no type byte; ``check_packet`` is its whole decoder.

``/hydra/client/1.0.0`` (a light client to its entry node). Each frame is
``uvarint(len) || type(1) || body``:

    0x01 SUBMIT    body = one packet (as on the relay protocol); the entry is
                   its first hop
    0x02 REGISTER  body = 1..MAX_REGISTER surb ids (16 bytes each): replies
                   whose return path ends at the entry with one of these ids
                   are pushed to this client
    0x03 REPLY     body = surb id (16) | reply payload (the payload size of a
                   packet class: 1710 or 32430 bytes, still encrypted for the
                   SURB's creator)
    0x04 DEAD      body = 0..MAX_DEAD node ids (32 bytes each): the nodes the
                   entry currently believes dead (a hint for path selection;
                   the full list each time, so an empty body clears it)

SUBMIT and REGISTER go client -> entry, REPLY and DEAD entry -> client.

Reply blocks: the ``reply_block`` field of an ``ExitMessage`` (<= 1024 bytes)
holds the canonical CBOR array ``[final]`` or ``[final, queued]`` of SURBs
(403 bytes each). The exit answers "queued" (durably accepted) through
``queued`` and its final word (``delivered`` or ``rejected``) through
``final``; a bare SURB (not wrapped in an array) counts as ``final`` alone.

Invariants: ``decode``/``decode_reply_blocks`` check sizes before parsing and
raise only ``DecodeError``; ``check_packet`` raises only ``PacketRejected``
(a ``RemoteError``) with ``MALFORMED`` or ``OVERSIZED``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..crypto import NodeId
from ..errors import DecodeError, Reason, RemoteError
from ..onion.params import CLASSES, SURB_ID_SIZE, PacketParams, params_for_packet
from . import cbor

VERSION = 1
RELAY_PROTOCOL = "/hydra/relay/1.0.0"
CLIENT_PROTOCOL = "/hydra/client/1.0.0"

#: the largest packet of any class
MAX_PACKET = max(p.packet_size for p in CLASSES)
#: the largest relay-protocol frame body
MAX_RELAY_FRAME = MAX_PACKET
#: the largest client-protocol frame body
MAX_SIZE = 1 + max(MAX_PACKET, SURB_ID_SIZE + max(p.payload_size for p in CLASSES))
MAX_REGISTER = 64
MAX_DEAD = 64
SURB_SIZE = CLASSES[0].surb_size  # 403 for every class
MAX_REPLY_BLOCKS = 1024

T_SUBMIT, T_REGISTER, T_REPLY, T_DEAD = 0x01, 0x02, 0x03, 0x04
_PAYLOAD_SIZES = {p.payload_size for p in CLASSES}
_FORMATS = {p.format for p in CLASSES}


def check_packet(frame: bytes) -> PacketParams:
    """The class of a packet from the wire; ``PacketRejected`` if it is no class's size."""
    return params_for_packet(frame)


@dataclass(frozen=True, slots=True)
class Submit:
    packet: bytes


@dataclass(frozen=True, slots=True)
class Register:
    surb_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    surb_id: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    nodes: tuple[NodeId, ...]


Frame = Submit | Register | Reply | Dead


def encode(frame: Frame) -> bytes:
    """The frame body (without the length prefix)."""
    if isinstance(frame, Submit):
        return bytes([T_SUBMIT]) + frame.packet
    if isinstance(frame, Register):
        if not 1 <= len(frame.surb_ids) <= MAX_REGISTER:
            raise ValueError(f"REGISTER carries 1..{MAX_REGISTER} ids")
        if any(len(s) != SURB_ID_SIZE for s in frame.surb_ids):
            raise ValueError("surb ids are 16 bytes")
        return bytes([T_REGISTER]) + b"".join(frame.surb_ids)
    if isinstance(frame, Reply):
        if len(frame.surb_id) != SURB_ID_SIZE or len(frame.payload) not in _PAYLOAD_SIZES:
            raise ValueError("bad REPLY")
        return bytes([T_REPLY]) + frame.surb_id + frame.payload
    if isinstance(frame, Dead):
        if len(frame.nodes) > MAX_DEAD:
            raise ValueError(f"DEAD carries at most {MAX_DEAD} ids")
        return bytes([T_DEAD]) + b"".join(bytes(n) for n in frame.nodes)
    raise TypeError(f"not a client frame: {frame!r}")


def decode(data: bytes) -> Frame:
    """Parse a client-protocol frame body; raise ``DecodeError`` unless it is well-formed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(Reason.MALFORMED, "frame is not bytes")
    data = bytes(data)
    if len(data) > MAX_SIZE:
        raise DecodeError(Reason.OVERSIZED, f"{len(data)} > {MAX_SIZE} bytes")
    if not data:
        raise DecodeError(Reason.MALFORMED, "empty frame")
    t, body = data[0], data[1:]
    if t == T_SUBMIT:
        try:
            check_packet(body)
        except RemoteError as e:  # PacketRejected is a RemoteError, not a DecodeError
            raise DecodeError(e.reason, f"SUBMIT: {e.detail}") from None
        return Submit(body)
    if t == T_REGISTER:
        if not body or len(body) % SURB_ID_SIZE or len(body) > MAX_REGISTER * SURB_ID_SIZE:
            raise DecodeError(Reason.MALFORMED, "REGISTER needs 1..64 ids of 16 bytes")
        ids = tuple(body[i : i + SURB_ID_SIZE] for i in range(0, len(body), SURB_ID_SIZE))
        return Register(ids)
    if t == T_REPLY:
        if len(body) - SURB_ID_SIZE not in _PAYLOAD_SIZES:
            raise DecodeError(Reason.MALFORMED, "REPLY payload is no class's payload size")
        return Reply(body[:SURB_ID_SIZE], body[SURB_ID_SIZE:])
    if t == T_DEAD:
        if len(body) % NodeId.SIZE or len(body) > MAX_DEAD * NodeId.SIZE:
            raise DecodeError(Reason.MALFORMED, "DEAD needs 0..64 ids of 32 bytes")
        return Dead(tuple(NodeId(body[i : i + 32]) for i in range(0, len(body), 32)))
    raise DecodeError(Reason.MALFORMED, f"unknown client frame type {t:#x}")


# ---- reply blocks inside an ExitMessage ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyBlocks:
    """The SURBs a sender put in its message: ``final`` always, ``queued`` optionally."""

    final: bytes
    queued: bytes | None = None


def _check_surb(surb: object) -> bytes:
    if type(surb) is not bytes or len(surb) != SURB_SIZE or surb[0] not in _FORMATS:
        raise DecodeError(Reason.MALFORMED, "reply block is not a SURB")
    return surb


def encode_reply_blocks(final: bytes, queued: bytes | None = None) -> bytes:
    items = [_check_surb(final)] + ([_check_surb(queued)] if queued is not None else [])
    return cbor.dumps(items)


def decode_reply_blocks(raw: bytes) -> ReplyBlocks:
    """Split an ``ExitMessage.reply_block``; raise ``DecodeError`` if it holds no SURB."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise DecodeError(Reason.MALFORMED, "reply block is not bytes")
    raw = bytes(raw)
    if len(raw) == SURB_SIZE and raw[0] in _FORMATS:
        return ReplyBlocks(raw)
    items = cbor.array(cbor.loads_canonical(raw, MAX_REPLY_BLOCKS), "reply blocks", 2)
    if not items:
        raise DecodeError(Reason.MALFORMED, "no reply block")
    final = _check_surb(items[0])
    queued = _check_surb(items[1]) if len(items) == 2 else None
    return ReplyBlocks(final, queued)
