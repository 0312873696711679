"""A bad ``config.toml`` is one ``ConfigError`` line naming the file, in the library and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from overlay import config
from overlay.errors import ConfigError
from overlay.testing import make_home

OVERLAY = [sys.executable, "-m", "overlay"]

BAD = {
    "non-utf8": (b'[node]\nroles = ["relay\xff"]\n', "not UTF-8"),
    "invalid toml": (b"[node\nroles = 1\n", "invalid TOML"),
    "duplicate key": (b'[node]\nroles = ["relay"]\nroles = ["relay"]\n', "invalid TOML"),
    "unknown key": (b"[node]\ncolour = 1\n", "unknown setting [node] colour"),
    "unknown section": (b"[nodes]\nroles = 1\n", "unknown setting [nodes] roles"),
    "not a section": (b"roles = 1\n", "must be a [section]"),
    "list of ints": (b"[node]\nroles = [1]\n", "[node] roles must be a list of strings"),
    "string for list": (b'[node]\nlisten = "/ip4/1.2.3.4/tcp/1"\n', "must be a list of strings"),
    "bool for number": (b"[network]\ntarget_peers = true\n", "must be a number"),
    "float for int": (b"[network]\ntarget_peers = 2.5\n", "must be a whole number"),
    "nan": (b"[network]\nsync_interval = nan\n", "finite number >= 0"),
    "negative": (b"[network]\nsync_interval = -1\n", "finite number >= 0"),
    "int for string": (b"[control]\nlisten = 5\n", "[control] listen must be a string"),
    "date for string": (b"[exit]\nsmtp_relay = 2024-01-01\n", "must be a string"),
    "public control": (b'[control]\nlisten = "0.0.0.0:80"\n', "local only"),
    "bad rule": (b'[node]\nroles = ["exit"]\n[exit]\npolicy = ["nope"]\n', "bad exit policy"),
}


@pytest.mark.parametrize(("content", "expect"), BAD.values(), ids=BAD.keys())
def test_bad_config_is_one_config_error_naming_the_file(tmp_path, content, expect):
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expect in message
    assert "\n" not in message


def test_missing_and_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="run `overlay init`"):
        config.load(tmp_path / "none.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "dir.toml")


def test_written_config_still_loads(tmp_path):
    home = make_home(tmp_path / "h", ["exit"], policy=["smtp:*"], target_peers=3)
    cfg = home.config()
    assert cfg.target_peers == 3 and cfg.exit_policy == ["smtp:*"]


def run(*args, home: Path, stdin: str = ""):
    return subprocess.run(
        [*OVERLAY, *args, "--home", str(home)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


CLI_CASES = [  # every command that loads the config, each with one kind of bad file
    (("run",), "non-utf8"),
    (("record", "show"), "invalid toml"),
    (("record", "export", "-o", "x.bin"), "list of ints"),
    (("send", "--to", "smtp:a@b.c"), "non-utf8"),
    (("outbox", "--flush"), "unknown key"),
]


@pytest.mark.parametrize(("command", "bad"), CLI_CASES, ids=[" ".join(c) for c, _ in CLI_CASES])
def test_cli_reports_bad_config_in_one_line(tmp_path, command, bad):
    home = make_home(tmp_path / "h")
    content, expect = BAD[bad]
    home.config_path.write_bytes(content)
    p = run(*command, home=home.path, stdin="hi")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"error: {home.config_path}: ") and expect in lines[0]
    assert "Traceback" not in p.stderr + p.stdout
