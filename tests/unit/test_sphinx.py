"""Unit tests for the Sphinx packet format (overlay.onion).

Regenerate the checked-in vectors (only when the format changes on purpose):
    .venv/bin/python tests/unit/test_sphinx.py --regen
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import cache
from pathlib import Path

import pytest

from overlay import onion as sphinx
from overlay.crypto import NodeId, OnionKey, SigningKey, x25519_base
from overlay.errors import DecodeError, LocalError, Reason, RemoteError, Replay
from overlay.onion import (
    CLASSES,
    LARGE,
    SMALL,
    Deliver,
    Forward,
    Hop,
    MessageTooLong,
    PacketParams,
    PacketRejected,
    ReplayCache,
    ReplayCacheFull,
    SurbSecret,
    build_packet,
    make_surb,
    open_reply,
    params_for_message,
    params_for_packet,
    peek_epoch,
    process,
    use_surb,
)
from overlay.onion.header import build_header
from overlay.onion.params import ALL_LABELS, HOP_BLOCK_SIZE
from overlay.onion.payload import lioness_decrypt, lioness_encrypt, lioness_key

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


# ---- helpers ---------------------------------------------------------------------


class TapeRng:
    """Deterministic rng: hands out a fixed byte tape in order."""

    def __init__(self, tape: bytes) -> None:
        self.tape = tape
        self.pos = 0

    def __call__(self, n: int) -> bytes:
        if self.pos + n > len(self.tape):
            raise AssertionError("rng tape exhausted")
        out = self.tape[self.pos : self.pos + n]
        self.pos += n
        return out

    def used(self) -> bytes:
        return self.tape[: self.pos]


def shake(label: str, n: int = 4096) -> bytes:
    return hashlib.shake_256(label.encode()).digest(n)


class Node:
    def __init__(self, i: int, epoch: int = 100) -> None:
        self.sign = SigningKey(shake(f"node-{i}", 32))
        self.id = self.sign.node_id
        self.onion = OnionKey(shake(f"onion-{i}", 32), epoch)

    @property
    def hop(self) -> Hop:
        return Hop(self.id, self.onion.public, self.onion.epoch)

    @property
    def keys(self) -> dict[int, OnionKey]:
        return {self.onion.epoch: self.onion}


@cache
def nodes(n: int, epoch0: int = 100) -> tuple[Node, ...]:
    return tuple(Node(i, epoch0 + i) for i in range(n))


def run_path(params, path_nodes, packet, *, replay=None):
    """Process ``packet`` along ``path_nodes``; return (final Deliver, list of packets seen)."""
    seen = [packet]
    for i, nd in enumerate(path_nodes):
        res = process(params, nd.keys, packet, replay=replay)
        if i < len(path_nodes) - 1:
            assert isinstance(res, Forward)
            assert res.next_node == path_nodes[i + 1].id
            assert res.next_epoch == path_nodes[i + 1].onion.epoch
            assert res.epoch == nd.onion.epoch
            packet = res.packet
            seen.append(packet)
        else:
            assert isinstance(res, Deliver)
            assert res.epoch == nd.onion.epoch
            return res, seen
    raise AssertionError("unreachable")


# ---- parameters ------------------------------------------------------------------


def test_sizes_and_labels():
    assert SMALL.packet_size == 2048 and LARGE.packet_size == 32768
    for p in CLASSES:
        assert p.max_hops == 5
        assert p.header_size == 1 + 4 + 32 + 5 * HOP_BLOCK_SIZE + 16 == 338
        assert p.payload_size == p.packet_size - 338
        assert p.max_message == p.payload_size - 20
        assert p.surb_size == 1 + 32 + 32 + 338
    assert (SMALL.max_message, LARGE.max_message) == (1690, 32410)
    assert len({p.format for p in CLASSES}) == len(CLASSES)
    assert len(set(ALL_LABELS)) == len(ALL_LABELS)
    assert all(len(label) <= 16 for label in ALL_LABELS)
    with pytest.raises(LocalError):
        PacketParams("tiny", 0x20, 300)


def test_params_lookup():
    assert params_for_message(0) is SMALL
    assert params_for_message(SMALL.max_message) is SMALL
    assert params_for_message(SMALL.max_message + 1) is LARGE
    with pytest.raises(MessageTooLong):
        params_for_message(LARGE.max_message + 1)
    pkt, _ = build_packet(LARGE, [nodes(1)[0].hop], b"x")
    assert params_for_packet(pkt) is LARGE
    with pytest.raises(PacketRejected) as e:
        params_for_packet(b"\x12" + pkt[1:2048])
    assert e.value.reason is Reason.MALFORMED
    with pytest.raises(PacketRejected) as e:
        params_for_packet(bytes(40000))
    assert e.value.reason is Reason.OVERSIZED
    with pytest.raises(PacketRejected):
        params_for_packet(b"")


def test_sphinx_module_reexports_onion():
    import overlay.onion as onion

    for name in onion.__all__:
        assert getattr(sphinx, name) is getattr(onion, name)


# ---- forward delivery ---------------------------------------------------------------


@pytest.mark.parametrize("params", CLASSES, ids=lambda p: p.name)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_delivery_every_path_length(params, n):
    path = nodes(n)
    msg = os.urandom(min(777 * n, params.max_message))
    packet, first = build_packet(params, [nd.hop for nd in path], msg)
    assert first == path[0].id
    assert len(packet) == params.packet_size
    assert peek_epoch(packet) == path[0].onion.epoch
    res, seen = run_path(params, path, packet)
    assert res.payload == msg and res.surb_id is None and not res.is_reply
    assert {len(p) for p in seen} == {params.packet_size}
    assert len({p[5:37] for p in seen}) == n  # alpha re-blinded at every hop


@pytest.mark.parametrize("params", CLASSES, ids=lambda p: p.name)
def test_empty_and_maximal_messages(params):
    path = nodes(3)
    for msg in (b"", os.urandom(params.max_message)):
        packet, _ = build_packet(params, [nd.hop for nd in path], msg)
        assert run_path(params, path, packet)[0].payload == msg


def test_delays_and_replay_tags():
    path = nodes(4)
    packet, _ = build_packet(SMALL, [nd.hop for nd in path], b"hi", delays_ms=[5, 0, 70000])
    delays, tags = [], []
    for nd in path:
        res = process(SMALL, nd.keys, packet)
        tags.append(res.replay_tag)
        if isinstance(res, Forward):
            delays.append(res.delay_ms)
            packet = res.packet
    assert delays == [5, 0, 70000]
    assert len(set(tags)) == 4 and all(len(t) == 16 for t in tags)
    assert res.delay_ms == 0  # the exit delivers at once
    with pytest.raises(LocalError):
        build_packet(SMALL, [nd.hop for nd in path], b"hi", delays_ms=[1, 2])
    with pytest.raises(LocalError):
        build_packet(SMALL, [nd.hop for nd in path], b"hi", delays_ms=[1, 2, -1])
    with pytest.raises(LocalError):
        build_packet(SMALL, [nd.hop for nd in path], b"hi", delays_ms=[1, 2, 3, 4, 5])


def test_final_hop_hold_for_messages_and_replies():
    path = nodes(3)
    packet, _ = build_packet(SMALL, [nd.hop for nd in path], b"hi", delays_ms=[5, 6, 7])
    res = run_path(SMALL, path, packet)[0]
    assert isinstance(res, Deliver) and res.payload == b"hi" and res.delay_ms == 7
    assert not res.is_reply
    surb, secret = make_surb(SMALL, [nd.hop for nd in path], delays_ms=[1, 2, 3])
    _, packet = use_surb(SMALL, surb, b"ack")
    seen = []
    for nd in path:
        res = process(SMALL, nd.keys, packet)
        seen.append(res.delay_ms)
        if isinstance(res, Forward):
            packet = res.packet
    assert seen == [1, 2, 3] and res.surb_id == secret.surb_id
    assert open_reply(SMALL, secret, res.payload) == b"ack"
    # a held final hop is the only change: the same rng gives the same packet otherwise
    a = build_packet(SMALL, [nd.hop for nd in path], b"x", TapeRng(shake("t")), delays_ms=[5, 6])
    b = build_packet(SMALL, [nd.hop for nd in path], b"x", TapeRng(shake("t")), delays_ms=[5, 6, 0])
    assert a.packet[:5] == b.packet[:5] and a.packet != b.packet


def test_same_message_gives_unlinkable_packets():
    path = nodes(2)
    a, _ = build_packet(SMALL, [nd.hop for nd in path], b"same")
    b, _ = build_packet(SMALL, [nd.hop for nd in path], b"same")
    assert a != b
    assert a[5:] != b[5:]


def test_accepts_bytearray_and_memoryview():
    path = nodes(2)
    packet, _ = build_packet(SMALL, [nd.hop for nd in path], bytearray(b"abc"))
    for form in (bytearray(packet), memoryview(packet)):
        res = process(SMALL, path[0].keys, form)
        assert isinstance(res, Forward)


# ---- rejections ---------------------------------------------------------------------


def _reject(params, keys, packet) -> Reason:
    with pytest.raises(PacketRejected) as e:
        process(params, keys, packet)
    assert isinstance(e.value, RemoteError)
    return e.value.reason


def test_wrong_key_is_bad_mac():
    path = nodes(2)
    packet, _ = build_packet(SMALL, [nd.hop for nd in path], b"m")
    impostor = OnionKey(shake("impostor", 32), path[0].onion.epoch)
    assert _reject(SMALL, {impostor.epoch: impostor}, packet) is Reason.BAD_MAC
    # the second hop's key cannot open the first hop's layer either
    other = OnionKey(path[1].onion.secret(), path[0].onion.epoch)
    assert _reject(SMALL, {other.epoch: other}, packet) is Reason.BAD_MAC


def test_unknown_epoch_and_key_lookup_forms():
    path = nodes(1)
    packet, _ = build_packet(SMALL, [path[0].hop], b"m")
    assert _reject(SMALL, {}, packet) is Reason.UNKNOWN_EPOCH
    assert _reject(SMALL, {path[0].onion.epoch + 1: path[0].onion}, packet) is Reason.UNKNOWN_EPOCH
    assert _reject(SMALL, lambda epoch: None, packet) is Reason.UNKNOWN_EPOCH

    def raising(epoch):
        raise KeyError(epoch)

    assert _reject(SMALL, raising, packet) is Reason.UNKNOWN_EPOCH
    res = process(SMALL, lambda e: path[0].onion if e == path[0].onion.epoch else None, packet)
    assert isinstance(res, Deliver) and res.payload == b"m"


def test_epoch_overlap_two_live_keys():
    node = Node(50)
    old, new = OnionKey(shake("old", 32), 9), OnionKey(shake("new", 32), 10)
    live = {9: old, 10: new}
    cache = ReplayCache()
    for key in (old, new):
        packet, _ = build_packet(SMALL, [(node.id, key.public, key.epoch)], b"overlap")
        res = process(SMALL, live, packet, replay=cache)
        assert res.payload == b"overlap" and res.epoch == key.epoch
    assert cache.epochs() == [9, 10]
    # the epoch field is authenticated: pointing it at the other live key fails the MAC
    packet, _ = build_packet(SMALL, [(node.id, old.public, 9)], b"x")
    assert _reject(SMALL, live, packet[:1] + (10).to_bytes(4, "big") + packet[5:]) is Reason.BAD_MAC


@pytest.mark.parametrize("params", CLASSES, ids=lambda p: p.name)
def test_truncated_oversized_and_garbage(params):
    keys = nodes(1)[0].keys
    packet, _ = build_packet(params, [nodes(1)[0].hop], b"m")
    for bad in (b"", b"\x11", packet[:-1], packet[: params.header_size]):
        assert _reject(params, keys, bad) is Reason.MALFORMED
    for bad in (packet + b"\0", packet * 3):
        assert _reject(params, keys, bad) is Reason.OVERSIZED
    assert _reject(params, keys, b"\0" + packet[1:]) is Reason.MALFORMED  # format byte
    other = LARGE if params is SMALL else SMALL
    assert _reject(other, keys, packet) in (Reason.MALFORMED, Reason.OVERSIZED)
    assert _reject(params, keys, "not bytes") is Reason.MALFORMED  # type: ignore[arg-type]
    assert _reject(params, keys, os.urandom(params.packet_size)) in (
        Reason.MALFORMED,
        Reason.UNKNOWN_EPOCH,
    )


def test_low_order_alpha_rejected():
    node = nodes(1)[0]
    packet, _ = build_packet(SMALL, [node.hop], b"m")
    for point in (bytes(32), (1).to_bytes(32, "little")):
        bad = packet[:5] + point + packet[37:]
        assert _reject(SMALL, node.keys, bad) is Reason.MALFORMED


def test_alpha_high_bit_and_noncanonical_encodings_rejected():
    # X25519 ignores bit 255 of a point, so the MAC must cover alpha itself
    node = nodes(1)[0]
    packet, _ = build_packet(SMALL, [node.hop], b"m")
    flipped = bytearray(packet)
    flipped[36] ^= 0x80
    assert _reject(SMALL, node.keys, bytes(flipped)) is Reason.BAD_MAC


def test_tampered_payload_detected_at_exit_and_header_at_each_hop():
    path = nodes(3)
    packet, _ = build_packet(SMALL, [nd.hop for nd in path], b"secret")
    bad = bytearray(packet)
    bad[-1] ^= 1
    res = process(SMALL, path[0].keys, bytes(bad))
    res = process(SMALL, path[1].keys, res.packet)
    assert _reject(SMALL, path[2].keys, res.packet) is Reason.BAD_MAC
    bad = bytearray(packet)
    bad[100] ^= 4  # inside beta
    assert _reject(SMALL, path[0].keys, bytes(bad)) is Reason.BAD_MAC


def test_unknown_routing_flag_is_malformed():
    node = nodes(1)[0]
    header, keys = build_header(SMALL, [node.hop], b"\x7f", TapeRng(shake("flag")))
    body = os.urandom(SMALL.payload_size)
    assert _reject(SMALL, node.keys, header + body) is Reason.MALFORMED


def test_bad_paths_and_messages_are_local_errors():
    path = [nd.hop for nd in nodes(5)]
    with pytest.raises(LocalError):
        build_packet(SMALL, [], b"m")
    with pytest.raises(LocalError):
        build_packet(SMALL, path + [path[0]], b"m")
    with pytest.raises(LocalError):
        build_packet(SMALL, [(path[0].node, path[0].key, -1)], b"m")
    with pytest.raises(LocalError):
        build_packet(SMALL, [(path[0].node, path[0].key, 2**32)], b"m")
    with pytest.raises(LocalError):
        build_packet(SMALL, [(b"x" * 32, path[0].key, 1)], b"m")
    with pytest.raises(LocalError):
        build_packet(SMALL, [(path[0].node, sphinx.Hop, 1)], b"m")
    with pytest.raises(LocalError):
        build_packet(SMALL, [(path[0].node, path[0].key)], b"m")
    from overlay.crypto import OnionPublicKey

    with pytest.raises(LocalError):  # low-order onion key in a record
        build_packet(SMALL, [(path[0].node, OnionPublicKey(bytes(32)), 1)], b"m")
    with pytest.raises(MessageTooLong) as e:
        build_packet(SMALL, path, bytes(SMALL.max_message + 1))
    assert isinstance(e.value, LocalError)
    with pytest.raises(LocalError):
        build_packet(SMALL, path, "text")  # type: ignore[arg-type]
    build_packet(SMALL, path, bytes(SMALL.max_message))


# ---- replay cache ---------------------------------------------------------------------


def test_replay_cache_with_process():
    path = nodes(2)
    packet, _ = build_packet(SMALL, [nd.hop for nd in path], b"once")
    cache = ReplayCache()
    res = process(SMALL, path[0].keys, packet, replay=cache)
    with pytest.raises(Replay) as e:
        process(SMALL, path[0].keys, packet, replay=cache)
    assert e.value.reason is Reason.REPLAY
    # same header, different payload: still a replay (the tag comes from the header secret)
    tweaked = packet[:-1] + bytes([packet[-1] ^ 1])
    with pytest.raises(Replay):
        process(SMALL, path[0].keys, tweaked, replay=cache)
    # caller-side use of the returned tag
    other = ReplayCache()
    other.check_and_add(res.epoch, res.replay_tag)
    assert other.seen(res.epoch, res.replay_tag)
    with pytest.raises(Replay):
        other.check_and_add(res.epoch, res.replay_tag)
    # persistence round trip
    saved = cache.tags(res.epoch)
    restored = ReplayCache()
    restored.load(res.epoch, saved)
    with pytest.raises(Replay):
        process(SMALL, path[0].keys, packet, replay=restored)
    # dropping the epoch forgets it (the key is gone too in real use)
    restored.drop_epoch(res.epoch)
    assert restored.epochs() == [] and len(restored) == 0
    process(SMALL, path[0].keys, packet, replay=restored)


def test_replay_cache_bounds():
    cache = ReplayCache(max_per_epoch=3, max_epochs=2)
    for i in range(3):
        cache.check_and_add(1, bytes([i]) * 16)
    with pytest.raises(ReplayCacheFull):
        cache.check_and_add(1, b"\x09" * 16)
    with pytest.raises(Replay):  # a replay is still reported as such when full
        cache.check_and_add(1, b"\x00" * 16)
    cache.check_and_add(2, b"\x00" * 16)
    with pytest.raises(ReplayCacheFull):
        cache.check_and_add(3, b"\x00" * 16)
    cache.drop_epoch(1)
    cache.check_and_add(3, b"\x00" * 16)
    assert cache.epochs() == [2, 3] and len(cache) == 2 and cache.size(2) == 1
    assert "ReplayCache" in repr(cache)
    with pytest.raises(LocalError):
        cache.load(2, [b"short"])
    with pytest.raises(ReplayCacheFull):
        ReplayCache(max_per_epoch=1).load(1, [b"a" * 16, b"b" * 16])
    with pytest.raises(LocalError):
        ReplayCache(max_per_epoch=0)


# ---- SURBs ----------------------------------------------------------------------------


@pytest.mark.parametrize("params", CLASSES, ids=lambda p: p.name)
@pytest.mark.parametrize("n", [1, 3, 5])
def test_surb_round_trip(params, n):
    ret = nodes(n, epoch0=300)
    surb, secret = make_surb(params, [nd.hop for nd in ret])
    assert len(surb) == params.surb_size
    # the exit only has the SURB bytes
    reply = os.urandom(min(500, params.max_message))
    first, packet = use_surb(params, bytes(surb), reply)
    assert first == ret[0].id and len(packet) == params.packet_size
    res, seen = run_path(params, ret, packet)
    assert res.is_reply and res.surb_id == secret.surb_id
    assert len(res.payload) == params.payload_size
    assert {len(p) for p in seen} == {params.packet_size}
    assert open_reply(params, secret, res.payload) == reply
    # the secret survives serialisation (the outbox persists it)
    again = SurbSecret.from_bytes(secret.to_bytes())
    assert again == secret and open_reply(params, again, res.payload) == reply
    assert secret.reply_key.hex() not in repr(secret)


def test_surb_hides_return_path_and_is_single_use():
    ret = nodes(3, epoch0=300)
    surb, secret = make_surb(SMALL, [nd.hop for nd in ret])
    for nd in ret[1:]:
        assert bytes(nd.id) not in surb
    assert secret.surb_id not in surb
    cache = ReplayCache()
    _, p1 = use_surb(SMALL, surb, b"ack 1")
    _, p2 = use_surb(SMALL, surb, b"ack 2")
    process(SMALL, ret[0].keys, p1, replay=cache)
    with pytest.raises(Replay):
        process(SMALL, ret[0].keys, p2, replay=cache)


def test_surb_reply_tamper_and_wrong_secret_detected():
    ret = nodes(2, epoch0=300)
    surb, secret = make_surb(SMALL, [nd.hop for nd in ret])
    _, other_secret = make_surb(SMALL, [nd.hop for nd in ret])
    _, packet = use_surb(SMALL, surb, b"reply")
    mid = process(SMALL, ret[0].keys, packet)
    bad = mid.packet[:-5] + bytes([mid.packet[-5] ^ 0x10]) + mid.packet[-4:]
    res = process(SMALL, ret[1].keys, bad)  # the final hop cannot check a reply's body
    assert res.is_reply
    with pytest.raises(PacketRejected) as e:
        open_reply(SMALL, secret, res.payload)
    assert e.value.reason is Reason.BAD_MAC
    good = process(SMALL, ret[1].keys, mid.packet)
    with pytest.raises(PacketRejected):
        open_reply(SMALL, other_secret, good.payload)
    with pytest.raises(PacketRejected):
        open_reply(SMALL, secret, good.payload[:-1])
    with pytest.raises(LocalError):
        open_reply(LARGE, secret, good.payload)


def test_surb_malformed_inputs():
    ret = nodes(1, epoch0=300)
    surb, _ = make_surb(SMALL, [ret[0].hop])
    for bad in (b"", surb[:-1], surb + b"\0", b"\x12" + surb[1:], "str"):
        with pytest.raises(PacketRejected):
            use_surb(SMALL, bad, b"r")  # type: ignore[arg-type]
    with pytest.raises(PacketRejected):
        use_surb(LARGE, surb, b"r")
    with pytest.raises(MessageTooLong):
        use_surb(SMALL, surb, bytes(SMALL.max_message + 1))
    for bad in (b"", b"\x11\x00" + bytes(48), b"\x11\x01" + bytes(48)):
        with pytest.raises(DecodeError):
            SurbSecret.from_bytes(bad)


# ---- LIONESS ----------------------------------------------------------------------------


def test_lioness_is_a_permutation_that_garbles_everything():
    key = lioness_key(shake("k", 32))
    block = shake("block", 1710)
    ct = lioness_encrypt(key, block)
    assert lioness_decrypt(key, ct) == block
    flipped = bytes([ct[0] ^ 1]) + ct[1:]
    pt = lioness_decrypt(key, flipped)
    # a one-bit change in the ciphertext changes about half the bits everywhere
    diff = sum(bin(a ^ b).count("1") for a, b in zip(pt, block, strict=True))
    assert 0.4 < diff / (8 * len(block)) < 0.6
    assert pt[:16] != block[:16] and pt[-16:] != block[-16:]


# ---- test vectors -------------------------------------------------------------------------


def _hash(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=32).hexdigest()


def _packet_field(params, packet: bytes) -> dict:
    if params is SMALL:
        return {"packet_hex": packet.hex()}
    return {"header_hex": packet[: params.header_size].hex(), "packet_blake2b": _hash(packet)}


def _hops_record(params, path, packet) -> list[dict]:
    out = []
    for nd in path:
        res = process(params, nd.keys, packet)
        if isinstance(res, Forward):
            out.append(
                {
                    "kind": "forward",
                    "next_node": bytes(res.next_node).hex(),
                    "next_epoch": res.next_epoch,
                    "delay_ms": res.delay_ms,
                    "replay_tag": res.replay_tag.hex(),
                    **_packet_field(params, res.packet),
                }
            )
            packet = res.packet
        else:
            out.append(
                {
                    "kind": "reply" if res.is_reply else "deliver",
                    "replay_tag": res.replay_tag.hex(),
                    "surb_id": res.surb_id.hex() if res.surb_id else None,
                    "payload_hex": res.payload.hex(),
                    "delay_ms": res.delay_ms,
                }
            )
    return out


def _path_record(path) -> list[dict]:
    return [
        {
            "node": nd.id.hex(),
            "onion_secret": nd.onion.secret().hex(),
            "onion_public": bytes(nd.onion.public).hex(),
            "epoch": nd.onion.epoch,
        }
        for nd in path
    ]


class _VecNode:
    def __init__(self, rec: dict) -> None:
        self.id = NodeId(bytes.fromhex(rec["node"]))
        self.onion = OnionKey(bytes.fromhex(rec["onion_secret"]), rec["epoch"])
        assert bytes(self.onion.public).hex() == rec["onion_public"]
        self.keys = {self.onion.epoch: self.onion}
        self.hop = Hop(self.id, self.onion.public, self.onion.epoch)


FORWARD_CASES = [
    ("small-1hop", SMALL, 1, b"", None),
    ("small-3hop", SMALL, 3, b"Hello, Hydra!", [10, 250]),
    ("small-3hop-held", SMALL, 3, b"held at every hop", [10, 250, 4321]),
    ("small-5hop", SMALL, 5, bytes(range(256)) * 6, None),
    ("large-3hop", LARGE, 3, b"Subject: vectors\r\n\r\n" + b"x" * 3000, None),
]


def build_vectors() -> dict[str, dict]:
    files: dict[str, dict] = {"sphinx_small.json": {}, "sphinx_large.json": {}}
    for name, params, n, msg, delays in FORWARD_CASES:
        path = nodes(n, epoch0=1000)
        rng = TapeRng(shake(f"rng-{name}"))
        packet, first = build_packet(params, [nd.hop for nd in path], msg, rng, delays_ms=delays)
        case = {
            "params": params.name,
            "path": _path_record(path),
            "delays_ms": delays,
            "message_hex": msg.hex(),
            "rng_hex": rng.used().hex(),
            "first_hop": first.hex(),
            **_packet_field(params, packet),
            "hops": _hops_record(params, path, packet),
        }
        files[f"sphinx_{params.name}.json"][name] = case
    # a SURB round trip
    ret = nodes(3, epoch0=2000)
    rng = TapeRng(shake("rng-surb"))
    surb, secret = make_surb(SMALL, [nd.hop for nd in ret], rng)
    reply = b"ACK message 42"
    first, packet = use_surb(SMALL, surb, reply)
    hops = _hops_record(SMALL, ret, packet)
    files["sphinx_surb.json"] = {
        "small-3hop-surb": {
            "params": "small",
            "path": _path_record(ret),
            "rng_hex": rng.used().hex(),
            "surb_hex": surb.hex(),
            "secret_hex": secret.to_bytes().hex(),
            "reply_hex": reply.hex(),
            "first_hop": first.hex(),
            "packet_hex": packet.hex(),
            "hops": hops,
            "opened_hex": open_reply(SMALL, secret, bytes.fromhex(hops[-1]["payload_hex"])).hex(),
        }
    }
    for content in files.values():
        content["_comment"] = (
            "Hydra Sphinx v1 test vectors; see docs/sphinx.md. rng_hex is the exact byte "
            "stream the builder drew, in order. Regenerate: "
            ".venv/bin/python tests/unit/test_sphinx.py --regen"
        )
    return files


def _params_named(name: str):
    return {p.name: p for p in CLASSES}[name]


def _check_hops(params, path, packet, expected):
    for nd, exp in zip(path, expected, strict=True):
        res = process(params, nd.keys, packet)
        assert res.replay_tag.hex() == exp["replay_tag"]
        if exp["kind"] == "forward":
            assert isinstance(res, Forward)
            assert bytes(res.next_node).hex() == exp["next_node"]
            assert (res.next_epoch, res.delay_ms) == (exp["next_epoch"], exp["delay_ms"])
            assert _packet_field(params, res.packet) == {
                k: v for k, v in exp.items() if k in ("packet_hex", "header_hex", "packet_blake2b")
            }
            packet = res.packet
        else:
            assert isinstance(res, Deliver)
            assert res.payload.hex() == exp["payload_hex"]
            assert (res.surb_id.hex() if res.surb_id else None) == exp["surb_id"]
            assert res.delay_ms == exp["delay_ms"]


@pytest.mark.parametrize("fname", ["sphinx_small.json", "sphinx_large.json"])
def test_forward_vectors(fname):
    cases = json.loads((VECTORS / fname).read_text())
    assert len([k for k in cases if not k.startswith("_")]) >= 1
    for name, case in cases.items():
        if name.startswith("_"):
            continue
        params = _params_named(case["params"])
        path = [_VecNode(r) for r in case["path"]]
        rng = TapeRng(bytes.fromhex(case["rng_hex"]))
        msg = bytes.fromhex(case["message_hex"])
        packet, first = build_packet(
            params, [nd.hop for nd in path], msg, rng, delays_ms=case["delays_ms"]
        )
        assert rng.pos == len(rng.tape), name
        assert first.hex() == case["first_hop"]
        assert _packet_field(params, packet) == {
            k: v for k, v in case.items() if k in ("packet_hex", "header_hex", "packet_blake2b")
        }, name
        _check_hops(params, path, packet, case["hops"])
        assert bytes.fromhex(case["hops"][-1]["payload_hex"]) == msg


def test_surb_vectors():
    case = json.loads((VECTORS / "sphinx_surb.json").read_text())["small-3hop-surb"]
    path = [_VecNode(r) for r in case["path"]]
    rng = TapeRng(bytes.fromhex(case["rng_hex"]))
    surb, secret = make_surb(SMALL, [nd.hop for nd in path], rng)
    assert rng.pos == len(rng.tape)
    assert surb.hex() == case["surb_hex"]
    assert secret.to_bytes().hex() == case["secret_hex"]
    first, packet = use_surb(SMALL, surb, bytes.fromhex(case["reply_hex"]))
    assert first.hex() == case["first_hop"] and packet.hex() == case["packet_hex"]
    _check_hops(SMALL, path, packet, case["hops"])
    payload = bytes.fromhex(case["hops"][-1]["payload_hex"])
    opened = open_reply(SMALL, SurbSecret.from_bytes(bytes.fromhex(case["secret_hex"])), payload)
    assert opened.hex() == case["opened_hex"] == case["reply_hex"]


def test_x25519_blinding_commutes():
    # the identity the header construction relies on
    from overlay.crypto import x25519

    x, y, b = shake("x", 32), shake("y", 32), shake("b", 32)
    pub = x25519_base(y)
    assert x25519(b, x25519(x, pub)) == x25519(y, x25519(b, x25519_base(x)))


if __name__ == "__main__":
    if "--regen" in sys.argv:
        for fname, content in build_vectors().items():
            (VECTORS / fname).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
            print("wrote", VECTORS / fname)
