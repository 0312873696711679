"""The `overlay` CLI, run as users run it (a subprocess of the installed console script)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

OVERLAY = [sys.executable, "-m", "overlay"]


def run(*args, check=True):
    p = subprocess.run([*OVERLAY, *map(str, args)], capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed: {p.stdout}\n{p.stderr}")
    return p


def test_init_export_verify_and_tamper(tmp_path: Path):
    home = tmp_path / "node"
    run("init", "--home", home, "--role", "exit", "--listen", "/ip4/127.0.0.1/tcp/4555")
    for f in [home / "node.key", *(home / "onion").glob("*.key")]:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    again = run("init", "--home", home, check=False)
    assert again.returncode != 0 and "--force" in again.stderr
    old_key = (home / "node.key").read_bytes()
    run("init", "--home", home, "--force", "--role", "relay", "--listen", "/ip4/127.0.0.1/tcp/4555")
    assert (home / "node.key").read_bytes() != old_key

    shown = json.loads(run("record", "show", "--home", home, "--json").stdout)
    assert shown["roles"] == ["relay"] and shown["feeds"] == ["/ip4/127.0.0.1/tcp/4555"]
    out = tmp_path / "rec.bin"
    run("record", "export", "--home", home, "-o", out)
    ok = run("record", "verify", out, "--json")
    assert json.loads(ok.stdout)["valid"] is True

    data = bytearray(out.read_bytes())
    for pos in (5, len(data) // 2, len(data) - 2):
        bad = tmp_path / f"bad{pos}.bin"
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        bad.write_bytes(flipped)
        res = run("record", "verify", bad, "--json", check=False)
        assert res.returncode == 1
        assert json.loads(res.stdout)["valid"] is False
        assert json.loads(res.stdout)["reason"]


def test_verify_reports_reason_in_text(tmp_path: Path):
    f = tmp_path / "junk.bin"
    f.write_bytes(b"\xff" * 2000)
    res = run("record", "verify", f, check=False)
    assert res.returncode == 1 and "oversized" in res.stderr


def test_init_rejects_exit_without_policy_and_unknown_role(tmp_path: Path):
    res = run("init", "--home", tmp_path / "x", "--role", "boss", check=False)
    assert res.returncode != 0 and "unknown role" in res.stderr
