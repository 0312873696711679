"""Every decoder reachable from the network or a seed source, as fuzz targets.

Shared by the Hypothesis tests (``tests/fuzz/test_decoders_fuzz.py``) and the
standalone mutational driver (``scripts/fuzz``). A target takes arbitrary
bytes, runs them through one decoder the way the node does (decode, then the
next steps a peer's input reaches: verify, freshness, nested decoders), and
either returns or raises one of the target's ``typed`` exceptions. Any other
exception is a bug in the decoder.

``samples`` are valid inputs of the format: the mutational driver starts
from them (byte flips, splices), so mutated inputs get past the first checks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from bootstrap import bundle as seed_bundle
from bootstrap import dnstxt, entries
from overlay import records
from overlay.crypto import OnionKey, SigningKey
from overlay.errors import DecodeError, RemoteError
from overlay.net import framing
from overlay.onion import LARGE, SMALL, Deliver, PacketRejected, build_packet, make_surb, process
from overlay.onion.surb import open_reply, use_surb
from overlay.wire import delivered, delivery, liveness, relay, sync
from tests.bootstrap.helpers import NOW as SEED_NOW
from tests.bootstrap.helpers import PINNED, make_bundle
from tests.recgen import NOW, exit_record, relay_record


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]
    typed: tuple[type[BaseException], ...]
    samples: Callable[[], list[bytes]]


def _rng(seed: int) -> Callable[[int], bytes]:
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


# ---- fixed keys: our node (the hop that processes packets) and two others ------------

ME = SigningKey(bytes([7]) * 32)
MY_ONION = OnionKey(bytes([8]) * 32, 5)
OTHER = [SigningKey(bytes([20 + i]) * 32) for i in range(2)]
OTHER_ONION = [OnionKey(bytes([30 + i]) * 32, 5) for i in range(2)]
MY_HOP = (ME.node_id, MY_ONION.public, MY_ONION.epoch)
OTHER_HOPS = [(k.node_id, o.public, o.epoch) for k, o in zip(OTHER, OTHER_ONION, strict=True)]
KEYS = {MY_ONION.epoch: MY_ONION}


# ---- records and anti-entropy --------------------------------------------------------


def run_record(data: bytes) -> object:
    return records.validate(data, NOW)


@cache
def record_samples() -> list[bytes]:
    return [
        exit_record().encode(),
        relay_record(key=OTHER[0]).encode(),
        records.make_tombstone(OTHER[1], seq=3, now=NOW).encode(),
    ]


def run_sync(data: bytes) -> object:
    frame = sync.decode(data)
    if isinstance(frame, sync.Records):  # the records inside go to the record decoder
        for raw in frame.records:
            try:
                run_record(raw)
            except RemoteError:
                pass
    return frame


@cache
def sync_samples() -> list[bytes]:
    recs = record_samples()
    return [
        sync.encode(sync.Summary(tuple(bytes([i]) * 8 for i in range(64)))),
        sync.encode(
            sync.Entries(((bytes(ME.node_id), 4), (bytes(OTHER[0].node_id), 2**40)), (0, 5, 63))
        ),
        sync.encode(sync.Want((bytes(ME.node_id), bytes(OTHER[1].node_id)))),
        sync.encode(sync.Records(tuple(recs))),
    ]


# ---- liveness ------------------------------------------------------------------------


def run_liveness(data: bytes) -> object:
    frame = liveness.decode(data)
    if isinstance(frame, liveness.Suspect | liveness.Dead | liveness.Alive):
        frame.verify()
    return frame


@cache
def liveness_samples() -> list[bytes]:
    a, b = ME.node_id, OTHER[0].node_id
    frames = [
        liveness.Ping(1),
        liveness.Ack(2**63),
        liveness.Nack(77),
        liveness.PingReq(b, 9),
        liveness.DeadReq(),
        liveness.Suspect(b, 3, a, 1234).signed_with(ME.sign),
        liveness.Dead(b, 4, a, 99_999).signed_with(ME.sign),
        liveness.Alive(a, 5, 1).signed_with(ME.sign),
    ]
    return [liveness.encode(f) for f in frames]


# ---- onion packets, client frames, SURBs ---------------------------------------------


@cache
def _surbs() -> dict:
    """SURBs whose return path ends at us, and their secrets, per class."""
    out = {}
    for params in (SMALL, LARGE):
        surb, secret = make_surb(params, [OTHER_HOPS[0], MY_HOP], _rng(params.format))
        out[params.format] = (surb, secret)
    return out


def _packets(params, seed: int) -> list[bytes]:
    rng = _rng(seed)
    msg = delivery.ExitMessage.make(bytes(16), "smtp:a@example.org", b"hello", None).encode()
    out = [
        build_packet(params, [MY_HOP, *OTHER_HOPS], b"forwarded", rng).packet,  # we forward
        build_packet(params, [MY_HOP], msg, rng).packet,  # we are the exit
    ]
    surb, _ = _surbs()[params.format]
    ack = delivery.Ack.make(bytes(16), delivery.AckStatus.QUEUED).encode()
    _first, reply = use_surb(params, surb, ack)
    # the reply's first hop is OTHER[0]; process its layer so the packet is ours next
    fwd = process(params, {OTHER_ONION[0].epoch: OTHER_ONION[0]}, reply)
    out.append(fwd.packet)
    return out


def run_onion(params) -> Callable[[bytes], object]:
    def run(data: bytes) -> object:
        result = process(params, KEYS, data)
        if isinstance(result, Deliver):
            if result.surb_id is None:  # the exit decodes the message it delivers
                msg = delivery.decode(result.payload)
                msg.dest  # noqa: B018 - must never raise for a decoded message
                if msg.reply_block is not None:
                    relay.decode_reply_blocks(msg.reply_block)
            else:  # a reply for a SURB we made: open it, then decode the ack
                _surb, secret = _surbs()[params.format]
                delivery.decode_ack(open_reply(params, secret, result.payload))
        return result

    return run


def run_client_frame(data: bytes) -> object:
    return relay.decode(data)


@cache
def client_frame_samples() -> list[bytes]:
    pkt = _packets(SMALL, 1)[0]
    return [
        relay.encode(relay.Submit(pkt)),
        relay.encode(relay.Register((bytes(16), bytes([1]) * 16))),
        relay.encode(relay.Reply(bytes(16), bytes(SMALL.payload_size))),
        relay.encode(relay.Dead((ME.node_id, OTHER[0].node_id))),
        relay.encode(relay.Dead(())),
    ]


def run_reply_blocks(data: bytes) -> object:
    blocks = relay.decode_reply_blocks(data)
    for surb in (blocks.final, blocks.queued):
        if surb is not None:  # the exit builds its reply packet from the SURB bytes
            params = SMALL if surb[0] == SMALL.format else LARGE
            use_surb(params, surb, b"ack")
    return blocks


@cache
def reply_block_samples() -> list[bytes]:
    small, _ = _surbs()[SMALL.format]
    large, _ = _surbs()[LARGE.format]
    return [small, relay.encode_reply_blocks(small), relay.encode_reply_blocks(small, large)]


def run_surb(data: bytes) -> object:
    params = LARGE if data[:1] == bytes([LARGE.format]) else SMALL
    return use_surb(params, data, b"reply")


def run_open_reply(data: bytes) -> object:
    _surb, secret = _surbs()[SMALL.format]
    return delivery.decode_ack(open_reply(SMALL, secret, data))


@cache
def open_reply_samples() -> list[bytes]:
    reply = _packets(SMALL, 3)[2]
    result = process(SMALL, KEYS, reply)
    return [result.payload]


# ---- exit messages, acks, delivery notices -------------------------------------------


def run_exit_message(data: bytes) -> object:
    msg = delivery.decode(data)
    msg.dest  # noqa: B018 - must never raise for a decoded message
    return msg


@cache
def exit_message_samples() -> list[bytes]:
    surb, _ = _surbs()[SMALL.format]
    return [
        delivery.ExitMessage.make(bytes(16), "smtp:user@example.org:2525", b"body").encode(),
        delivery.ExitMessage.make(
            bytes([1]) * 16, "https://example.org/hook?a=1", b"x" * 100, surb, (bytes(32),)
        ).encode(),
        delivery.ExitMessage.make(bytes([2]) * 16, "maildir:inbox/a", b"").encode(),
    ]


def run_ack(data: bytes) -> object:
    return delivery.decode_ack(data)


@cache
def ack_samples() -> list[bytes]:
    return [
        delivery.Ack.make(bytes(16), delivery.AckStatus.DELIVERED).encode(),
        delivery.Ack.make(bytes(16), delivery.AckStatus.REJECTED, "policy denies it").encode(),
    ]


def run_delivered(data: bytes) -> object:
    return delivered.decode(data)


def run_delivered_answer(data: bytes) -> object:
    return delivered.decode_answer(data)


@cache
def delivered_samples() -> list[bytes]:
    return [delivered.encode(delivered.Delivered(tuple(bytes([i]) * 16 for i in range(5))))]


@cache
def answer_samples() -> list[bytes]:
    return [
        delivered.encode_answer(delivered.Answer((bytes(16),), (bytes([1]) * 16,))),
        delivered.encode_answer(delivered.Answer()),
        delivered.encode_answer(delivered.Answer((), (), ((bytes([2]) * 16, bytes(32)),))),
    ]


def run_inflight_mark(data: bytes) -> object:
    return delivered.decode_mark(data)


@cache
def mark_samples() -> list[bytes]:
    return [delivered.encode_mark(delivered.Mark(bytes([i]) * 16, bool(i))) for i in (0, 1)]


# ---- stream framing --------------------------------------------------------------------


def run_framing(data: bytes) -> object:
    """Feed the stream in three chunks (the split points come from the input itself)."""
    dec = framing.FrameDecoder(1024)
    cut = data[0] if data else 0
    frames = []
    for part in (data[:cut], data[cut : 2 * cut], data[2 * cut :]):
        frames += dec.feed(part)
        dec.wanted()
    return frames, dec.at_boundary()


@cache
def framing_samples() -> list[bytes]:
    return [
        b"\x05" + framing.encode_frame(b"hello") + framing.encode_frame(bytes(300)),
        b"\x01" + framing.encode_frame(b"") + framing.encode_frame(bytes(1024)),
    ]


# ---- seed sources: bundle files/HTTP bodies, DNS TXT, node record listings -----------


def run_bundle(data: bytes) -> object:
    b = seed_bundle.decode(data)
    return b.verify(PINNED, 2).check_valid_at(SEED_NOW)


@cache
def bundle_samples() -> list[bytes]:
    return [make_bundle(10).encode(), make_bundle(11, signers=(0, 1, 2), peers=5).encode()]


def run_dnstxt(data: bytes) -> object:
    """One TXT string per line (the DNS layer hands us a list of strings)."""
    found = dnstxt.decode_txt(data.split(b"\n"))
    for raw in found:
        try:
            run_bundle(raw)
        except RemoteError:
            pass
    return found


@cache
def dnstxt_samples() -> list[bytes]:
    raw = bundle_samples()[0]
    lines = dnstxt.encode_txt(raw)
    return ["\n".join(lines).encode(), "\n".join(reversed(lines)).encode()]


class NotJson(ValueError):
    """The control endpoint's answer is not JSON of the expected shape (the CLI's error)."""


def run_entries(data: bytes) -> object:
    """``overlay-seeds create --from-node``: a node's /records JSON to chosen entries."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise NotJson from None
    recs = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(recs, list):
        raise NotJson
    return entries.choose_entries(recs, now=NOW, max_peers=4)


