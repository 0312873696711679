"""The only module that touches cryptographic libraries.

Invariants:
- key types check their length on construction and are hashable by value;
- verification raises ``BadSignature``; it never returns a bool to forget;
- hot-path primitives (KDF, MAC, stream cipher) use hashlib's BLAKE2b and
  OpenSSL's ChaCha20 through ``cryptography`` because PyNaCl's wrappers cost
  several microseconds per call (see docs/performance.md).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os

import nacl.bindings as _sodium
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .errors import BadSignature, LocalError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + out


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        idx = _B58.find(ch)
        if idx < 0:
            raise ValueError(f"invalid base58 character {ch!r}")
        n = n * 58 + idx
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


# libp2p PublicKey protobuf for Ed25519: field 1 (KeyType) = 1, field 2 (Data) = 32 bytes
_LIBP2P_ED25519_PREFIX = b"\x08\x01\x12\x20"
#: identity multihash (0x00, length 36) of that protobuf key: a peer id is this + the raw key
_PEER_ID_PREFIX = bytes([0x00, len(_LIBP2P_ED25519_PREFIX) + 32]) + _LIBP2P_ED25519_PREFIX


class NodeId:
    """An Ed25519 public key: the node's identity, record-signing key and libp2p peer id."""

    __slots__ = ("_raw",)
    SIZE = 32

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != self.SIZE:
            raise ValueError("NodeId must be 32 bytes")
        self._raw = bytes(raw)

    def __bytes__(self) -> bytes:
        return self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeId) and other._raw == self._raw

    def __lt__(self, other: NodeId) -> bool:
        return self._raw < other._raw

    def __repr__(self) -> str:
        return f"NodeId({self.short()})"

    def hex(self) -> str:
        return self._raw.hex()

    def short(self) -> str:
        return self.peer_id()[-8:]

    def peer_id_bytes(self) -> bytes:
        """libp2p peer id bytes: identity multihash of the protobuf public key."""
        return _PEER_ID_PREFIX + self._raw

    def peer_id(self) -> str:
        """libp2p peer id in base58btc (starts with ``12D3KooW``)."""
        return _peer_id_text(self._raw)

    @classmethod
    def from_peer_id(cls, text: str) -> NodeId:
        return cls(_peer_id_key(text))

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise ``BadSignature`` unless ``signature`` is valid for ``message``."""
        try:
            nacl.signing.VerifyKey(self._raw).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as e:
            raise BadSignature(detail="ed25519 verification failed") from e


# Peer ids are converted back and forth for every connection and stream, and
# base58 is a Python loop: both directions are remembered (bounded).
@functools.lru_cache(maxsize=16384)
def _peer_id_text(raw: bytes) -> str:
    return b58encode(_PEER_ID_PREFIX + raw)


@functools.lru_cache(maxsize=16384)
def _peer_id_key(text: str) -> bytes:
    """The Ed25519 key inside a libp2p peer id (``ValueError`` if there is none)."""
    raw = b58decode(text)
    if len(raw) != len(_PEER_ID_PREFIX) + NodeId.SIZE or not raw.startswith(_PEER_ID_PREFIX):
        raise ValueError("not an Ed25519 libp2p peer id")
    return raw[len(_PEER_ID_PREFIX) :]


class SigningKey:
    """An Ed25519 private key (32-byte seed). Never serialised except to its 0600 file."""

    __slots__ = ("_sk", "node_id")
    SIZE = 32

    def __init__(self, seed: bytes) -> None:
        if len(seed) != self.SIZE:
            raise LocalError("Ed25519 seed must be 32 bytes")
        self._sk = nacl.signing.SigningKey(bytes(seed))
        self.node_id = NodeId(bytes(self._sk.verify_key))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(cls.SIZE))

    def seed(self) -> bytes:
        return bytes(self._sk)

    def sign(self, message: bytes) -> bytes:
        return self._sk.sign(message).signature

    def __repr__(self) -> str:
        return f"SigningKey({self.node_id.short()})"


class OnionPublicKey:
    __slots__ = ("_raw",)
    SIZE = 32

    def __init__(self, raw: bytes) -> None:
        if len(raw) != self.SIZE:
            raise ValueError("X25519 public key must be 32 bytes")
        self._raw = bytes(raw)

    def __bytes__(self) -> bytes:
        return self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OnionPublicKey) and other._raw == self._raw

    def __repr__(self) -> str:
        return f"OnionPublicKey({self._raw[:4].hex()}…)"


class OnionKey:
    """An X25519 private key for Sphinx processing, bound to an epoch number."""

    __slots__ = ("_sk", "public", "epoch")
    SIZE = 32

    def __init__(self, secret: bytes, epoch: int) -> None:
        if len(secret) != self.SIZE:
            raise LocalError("X25519 secret must be 32 bytes")
        if epoch < 0:
            raise LocalError("epoch must be >= 0")
        self._sk = bytes(secret)
        self.public = OnionPublicKey(_sodium.crypto_scalarmult_base(self._sk))
        self.epoch = epoch

    @classmethod
    def generate(cls, epoch: int = 0) -> OnionKey:
        return cls(os.urandom(cls.SIZE), epoch)

    def secret(self) -> bytes:
        return self._sk

    def exchange(self, point: bytes) -> bytes:
        return x25519(self._sk, point)

    def __repr__(self) -> str:
        return f"OnionKey(epoch={self.epoch})"


# ---- raw primitives (hot path) ----------------------------------------------


def x25519(scalar: bytes, point: bytes) -> bytes:
    """X25519 scalar multiplication (clamped). Raises BadSignature-free ValueError on low order."""
    try:
        return _sodium.crypto_scalarmult(scalar, point)
    except nacl.exceptions.RuntimeError as e:  # all-zero output: low-order point
        raise ValueError("low-order point") from e


def x25519_base(scalar: bytes) -> bytes:
    return _sodium.crypto_scalarmult_base(scalar)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def kdf(key: bytes, label: bytes, length: int = 32) -> bytes:
    """BLAKE2b keyed KDF with a distinct label (personalisation, <= 16 bytes)."""
    return hashlib.blake2b(b"", digest_size=length, key=key, person=label).digest()


def mac(key: bytes, data: bytes, length: int = 16) -> bytes:
    return hashlib.blake2b(data, digest_size=length, key=key).digest()


def hash32(data: bytes, person: bytes = b"") -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=person).digest()


def ct_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


_ZERO_NONCE = b"\0" * 16


def stream_xor(key: bytes, data: bytes, nonce: bytes = _ZERO_NONCE) -> bytes:
    """ChaCha20 keystream XOR (OpenSSL). ``nonce`` is the 16-byte counter||nonce block."""
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return enc.update(data)


def keystream(key: bytes, length: int, nonce: bytes = _ZERO_NONCE) -> bytes:
    return stream_xor(key, b"\0" * length, nonce)
