"""The collector thresholds a node sets for its process (``overlay.collector``)."""

import gc

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
