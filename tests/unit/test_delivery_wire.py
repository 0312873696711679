"""overlay.wire.delivery: exit message and ack codecs, DEST parsing."""

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.errors import DecodeError, Reason
from overlay.wire import delivery as d
from overlay.wire.delivery import (
    Ack,
    AckStatus,
    ExitMessage,
    InvalidDestination,
    decode,
    decode_ack,
    parse_destination,
)

MID = bytes(range(16))


def test_round_trip_and_canonical_bytes():
    msg = ExitMessage.make(MID, "smtp:alice@example.org", b"hello\r\n", b"\x01" * 400)
    raw = msg.encode()
    assert decode(raw) == msg
    assert raw == cbor2.dumps(
        {0: 1, 1: MID, 2: "smtp:alice@example.org", 3: b"hello\r\n", 4: b"\x01" * 400},
        canonical=True,
    )
    assert d.encode(msg) == raw
    bare = ExitMessage.make(MID, "maildir:inbox", b"")
    assert bare.reply_block is None and 4 not in cbor2.loads(bare.encode())


@pytest.mark.parametrize(
    "value,reason",
    [
        ({0: 2, 1: MID, 2: "smtp:a@b.org", 3: b""}, Reason.UNKNOWN_VERSION),
        ({0: 1, 1: MID[:15], 2: "smtp:a@b.org", 3: b""}, Reason.MALFORMED),
        ({0: 1, 1: MID, 2: "ftp://x", 3: b""}, Reason.MALFORMED),
        ({0: 1, 1: MID, 2: "smtp:a@b.org"}, Reason.MALFORMED),
        ({0: 1, 1: MID, 2: "smtp:a@b.org", 3: b"", 9: 0}, Reason.MALFORMED),
        ({0: 1, 1: MID, 2: "smtp:a@b.org", 3: b"", 4: b""}, Reason.MALFORMED),
        ({0: 1, 1: MID, 2: "smtp:a@b.org", 3: b"", 4: b"x" * 1025}, Reason.MALFORMED),
        ({0: 1, 1: MID, 2: "smtp:a@b.org", 3: b"x" * (d.MAX_BODY + 1)}, Reason.MALFORMED),
        ([1, 2], Reason.MALFORMED),
    ],
)
def test_rejections_are_typed(value, reason):
    with pytest.raises(DecodeError) as e:
        decode(cbor2.dumps(value, canonical=True))
    assert e.value.reason is reason


def test_size_cap_and_non_canonical():
    with pytest.raises(DecodeError) as e:
        decode(b"\xa0" + b"\x00" * d.MAX_SIZE)
    assert e.value.reason is Reason.OVERSIZED
    # same map, keys out of order: not canonical
    raw = cbor2.dumps({1: MID, 0: 1, 2: "smtp:a@b.org", 3: b""})
    with pytest.raises(DecodeError) as e:
        decode(raw)
    assert e.value.reason is Reason.NON_CANONICAL


def test_largest_message_fits_the_large_onion_class():
    from overlay.onion.params import LARGE

    dest = "maildir:" + "a/" * 251 + "bb"
    assert len(dest) == d.MAX_DEST_LEN
    earlier = tuple(bytes([i]) * d.NODE_ID_SIZE for i in range(d.MAX_EARLIER))
    msg = ExitMessage.make(MID, dest, b"x" * d.MAX_BODY, b"r" * d.MAX_REPLY_BLOCK, earlier)
    assert len(msg.encode()) <= min(d.MAX_SIZE, LARGE.max_message)


def test_earlier_exits_round_trip_and_bounds():
    a, b = b"a" * 32, b"b" * 32
    msg = ExitMessage.make(MID, "smtp:a@b.org", b"hi", None, (a, b, a))
    assert msg.earlier == (a, b)  # repeats dropped by make
    assert decode(msg.encode()) == msg
    assert ExitMessage.make(MID, "smtp:a@b.org", b"hi").earlier == ()
    base = {0: 1, 1: MID, 2: "smtp:a@b.org", 3: b""}
    for bad in ([], [a, a], [a, b, b"c" * 32, b"d" * 32], [b"short"], "x"):
        with pytest.raises(DecodeError) as e:
            decode(cbor2.dumps({**base, 5: bad}, canonical=True))
        assert e.value.reason is Reason.MALFORMED


def test_ack_round_trip_and_reason_cleaning():
    for status in AckStatus:
        a = Ack.make(MID, status, "smtp_550: no such user" if status else "")
        assert decode_ack(a.encode()) == a
    a = Ack.make(MID, AckStatus.REJECTED, "bad\nthing é" + "x" * 500)
    assert a.reason.startswith("bad?thing ?") and len(a.reason) == d.MAX_REASON_LEN
    assert len(a.encode()) <= d.ACK_MAX_SIZE
    assert decode_ack(a.encode()) == a
    with pytest.raises(DecodeError):
        decode_ack(cbor2.dumps({0: 1, 1: MID, 2: 3}, canonical=True))
    with pytest.raises(DecodeError):
        decode_ack(cbor2.dumps({0: 1, 1: MID, 2: 0, 3: ""}, canonical=True))


