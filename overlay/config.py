"""Node configuration: ``config.toml`` in the node home, read with tomllib.

Every key has a default here; the file written by ``overlay init`` lists them
all, commented, so a volunteer can see what can be tuned.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .core.mixing import (
    DEFAULT_COVER_LOOP_RATE,
    DEFAULT_COVER_RATE,
    DEFAULT_MIX_DELAY,
    DEFAULT_RELAY_LOOP_RATE,
)
from .errors import ConfigError
from .onion.epochs import EPOCH_LENGTH, MIN_EPOCH_LENGTH
from .records import DEFAULT_TTL, EXIT_ROLES, MAX_FEEDS, Role, check_feed, check_rule

HOME_LISTEN = [
    "/ip4/0.0.0.0/tcp/4001",
    "/ip4/0.0.0.0/udp/4001/quic-v1",
    "/ip4/0.0.0.0/tcp/4002/ws",
]
LOCAL_LISTEN = ["/ip4/127.0.0.1/tcp/0"]
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_BANDWIDTH_BURST = 32768  # bytes: the largest onion packet must fit in the bucket
SMTP_TLS_MODES = ("off", "opportunistic", "required", "tls")
_ADDR_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
_HOSTNAME_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass
class Config:
    roles: list[str] = field(default_factory=lambda: ["relay"])
    listen: list[str] = field(default_factory=lambda: list(HOME_LISTEN))
    announce: list[str] = field(default_factory=list)
    record_ttl: int = DEFAULT_TTL
    exit_policy: list[str] = field(default_factory=list)
    target_peers: int = 8
    join: list[str] = field(default_factory=list)
    control_listen: str = "127.0.0.1:0"
    gossip_heartbeat: float = 1.0
    sync_interval: float = 0.5
    sync_idle_interval: float = 30.0
    seed_sources: list[str] = field(default_factory=list)
    seed_operators: list[str] = field(default_factory=list)
    seed_threshold: int = 1
    target_live_exits: int = 3
    exit_policy_mode: str = "all-public"
    smtp_relay: str = ""
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    calm_interval: float = 5.0
    suspicion_min: float = 1.0
    suspicion_max: float = 4.0
    maildir_root: str = ""
    # [exit] mail identity and smarthost (see docs/volunteer.md, "Running a mail exit")
    smtp_from: str = "hydra-exit@localhost"
    smtp_helo: str = ""
    smtp_starttls: str = "opportunistic"
    smtp_username: str = ""
    smtp_password_file: str = ""
    smtp_password_env: str = ""
    onion_epoch_length: float = EPOCH_LENGTH
    # [onion] mix_delay / [relay] max_held / [cover]: Poisson mixing and cover traffic
    mix_delay: float = DEFAULT_MIX_DELAY
    relay_max_held: int = 4096
    cover_rate: float = DEFAULT_COVER_RATE
    cover_loop_rate: float = DEFAULT_COVER_LOOP_RATE
    relay_loop_rate: float = DEFAULT_RELAY_LOOP_RATE
    relay_max_links: int = 256
    relay_max_clients: int = 256
    relay_clients_per_peer: int = 4
    relay_client_idle: float = 300.0
    log_level: str = "info"
    # [admission]: bounds on new members and on dials to what records claim
    admission_rate: float = 2.0
    admission_burst: float = 512.0
    admission_peer_rate: float = 1.0
    admission_peer_burst: float = 256.0
    max_unverified: int = 1024
    max_members: int = 16384
    unverified_ttl: float = 1800.0
    dial_rate: float = 1.0
    dial_burst: float = 8.0
    dial_addr_interval: float = 60.0
    # [limits]: inbound connection bounds (see overlay/net/limits.py ConnectionLimits)
    max_inbound: int = 512
    max_inbound_per_ip: int = 384
    max_handshakes_per_ip: int = 128
    handshake_timeout: float = 5.0
    # [limits]: operator caps (see overlay/caps.py); 0 bandwidth / deliveries: no cap
    max_connections: int = 1024
    bandwidth_rate: int = 0
    bandwidth_burst: int = 0
    exit_deliveries_per_minute: int = 600

    @property
    def role_flags(self) -> Role:
        return Role.parse(self.roles)

    def advertised_policy(self) -> list[str]:
        """The exit policy rules this node can deliver, for its record: ``maildir``
        rules only with a ``maildir_root`` (an exit must not publish what it cannot
        deliver: clients would get a permanent ``policy_denied``)."""
        return [
            r for r in self.exit_policy if not (r.startswith("maildir:") and not self.maildir_root)
        ]

    def _validate_exit(self) -> None:
        """The ``[exit]`` mail keys (checked whatever the roles, so a mistake shows
        before a standby is promoted)."""
        if not _ADDR_RE.fullmatch(self.smtp_from) or ".." in self.smtp_from:
            raise ConfigError(
                f"[exit] smtp_from must be an address like exit@example.org, not {self.smtp_from!r}"
            )
        helo = self.smtp_helo
        if helo and not (_HOSTNAME_RE.fullmatch(helo) and len(helo) <= 253):
            inner = helo[1:-1] if helo.startswith("[") and helo.endswith("]") else None
            try:
                ipaddress.ip_address((inner or "").removeprefix("IPv6:"))
            except ValueError:
                raise ConfigError(
                    f"[exit] smtp_helo must be a host name or [address], not {helo!r}"
                ) from None
        if self.smtp_starttls not in SMTP_TLS_MODES:
            raise ConfigError(f"[exit] smtp_starttls must be one of {', '.join(SMTP_TLS_MODES)}")
        relay_host = ""
        if self.smtp_relay:
            relay_host = _check_hostport(self.smtp_relay, "[exit] smtp_relay")
        sources = [x for x in (self.smtp_password_file, self.smtp_password_env) if x]
        if self.smtp_username:
            if not self.smtp_relay:
                raise ConfigError("[exit] smtp_username needs smtp_relay (AUTH is for a smarthost)")
            if len(sources) != 1:
                raise ConfigError(
                    "[exit] smtp_username needs the password from exactly one of"
                    " smtp_password_file or smtp_password_env (never in config.toml)"
                )
            loopback = relay_host in ("localhost", "::1") or relay_host.startswith("127.")
            if self.smtp_starttls not in ("required", "tls") and not loopback:
                raise ConfigError(
                    '[exit] smtp_username needs smtp_starttls = "required" or "tls": the'
                    " password must not cross the network in clear"
                )
        elif sources:
            raise ConfigError("[exit] smtp_password_file/_env need smtp_username")
        if self.smtp_password_env and not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", self.smtp_password_env
        ):
            raise ConfigError("[exit] smtp_password_env must name an environment variable")

    def validate(self) -> Config:
        try:
            roles = Role.parse(self.roles)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not roles:
            raise ConfigError("at least one role is required")
        exitish = bool(roles & EXIT_ROLES)
        if exitish and not self.exit_policy:
            raise ConfigError('exit roles need [exit] policy, e.g. policy = ["smtp:*"]')
        for rule in self.exit_policy:
            try:
                check_rule(rule)
            except Exception:
                raise ConfigError(f"bad exit policy rule {rule!r}") from None
        self._validate_exit()
        for addr in self.announce:
            try:
                check_feed(addr)
            except Exception:
                raise ConfigError(f"bad announce address {addr!r}") from None
        if len(self.announce) > MAX_FEEDS:
            raise ConfigError(f"at most {MAX_FEEDS} announced feeds")
        if self.exit_policy_mode not in ("all-public", "chain"):
            raise ConfigError('exit_policy_mode must be "all-public" or "chain"')
        if not 0 < self.probe_timeout < self.probe_interval:
            raise ConfigError("[liveness] needs 0 < probe_timeout < probe_interval")
        if self.calm_interval and self.calm_interval < self.probe_interval:
            raise ConfigError("[liveness] needs calm_interval >= probe_interval (or 0: off)")
        if not 0 < self.sync_interval <= self.sync_idle_interval:
            raise ConfigError("[network] needs 0 < sync_interval <= sync_idle_interval")
        if not 0 < self.suspicion_min <= self.suspicion_max:
            raise ConfigError("[liveness] needs 0 < suspicion_min <= suspicion_max")
        if not self.listen:
            raise ConfigError("at least one listen address is required")
        host, _, port = self.control_listen.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1") or not (
            port.isascii() and port.isdigit() and int(port) < 65536
        ):
            raise ConfigError(
                f"[control] listen must be 127.0.0.1:PORT (local only), not {self.control_listen!r}"
            )
        if not self.onion_epoch_length >= MIN_EPOCH_LENGTH:
            raise ConfigError(f"[onion] epoch_length must be >= {MIN_EPOCH_LENGTH:g} seconds")
        if not 0 <= self.mix_delay <= 60:
            raise ConfigError("[onion] mix_delay must be in 0..60 seconds (0: no mixing)")
        if self.relay_max_held < 1:
            raise ConfigError("[relay] max_held must be >= 1")
        if max(self.cover_rate, self.cover_loop_rate, self.relay_loop_rate) > 100:
            raise ConfigError("[cover] rates must be in 0..100 packets per second")
        if min(self.relay_max_links, self.relay_max_clients, self.relay_clients_per_peer) < 1:
            raise ConfigError("[relay] max_links, max_clients and clients_per_peer must be >= 1")
        if not self.relay_client_idle > 0:
            raise ConfigError("[relay] client_idle_timeout must be > 0")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"[log] level must be one of {', '.join(LOG_LEVELS)}")
        admission = (
            self.admission_rate,
            self.admission_burst,
            self.admission_peer_rate,
            self.admission_peer_burst,
            self.dial_rate,
            self.dial_burst,
            self.dial_addr_interval,
        )
        if min(admission) < 0 or self.max_unverified < 0 or self.unverified_ttl <= 0:
            raise ConfigError("[admission] rates, bursts, bounds and intervals must be >= 0")
        if self.max_members < 1 or self.max_members < self.max_unverified:
            raise ConfigError("[admission] needs max_members >= max_unverified and >= 1")
        if not 1 <= self.max_inbound_per_ip <= self.max_inbound:
            raise ConfigError("[limits] needs 1 <= max_inbound_per_ip <= max_inbound")
        if not 1 <= self.max_handshakes_per_ip <= self.max_inbound_per_ip:
            raise ConfigError("[limits] needs 1 <= max_handshakes_per_ip <= max_inbound_per_ip")
        if not self.handshake_timeout > 0:
            raise ConfigError("[limits] handshake_timeout must be positive")
        if not self.max_inbound <= self.max_connections:
            raise ConfigError("[limits] needs max_inbound <= max_connections")
        if self.bandwidth_rate > 0 and 0 < self.bandwidth_burst < MIN_BANDWIDTH_BURST:
            raise ConfigError(
                f"[limits] bandwidth_burst must be 0 (twice the rate) or >= {MIN_BANDWIDTH_BURST}"
                " bytes (one large packet)"
            )
        return self


def _check_hostport(text: str, where: str) -> str:
    """The host of ``HOST[:PORT]`` / ``[V6][:PORT]``; ConfigError if malformed."""
    if text.startswith("["):
        host, close, tail = text[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else None if not tail else "x"
        ok = bool(close)
    else:
        host, colon, port = text.rpartition(":") if ":" in text else (text, "", None)
        ok = ":" not in host
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        ok = False
    if not ok or not host or not (_HOSTNAME_RE.fullmatch(host) or _is_ip(host)):
        raise ConfigError(f"{where} must be HOST[:PORT], not {text!r}")
    return host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_MAP = {
    ("node", "roles"): "roles",
    ("node", "listen"): "listen",
    ("node", "announce"): "announce",
    ("node", "record_ttl"): "record_ttl",
    ("exit", "policy"): "exit_policy",
    ("exit", "smtp_relay"): "smtp_relay",
    ("exit", "maildir_root"): "maildir_root",
    ("exit", "smtp_from"): "smtp_from",
    ("exit", "smtp_helo"): "smtp_helo",
    ("exit", "smtp_starttls"): "smtp_starttls",
    ("exit", "smtp_username"): "smtp_username",
    ("exit", "smtp_password_file"): "smtp_password_file",
    ("exit", "smtp_password_env"): "smtp_password_env",
    ("network", "target_peers"): "target_peers",
    ("network", "join"): "join",
    ("network", "gossip_heartbeat"): "gossip_heartbeat",
    ("network", "sync_interval"): "sync_interval",
    ("network", "sync_idle_interval"): "sync_idle_interval",
    ("control", "listen"): "control_listen",
    ("seeds", "sources"): "seed_sources",
    ("seeds", "operators"): "seed_operators",
    ("seeds", "threshold"): "seed_threshold",
    ("exits", "target_live_exits"): "target_live_exits",
    ("exits", "exit_policy_mode"): "exit_policy_mode",
    ("liveness", "probe_interval"): "probe_interval",
    ("liveness", "probe_timeout"): "probe_timeout",
    ("liveness", "calm_interval"): "calm_interval",
    ("liveness", "suspicion_min"): "suspicion_min",
    ("liveness", "suspicion_max"): "suspicion_max",
    ("onion", "epoch_length"): "onion_epoch_length",
    ("onion", "mix_delay"): "mix_delay",
    ("relay", "max_links"): "relay_max_links",
    ("relay", "max_clients"): "relay_max_clients",
    ("relay", "clients_per_peer"): "relay_clients_per_peer",
    ("relay", "client_idle_timeout"): "relay_client_idle",
    ("relay", "max_held"): "relay_max_held",
    ("cover", "rate"): "cover_rate",
    ("cover", "loop_rate"): "cover_loop_rate",
    ("cover", "relay_loop_rate"): "relay_loop_rate",
    ("log", "level"): "log_level",
    ("admission", "rate"): "admission_rate",
    ("admission", "burst"): "admission_burst",
    ("admission", "peer_rate"): "admission_peer_rate",
    ("admission", "peer_burst"): "admission_peer_burst",
    ("admission", "max_unverified"): "max_unverified",
    ("admission", "max_members"): "max_members",
    ("admission", "unverified_ttl"): "unverified_ttl",
    ("admission", "dial_rate"): "dial_rate",
    ("admission", "dial_burst"): "dial_burst",
    ("admission", "dial_addr_interval"): "dial_addr_interval",
    ("limits", "max_inbound"): "max_inbound",
    ("limits", "max_inbound_per_ip"): "max_inbound_per_ip",
    ("limits", "max_handshakes_per_ip"): "max_handshakes_per_ip",
    ("limits", "handshake_timeout"): "handshake_timeout",
    ("limits", "max_connections"): "max_connections",
    ("limits", "bandwidth_rate"): "bandwidth_rate",
    ("limits", "bandwidth_burst"): "bandwidth_burst",
    ("limits", "exit_deliveries_per_minute"): "exit_deliveries_per_minute",
}


def _check_value(where: str, value, default):
    """``value`` if it has the type of ``default`` (the setting's default), else ConfigError."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
    elif isinstance(default, int | float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number")
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where} must be a finite number >= 0")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
    return value


def load(path: Path) -> Config:
    """Read and validate ``path``. Any problem is one ``ConfigError`` line naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no config at {path}; run `overlay init`") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None
    cfg = Config()
    try:
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"top-level key {section!r} must be a [section]")
            for key, value in values.items():
                attr = _MAP.get((section, key))
                if attr is None:
                    raise ConfigError(f"unknown setting [{section}] {key}")
                where = f"[{section}] {key}"
                setattr(cfg, attr, _check_value(where, value, getattr(cfg, attr)))
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


_SECTIONS = {
    "node": "This node's roles, listen addresses and announced feeds.",
    "exit": "Exit delivery (exit and standby-exit roles only).",
    "network": "Peers, gossip and anti-entropy.",
    "control": "Local-only control endpoint (status, peers, exits, Prometheus /metrics).",
    "seeds": "Seed bundles used by `overlay run --seeds` / `overlay send --seeds`.",
    "exits": "Overlay-wide exit pool policy.",
    "liveness": "SWIM failure detection (seconds).",
    "onion": "Onion keys and mixing (all nodes of one overlay use the same values).",
    "relay": "Relay links and light-client sessions.",
    "cover": "Cover traffic (packets per second): `overlay agent` and relays' own loops.",
    "log": "Logging (`overlay run --log-level` overrides; SIGHUP re-reads it).",
    "admission": "Bounds on new members and on dials to addresses records only claim.",
    "limits": "Bounds on connections, relayed bandwidth and exit deliveries (SIGHUP re-reads all but handshake_timeout).",
}

_COMMENTS = {
    "roles": "entry, relay, exit, standby-exit",
    "listen": "home default: all interfaces, fixed ports you can forward (TCP 4001, QUIC UDP 4001, WebSocket TCP 4002)",
    "announce": f"feeds to publish in the record (max {MAX_FEEDS}); empty: derived from listen",
    "record_ttl": "seconds a record stays valid; re-published at half-life",
    "policy": "what an exit delivers, kind:glob (kinds smtp, maildir, http, https)",
    "smtp_relay": "smarthost HOST:PORT for all smtp: mail (e.g. your provider's, port 587); empty: the destination domain's MX hosts on port 25",
    "maildir_root": "maildir: destinations must lie under this directory (no root: maildir is not offered)",
    "smtp_from": "envelope sender and From: of the mail this exit sends (bounces come here); use a real domain",
    "smtp_helo": "name given in EHLO/HELO (empty: this host's name); use your host's public DNS name",
    "smtp_starttls": "off, opportunistic (TLS when offered), required (verified STARTTLS), tls (implicit TLS, port 465)",
    "smtp_username": "AUTH login at the smarthost (needs smtp_starttls required or tls)",
    "smtp_password_file": "file holding the AUTH password (mode 0600); never put the password itself here",
    "smtp_password_env": "... or the environment variable holding it",
    "target_peers": "connections kept open, chosen for diverse feeds",
    "join": "multiaddrs tried in turn at start",
    "gossip_heartbeat": "GossipSub heartbeat, seconds",
    "sync_interval": "seconds between anti-entropy rounds while rounds find differences",
    "sync_idle_interval": "longest gap between rounds while they find none (doubles up to it)",
    "control.listen": "127.0.0.1:PORT (0 picks a free port; written to HOME/control.json)",
    "sources": "seed bundle files, https:// URLs or dns:NAME",
    "operators": "pinned operator public keys (hex)",
    "threshold": "signatures needed from pinned operators",
    "target_live_exits": "standby exits promote when fewer exits are live",
    "exit_policy_mode": '"all-public" or "chain" (one public exit, the next takes over)',
    "epoch_length": "seconds per onion key epoch; the previous key stays accepted one more epoch",
    "mix_delay": "mean seconds a sender asks each forwarding hop to hold a packet (0: no mixing)",
    "max_held": "packets a relay holds for their delay; beyond it new ones are refused",
    "cover.rate": "overlay agent: packets per second, a queued message or else drop cover",
    "cover.loop_rate": "overlay agent: loop-cover packets per second (they come back to it)",
    "cover.relay_loop_rate": "loop-cover packets per second a relay sends through others",
    "max_links": "outbound relay links to neighbours; the least recently used idle one closes",
    "max_clients": "light-client sessions in total; the longest idle one makes room",
    "clients_per_peer": "light-client sessions per client identity",
    "client_idle_timeout": "seconds a light-client session may stay silent before it is closed",
    "level": "debug, info, warning or error",
    "admission.rate": "new identities admitted per second (a joining node's first pull is exempt)",
    "admission.burst": "... and at once",
    "admission.peer_rate": "new identities per second from one forwarding peer",
    "admission.peer_burst": "... and at once",
    "admission.max_unverified": "members held that never talked to this node themselves",
    "admission.max_members": "members held in all",
    "admission.unverified_ttl": "seconds an unverified member is kept without contact",
    "admission.dial_rate": "dials per second to members not yet verified",
    "admission.dial_burst": "... and at once",
    "admission.dial_addr_interval": "seconds before an unverified (or failed) host:port is dialled again",
    "probe_interval": "a crashed member is declared dead about probe_interval + suspicion time after it stops",
    "calm_interval": "seconds between this node's probes of alive members that are not exits or standbys (0: every probe_interval)",
    "max_inbound": "inbound connections at once, handshaking or established",
    "max_inbound_per_ip": "... from one IP address (IPv6: one /64); many local nodes share 127.0.0.1",
    "max_handshakes_per_ip": "connections from one IP whose handshake has not finished",
    "handshake_timeout": "seconds an inbound connection may take to finish its handshake",
    "max_connections": "connections at once, inbound and outbound together (>= max_inbound)",
    "bandwidth_rate": "onion bytes per second relayed for others; beyond it packets are dropped (0: no cap)",
    "bandwidth_burst": "... and at once, in bytes (0: twice the rate, at least 64 KiB)",
    "exit_deliveries_per_minute": "deliveries an exit starts per minute; more wait in the queue (0: no cap)",
}


def render(cfg: Config) -> str:
    """The config file ``overlay init`` writes: set values active, defaults commented."""
    d = Config()
    lines = ["# Hydra node configuration. Lines starting with '#' show defaults.", ""]
    section = None
    for (sec, key), attr in _MAP.items():
        if sec != section:
            if section is not None:
                lines.append("")
            lines += [f"# {_SECTIONS[sec]}", f"[{sec}]"]
            section = sec
        note = _COMMENTS.get(f"{sec}.{key}", _COMMENTS.get(key))
        if note:
            lines.append(f"# {key}: {note}")
        value, default = getattr(cfg, attr), getattr(d, attr)
        always = sec == "node" and key in ("roles", "listen") or (sec, key) == ("exit", "policy")
        prefix = "" if always or value != default else "# "
        lines.append(f"{prefix}{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"
