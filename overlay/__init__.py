"""Hydra: a self-healing peer-to-peer overlay for remailer entry and exit points.

The public API, re-exported here; everything else is internal.
"""

from .config import Config as Config
from .crypto import NodeId as NodeId
from .crypto import OnionKey as OnionKey
from .crypto import SigningKey as SigningKey
from .errors import DecodeError as DecodeError
from .errors import LocalError as LocalError
from .errors import OverlayError as OverlayError
from .errors import Reason as Reason
from .errors import RemoteError as RemoteError
from .home import Home as Home
from .records import Role as Role
from .records import ValidRecord as ValidRecord
from .records import decode as decode_record
from .records import validate as validate_record
from .runtime import Node as Node

__all__ = [
    "Config",
    "DecodeError",
    "Home",
    "LocalError",
    "Node",
    "NodeId",
    "OnionKey",
    "OverlayError",
    "Reason",
    "RemoteError",
    "Role",
    "SigningKey",
    "ValidRecord",
    "decode_record",
    "validate_record",
]
