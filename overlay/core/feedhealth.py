"""Sans-I/O feed health: which of a node's feeds work, and which to announce.

A *feed* is one way to reach a node, written as a canonical multiaddr in its
record: a direct listen address (``/ip4/10.11.2.2/tcp/4001``), an announced
external address (``[node] announce``), or a relay feed through another peer
(``/ip4/10.12.1.2/tcp/4001/p2p/<relay>/p2p-circuit``).

``FeedTable`` keeps one row per feed and is fed observations by the runtime
(``overlay/services/feeds.py``), each with the current time:

- ``update_local(listen, local, now, announce)``: the bound listen addresses
  and a snapshot of the machine's addresses (``ip -> usable``). A direct feed
  is DOWN while its address is missing or its interface is down (no
  carrier); wildcard listens (``0.0.0.0``) expand to every local address.
- ``update_relays({relay feed: reservation expiry}, now)``: relay feeds exist
  while we hold a live reservation on that relay.
- ``probe_result(feed, peer, ok, now)``: a peer dialed the feed back
  (AutoNAT). ``probe_failures`` failures from distinct peers with no success
  in between make an UP feed UNREACHABLE; one success makes it UP again.
- ``observe_connections(samples, now)``: live connections, attributed to
  feeds, for traffic counters and "last ok".

``announced()`` is what the record should list: usable direct feeds first
(in listen order), then relay feeds, at most ``max_feeds``, of which up to
``relay_slots`` (and no more) are relay feeds. It is never empty once anything
was announced: if every feed fails, the previous list stays (a record must
name a feed, and an old address is a better hint than none).

Also here: ``usable_addresses`` (the machine's addresses and link states), ``choose_relays``
(diverse relay selection) and ``Backoff``.

Invariants: no I/O, no clocks, no randomness except an injected ``rng``;
every row's state is one of ``FeedState``; ``announced()`` has no duplicates
and at most ``max_feeds`` entries, each a feed of the table or the sticky
previous list.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..records import MAX_FEEDS
from .peering import feed_network

__all__ = [
    "Backoff",
    "ConnSample",
    "FeedRow",
    "FeedState",
    "FeedTable",
    "RelayCandidate",
    "choose_relays",
    "expand_listen",
    "feed_ip",
    "feed_port",
    "feed_transport",
    "is_relay_feed",
    "relay_feed",
    "relay_of",
    "usable_addresses",
]


class FeedState(enum.StrEnum):
    UP = "up"  # locally usable (and not refuted by probes) / reservation live
    DOWN = "down"  # address gone or interface down / reservation lost
    UNREACHABLE = "unreachable"  # locally fine but peers could not dial it


# ---------------------------------------------------------------- multiaddr text


def is_relay_feed(feed: str) -> bool:
    return "/p2p-circuit" in feed


def relay_of(feed: str) -> str | None:
    """The relay's peer id of a relay feed ``.../p2p/<relay>/p2p-circuit``, else None."""
    head, sep, _ = feed.partition("/p2p-circuit")
    if not sep or "/p2p/" not in head:
        return None
    return head.rpartition("/p2p/")[2] or None


def relay_feed(relay_addr: str, relay_peer_id: str) -> str:
    """The relay feed through ``relay_peer_id`` reached at ``relay_addr`` (no /p2p part)."""
    base = relay_addr.split("/p2p/")[0]
    return f"{base}/p2p/{relay_peer_id}/p2p-circuit"


def feed_ip(feed: str) -> str | None:
    parts = feed.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            return str(ipaddress.ip_address(parts[2]))
        except ValueError:
            return None
    return None


def feed_port(feed: str) -> int | None:
    parts = feed.split("/")
    for i, p in enumerate(parts[:-1]):
        if p in ("tcp", "udp"):
            try:
                return int(parts[i + 1])
            except ValueError:
                return None
    return None


def feed_transport(feed: str) -> str:
    """``"relay"``, ``"quic"``, ``"ws"``, ``"tcp"`` or ``"other"``."""
    parts = feed.split("/")
    if "p2p-circuit" in parts:
        return "relay"
    if "quic-v1" in parts or "quic" in parts:
        return "quic"
    if "ws" in parts or "wss" in parts:
        return "ws"
    if "tcp" in parts:
        return "tcp"
    return "other"


def _wildcard(ip: str | None) -> bool:
    return ip in ("0.0.0.0", "::")


