"""Local multi-process overlays on loopback: ``scripts/cluster`` and ``overlay demo``.

Each node is a separate ``overlay run`` process with its own home under one
root directory; node 0 starts first and every later node joins through a
random earlier one. All processes are stopped when the cluster closes.

Each node runs in its own process group (``kill`` signals the group), and on
Linux with a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): when
the process that started the cluster dies, however it dies, its nodes die
too, frozen (SIGSTOPped) ones included. The kernel sends that signal when the
*thread* that forked the child ends, so every node is started from one
long-lived spawner thread that lives as long as the cluster.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..control import auth_headers
from ..errors import LocalError
from ..home import Home
from ..testing import LOOPBACK


@dataclass
class NodeProc:
    index: int
    home: Home
    roles: list[str]
    proc: subprocess.Popen | None = None
    control: str = ""
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    killed_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, route: str, timeout: float = 2.0) -> dict:
        headers = auth_headers(self.home.path)
        r = httpx.get(self.control + route, headers=headers, timeout=timeout, trust_env=False)
        r.raise_for_status()
        return r.json()


# Runs before ``overlay run`` in each node process (then execs it): set the
# parent-death signal, and exit if the parent is already gone (the race where it
# died between fork and prctl).
_PDEATHSIG_WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "PR_SET_PDEATHSIG = 1\n"
    "ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def with_parent_death_signal(args: list[str]) -> list[str]:
    """``args`` wrapped so that the process is SIGKILLed when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return list(args)
    return [sys.executable, "-c", _PDEATHSIG_WRAPPER, str(os.getpid()), *args]


class ClusterClosed(RuntimeError):
    """The cluster was stopped while nodes were still being started."""


class Cluster:
    def __init__(
        self,
        root: Path,
        roles: Sequence[Sequence[str]],
        *,
        settings: dict | None = None,
        seed: int = 1,
        log_dir: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.rng = random.Random(seed)
        self.settings = {"control_listen": "127.0.0.1:0", "sync_interval": 1.0, **(settings or {})}
        self.log_dir = log_dir or self.root / "logs"
        self.nodes: list[NodeProc] = []
        self._lock = threading.Lock()
        self._closed = False
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-spawn")
        for i, r in enumerate(roles):
            policy = ["maildir:*", "smtp:*"] if {"exit", "standby-exit"} & set(r) else None
            home = Home.init(
                self.root / f"node{i:02d}",
                roles=list(r),
                listen=LOOPBACK,
                exit_policy=policy,
                extra=self.settings,
                force=True,
            )
            self.nodes.append(NodeProc(i, home, list(r)))

    def start(self, timeout: float = 60.0) -> None:
        """Start node 0, then every other node at once, each joining through node 0."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        first, rest = self.nodes[0], self.nodes[1:]
        self.start_node(first, [], timeout)
        with ThreadPoolExecutor(max_workers=max(1, len(rest))) as pool:
            for f in [pool.submit(self.start_node, n, [first.addrs[0]], timeout) for n in rest]:
                f.result()

    def _spawn(self, args: list[str], log_path: Path) -> subprocess.Popen:
        with self._lock:
            if self._closed:
                raise ClusterClosed("the cluster is stopping")
            with open(log_path, "ab") as log:
                return subprocess.Popen(
                    with_parent_death_signal(args),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # own process group: kill() signals the group
                )

    def start_node(self, node: NodeProc, join: Sequence[str], timeout: float = 30.0) -> None:
        args = [sys.executable, "-m", "overlay", "run", "--home", str(node.home.path)]
        for a in join:
            args += ["--join", a]
        log_path = self.log_dir / f"node{node.index:02d}.log"
        node.proc = self._spawner.submit(self._spawn, args, log_path).result()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._closed:
                raise ClusterClosed("the cluster is stopping")
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.index} exited; see {self.log_dir}")
            try:
                info = json.loads(node.home.control_path.read_text())
                if info.get("pid") != node.proc.pid:
                    raise ValueError("control.json of an earlier run")
                node.control = info["url"]
                st = node.get("/status")
                node.peer_id, node.addrs = st["peer_id"], st["listen"]
                if not join or st.get("joined_via"):
                    node.killed_at = None
                    return
            except (OSError, ValueError, KeyError, httpx.HTTPError, LocalError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"node {node.index} did not start within {timeout} s")

    def kill(self, node: NodeProc, sig: int = signal.SIGKILL) -> None:
        if node.alive:
            os.killpg(node.proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                node.proc.wait(10)
                node.killed_at = time.time()

    def stop(self) -> None:
        """Stop every node (frozen ones are continued first); no new node starts after."""
        with self._lock:
            self._closed = True
        for node in self.nodes:
            if node.alive:
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        os.killpg(node.proc.pid, sig)
                    except ProcessLookupError:
                        pass
        deadline = time.monotonic() + 15  # a planned stop withdraws the record first
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(node.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                node.proc.wait(5)
        self._spawner.shutdown(wait=False)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__)
    p.add_argument("n", type=int, help="number of nodes")
    p.add_argument("--exits", type=int, default=1)
    p.add_argument("--standby", type=int, default=1)
    p.add_argument("--root", type=Path, default=None, help="directory for node homes")
    args = p.parse_args(argv)
    roles = []
    for i in range(args.n):
        if i == 0:
            roles.append(["entry", "relay"])
        elif i <= args.exits:
            roles.append(["exit", "relay"])
        elif i <= args.exits + args.standby:
            roles.append(["standby-exit", "relay"])
        else:
            roles.append(["relay"])
    root = args.root or Path(tempfile.mkdtemp(prefix="hydra-cluster-"))
    cluster = Cluster(root, roles)

    def on_term(signum, frame):  # SIGTERM/SIGHUP: stop the nodes like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        cluster.start()
        print(f"{args.n} nodes running; homes under {root}")
        for n in cluster.nodes:
            print(f"  node{n.index:02d} {','.join(n.roles):22s} {n.addrs[0]}")
        print("\nTalk to them:")
        print(f"  overlay status --home {cluster.nodes[0].home.path}")
        print(f"  overlay peers  --home {cluster.nodes[0].home.path}")
        print(f"  overlay exits  --home {cluster.nodes[0].home.path} --json")
        print(f"  join another:  overlay run --home DIR --join {cluster.nodes[0].addrs[0]}")
        print(f"logs in {cluster.log_dir}.  Ctrl-C stops every node.")
        while all(n.alive for n in cluster.nodes):
            time.sleep(1)
        print("a node exited; stopping the cluster", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
