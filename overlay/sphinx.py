"""Sphinx packet format (re-exports ``overlay.onion``): pure functions, no I/O.

``build_packet`` / ``make_surb`` / ``use_surb`` (senders and repliers),
``process`` (each hop), ``open_reply`` (a SURB's creator), ``ReplayCache``
(callers own it). Layout and rationale: docs/sphinx.md.
"""

from .onion.build import BuiltPacket as BuiltPacket
from .onion.build import build_packet as build_packet
from .onion.params import CLASSES as CLASSES
from .onion.params import LARGE as LARGE
from .onion.params import SMALL as SMALL
from .onion.params import Hop as Hop
from .onion.params import MessageTooLong as MessageTooLong
from .onion.params import PacketParams as PacketParams
from .onion.params import PacketRejected as PacketRejected
from .onion.params import ReplayCacheFull as ReplayCacheFull
from .onion.params import params_for_message as params_for_message
from .onion.params import params_for_packet as params_for_packet
from .onion.process import Deliver as Deliver
from .onion.process import Forward as Forward
from .onion.process import peek_epoch as peek_epoch
from .onion.process import process as process
from .onion.replay import ReplayCache as ReplayCache
from .onion.surb import SurbPacket as SurbPacket
from .onion.surb import SurbSecret as SurbSecret
from .onion.surb import make_surb as make_surb
from .onion.surb import open_reply as open_reply
from .onion.surb import use_surb as use_surb

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
