"""A brief fuzz run of the record decoder: structured mutations of valid records.

Run longer by hand: HYPOTHESIS_PROFILE=fuzz pytest tests/fuzz (profiles: tests/conftest.py)
"""

import cbor2
from hypothesis import given
from hypothesis import strategies as st

from overlay.errors import RemoteError
from overlay.records import validate
from tests.recgen import NOW, exit_record

BASE = cbor2.loads(exit_record().encode())

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.binary(max_size=70)
    | st.text(max_size=70)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=9) | st.dictionaries(st.integers(-2, 20), inner, max_size=6)
    ),
    max_leaves=20,
)


@given(key=st.integers(-1, 16), value=cbor_values, drop=st.booleans())
def test_structured_mutations(key, value, drop):
    m = dict(BASE)
    if drop:
        m.pop(key, None)
    else:
        m[key] = value
    try:
        data = cbor2.dumps(m, canonical=True)
    except Exception:
        return
    try:
        validate(data, NOW)
    except RemoteError:
        return
    assert data == exit_record().encode()  # only the original itself may pass


@given(data=st.binary(min_size=1, max_size=1100))
def test_random_bytes(data):
    try:
        validate(b"\xac" + data, NOW)  # a 12-entry map header, then noise
    except RemoteError:
        pass
