"""Event ordering, the network model and the gossip mesh."""

import random

from overlay.sim.engine import Engine
from overlay.sim.gossip import Gossip, GossipParams
from overlay.sim.network import C_SYNC, TRANSPORT_OVERHEAD, Network


def test_events_run_in_time_then_insertion_order():
    e = Engine()
    seen = []
    e.at(2.0, lambda a, b, c: seen.append(a), "late")
    e.at(1.0, lambda a, b, c: seen.append(a), "first")
    e.at(1.0, lambda a, b, c: seen.append(a), "second")
    e.run(1.5)
    assert seen == ["first", "second"] and e.now == 1.5
    e.at(0.5, lambda a, b, c: seen.append(a), "past runs now")
    e.run(3.0)
    assert seen == ["first", "second", "past runs now", "late"]


def _net(**kw) -> Network:
    n = Network(random.Random(1), 8, **kw)
    for i in range(8):
        n.up[i] = n.reach[i] = 1
    return n


def test_latency_is_symmetric_and_in_range():
    n = _net()
    lats = [n.latency(a, b) for a in range(8) for b in range(8) if a != b]
    assert all(n.latency(a, b) == n.latency(b, a) for a in range(8) for b in range(8))
    assert 0.005 < min(lats) and max(lats) < 0.5


def test_unreachable_partitioned_and_dropped_messages_do_not_arrive():
    n = _net(loss=0.0)
    assert n.send(C_SYNC, 0, 1, 100, 0.0) is not None
    n.reach[1] = 0
    assert n.send(C_SYNC, 0, 1, 100, 0.0) is None
    n.reach[1] = 1
    n.partition([0, 1, 0, 1, 0, 1, 0, 1])
    assert n.send(C_SYNC, 0, 1, 100, 0.0) is None
    assert n.send(C_SYNC, 0, 2, 100, 0.0) is not None
    n.partition(None)
    lossy = _net(loss=1.0, loss_mode="drop")
    assert lossy.send(C_SYNC, 0, 1, 100, 0.0) is None


def test_retransmit_mode_delays_instead_of_dropping():
    n = _net(loss=0.5, loss_mode="retransmit", jitter=0.0)
    base = n.latency(0, 1)
    arrivals = [n.send(C_SYNC, 0, 1, 10, 100.0 * k) for k in range(200)]
    got = [a - 100.0 * k for k, a in enumerate(arrivals) if a is not None]
    assert len(got) > 190  # only six losses in a row drop a message
    assert min(got) < base + 0.01 and max(got) > base + 0.2


def test_uplink_serializes_by_size():
    n = _net(loss=0.0, jitter=0.0, bandwidth=1000.0)
    a1 = n.send(C_SYNC, 0, 1, 1000 - TRANSPORT_OVERHEAD, 0.0)
    a2 = n.send(C_SYNC, 0, 1, 1000 - TRANSPORT_OVERHEAD, 0.0)
    assert abs((a2 - a1) - 1.0) < 1e-9  # the second waits one second for the first
    assert n.traffic.bytes[C_SYNC] == 2000


def _mesh(mode: str, n: int = 300):
    e = Engine()
    net = Network(random.Random(2), n, loss=0.0)
    got: dict[int, int] = {}

    def deliver(k, msg, src, now):
        got[k] = got.get(k, 0) + 1
        return True

    g = Gossip(e, net, random.Random(3), n, GossipParams(mode=mode), deliver)
    rng = random.Random(4)
    for i in range(n):
        net.up[i] = net.reach[i] = 1
        for j in rng.sample(range(n), 8):
            g.connect(i, j)
    g.build_mesh()
    return e, g, got


def test_mesh_degrees_and_single_delivery():
    e, g, got = _mesh("mesh")
    e.run(3.0)  # heartbeats prune meshes above D_high
    degrees = [len(m) for m in g.mesh]
    assert min(degrees) >= 4 and max(degrees) <= 12
    g.publish(0, 0, 0, b"x" * 200, None, e.now)
    e.run(10.0)
    assert len(got) == 299 and set(got.values()) == {1}  # everyone once, never twice


def test_flood_costs_more_than_mesh_push():
    costs = {}
    for mode in ("mesh", "flood"):
        e, g, got = _mesh(mode)
        e.run(3.0)
        before = g.net.traffic.msgs[0]
        g.publish(0, 0, 0, b"x" * 200, None, e.now)
        e.run(10.0)
        assert len(got) == 299
        costs[mode] = g.net.traffic.msgs[0] - before
    assert costs["flood"] > 1.5 * costs["mesh"]


def test_traffic_bins_add_up_to_the_totals():
    e, g, got = _mesh("mesh")
    e.run(3.0)
    for k in range(5):
        g.publish(k, 0, 0, b"y" * 100, None, e.now)
        e.run(e.now + 12.0)  # spread over several 10 s bins
    tr = g.net.traffic
    for cls in range(len(tr.msgs)):
        assert sum(b[cls] for b in tr.bins_msgs) == tr.msgs[cls]
        assert sum(b[cls] for b in tr.bins_bytes) == tr.bytes[cls]
    assert sum(tr.node_bytes) == sum(tr.bytes)
