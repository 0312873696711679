"""Sphinx onion packets: pure functions, no I/O.

``build_packet`` / ``make_surb`` / ``use_surb`` (senders and repliers),
``process`` (each hop), ``open_reply`` (a SURB's creator), ``ReplayCache``
(callers own it). Layout and rationale: docs/sphinx.md.
"""

from .build import BuiltPacket as BuiltPacket
from .build import build_packet as build_packet
from .params import CLASSES as CLASSES
from .params import LARGE as LARGE
from .params import SMALL as SMALL
from .params import Hop as Hop
from .params import MessageTooLong as MessageTooLong
from .params import PacketParams as PacketParams
from .params import PacketRejected as PacketRejected
from .params import ReplayCacheFull as ReplayCacheFull
from .params import params_for_message as params_for_message
from .params import params_for_packet as params_for_packet
from .process import Deliver as Deliver
from .process import Forward as Forward
from .process import peek_epoch as peek_epoch
from .process import process as process
from .replay import ReplayCache as ReplayCache
from .surb import SurbPacket as SurbPacket
from .surb import SurbSecret as SurbSecret
from .surb import make_surb as make_surb
from .surb import open_reply as open_reply
from .surb import use_surb as use_surb

__all__ = [
    "BuiltPacket",
    "CLASSES",
    "Deliver",
    "Forward",
    "Hop",
    "LARGE",
    "MessageTooLong",
    "PacketParams",
    "PacketRejected",
    "ReplayCache",
    "ReplayCacheFull",
    "SMALL",
    "SurbPacket",
    "SurbSecret",
    "build_packet",
    "make_surb",
    "open_reply",
    "params_for_message",
    "params_for_packet",
    "peek_epoch",
    "process",
    "use_surb",
]
