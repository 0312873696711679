"""Onion key epochs: the schedule, early rotation, the overlap, and the key files."""

from __future__ import annotations

import pytest

from overlay.errors import LocalError
from overlay.home import Home
from overlay.onion import epochs
from overlay.onion.epochs import (
    ROTATE_AT,
    key_retired,
    plan,
    record_key_retired,
    scheduled_epoch,
)
from overlay.testing import make_home

L = 10.0


def test_schedule_is_floor_of_unix_time():
    assert scheduled_epoch(0, L) == 0
    assert scheduled_epoch(9.999, L) == 0
    assert scheduled_epoch(10.0, L) == 1
    assert scheduled_epoch(1_700_000_000) == 1_700_000_000 // 86400
    assert epochs.EPOCH_LENGTH == 86400
    assert scheduled_epoch(-5, L) == 0
    assert scheduled_epoch(1e12, 1.0) == epochs.MAX_EPOCH  # the record field is a uint32
    with pytest.raises(LocalError):
        scheduled_epoch(5, 0.5)


def test_switch_at_the_boundary_and_overlap_of_one_epoch():
    p = plan([], 55.0, L)
    assert (p.current, p.keep, p.drop, p.rotated) == (5, (5,), (), "schedule")
    p = plan([5], 59.9, L)
    assert (p.current, p.keep, p.rotated, p.next) == (5, (5,), None, 6)
    p = plan([5], 60.0, L)  # boundary: 6 current, 5 still accepted
    assert (p.current, p.keep, p.drop, p.rotated) == (6, (6, 5), (), "schedule")
    assert plan([6, 5], 69.9, L).keep == (6, 5)
    p = plan([6, 5], 70.0, L)  # one full epoch later 5 goes
    assert (p.current, p.keep, p.drop) == (7, (7, 6), (5,))
    # a node down for a while: the old key is past its overlap at once
    p = plan([5], 200.0, L)
    assert (p.current, p.keep, p.drop) == (20, (20,), (5,))


def test_early_rotation_when_half_full_and_full_old_epochs_retire():
    bound = 100
    half = int(bound * ROTATE_AT)
    p = plan([5], 51.0, L, cache_sizes={5: half - 1}, max_per_epoch=bound)
    assert p.rotated is None
    p = plan([5], 51.0, L, cache_sizes={5: half}, max_per_epoch=bound)
    assert (p.current, p.keep, p.rotated) == (6, (6, 5), "early")
    # running ahead: 6 stays current through scheduled epoch 6, 5 is kept one epoch more
    assert plan([6, 5], 61.0, L).keep == (6, 5)
    p = plan([6, 5], 71.0, L)
    assert (p.current, p.keep, p.drop) == (7, (7, 6), (5,))
    # an old epoch whose cache is full is erased (its packets become unknown_epoch)
    p = plan([6, 5], 52.0, L, cache_sizes={5: bound, 6: 1}, max_per_epoch=bound)
    assert (p.keep, p.drop) == ((6,), (5,))


def test_at_most_max_epochs_kept_under_a_flood():
    held = [5]
    for _ in range(10):
        p = plan(held, 51.0, L, cache_sizes={max(held): 60}, max_per_epoch=100, max_epochs=3)
        assert p.rotated == "early" and len(p.keep) <= 3
        held = list(p.keep)
    assert held == [15, 14, 13]
    with pytest.raises(LocalError):
        plan([5], 51.0, L, max_epochs=1)


def test_plan_is_deterministic_for_restarts():
    args = ([9, 8, 7, 3], 91.0, L)
    assert plan(*args) == plan(*reversed_list(args))
    assert plan(*args).keep == (9, 8) and set(plan(*args).drop) == {7, 3}


def reversed_list(args):
    held, *rest = args
    return (list(reversed(held)), *rest)


def test_clients_judge_records_by_the_schedule_they_were_issued_on():
    assert not key_retired(5, 69.9, L) and key_retired(5, 70.0, L)
    assert not record_key_retired(5, 55, 65.0, L)
    assert record_key_retired(5, 55, 75.0, L)
    # epoch below the schedule at issue time: another schedule, no verdict
    assert not record_key_retired(0, 55, 1000.0, L)
    # ahead of the schedule (early rotation): fine
    assert not record_key_retired(9, 55, 75.0, L)


def test_home_key_files(tmp_path):
    home = make_home(tmp_path / "h", onion_epoch_length=L)
    (first,) = home.onion_keys()
    assert home.onion_key().epoch == first
    nxt = home.prepare_onion_key(first + 1)
    assert (home.onion_dir / f"{first + 1}.next").exists()
    assert home.prepare_onion_key(first + 1).public == nxt.public  # idempotent
    assert set(home.onion_keys()) == {first}  # a prepared key is not accepted yet
    assert home.onion_key().epoch == first
    active = home.activate_onion_key(first + 1)
    assert active.public == nxt.public and active.epoch == first + 1
    assert not (home.onion_dir / f"{first + 1}.next").exists()
    assert home.onion_key().epoch == first + 1
    # activating with no prepared key makes a fresh one; stale prepared keys go
    home.prepare_onion_key(first + 2)
    home.activate_onion_key(first + 5)
    assert not list(home.onion_dir.glob("*.next"))
    home.drop_onion_key(first)
    assert set(home.onion_keys()) == {first + 1, first + 5}
    for f in home.onion_dir.iterdir():
        assert f.stat().st_mode & 0o077 == 0
    assert Home(home.path).onion_key().epoch == first + 5


def test_init_starts_at_the_scheduled_epoch(tmp_path):
    import time

    home = make_home(tmp_path / "h", onion_epoch_length=L)
    e = home.onion_key().epoch
    assert abs(e - scheduled_epoch(time.time(), L)) <= 1
    assert home.config().onion_epoch_length == L
