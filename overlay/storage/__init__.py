"""Persistence: the node's SQLite stores on one base, and atomic file writes.

- ``sqlite``: ``SqliteStore``, how every store opens, migrates, locks and
  commits;
- ``records``: ``RecordStore``, the newest valid membership record per node;
- ``outbox``: ``OutboxStore``, the client's messages and SURB secrets;
- ``delivery_queue``: ``DeliveryQueue``, what an exit accepted, until delivered;
- ``replay``: ``ReplayStore``, the relay's replay tags per onion-key epoch;
- ``files``: ``write_atomic``, the one way a file is replaced.
"""