def usable_addresses(
    addrs: Mapping[str, Iterable[str]], running: Mapping[str, bool]
) -> dict[str, bool]:
    """``{address: usable}`` from each interface's addresses and whether it runs
    (up, with carrier; loopback runs). Link-local IPv6 and anything that is not
    an IP address are left out; an address on several interfaces is usable if
    one of them runs. An interface missing from ``running`` does not run.
    """
    out: dict[str, bool] = {}
    for dev, dev_addrs in addrs.items():
        usable = bool(running.get(dev, False))
        for addr in dev_addrs:
            try:
                ip = ipaddress.ip_address(addr.split("%")[0])
            except ValueError:
                continue
            if ip.is_link_local:
                continue
            out[str(ip)] = out.get(str(ip), False) or usable
    return out


def expand_listen(listen: Sequence[str], local: Mapping[str, bool]) -> list[str]:
    """Feeds for bound listen addresses: wildcard hosts become each local address.

    Loopback addresses are used for a wildcard only if the machine has no other
    address of that family. Port-0 addresses (not yet bound) are left out.
    """
    out: list[str] = []
    v4 = [a for a in local if ":" not in a]
    v6 = [a for a in local if ":" in a]
    for addr in listen:
        base = addr.split("/p2p/")[0]
        if feed_port(base) == 0:
            continue
        parts = base.split("/")
        ip = feed_ip(base)
        if _wildcard(ip):
            family = v6 if ip == "::" else v4
            real = [a for a in family if not ipaddress.ip_address(a).is_loopback]
            for host in real or family:
                out.append("/".join(parts[:2] + [host] + parts[3:]))
        else:
            out.append(base)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class ConnSample:
    """One live connection as the runtime sees it (see ``Libp2pHost.connections``)."""

    key: int
    transport: str  # "tcp" | "ws" | "quic" | "relay" | "unknown"
    direction: str  # "inbound" | "outbound" | "unknown"
    local: tuple[str, int] | None
    relay_peer_id: str | None
    bytes_in: int | None
    bytes_out: int | None


@dataclass(slots=True)
class FeedRow:
    addr: str
    kind: str  # "direct" | "external" | "relay"
    state: FeedState
    since: float
    last_ok: float | None = None
    failures: set[str] = field(default_factory=set)
    bytes_in: int | None = None
    bytes_out: int | None = None
    conns: int = 0
    expires_at: float | None = None  # relay feeds: reservation expiry (Unix time)
    probed_ok: float | None = None  # last successful dial-back by a peer
    present: bool = True  # still a candidate (listen address / reservation exists)

    @property
    def transport(self) -> str:
        return feed_transport(self.addr)

    @property
    def ip(self) -> str | None:
        return feed_ip(self.addr)


