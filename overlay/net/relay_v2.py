"""Circuit relay v2 for feed links: the hop service (relaying for others),
reservations on relays, and dials through a relay.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode as RelayStatus
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from ..errors import LocalError
from .errors import DialError, DialTimeout, RelayError, ReservationError
from .limits import REFUSED_BANNED
from .streams import one_request
from .upstream import CircuitProtocol

logger = logging.getLogger(__name__)


# Relay (hop) defaults for Hydra nodes: many small reservations, circuits carry
# gossip/sync/onion traffic, so generous but bounded.
RELAY_MAX_RESERVATIONS = 128
RELAY_MAX_CIRCUITS_PER_PEER = 16
RELAY_RESERVATION_TTL = 600
RELAY_CIRCUIT_DURATION = 3600
RELAY_CIRCUIT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RelayReservation:
    """A circuit-relay v2 reservation we hold on ``relay_peer_id``.

    ``expires_at`` is Unix time (the relay's clock); ``relay_addrs`` are the
    relay's own addresses as it reported them (may be empty when the relay
    listens on wildcard addresses).
    """

    relay_peer_id: str
    expires_at: float
    relay_addrs: tuple[str, ...] = ()


def _split_circuit(addr: multiaddr.Multiaddr) -> tuple[multiaddr.Multiaddr | None, ID, ID]:
    """``<relay transport>/p2p/<relay>/p2p-circuit/p2p/<dest>`` -> (transport|None, relay, dest)."""
    text = str(addr)
    head, sep, tail = text.partition("/p2p-circuit")
    if not sep or not tail.startswith("/p2p/") or tail.count("/") != 2:
        raise LocalError(f"not a circuit address <relay>/p2p-circuit/p2p/<peer>: {text!r}")
    dest = ID.from_base58(tail[len("/p2p/") :])
    base, sep2, relay_text = head.rpartition("/p2p/")
    if not sep2 or "/" in relay_text:
        raise LocalError(f"circuit address names no relay peer: {text!r}")
    relay = ID.from_base58(relay_text)
    return (multiaddr.Multiaddr(base) if base else None), relay, dest


class RelayV2Part:
    """Circuit relay v2 of ``Libp2pHost`` (``enable_relay`` before start)."""

    _host: Any
    _swarm: Any
    _relay: CircuitProtocol | None
    _reservations: dict[str, RelayReservation]
    _started: bool
    _dial_timeout: float
    _stream_timeout: float

    def enable_relay(
        self,
        *,
        hop: bool = False,
        max_reservations: int = RELAY_MAX_RESERVATIONS,
        max_circuits_per_peer: int = RELAY_MAX_CIRCUITS_PER_PEER,
        reservation_ttl: int = RELAY_RESERVATION_TTL,
        circuit_duration: int = RELAY_CIRCUIT_DURATION,
        circuit_bytes: int = RELAY_CIRCUIT_BYTES,
    ) -> None:
        """Run circuit relay v2 (call before the host starts).

        Always accepts relayed connections to us (the "stop" side, needed for
        relay feeds); with ``hop`` also relays for others: accepts up to
        ``max_reservations`` reservations, each for ``reservation_ttl``
        seconds and at most ``max_circuits_per_peer`` concurrent circuits,
        each circuit capped at ``circuit_duration`` seconds and
        ``circuit_bytes`` bytes (the circuit is reset beyond that).
        """
        if self._started:
            raise LocalError("enable_relay() must be called before the host starts")
        limits = RelayLimits(
            duration=int(circuit_duration),
            data=int(circuit_bytes),
            max_circuit_conns=int(max_circuits_per_peer),
            max_reservations=int(max_reservations),
            reservation_ttl=int(reservation_ttl),
        )
        self._relay = CircuitProtocol(self._host, limits=limits, allow_hop=hop)

    @property
    def relay_hop(self) -> bool:
        """Whether this host relays circuits for others."""
        return self._relay is not None and self._relay.allow_hop

    def relay_stats(self) -> dict[str, int]:
        """Hop-side counters: reservations we hold for others and circuits open now."""
        if self._relay is None or not self._relay.allow_hop:
            return {"reservations": 0, "circuits": 0}
        manager = self._relay.resource_manager
        with contextlib.suppress(Exception):
            manager._clean_expired()
        return {
            "reservations": len(getattr(manager, "_reservations", {})),
            "circuits": len(getattr(self._relay, "_active_relays", {})),
        }

    async def reserve(
        self, relay_peer_id: str, *, timeout: float | None = None
    ) -> RelayReservation:
        """Make (or refresh) a circuit-relay v2 reservation on ``relay_peer_id``.

        We must be connected to the relay (or it must be dialable from the
        peerstore). The reservation lasts while that connection lives and
        until ``expires_at``; refresh it before then. Raises
        ``ReservationError`` if the relay refuses, does not speak the
        protocol, or does not answer within ``timeout``.
        """
        self._require_running()
        if self._relay is None:
            raise LocalError("enable_relay() first: relayed connections could not be accepted")
        try:
            relay = ID.from_base58(relay_peer_id)
        except Exception as e:
            raise LocalError(f"invalid peer id {relay_peer_id!r}") from e
        deadline = self._stream_timeout if timeout is None else timeout

        async def talk(raw: Any) -> Any:
            await write_delimited_msg(raw, HopMessage(type=HopMessage.RESERVE))
            return await read_delimited_msg(raw, HopMessage)

        resp = await one_request(
            self._host, relay, HOP_PROTOCOL_ID, talk, deadline, "reservation", ReservationError
        )
        status = int(resp.status) if resp.HasField("status") else int(RelayStatus.OK)
        if status != RelayStatus.OK:
            name = RelayStatus(status).name if status in RelayStatus._value2member_map_ else status
            raise ReservationError(f"relay {relay_peer_id} refused the reservation: {name}")
        if not resp.HasField("reservation") or resp.reservation.expire <= 0:
            raise ReservationError(f"relay {relay_peer_id} answered OK without a reservation")
        addrs: list[str] = []
        for a in resp.reservation.addrs:
            with contextlib.suppress(Exception):
                addrs.append(str(multiaddr.Multiaddr(bytes(a))))
        reservation = RelayReservation(relay_peer_id, float(resp.reservation.expire), tuple(addrs))
        self._reservations[relay_peer_id] = reservation
        return reservation

    def reservations(self) -> dict[str, RelayReservation]:
        """Reservations we hold that have not expired and whose relay is still connected."""
        now = time.time()
        live = {}
        for relay, r in list(self._reservations.items()):
            if r.expires_at <= now:
                del self._reservations[relay]
                continue
            with contextlib.suppress(Exception):
                if self._swarm.connections.get(ID.from_base58(relay)):
                    live[relay] = r
        return live

    def forget_reservation(self, relay_peer_id: str) -> None:
        self._reservations.pop(relay_peer_id, None)

    async def connect_circuit(self, addr: str, *, reuse: bool = True) -> str:
        """Connect to a peer through a relay: ``[<relay addr>]/p2p/<relay>/p2p-circuit/p2p/<peer>``.

        Uses an existing connection to the relay, or dials the relay address
        first. The relay must hold a reservation for the peer. Raises
        ``RelayError`` (with the relay's status) if the relay refuses,
        ``DialTimeout``/``DialError`` otherwise.
        """
        self._require_running()
        try:
            ma = multiaddr.Multiaddr(addr)
            relay_base, relay, dest = _split_circuit(ma)
        except LocalError:
            raise
        except Exception as e:
            raise LocalError(f"not a circuit address: {addr!r} ({e})") from e
        if str(dest) == self.peer_id:
            raise LocalError("refusing to dial ourselves")
        if str(relay) in (self.peer_id, str(dest)):
            raise LocalError(f"a circuit needs a relay other than both ends: {addr!r}")
        if self.is_banned(str(dest)):
            self._count_refused(REFUSED_BANNED)
            raise DialError(f"circuit {addr} refused: {dest} is banned")
        if reuse and self._swarm.connections.get(dest):
            return str(dest)
        if not self._swarm.connections.get(relay):
            if relay_base is None:
                raise DialError(f"not connected to relay {relay} and no address to dial it")
            await self.connect(f"{relay_base}/p2p/{relay}")
        with trio.move_on_after(self._dial_timeout) as scope:
            try:
                raw = await self._host.new_stream(relay, [HOP_PROTOCOL_ID])
            except Exception as e:
                raise DialError(f"no relay stream to {relay}: {e!r}") from e
            try:
                await write_delimited_msg(
                    raw, HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=dest.to_bytes()))
                )
                resp = await read_delimited_msg(raw, HopMessage)
                status = int(resp.status) if resp.HasField("status") else int(RelayStatus.OK)
                if status != RelayStatus.OK:
                    name = (
                        RelayStatus(status).name
                        if status in RelayStatus._value2member_map_
                        else str(status)
                    )
                    raise RelayError(f"relay {relay} refused the circuit to {dest}: {name}", name)
                conn = RawConnection(
                    stream=raw,
                    initiator=True,
                    connection_type=ConnectionType.RELAYED,
                    addresses=[ma],
                )
                await self._host.upgrade_outbound_connection(conn, dest)
            except BaseException as e:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    with contextlib.suppress(Exception):
                        await raw.reset()
                if isinstance(e, RelayError):
                    raise
                if isinstance(e, Exception):
                    raise DialError(f"circuit {addr} failed: {e!r}") from e
                raise
        if scope.cancelled_caught:
            raise DialTimeout(f"circuit {addr} timed out after {self._dial_timeout:g} s")
        return str(dest)
