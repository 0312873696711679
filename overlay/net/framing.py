"""Length-prefixed frames over byte streams (libp2p streams or anything alike).

Wire format: ``uvarint(len(payload)) || payload`` — the unsigned varint of
multiformats (LEB128, minimal encoding, at most 9 bytes), the same prefix
libp2p itself uses for DHT and pubsub messages.

Invariants:
- the declared length is checked against ``max_size`` as soon as the prefix is
  decoded, BEFORE any byte of the body is buffered: an oversized frame raises
  ``DecodeError(Reason.OVERSIZED)`` and costs at most the prefix;
- non-minimal (padded) varints and over-long prefixes raise
  ``DecodeError(Reason.NON_CANONICAL)`` / ``DecodeError(Reason.MALFORMED)``;
- a stream that ends in the middle of a frame raises ``DecodeError``; a stream
  that ends exactly on a frame boundary is a clean end (``None``);
- the decoder is sans-I/O (``FrameDecoder.feed``) and its buffer never holds
  more than one maximal frame plus one read chunk;
- a frame, once its first byte has arrived, must be complete within
  ``frame_timeout`` seconds (default ``PARTIAL_FRAME_TIMEOUT``), else the
  readers raise ``DecodeError(Reason.IDLE_TIMEOUT)``: a peer that sends part of
  a frame and stalls cannot hold a reader (and its stream slot) forever.
  Waiting *between* frames is not bounded here: that deadline belongs to the
  caller (wrap calls in ``trio.fail_after``).
"""

from __future__ import annotations

import math
from typing import Protocol

import trio

from ..errors import DecodeError, LocalError, Reason

DEFAULT_MAX_FRAME_SIZE = 64 * 1024
MAX_VARINT_BYTES = 9  # multiformats unsigned-varint: at most 63 bits
_READ_CHUNK = 64 * 1024
# Seconds a started frame may take to complete (64 KiB at >= 6.5 KB/s).
PARTIAL_FRAME_TIMEOUT = 10.0


class ByteReader(Protocol):
    async def read(self, max_bytes: int) -> bytes:
        """Return 1..max_bytes bytes, or ``b""`` at end of stream."""
        ...


class ByteWriter(Protocol):
    async def write(self, data: bytes) -> None: ...


