"""``python -m overlay.testing.netns`` (what ``scripts/netns-lab`` runs)."""

import sys

from .cli import main

sys.exit(main())
