"""Seed bundles for Hydra bootstrap operators (``overlay-seeds``).

Layering: imports only ``overlay.errors``, ``overlay.crypto`` and
``overlay.wire.cbor`` (the one strict CBOR decoder) from the overlay package,
never the node runtime; the node receives bundle peers as
data (``FetchResult.join_addrs()``).
"""

from .bundle import MAX_SIZE as MAX_SIZE
from .bundle import VERSION as VERSION
from .bundle import Entry as Entry
from .bundle import SeedBundle as SeedBundle
from .bundle import UnverifiedBundle as UnverifiedBundle
from .bundle import ValidBundle as ValidBundle
from .bundle import VerifiedBundle as VerifiedBundle
from .bundle import decode as decode
from .bundle import encode as encode
from .fetch import FetchResult as FetchResult
from .fetch import fetch_bundle as fetch_bundle
from .fetch import parse_source as parse_source
from .resolve import SourceError as SourceError
from .resolve import SourceReport as SourceReport
