"""Joining through a libp2p peer that is not a Hydra node is a failed join."""

import pytest
import trio

from overlay.crypto import SigningKey
from overlay.errors import LocalError
from overlay.net.host import Libp2pHost
from overlay.runtime import Node
from overlay.testing import join_addr, light_services, make_home, overlay

pytestmark = pytest.mark.slow


async def test_join_through_a_non_hydra_peer_fails(tmp_path):
    # a plain libp2p peer: Noise, Yamux, identify, gossip, DHT, but no Hydra sync
    async with Libp2pHost(SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as foreign:
        home = make_home(tmp_path / "x")
        with trio.fail_after(60):
            with pytest.raises(LocalError, match="not a Hydra node"):
                async with Node(home, join=foreign.listen_addrs()[:1], services=light_services()):
                    pass


async def test_join_moves_on_from_a_non_hydra_peer(tmp_path):
    async with (
        overlay(tmp_path / "o", 1) as nodes,
        Libp2pHost(SigningKey.generate(), ["/ip4/127.0.0.1/tcp/0"]) as foreign,
    ):
        join = [foreign.listen_addrs()[0], join_addr(nodes[0])]
        home = make_home(tmp_path / "x")
        with trio.fail_after(60):
            async with Node(home, join=join, services=light_services()) as node:
                assert node.joined_via == join_addr(nodes[0])
                assert nodes[0].node_id in node.view
