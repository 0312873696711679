"""NAT traversal for feed links: DCUtR (upgrading relayed connections to direct
ones) and AutoNAT v1, both the dial-back server and the client probe.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from ..errors import LocalError
from . import upstream
from .errors import _LIBP2P_IO_ERRORS, NetError, StreamOpenError
from .sockets import _addr_ip, _is_relayed
from .streams import one_request

logger = logging.getLogger(__name__)


AUTONAT_MAX_MESSAGE = 4096
AUTONAT_MAX_ADDRS = 16
AUTONAT_MAX_CONCURRENT = 8


@dataclass(frozen=True, slots=True)
class AutoNATResult:
    """A dial-back verdict: ``status`` is ``"ok"``, ``"dial_error"``, ``"refused"``,
    ``"bad_request"`` or ``"internal_error"``; ``addr`` is what the server reached."""

    status: str
    addr: str | None = None
    text: str = ""


_AUTONAT_STATUS = {
    AutoNATMessage.OK: "ok",
    AutoNATMessage.E_DIAL_ERROR: "dial_error",
    AutoNATMessage.E_DIAL_REFUSED: "refused",
    AutoNATMessage.E_BAD_REQUEST: "bad_request",
    AutoNATMessage.E_INTERNAL_ERROR: "internal_error",
}


class NatPart:
    """DCUtR and AutoNAT of ``Libp2pHost`` (``enable_*`` before start)."""

    _host: Any
    _swarm: Any
    _dcutr: DCUtRProtocol | None
    _autonat_allow: Callable[[str, str], bool] | None
    _autonat_busy: set[str]
    _started: bool
    _dial_timeout: float

    def enable_dcutr(self) -> None:
        """Run DCUtR (call before start): relayed connections are upgraded to direct
        ones where a direct dial or a hole punch works; the relayed connection is
        closed about a minute after a direct one is verified (upstream)."""
        if self._started:
            raise LocalError("enable_dcutr() must be called before the host starts")
        self._dcutr = upstream.LeanDCUtR(self._host, dial_timeout=int(max(1, self._dial_timeout)))

    def enable_autonat(self, allow_dial: Callable[[str, str], bool] | None = None) -> None:
        """Answer AutoNAT v1 dial-back requests (``/libp2p/autonat/1.0.0``).

        Each candidate address is dialed with a new connection to exactly that
        address, which is closed again. As the spec demands, only addresses
        whose IP is the requester's observed IP are dialed — plus those for
        which ``allow_dial(requester_peer_id, addr)`` returns True (Hydra: the
        feeds of the requester's signed record). Requests over relayed
        connections are refused.
        """
        self._autonat_allow = allow_dial
        self._host.set_stream_handler(AUTONAT_PROTOCOL_ID, self._serve_autonat)

    async def _serve_autonat(self, raw: INetStream) -> None:
        # WORKAROUND (AutoNAT dial-back): upstream AutoNATService answers by
        # calling host.connect(), which returns at once because the requester
        # is already connected to us (it opened this stream): every address
        # with the right IP is reported reachable, dead or not. We answer the
        # same protocol but dial each address with a fresh connection.
        # test_autonat_dials_back_each_address_for_real / test_upstream_autonat_dial_back_reuses_connection.
        try:
            with trio.move_on_after(self._dial_timeout * 3 + 2):
                data = await read_varint_prefixed_bytes_limited(raw, AUTONAT_MAX_MESSAGE)
                request = AutoNATMessage()
                request.ParseFromString(data)
                response = await self._autonat_answer(raw, request)
                await raw.write(encode_varint_prefixed(response.SerializeToString()))
        except Exception as e:
            logger.debug("AutoNAT request failed: %r", e)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                with contextlib.suppress(Exception):
                    await raw.close()

    async def _autonat_answer(self, raw: INetStream, request: Any) -> Any:
        response = AutoNATMessage()
        response.type = AutoNATMessage.DIAL_RESPONSE

        def verdict(code: Any, text: str, addr: bytes | None = None) -> Any:
            response.dialResponse.status = code
            response.dialResponse.statusText = text
            if addr is not None:
                response.dialResponse.addr = addr
            return response

        if request.type != AutoNATMessage.DIAL:
            return verdict(AutoNATMessage.E_BAD_REQUEST, "expected DIAL")
        muxed = raw.muxed_conn
        peer = muxed.peer_id
        if request.dial.peer.id and bytes(request.dial.peer.id) != peer.to_bytes():
            return verdict(AutoNATMessage.E_BAD_REQUEST, "may only ask for a dial-back to yourself")
        if _is_relayed(muxed):
            return verdict(AutoNATMessage.E_DIAL_REFUSED, "no dial-backs over relayed connections")
        observed = None
        with contextlib.suppress(Exception):
            remote = muxed.get_remote_address()
            observed = str(ipaddress.ip_address(remote[0])) if remote else None
        candidates: list[multiaddr.Multiaddr] = []
        for raw_addr in list(request.dial.peer.addrs)[:AUTONAT_MAX_ADDRS]:
            try:
                ma = multiaddr.Multiaddr(bytes(raw_addr))
            except Exception:
                continue
            text = str(ma)
            if "/p2p-circuit" in text:
                continue
            if "/p2p/" in text:
                base, _, pid = text.rpartition("/p2p/")
                if pid != str(peer):
                    continue
                ma = multiaddr.Multiaddr(base)
            ip = _addr_ip(ma)
            allowed = ip is not None and ip == observed
            if not allowed and self._autonat_allow is not None:
                with contextlib.suppress(Exception):
                    allowed = bool(self._autonat_allow(str(peer), str(ma)))
            if allowed:
                candidates.append(ma)
        if not candidates:
            return verdict(AutoNATMessage.E_DIAL_REFUSED, "no address we may dial")
        # bounded work: one request per peer at a time, a few at once overall
        if str(peer) in self._autonat_busy or len(self._autonat_busy) >= AUTONAT_MAX_CONCURRENT:
            return verdict(AutoNATMessage.E_DIAL_REFUSED, "busy, try later")
        self._autonat_busy.add(str(peer))
        try:
            return await self._autonat_dial_back(peer, candidates, verdict)
        finally:
            self._autonat_busy.discard(str(peer))

    async def _autonat_dial_back(
        self, peer: ID, candidates: list[multiaddr.Multiaddr], verdict: Callable[..., Any]
    ) -> Any:
        for ma in candidates:
            conn = None
            with trio.move_on_after(self._dial_timeout):
                with contextlib.suppress(*_LIBP2P_IO_ERRORS):
                    conn = await self._swarm.dial_addr(ma, peer)
            self._swarm.unblock_peer(peer)
            if conn is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    with contextlib.suppress(Exception):
                        await conn.close()
                return verdict(AutoNATMessage.OK, "dialed back", ma.to_bytes())
        return verdict(AutoNATMessage.E_DIAL_ERROR, "all dial-backs failed")

    async def autonat_probe(
        self, server_peer_id: str, addrs: Sequence[str], *, timeout: float | None = None
    ) -> AutoNATResult:
        """Ask ``server_peer_id`` to dial us back at ``addrs`` (AutoNAT v1 client).

        Raises ``StreamOpenError`` if the server cannot be asked (not
        connected, no AutoNAT), ``NetError`` on a broken exchange.
        """
        self._require_running()
        try:
            server = ID.from_base58(server_peer_id)
        except Exception as e:
            raise LocalError(f"invalid peer id {server_peer_id!r}") from e
        request = AutoNATMessage()
        request.type = AutoNATMessage.DIAL
        request.dial.peer.id = ID.from_base58(self.peer_id).to_bytes()
        for a in list(addrs)[:AUTONAT_MAX_ADDRS]:
            request.dial.peer.addrs.append(multiaddr.Multiaddr(a).to_bytes())
        deadline = self._dial_timeout * 3 + 3 if timeout is None else timeout

        async def talk(raw: INetStream) -> bytes:
            await raw.write(encode_varint_prefixed(request.SerializeToString()))
            return await read_varint_prefixed_bytes_limited(raw, AUTONAT_MAX_MESSAGE)

        data = await one_request(
            self._host,
            server,
            AUTONAT_PROTOCOL_ID,
            talk,
            deadline,
            "AutoNAT probe",
            open_error=StreamOpenError,
        )
        response = AutoNATMessage()
        try:
            response.ParseFromString(data)
        except Exception as e:
            raise NetError(f"malformed AutoNAT response from {server_peer_id}") from e
        status = _AUTONAT_STATUS.get(response.dialResponse.status, "internal_error")
        addr = None
        if response.dialResponse.HasField("addr"):
            with contextlib.suppress(Exception):
                addr = str(multiaddr.Multiaddr(bytes(response.dialResponse.addr)))
        return AutoNATResult(status, addr, response.dialResponse.statusText)
