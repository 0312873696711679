"""Per-hop Sphinx processing: one pure function, typed results, typed rejections.

Invariants:
- ``process`` does no I/O and keeps no state; it returns ``Forward`` or
  ``Deliver`` (each with the replay tag and the key epoch it used) or raises
  ``PacketRejected`` (``MALFORMED``/``OVERSIZED``/``BAD_MAC``/``UNKNOWN_EPOCH``)
  or whatever the optional ``replay`` hook raises (``Replay``). Any input
  bytes give one of these, never another exception;
- checks run cheapest first: length, format byte, epoch lookup, one X25519,
  header MAC; nothing about the packet is used before its MAC verified;
- a forwarded packet has exactly the incoming length; the hop learns only
  the next node, its epoch and the hold time (or "deliver" / "reply + id",
  each possibly with a hold time of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..crypto import NodeId, OnionKey, ct_equal, kdf, mac, stream_xor, x25519
from ..errors import Reason
from .params import (
    ALPHA_SIZE,
    EPOCH_SIZE,
    FLAG_DELIVER,
    FLAG_DELIVER_HELD,
    FLAG_FORWARD,
    FLAG_REPLY,
    FLAG_REPLY_HELD,
    GAMMA_SIZE,
    HOP_BLOCK_SIZE,
    LABEL_BLIND,
    LABEL_MAC,
    LABEL_RHO,
    LABEL_TAG,
    NODE_SIZE,
    SURB_ID_SIZE,
    TAG_SIZE,
    PacketParams,
    PacketRejected,
)
from .payload import lioness_decrypt, lioness_decrypt_parts, lioness_key, unpad

OnionKeys = Mapping[int, OnionKey] | Callable[[int], OnionKey | None]
ReplayHook = Callable[[int, bytes], object]


@dataclass(frozen=True, slots=True)
class Forward:
    """Send ``packet`` to ``next_node`` (which processes it with its ``next_epoch`` key)."""

    next_node: NodeId
    next_epoch: int
    packet: bytes
    replay_tag: bytes
    epoch: int = 0  # the epoch of our key that opened the packet: replay cache key
    delay_ms: int = 0  # sender-chosen hold time before forwarding (Poisson mixing)


@dataclass(frozen=True, slots=True)
class Deliver:
    """This hop ends the path.

    Forward message (``surb_id is None``): ``payload`` is the verified message.
    Reply (``surb_id`` set): ``payload`` is still encrypted for the SURB's
    creator, who opens it with ``open_reply(params, secret, payload)``.
    """

    payload: bytes
    replay_tag: bytes
    epoch: int = 0
    surb_id: bytes | None = None
    delay_ms: int = 0  # sender-chosen hold time before delivering (held flags)

    @property
    def is_reply(self) -> bool:
        return self.surb_id is not None


_O_EPOCH = 1
_O_ALPHA = _O_EPOCH + EPOCH_SIZE  # 5
_O_BETA = _O_ALPHA + ALPHA_SIZE  # 37
_ZERO_BLOCK = bytes(HOP_BLOCK_SIZE)
_B_NODE = 1
_B_EPOCH = _B_NODE + NODE_SIZE  # 33
_B_DELAY = _B_EPOCH + EPOCH_SIZE  # 37
_B_GAMMA = _B_DELAY + 4  # 41


def _lookup(onion_keys: OnionKeys, epoch: int) -> OnionKey | None:
    try:
        if callable(onion_keys):
            return onion_keys(epoch)
        return onion_keys.get(epoch)
    except LookupError:
        return None


def peek_epoch(packet: bytes) -> int:
    """The clear epoch field (which onion key the packet is for); no checks."""
    if len(packet) < _O_ALPHA:
        raise PacketRejected(Reason.MALFORMED, "truncated")
    return int.from_bytes(packet[_O_EPOCH:_O_ALPHA], "big")


def process(
    params: PacketParams,
    onion_keys: OnionKeys,
    packet: bytes,
    *,
    replay: ReplayHook | None = None,
) -> Forward | Deliver:
    """Process one packet at this hop.

    ``onion_keys`` maps an epoch to our ``OnionKey`` (a mapping, or a callable
    returning ``None`` for unknown epochs). ``replay``, if given, is called as
    ``replay(epoch, tag)`` after the header MAC verified and before the
    payload is decrypted; it may raise (``ReplayCache.check_and_add`` raises
    ``Replay``), which skips the remaining work. Without it the caller must
    check ``result.replay_tag`` itself before acting on the result.
    """
    if type(packet) is not bytes:
        if not isinstance(packet, bytearray | memoryview):
            raise PacketRejected(Reason.MALFORMED, "packet must be bytes")
        packet = bytes(packet)
    size = params.packet_size
    if len(packet) != size:
        if len(packet) > size:
            raise PacketRejected(Reason.OVERSIZED, f"{len(packet)} > {size} bytes")
        raise PacketRejected(Reason.MALFORMED, f"{len(packet)} != {size} bytes")
    if packet[0] != params.format:
        raise PacketRejected(Reason.MALFORMED, "format byte")
    epoch = int.from_bytes(packet[_O_EPOCH:_O_ALPHA], "big")
    key = _lookup(onion_keys, epoch)
    if key is None:
        raise PacketRejected(Reason.UNKNOWN_EPOCH, f"epoch {epoch}")
    alpha = packet[_O_ALPHA:_O_BETA]
    try:
        s = key.exchange(alpha)
    except ValueError:
        raise PacketRejected(Reason.MALFORMED, "low-order alpha") from None

    hsize = params.header_size
    mac_end = hsize - GAMMA_SIZE
    if not ct_equal(mac(kdf(s, LABEL_MAC), packet[:mac_end]), packet[mac_end:hsize]):
        raise PacketRejected(Reason.BAD_MAC, "header MAC")
    tag = kdf(s, LABEL_TAG, TAG_SIZE)
    if replay is not None:
        replay(epoch, tag)

    ext = stream_xor(kdf(s, LABEL_RHO), packet[_O_BETA:mac_end] + _ZERO_BLOCK)
    flag = ext[0]
    if flag == FLAG_FORWARD:
        left, right = lioness_decrypt_parts(lioness_key(s), memoryview(packet)[hsize:])
        next_alpha = x25519(kdf(s, LABEL_BLIND), alpha)
        return Forward(
            NodeId(ext[_B_NODE:_B_EPOCH]),
            int.from_bytes(ext[_B_EPOCH:_B_DELAY], "big"),
            b"".join(
                (
                    packet[:1],
                    ext[_B_EPOCH:_B_DELAY],
                    next_alpha,
                    ext[HOP_BLOCK_SIZE:],
                    ext[_B_GAMMA:HOP_BLOCK_SIZE],
                    left,
                    right,
                )
            ),
            tag,
            epoch,
            int.from_bytes(ext[_B_DELAY:_B_GAMMA], "big"),
        )
    if flag in (FLAG_DELIVER, FLAG_DELIVER_HELD):
        payload = lioness_decrypt(lioness_key(s), packet[hsize:])
        delay = int.from_bytes(ext[_B_DELAY:_B_GAMMA], "big") if flag == FLAG_DELIVER_HELD else 0
        return Deliver(unpad(params, payload), tag, epoch, None, delay)
    if flag in (FLAG_REPLY, FLAG_REPLY_HELD):
        payload = lioness_decrypt(lioness_key(s), packet[hsize:])
        delay = int.from_bytes(ext[_B_DELAY:_B_GAMMA], "big") if flag == FLAG_REPLY_HELD else 0
        return Deliver(payload, tag, epoch, ext[1 : 1 + SURB_ID_SIZE], delay)
    raise PacketRejected(Reason.MALFORMED, f"routing flag {flag:#x}")
