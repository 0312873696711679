"""Crafted seed sources: only typed rejections, and a bad source never sinks a good one.

Real files, a real HTTP server (raw trio TCP, serving whatever bytes it is
given), a real DNS server (dnslib), the `overlay-seeds fetch` command and the
seed step of `overlay run` / `overlay send`.
"""

from __future__ import annotations

import sys
from functools import partial

import cbor2
import pytest
import trio
from typer.testing import CliRunner

from bootstrap import dnstxt
from bootstrap.bundle import MAX_SIZE, decode
from bootstrap.cli import app
from bootstrap.fetch import fetch_bundle
from overlay.errors import DecodeError, LocalError, Reason

from .helpers import PINNED, wall_bundle


def _map(seq: int = 7) -> dict:
    return cbor2.loads(wall_bundle(seq).encode())


def crafted(change) -> bytes:
    m = _map()
    change(m)
    return cbor2.dumps(m, canonical=True)


def _set(path, value):
    def change(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return change


LONG_PEER_ID = "/ip4/1.2.3.4/tcp/1/p2p/" + "z" * 30_000

CRAFTED = {
    "list-valued address": (_set((4, 0, 1), [["/ip4/1.2.3.4/tcp/1"]]), Reason.MALFORMED),
    "map-valued address": (_set((4, 0, 1), [{0: "/ip4/1.2.3.4/tcp/1"}]), Reason.MALFORMED),
    "bytes address": (_set((4, 0, 1), [b"/ip4/1.2.3.4/tcp/1"]), Reason.MALFORMED),
    "int address": (_set((4, 0, 1), [4001]), Reason.MALFORMED),
    "addrs not an array": (_set((4, 0, 1), "/ip4/1.2.3.4/tcp/1"), Reason.MALFORMED),
    "huge /p2p/ id": (_set((4, 0, 1), [LONG_PEER_ID]), Reason.MALFORMED),
    "peer not a map": (_set((4, 0), [b"k" * 32, ["/ip4/1.2.3.4/tcp/1"]]), Reason.MALFORMED),
    "peer key 31 bytes": (_set((4, 0, 0), b"k" * 31), Reason.MALFORMED),
    "peers a map": (_set((4,), {0: 1}), Reason.MALFORMED),
    "operator a string": (_set((5, 0), "op"), Reason.MALFORMED),
    "signer key an int": (lambda m: m[7].update({5: b"s" * 64}), Reason.MALFORMED),
    "signature an array": (lambda m: m[7].update({b"k" * 32: [1]}), Reason.MALFORMED),
    "seq a byte string": (_set((1,), b"\x01"), Reason.MALFORMED),
    "seq negative": (_set((1,), -1), Reason.MALFORMED),
    "seq a bignum": (_set((1,), 2**64), Reason.UNSUPPORTED_TYPE),
    "version an array": (_set((0,), [1]), Reason.UNKNOWN_VERSION),
    "threshold a float": (_set((6,), 2.0), Reason.UNSUPPORTED_TYPE),
    "expiry null": (_set((3,), None), Reason.UNSUPPORTED_TYPE),
    "MIME tag": (_set((4, 0, 1), [cbor2.CBORTag(36, "x")]), Reason.UNSUPPORTED_TYPE),
    "deep nesting": (_set((2,), [[[[[[[[[1]]]]]]]]]), Reason.TOO_DEEP),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_bundle_gives_a_typed_rejection(name):
    change, reason = CRAFTED[name]
    raw = crafted(change)
    assert len(raw) <= MAX_SIZE
    with pytest.raises(DecodeError) as ei:
        decode(raw)
    assert ei.value.reason is reason


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xa0", b"\x80", b"\xff", b"\x9f\xff", b"\xa8" + b"\x00" * 16, b"\x00" * 40_000],
)
def test_garbage_gives_a_typed_rejection(raw):
    with pytest.raises(DecodeError):
        decode(raw)


@pytest.mark.parametrize(
    "strings",
    [
        [],
        [b"\xff\xfe"],
        ["hs1 zzzzzzzz 0/1 AAAA"],
        ["hs1 00000000 0/1 !!!!"],
        ["hs1 00000000 5/2 AAAA", "hs1 00000000 0/99999 AAAA"],
        [1, None, ["hs1"], b"hs1"],
        ["x" * 100_000],
    ],
)
def test_garbage_dns_txt_gives_a_typed_rejection(strings):
    with pytest.raises(DecodeError):
        dnstxt.decode_txt(strings)


def assert_one_line(text: str) -> None:
    assert "\n" not in text
    for leak in ("Reason.", "SourceError.", "SourceReport(", "<", "Traceback"):
        assert leak not in text, text


async def test_crafted_file_next_to_a_good_file(tmp_path):
    good = wall_bundle(30)
    (tmp_path / "good.cbor").write_bytes(good.encode())
    bad = tmp_path / "crafted.cbor"
    bad.write_bytes(crafted(_set((4, 0, 1), [["/ip4/1.2.3.4/tcp/1"]])))
    result = await fetch_bundle([str(bad), str(tmp_path / "good.cbor")], PINNED, 2, None)
    assert result.bundle is not None and result.bundle.raw == good.encode()
    skipped, chosen = result.outcomes
    assert skipped.reason is Reason.MALFORMED and not skipped.ok
    assert chosen.chosen
    line = str(skipped)
    assert_one_line(line)
    assert line.startswith(f"{bad}: skipped: malformed: ")
    assert str(chosen) == f"{tmp_path / 'good.cbor'}: chosen (seq 30)"


async def raw_http_server(nursery, body: bytes) -> str:
    """An HTTP server on 127.0.0.1 answering every request with ``body`` (status 200)."""

    async def handler(stream):
        await stream.receive_some(4096)
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        await stream.send_all(head + body)
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/seeds.cbor"


async def test_crafted_http_and_dns_sources_next_to_a_good_one(tmp_path):
    from .test_dns_source import dns_server

    good = wall_bundle(31)
    markup = crafted(_set((4, 0, 1), ["/[/x]"]))  # rich markup in the rejection detail
    zone = "".join(
        f'_hydra-seeds.seeds.hydra.test. 300 IN TXT "{s}"\n'
        for s in dnstxt.encode_txt(crafted(_set((1,), 2**64)))
    )
    with dns_server(zone) as dns_port:
        async with trio.open_nursery() as nursery:
            urls = [
                await raw_http_server(nursery, crafted(CRAFTED["list-valued address"][0])),
                await raw_http_server(nursery, markup),
                await raw_http_server(nursery, b"\xd8\x24\x61x" * 1000),  # MIME tags
                await raw_http_server(nursery, good.encode()),
            ]
            sources = [*urls, f"dns:seeds.hydra.test@127.0.0.1:{dns_port}"]
            with trio.fail_after(30):
                result = await fetch_bundle(sources, PINNED, 2, None, timeout=5)
            nursery.cancel_scope.cancel()
    assert result.bundle is not None and result.bundle.raw == good.encode()
    assert [o.reason for o in result.outcomes] == [
        Reason.MALFORMED,
        Reason.MALFORMED,
        Reason.UNSUPPORTED_TYPE,
        None,
        Reason.UNSUPPORTED_TYPE,
    ]
    for o in result.outcomes:
        assert_one_line(str(o))


async def test_overlay_seeds_fetch_reports_and_skips(tmp_path):
    """`overlay-seeds fetch GOOD CRAFTED...`: exit 0, each bad source one row, no crash on
    rich markup in a rejection detail."""
    good = tmp_path / "good.cbor"
    good.write_bytes(wall_bundle(32).encode())
    bad = tmp_path / "bad.cbor"
    bad.write_bytes(crafted(CRAFTED["list-valued address"][0]))
    markup = tmp_path / "markup.cbor"
    markup.write_bytes(crafted(_set((4, 0, 1), ["/[/x]"])))
    ops = []
    for k in PINNED:
        ops += ["-O", k.hex()]
    args = ["fetch", str(bad), str(markup), str(good), *ops, "-k", "2", "--timeout", "5"]
    r = await trio.to_thread.run_sync(lambda: CliRunner().invoke(app, args))
    assert r.exit_code == 0, r.output
    assert r.exception is None
    assert "malformed" in r.output and "chosen" in r.output
    assert "[/x]" in r.output  # printed as text, not parsed as markup


def _seed_home(tmp_path):
    from overlay.testing import make_home

    return make_home(tmp_path / "home", seed_operators=[k.hex() for k in PINNED], seed_threshold=2)


async def test_overlay_run_seed_step_skips_a_crafted_source(tmp_path, capsys):
    """The seed step of `overlay run --seeds GOOD --seeds CRAFTED` (overlay/cli/node.py)."""
    from overlay.cli.send import seed_join_addrs

    home = _seed_home(tmp_path)
    good = wall_bundle(33)
    (tmp_path / "good.cbor").write_bytes(good.encode())
    (tmp_path / "crafted.cbor").write_bytes(crafted(_set((4, 0, 1), ["/[/x]", ["nested"]])))
    sources = [str(tmp_path / "crafted.cbor"), str(tmp_path / "good.cbor")]
    addrs = await seed_join_addrs(
        home,
        home.config(),
        sources,
        [],
        None,
        report=lambda ln: print(f"  seeds {ln}", file=sys.stderr),
    )
    assert addrs == good.join_addrs()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "seeds" in ln]
    assert len(lines) == 2
    assert "crafted.cbor: skipped: malformed" in lines[0]
    assert "good.cbor: chosen (seq 33)" in lines[1]
    for ln in lines:
        assert_one_line(ln)


