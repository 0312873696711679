"""A node a volunteer can leave running: the ``overlay`` CLI as a subprocess, real
homes, real ports, real signals (docs/volunteer.md).

Each test starts its own node processes on 127.0.0.1 and stops them; every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = [sys.executable, "-m", "overlay"]
SEEDS = [sys.executable, "-c", "from bootstrap.cli import main; main()"]
MULTIADDR = re.compile(r"(/(?:ip4|ip6|dns4?|dns6)/[^\s│┃]+)")


def cli(*args, check: int | None = 0, cmd=OVERLAY, timeout: float = 90, **kw):
    p = subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        **kw,
    )
    if check is not None and p.returncode != check:
        raise AssertionError(f"{args}: exit {p.returncode}, wanted {check}\n{p.stdout}\n{p.stderr}")
    return p


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(home: Path, *listen: str, roles=("relay",), extra: str = "") -> Path:
    args = ["init", "--home", home]
    for r in roles:
        args += ["--role", r]
    for a in listen or ("/ip4/127.0.0.1/tcp/0",):
        args += ["--listen", a]
    cli(*args)
    if extra:
        cfg = home / "config.toml"
        cfg.write_text(cfg.read_text() + "\n" + extra + "\n")
    return home


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_for_people(stderr: str, *, progress: bool = False) -> None:
    """One error line (the last, after progress lines if allowed), no Python internals."""
    got = lines(stderr)
    assert got and got[-1].startswith("error: "), stderr
    assert len(got) == 1 or progress, stderr
    for bad in ("Traceback", "Reason.", "<Reason", "SourceReport(", "Error(", "Exception(", "╭"):
        assert bad not in stderr, stderr


class NodeProc:
    """``overlay run`` in a subprocess, output in files."""

    def __init__(self, home: Path, *args: str, log: Path | None = None) -> None:
        self.home = home
        self.out = home.parent / f"{home.name}.stdout"
        self.err = home.parent / f"{home.name}.stderr"
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(
                [*OVERLAY, "run", "--home", str(home), *args],
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_running(self, timeout: float = 90) -> dict:
        """Wait for the control endpoint of this process; returns /status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited {self.proc.returncode}: {self.stderr()}")
            try:
                info = json.loads((self.home / "control.json").read_text())
                if info.get("pid") == self.pid:
                    st = cli("status", "--home", self.home, "--json", timeout=30)
                    return json.loads(st.stdout)
            except (OSError, ValueError, AssertionError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"node did not start within {timeout} s: {self.stderr()}")

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stderr()
            if re.search(pattern, text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} not in the node's output: {self.stderr()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"node did not stop on {sig!r}: {self.stderr()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def nodes():
    started: list[NodeProc] = []

    def start(home: Path, *args: str) -> NodeProc:
        n = NodeProc(home, *args)
        started.append(n)
        return n

    yield start
    for n in started:
        n.kill()


# ---------------------------------------------------------------- install
def test_version():
    out = cli("--version").stdout
    assert re.fullmatch(r"overlay \d+\.\d+\.\d+\S*\n", out), out
    out = cli("--version", cmd=SEEDS).stdout
    assert re.fullmatch(r"overlay-seeds \d+\.\d+\.\d+\S*\n", out), out


