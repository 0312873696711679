"""Screenshots for the docs, taken from a live ``overlay demo``: the web console of
its entry node (headless Chromium), ``overlay status --watch`` on that node and
the demo's own terminal (both in tmux, turned into images through rich's SVG
export and Chromium). Run through ``scripts/screenshots``; writes docs/img/.

Needs tmux, chromium and chromium-driver (Debian packages) and selenium.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from overlay.console import browser
from overlay.control import auth_headers, read_token

ROOT = Path(__file__).resolve().parent.parent
SESSION = "hydra-screenshots"
COLS, ROWS = 150, 50


def tmux(*args: str, check: bool = True) -> str:
    return subprocess.run(["tmux", *args], check=check, capture_output=True, text=True).stdout


def pane(name: str) -> str:
    return tmux("capture-pane", "-e", "-p", "-t", name)


def ansi_to_png(ansi: str, out: Path, title: str, drv) -> None:
    """Render terminal text (with escape codes) to a PNG through rich's SVG export."""
    from rich.console import Console
    from rich.text import Text

    lines = ansi.rstrip("\n").split("\n")
    while lines and not Text.from_ansi(lines[-1]).plain.strip():
        lines.pop()
    con = Console(record=True, width=COLS, force_terminal=True, color_system="truecolor")
    con.file = open(os.devnull, "w")  # noqa: SIM115 - only the recording matters
    for line in lines:
        con.print(Text.from_ansi(line), soft_wrap=True)
    with tempfile.NamedTemporaryFile("w", suffix=".html", delete=False) as f:
        svg = con.export_svg(title=title)
        f.write(
            "<!doctype html><html><body style='margin:0;background:#fff'>" + svg + "</body></html>"
        )
    drv.get(f"file://{f.name}")
    size = drv.execute_script(
        "const r = document.querySelector('svg').getBoundingClientRect();"
        "return [Math.ceil(r.width), Math.ceil(r.height)];"
    )
    drv.set_window_size(size[0], size[1] + 120)  # the window's frame takes some height
    drv.find_element("css selector", "svg").screenshot(str(out))
    os.unlink(f.name)


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    end = time.time() + timeout
    while time.time() < end:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    raise SystemExit(f"screenshots: timed out waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description="Regenerate the docs' screenshots.")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--after-takedown", type=float, default=15.0, help="seconds to wait")
    args = ap.parse_args()
    for need in ("tmux",):
        if shutil.which(need) is None:
            raise SystemExit(f"screenshots: needs {need} (apt-get install {need})")
    why = browser.missing()
    if why:
        raise SystemExit(f"screenshots: needs {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    before = set(glob.glob("/tmp/hydra-demo-*"))
    overlay = f"{sys.executable} -m overlay"  # this checkout's code (cwd: ROOT)
    tmux("kill-session", "-t", SESSION, check=False)
    tmux(
        "new-session",
        "-d",
        "-s",
        SESSION,
        "-x",
        str(COLS),
        "-y",
        str(ROWS),
        "-n",
        "demo",
        f"cd {ROOT} && {overlay} demo --nodes 8 --exits 2 --standby 2 --duration 120; sleep 600",
    )
    drv = None
    try:
        root = wait_for(
            lambda: next(iter(set(glob.glob("/tmp/hydra-demo-*")) - before), None),
            60,
            "the demo's directory",
        )
        entry = Path(root) / "node00"
        wait_for(lambda: (entry / "control.json").exists(), 180, "the entry node")
        url = json.loads((entry / "control.json").read_text())["url"]

        def exit_died():
            try:
                r = httpx.get(
                    url + "/console/state", headers=auth_headers(entry), timeout=3, trust_env=False
                )
                events = r.json()["events"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            # the demo's first takedown seen by the entry (not a death before traffic)
            return any(e["kind"] == "dead" and e.get("role") == "exit" for e in events) and (
                "takedown" in pane(f"{SESSION}:demo")
            )

        print("waiting for the demo's first takedown …", file=sys.stderr)
        wait_for(exit_died, 300, "a takedown")
        time.sleep(args.after_takedown)
        tmux(
            "new-window",
            "-t",
            SESSION,
            "-n",
            "watch",
            f"cd {ROOT} && {overlay} status --watch --home {entry}; sleep 600",
        )
        drv = browser.chromium(width=1400, height=1000)
        drv.get(browser.login_url(url, read_token(entry)))
        time.sleep(5)  # the page has drawn a few updates; --watch too
        height = drv.execute_script("return document.documentElement.scrollHeight")
        drv.set_window_size(1400, height + 140)
        time.sleep(1.5)
        drv.save_screenshot(str(args.out / "console.png"))
        errors = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        if errors:
            print(f"screenshots: the page logged errors: {errors}", file=sys.stderr)
        watch = pane(f"{SESSION}:watch")
        demo = pane(f"{SESSION}:demo")
        ansi_to_png(watch, args.out / "watch.png", "overlay status --watch", drv)
        ansi_to_png(demo, args.out / "demo.png", "overlay demo", drv)
        for name in ("console.png", "watch.png", "demo.png"):
            print(args.out / name)
    finally:
        if drv is not None:
            drv.quit()
        tmux("kill-session", "-t", SESSION, check=False)  # SIGHUP: the demo stops its nodes
    return 0


if __name__ == "__main__":
    sys.exit(main())
