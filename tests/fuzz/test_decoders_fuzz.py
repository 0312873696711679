"""Hypothesis fuzzing of every decoder reachable from the network or a seed source.

Each target (``tests/fuzz/targets.py``) must return or raise its typed error
for any input: random bytes, valid samples with byte edits, and valid CBOR
maps with one field replaced by an arbitrary CBOR value (tags, floats, simple
values, deep nesting included). The example count comes from the Hypothesis
profile chosen in tests/conftest.py (HYPOTHESIS_PROFILE, HYDRA_FUZZ_EXAMPLES);
the long mutational run is ``scripts/fuzz``.
"""

from __future__ import annotations

import json

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import TARGETS, Target, check_samples

NAMES = sorted(TARGETS)
CBOR_MAP_TARGETS = [
    "record",
    "sync",
    "liveness",
    "exit_message",
    "ack",
    "delivered",
    "delivered_answer",
    "inflight_mark",
    "seed_bundle",
]

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.binary(max_size=70)
    | st.text(max_size=40)
    | st.floats()
    | st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 3, 24, 32, 36, 258, 55799]), st.text())
    | st.builds(cbor2.CBORSimpleValue, st.sampled_from([0, 16, 19, 32, 255])),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.integers(-2, 20), inner, max_size=6)
    ),
    max_leaves=25,
)

_slow_ok = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def attempt(target: Target, data: bytes) -> None:
    try:
        target.run(data)
    except target.typed:
        pass


def test_samples_are_accepted():
    check_samples()


@pytest.mark.parametrize("name", NAMES)
@_slow_ok
@given(data=st.binary(max_size=3000))
def test_random_bytes(name, data):
    attempt(TARGETS[name], data)


@pytest.mark.parametrize("name", NAMES)
@_slow_ok
@given(choice=st.data())
def test_mutated_samples(name, choice):
    target = TARGETS[name]
    sample = bytearray(choice.draw(st.sampled_from(target.samples())))
    edits = choice.draw(
        st.lists(st.tuples(st.integers(0, len(sample) - 1), st.integers(0, 255)), max_size=6)
    )
    for pos, value in edits:
        sample[pos] = value
    cut = choice.draw(st.integers(0, len(sample)))
    tail = choice.draw(st.binary(max_size=16))
    if choice.draw(st.booleans()):
        sample = sample[:cut] + tail + sample[cut:]
    elif choice.draw(st.booleans()):
        sample = sample[:cut]
    attempt(target, bytes(sample))


@pytest.mark.parametrize("name", CBOR_MAP_TARGETS)
@_slow_ok
@given(choice=st.data())
def test_structured_cbor(name, choice):
    """A valid map with one key dropped, added or replaced by any CBOR value."""
    target = TARGETS[name]
    m = dict(cbor2.loads(choice.draw(st.sampled_from(target.samples()))))
    key = choice.draw(st.sampled_from([*m, -1, 99]))
    if choice.draw(st.booleans()):
        m.pop(key, None)
    else:
        m[key] = choice.draw(cbor_values)
    try:
        data = cbor2.dumps(m, canonical=True)
    except Exception:  # noqa: BLE001 - a value cbor2 itself cannot encode
        return
    attempt(target, data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=30,
)


@_slow_ok
@given(choice=st.data())
def test_entries_structured(choice):
    """A node's /records listing with one field of one record replaced by any JSON value."""
    doc = json.loads(TARGETS["entries"].samples()[0])
    rec = choice.draw(st.sampled_from(doc["records"]))
    field = choice.draw(st.sampled_from([*rec, "extra"]))
    rec[field] = choice.draw(json_values)
    attempt(TARGETS["entries"], json.dumps(doc).encode())
