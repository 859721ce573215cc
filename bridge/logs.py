"""Logging through structlog: JSON lines for journald, key=value on a terminal, secrets never written."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Keys whose values are never written, whatever a caller passes by mistake.
SECRET_KEYS = frozenset({"access_token", "token", "key", "postback_key", "email", "phone", "authorization"})


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in SECRET_KEYS.intersection(event_dict):
        event_dict[name] = "[redacted]"
    return event_dict


def configure(stream: TextIO | None = None, json: bool | None = None, level: int = logging.INFO) -> None:
    """Set up structlog once per process; `json` defaults to "not a terminal" (journald, files, pipes)."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # aiohttp's access log is one line per request: a flood under load, and it carries query strings
    # with postback keys. The bridge logs one line per outcome instead.
    logging.getLogger("aiohttp.access").disabled = True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
