"""The node's log: handlers, JSON lines, the level a SIGHUP changes, library noise."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path

from .util import BadInput

LIBRARY_LOGGERS = ("libp2p", "multiaddr", "hypercorn", "async_service", "aioquic", "websockets")
LIBRARY_BURST = 5  # library lines per message kind and minute shown at --log-level debug


class LogFilter(logging.Filter):
    """The node's log filter: the level (changeable by SIGHUP) and library noise.

    py-libp2p logs the routine failures of a churning overlay (a peer closing a
    relay stream: "Error reading from hop stream"; dial races) at WARNING and
    ERROR. Library lines below CRITICAL are demoted to DEBUG, so a volunteer's
    log holds only Hydra's own warnings, which say what to do; at debug level
    each kind of library line is still rate-limited to ``LIBRARY_BURST`` a
    minute, with a count of the lines left out.
    """

    def __init__(self, level: int, clock=time.monotonic) -> None:
        super().__init__()
        self.level = level
        self.clock = clock
        self._seen: dict[tuple[str, str], list] = {}  # kind -> [window start, shown, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        library = record.name.split(".")[0] in LIBRARY_LOGGERS
        if library and record.levelno < logging.CRITICAL:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if record.levelno < self.level:
            return False
        if not library:
            return True
        kind = (record.name, str(record.msg)[:40])
        now = self.clock()
        window = self._seen.get(kind)
        if window is None or now - window[0] >= 60.0:
            if len(self._seen) > 1000:
                self._seen.clear()
            dropped = window[2] if window else 0
            window = self._seen[kind] = [now, 0, 0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar lines left out in the last minute)"
        if window[1] >= LIBRARY_BURST:
            window[2] += 1
            return False
        window[1] += 1
        return True


def setup_logging(level: str, as_json: bool, log_file: Path | None = None) -> LogFilter:
    """Log to stderr (or ``log_file``, reopened when rotated) at ``level``; returns
    the filter, whose ``level`` a SIGHUP changes."""

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps(
                {
                    "ts": round(record.created, 3),
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "msg": record.getMessage(),
                }
            )

    handler: logging.Handler
    if log_file is not None:
        handler = logging.handlers.WatchedFileHandler(log_file)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    filt = LogFilter(logging.getLevelName(level.upper()))
    handler.addFilter(filt)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # py-libp2p gives its loggers no handler and stops propagation (so its lines
    # reached stderr through logging's last-resort handler); send them through ours
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.NOTSET)
    set_library_levels(filt.level)
    return filt


def set_library_levels(level: int) -> None:
    # below debug nothing of theirs is shown: do not even format it
    lib_level = logging.DEBUG if level <= logging.DEBUG else logging.CRITICAL
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(lib_level)


def check_log_file(path: Path) -> Path:
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise BadInput(f"--log-file {path}: {e.strerror}") from None
    return path