async def test_overlay_send_seed_step_skips_a_crafted_source(tmp_path, capsys):
    """The entry step of `overlay send --seeds CRAFTED --seeds GOOD` (overlay/cli/send.py)."""
    from overlay.cli.send import _entry_addrs

    home = _seed_home(tmp_path)
    good = wall_bundle(34)
    (tmp_path / "good.cbor").write_bytes(good.encode())
    (tmp_path / "crafted.cbor").write_bytes(crafted(_set((3,), 1.5)))
    sources = [str(tmp_path / "crafted.cbor"), str(tmp_path / "good.cbor")]
    addrs = await _entry_addrs(home, [], sources, [], None)
    assert addrs == good.join_addrs()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crafted.cbor: skipped: unsupported_type" in err[0]
    assert_one_line(err[0])


@pytest.mark.slow
async def test_overlay_run_joins_with_a_good_and_a_crafted_source(tmp_path):
    """`overlay run --seeds CRAFTED --seeds GOOD` as a real process next to a real node."""
    import json
    import sys

    import httpx

    from overlay.control import auth_headers
    from overlay.testing import fleet
    from tests.integration.test_seed_join import bundle_for

    async with fleet(tmp_path) as f:
        node = await f.add("n0")
        good = tmp_path / "good.cbor"
        good.write_bytes(bundle_for([node], 40).encode())
        bad = tmp_path / "crafted.cbor"
        bad.write_bytes(crafted(CRAFTED["list-valued address"][0]))
        home = _seed_home(tmp_path)
        log = tmp_path / "run.log"
        args = [sys.executable, "-m", "overlay", "run", "--home", str(home.path)]
        args += ["--seeds", str(bad), "--seeds", str(good)]
        with open(log, "wb") as out:
            proc = await trio.lowlevel.open_process(args, stdout=out, stderr=out)
            try:
                with trio.fail_after(90):
                    while True:
                        assert proc.poll() is None, log.read_text()
                        try:
                            url = json.loads(home.control_path.read_text())["url"]
                            async with httpx.AsyncClient() as c:
                                r = await c.get(
                                    url + "/status", headers=auth_headers(home.path), timeout=2
                                )
                                st = r.json()
                            if st["joined_via"]:
                                break
                        except (OSError, ValueError, KeyError, LocalError, httpx.HTTPError):
                            pass
                        await trio.sleep(0.2)
            finally:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.poll() is None:
                    proc.kill()
    text = log.read_text()
    seeds = [ln for ln in text.splitlines() if ln.startswith("  seeds ")]
    assert len(seeds) == 2, text
    assert "crafted.cbor: skipped: malformed: addrs: multiaddrs must be text strings" in seeds[0]
    assert "good.cbor: chosen (seq 40)" in seeds[1]
    assert "Traceback" not in text