def encode_uvarint(value: int) -> bytes:
    """Minimal unsigned LEB128 encoding of ``value`` (0 <= value < 2**63)."""
    if value < 0 or value >= 1 << 63:
        raise LocalError(f"uvarint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(payload: bytes, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Return ``uvarint(len) || payload``; a payload over ``max_size`` is our own bug."""
    if len(payload) > max_size:
        raise LocalError(f"frame of {len(payload)} bytes exceeds max_size {max_size}")
    return encode_uvarint(len(payload)) + bytes(payload)


def _decode_uvarint_prefix(buf: bytes | bytearray, max_value: int) -> tuple[int, int] | None:
    """Decode a uvarint at the start of ``buf``.

    Returns ``(value, prefix_len)`` or ``None`` when more bytes are needed.
    Raises ``DecodeError`` as soon as the value is known to exceed ``max_value``.
    """
    value = 0
    for i, byte in enumerate(buf):
        if i >= MAX_VARINT_BYTES:
            raise DecodeError(Reason.MALFORMED, "length prefix longer than 9 bytes")
        value |= (byte & 0x7F) << (7 * i)
        if value > max_value:
            # Checked on every byte: a huge declared length is refused before
            # the prefix even completes, let alone the body.
            raise DecodeError(Reason.OVERSIZED, f"frame length exceeds {max_value}")
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise DecodeError(Reason.NON_CANONICAL, "non-minimal length prefix")
            return value, i + 1
    if len(buf) >= MAX_VARINT_BYTES:
        raise DecodeError(Reason.MALFORMED, "length prefix longer than 9 bytes")
    return None


class FrameDecoder:
    """Sans-I/O incremental decoder: ``feed(bytes) -> list[frame]``."""

    __slots__ = ("max_size", "_buf")

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_size < 0:
            raise LocalError("max_size must be >= 0")
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return every frame now complete. Raises ``DecodeError``."""
        self._buf += data
        frames: list[bytes] = []
        while True:
            head = _decode_uvarint_prefix(self._buf, self.max_size)
            if head is None:
                return frames
            length, plen = head
            if len(self._buf) < plen + length:
                return frames
            frames.append(bytes(self._buf[plen : plen + length]))
            del self._buf[: plen + length]

    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (a clean place for EOF)."""
        return not self._buf

    def wanted(self) -> int:
        """How many more bytes would (at least) complete the pending frame (>= 1)."""
        head = _decode_uvarint_prefix(self._buf, self.max_size)
        if head is None:
            return 1
        length, plen = head
        return max(1, plen + length - len(self._buf))


class FrameReader:
    """Reads frames from a ``ByteReader``; never reads past what one frame needs.

    Reading exactly what the pending frame needs (instead of big chunks) keeps
    bytes that follow the last frame in the stream, so a protocol may switch
    from frames to raw bytes (e.g. fixed-size packets) on the same stream.
    A frame must complete within ``frame_timeout`` seconds of its first byte
    (``None``: no bound).
    """

    __slots__ = ("_stream", "_decoder", "_ready", "_timeout")

    def __init__(
        self,
        stream: ByteReader,
        max_size: int = DEFAULT_MAX_FRAME_SIZE,
        *,
        frame_timeout: float | None = PARTIAL_FRAME_TIMEOUT,
    ) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_size)
        self._ready: list[bytes] = []
        self._timeout = frame_timeout

    async def read_frame(self) -> bytes | None:
        """Next frame, or ``None`` on a clean end of stream. Raises ``DecodeError``."""
        deadline = math.inf
        while not self._ready:
            want = min(self._decoder.wanted(), _READ_CHUNK)
            if self._decoder.at_boundary() or self._timeout is None:
                chunk = await self._stream.read(want)
            else:
                if deadline == math.inf:
                    deadline = trio.current_time() + self._timeout
                chunk = await _read_until(self._stream, want, deadline)
            if not chunk:
                if self._decoder.at_boundary():
                    return None
                raise DecodeError(Reason.MALFORMED, "stream ended inside a frame")
            self._ready.extend(self._decoder.feed(chunk))
        return self._ready.pop(0)

    def __aiter__(self) -> FrameReader:
        return self

    async def __anext__(self) -> bytes:
        frame = await self.read_frame()
        if frame is None:
            raise StopAsyncIteration
        return frame


async def _read_until(stream: ByteReader, want: int, deadline: float) -> bytes:
    with trio.move_on_at(deadline):
        return await stream.read(want)
    raise DecodeError(Reason.IDLE_TIMEOUT, "peer stalled inside a frame")


async def read_frame(
    stream: ByteReader,
    max_size: int = DEFAULT_MAX_FRAME_SIZE,
    *,
    frame_timeout: float | None = PARTIAL_FRAME_TIMEOUT,
) -> bytes | None:
    """Read one frame (unbuffered); ``None`` on a clean end of stream."""
    return await FrameReader(stream, max_size, frame_timeout=frame_timeout).read_frame()


async def write_frame(
    stream: ByteWriter, payload: bytes, max_size: int = DEFAULT_MAX_FRAME_SIZE
) -> None:
    """Write ``uvarint(len) || payload`` in one write."""
    await stream.write(encode_frame(payload, max_size))


async def read_exactly(
    stream: ByteReader, n: int, *, frame_timeout: float | None = PARTIAL_FRAME_TIMEOUT
) -> bytes:
    """Read exactly ``n`` bytes, looping over short reads.

    Raises ``DecodeError(Reason.MALFORMED)`` if the stream ends first and
    ``DecodeError(Reason.IDLE_TIMEOUT)`` if the bytes, once the first has
    arrived, take longer than ``frame_timeout`` seconds.
    """
    if n < 0:
        raise LocalError("n must be >= 0")
    parts: list[bytes] = []
    missing = n
    deadline = math.inf
    while missing:
        if parts and frame_timeout is not None:
            if deadline == math.inf:
                deadline = trio.current_time() + frame_timeout
            chunk = await _read_until(stream, min(missing, _READ_CHUNK), deadline)
        else:
            chunk = await stream.read(min(missing, _READ_CHUNK))
        if not chunk:
            raise DecodeError(Reason.MALFORMED, f"stream ended after {n - missing} of {n} bytes")
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)
