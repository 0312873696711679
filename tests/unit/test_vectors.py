"""Golden record vectors: fixed keys and time must give exactly these bytes."""

import json
from pathlib import Path

from overlay.records import make_tombstone, validate
from tests.recgen import KEY, NOW, exit_record

VECTORS = Path(__file__).parent.parent / "vectors" / "records.json"


def build() -> dict:
    rec = exit_record(seq=42)
    tomb = make_tombstone(KEY, seq=43, now=NOW)
    return {
        "signing_key_seed": KEY.seed().hex(),
        "now": NOW,
        "record": {"summary": rec.summary(), "hex": rec.encode().hex()},
        "tombstone": {"summary": tomb.summary(), "hex": tomb.encode().hex()},
    }


def test_vectors_match():
    expected = json.loads(VECTORS.read_text())
    assert build() == expected
    for name in ("record", "tombstone"):
        rec = validate(bytes.fromhex(expected[name]["hex"]), NOW)
        assert rec.summary() == expected[name]["summary"]


if __name__ == "__main__":  # regenerate: python -m tests.unit.test_vectors
    VECTORS.write_text(json.dumps(build(), indent=2) + "\n")
