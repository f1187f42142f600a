"""structlog as JSON lines on stderr; bind `job_id` (and anything else) per request with `bind`."""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog

_configured = False


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written (not when logging was configured): test runners and
    CLIs swap stderr, and a logger must never write to a closed stream."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "INFO") -> None:
    """Idempotent: every service entry point calls it once at start-up."""
    global _configured
    if _configured:
        return
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # structlog only calls write() and flush(), which is all _CurrentStderr has of TextIO.
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str, **context) -> structlog.typing.FilteringBoundLogger:
    """A lazy logger: safe at import time, it takes the configuration in force when it first logs."""
    return structlog.get_logger(logger_name=name, **context)
