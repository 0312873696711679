"""Sender-side Sphinx header construction (X25519 with per-hop blinding).

Invariants:
- the sender draws one ephemeral scalar ``x``; hop ``i`` sees
  ``alpha_i = b_{i-1} * ... * b_0 * x * G`` and shares
  ``s_i = X25519(y_i, alpha_i)``; the sender computes the same value by
  applying ``x, b_0, .., b_{i-1}`` one after the other to hop ``i``'s public
  key (clamped X25519 multiplications commute), where
  ``b_i = KDF(s_i, "blind")`` — as Katzenpost does with X25519;
- beta is ``max_hops`` routing blocks long whatever the path length: the
  Sphinx filler makes the tail each hop shifts in consistent with the MACs,
  and the space behind the final block is random, so no hop (not even the
  last) learns the path length or its position;
- each gamma is a keyed BLAKE2b-128 over ``format | epoch | alpha | beta`` of
  that hop, so the clear epoch and every bit of alpha are authenticated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..crypto import NodeId, OnionPublicKey, kdf, keystream, mac, x25519, x25519_base
from ..errors import LocalError
from .params import (
    DELAY_OFFSET,
    DELAY_SIZE,
    FLAG_FORWARD,
    HELD_FLAGS,
    HOP_BLOCK_SIZE,
    KEY_SIZE,
    LABEL_BLIND,
    LABEL_MAC,
    LABEL_RHO,
    MAX_DELAY_MS,
    MAX_EPOCH,
    Hop,
    PacketParams,
)
from .payload import LionessKey, lioness_key

Rng = Callable[[int], bytes]


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b[:n], "little")).to_bytes(n, "little")


def check_path(params: PacketParams, path: Sequence[Hop | tuple]) -> list[Hop]:
    """Validate a sender-supplied path; raise ``LocalError`` on misuse."""
    try:
        hops = [Hop(*h) for h in path]
    except TypeError as e:
        raise LocalError("path entries must be (NodeId, OnionPublicKey, epoch)") from e
    if not 1 <= len(hops) <= params.max_hops:
        raise LocalError(f"path must have 1..{params.max_hops} hops, got {len(hops)}")
    for h in hops:
        if not isinstance(h.node, NodeId) or not isinstance(h.key, OnionPublicKey):
            raise LocalError("path entries must be (NodeId, OnionPublicKey, epoch)")
        if not isinstance(h.epoch, int) or not 0 <= h.epoch <= MAX_EPOCH:
            raise LocalError("epoch must be an int in 0..2**32-1")
    return hops


def build_header(
    params: PacketParams,
    path: Sequence[Hop | tuple],
    final_block: bytes,
    rng: Rng,
    delays_ms: Sequence[int] | None = None,
) -> tuple[bytes, list[LionessKey]]:
    """Return ``(header, per-hop LIONESS keys)`` for ``path``.

    ``final_block`` is the plaintext routing block for the last hop (flag and
    optional surb id); the rest of its space is filled from ``rng``.
    ``delays_ms[i]`` is how long hop ``i`` holds the packet before forwarding
    (``len(path) - 1`` entries, default all 0). With ``len(path)`` entries the
    final hop holds it too, ``delays_ms[-1]`` ms, before it delivers: its block
    then says deliver-held or reply-held and carries the delay at the offset a
    forward block does.
    """
    hops = check_path(params, path)
    n = len(hops)
    if delays_ms is None:
        delays_ms = [0] * (n - 1)
    if len(delays_ms) not in (n - 1, n) or not all(
        isinstance(d, int) and 0 <= d <= MAX_DELAY_MS for d in delays_ms
    ):
        raise LocalError("delays_ms needs len(path)-1 or len(path) ints in 0..2**32-1")
    blk = HOP_BLOCK_SIZE
    beta_size = params.beta_size
    fmt = bytes([params.format])

    x = rng(KEY_SIZE)
    if len(x) != KEY_SIZE:
        raise LocalError("rng returned the wrong number of bytes")
    alphas: list[bytes] = []
    secrets: list[bytes] = []
    blinds: list[bytes] = []
    alpha = x25519_base(x)
    try:
        for i, h in enumerate(hops):
            point = x25519(x, bytes(h.key))
            for b in blinds:
                point = x25519(b, point)
            alphas.append(alpha)
            secrets.append(point)
            if i < n - 1:
                b = kdf(point, LABEL_BLIND)
                blinds.append(b)
                alpha = x25519(b, alpha)
    except ValueError as e:
        raise LocalError("a path onion key is a low-order point") from e

    streams = [keystream(kdf(s, LABEL_RHO), beta_size + blk) for s in secrets]

    # filler: what the hops 0..n-2 shift into the tail of beta
    filler = b""
    for i in range(n - 1):
        filler = _xor(filler + bytes(blk), streams[i][beta_size - len(filler) :])

    tail_space = beta_size - len(filler)  # (r - n + 1) blocks for the final hop
    if len(final_block) > blk:
        raise LocalError("final routing block too long")
    pad = rng(tail_space - len(final_block))
    if len(pad) != tail_space - len(final_block):
        raise LocalError("rng returned the wrong number of bytes")
    last = final_block + pad
    if len(delays_ms) == n:  # the final hop holds too: held flag, delay where forward has it
        if last[0] not in HELD_FLAGS or len(final_block) > DELAY_OFFSET:
            raise LocalError("this final block cannot carry a delay")
        end = DELAY_OFFSET + DELAY_SIZE
        delay = delays_ms[-1].to_bytes(DELAY_SIZE, "big")
        last = bytes([HELD_FLAGS[last[0]]]) + last[1:DELAY_OFFSET] + delay + last[end:]
    beta = _xor(last, streams[n - 1]) + filler

    def epoch_bytes(i: int) -> bytes:
        return hops[i].epoch.to_bytes(4, "big")

    gamma = mac(kdf(secrets[n - 1], LABEL_MAC), fmt + epoch_bytes(n - 1) + alphas[n - 1] + beta)
    for i in range(n - 2, -1, -1):
        block = b"".join(
            (
                bytes([FLAG_FORWARD]),
                bytes(hops[i + 1].node),
                epoch_bytes(i + 1),
                delays_ms[i].to_bytes(4, "big"),
                gamma,
            )
        )
        beta = _xor(block + beta[: beta_size - blk], streams[i])
        gamma = mac(kdf(secrets[i], LABEL_MAC), fmt + epoch_bytes(i) + alphas[i] + beta)
    header = fmt + epoch_bytes(0) + alphas[0] + beta + gamma
    return header, [lioness_key(s) for s in secrets]
