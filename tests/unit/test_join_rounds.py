"""How a join dials its addresses: in rounds, each round more patient.

A join address that refuses is given up at once; one whose dial times out or
whose handshake failed is dialled again in the next round, after the other
addresses, with a longer timeout each round (a saturated peer's handshake can
take longer than one dial timeout). The rounds' pauses are skipped with
trio's autojump clock.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from overlay.config import Config
from overlay.crypto import SigningKey
from overlay.errors import LocalError
from overlay.net.errors import DialError, DialHandshakeFailed, DialTimeout
from overlay.services.peers import JOIN_DIAL_RETRIES, PeerManager


class _Host:
    dial_timeout = 5.0

    def __init__(self) -> None:
        self.dials: list[tuple[str, float | None]] = []

    async def connect(self, addr: str, *, timeout: float | None = None) -> str:
        self.dials.append((addr, timeout))
        if addr == "refused":
            raise DialError("dial refused: connection refused")
        if addr == "dropped":
            raise DialHandshakeFailed("dial dropped failed: failed to upgrade mux")
        raise DialTimeout(f"dial {addr} timed out")


async def test_timed_out_addresses_are_dialled_again_in_rounds_more_patiently(autojump_clock):
    host = _Host()
    node = SimpleNamespace(
        node_id=SigningKey.generate().node_id, config=Config(), rng=random.Random(1), host=host
    )
    pm = PeerManager(node, sync=None)
    with pytest.raises(LocalError, match="could not join through any address") as e:
        await pm.join(["silent", "refused", "dropped"])
    rounds = len(JOIN_DIAL_RETRIES) + 1
    assert host.dials[:3] == [("silent", 5.0), ("refused", 5.0), ("dropped", 5.0)]
    later = host.dials[3:]
    assert [a for a, _ in later] == ["silent", "dropped"] * (rounds - 1)
    assert [t for _, t in later[::2]] == [5.0 * k for k in range(2, rounds + 1)]
    assert "refused" in str(e.value) and "timed out" in str(e.value)


def test_a_failed_upgrade_is_a_failed_handshake_and_a_refusal_is_not():
    import trio
    from libp2p.network.exceptions import SwarmException
    from libp2p.transport.exceptions import MuxerUpgradeFailure

    from overlay.net.errors import _handshake_failed

    def wrapped(inner: BaseException) -> SwarmException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise SwarmException("failed to upgrade mux for peer x") from e
        except SwarmException as outer:
            return outer

    assert _handshake_failed(wrapped(MuxerUpgradeFailure("negotiation")))
    assert _handshake_failed(wrapped(trio.TooSlowError()))
    assert not _handshake_failed(wrapped(ConnectionRefusedError(111, "refused")))
    assert not _handshake_failed(SwarmException("failed to open TCP stream"))
