"""Small file helpers: atomic writes, size-capped reads, operator key files.

Operator key file format (text, written 0600)::

    # Hydra seed-bundle operator key (Ed25519 seed). Keep it secret.
    # public key: <64 hex digits>
    <64 hex digits: the 32-byte Ed25519 seed>

A file holding exactly the 32 raw seed bytes is accepted too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from overlay.crypto import SigningKey
from overlay.errors import LocalError
from overlay.storage.files import write_atomic

KEY_FILE_MAX = 4096


def read_capped(path: Path, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of ``path`` (so callers can tell "too big")."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


def write_key_file(path: Path, key: SigningKey, *, force: bool = False) -> None:
    """Store an operator key 0600. Refuses to replace an existing file unless ``force``."""
    text = (
        "# Hydra seed-bundle operator key (Ed25519 seed). Keep it secret.\n"
        f"# public key: {key.node_id.hex()}\n"
        f"{key.seed().hex()}\n"
    )
    try:
        write_atomic(Path(path), text.encode("ascii"), mode=0o600, overwrite=force)
    except FileExistsError:
        raise LocalError(f"{path} exists; use --force to replace it") from None


def read_key_file(path: Path) -> SigningKey:
    """Load an operator key written by ``write_key_file`` (or 32 raw bytes)."""
    path = Path(path)
    try:
        data = read_capped(path, KEY_FILE_MAX)
        mode = os.stat(path).st_mode
    except OSError as e:
        raise LocalError(f"cannot read key file {path}: {e.strerror or e}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise LocalError(f"key file {path} is readable by others; chmod 600 it")
    if len(data) == SigningKey.SIZE:
        return SigningKey(data)
    try:
        lines = [
            ln.strip()
            for ln in data.decode("ascii").splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
        if len(lines) != 1 or len(lines[0]) != 64:
            raise ValueError
        return SigningKey(bytes.fromhex(lines[0]))
    except ValueError:
        raise LocalError(f"{path} is not an operator key file") from None
