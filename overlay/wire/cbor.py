"""Strict canonical CBOR helpers shared by every wire format.

Invariant: ``loads_canonical(b)`` succeeds only if ``b`` is exactly one CBOR item,
no larger than ``max_size``, and ``dumps(loads(b)) == b`` (the canonical form).
It raises only ``DecodeError``.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from ..errors import DecodeError, Reason


def dumps(value: Any) -> bytes:
    return cbor2.dumps(value, canonical=True)


def loads_canonical(data: bytes, max_size: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(Reason.MALFORMED, "input is not bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(Reason.OVERSIZED, f"{len(data)} > {max_size} bytes")
    if not data:
        raise DecodeError(Reason.MALFORMED, "empty input")
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except Exception as e:  # cbor2 raises several types (incl. ValueError, RecursionError)
        raise DecodeError(Reason.MALFORMED, f"cbor: {type(e).__name__}") from None
    if fp.tell() != len(data):
        raise DecodeError(Reason.MALFORMED, "trailing bytes after CBOR item")
    try:
        again = dumps(value)
    except Exception:
        raise DecodeError(Reason.MALFORMED, "value cannot be re-encoded") from None
    if again != data:
        raise DecodeError(Reason.NON_CANONICAL, "not the canonical CBOR encoding")
    return value


def loads_versioned(data: bytes, max_size: int, version: int, what: str) -> dict:
    """``loads_canonical``, then require a map whose key 0 is the uint ``version``
    (every Hydra wire format starts so); ``what`` names the format in errors."""
    raw = loads_canonical(data, max_size)
    if type(raw) is not dict:
        raise DecodeError(Reason.MALFORMED, f"{what} must be a map")
    v = raw.get(0)
    if type(v) is not int or v != version:
        raise DecodeError(Reason.UNKNOWN_VERSION, f"{what} version {v!r}")
    return raw


def expect_map(value: Any, required: set[int], optional: set[int] = frozenset()) -> dict:
    if type(value) is not dict:
        raise DecodeError(Reason.MALFORMED, "expected a map")
    keys = set(value)
    if not all(type(k) is int for k in keys):
        raise DecodeError(Reason.MALFORMED, "map keys must be integers")
    missing = required - keys
    if missing:
        raise DecodeError(Reason.MALFORMED, f"missing keys {sorted(missing)}")
    unknown = keys - required - optional
    if unknown:
        raise DecodeError(Reason.MALFORMED, f"unknown keys {sorted(unknown)}")
    return value


def uint(value: Any, name: str, bits: int = 64) -> int:
    if type(value) is not int or value < 0 or value >= 1 << bits:
        raise DecodeError(Reason.MALFORMED, f"{name} must be a uint{bits}")
    return value


def bstr(value: Any, name: str, size: int | None = None, max_size: int | None = None) -> bytes:
    if type(value) is not bytes:
        raise DecodeError(Reason.MALFORMED, f"{name} must be a byte string")
    if size is not None and len(value) != size:
        raise DecodeError(Reason.MALFORMED, f"{name} must be {size} bytes")
    if max_size is not None and len(value) > max_size:
        raise DecodeError(Reason.MALFORMED, f"{name} longer than {max_size} bytes")
    return value


def tstr(value: Any, name: str, max_len: int) -> str:
    if type(value) is not str:
        raise DecodeError(Reason.MALFORMED, f"{name} must be a text string")
    if len(value) > max_len:
        raise DecodeError(Reason.MALFORMED, f"{name} longer than {max_len}")
    return value


def array(value: Any, name: str, max_len: int) -> list:
    if type(value) is not list:
        raise DecodeError(Reason.MALFORMED, f"{name} must be an array")
    if len(value) > max_len:
        raise DecodeError(Reason.MALFORMED, f"{name} has more than {max_len} items")
    return value
