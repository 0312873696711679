"""Cover-traffic payloads: what the end of a cover packet's path finds in it.

Cover packets are ordinary Sphinx packets of the ``SMALL`` class, built and
processed like any other; only the node where the path ends reads this.

    cover payload (canonical CBOR map, integer keys, MAX_SIZE 16 bytes)
      0  version  uint (=1)
      16 kind     uint: 1 drop, 2 loop

- *drop*: a forward packet (path entry, relay, exit, like a message) whose
  last hop discards it (``hydra_relay_delivered_total{kind="drop_cover"}``);
  it exists so that a sender's packet rate says nothing about its messages;
- *loop*: a packet built from a reply block of the sender's own making, whose
  path comes back to the sender (a light client: through its entry, which
  pushes it like any reply; a relay: to itself). The payload is encrypted for
  the sender, so hops and the entry cannot tell a loop from an ack.

The key 16 is not a key of an exit message (``overlay.wire.delivery``), so no
payload is both. Invariants: ``decode`` checks the size first and raises only
``DecodeError``; ``is_cover`` is a cheap prefix test for the delivery path.
"""

from __future__ import annotations

from ..errors import DecodeError, Reason
from . import cbor

VERSION = 1
MAX_SIZE = 16
K_VERSION, K_KIND = 0, 16
DROP, LOOP = 1, 2
KINDS = (DROP, LOOP)


def encode(kind: int) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown cover kind {kind}")
    return cbor.dumps({K_VERSION: VERSION, K_KIND: kind})


_PREFIX = encode(DROP)[:4]  # map(2), key 0, version 1, key 16


def is_cover(payload: bytes) -> bool:
    return payload[:4] == _PREFIX


def decode(data: bytes) -> int:
    """The cover kind of ``data``; ``DecodeError`` for anything else."""
    if len(data) > MAX_SIZE:
        raise DecodeError(Reason.OVERSIZED, f"cover payload over {MAX_SIZE} bytes")
    raw = cbor.expect_map(
        cbor.loads_versioned(data, MAX_SIZE, VERSION, "cover payload"), {K_VERSION, K_KIND}
    )
    kind = cbor.uint(raw[K_KIND], "kind", 8)
    if kind not in KINDS:
        raise DecodeError(Reason.MALFORMED, f"cover kind {kind}")
    return kind
