"""Structured logs: one JSON object per line on stderr, so log pipelines need no parsing rules.

Its own handler rather than BentoML's text format, which would wrap each object in a timestamp
prefix and a trace suffix. Events (start, warm-up, errors) go through ``logging`` and are written
at once. Request lines, one per request, are the exception: formatted on the event loop and
written in batches, at most :data:`FLUSH_S` late, since a write per request, through ``logging``,
cost a tenth of a small image's request under load. A normal shutdown writes what is pending; a
SIGKILL loses at most that much.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import time

logger = logging.getLogger("classic_cnns.serving")
FLUSH_S = 0.1


def _line(level: int, fields: dict, created: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"
    return json.dumps({"ts": stamp, "level": logging.getLevelName(level).lower(), **fields}, default=str)


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _line(record.levelno, record.msg, record.created)


def _configure() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def log_event(event: str, level: int = logging.INFO, **fields) -> None:
    if not logger.handlers:  # configured on first use: `bentoml serve` sets up logging after imports
        _configure()
    if logger.isEnabledFor(level):
        # makeRecord + handle, not logger.log: that would walk the stack for a file and line the
        # JSON never shows.
        logger.handle(logger.makeRecord(logger.name, level, "", 0, {"event": event, **fields}, None, None))


class _RequestLines:
    def __init__(self) -> None:
        self.pending: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None
        atexit.register(self.flush)

    def add(self, level: int, fields: dict) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # a new event loop (tests run several): the old one's timer is gone
            self.flush()
            self.loop = loop
        if self.timer is None:
            self.timer = loop.call_later(FLUSH_S, self.flush)
        self.pending.append(_line(level, fields, time.time()))

    def flush(self) -> None:
        self.timer = None
        if self.pending:
            lines, self.pending = self.pending, []
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()


_requests = _RequestLines()


def log_request(level: int = logging.INFO, **fields) -> None:
    """One request's line (event "request"), written with the others within FLUSH_S; call it on the event loop."""
    if not logger.handlers:
        _configure()
    if logger.isEnabledFor(level):
        _requests.add(level, {"event": "request", **fields})
