"""The collector thresholds a node sets for its process (``overlay.collector``)."""

import gc
import time

import pytest

from overlay import collector


@pytest.fixture
def thresholds():
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_tune_replaces_cpythons_defaults_once(thresholds):
    gc.set_threshold(*collector.DEFAULTS)
    assert collector.tune() is True
    assert gc.get_threshold() == collector.THRESHOLDS
    assert collector.tune() is False  # already tuned: nothing changes
    assert gc.get_threshold() == collector.THRESHOLDS


def test_tune_keeps_thresholds_a_program_chose(thresholds):
    gc.set_threshold(1234, 5, 6)
    assert collector.tune() is False
    assert gc.get_threshold() == (1234, 5, 6)


def _full_collections() -> int:
    return gc.get_stats()[2]["collections"]


def test_a_tuned_process_runs_one_full_collection_when_due(thresholds, monkeypatch):
    gc.set_threshold(*collector.DEFAULTS)
    assert collector.tune() is True
    assert collector.collect_if_due() is False  # just tuned: not due yet
    monkeypatch.setattr(collector, "_next_full", time.monotonic() - 1.0)
    before = _full_collections()
    assert collector.collect_if_due() is True
    assert _full_collections() == before + 1
    # due again only FULL_EVERY later: the other nodes of the process skip it
    assert collector._next_full > time.monotonic() + collector.FULL_EVERY - 60
    assert collector.collect_if_due() is False
    assert _full_collections() == before + 1


def test_no_forced_collection_when_the_program_chose_its_thresholds(thresholds, monkeypatch):
    gc.set_threshold(1234, 5, 6)
    monkeypatch.setattr(collector, "_next_full", time.monotonic() - 1.0)
    before = _full_collections()
    assert collector.collect_if_due() is False
    assert _full_collections() == before
