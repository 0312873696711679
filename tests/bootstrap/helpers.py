"""Shared builders for bootstrap tests: deterministic keys and bundles."""

from __future__ import annotations

import socket
import time

from bootstrap.bundle import Entry, SeedBundle
from overlay.crypto import SigningKey

NOW = 1_800_000_000


def key(n: int) -> SigningKey:
    return SigningKey(bytes([n]) * 32)


OPS = [key(1), key(2), key(3)]
ATTACKER = [key(66), key(67)]
PINNED = [bytes(k.node_id) for k in OPS]


def entry(n: int, *addrs: str) -> Entry:
    return Entry(key(100 + n).node_id, addrs or (f"/ip4/10.0.{n}.1/tcp/4001",))


def make_bundle(
    seq: int = 10,
    *,
    signers=(0, 1),
    peers: int = 2,
    issued_at: int | None = None,
    ttl: int = 86400,
    ops=OPS,
    threshold: int = 2,
    extra_signers=(),
) -> SeedBundle:
    issued = NOW if issued_at is None else issued_at
    b = SeedBundle.create(
        seq=seq,
        issued_at=issued,
        expires_at=issued + ttl,
        entries=[
            entry(
                i,
                f"/ip4/10.{seq % 250}.{i}.1/tcp/4001",
                f"/ip4/10.{seq % 250}.{i}.1/udp/4001/quic-v1",
            )
            for i in range(peers)
        ],
        operators=[k.node_id for k in ops],
        threshold=threshold,
    )
    for i in signers:
        b = b.signed_by(ops[i])
    for k in extra_signers:
        b = b.signed_by(k)
    return b


def wall_bundle(seq: int, **kw) -> SeedBundle:
    """A bundle valid now by the wall clock (for tests going through fetch_bundle)."""
    return make_bundle(seq, issued_at=int(time.time()) - 60, **kw)


def closed_port() -> int:
    """A loopback TCP port with nothing listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def forged_copy(good: SeedBundle) -> SeedBundle:
    """``good``'s signatures over a body with the attacker's entry peers and a higher seq."""
    return SeedBundle(
        seq=good.seq + 1000,
        issued_at=good.issued_at,
        expires_at=good.expires_at,
        entries=(entry(66, "/ip4/6.6.6.6/tcp/4001"),),
        operators=good.operators,
        threshold=good.threshold,
        signatures=good.signatures,
    )
