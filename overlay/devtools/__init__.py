"""Developer tools: multi-process overlays on loopback (``cluster``) and the local demo
(``demo``, behind ``overlay demo``). Not used by a running node."""
