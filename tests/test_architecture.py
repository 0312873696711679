"""The layering is executable: imports point down only, and the public surface is pinned."""

import ast
from pathlib import Path

import overlay

ROOT = Path(__file__).resolve().parent.parent / "overlay"

# lower number = lower layer; a module may import only its own layer or below
LAYERS = {
    "errors": 0,
    "crypto": 0,
    "wire": 1,
    "records": 1,
    "onion": 1,
    "sphinx": 1,
    "core": 2,
    "config": 3,
    "home": 3,
    "store": 3,
    "net": 3,
    "exits": 3,
    "metrics": 3,
    "control": 3,
    "outbox_store": 3,
    "testing_netns": 3,
    "console": 4,
    "resilience": 4,
    "relay": 4,
    "notices": 4,
    "feeds": 4,
    "caps": 4,
    "runtime": 5,
    "client": 6,
    "testing": 6,
    "cluster": 7,
    "sim": 6,
    "demo": 8,
    "cli_util": 9,
    "cli_send": 9,
    "cli": 9,
    "__main__": 10,
    "__init__": 10,
}
IO_LIBS = {"trio", "libp2p", "sqlite3", "socket", "httpx", "hypercorn", "subprocess", "aiosmtpd"}


def top_module(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported name, relative level) for every import in a module.

    Imports under ``if TYPE_CHECKING:`` are annotations only and are skipped.
    """
    out = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, 0) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def resolve(path: Path, name: str, level: int) -> str | None:
    """The overlay top-level module an import refers to, if any."""
    if level == 0:
        return name.split(".")[1] if name.startswith("overlay.") else None
    base = path.parent
    for _ in range(level - 1):
        base = base.parent
    target = (base / name.replace(".", "/")) if name else base
    try:
        return target.relative_to(ROOT).parts[0].removesuffix(".py")
    except (ValueError, IndexError):
        return None


def test_every_module_has_a_layer():
    missing = {top_module(p) for p in ROOT.rglob("*.py")} - set(LAYERS)
    assert not missing, f"add these to LAYERS: {missing}"


def test_imports_point_down():
    bad = []
    for path in ROOT.rglob("*.py"):
        me = top_module(path)
        for name, level in imports(path):
            dep = resolve(path, name, level)
            if dep and dep != me and LAYERS.get(dep, 99) > LAYERS[me]:
                bad.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert not bad, bad


def test_cores_do_no_io():
    for path in (ROOT / "core").rglob("*.py"):
        for name, level in imports(path):
            if level == 0:
                assert name.split(".")[0] not in IO_LIBS, f"{path.name} imports {name}"


def test_only_crypto_imports_nacl():
    for path in ROOT.rglob("*.py"):
        if path.name == "crypto.py" or path.parts[-2] == "net":
            continue  # the libp2p adapter hands key bytes to libp2p's own crypto
        for name, level in imports(path):
            if level == 0:
                assert not name.startswith(("nacl", "cryptography")), f"{path} imports {name}"


def test_overlay_never_imports_bootstrap_except_the_cli():
    for path in ROOT.rglob("*.py"):
        if path.name in ("cli.py", "cli_send.py"):
            continue  # the command line is the composition root
        for name, level in imports(path):
            assert not (level == 0 and name.startswith("bootstrap")), path


def test_public_surface_is_pinned():
    assert sorted(overlay.__all__) == sorted(
        [
            "Config",
            "DecodeError",
            "Home",
            "LocalError",
            "Node",
            "NodeId",
            "OnionKey",
            "OverlayError",
            "Reason",
            "RemoteError",
            "Role",
            "SigningKey",
            "ValidRecord",
            "decode_record",
            "validate_record",
        ]
    )
    for name in overlay.__all__:
        assert getattr(overlay, name) is not None
