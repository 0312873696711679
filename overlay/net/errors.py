"""The network layer's errors: all ``LocalError`` (unreachable, slow or refused
peers are not evidence of misbehaviour), and the upstream exceptions that mean
"this connection or stream failed".
"""

from __future__ import annotations

import logging

import trio
from libp2p.exceptions import BaseLibp2pError

from ..errors import LocalError

logger = logging.getLogger(__name__)


class NetError(LocalError):
    """A network operation failed (unreachable, slow, refused). Not a protocol violation."""


class DialError(NetError):
    """Could not establish a connection (refused, handshake failed, wrong peer id)."""


class DialTimeout(DialError):
    """The dial did not complete within ``dial_timeout``."""


class StreamOpenError(NetError):
    """Could not open a stream (no connection, protocol not supported, reset)."""


class StreamOpenTimeout(StreamOpenError):
    """Opening the stream (including protocol negotiation) took too long."""


class StreamLimitReached(StreamOpenTimeout):
    """All ``max_streams_per_conn`` stream slots for the peer stayed busy until the deadline."""


class StreamBroken(NetError):
    """The stream was reset or closed under us while reading or writing."""


class DhtError(NetError):
    """A DHT operation could not be carried out."""


class DhtTimeout(DhtError):
    """A DHT operation did not finish within ``dht_timeout``."""


class RelayError(DialError):
    """A relay refused or could not complete a circuit (``status`` is the relay's code name)."""

    def __init__(self, message: str, status: str = "") -> None:
        super().__init__(message)
        self.status = status


class ReservationError(NetError):
    """A relay refused a reservation, or the reservation exchange failed."""


_LIBP2P_IO_ERRORS: tuple[type[BaseException], ...] = (
    BaseLibp2pError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    ValueError,  # QUIC streams raise ValueError on use after close
)
