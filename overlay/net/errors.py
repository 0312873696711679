"""The network layer's errors: all ``LocalError`` (unreachable, slow or refused
peers are not evidence of misbehaviour), and the upstream exceptions that mean
"this connection or stream failed".
"""

from __future__ import annotations

import logging

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.transport.exceptions import UpgradeFailure

from ..errors import LocalError

logger = logging.getLogger(__name__)


class NetError(LocalError):
    """A network operation failed (unreachable, slow, refused). Not a protocol violation."""


class DialError(NetError):
    """Could not establish a connection (refused, handshake failed, wrong peer id)."""


class DialTimeout(DialError):
    """The dial did not complete within ``dial_timeout``."""


class DialHandshakeFailed(DialError):
    """TCP connected, but the security or muxer handshake failed or ran out of
    time (a busy peer that dropped the slow handshake, a lossy path, a wrong
    peer id): unlike a refusal, worth trying again later."""


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


def _handshake_failed(e: BaseException) -> bool:
    """Whether a failed dial got as far as the handshake: upstream wraps a
    security or muxer upgrade that failed (or ran out of its time) in a
    ``SwarmException``; the cause or context chain holds the upgrade's error."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, UpgradeFailure | trio.TooSlowError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False
