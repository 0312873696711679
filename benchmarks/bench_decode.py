"""Cost of strict CBOR decoding: the pre-scan against the decoder without it.

Run:  .venv/bin/python benchmarks/bench_decode.py [--rounds N]

"before" is the decoder as it was without the pre-scan (cbor2 builds the whole
value, then the canonical re-encode check), "after" is ``overlay.wire.cbor.
loads_canonical`` (pre-scan, then the same). Inputs:

- a normal record (~430 bytes: an exit with seven feeds and two policy rules),
  through ``loads_canonical`` alone and through ``records.decode``;
- the densest legitimate sync frame (ENTRIES with 4,096 entries, 12,000 items);
- a sync frame of 264 KB (``sync.MAX_SIZE``) full of CBOR tag 36 (MIME)
  values, the frame of the CPU exhaustion attack;
- a 264 KB frame of nested arrays and one of 264,000 empty arrays.

Before and after are interleaved round by round; each figure is the best
(minimum) per-call time over the rounds: the machine is shared, and the
minimum is the least noisy estimate of the cost itself.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cbor2  # noqa: E402

from overlay import records  # noqa: E402
from overlay.crypto import OnionKey, SigningKey  # noqa: E402
from overlay.errors import DecodeError  # noqa: E402
from overlay.records import Role, make_record  # noqa: E402
from overlay.wire import cbor, sync  # noqa: E402


def before(data: bytes, max_size: int):
    """The decoder without the pre-scan (as it was)."""
    if len(data) > max_size:
        raise DecodeError(detail="oversized")
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except Exception:
        raise DecodeError(detail="cbor") from None
    if fp.tell() != len(data):
        raise DecodeError(detail="trailing")
    try:
        again = cbor2.dumps(value, canonical=True)
    except Exception:
        raise DecodeError(detail="re-encode") from None
    if again != data:
        raise DecodeError(detail="non-canonical")
    return value


def normal_record() -> bytes:
    rec = make_record(
        SigningKey(bytes(range(1, 33))),
        seq=12,
        now=1_800_000_000,
        roles=Role.EXIT | Role.RELAY,
        feeds=[
            "/ip4/192.0.2.10/tcp/4001",
            "/ip4/192.0.2.10/udp/4001/quic-v1",
            "/ip4/198.51.100.3/tcp/4002/ws",
            "/ip6/2001:db8::10/tcp/4001",
            "/ip6/2001:db8::10/udp/4001/quic-v1",
            "/ip4/203.0.113.5/tcp/4001",
            "/dns4/exit-7.example.org/tcp/443/wss",
        ],
        onion_key=OnionKey(bytes(range(33, 65)), 7).public,
        onion_epoch=7,
        exit_policy=("smtp:*@example.org", "maildir:*"),
    )
    return rec.encode()


def entries_frame() -> bytes:
    """The densest legitimate sync frame: a full ENTRIES listing."""
    pairs = tuple((i.to_bytes(2, "big") * 16, 2**40 + i) for i in range(sync.MAX_ENTRIES))
    return sync.encode(sync.Entries(pairs, tuple(range(sync.BUCKETS))))


def max_frame(item: bytes) -> bytes:
    head = b"\xa3\x00\x01\x01\x04\x02"  # {0: 1, 1: 4, 2: [...]}
    n = (sync.MAX_SIZE - len(head) - 5) // len(item)
    count = b"\x9a" + n.to_bytes(4, "big") if n >= 1 << 16 else b"\x99" + n.to_bytes(2, "big")
    return head + count + item * n


def per_call(fn, data: bytes, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        try:
            fn(data)
        except DecodeError:
            pass
    return (time.perf_counter() - t0) / number


def best_pair(old, new, data: bytes, rounds: int, n_old: int, n_new: int) -> tuple[float, float]:
    """Best per-call time of each, the two interleaved round by round (same machine load)."""
    t_old, t_new = [], []
    for _ in range(rounds):
        t_old.append(per_call(old, data, n_old))
        t_new.append(per_call(new, data, n_new))
    return min(t_old), min(t_new)


def outcome(fn, data: bytes) -> str:
    try:
        fn(data)
    except DecodeError as e:
        return f"rejected ({e.reason.value})"
    return "accepted"


def fmt(seconds: float) -> str:
    if seconds >= 0.01:
        return f"{seconds * 1e3:.0f} ms"
    if seconds >= 1e-4:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    rec = normal_record()
    cases = [
        (f"record, {len(rec)} B: CBOR layer", rec, records.MAX_SIZE, 20_000, None),
        (f"record, {len(rec)} B: records.decode", rec, records.MAX_SIZE, 2_000, records.decode),
        (
            "sync ENTRIES, 4096 entries (legitimate)",
            entries_frame(),
            sync.MAX_SIZE,
            20,
            sync.decode,
        ),
        (
            "sync frame of MIME tags (tag 36)",
            max_frame(cbor2.dumps(cbor2.CBORTag(36, "Content-Type: text/plain\n\nx"))),
            sync.MAX_SIZE,
            1,
            sync.decode,
        ),
        ("sync frame of nested arrays", max_frame(b"\x81"), sync.MAX_SIZE, 3, sync.decode),
        ("sync frame of empty arrays", max_frame(b"\x80"), sync.MAX_SIZE, 3, sync.decode),
    ]
    print(f"{'input':40} {'size':>8} {'before':>10} {'after':>10}  after: outcome")
    for name, data, cap, number, full in cases:
        if full is None:
            old = lambda d, cap=cap: before(d, cap)  # noqa: E731
            new = lambda d, cap=cap: cbor.loads_canonical(d, cap)  # noqa: E731
        else:
            old, new = _with_decoder(full, before), full
        t_old, t_new = best_pair(old, new, data, args.rounds, number, max(number, 10))
        print(f"{name:40} {len(data):>8} {fmt(t_old):>10} {fmt(t_new):>10}  {outcome(new, data)}")


def _with_decoder(fn, loads):
    """``fn`` (a wire decoder) with the CBOR layer swapped for ``loads``, for "before"."""

    def run(data: bytes):
        saved = cbor.loads_canonical
        cbor.loads_canonical = loads
        try:
            return fn(data)
        finally:
            cbor.loads_canonical = saved

    return run


if __name__ == "__main__":
    main()
