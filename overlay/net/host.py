"""``Libp2pHost``: the one object that owns the py-libp2p host (libp2p 0.8.1).

Everything Hydra needs from libp2p goes through ``Libp2pHost``: identity,
listeners (TCP, QUIC, WebSocket), dialing, custom stream protocols, GossipSub
and the Kademlia DHT, and for feed links circuit relay v2 (hop service,
reservations, circuit dials), DCUtR, an AutoNAT v1 server and client, and
per-connection accounting (``connections()``). It moves bytes only; records,
validation rules and protocol logic live above it and reach it as plain
callables.

This module is the facade: construction, lifecycle, dials. Each protocol is a
part in its own module that the class combines, so callers see one object:

| module | part |
|---|---|
| ``streams.py`` | ``Stream``, per-peer stream slots, ``set_stream_handler``/``open_stream`` |
| ``limits.py`` | ``ConnectionLimits``, inbound gate, bans, refusal counting |
| ``sockets.py`` | ``ConnInfo``, the socket under a connection, TCP keepalive tuning |
| ``pubsub.py`` | GossipSub topics, ``Subscription``, guarded validators |
| ``dht.py`` | Kad-DHT values and providers, routing-table upkeep |
| ``relay_v2.py`` | circuit relay v2: hop service, reservations, circuit dials |
| ``nat.py`` | DCUtR and AutoNAT (server and probe) |
| ``upstream.py`` | every patch of libp2p itself, and the index of all workarounds |
| ``errors.py`` | ``NetError`` and its subclasses |

Every place where py-libp2p 0.8.1 needs help is marked ``WORKAROUND`` with
the upstream behaviour it compensates for, and has a test in
``tests/integration/test_host.py`` or, for the feed-link parts,
``tests/integration/test_relay_v2.py`` (the "upstream canary" tests there show the
upstream behaviour itself, so they start failing when upstream fixes it and the
workaround can go). ``upstream.py`` lists them all.

Invariants:
- identity is the Ed25519 key of the caller's ``SigningKey``: ``peer_id``
  equals ``signing_key.node_id.peer_id()``;
- TCP and WebSocket connections are secured with Noise only and multiplexed
  with Yamux only (QUIC brings its own TLS 1.3 and stream multiplexing);
- no call waits forever: dials, stream opens and DHT operations have deadlines
  and raise ``NetError`` subclasses (``LocalError`` branch: unreachable or slow
  peers are not evidence of misbehaviour);
- at most ``max_streams_per_conn`` of our outbound streams, and as many inbound
  ones, are open per peer at a time; inbound ones also at most
  ``max_streams_per_protocol`` per peer and protocol;
- inbound connections are bounded (``ConnectionLimits``) per source address,
  in total, and in unfinished handshakes per address, checked at accept before
  any cryptography; a slot is held exactly as long as its connection lives;
- connections in both directions together stay within ``max_connections``
  (inbound refused at accept, our dials refused before they start);
- banned peer ids are never dialed, and their connections (either direction)
  are closed right after the handshake authenticates them;
- the node's own keys never depend on the (evictable) peerstore;
- leaving the ``async with`` (or cancelling ``run``) closes listeners,
  connections and every task this class started.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair as _ed25519_key_pair
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.websocket.transport import WebsocketTransport

from ..crypto import SigningKey
from ..errors import LocalError
from . import upstream
from .dht import DhtPart, RecordValidator, _GuardedValidator
from .errors import (
    _LIBP2P_IO_ERRORS,
    DhtError,
    DhtTimeout,
    DialError,
    DialHandshakeFailed,
    DialTimeout,
    NetError,
    RelayError,
    ReservationError,
    StreamBroken,
    StreamLimitReached,
    StreamOpenError,
    StreamOpenTimeout,
    _handshake_failed,
)
from .limits import (
    MAX_OUTBOUND_CONNECTIONS,
    REFUSED_BANNED,
    REFUSED_CONNECTION_LIMIT,
    REFUSED_HANDSHAKE_TIMEOUT,
    REFUSED_HANDSHAKES_PER_IP,
    REFUSED_INBOUND_LIMIT,
    REFUSED_INBOUND_PER_IP,
    REFUSED_STREAM_LIMIT,
    ConnectionLimits,
    LimitsPart,
    _BanList,
    _InboundGate,
)
from .nat import AutoNATResult, NatPart
from .pubsub import GossipMessage, GossipPart, GossipValidator, Subscription, _SubSlot
from .relay_v2 import RelayReservation, RelayV2Part
from .sockets import TCP_USER_TIMEOUT_MS, ConnectionsPart, ConnInfo
from .streams import YAMUX_STREAM_BACKLOG, Stream, StreamHandler, StreamsPart, _PeerSlots
from .upstream import UPSTREAM_HAPPY_EYEBALLS_DELAY

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_OUTBOUND_CONNECTIONS",
    "REFUSED_BANNED",
    "REFUSED_CONNECTION_LIMIT",
    "REFUSED_HANDSHAKES_PER_IP",
    "REFUSED_HANDSHAKE_TIMEOUT",
    "REFUSED_INBOUND_LIMIT",
    "REFUSED_INBOUND_PER_IP",
    "REFUSED_STREAM_LIMIT",
    "TCP_USER_TIMEOUT_MS",
    "UPSTREAM_HAPPY_EYEBALLS_DELAY",
    "YAMUX_STREAM_BACKLOG",
    "AutoNATResult",
    "ConnInfo",
    "ConnectionLimits",
    "DhtError",
    "DhtTimeout",
    "DialError",
    "DialHandshakeFailed",
    "DialTimeout",
    "GossipMessage",
    "GossipValidator",
    "Libp2pHost",
    "NetError",
    "RecordValidator",
    "RelayError",
    "RelayReservation",
    "ReservationError",
    "Stream",
    "StreamBroken",
    "StreamHandler",
    "StreamLimitReached",
    "StreamOpenError",
    "StreamOpenTimeout",
    "Subscription",
]


class _Notifee(INotifee):
    """Forwards connection events to the host (never blocks the swarm)."""

    def __init__(self, host: Libp2pHost) -> None:
        self._host = host

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        if self._host._refuse_if_banned(conn):
            await trio.lowlevel.checkpoint()
            return
        self._host._on_connected(conn.muxed_conn.peer_id)
        self._host._tune_connection(conn)
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._host._reopen_gossip_stream(conn)
        self._host._on_disconnected(conn.muxed_conn.peer_id, upstream.was_trimmed(conn))
        await trio.lowlevel.checkpoint()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class Libp2pHost(
    StreamsPart, LimitsPart, ConnectionsPart, GossipPart, DhtPart, RelayV2Part, NatPart
):
    """A running libp2p node: transports, streams, GossipSub and Kad-DHT.

    Use ``async with Libp2pHost(...) as host:`` or, as a service,
    ``await nursery.start(host.run)``. Methods other than the constructor,
    ``peer_id`` and ``set_*`` handlers need the host to be running.
    """

    def __init__(
        self,
        signing_key: SigningKey,
        listen: Sequence[str],
        *,
        dial_timeout: float = 5.0,
        stream_timeout: float | None = None,
        max_streams_per_conn: int = 128,
        gossip_topics: Iterable[str] = (),
        gossip_heartbeat: float = 1.0,
        gossip_degree: tuple[int, int, int] = (6, 4, 12),
        gossip_max_message_size: int = 64 * 1024,
        gossip_buffer: int = 256,
        gossip_rate_limit: float = 50.0,
        enable_dht: bool = True,
        dht_validators: Mapping[str, RecordValidator] | None = None,
        dht_timeout: float = 20.0,
        auto_connect: bool = False,
        limits: ConnectionLimits | None = None,
        max_streams_per_protocol: int = 32,
    ) -> None:
        """
        :param listen: multiaddrs to bind, e.g. ``/ip4/0.0.0.0/tcp/4001``,
            ``/ip4/0.0.0.0/udp/4001/quic-v1``, ``/ip4/0.0.0.0/tcp/4002/ws``;
            port 0 picks a free port (see ``listen_addrs()``).
        :param dial_timeout: deadline for ``connect`` and for connection upgrades.
        :param stream_timeout: deadline for ``open_stream`` (default: ``dial_timeout``).
        :param max_streams_per_conn: concurrent outbound (and, separately,
            inbound) streams per peer opened through this class; must stay
            well below Yamux's 256 to leave room for pubsub/DHT/identify.
        :param gossip_topics: topics joined (and relayed) from the start.
        :param gossip_heartbeat: GossipSub heartbeat in seconds.
        :param gossip_degree: GossipSub mesh degree (D, D_low, D_high).
        :param gossip_max_message_size: ``publish`` refuses larger payloads.
        :param gossip_buffer: per-``Subscription`` buffer (messages).
        :param gossip_rate_limit: messages per second per topic that one
            forwarding peer (ourselves included) may push through the router;
            excess is silently not forwarded (upstream spam protection).
        :param dht_validators: namespace -> ``RecordValidator``; only keys
            ``/<namespace>/...`` of these namespaces are accepted (strict mode).
        :param dht_timeout: deadline for each DHT operation.
        :param auto_connect: let libp2p's auto-connector dial peers from the
            peerstore on its own (off: the runtime decides whom to dial).
        :param limits: inbound connection bounds and the handshake timeout
            (``ConnectionLimits`` defaults when omitted).
        :param max_streams_per_protocol: default bound on concurrent inbound
            streams of one protocol from one peer, at most ``max_streams_per_conn``
            (``set_stream_handler`` may override it per protocol).
        """
        if not 1 <= max_streams_per_conn <= YAMUX_STREAM_BACKLOG // 2:
            raise LocalError(f"max_streams_per_conn must be in 1..{YAMUX_STREAM_BACKLOG // 2}")
        if dial_timeout <= 0 or dht_timeout <= 0 or gossip_heartbeat <= 0:
            raise LocalError("timeouts and heartbeat must be positive")
        if not listen:
            raise LocalError("at least one listen multiaddr is required")
        try:
            self._listen = [multiaddr.Multiaddr(a) for a in listen]
        except Exception as e:
            raise LocalError(f"invalid listen multiaddr: {e}") from e

        self._dial_timeout = float(dial_timeout)
        self._stream_timeout = float(stream_timeout or dial_timeout)
        self._dht_timeout = float(dht_timeout)
        self._gossip_max = int(gossip_max_message_size)
        self._gossip_buffer = int(gossip_buffer)
        self._initial_topics = list(gossip_topics)
        self._auto_connect = auto_connect
        self._slots = _PeerSlots(max_streams_per_conn)
        if max_streams_per_protocol < 1:
            raise LocalError("max_streams_per_protocol must be >= 1")
        self._max_streams_per_protocol = min(int(max_streams_per_protocol), max_streams_per_conn)
        self.limits = limits or ConnectionLimits()
        self._gate = _InboundGate(self.limits)
        self._bans = _BanList(self.limits.max_bans)
        self._refused_listeners: list[Callable[[str], None]] = []
        self.refused: dict[str, int] = {}
        self._disconnect_listeners: list[Callable[[str, bool], None]] = []

        key_pair = _ed25519_key_pair(signing_key.seed())
        self.peer_id: str = signing_key.node_id.peer_id()
        if str(ID.from_pubkey(key_pair.public_key)) != self.peer_id:  # pragma: no cover
            raise LocalError("libp2p derived a different peer id from the signing key")

        self._host = upstream.new_libp2p_host(
            key_pair,
            self._listen,
            dial_timeout=self._dial_timeout,
            handshake_timeout=self.limits.handshake_timeout,
            max_connections=self.limits.max_connections,
        )
        self._swarm: Any = self._host.get_network()
        self._swarm.register_notifee(_Notifee(self))
        upstream.install_gates(
            self._swarm,
            self._handle_inbound,
            self.is_banned,
            lambda: self._count_refused(REFUSED_BANNED),
        )
        upstream.protect_own_identity(self._host, key_pair, self.peer_id)

        self._gossipsub = upstream.new_gossipsub(gossip_degree, gossip_heartbeat, gossip_rate_limit)
        self._pubsub = upstream.OncePubsub(self._host, self._gossipsub)
        self._joined: dict[str, list[_SubSlot]] = {}

        self._dht: KadDHT | None = None
        self._dht_namespaces: dict[str, _GuardedValidator] = {}
        if enable_dht:
            self._dht_namespaces = {
                ns: _GuardedValidator(v) for ns, v in (dht_validators or {}).items()
            }
            self._dht = upstream.new_dht(self._host, self._dht_namespaces)
        self._dht_key_locks: dict[str, trio.Lock] = {}
        self._dht_peer_send, self._dht_peer_recv = trio.open_memory_channel[ID](256)
        self._dht_pending: set[ID] = set()

        # Feeds (enable_relay / enable_dcutr / enable_autonat, before start).
        self._relay: upstream.CircuitProtocol | None = None
        self._dcutr: DCUtRProtocol | None = None
        self._autonat_allow: Callable[[str, str], bool] | None = None
        self._autonat_busy: set[str] = set()
        self._reservations: dict[str, RelayReservation] = {}

        self._nursery: trio.Nursery | None = None
        self._started = False
        self._cm: contextlib.AbstractAsyncContextManager[Libp2pHost] | None = None

    def peer_protocols(self, peer_id: str) -> list[str]:
        """Protocols ``peer_id`` announced (identify); empty if unknown."""
        try:
            return [
                str(p) for p in self._host.get_peerstore().get_protocols(ID.from_base58(peer_id))
            ]
        except Exception:  # noqa: BLE001 - unknown peer or malformed id
            return []

    # ---- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Libp2pHost:
        cm = self._lifetime()
        result = await cm.__aenter__()
        self._cm = cm
        return result

    async def __aexit__(self, *exc: Any) -> bool | None:
        cm, self._cm = self._cm, None
        if cm is None:
            raise LocalError("__aexit__ without __aenter__")
        return await cm.__aexit__(*exc)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started(self)`` once listening."""
        async with self:
            task_status.started(self)
            await trio.sleep_forever()

    @contextlib.asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[Libp2pHost]:
        if self._started:
            raise LocalError("a Libp2pHost can only be started once")
        self._started = True
        try:
            async with self._services():
                try:
                    yield self
                finally:
                    self._closing = True
        except BaseExceptionGroup as group:
            # listener shutdown race: see upstream.only_shutdown_noise
            if self._closing and upstream.only_shutdown_noise(group):
                return
            # libp2p runs our body inside several nested nurseries, so a single
            # exception (ours at start-up, or the caller's) would come out
            # wrapped in ExceptionGroups; hand back the exception itself.
            leaf = upstream.sole_exception(group)
            if leaf is None:
                raise
            context = leaf.__context__
            try:
                raise leaf
            finally:
                leaf.__context__ = context
                del leaf, group

    _closing = False
    _last_listen_addrs: list[str] = []  # noqa: RUF012 - replaced per instance, never mutated

    @contextlib.asynccontextmanager
    async def _services(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._host.run(self._listen))
            try:
                self._check_listeners()
                if not self._auto_connect:
                    await upstream.stop_auto_connector(self._swarm)
                await stack.enter_async_context(background_trio_service(self._pubsub))
                await stack.enter_async_context(background_trio_service(self._gossipsub))
                await self._pubsub.wait_until_ready()
                if self._dht is not None:
                    await stack.enter_async_context(background_trio_service(self._dht))
                if self._relay is not None:
                    await stack.enter_async_context(background_trio_service(self._relay))
                    await self._relay.event_started.wait()
                if self._dcutr is not None:
                    await stack.enter_async_context(background_trio_service(self._dcutr))
                    await self._dcutr.event_started.wait()
                self._nursery = await stack.enter_async_context(trio.open_nursery())
                if self._dht is not None:
                    self._nursery.start_soon(self._dht_peer_adder)
                for topic in self._initial_topics:
                    await self.join(topic)
                yield
            finally:
                nursery, self._nursery = self._nursery, None
                if nursery is not None:
                    nursery.cancel_scope.cancel()
                for slots in self._joined.values():
                    for slot in slots:
                        slot.send.close()
                self._joined.clear()
                # WORKAROUND (shutdown order): close the host explicitly and
                # BEFORE pubsub/DHT stop; otherwise listeners leak and pubsub's
                # per-peer tasks wait on live streams. Shielded so cancellation
                # of run() still releases sockets. test_close_releases_ports,
                # test_no_tasks_leak.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self._close_connections()
                    await self._host.close()

    async def _close_connections(self) -> None:
        # Swarm.close() closes connections one after another and each close
        # sleeps 100 ms (SwarmConn._cleanup): close them concurrently first.
        # WORKAROUND (WebSocket close): closing a WebSocket connection whose
        # peer is shutting down at the same moment waits for a close
        # handshake that never comes; bound each close. test_ws_shutdown_is_bounded.
        async def _close(conn: Any) -> None:
            with contextlib.suppress(Exception), trio.move_on_after(1.0):
                await conn.close()

        async with trio.open_nursery() as nursery:
            for conns in list(self._swarm.connections.values()):
                for conn in list(conns):
                    nursery.start_soon(_close, conn)
            # WebsocketTransport.close() (inside host.close) closes the raw
            # WebSocket connections it tracks, unbounded; close them here first.
            for transport in self._swarm.transport_manager.get_transports():
                if isinstance(transport, WebsocketTransport):
                    for ws in list(getattr(transport, "_connections", {}).values()):
                        nursery.start_soon(_close, ws)

    def _check_listeners(self) -> None:
        # WORKAROUND (listen errors): Swarm.listen logs and swallows a failed
        # bind (port in use, bad address) and BasicHost.run ignores the result.
        # test_listen_failure_raises.
        bound = set(self._swarm.listeners)
        missing = [str(a) for a in self._listen if str(a) not in bound]
        if missing:
            raise LocalError(
                f"could not listen on {', '.join(missing)} (address in use or not on this"
                " machine); change [node] listen"
            )

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise LocalError("Libp2pHost is not running")
        return self._nursery

    # ---- addresses and connections ------------------------------------------

    @property
    def dial_timeout(self) -> float:
        """Seconds a ``connect`` waits for the connection unless told otherwise."""
        return self._dial_timeout

    def listen_addrs(self) -> list[str]:
        """Bound listen addresses (real ports), each ending in ``/p2p/<peer_id>``."""
        # WORKAROUND (closed listeners): libp2p reads the addresses off the listening
        # sockets, and getsockname() on a listener closed at shutdown raises EBADF.
        # Answer with the last addresses seen instead. test_listen_addrs_after_close.
        if self._closing:
            return list(self._last_listen_addrs)
        try:
            addrs = [f"{a}/p2p/{self.peer_id}" for a in self._host.get_transport_addrs()]
        except OSError:
            return list(self._last_listen_addrs)
        if addrs:
            self._last_listen_addrs = addrs
        return addrs

    def connected_peers(self) -> list[str]:
        return [str(p) for p, conns in self._swarm.connections.items() if conns]

    def reads_from(self, peer_id: str) -> int | None:
        """How many reads our connections to ``peer_id`` have made so far (a count
        that grows whenever the peer sends us anything), None when not connected.
        Compare two values; the number itself means nothing."""
        try:
            pid = ID.from_base58(peer_id)
        except ValueError:
            return None
        return upstream.reads_from(self._swarm, pid)

    def handshakes_with(self, peer_id: str) -> int:
        """Security handshakes completed with ``peer_id`` so far, in either direction
        (a count that grows whenever the peer's process proved itself on a new
        connection, even one that failed afterwards). Compare two values."""
        return self._peer_count(peer_id, upstream.handshakes_with)

    def dials_answered(self, peer_id: str) -> int:
        """Our dials to ``peer_id`` whose TCP connection its address accepted so far
        (a listening process was there; whatever became of the dial after).
        Compare two values."""
        return self._peer_count(peer_id, upstream.answers_from)

    def _peer_count(self, peer_id: str, count: Callable[[Any, ID], int]) -> int:
        """``count(swarm, peer)`` for one of the adapter's per-peer counts; 0 for a
        malformed id."""
        try:
            pid = ID.from_base58(peer_id)
        except ValueError:
            return 0
        return count(self._swarm, pid)

    async def connect(self, addr: str, *, reuse: bool = True, timeout: float | None = None) -> str:
        """Dial exactly ``addr`` (which must end in ``/p2p/<id>``); return the peer id.

        With ``reuse`` (default) an existing connection to that peer is kept and
        nothing is dialed; ``reuse=False`` always opens a new connection over
        ``addr`` (a further feed link). Raises ``DialTimeout`` after ``timeout``
        (default ``dial_timeout``) seconds, ``DialError`` on any other failure and
        ``LocalError`` for a malformed address or our own peer id.

        A circuit address ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>``
        is dialed through that relay (circuit relay v2); see ``connect_circuit``.
        """
        self._require_running()
        if "/p2p-circuit" in addr:
            return await self.connect_circuit(addr, reuse=reuse)
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as e:
            raise LocalError(f"not a dialable /p2p/ multiaddr: {addr!r} ({e})") from e
        peer = info.peer_id
        if str(peer) == self.peer_id:
            raise LocalError("refusing to dial ourselves")
        if reuse and self._swarm.connections.get(peer):
            return str(peer)
        if self.is_banned(str(peer)):
            self._count_refused(REFUSED_BANNED)
            raise DialError(f"dial {addr} refused: {peer} is banned")
        if self._at_connection_limit():
            self._count_refused(REFUSED_CONNECTION_LIMIT)
            raise DialError(
                f"dial {addr} refused: {self.limits.max_connections} connections open "
                "([limits] max_connections)"
            )
        transport_addr = info.addrs[0]
        wait = self._dial_timeout if timeout is None else timeout
        longer = (
            upstream.upgrade_deadline(self._swarm, wait)
            if wait > self._dial_timeout
            else contextlib.nullcontext()
        )
        with longer:
            await self._dial(addr, peer, transport_addr, wait)
        self._swarm.unblock_peer(peer)
        # Only an address that worked goes to the peerstore (for libp2p's own
        # later dials): addresses that records merely claim never fill it.
        self._host.get_peerstore().add_addrs(peer, [transport_addr], 3600)
        return str(peer)

    async def _dial(self, addr: str, peer: ID, transport_addr: Any, wait: float) -> None:
        # WORKAROUND (dial hangs): an unresponsive address (SYN accepted, no
        # Noise reply) hangs the dial for minutes. Own deadline around the dial
        # of that exact address (Swarm.dial_addr skips the happy-eyeballs
        # ranking that might pick another transport from the peerstore).
        # test_dial_to_silent_listener_times_out.
        with trio.move_on_after(wait) as scope:
            try:
                await self._swarm.dial_addr(transport_addr, peer)
            except _LIBP2P_IO_ERRORS as e:
                kind = DialHandshakeFailed if _handshake_failed(e) else DialError
                raise kind(f"dial {addr} failed: {e!r}") from e
        if scope.cancelled_caught:
            raise DialTimeout(f"dial {addr} timed out after {wait:g} s")

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (no-op if none); bounded by ``dial_timeout``."""
        try:
            pid = ID.from_base58(peer_id)
        except Exception as e:
            raise LocalError(f"invalid peer id {peer_id!r}") from e
        with trio.CancelScope(shield=True), trio.move_on_after(self._dial_timeout):
            await self._host.disconnect(pid)

    async def trim(self, peer_id: str) -> int:
        """Close every connection to ``peer_id`` as no longer needed: each gets a
        Yamux GO_AWAY with code 0x1005 first (as go-libp2p's connection manager
        sends), so the peer knows we are alive and just done with it. Returns how
        many connections were closed; bounded by ``dial_timeout``."""
        try:
            pid = ID.from_base58(peer_id)
        except Exception as e:
            raise LocalError(f"invalid peer id {peer_id!r}") from e
        closed = 0
        with trio.CancelScope(shield=True), trio.move_on_after(self._dial_timeout):
            for conn in list(self._swarm.connections.get(pid, [])):
                with contextlib.suppress(Exception):
                    await upstream.trim_connection(conn)
                    closed += 1
        return closed

    def stream_protocols(self, peer_id: str) -> list[str]:
        """Protocols of the streams open on our connections to ``peer_id`` (what
        uses them now; empty when not connected)."""
        return [
            str(stream.get_protocol() or "")
            for conn in self._conns_to(peer_id)
            for stream in conn.get_streams()
        ]

    # ---- connection events -----------------------------------------------------

    def on_disconnect(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(peer_id, trimmed)`` whenever a connection to a peer closes
        (for any reason: the peer crashed, left, or one side trimmed it).
        ``trimmed``: one side closed it as no longer needed (``trim``; the peer
        is alive). Listeners run in the swarm's task and must not block;
        exceptions are logged and dropped."""
        self._disconnect_listeners.append(listener)

    def _on_disconnected(self, peer: ID, trimmed: bool = False) -> None:
        pid = str(peer)
        for listener in self._disconnect_listeners:
            try:
                listener(pid, trimmed)
            except Exception:  # noqa: BLE001 - a listener must not break the swarm
                logger.exception("disconnect listener failed")

    def __repr__(self) -> str:
        state = "running" if self._nursery is not None else "stopped"
        return f"Libp2pHost({self.peer_id[-8:]}, {state})"
