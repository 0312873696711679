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

    3 in_flight  (only when non-empty) array of 1..64 [key, exit id (bstr 32)]:
                 asked keys another exit marked in flight (below) and has
                 not withdrawn; never the asker's own marks

A key is in at most one of the first two lists. A gossiped notice must carry at
least one key.

In-flight marks, on the stream protocol ``/hydra/inflight/1.0.0``: an exit
about to hand a message's destination the last piece it needs to take it (the
SMTP final dot) tells other exits so, and withdraws the mark if the attempt
ends without a delivery::

    0 version  uint (=1)
    1 key      bstr 16: the message's notice key
    2 ended    uint: 0 "in flight at me now", 1 "my attempt ended, not delivered"

The receiver answers with the same frame (an acknowledgement).

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
MARK_PROTOCOL = "/hydra/inflight/1.0.0"
VERSION = 1
KEY_SIZE = 16
NODE_ID_SIZE = 32
MAX_KEYS = 64
MAX_SIZE = 16 + MAX_KEYS * (KEY_SIZE + 1)  # map, version, array header, 64 x (hdr + 16)
# ... + key 3, array header, 64 x [array hdr, key (hdr + 16), id (2-byte hdr + 32)]
ANSWER_MAX_SIZE = 24 + 2 * MAX_KEYS * (KEY_SIZE + 1) + 3 + MAX_KEYS * (KEY_SIZE + NODE_ID_SIZE + 4)
MARK_MAX_SIZE = 32
K_VERSION, K_KEYS, K_HOLDING, K_IN_FLIGHT = 0, 1, 2, 3
K_KEY, K_ENDED = 1, 2


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
    """Of the asked keys: which the answerer knows as delivered, which it holds, and
    which another exit marked in flight (``(key, raw exit id)`` pairs)."""

    delivered: tuple[bytes, ...] = ()
    holding: tuple[bytes, ...] = ()
    in_flight: tuple[tuple[bytes, bytes], ...] = ()

    def __post_init__(self) -> None:
        Delivered(self.delivered)
        Delivered(self.holding)
        if set(self.delivered) & set(self.holding):
            raise ValueError("a key is either delivered or held")
        Delivered(tuple(k for k, _ in self.in_flight))
        if any(len(m) != NODE_ID_SIZE for _, m in self.in_flight):
            raise ValueError(f"an in-flight mark names an exit by its {NODE_ID_SIZE}-byte id")


@dataclass(frozen=True, slots=True)
class Mark:
    """The sender is handing this message to its destination now (``ended`` False),
    or its attempt ended without a delivery (``ended`` True)."""

    key: bytes
    ended: bool = False

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE or type(self.ended) is not bool:
            raise ValueError(f"a mark carries one {KEY_SIZE}-byte key and a bool")


def encode_answer(answer: Answer) -> bytes:
    m = {
        K_VERSION: VERSION,
        K_KEYS: [bytes(k) for k in answer.delivered],
        K_HOLDING: [bytes(k) for k in answer.holding],
    }
    if answer.in_flight:
        m[K_IN_FLIGHT] = [[bytes(k), bytes(x)] for k, x in answer.in_flight]
    return cbor.dumps(m)


def decode_answer(data: bytes) -> Answer:
    raw = cbor.loads_versioned(data, ANSWER_MAX_SIZE, VERSION, "delivery answer")
    cbor.expect_map(raw, {K_VERSION, K_KEYS, K_HOLDING}, {K_IN_FLIGHT})
    lists = [
        tuple(cbor.bstr(k, "key", KEY_SIZE) for k in cbor.array(raw[i], "keys", MAX_KEYS))
        for i in (K_KEYS, K_HOLDING)
    ]
    if set(lists[0]) & set(lists[1]):
        raise DecodeError(Reason.MALFORMED, "a key is both delivered and held")
    marks: list[tuple[bytes, bytes]] = []
    if K_IN_FLIGHT in raw:
        for pair in cbor.array(raw[K_IN_FLIGHT], "in-flight marks", MAX_KEYS):
            if type(pair) is not list or len(pair) != 2:
                raise DecodeError(Reason.MALFORMED, "an in-flight mark is [key, exit id]")
            marks.append(
                (cbor.bstr(pair[0], "key", KEY_SIZE), cbor.bstr(pair[1], "exit id", NODE_ID_SIZE))
            )
        if not marks:
            raise DecodeError(Reason.MALFORMED, "in-flight marks: empty (omit the key)")
    return Answer(*lists, tuple(marks))


def encode_mark(mark: Mark) -> bytes:
    return cbor.dumps({K_VERSION: VERSION, K_KEY: bytes(mark.key), K_ENDED: int(mark.ended)})


def decode_mark(data: bytes) -> Mark:
    raw = cbor.loads_versioned(data, MARK_MAX_SIZE, VERSION, "in-flight mark")
    cbor.expect_map(raw, {K_VERSION, K_KEY, K_ENDED})
    ended = raw[K_ENDED]
    if type(ended) is not int or ended not in (0, 1):
        raise DecodeError(Reason.MALFORMED, "ended must be 0 or 1")
    return Mark(cbor.bstr(raw[K_KEY], "key", KEY_SIZE), bool(ended))


def encode(frame: Delivered) -> bytes:
    return cbor.dumps({K_VERSION: VERSION, K_KEYS: [bytes(k) for k in frame.keys]})


def decode(data: bytes) -> Delivered:
    raw = cbor.loads_versioned(data, MAX_SIZE, VERSION, "delivery notice")
    cbor.expect_map(raw, {K_VERSION, K_KEYS})
    keys = cbor.array(raw[K_KEYS], "keys", MAX_KEYS)
    return Delivered(tuple(cbor.bstr(k, "key", KEY_SIZE) for k in keys))
