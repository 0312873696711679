"""Record fixtures shared by tests (fixed keys, so results are reproducible)."""

from __future__ import annotations

from overlay.crypto import OnionKey, SigningKey
from overlay.records import Role, ValidRecord, make_record

NOW = 1_800_000_000
KEY = SigningKey(bytes(range(1, 33)))
ONION = OnionKey(bytes(range(33, 65)), 7)
FEEDS = (
    "/ip4/192.0.2.10/tcp/4001",
    "/ip4/192.0.2.10/udp/4001/quic-v1",
    "/ip4/198.51.100.3/tcp/4002/ws",
)


def exit_record(seq: int = 1, now: int = NOW, key: SigningKey = KEY, **kw) -> ValidRecord:
    args = dict(
        seq=seq,
        now=now,
        roles=Role.EXIT | Role.RELAY,
        feeds=FEEDS,
        onion_key=ONION.public,
        onion_epoch=ONION.epoch,
        exit_policy=("smtp:*@example.org", "maildir:*"),
    )
    args.update(kw)
    return make_record(key, **args)


def relay_record(seq: int = 1, now: int = NOW, key: SigningKey | None = None) -> ValidRecord:
    return make_record(
        key or SigningKey.generate(),
        seq=seq,
        now=now,
        roles=Role.RELAY,
        feeds=("/ip4/127.0.0.1/tcp/4001",),
        onion_key=ONION.public,
        onion_epoch=1,
    )