@pytest.mark.parametrize(
    "dest,kind,target,host,port,subject",
    [
        ("smtp:alice@example.org", "smtp", "alice@example.org", "example.org", 25, None),
        ("smtp:bob@127.0.0.1:2525", "smtp", "bob@127.0.0.1", "127.0.0.1", 2525, None),
        ("smtp:c@Mail.Example.ORG", "smtp", "c@mail.example.org", "mail.example.org", 25, None),
        ("smtp:d@[::1]:26", "smtp", "d@[::1]", "::1", 26, None),
        ("maildir:inbox/alice", "maildir", "inbox/alice", None, None, "inbox/alice"),
        ("maildir:/srv/mail/x", "maildir", "/srv/mail/x", None, None, "/srv/mail/x"),
        ("https://Hook.example.org/p?q=1", "https", None, "hook.example.org", 443, None),
        ("http://127.0.0.1:8080/", "http", None, "127.0.0.1", 8080, None),
        ("http://[::1]/x", "http", None, "::1", 80, None),
    ],
)
def test_parse_destination(dest, kind, target, host, port, subject):
    x = parse_destination(dest)
    assert x.kind == kind and x.host == host and x.port == port
    if kind == "smtp":
        assert x.target == target and x.policy_subject == target
    elif kind == "maildir":
        assert x.path == subject and x.policy_subject == subject
    else:
        assert x.url == dest and x.policy_subject == host


@pytest.mark.parametrize(
    "dest",
    [
        "",
        "mailto:a@b.org",
        "smtp:a@b.org:0",
        "smtp:a@b.org:65536",
        "smtp:@b.org",
        "smtp:a b@c.org",
        "smtp:a..b@c.org",
        "smtp:a@::1",
        "smtp:a@b.org.",
        "smtp:a@127.1",
        "smtp:a@[nope]",
        "maildir:",
        "maildir:../x",
        "maildir:a/../b",
        "maildir:a//b",
        "maildir:a/",
        "maildir:a\x00b",
        "http://",
        "http://user:pw@host/",
        "http://host:99999/",
        "http://host:/",
        "http://ex ample.org/",
        "HTTP://example.org/",
        "https://exämple.org/",
        "x" * 600,
    ],
)
def test_parse_destination_rejects(dest):
    with pytest.raises(InvalidDestination) as e:
        parse_destination(dest)
    assert isinstance(e.value, DecodeError) and e.value.reason is Reason.MALFORMED


# ---- properties -------------------------------------------------------------------

_dests = st.one_of(
    st.builds(
        lambda u, h, p: f"smtp:{u}@{h}" + (f":{p}" if p else ""),
        st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,10}[a-z0-9]", fullmatch=True).filter(
            lambda s: ".." not in s
        ),
        st.from_regex(r"[a-z]{1,8}(\.[a-z]{2,5}){0,2}", fullmatch=True),
        st.one_of(st.none(), st.integers(1, 65535)),
    ),
    st.from_regex(r"maildir:[a-z0-9_]{1,8}(/[a-z0-9_]{1,8}){0,3}", fullmatch=True),
    st.from_regex(r"https?://[a-z]{1,10}\.org(:[1-9][0-9]{0,3})?/[a-z0-9/]{0,20}", fullmatch=True),
)

_messages = st.builds(
    lambda mid, dest, body, reply: ExitMessage.make(mid, dest, body, reply),
    st.binary(min_size=16, max_size=16),
    _dests,
    st.binary(max_size=2048),
    st.one_of(st.none(), st.binary(min_size=1, max_size=d.MAX_REPLY_BLOCK)),
)


@settings(max_examples=200, deadline=None)
@given(_messages)
def test_prop_round_trip(msg):
    raw = msg.encode()
    assert decode(raw) == msg and decode(raw).encode() == raw
    assert str(msg.dest) == msg.destination or msg.dest.kind == "smtp"
    assert parse_destination(str(msg.dest)) == msg.dest


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_prop_arbitrary_bytes_only_decode_error(data):
    for fn in (decode, decode_ack):
        try:
            fn(data)
        except DecodeError:
            pass


@settings(max_examples=300, deadline=None)
@given(_messages, st.data())
def test_prop_mutated_message_decodes_or_decode_error(msg, data):
    raw = bytearray(msg.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        decode(bytes(raw))
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_prop_parse_destination_total(text):
    for candidate in (text, "smtp:" + text, "maildir:" + text, "http://" + text):
        try:
            x = parse_destination(candidate)
        except InvalidDestination:
            continue
        assert x.kind in ("smtp", "maildir", "http", "https")
        assert parse_destination(str(x)) == x