class FeedTable:
    """Feed rows and the announcement decision. See the module docstring."""

    def __init__(
        self,
        *,
        max_feeds: int = MAX_FEEDS,
        relay_slots: int = 2,
        probe_failures: int = 2,
    ) -> None:
        if not 1 <= max_feeds <= MAX_FEEDS or relay_slots < 0 or probe_failures < 1:
            raise ValueError("bad FeedTable limits")
        self.max_feeds = max_feeds
        self.relay_slots = min(relay_slots, max_feeds)
        self.probe_failures = probe_failures
        self.rows: dict[str, FeedRow] = {}
        self._last_announced: list[str] = []
        self._conns: dict[int, tuple[str, int | None, int | None]] = {}
        self.events: list[tuple[str, str, str]] = []  # (feed, old state, new state)

    # ---- observations

    def _set(self, row: FeedRow, state: FeedState, now: float) -> None:
        if row.state is not state:
            self.events.append((row.addr, row.state.value, state.value))
            row.state = state
            row.since = now
            if state is not FeedState.UNREACHABLE:
                row.failures.clear()

    def update_local(
        self,
        listen: Sequence[str],
        local: Mapping[str, bool],
        now: float,
        announce: Sequence[str] = (),
    ) -> None:
        """Direct and announced feeds from listen addresses and the local address snapshot."""
        self.announced()  # remember the list before this change (see announced)
        wanted: dict[str, str] = {}
        if announce:
            for a in announce:
                ip = feed_ip(a)
                if is_relay_feed(a):
                    continue
                wanted[a] = "direct" if ip is not None and ip in local else "external"
        else:
            for a in expand_listen(listen, local):
                wanted[a] = "direct"
            # wildcard-expanded feeds whose address vanished stay as DOWN rows
        for addr, row in self.rows.items():
            if row.kind != "relay" and addr not in wanted:
                if row.present:
                    row.present = False
                    self._set(row, FeedState.DOWN, now)
        for addr, kind in wanted.items():
            row = self.rows.get(addr)
            ip = feed_ip(addr)
            usable = True if kind == "external" else bool(ip is not None and local.get(ip, False))
            if row is None:
                row = FeedRow(addr, kind, FeedState.UP if usable else FeedState.DOWN, now)
                self.rows[addr] = row
                if not usable:
                    self.events.append((addr, "new", FeedState.DOWN.value))
                continue
            row.present = True
            row.kind = kind
            if not usable:
                self._set(row, FeedState.DOWN, now)
            elif row.state is FeedState.DOWN:
                self._set(row, FeedState.UP, now)

    def update_relays(self, relays: Mapping[str, float], now: float) -> None:
        """Relay feeds we hold a live reservation for (``feed -> expiry``)."""
        self.announced()  # remember the list before this change (see announced)
        for addr, row in self.rows.items():
            if row.kind == "relay" and addr not in relays and row.present:
                row.present = False
                self._set(row, FeedState.DOWN, now)
        for addr, expires in relays.items():
            row = self.rows.get(addr)
            if row is None:
                row = FeedRow(addr, "relay", FeedState.UP, now, last_ok=now)
                self.rows[addr] = row
            row.present = True
            if row.expires_at != expires:
                row.last_ok = now  # a (re)newed reservation is proof the relay serves us
            row.expires_at = expires
            if row.state is not FeedState.UP:
                self._set(row, FeedState.UP, now)

    def probe_result(self, feed: str, peer: str, ok: bool, now: float) -> None:
        """A dial-back verdict for ``feed`` by ``peer`` (inconclusive answers: don't call)."""
        self.announced()  # remember the list before this change (see announced)
        row = self.rows.get(feed)
        if row is None or row.kind == "relay":
            return
        if ok:
            row.last_ok = now
            row.probed_ok = now
            row.failures.clear()
            if row.state is FeedState.UNREACHABLE:
                self._set(row, FeedState.UP, now)
            return
        if row.state is FeedState.DOWN:
            return
        row.failures.add(peer)
        if row.state is FeedState.UP and len(row.failures) >= self.probe_failures:
            self._set(row, FeedState.UNREACHABLE, now)

    def match(self, sample: ConnSample) -> FeedRow | None:
        """The feed a connection runs over, if it can be told."""
        if sample.transport == "relay":
            for row in self.rows.values():
                if row.kind == "relay" and relay_of(row.addr) == sample.relay_peer_id:
                    return row
            return None
        if sample.local is None:
            return None
        ip, port = sample.local
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            return None
        family = "quic" if sample.transport == "quic" else "tcp"
        direct = [r for r in self.rows.values() if r.kind != "relay"]

        def same_family(r: FeedRow) -> bool:
            t = r.transport
            return t == "quic" if family == "quic" else t in ("tcp", "ws")

        if _wildcard(ip):  # a wildcard-bound UDP socket: tell by port alone if unique
            hits = [r for r in direct if same_family(r) and feed_port(r.addr) == port]
            return hits[0] if len(hits) == 1 else None
        on_ip = [r for r in direct if r.ip == ip]
        if sample.direction == "inbound" or family == "quic":
            for r in on_ip:
                if same_family(r) and feed_port(r.addr) == port:
                    return r
        if sample.direction != "inbound":
            for want in (sample.transport, "tcp" if family == "tcp" else "quic"):
                for r in on_ip:
                    if r.transport == want:
                        return r
            return on_ip[0] if on_ip else None
        return None

    def observe_connections(self, samples: Iterable[ConnSample], now: float) -> None:
        """Attribute live connections to feeds: counts, traffic deltas, last ok."""
        for row in self.rows.values():
            row.conns = 0
        seen: dict[int, tuple[str, int | None, int | None]] = {}
        for s in samples:
            row = self.match(s)
            if row is None:
                continue
            row.conns += 1
            prev = self._conns.get(s.key)
            moved = False
            if s.bytes_in is not None and s.bytes_out is not None:
                if prev is not None and prev[0] == row.addr and prev[1] is not None:
                    d_in = max(0, s.bytes_in - prev[1])
                    d_out = max(0, s.bytes_out - (prev[2] or 0))
                else:
                    d_in, d_out = s.bytes_in, s.bytes_out
                row.bytes_in = (row.bytes_in or 0) + d_in
                row.bytes_out = (row.bytes_out or 0) + d_out
                moved = d_in > 0
            else:
                moved = True  # no counters (QUIC, relayed): a live connection is the evidence
            if moved and row.state is FeedState.UP:
                row.last_ok = now
            seen[s.key] = (row.addr, s.bytes_in, s.bytes_out)
        self._conns = seen

    # ---- decisions

    def usable(self) -> list[FeedRow]:
        return [r for r in self.rows.values() if r.present and r.state is FeedState.UP]

    def announced(self) -> list[str]:
        up = self.usable()
        direct = [r.addr for r in up if r.kind != "relay"]
        relays = [r.addr for r in up if r.kind == "relay"]
        keep_relays = min(len(relays), self.relay_slots)
        out = direct[: self.max_feeds - keep_relays] + relays[:keep_relays]
        if not out:
            return list(self._last_announced)
        self._last_announced = out
        return list(out)

    def reachability(self) -> str:
        """``"public"`` if a peer dialed one of our usable direct feeds back,
        ``"private"`` if no direct feed is usable (only relay feeds can reach
        us), else ``"unknown"``."""
        direct = [r for r in self.rows.values() if r.kind != "relay" and r.present]
        up = [r for r in direct if r.state is FeedState.UP]
        if any(r.probed_ok is not None for r in up):
            return "public"
        if not up:
            return "private"
        return "unknown"

    def take_events(self) -> list[tuple[str, str, str]]:
        events, self.events = self.events, []
        return events

    def forget_absent(self, older_than: float, now: float) -> None:
        """Drop rows that are no longer candidates and have been down for ``older_than`` s."""
        for addr in [
            a
            for a, r in self.rows.items()
            if not r.present and r.state is FeedState.DOWN and now - r.since > older_than
        ]:
            del self.rows[addr]

    def status(self, now: float) -> list[dict]:
        """Rows for ``overlay status`` / the control endpoint (plain JSON values)."""
        announced = set(self.announced())
        out = []
        for r in self.rows.values():
            counted = r.bytes_in is not None
            out.append(
                {
                    "addr": r.addr,
                    "network": feed_network(r.addr),
                    "kind": r.kind,
                    "transport": r.transport,
                    "state": r.state.value,
                    "announced": r.addr in announced,
                    "since": round(now - r.since, 1),
                    "last_ok": None if r.last_ok is None else round(now - r.last_ok, 1),
                    "last_ok_at": r.last_ok,
                    "bytes_in": r.bytes_in,
                    "bytes_out": r.bytes_out,
                    "conns": r.conns,
                    "traffic": "tcp_info" if counted else "connections",
                    "probe_failures": len(r.failures),
                    "expires_in": None
                    if r.expires_at is None
                    else round(max(0.0, r.expires_at - now), 1),
                }
            )
        return out


