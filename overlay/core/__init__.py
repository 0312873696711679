"""Sans-I/O protocol cores: plain classes that take ``now`` and return effects.

Nothing under ``overlay.core`` imports trio, libp2p, sqlite or sockets.
"""
