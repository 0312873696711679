"""Strict canonical CBOR helpers shared by every wire format.

Invariant: ``loads_canonical(b)`` succeeds only if ``b`` is exactly one CBOR item,
no larger than ``max_size``, within the subset below, and ``dumps(loads(b)) == b``
(the canonical form). It raises only ``DecodeError``.

The subset (docs/protocol.md, "CBOR subset"): unsigned and negative integers,
byte strings, text strings, arrays and maps, all with definite lengths in their
shortest form; no tags, no floats, no simple values (not even false, true or
null: no wire format uses them); containers nested at most ``MAX_DEPTH`` deep;
at most ``max_items(max_size)`` data items in all. A hand-written pre-scan
(``scan``) checks all of this on the raw bytes, in one linear pass that builds
no value, before cbor2 decodes anything: cbor2 would otherwise build every
tagged value (a MIME message for tag 36, a big integer for tag 2, ...) before
any type check, which let one 264 KB frame cost about a second of CPU.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from ..errors import DecodeError, Reason

#: containers (arrays, maps) nested more than this many levels are rejected
#: (``TOO_DEEP``); the deepest wire formats (sync ENTRIES, seed bundles) nest 4
MAX_DEPTH = 8
#: a format with size cap S accepts at most S // 8 + 64 data items in all; the
#: densest legitimate frames (sync ENTRIES: 3 items per 36+ bytes) stay well below
ITEMS_PER_BYTE_CAP = 8
ITEMS_SLACK = 64


def max_items(max_size: int) -> int:
    """The item bound of a format whose size cap is ``max_size``."""
    return max_size // ITEMS_PER_BYTE_CAP + ITEMS_SLACK


def dumps(value: Any) -> bytes:
    return cbor2.dumps(value, canonical=True)


def scan(data: bytes, max_depth: int = MAX_DEPTH, item_limit: int | None = None) -> int:
    """Check that ``data`` is exactly one item of the subset; return its item count.

    Builds no value; one pass over the item headers (strings are skipped, not
    read). Raises ``DecodeError``: ``UNSUPPORTED_TYPE`` for a tag, float, simple
    value or indefinite length; ``NON_CANONICAL`` for an argument (integer,
    length) not in its shortest form; ``TOO_DEEP`` for containers nested deeper
    than ``max_depth`` or more than ``item_limit`` items declared in all (by
    default ``max_items(len(data))``); ``MALFORMED`` for reserved encodings,
    lengths beyond the input, truncation and trailing bytes.
    """
    n = len(data)
    limit = max_items(n) if item_limit is None else item_limit
    i = 0
    items = 1  # declared so far: the top-level item plus every container's count
    stack: list[int] = []
    left = 1  # items still to read in the innermost open container (or at top level)
    try:
        while True:
            while not left:
                if not stack:
                    if i != n:
                        raise DecodeError(Reason.MALFORMED, "trailing bytes after CBOR item")
                    return items
                left = stack.pop()
            left -= 1
            ib = data[i]
            i += 1
            if ib >= 0xC0:
                what = "tag" if ib < 0xE0 else "float or simple value"
                raise DecodeError(Reason.UNSUPPORTED_TYPE, f"CBOR {what} at byte {i - 1}")
            ai = ib & 0x1F
            if ai < 24:
                arg = ai
            elif ai == 24:
                arg = data[i]
                i += 1
                if arg < 24:
                    raise DecodeError(
                        Reason.NON_CANONICAL, f"non-shortest CBOR argument at {i - 2}"
                    )
            elif ai < 28:
                size = 1 << (ai - 24)
                if i + size > n:
                    raise DecodeError(Reason.MALFORMED, "truncated CBOR item")
                arg = int.from_bytes(data[i : i + size], "big")
                if arg >> (4 * size) == 0:  # fits in half the bytes: not the shortest form
                    raise DecodeError(
                        Reason.NON_CANONICAL, f"non-shortest CBOR argument at {i - 1}"
                    )
                i += size
            elif ai == 31 and ib >= 0x40:
                raise DecodeError(Reason.UNSUPPORTED_TYPE, "indefinite-length CBOR item")
            else:
                raise DecodeError(Reason.MALFORMED, f"reserved CBOR additional info {ai}")
            if ib < 0x40:
                continue
            if ib < 0x80:
                if arg > n - i:
                    raise DecodeError(Reason.MALFORMED, "CBOR string longer than the input")
                i += arg
                continue
            if len(stack) >= max_depth:  # this container would be level max_depth + 1
                raise DecodeError(Reason.TOO_DEEP, f"CBOR nested deeper than {max_depth}")
            if ib >= 0xA0:
                arg *= 2
            if arg:
                if arg > n - i:  # every item takes at least one byte
                    raise DecodeError(Reason.MALFORMED, "CBOR container longer than the input")
                items += arg
                if items > limit:
                    raise DecodeError(Reason.TOO_DEEP, f"more than {limit} CBOR items")
                stack.append(left)
                left = arg
    except IndexError:
        raise DecodeError(Reason.MALFORMED, "truncated CBOR item") from None


def loads_canonical(data: bytes, max_size: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(Reason.MALFORMED, "input is not bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(Reason.OVERSIZED, f"{len(data)} > {max_size} bytes")
    if not data:
        raise DecodeError(Reason.MALFORMED, "empty input")
    scan(data, MAX_DEPTH, max_items(max_size))
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except Exception as e:  # e.g. invalid UTF-8 in a text string
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
