"""Payload encoding and the LIONESS wide-block cipher (ChaCha20 + keyed BLAKE2b).

Invariants:
- LIONESS (Anderson & Biham) is a strong pseudo-random permutation of the
  whole payload: changing any ciphertext bit turns the entire plaintext into
  noise, so the 16 zero bytes at the front of the plaintext are an integrity
  check (a tampered payload passes with probability 2^-128);
- block = L (32 bytes) | R (the rest); the stream cipher is ChaCha20 with
  key ``L xor K1`` / ``L xor K3`` and a zero nonce, the hash is BLAKE2b-256
  keyed with ``K2`` / ``K4``;
- ``pad`` and ``unpad`` are exact inverses and ``unpad`` is canonical: a
  non-zero tag is ``BAD_MAC``; a length beyond the class or non-zero padding
  is ``MALFORMED``.
"""

from __future__ import annotations

from ..crypto import ct_equal, kdf, mac, stream_xor
from ..errors import Reason
from .params import (
    KEY_SIZE,
    LABEL_LION1,
    LABEL_LION2,
    LABEL_LION3,
    LABEL_LION4,
    PAYLOAD_LEN_SIZE,
    PAYLOAD_OVERHEAD,
    PAYLOAD_TAG_SIZE,
    MessageTooLong,
    PacketParams,
    PacketRejected,
)

_ZERO_TAG = bytes(PAYLOAD_TAG_SIZE)

#: LIONESS key: (K1 as int, K2, K3 as int, K4); K1/K3 whiten L into a ChaCha20 key
LionessKey = tuple[int, bytes, int, bytes]


def lioness_key(seed: bytes) -> LionessKey:
    """Derive the four LIONESS round keys from a 32-byte secret."""
    return (
        int.from_bytes(kdf(seed, LABEL_LION1), "little"),
        kdf(seed, LABEL_LION2),
        int.from_bytes(kdf(seed, LABEL_LION3), "little"),
        kdf(seed, LABEL_LION4),
    )


def lioness_key_bytes(key: LionessKey) -> bytes:
    """128-byte serialisation (K1|K2|K3|K4) for ``SurbSecret``."""
    k1, k2, k3, k4 = key
    return k1.to_bytes(32, "little") + k2 + k3.to_bytes(32, "little") + k4


def lioness_key_from_bytes(raw: bytes) -> LionessKey:
    return (
        int.from_bytes(raw[0:32], "little"),
        raw[32:64],
        int.from_bytes(raw[64:96], "little"),
        raw[96:128],
    )


def lioness_encrypt(key: LionessKey, block: bytes) -> bytes:
    k1, k2, k3, k4 = key
    left = int.from_bytes(block[:KEY_SIZE], "little")
    right = stream_xor((left ^ k1).to_bytes(32, "little"), block[KEY_SIZE:])
    left ^= int.from_bytes(mac(k2, right, 32), "little")
    right = stream_xor((left ^ k3).to_bytes(32, "little"), right)
    left ^= int.from_bytes(mac(k4, right, 32), "little")
    return left.to_bytes(32, "little") + right


def lioness_decrypt_parts(key: LionessKey, block: bytes | memoryview) -> tuple[bytes, bytes]:
    """LIONESS decryption returning ``(L, R)`` so the caller can join without a copy.

    ``block`` may be a ``memoryview`` (the hop passes a view of the packet).
    """
    k1, k2, k3, k4 = key
    right = block[KEY_SIZE:]
    left = int.from_bytes(block[:KEY_SIZE], "little") ^ int.from_bytes(mac(k4, right, 32), "little")
    right = stream_xor((left ^ k3).to_bytes(32, "little"), right)
    left ^= int.from_bytes(mac(k2, right, 32), "little")
    right = stream_xor((left ^ k1).to_bytes(32, "little"), right)
    return left.to_bytes(32, "little"), right


def lioness_decrypt(key: LionessKey, block: bytes) -> bytes:
    left, right = lioness_decrypt_parts(key, block)
    return left + right


def pad(params: PacketParams, message: bytes) -> bytes:
    """zero tag | length | message | zeros, exactly ``params.payload_size`` bytes."""
    n = len(message)
    if n > params.max_message:
        raise MessageTooLong(
            f"{n} bytes > {params.max_message} for the {params.name} class: "
            "use a larger class or fragment"
        )
    return b"".join(
        (
            _ZERO_TAG,
            n.to_bytes(PAYLOAD_LEN_SIZE, "big"),
            bytes(message),
            bytes(params.payload_size - PAYLOAD_OVERHEAD - n),
        )
    )


def unpad(params: PacketParams, plain: bytes) -> bytes:
    """Check the zero tag and the canonical padding; return the message."""
    if len(plain) != params.payload_size:
        raise PacketRejected(Reason.MALFORMED, "payload length")
    if not ct_equal(plain[:PAYLOAD_TAG_SIZE], _ZERO_TAG):
        raise PacketRejected(Reason.BAD_MAC, "payload integrity check failed")
    n = int.from_bytes(plain[PAYLOAD_TAG_SIZE:PAYLOAD_OVERHEAD], "big")
    if n > params.max_message:
        raise PacketRejected(Reason.MALFORMED, "payload length field out of range")
    end = PAYLOAD_OVERHEAD + n
    if plain[end:] != bytes(params.payload_size - end):
        raise PacketRejected(Reason.MALFORMED, "non-zero payload padding")
    return plain[PAYLOAD_OVERHEAD:end]
