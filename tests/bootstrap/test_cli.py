"""overlay-seeds commands through typer's CliRunner (and one real subprocess)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from typer.testing import CliRunner

from bootstrap.bundle import decode
from bootstrap.cli import app
from bootstrap.dnstxt import decode_txt

from .helpers import key

runner = CliRunner()


def run(*args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.stdout, r.stderr)
    return r


def keys(tmp_path, n=3):
    pubs = []
    for i in range(n):
        r = run("keygen", "-o", tmp_path / f"op{i}.key")
        pubs.append(r.stdout.strip())
    return pubs


def ops_args(pubs):
    return [x for p in pubs for x in ("--operator", p)]


def test_keygen_0600_refuses_overwrite(tmp_path):
    path = tmp_path / "op.key"
    pub = run("keygen", "-o", path).stdout.strip()
    assert len(pub) == 64 and bytes.fromhex(pub)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert pub in path.read_text()
    before = path.read_bytes()
    r = run("keygen", "-o", path, code=2)
    assert "exists" in r.stderr and path.read_bytes() == before
    pub2 = run("keygen", "-o", path, "--force").stdout.strip()
    assert pub2 != pub and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # a key file others can read is refused when signing
    os.chmod(path, 0o644)
    bundle = tmp_path / "b.cbor"
    peer = key(100).node_id.peer_id()
    run(
        "create",
        "--peer",
        f"/ip4/1.2.3.4/tcp/1/p2p/{peer}",
        "--operator",
        pub2,
        "-k",
        "1",
        "-o",
        bundle,
    )
    r = run("sign", bundle, "--key", path, code=2)
    assert "chmod 600" in r.stderr


def test_create_sign_cosign_verify_export(tmp_path):
    pubs = keys(tmp_path)
    bundle = tmp_path / "seeds.cbor"
    p1, p2 = key(100).node_id.peer_id(), key(101).node_id.peer_id()
    run(
        "create",
        "--peer", f"/ip4/203.0.113.1/tcp/4001/p2p/{p1}",
        "--peer", f"/ip4/203.0.113.1/udp/4001/quic-v1/p2p/{p1}",
        "--peer", f"/dns4/seed.example.org/tcp/443/wss/p2p/{p2}",
        *ops_args(pubs), "--threshold", "2", "--seq", "42", "--ttl-days", "7", "-o", bundle,
    )  # fmt: skip
    b = decode(bundle.read_bytes())
    assert b.seq == 42 and len(b.entries) == 2 and b.expires_at - b.issued_at == 7 * 86400
    assert b.join_addrs()[0] == f"/ip4/203.0.113.1/tcp/4001/p2p/{p1}"
    run(
        "create",
        "--peer",
        f"/ip4/1.1.1.1/tcp/1/p2p/{p1}",
        *ops_args(pubs),
        "-k",
        "2",
        "-o",
        bundle,
        code=2,
    )

    verify = ["verify", bundle, *ops_args(pubs), "-k", "2", "--json"]
    r = run(*verify, code=1)
    assert json.loads(r.stdout)["reason"] == "under_signed"
    r = run("sign", bundle, "--key", tmp_path / "op0.key")
    assert "1 of 2" in r.stdout and "needs more" in r.stdout
    run(*verify, code=1)
    r = run("cosign", bundle, "--key", tmp_path / "op2.key")
    assert "2 of 2" in r.stdout and "complete" in r.stdout
    r = run(*verify)
    out = json.loads(r.stdout)
    assert out["ok"] and out["seq"] == 42 and sorted(out["signers"]) == sorted([pubs[0], pubs[2]])
    assert run("verify", bundle, *ops_args(pubs), "-k", "2").stdout.startswith("valid: seq 42")

    # the other rejection reasons, as exit code 1 plus the reason
    stranger = keys(tmp_path / "s", 2)
    r = run("verify", bundle, *ops_args(stranger), "-k", "1", "--json", code=1)
    assert json.loads(r.stdout)["reason"] == "unknown_operator"
    r = run(*verify[:-1], "--at", time.time() + 8 * 86400, code=1)
    assert "expired" in r.stderr
    r = run("verify", bundle, *ops_args(pubs), "-k", "4", code=2)  # k > pinned keys
    junk = tmp_path / "junk.cbor"
    junk.write_bytes(b"\xa0")
    r = run("verify", junk, *ops_args(pubs), "-k", "2", code=1)
    assert "malformed" in r.stderr
    r = run("verify", bundle, "--operator", "nothex", "-k", "1", code=2)

    show = run("show", bundle).stdout
    assert "unverified" in show and show.count(" ok (operator)") == 2

    zone_file = tmp_path / "zone.txt"
    run("export-dns", bundle, "--domain", "seeds.example.org", "-o", zone_file, "--ttl", "60")
    zone = zone_file.read_text()
    txt = [
        ln.split('"')[1]
        for ln in zone.splitlines()
        if ln.startswith("_hydra-seeds.seeds.example.org. 60 IN TXT")
    ]
    assert decode_txt(txt) == [bundle.read_bytes()]
    assert (
        f'_dnsaddr.seeds.example.org. 60 IN TXT "dnsaddr=/dns4/seed.example.org/tcp/443/wss/p2p/{p2}"'
        in zone
    )
    assert run("export-dns", bundle, "--domain", "seeds.example.org").stdout == zone.replace(
        " 60 IN", " 300 IN"
    )

    # fetch command (file sources) with a cache, as JSON
    cache = tmp_path / "cache.cbor"
    r = run(
        "fetch",
        bundle,
        tmp_path / "none.cbor",
        *ops_args(pubs),
        "-k",
        "2",
        "--cache",
        cache,
        "--json",
    )
    out = json.loads(r.stdout)
    assert out["ok"] and out["bundle"]["seq"] == 42
    assert [s["reason"] for s in out["sources"]] == ["ok", "not_found"]
    assert cache.read_bytes() == bundle.read_bytes()
    r = run("fetch", tmp_path / "none.cbor", *ops_args(pubs), "-k", "2", "--cache", cache)
    assert "using cached bundle" in r.stdout
    run("fetch", tmp_path / "none.cbor", *ops_args(pubs), "-k", "2", code=1)


class _Records(BaseHTTPRequestHandler):
    payload: bytes = b""

    def do_GET(self):  # noqa: N802
        if self.path != "/records":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def records_server(records):
    handler = type("H", (_Records,), {"payload": json.dumps({"records": records}).encode()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_create_from_node(tmp_path):
    now = int(time.time())

    def rec(n, feeds, live=True, ttl=3600):
        nid = key(100 + n).node_id
        return {
            "peer_id": nid.peer_id(),
            "node_id": nid.hex(),
            "seq": 1,
            "roles": ["relay"],
            "feeds": feeds,
            "expires_at": now + ttl,
            "live": live,
        }

    records = [
        rec(0, ["/ip4/45.1.0.1/tcp/4001", "/ip4/45.1.0.1/udp/4001/quic-v1"]),
        rec(1, ["/ip4/45.1.0.2/tcp/4001"]),  # same /16 as peer 0
        rec(2, ["/ip4/77.2.3.4/tcp/4001/ws"]),
        rec(3, ["/ip4/91.1.1.1/tcp/4001"], live=False),
        rec(4, ["/ip4/92.1.1.1/tcp/4001"], ttl=30),  # about to expire
        rec(5, ["/ip4/127.0.0.1/tcp/4001"]),
        {
            "peer_id": "garbage",
            "feeds": ["/ip4/1.2.3.4/tcp/1"],
            "live": True,
            "expires_at": now + 999,
        },
    ]
    pub = keys(tmp_path, 1)
    out = tmp_path / "b.cbor"
    with records_server(records) as url:
        run(
            "create",
            "--from-node",
            url,
            "--max-peers",
            "3",
            "--public-only",
            *ops_args(pub),
            "-k",
            "1",
            "-o",
            out,
        )
    chosen = {e.peer for e in decode(out.read_bytes()).entries}
    assert chosen == {key(100).node_id, key(102).node_id, key(101).node_id}
    with records_server(records) as url:
        run(
            "create",
            "--from-node",
            url,
            "--max-peers",
            "2",
            *ops_args(pub),
            "-k",
            "1",
            "-o",
            out,
            "--force",
        )
    chosen = {e.peer for e in decode(out.read_bytes()).entries}
    # most diverse first: peer 0 (two transports) and then another network
    assert key(100).node_id in chosen and key(101).node_id not in chosen
    run(
        "create",
        "--from-node",
        "http://127.0.0.1:1",
        *ops_args(pub),
        "-k",
        "1",
        "-o",
        tmp_path / "x",
        code=2,
    )


def test_console_script_runs():
    r = subprocess.run(
        [sys.executable, "-c", "from bootstrap.cli import main; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    for command in ("keygen", "create", "sign", "cosign", "verify", "serve", "export-dns", "fetch"):
        assert command in r.stdout


def test_serve_subprocess(tmp_path):
    """`overlay-seeds serve` in its own process: serves the file, stops on SIGINT."""
    import httpx

    from .helpers import closed_port, wall_bundle

    bundle = tmp_path / "b.cbor"
    bundle.write_bytes(wall_bundle(3).encode())
    port = closed_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from bootstrap.cli import main; main()",
            "serve",
            str(bundle),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/seeds.cbor" in line, (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        r = httpx.get(f"http://127.0.0.1:{port}/seeds.cbor", trust_env=False, timeout=5)
        assert r.status_code == 200 and r.content == bundle.read_bytes()
    finally:
        proc.send_signal(__import__("signal").SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
