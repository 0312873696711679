"""Peers of a node: joining the overlay, keeping ``target_peers`` connections,
verifying members it was only told about, joining again when left alone.

``join`` dials the join addresses (in rounds: a timed-out dial is tried again) and
pulls the whole membership through ``AntiEntropySync.sync_with``; ``run``
fills the peer set every second or two with ``core.peering.choose_dials``
under the node's dial budget, and joins again through the join addresses,
backing off, when no connection is left. The node builds one ``PeerManager``
and runs it in its nursery; it sees the node through ``PeersNode`` and
imports nothing of the runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import trio

from ..core.admission import DialBudget
from ..core.liveness import PROTOCOL as LIVENESS
from ..core.peering import choose_dials, choose_trims
from ..core.scores import PeerScores
from ..core.timing import JOIN_ROUNDS
from ..crypto import NodeId, mac
from ..errors import LocalError
from ..net.host import DialHandshakeFailed, DialTimeout
from ..records import EXIT_ROLES, ValidRecord
from .context import NodeContext
from .sync import SYNC_PROTOCOL, AntiEntropySync, PeerInfo

log = logging.getLogger("hydra.node")

# pauses between rounds of dials to the join addresses that timed out
JOIN_DIAL_RETRIES = (1.0, 2.0, 4.0, 8.0, 16.0)
REJOIN_MIN, REJOIN_MAX = 2.0, 60.0  # seconds between join attempts of a node left alone
VERIFY_DIALS_PER_ROUND = 4  # dials to unverified exits per peer-loop round, at most
VERIFY_AFTER = 60.0  # an unverified non-exit member gets this long to contact us first
TRIM_LINGER = 20.0  # seconds a connection opened for an errand stays before it may be trimmed
# streams that stay open on a connection between uses: they do not keep it from a trim
IDLE_PROTOCOLS = ("/meshsub/", "/floodsub/", "/ipfs/id/", "/ipfs/ping/", SYNC_PROTOCOL, LIVENESS)


class PeersNode(NodeContext, Protocol):
    """What the peer manager uses of the node beyond ``NodeContext``."""

    peers: dict[NodeId, PeerInfo]
    join_addrs: list[str]
    dial_budget: DialBudget
    scores: PeerScores


class PeerManager:
    """Joining and the peer loop of one node (see the module docstring)."""

    def __init__(self, node: PeersNode, sync: AntiEntropySync) -> None:
        self.node = node
        self.sync = sync
        self.joined_via: str | None = None  # the join address that worked last
        self._verify_tried: dict[NodeId, float] = {}
        self._verify_key = node.rng.randbytes(16)  # keys each member's share of the spread
        self._transient: dict[NodeId, float] = {}  # dialled for an errand -> when (``trim``)

    async def join(self, addrs: Sequence[str]) -> str:
        """Connect through the first reachable address and pull the whole membership.

        The addresses are tried in rounds: each round dials, in order, every
        address not yet given up; one that refuses the dial or does not speak
        Hydra is given up at once, and those whose dial timed out or whose
        handshake failed (a busy or lossy peer; a saturated one drops slow
        handshakes) are dialled again in the next round, after a pause of 1,
        2, 4, 8 and 16 s (six rounds in all), each round's dials waiting one
        dial timeout longer than the last. So one silent address costs the
        others one dial timeout, not the minutes of its own retries."""
        errors: dict[str, str] = {}
        pending = list(dict.fromkeys(addrs))
        pauses = iter(JOIN_DIAL_RETRIES)
        rounds = 1  # round k waits k dial timeouts (a saturated peer handshakes slowly)
        while pending:
            wait, retry = self.node.host.dial_timeout * rounds, []
            for addr in pending:
                try:
                    pid = await self.node.host.connect(addr, timeout=wait)
                except (DialTimeout, DialHandshakeFailed) as e:
                    errors[addr] = str(e)
                    retry.append(addr)  # a busy peer: next round
                    continue
                except Exception as e:  # noqa: BLE001 - try the next one
                    errors[addr] = str(e)
                    continue
                why = await self._join_through(addr, pid)
                if why is None:
                    return addr
                errors[addr] = why
            pending = retry
            rounds += 1
            pause = next(pauses, None)
            if not pending or pause is None:
                break
            log.info(
                "join: %d address(es) timed out or dropped the handshake; trying again in %.0f s",
                len(pending),
                pause,
            )
            await trio.sleep(pause)
        raise LocalError(
            "could not join through any address: "
            + "; ".join(f"{addr}: {why}" for addr, why in errors.items())
        )

    async def _join_through(self, addr: str, pid: str) -> str | None:
        """Pull the membership from the peer just connected at ``addr``; None once
        joined, else why this address is given up."""
        try:
            peer = NodeId.from_peer_id(pid)
        except ValueError:
            return "not a Hydra node (its key is not Ed25519)"
        self.node.peers.setdefault(peer, PeerInfo(peer, self.node.clock(), addr))
        failures, synced = 0, False
        for _ in range(JOIN_ROUNDS):  # each round moves at most sync.MAX_WANT records
            self.sync.last_ok = False
            moved = await self.sync.sync_with(peer, bulk=True)
            synced = synced or self.sync.last_ok
            if self.sync.last_ok and moved == 0:
                break
            if not self.sync.last_ok:
                failures += 1
                if failures >= 3:
                    break  # the periodic rounds will catch up
                await trio.sleep(0.5)
        if not synced and not await self._speaks_sync(pid):
            # reached a libp2p peer that does not speak Hydra's sync protocol
            return f"not a Hydra node (no {SYNC_PROTOCOL})"
        self.joined_via = addr
        await self.node.announce_own("joined")
        await self._fill_peers()
        return None

    async def _speaks_sync(self, peer_id: str, wait: float = 5.0) -> bool:
        """False once identify has listed the peer's protocols without Hydra's sync;
        True while they are unknown (a busy Hydra peer gets the benefit of the doubt)."""
        with trio.move_on_after(wait):
            while not (protocols := self.node.host.peer_protocols(peer_id)):
                await trio.sleep(0.1)
            return SYNC_PROTOCOL in protocols
        log.info("join: %s did not identify within %.0f s; trying it anyway", peer_id[-8:], wait)
        return True

    async def _fill_peers(self) -> None:
        """Dial towards ``target_peers`` and verify members we were only told about.

        The dial budget goes first to unverified exits and standbys (so that the
        exit pool soon counts the honest ones), then to unverified peers that
        ``choose_dials`` picks when too few verified ones are left to dial, and
        what remains to one unverified member whose verification is due (least
        recently tried first), so honest members that never contact us get
        verified before ``unverified_ttl`` drops them. A non-exit member is due
        at a random time between ``VERIFY_AFTER`` seconds after we learnt of it
        and half of ``unverified_ttl``: a node that learns the whole membership at
        once (its join) spreads these dials instead of connecting to every member
        within minutes.
        """
        connected = set(self.node.connected())
        view = self.node.view
        if not self.node.admission.unverified and (
            len(connected) >= self.node.config.target_peers
            or sum(1 for p in connected if p in view) >= len(view) - 1
        ):
            return  # enough connections (or every other member) and nobody to verify
        now = self.node.clock()
        snap = self.node.view.snapshot(now)
        banned = {p for p in snap.records if self.node.scores.banned(p, now)}
        live = snap.live()
        budget = int(self.node.dial_budget.tokens(now))
        dials = self._verification_dials(
            live, connected | banned, min(budget, VERIFY_DIALS_PER_ROUND), now, exits=True
        )
        budget -= len(dials)
        early = {r.node_id for r in dials}
        picked = choose_dials(
            live,
            connected | early,
            self.node.node_id,
            self.node.config.target_peers,
            self.node.rng,
            exclude=banned,
            prefer=self.node.view.is_verified,
            max_other=budget,
        )
        budget -= sum(1 for r in picked if not self.node.view.is_verified(r.node_id))
        picked_ids = {r.node_id for r in picked}
        dials += picked
        if budget > 0:
            skip = connected | banned | {r.node_id for r in dials}
            dials += self._verification_dials(live, skip, 1, now, exits=False)
        if dials:
            async with trio.open_nursery() as n:
                for rec in dials:
                    n.start_soon(self.node.connect_record, rec)
            # a member dialled only to verify it goes again once it has lingered
            now = self.node.clock()
            for rec in dials:
                if rec.node_id not in picked_ids:
                    self.errand(rec.node_id, now)

    def _verification_dials(
        self, live: list[ValidRecord], skip: set[NodeId], room: int, now: float, *, exits: bool
    ) -> list[ValidRecord]:
        """Up to ``room`` unverified members to dial: exits and standbys (``exits``)
        or others whose verification is due (``_verify_due``), least recently tried first."""
        if room <= 0:
            return []
        tried = self._verify_tried
        view = self.node.view
        todo = []
        for r in live:
            nid = r.node_id
            if nid == self.node.node_id or nid in skip or view.is_verified(nid):
                continue
            if bool(r.roles & EXIT_ROLES) != exits:
                continue
            if not exits and now < self._verify_due(nid, view.first_seen(nid) or now):
                continue
            todo.append(r)
        todo.sort(key=lambda r: tried.get(r.node_id, -1e18))
        out = todo[:room]
        for r in out:
            tried[r.node_id] = now
        if len(tried) > 2 * self.node.config.max_unverified + 64:
            for nid in [n for n in tried if view.is_verified(n) or n not in view]:
                del tried[nid]
        return out

    def _verify_due(self, nid: NodeId, first_seen: float) -> float:
        """When an unverified non-exit member known since ``first_seen`` is dialled:
        ``VERIFY_AFTER`` later, plus a share of the rest of half its TTL that is
        random to others but fixed for the member here (a keyed hash of its id)."""
        share = int.from_bytes(mac(self._verify_key, bytes(nid), 8), "big") / 2**64
        spread = max(0.0, self.node.config.unverified_ttl / 2 - VERIFY_AFTER)
        return first_seen + VERIFY_AFTER + share * spread

    def errand(self, peer: NodeId, now: float) -> None:
        """We just dialled ``peer`` for one errand (a DHT store, a verification):
        its connection is trimmed once it has lingered idle (``trim``), unless by
        then it is needed as a peer."""
        if peer not in self._transient and len(self._transient) < 4 * self.node.config.max_members:
            self._transient[peer] = now

    async def trim(self) -> int:
        """Close the errand connections that ``core.peering.choose_trims`` picks: idle
        for ``TRIM_LINGER`` s, not an exit, standby or relay of ours, and not
        needed to keep ``target_peers``. The peer hears "no longer needed", not a
        crash (``Libp2pHost.trim``). Returns how many members were trimmed."""
        if not self._transient:
            return 0
        node = self.node
        now = node.clock()
        host = node.host
        connected = set(node.connected())
        snap = node.view.snapshot(now)
        keep = {
            p for p in self._transient if (r := snap.get(p)) is not None and r.roles & EXIT_ROLES
        }
        relays = host.reservations()  # the relays our relay feeds go through
        keep |= {p for p in self._transient if p.peer_id() in relays}

        def busy(peer: NodeId) -> bool:
            return any(
                not p.startswith(IDLE_PROTOCOLS) for p in host.stream_protocols(peer.peer_id())
            )

        trim, forget = choose_trims(
            self._transient,
            connected,
            keep=keep,
            busy=busy,
            target=node.config.target_peers,
            now=now,
            linger=TRIM_LINGER,
        )
        for peer in forget:
            self._transient.pop(peer, None)
        for peer in trim:
            log.debug("trimming the connection to %s (errand done)", peer.short())
            await host.trim(peer.peer_id())
        node.metrics.trimmed.inc(len(trim))
        return len(trim)

    async def run(self) -> None:
        """Keep ``target_peers`` connections; with none at all (every member we know
        is unreachable, or we never got the membership), join again through the
        join addresses, backing off from ``REJOIN_MIN`` to ``REJOIN_MAX`` seconds.
        Not while the node's first join is still under way: that one dials them."""
        rejoin_at, backoff = 0.0, REJOIN_MIN
        while True:
            await trio.sleep(1.0 + self.node.rng.random())
            try:
                if (
                    self.node.join_addrs
                    and self.node.ready.is_set()  # the first join is over (not still dialling)
                    and not self.node.connected()
                    and self.node.clock() >= rejoin_at
                ):
                    try:
                        via = await self.join(self.node.join_addrs)
                    except LocalError as e:
                        log.info("alone: %s; next try in %.0f s", e, backoff)
                        rejoin_at, backoff = (
                            self.node.clock() + backoff,
                            min(REJOIN_MAX, backoff * 2),
                        )
                    else:
                        log.info("alone: joined again via %s", via)
                        rejoin_at, backoff = 0.0, REJOIN_MIN
                await self._fill_peers()
                await self.trim()
            except Exception as e:  # noqa: BLE001 - keep the node running
                log.warning(
                    "peer maintenance failed (%s: %s); retrying in a second", type(e).__name__, e
                )
                log.debug("peer maintenance failure", exc_info=True)
