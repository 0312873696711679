"""What a volunteer sees of a running node: the event ring, the last hour, the web console.

- ``events``: the bounded, numbered event ring (``Node.events``), sans-I/O;
- ``history``: the last hour, one sample per 10 s, sans-I/O;
- ``service``: the node service that samples and builds snapshots;
- ``web``: the page, its files and the event stream behind the control endpoint;
- ``watch``: ``overlay status --watch``.
"""

from .events import Event as Event
from .events import EventRing as EventRing
from .history import History as History