# ---------------------------------------------------------------- relays


@dataclass(frozen=True, slots=True)
class RelayCandidate:
    peer_id: str
    networks: frozenset[str]
    connected: bool = False


def choose_relays(
    candidates: Iterable[RelayCandidate],
    held: Mapping[str, frozenset[str]],
    want: int,
    rng: random.Random,
    *,
    own_networks: frozenset[str] = frozenset(),
) -> list[str]:
    """Relays to reserve on so that ``held`` grows to ``want``, most diverse first.

    ``held`` maps relays we already hold to their networks. A candidate scores
    by how many of its networks nobody we hold covers (more is better), then by
    whether it avoids our own networks (a cut of our link there may well cut
    it too), then by being already connected; ties are broken by ``rng``.
    """
    need = want - len(held)
    if need <= 0:
        return []
    pool = [c for c in candidates if c.peer_id not in held]
    rng.shuffle(pool)
    covered: set[str] = set().union(*held.values()) if held else set()
    chosen: list[str] = []
    while pool and len(chosen) < need:
        pool.sort(
            key=lambda c: (
                -len(c.networks - covered),
                len(c.networks & own_networks),
                not c.connected,
            )
        )
        best = pool.pop(0)
        chosen.append(best.peer_id)
        covered |= best.networks
    return chosen


class Backoff:
    """Per-key exponential backoff: ``failed`` doubles the wait (``base``..``cap``)."""

    def __init__(self, base: float = 2.0, cap: float = 60.0) -> None:
        self.base = base
        self.cap = cap
        self._until: dict[str, float] = {}
        self._wait: dict[str, float] = {}

    def ready(self, key: str, now: float) -> bool:
        return now >= self._until.get(key, 0.0)

    def failed(self, key: str, now: float) -> float:
        wait = min(self.cap, self._wait.get(key, self.base / 2) * 2)
        self._wait[key] = wait
        self._until[key] = now + wait
        return wait

    def ok(self, key: str) -> None:
        self._until.pop(key, None)
        self._wait.pop(key, None)
