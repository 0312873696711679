"""Which errand connections a node closes again (``core.peering.choose_trims``)."""

from hypothesis import given
from hypothesis import strategies as st

from overlay.core.peering import choose_trims
from overlay.crypto import SigningKey

PEERS = [SigningKey(bytes([100 + i]) * 32).node_id for i in range(12)]
A, B, C, D, E = PEERS[:5]
OTHERS = set(PEERS[5:9])  # four connections of other kinds (chosen peers, inbound)


def trims(transient, connected, *, keep=frozenset(), busy=frozenset(), target=4, now=100.0):
    return choose_trims(
        transient,
        connected,
        keep=set(keep),
        busy=lambda p: p in busy,
        target=target,
        now=now,
        linger=20.0,
    )


def test_an_idle_errand_connection_is_closed_after_its_linger_oldest_first():
    transient = {A: 70.0, B: 60.0, C: 90.0}
    trim, forget = trims(transient, OTHERS | {A, B, C})
    assert trim == [B, A]  # C has lingered 10 s only
    assert forget == [B, A]


def test_what_is_kept_busy_or_gone_is_not_closed():
    transient = {A: 0.0, B: 0.0, C: 0.0, D: 0.0}
    trim, forget = trims(transient, OTHERS | {A, B, C}, keep={A}, busy={B})
    assert trim == [C]
    assert set(forget) == {A, C, D}  # A: kept (an exit, our relay); D: not connected
    # B is busy: still tracked, tried again later
    assert B not in forget


def test_an_errand_connection_that_a_node_needs_becomes_a_peer():
    transient = {A: 0.0, B: 10.0}
    trim, forget = trims(transient, {A, B, *list(OTHERS)[:3]}, target=4)
    assert trim == [A]  # five connections, four needed: one goes
    assert forget == [A, B]  # B now counts towards target_peers


@given(
    st.dictionaries(st.sampled_from(PEERS), st.floats(0, 200)),
    st.sets(st.sampled_from(PEERS)),
    st.sets(st.sampled_from(PEERS)),
    st.sets(st.sampled_from(PEERS)),
    st.integers(0, 12),
)
def test_trims_never_go_below_target_nor_touch_what_must_stay(
    transient, connected, keep, busy, target
):
    trim, forget = trims(transient, connected, keep=keep, busy=busy, target=target)
    assert set(trim) <= set(forget) <= set(transient)
    assert not set(trim) & (keep | busy)
    assert all(p in connected and 100.0 - transient[p] >= 20.0 for p in trim)
    assert len(connected) - len(trim) >= min(target, len(connected))