@cache
def entries_samples() -> list[bytes]:
    def rec(key: SigningKey, feeds: list[str], roles=("relay",)) -> dict:
        return {
            "peer_id": key.node_id.peer_id(),
            "node_id": key.node_id.hex(),
            "seq": 3,
            "roles": list(roles),
            "feeds": feeds,
            "expires_at": NOW + 86400,
            "live": True,
        }

    doc = {
        "records": [
            rec(ME, ["/ip4/192.0.2.1/tcp/4001", "/ip4/192.0.2.1/udp/4001/quic-v1"], ("entry",)),
            rec(OTHER[0], ["/ip6/2001:db8::1/tcp/4001", "/dns4/seed.example.org/tcp/443/ws"]),
            rec(OTHER[1], [f"/ip4/10.0.0.1/tcp/1/p2p/{OTHER[0].node_id.peer_id()}/p2p-circuit"]),
        ]
    }
    return [json.dumps(doc).encode()]


# ---- the registry ----------------------------------------------------------------------

TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("record", run_record, (RemoteError,), record_samples),
        Target("sync", run_sync, (DecodeError,), sync_samples),
        Target("liveness", run_liveness, (RemoteError,), liveness_samples),
        Target("client_frame", run_client_frame, (DecodeError,), client_frame_samples),
        Target("reply_blocks", run_reply_blocks, (RemoteError,), reply_block_samples),
        Target("exit_message", run_exit_message, (DecodeError,), exit_message_samples),
        Target("ack", run_ack, (DecodeError,), ack_samples),
        Target("delivered", run_delivered, (DecodeError,), delivered_samples),
        Target("delivered_answer", run_delivered_answer, (DecodeError,), answer_samples),
        Target("inflight_mark", run_inflight_mark, (DecodeError,), mark_samples),
        Target("framing", run_framing, (DecodeError,), framing_samples),
        Target("onion_small", run_onion(SMALL), (RemoteError,), lambda: _packets(SMALL, 1)),
        Target("onion_large", run_onion(LARGE), (RemoteError,), lambda: _packets(LARGE, 2)),
        Target("surb", run_surb, (PacketRejected,), lambda: [s for s, _ in _surbs().values()]),
        Target("open_reply", run_open_reply, (RemoteError,), open_reply_samples),
        Target("seed_bundle", run_bundle, (RemoteError,), bundle_samples),
        Target("dns_txt", run_dnstxt, (RemoteError,), dnstxt_samples),
        Target("entries", run_entries, (NotJson,), entries_samples),
    ]
}


def check_samples() -> None:
    """Every sample is accepted by its own target (else the fuzzing starts nowhere)."""
    for t in TARGETS.values():
        for s in t.samples():
            t.run(s)
