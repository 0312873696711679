"""``overlay demo``: a local demonstration that needs no set-up."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core.membership import MembershipView
from .home import Home
from .records import validate


def run_record_demo(console: Console) -> int:
    """Create three node homes, exchange their records and verify them."""
    with tempfile.TemporaryDirectory(prefix="hydra-demo-") as tmp:
        homes = []
        for i, roles in enumerate((["entry", "relay"], ["relay"], ["exit"])):
            h = Home.init(
                Path(tmp) / f"node{i}",
                roles=roles,
                listen=[f"/ip4/127.0.0.1/tcp/{47001 + i}"],
            )
            homes.append(h)
        view = MembershipView()
        table = Table(title="membership records")
        for col in ("peer id", "roles", "seq", "feeds", "bytes", "verified"):
            table.add_column(col)
        now = time.time()
        for h in homes:
            raw = h.make_record(now=now).encode()
            rec = validate(raw, now)
            view.offer(raw, now)
            table.add_row(
                rec.node_id.peer_id(),
                ",".join(rec.roles.names()),
                str(rec.seq),
                "\n".join(rec.feeds),
                str(len(raw)),
                "[green]yes[/green]",
            )
        console.print(table)
        forged = bytearray(homes[2].make_record(now=now).encode())
        forged[-5] ^= 1
        try:
            view.offer(bytes(forged), now)
            console.print("[red]forged record accepted![/red]")
            return 1
        except Exception as e:  # noqa: BLE001 - displayed to the user
            console.print(f"forged record rejected: [yellow]{e}[/yellow]")
        console.print(f"view holds {len(view)} records")
    return 0
