"""Standalone mutational fuzzer over every network and seed-source decoder.

Run: ``scripts/fuzz --inputs 1000000 --seed 1`` (or ``python -m tests.fuzz.driver``).

Each input goes to one target of ``tests.fuzz.targets`` (round robin): either
random bytes (10 %), or a valid sample of that target's format with 1-8
byte-level mutations (length-preserving ones only for 45 %) (bit flips, interesting bytes such as CBOR tag/float/indefinite
headers, inserted/deleted/duplicated ranges, truncation, splices with other
samples of any format). A target may return or raise its typed error; any other
exception is counted as unexpected and printed (up to ``--show`` of them, with
the input in hex, and saved to ``--save DIR`` if given). Exit status 1 if any
input raised an unexpected exception.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from tests.fuzz.targets import TARGETS, Target

INTERESTING = bytes(
    [0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x20, 0x3F, 0x40, 0x5F, 0x60, 0x7F]
    + [0x80, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xD8, 0xDB, 0xE0, 0xF4, 0xF6, 0xF9, 0xFB, 0xFF]
)

_IN_PLACE = (0, 1, 2, 7)


def mutate(rng: random.Random, data: bytes, pool: list[bytes], keep_size: bool = False) -> bytes:
    """1-8 byte-level mutations; with ``keep_size`` only those that keep the length
    (fixed-size formats such as onion packets reject any other length at once)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.choice(_IN_PLACE) if keep_size else rng.randrange(9)
        n = len(buf)
        if op == 0 and n:  # flip one bit
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            buf[rng.randrange(n)] = rng.choice(INTERESTING)
        elif op == 2 and n:  # a random byte
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 3:  # insert random bytes
            i = rng.randrange(n + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and n:  # delete a range
            i = rng.randrange(n)
            del buf[i : i + rng.randint(1, 32)]
        elif op == 5 and n:  # duplicate a range
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 64))
            k = rng.randrange(n + 1)
            buf[k:k] = buf[i:j]
        elif op == 6 and n:  # truncate
            del buf[rng.randrange(n) :]
        elif op == 7:  # splice a piece of another sample (any format)
            other = rng.choice(pool)
            if other:
                i = rng.randrange(len(other))
                piece = other[i : i + rng.randint(1, 128)]
                k = rng.randrange(n + 1)
                if keep_size or rng.random() < 0.5:
                    buf[k : k + len(piece)] = piece[: n - k]  # overwrite
                else:
                    buf[k:k] = piece
        elif op == 8 and n >= 2:  # repeat one byte over a run (nesting, long lengths)
            i = rng.randrange(n)
            buf[i : i + rng.randint(1, 64)] = bytes([buf[i]]) * rng.randint(1, 64)
    return bytes(buf)


def generate(rng: random.Random, target: Target, samples: list[bytes], pool: list[bytes]) -> bytes:
    r = rng.random()
    if r < 0.1 or not samples:
        typical = max(len(s) for s in samples) if samples else 512
        return rng.randbytes(rng.randint(0, max(1, typical * 2)))
    return mutate(rng, rng.choice(samples), pool, keep_size=r < 0.55)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="total inputs (all targets)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable")
    ap.add_argument("--show", type=int, default=5, help="unexpected exceptions to print")
    ap.add_argument("--save", type=Path, help="write inputs that raised unexpectedly here")
    ap.add_argument("--progress", type=float, default=30.0, help="seconds between progress lines")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    targets = [TARGETS[n] for n in (args.target or sorted(TARGETS))]
    samples = {t.name: t.samples() for t in targets}
    pool = [s for t in TARGETS.values() for s in t.samples()]
    for t in targets:  # the samples themselves must pass
        for s in samples[t.name]:
            t.run(s)

    inputs: Counter[str] = Counter()
    accepted: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    kinds: Counter[tuple[str, str]] = Counter()
    reasons: dict[str, Counter[str]] = {t.name: Counter() for t in targets}
    shown = 0
    t0 = last = time.monotonic()
    for i in range(args.inputs):
        target = targets[i % len(targets)]
        data = generate(rng, target, samples[target.name], pool)
        inputs[target.name] += 1
        try:
            target.run(data)
        except target.typed as e:
            reason = getattr(e, "reason", None)
            reasons[target.name][reason.value if reason is not None else type(e).__name__] += 1
        except Exception as e:  # noqa: BLE001 - this is what the fuzzer looks for
            unexpected[target.name] += 1
            kind = f"{type(e).__name__}: {str(e)[:80]}"
            kinds[(target.name, kind)] += 1
            if shown < args.show and kinds[(target.name, kind)] == 1:
                shown += 1
                print(f"UNEXPECTED in {target.name}: {kind}\n  input {data[:96].hex()}")
                traceback.print_exc(limit=-3, file=sys.stdout)
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                (args.save / f"{target.name}-{i}.bin").write_bytes(data)
        else:
            accepted[target.name] += 1
        now = time.monotonic()
        if now - last >= args.progress:
            last = now
            rate = (i + 1) / (now - t0)
            print(f"... {i + 1} inputs, {rate:.0f}/s, {sum(unexpected.values())} unexpected")
            sys.stdout.flush()

    elapsed = time.monotonic() - t0
    total = sum(inputs.values())
    print(f"\nfuzz: {total} inputs in {elapsed:.1f} s ({total / elapsed:.0f}/s), seed {args.seed}")
    print(f"{'target':18} {'inputs':>9} {'accepted':>9} {'unexpected':>10}  top rejections")
    for t in targets:
        n = t.name
        top = ", ".join(f"{r} {c}" for r, c in reasons[n].most_common(3))
        print(f"{n:18} {inputs[n]:>9} {accepted[n]:>9} {unexpected[n]:>10}  {top}")
    print(f"{'total':18} {total:>9} {sum(accepted.values()):>9} {sum(unexpected.values()):>10}")
    for (name, kind), count in kinds.most_common():
        print(f"  {name}: {count} x {kind}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
