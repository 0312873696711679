"""Sphinx packet parameters, wire constants and the onion error types.

Invariants:
- one frozen ``PacketParams`` per size class fixes every length; a packet of a
  class is exactly ``packet_size`` bytes at every hop whatever the path length
  (1..``max_hops``) and the message length;
- the header layout (and so the header size) is the same for every class;
  only the payload length differs; the first byte (``format``) names the
  version and the class and is covered by the per-hop MAC;
- all KDF labels are distinct BLAKE2b personalisations of at most 16 bytes.

See docs/sphinx.md for the byte-by-byte layout and the reasons for the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ..crypto import NodeId, OnionPublicKey
from ..errors import LocalError, Reason, RemoteError

# ---- fixed layout pieces (identical for every class) --------------------------

FORMAT_SIZE = 1  # version + size class
EPOCH_SIZE = 4  # onion-key epoch of the hop that must process the packet (big-endian)
ALPHA_SIZE = 32  # X25519 group element
GAMMA_SIZE = 16  # per-hop header MAC (keyed BLAKE2b-128)
NODE_SIZE = NodeId.SIZE  # 32
DELAY_SIZE = 4  # per-hop hold time in ms (Poisson mixing)
SURB_ID_SIZE = 16
TAG_SIZE = 16  # replay tag
KEY_SIZE = 32

#: routing block, one per hop, decrypted by the hop from the front of beta:
#: flag(1) | next node(32) | next epoch(4) | delay ms(4) | next gamma(16)
HOP_BLOCK_SIZE = 1 + NODE_SIZE + EPOCH_SIZE + DELAY_SIZE + GAMMA_SIZE  # 57

#: routing flags (first byte of a decrypted routing block)
FLAG_FORWARD = 0x01  # relay to the next node
FLAG_DELIVER = 0x02  # this hop is the exit: the payload is a forward message
FLAG_REPLY = 0x03  # this hop ends a SURB path: the payload is a reply, block holds surb id
#: the same two, held by the final hop for ``delay ms`` (block bytes 37..41, as in a
#: forward block) before it delivers: Poisson mixing at the last hop too
FLAG_DELIVER_HELD = 0x04
FLAG_REPLY_HELD = 0x05
HELD_FLAGS = {FLAG_DELIVER: FLAG_DELIVER_HELD, FLAG_REPLY: FLAG_REPLY_HELD}
DELAY_OFFSET = 1 + NODE_SIZE + EPOCH_SIZE  # 37: where a block carries its delay

#: payload plaintext: zero tag(16) | message length(4, big-endian) | message | zero padding
PAYLOAD_TAG_SIZE = 16
PAYLOAD_LEN_SIZE = 4
PAYLOAD_OVERHEAD = PAYLOAD_TAG_SIZE + PAYLOAD_LEN_SIZE

MAX_EPOCH = 2**32 - 1
MAX_DELAY_MS = 2**32 - 1

# ---- KDF labels (BLAKE2b personalisation, <= 16 bytes, all distinct) ----------

LABEL_MAC = b"hydra.sx1.mac"  # header MAC key
LABEL_RHO = b"hydra.sx1.rho"  # header (routing info) stream key
LABEL_BLIND = b"hydra.sx1.blind"  # blinding scalar for the next alpha
LABEL_TAG = b"hydra.sx1.tag"  # replay tag
LABEL_LION1 = b"hydra.sx1.lion1"  # LIONESS round 1 (stream key whitening)
LABEL_LION2 = b"hydra.sx1.lion2"  # LIONESS round 2 (BLAKE2b key)
LABEL_LION3 = b"hydra.sx1.lion3"  # LIONESS round 3 (stream key whitening)
LABEL_LION4 = b"hydra.sx1.lion4"  # LIONESS round 4 (BLAKE2b key)
ALL_LABELS = (
    LABEL_MAC,
    LABEL_RHO,
    LABEL_BLIND,
    LABEL_TAG,
    LABEL_LION1,
    LABEL_LION2,
    LABEL_LION3,
    LABEL_LION4,
)


# ---- errors -----------------------------------------------------------------


class PacketRejected(RemoteError):
    """A packet (or SURB, or reply payload) from outside is unacceptable.

    ``reason`` is one of ``MALFORMED``, ``OVERSIZED``, ``BAD_MAC`` (header MAC or
    payload integrity), ``UNKNOWN_EPOCH``. Replays raise ``overlay.errors.Replay``.
    """

    default_reason = Reason.MALFORMED


class MessageTooLong(LocalError):
    """The message does not fit the payload of the chosen size class."""


class ReplayCacheFull(LocalError):
    """The replay cache for an epoch reached its bound: rotate the onion key early.

    Failing closed (dropping the packet) is deliberate: evicting tags would
    let an adversary replay packets by flooding the cache first.
    """


# ---- parameters -----------------------------------------------------------------


class Hop(NamedTuple):
    """One hop of a path as the sender knows it from the membership record."""

    node: NodeId
    key: OnionPublicKey
    epoch: int


@dataclass(frozen=True, slots=True)
class PacketParams:
    """Every length of one packet size class. Frozen; compare by value.

    The derived sizes are plain attributes (computed once) because the hop
    reads them on every packet.
    """

    name: str
    format: int  # first byte of every packet and SURB of this class
    packet_size: int
    max_hops: int = 5
    beta_size: int = field(init=False)  # max_hops routing blocks
    header_size: int = field(init=False)  # format | epoch | alpha | beta | gamma
    payload_size: int = field(init=False)  # packet_size - header_size
    max_message: int = field(init=False)  # longest message a packet carries
    surb_size: int = field(init=False)  # format | first hop | reply key | header

    def __post_init__(self) -> None:
        if not 0 < self.format < 256:
            raise LocalError("format must be one byte, non-zero")
        if not 1 <= self.max_hops <= 16:
            raise LocalError("max_hops must be in 1..16")
        beta = self.max_hops * HOP_BLOCK_SIZE
        header = FORMAT_SIZE + EPOCH_SIZE + ALPHA_SIZE + beta + GAMMA_SIZE
        payload = self.packet_size - header
        if payload < PAYLOAD_OVERHEAD + KEY_SIZE + 1:
            raise LocalError("packet_size too small for the header and a payload")
        for name, value in (
            ("beta_size", beta),
            ("header_size", header),
            ("payload_size", payload),
            ("max_message", payload - PAYLOAD_OVERHEAD),
            ("surb_size", FORMAT_SIZE + NODE_SIZE + KEY_SIZE + header),
        ):
            object.__setattr__(self, name, value)


#: 2 KiB: acknowledgements, replies, short text. 1690-byte messages.
SMALL = PacketParams(name="small", format=0x11, packet_size=2048)
#: 32 KiB (Mixminion's size): a typical e-mail with headers. 32410-byte messages.
LARGE = PacketParams(name="large", format=0x12, packet_size=32768)
#: every class a node accepts, smallest first
CLASSES: tuple[PacketParams, ...] = (SMALL, LARGE)


def params_for_packet(packet: bytes) -> PacketParams:
    """The class of a received packet, from its length and format byte."""
    for p in CLASSES:
        if len(packet) == p.packet_size:
            if packet[0] != p.format:
                raise PacketRejected(Reason.MALFORMED, "format byte does not match length")
            return p
    if len(packet) > CLASSES[-1].packet_size:
        raise PacketRejected(Reason.OVERSIZED, f"{len(packet)} bytes")
    raise PacketRejected(Reason.MALFORMED, f"no packet class is {len(packet)} bytes")


def params_for_message(length: int) -> PacketParams:
    """The smallest class whose payload holds a message of ``length`` bytes."""
    for p in CLASSES:
        if length <= p.max_message:
            return p
    raise MessageTooLong(f"{length} bytes > {CLASSES[-1].max_message}: fragment the message")
