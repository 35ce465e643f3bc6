"""Structured logs: one JSON object per line on stderr, so log pipelines need no parsing rules.

Its own handler rather than BentoML's text format, which would wrap each object in a timestamp
prefix and a trace suffix.
"""

from __future__ import annotations

import json
import logging
import sys
import time

logger = logging.getLogger("classic_cnns.serving")


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        return json.dumps({"ts": stamp, "level": record.levelname.lower(), **record.msg}, default=str)


def log_event(event: str, level: int = logging.INFO, **fields) -> None:
    if not logger.handlers:  # configured on first use: `bentoml serve` sets up logging after imports
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonLines())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if logger.isEnabledFor(level):
        # makeRecord + handle, not logger.log: that would walk the stack for a file and line the
        # JSON never shows, on every request.
        logger.handle(logger.makeRecord(logger.name, level, "", 0, {"event": event, **fields}, None, None))
