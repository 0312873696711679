"""Real HTTP seed servers on 127.0.0.1 (hypercorn on trio) and the fetcher."""

from __future__ import annotations

import os
import time
from functools import partial

import httpx
import trio

from bootstrap import publish
from bootstrap.bundle import decode, etag
from bootstrap.fetch import fetch_bundle
from bootstrap.files import write_atomic
from bootstrap.resolve import SourceError
from overlay.errors import Reason

from .helpers import ATTACKER, PINNED, closed_port, forged_copy, wall_bundle


async def start_server(nursery, path):
    binds = await nursery.start(publish.serve, path, "127.0.0.1:0")
    return binds[0]


async def test_three_operators_one_down_one_forged_one_rolled_back(tmp_path):
    good = wall_bundle(10)
    old = wall_bundle(8, signers=(0, 2))
    forged = forged_copy(good)
    foreign = wall_bundle(77, ops=ATTACKER)
    files = {}
    for name, b in [("good", good), ("old", old), ("forged", forged), ("foreign", foreign)]:
        files[name] = tmp_path / f"{name}.cbor"
        files[name].write_bytes(b.encode())
    cache = tmp_path / "cache" / "seeds.cbor"
    async with trio.open_nursery() as nursery:
        urls = {name: await start_server(nursery, path) for name, path in files.items()}
        sources = [
            f"http://127.0.0.1:{closed_port()}/seeds.cbor",
            urls["forged"] + "/seeds.cbor",
            urls["foreign"] + "/",
            urls["old"] + "/seeds.cbor",
            urls["good"] + "/seeds.cbor",
        ]
        # a generous timeout: every source answers (the reasons below say so), none
        # times out, on a busy machine too
        result = await fetch_bundle(sources, PINNED, 2, cache, timeout=30.0)
        assert result.bundle is not None and result.bundle.raw == good.encode()
        assert not result.from_cache and result.cache_written
        assert result.join_addrs() == good.join_addrs()
        reasons = [o.reason for o in result.outcomes]
        assert reasons == [
            SourceError.UNREACHABLE,
            Reason.BAD_SIGNATURE,
            Reason.UNKNOWN_OPERATOR,
            Reason.ROLLED_BACK,
            None,
        ]
        assert [o.chosen for o in result.outcomes] == [False] * 4 + [True]
        assert cache.read_bytes() == good.encode()

        # second run: the good server answers 304 to the cached ETag
        again = await fetch_bundle([urls["good"] + "/seeds.cbor"], PINNED, 2, cache)
        assert again.bundle.raw == good.encode() and not again.from_cache
        assert not again.cache_written
        nursery.cancel_scope.cancel()

    # every server is gone now: the cached bundle is used
    down = [f"http://127.0.0.1:{closed_port()}/", str(tmp_path / "missing.cbor")]
    result = await fetch_bundle(down, PINNED, 2, cache, timeout=2.0)
    assert result.from_cache and result.bundle.seq == 10
    assert [o.reason for o in result.outcomes] == [SourceError.UNREACHABLE, SourceError.NOT_FOUND]
    # and the cache does not help once it has expired
    late = await fetch_bundle(down, PINNED, 2, cache, timeout=2.0, now=time.time() + 10**7)
    assert late.bundle is None and late.expired_cache.seq == 10


async def test_etag_304_head_404_405_and_reload(tmp_path):
    path = tmp_path / "seeds.cbor"
    first = wall_bundle(1).encode()
    path.write_bytes(first)
    async with trio.open_nursery() as nursery:
        base = await start_server(nursery, path)
        async with httpx.AsyncClient(trust_env=False) as client:
            r = await client.get(base + "/seeds.cbor")
            assert r.status_code == 200 and r.content == first
            assert r.headers["etag"] == etag(first)
            assert r.headers["content-type"] == "application/cbor"
            assert r.headers["x-hydra-seed-seq"] == "1"
            assert r.headers["cache-control"] == "public, max-age=300"
            r = await client.get(base + "/", headers={"If-None-Match": etag(first)})
            assert r.status_code == 304 and r.content == b""
            assert r.headers["etag"] == etag(first)
            r = await client.get(base + "/", headers={"If-None-Match": '"other", W/' + etag(first)})
            assert r.status_code == 304
            r = await client.get(base + "/", headers={"If-None-Match": '"other"'})
            assert r.status_code == 200
            r = await client.head(base + "/seeds.cbor")
            assert r.status_code == 200 and r.content == b""
            assert r.headers["content-length"] == str(len(first))
            assert (await client.get(base + "/nope")).status_code == 404
            r = await client.post(base + "/seeds.cbor", content=b"x")
            assert r.status_code == 405 and "GET" in r.headers["allow"]

            # an operator replaces the file (new cosigned bundle): served at once
            second = wall_bundle(2).encode()
            write_atomic(path, second, mode=0o644)
            r = await client.get(base + "/seeds.cbor", headers={"If-None-Match": etag(first)})
            assert r.status_code == 200 and r.content == second
            assert r.headers["etag"] == etag(second) != etag(first)
            # a broken replacement is not served: the last good bundle stays up
            write_atomic(path, b"not a bundle", mode=0o644)
            r = await client.get(base + "/seeds.cbor")
            assert r.status_code == 200 and r.content == second
            # same size, same inode, new mtime: still noticed
            third = wall_bundle(3).encode()
            assert len(third) == len(second)
            with open(path, "r+b") as f:
                f.write(third)
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            r = await client.get(base + "/seeds.cbor")
            assert decode(r.content).seq == 3
        nursery.cancel_scope.cancel()


async def test_short_lived_bundle_gets_short_max_age(tmp_path):
    path = tmp_path / "seeds.cbor"
    path.write_bytes(wall_bundle(1, ttl=120).encode())
    async with trio.open_nursery() as nursery:
        base = await start_server(nursery, path)
        async with httpx.AsyncClient(trust_env=False) as client:
            r = await client.get(base + "/")
        age = int(r.headers["cache-control"].rsplit("=", 1)[1])
        assert 0 < age <= 60
        nursery.cancel_scope.cancel()


async def test_hanging_source_times_out_without_blocking_others(tmp_path):
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts TCP but never answers HTTP
    port = listener.getsockname()[1]
    good = tmp_path / "good.cbor"
    good.write_bytes(wall_bundle(4).encode())
    # without the per-source timeout the hanging source would block forever
    with trio.fail_after(60):
        result = await fetch_bundle(
            [f"http://127.0.0.1:{port}/", str(good)], PINNED, 2, None, timeout=0.5
        )
    assert result.bundle.seq == 4
    assert result.outcomes[0].reason is SourceError.TIMEOUT
    listener.close()


async def test_oversized_bodies_rejected(tmp_path):
    async def handler(stream):
        await stream.receive_some(4096)
        body = b"\x00" * 40_000
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
        chunked = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        await stream.send_all(head + chunked)  # no Content-Length: the cap is on bytes read
        await stream.aclose()

    big = tmp_path / "big.cbor"
    big.write_bytes(b"\x00" * 40_000)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        result = await fetch_bundle([f"http://127.0.0.1:{port}/", str(big)], PINNED, 2, None)
        assert result.bundle is None
        assert [o.reason for o in result.outcomes] == [Reason.OVERSIZED] * 2
        nursery.cancel_scope.cancel()
