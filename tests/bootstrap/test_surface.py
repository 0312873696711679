"""The public surface of `bootstrap` and its layering (imports point down only)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import bootstrap

EXPORTS = {
    "MAX_SIZE",
    "VERSION",
    "Entry",
    "SeedBundle",
    "UnverifiedBundle",
    "VerifiedBundle",
    "ValidBundle",
    "decode",
    "encode",
    "FetchResult",
    "fetch_bundle",
    "parse_source",
    "SourceError",
    "SourceReport",
}
# one canonical CBOR, one atomic write, one ASGI lifespan handler: shared with overlay
ALLOWED_OVERLAY = {
    "overlay.errors",
    "overlay.crypto",
    "overlay.wire.cbor",
    "overlay.storage.files",
    "overlay.control",
}
SANS_IO = {"bundle.py", "resolve.py", "dnstxt.py", "entries.py"}
IO_MODULES = {"trio", "httpx", "hypercorn", "dns", "socket", "asyncio"}


def test_exports():
    public = {
        n for n, v in vars(bootstrap).items() if not n.startswith("_") and not inspect.ismodule(v)
    }
    assert public == EXPORTS


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_layering():
    for path in Path(bootstrap.__file__).parent.glob("*.py"):
        names = imported(path)
        overlay = {n for n in names if n == "overlay" or n.startswith("overlay.")}
        assert overlay <= ALLOWED_OVERLAY, (path.name, overlay)
        if path.name in SANS_IO:
            top = {n.split(".")[0] for n in names}
            assert not top & IO_MODULES, (path.name, top & IO_MODULES)
