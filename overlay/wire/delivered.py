"""Delivery notices (gossip topic ``hydra/delivered/1``): "an exit delivered these messages".

An exit that delivers a message publishes its *notice key*; an exit that is
later handed the same message (the sender resent it because the first exit
died before its acknowledgement came back) finds the key and answers
``delivered`` instead of delivering a second copy.

Wire format: one canonical CBOR map::

    0 version  uint (=1)
    1 keys     array of 0..64 bstr 16: notice_key(message id) of each message

The same frame is also a question on the stream protocol
``/hydra/delivered/1.0.0``: an exit about to deliver a message that waited
(it was paused, cut off, or the destination was down) or that the sender
resent after handing it to other exits (``earlier`` in the exit message) asks
those exits and a few other exit-capable peers about the message's key. The
question means "I hold these and am about to deliver them". The answer is::

    0 version    uint (=1)
    1 delivered  array of 0..64 bstr 16: asked keys the answerer knows as delivered
    2 holding    array of 0..64 bstr 16: asked keys the answerer holds and will
                 deliver itself (the asker then waits for its notice)

A key is in at most one of the two lists. A gossiped notice must carry at
least one key.

``notice_key(id)`` is the first 16 bytes of BLAKE2b-256 with personalisation
``hydra-delivered`` over the 16-byte message id: receivers match it against
the ids they hold, while the notice itself does not carry the id that appears
in the delivered message.

Authenticity comes from the gossip layer: every message is signed by its
origin (libp2p strict signing), and receivers accept a notice only when its
origin's record holds the EXIT or STANDBY_EXIT role.

Invariants: ``decode`` caps the size before parsing, accepts only the
canonical encoding with exactly these keys, raises only ``DecodeError``;
``decode(encode(f)) == f``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..crypto import hash32
from ..errors import DecodeError, Reason
from . import cbor

TOPIC = "hydra/delivered/1"
PROTOCOL = "/hydra/delivered/1.0.0"
VERSION = 1
KEY_SIZE = 16
MAX_KEYS = 64
MAX_SIZE = 16 + MAX_KEYS * (KEY_SIZE + 1)  # map, version, array header, 64 x (hdr + 16)
ANSWER_MAX_SIZE = 24 + 2 * MAX_KEYS * (KEY_SIZE + 1)
K_VERSION, K_KEYS, K_HOLDING = 0, 1, 2


def notice_key(message_id: bytes) -> bytes:
    return hash32(bytes(message_id), person=b"hydra-delivered")[:KEY_SIZE]


@dataclass(frozen=True, slots=True)
class Delivered:
    """The messages with these notice keys were delivered by the notice's origin."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.keys) > MAX_KEYS or any(len(k) != KEY_SIZE for k in self.keys):
            raise ValueError(f"a notice carries up to {MAX_KEYS} keys of {KEY_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Answer:
    """Of the asked keys: which the answerer knows as delivered, which it holds."""

    delivered: tuple[bytes, ...] = ()
    holding: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        Delivered(self.delivered)
        Delivered(self.holding)
        if set(self.delivered) & set(self.holding):
            raise ValueError("a key is either delivered or held")


def encode_answer(answer: Answer) -> bytes:
    return cbor.dumps(
        {
            K_VERSION: VERSION,
            K_KEYS: [bytes(k) for k in answer.delivered],
            K_HOLDING: [bytes(k) for k in answer.holding],
        }
    )


def decode_answer(data: bytes) -> Answer:
    raw = cbor.loads_versioned(data, ANSWER_MAX_SIZE, VERSION, "delivery answer")
    cbor.expect_map(raw, {K_VERSION, K_KEYS, K_HOLDING})
    lists = [
        tuple(cbor.bstr(k, "key", KEY_SIZE) for k in cbor.array(raw[i], "keys", MAX_KEYS))
        for i in (K_KEYS, K_HOLDING)
    ]
    if set(lists[0]) & set(lists[1]):
        raise DecodeError(Reason.MALFORMED, "a key is both delivered and held")
    return Answer(*lists)


def encode(frame: Delivered) -> bytes:
    return cbor.dumps({K_VERSION: VERSION, K_KEYS: [bytes(k) for k in frame.keys]})


def decode(data: bytes) -> Delivered:
    raw = cbor.loads_versioned(data, MAX_SIZE, VERSION, "delivery notice")
    cbor.expect_map(raw, {K_VERSION, K_KEYS})
    keys = cbor.array(raw[K_KEYS], "keys", MAX_KEYS)
    return Delivered(tuple(cbor.bstr(k, "key", KEY_SIZE) for k in keys))