@pytest.mark.slow
def test_wheel_builds_installs_and_runs(tmp_path: Path):
    """README's `pip install .` path: a wheel of the project installs in a fresh
    venv and its console scripts run (dependencies are taken from this venv)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("overlay", "bootstrap"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("hydra_overlay-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies: this venv's site-packages, after the new venv's own
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(vpy),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    for script, name in (("overlay", "overlay"), ("overlay-seeds", "overlay-seeds")):
        r = subprocess.run(
            [str(venv / "bin" / script), "--version"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{name} "), r.stdout
    where = subprocess.run(
        [str(vpy), "-c", "import overlay; print(overlay.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), where


# ---------------------------------------------------------------- one node per home, ports
@pytest.mark.slow
def test_second_node_on_a_home_or_a_port_is_refused(tmp_path: Path, nodes):
    tcp, udp = free_port(), free_port(socket.SOCK_DGRAM)
    a = init(tmp_path / "a", f"/ip4/127.0.0.1/tcp/{tcp}", f"/ip4/127.0.0.1/udp/{udp}/quic-v1")
    node = nodes(a)
    node.wait_running()
    control = (a / "control.json").read_text()
    assert json.loads(control)["pid"] == node.pid

    # the same home: refused before anything is written, naming the holder
    again = cli("run", "--home", a, check=1)
    assert_for_people(again.stderr)
    assert f"process {node.pid}" in again.stderr and "in use" in again.stderr
    assert (a / "control.json").read_text() == control
    forced = cli("init", "--home", a, "--force", check=1)
    assert f"process {node.pid}" in forced.stderr
    assert (a / "control.json").read_text() == control
    cli("status", "--home", a)

    # another home on a taken TCP port, then on a taken UDP (QUIC) port
    for listen, what in (
        ([f"/ip4/127.0.0.1/tcp/{tcp}"], f"/ip4/127.0.0.1/tcp/{tcp}"),
        (
            ["/ip4/127.0.0.1/tcp/0", f"/ip4/127.0.0.1/udp/{udp}/quic-v1"],
            f"/ip4/127.0.0.1/udp/{udp}/quic-v1",
        ),
    ):
        b = init(tmp_path / f"b{len(what)}", *listen)
        r = cli("run", "--home", b, check=1)
        assert_for_people(r.stderr)
        assert f"cannot listen on {what}" in r.stderr and "in use" in r.stderr
        # nothing published, nothing stored, no control file
        assert json.loads((b / "state.json").read_text())["seq"] == 0
        assert not (b / "records.db").exists() and not (b / "control.json").exists()

    # control.json is removed only by the process that wrote it
    stranger = json.dumps({"url": "http://127.0.0.1:9", "pid": 1}).encode()
    (a / "control.json").write_bytes(stranger)
    assert node.stop() == 0
    assert (a / "control.json").read_bytes() == stranger


# ---------------------------------------------------------------- signals
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_sigterm_and_sigint_stop_cleanly(tmp_path: Path, nodes, sig):
    home = init(tmp_path / "n")
    node = nodes(home)
    node.wait_running()
    assert json.loads((home / "state.json").read_text())["seq"] == 1
    assert node.stop(sig) == 0
    err = node.stderr()
    assert f"stopped ({sig.name})" in err and "Traceback" not in err
    assert not (home / "control.json").exists()
    # planned shutdown: a tombstone (seq 2) signed, persisted and stored
    assert json.loads((home / "state.json").read_text())["seq"] == 2
    from overlay.home import Home
    from overlay.storage.records import RecordStore

    h = Home(home)
    with RecordStore(h.db_path) as st:
        rec = st.get(h.signing_key().node_id, time.time())
    assert rec is not None and rec.is_tombstone and rec.seq == 2
    # the lock went with the process: the home can run again
    again = nodes(home)
    again.wait_running()
    assert again.stop() == 0


@pytest.mark.slow
def test_sighup_reloads_log_level_and_names_what_needs_a_restart(tmp_path: Path, nodes):
    home = init(tmp_path / "n")
    log = tmp_path / "node.log"
    node = nodes(home, "--log-file", str(log))
    node.wait_running()
    cfg = home / "config.toml"
    text = cfg.read_text()
    text = text.replace('# level = "info"', 'level = "debug"')
    text = text.replace("# target_peers = 8", "target_peers = 5")
    text = text.replace('roles = ["relay"]', 'roles = ["relay", "entry"]')
    cfg.write_text(text)
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "restart the node" not in log.read_text():
        time.sleep(0.2)
    logged = log.read_text()
    assert "log level debug" in logged
    assert "[network] target_peers = 5" in logged
    assert "[node] roles changed; restart the node" in logged
    assert node.proc.poll() is None
    # debug lines now reach the log file (before the reload the node logged none of its
    # own); the log stays there, not on stderr
    before, after = logged.split("SIGHUP: reloaded", 1)
    assert " DEBUG hydra" not in before
    assert "DEBUG hydra.cli: SIGHUP: reloadable settings now" in after
    assert "hydra.node" not in node.stderr()
    assert node.stop() == 0


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(d.name))
    return out


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name
)
def test_demo_end_ends_its_nodes(tmp_path: Path, sig):
    demo = subprocess.Popen(
        [*OVERLAY, "demo", "--nodes", "3", "--exits", "1", "--standby", "0", "--duration", "600"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "demo.err", "wb"),  # noqa: SIM115
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        kids: list[int] = []
        while time.monotonic() < deadline and len(kids) < 3:
            assert demo.poll() is None, (tmp_path / "demo.err").read_text()
            kids = [
                p
                for p in _children(demo.pid)
                if b"overlay\x00run" in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            time.sleep(0.5)
        assert len(kids) == 3, kids
        os.kill(kids[-1], signal.SIGSTOP)  # as the demo freezes exits
        os.kill(demo.pid, sig)
        demo.wait(60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(_gone(p) for p in kids):
            time.sleep(0.2)
        assert all(_gone(p) for p in kids), [p for p in kids if not _gone(p)]
        if sig != signal.SIGKILL:
            assert demo.returncode == 1
            assert f"stopped by {sig.name}" in (tmp_path / "demo.err").read_text()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)


# ---------------------------------------------------------------- service
def test_systemd_unit_is_hardened_and_verifies(tmp_path: Path):
    unit = ROOT / "packaging" / "systemd" / "hydra-node.service"
    text = unit.read_text()
    for line in (
        "DynamicUser=yes",
        "StateDirectory=hydra",
        "ProtectSystem=strict",
        "Restart=on-failure",
        "RestartPreventExitStatus=64 78",
        "KillSignal=SIGTERM",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
    ):
        assert line in text.splitlines(), line
    assert re.search(r"^MemoryMax=\d+[KMG]$", text, re.M)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's program exists: point it at this checkout's
    fake = tmp_path / "opt" / "hydra" / "bin"
    fake.mkdir(parents=True)
    (fake / "overlay").symlink_to(sys.executable)
    copy = tmp_path / "hydra-node.service"
    copy.write_text(text.replace("/opt/hydra/bin/", f"{fake}/"))
    r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hydra-node.service" not in r.stderr, r.stderr


# ---------------------------------------------------------------- addresses, exits
@pytest.mark.slow
def test_run_and_status_show_dialable_addresses_and_exits_text(tmp_path: Path, nodes):
    announce = "/ip4/203.0.113.77/tcp/4001"
    a = init(tmp_path / "a", "/ip4/0.0.0.0/tcp/0", roles=("exit", "relay"))
    cfg = a / "config.toml"
    cfg.write_text(cfg.read_text().replace("# announce = []", f'announce = ["{announce}"]'))
    na = nodes(a)
    st = na.wait_running()
    pid = st["peer_id"]
    b = init(tmp_path / "b")
    nb = nodes(b, "--join", st["addresses"][0])
    nb.wait_running()
    # a relay feed appears once A holds a reservation on B
    out = na.wait_for(r"address\s+\S+/p2p-circuit/p2p/" + pid, timeout=90)
    addrs = [m.group(1) for m in MULTIADDR.finditer(out)]
    assert addrs and not any("/0.0.0.0/" in x for x in addrs), out
    assert f"{announce}/p2p/{pid}" in addrs

    status = cli("status", "--home", a)  # stdout is a pipe here, not a terminal
    assert "0.0.0.0" not in status.stdout
    js = json.loads(cli("status", "--home", a, "--json").stdout)
    assert any("/p2p-circuit/p2p/" in x for x in js["addresses"])
    for x in js["addresses"]:
        assert not x.startswith("/ip4/0.0.0.0/")
        assert any(line.strip().endswith(x) for line in status.stdout.splitlines()), x
    for f in js["feeds"]:  # the feeds table never wraps an address
        assert f["addr"] in status.stdout, f["addr"]

    exits = cli("exits", "--home", a).stdout
    assert re.search(r"live exits 1 of target 3", exits), exits
    assert "pool decisions" in exits and "deficit" in exits
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\d+ (s|min) ago\)", exits), exits
    assert pid in exits


# ---------------------------------------------------------------- errors for people
@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["init", "--role", "foo"], 64, "unknown role"),
        (["init", "--listen", "not-a-multiaddr"], 64, "--listen"),
        (["init", "--role", "exit", "--policy", "bogus"], 64, "--policy"),
        (["run", "--join", "not-a-multiaddr"], 64, "--join"),
        (["run", "--join", "/ip4/127.0.0.1/tcp/4001"], 64, "/p2p/"),
        (["run", "--log-level", "loud"], 64, "--log-level"),
        (["run", "--operator", "zz", "--seeds", "x.cbor"], 64, "--operator"),
        (["run", "--threshold", "0"], 64, "--threshold"),
        (["run", "--no-such-option"], 64, "--no-such-option"),
        (["send", "--to", "smtp:a@example.org", "--until", "sometime"], 64, "--until"),
        (["send", "--to", "nowhere"], 64, "--to"),
        (["send", "--to", "smtp:a@example.org", "--hops", "9"], 64, "--hops"),
        (["demo", "--nodes", "2"], 64, "--nodes"),
        (["status"], 1, "no running node"),
    ],
)
def test_bad_input_is_one_line_and_nothing_starts(tmp_path: Path, args, code, words):
    home = tmp_path / "h"
    if args[0] in ("run", "status"):
        init(home)
    before = sorted(p.name for p in home.iterdir()) if home.exists() else None
    r = cli(*args, "--home", home, check=code) if args[0] != "demo" else cli(*args, check=code)
    assert_for_people(r.stderr)
    assert words in r.stderr, r.stderr
    # checked before anything started or was written
    after = sorted(p.name for p in home.iterdir()) if home.exists() else None
    assert after == before


def test_config_errors_and_debug(tmp_path: Path):
    missing = cli("run", "--home", tmp_path / "none", check=78)
    assert_for_people(missing.stderr)
    assert "overlay init" in missing.stderr
    home = init(tmp_path / "h")
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text() + "\n[bogus]\nno_such_key = 1\n")
    bad = cli("run", "--home", home, check=78)
    assert_for_people(bad.stderr)
    assert "no_such_key" in bad.stderr
    check = cli("config", "check", "--home", home, check=78)
    assert_for_people(check.stderr)
    debug = cli("--debug", "run", "--home", home, check=78)
    assert "Traceback" in debug.stderr and "no_such_key" in debug.stderr.splitlines()[-1]


def test_join_failure_is_one_line(tmp_path: Path):
    home = init(tmp_path / "h")
    nobody = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCv79ZBj17H8HycVStZN6y8CW3sLdkkpzeZEJfnSGDPwZ"
    r = cli("run", "--home", home, "--join", nobody, "--log-level", "warning", check=1)
    assert_for_people(r.stderr, progress=True)
    assert "could not join through any address" in r.stderr
    assert not (home / "control.json").exists()


def test_config_check_prints_effective_settings(tmp_path: Path):
    home = init(tmp_path / "h", extra="")
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text().replace("# target_peers = 8", "target_peers = 12"))
    r = cli("config", "check", "--home", home)
    assert "ok" in r.stdout.splitlines()[0]
    assert "[network]" in r.stdout and "target_peers = 12" in r.stdout
    assert "gossip_heartbeat = 1.0" in r.stdout  # a default, not in the file
    assert "[log]" in r.stdout and 'level = "info"' in r.stdout
    js = json.loads(cli("config", "check", "--home", home, "--json").stdout)
    assert js["ok"] and js["settings"]["network"]["target_peers"] == 12


def test_record_show_times_are_human(tmp_path: Path):
    home = init(tmp_path / "h", f"/ip4/127.0.0.1/tcp/{free_port()}")
    out = cli("record", "show", "--home", home).stdout
    assert re.search(r"issued_at\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \((now|\d+ s ago)\)", out), out
    assert re.search(r"expires_at\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in \d+ ", out), out


# ---------------------------------------------------------------- logs
def test_library_noise_is_demoted_and_rate_limited():
    import logging

    from overlay.cli import LIBRARY_BURST, LogFilter

    def rec(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, (), None)

    clock = [0.0]
    info = LogFilter(logging.INFO, clock=lambda: clock[0])
    hop = "Error reading from hop stream from %s: %s"
    assert not info.filter(rec("libp2p.relay.circuit_v2.protocol", logging.ERROR, hop))
    assert info.filter(rec("hydra.node", logging.WARNING, "ours"))
    assert not info.filter(rec("hydra.node", logging.DEBUG, "ours"))
    debug = LogFilter(logging.DEBUG, clock=lambda: clock[0])
    shown = [
        debug.filter(rec("libp2p.relay.circuit_v2.protocol", logging.ERROR, hop)) for _ in range(50)
    ]
    assert sum(shown) == LIBRARY_BURST
    clock[0] += 61
    r = rec("libp2p.relay.circuit_v2.protocol", logging.ERROR, hop)
    assert debug.filter(r) and r.levelname == "DEBUG"
    assert f"{50 - LIBRARY_BURST} similar lines left out" in r.msg


# ---------------------------------------------------------------- seeds: --operator, cache
def _bundle(path: Path, key, seq: int, addr: str, *, expired: bool = False) -> None:
    from bootstrap.bundle import Entry, SeedBundle
    from overlay.crypto import NodeId

    now = int(time.time())
    peer = NodeId.from_peer_id(addr.rsplit("/p2p/", 1)[1])
    issued, expires = (now - 7200, now - 3600) if expired else (now, now + 86400)
    b = SeedBundle.create(
        seq=seq,
        issued_at=issued,
        expires_at=expires,
        entries=[Entry(peer, (addr.rsplit("/p2p/", 1)[0],))],
        operators=[key.node_id],
        threshold=1,
    ).signed_by(key)
    path.write_bytes(b.encode())


@pytest.mark.slow
def test_run_seeds_with_operator_and_expired_cache_recovery(tmp_path: Path, nodes):
    from overlay.crypto import SigningKey

    a = init(tmp_path / "a")
    st = nodes(a).wait_running()
    entry = next(x for x in st["addresses"] if "/tcp/" in x)
    op = SigningKey.generate()
    fresh = tmp_path / "fresh.cbor"
    _bundle(fresh, op, 5, entry)

    b = init(tmp_path / "b")
    # no pinned operator anywhere: a usage error, before anything starts
    r = cli("run", "--home", b, "--seeds", fresh, check=64)
    assert_for_people(r.stderr)
    assert "--operator" in r.stderr
    # an expired cached bundle with a higher seq blocks the fresh one: say how to recover
    _bundle(b / "seeds-cache.cbor", op, 100, entry, expired=True)
    r = cli("run", "--home", b, "--seeds", fresh, "--operator", op.node_id.hex(), check=1)
    assert_for_people(r.stderr, progress=True)  # a line per seed source first
    assert "overlay seeds forget" in r.stderr and "seq 100" in r.stderr
    forget = cli("seeds", "forget", "--home", b)
    assert "forgot" in forget.stdout and not (b / "seeds-cache.cbor").exists()
    node = nodes(b, "--seeds", str(fresh), "--operator", op.node_id.peer_id(), "--threshold", "1")
    joined = node.wait_running()
    deadline = time.monotonic() + 60
    while not joined["joined_via"] and time.monotonic() < deadline:
        time.sleep(0.5)
        joined = json.loads(cli("status", "--home", b, "--json").stdout)
    assert joined["joined_via"] == entry.rsplit("/p2p/", 1)[0] + "/p2p/" + st["peer_id"]
    assert "chosen (seq 5)" in node.stderr()
    assert (b / "seeds-cache.cbor").exists()
    assert node.stop() == 0
