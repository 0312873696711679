"""The hs1 DNS TXT format and the zone export."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap import dnstxt
from bootstrap.publish import export_dns
from overlay.errors import DecodeError, LocalError, Reason

from .helpers import make_bundle


def test_round_trip_any_order_and_string_limits():
    raw = make_bundle(peers=12).encode()
    strings = dnstxt.encode_txt(raw)
    assert len(strings) > 3
    assert all(len(s.encode()) <= 255 for s in strings)
    for seed in range(5):
        random.Random(seed).shuffle(strings)
        assert dnstxt.decode_txt(strings) == [raw]
    assert dnstxt.decode_txt([s.encode() for s in strings] + [b"v=spf1 -all", b"\xff"]) == [raw]


def test_two_bundles_side_by_side_and_incomplete_sets():
    a, b = make_bundle(10).encode(), make_bundle(11).encode()
    sa, sb = dnstxt.encode_txt(a), dnstxt.encode_txt(b)
    assert sorted(dnstxt.decode_txt(sa + sb)) == sorted([a, b])
    assert dnstxt.decode_txt(sa + sb[1:]) == [a]  # b incomplete: ignored
    with pytest.raises(DecodeError) as e:
        dnstxt.decode_txt(sa[1:])
    assert e.value.reason is Reason.MALFORMED
    # a chunk swapped for a different one with the same index poisons the set
    forged = sa[0].rsplit(" ", 1)[0] + " " + "A" * len(sa[0].rsplit(" ", 1)[1])
    with pytest.raises(DecodeError):
        dnstxt.decode_txt(sa + [forged])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300), st.text(max_size=300)), max_size=20))
def test_decode_txt_only_decode_error(strings):
    try:
        dnstxt.decode_txt(strings)
    except DecodeError:
        pass


def test_zone_lines():
    b = make_bundle()
    raw = b.encode()
    zone = export_dns(raw, "Seeds.Example.org.", ttl=120)
    lines = [ln for ln in zone.splitlines() if ln and not ln.startswith(";")]
    dnsaddr = [ln for ln in lines if ln.startswith("_dnsaddr.seeds.example.org. 120 IN TXT ")]
    seeds = [ln for ln in lines if ln.startswith("_hydra-seeds.seeds.example.org. 120 IN TXT ")]
    assert len(dnsaddr) == len(b.join_addrs()) and len(dnsaddr) + len(seeds) == len(lines)
    assert {ln.split('"')[1] for ln in dnsaddr} == {"dnsaddr=" + a for a in b.join_addrs()}
    assert dnstxt.decode_txt([ln.split('"')[1] for ln in seeds]) == [raw]
    with pytest.raises(LocalError):
        export_dns(raw, "bad domain!")
    with pytest.raises(LocalError):
        export_dns(b"junk", "example.org")
