"""Sender side: build a forward packet.

Invariants:
- the result is exactly ``params.packet_size`` bytes for every path length
  (1..``max_hops``) and every message length up to ``params.max_message``;
- the payload is ``pad(message)`` wrapped in LIONESS once per hop, innermost
  for the exit, so each hop removes one layer and the exit checks the tag;
- all randomness comes from ``rng`` (``os.urandom`` by default): 32 bytes for
  the ephemeral scalar, then the random fill behind the final routing block.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from ..crypto import NodeId
from ..errors import LocalError
from .header import Rng, build_header
from .params import FLAG_DELIVER, Hop, PacketParams
from .payload import lioness_encrypt, pad


class BuiltPacket(NamedTuple):
    packet: bytes
    first_hop: NodeId


def build_packet(
    params: PacketParams,
    path: Sequence[Hop | tuple],
    payload: bytes,
    rng: Rng = os.urandom,
    *,
    delays_ms: Sequence[int] | None = None,
) -> BuiltPacket:
    """Wrap ``payload`` for ``path`` (first hop first, the exit last).

    Returns ``(packet, first_hop)``. Raises ``MessageTooLong`` (a
    ``LocalError``) if ``payload`` exceeds ``params.max_message`` and
    ``LocalError`` for a bad path.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise LocalError("payload must be bytes")
    body = pad(params, bytes(payload))
    header, keys = build_header(params, path, bytes([FLAG_DELIVER]), rng, delays_ms)
    for k in reversed(keys):
        body = lioness_encrypt(k, body)
    return BuiltPacket(header + body, Hop(*path[0]).node)
