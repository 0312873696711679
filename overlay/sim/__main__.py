"""``python -m overlay.sim`` runs ``overlay sim`` (the same options)."""

import typer

from .cli import sim_command

if __name__ == "__main__":
    typer.run(sim_command)
