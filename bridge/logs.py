"""Logging through structlog: JSON lines for journald, key=value on a terminal, secrets never written."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json as _json  # `json` is configure()'s argument
import logging
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

# Keys whose values are never written, at any depth, whatever a caller passes by mistake.
SECRET_KEYS = frozenset(
    {
        "access_token",
        "access-token",
        "token",
        "metrics_token",
        "key",
        "postback_key",
        "authorization",
        "password",
        "secret",
        "email",
        "phone",
    }
)
REDACTED = "[redacted]"

# Libraries log through the standard library (aiohttp's "Error handling request", asyncio's "Task
# exception was never retrieved"); below this level they only chatter.
LIBRARY_LEVEL = logging.WARNING


# Email and phone hashes (TikTok's `user.email: [sha256]`) are what the bridge sends and may be shown;
# anything else under those names could be a raw value and is not.
_HASHABLE_KEYS = frozenset({"email", "phone"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _secret(name: object) -> bool:
    return isinstance(name, str) and name.lower() in SECRET_KEYS


def _hashes(value: Any) -> bool:
    values = value if isinstance(value, list | tuple) else [value]
    return all(isinstance(v, str) and _SHA256.match(v) for v in values)


def _hidden(name: object, value: Any) -> bool:
    if not _secret(name):
        return False
    return not (str(name).lower() in _HASHABLE_KEYS and _hashes(value))


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if _hidden(k, v) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


# Names already known not to be secret. A line's names come from the code, a small fixed set, and a set
# lookup is cheaper than lowering and testing every name of every line (one per postback, under load).
_PLAIN_NAMES: set[str] = set()
_NESTED = (dict, list, tuple)


_ENCODERS: dict[Any, _json.JSONEncoder] = {}


def _dumps(obj: Any, *, default: Any = None, **options: Any) -> str:
    """json.dumps for the JSON renderer, with its encoder built once instead of once per line."""
    if options:
        return _json.dumps(obj, default=default, **options)
    encoder = _ENCODERS.get(default)
    if encoder is None:
        encoder = _ENCODERS[default] = _json.JSONEncoder(default=default)
    return encoder.encode(obj)


_second: tuple[int, str] = (0, "")


def _timestamp() -> str:
    """`2026-11-25T01:39:09.499754Z`: the time in UTC to the microsecond, the second formatted once."""
    global _second
    now = time.time()
    whole = int(now)
    second, text = _second
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{int((now - whole) * 1_000_000):06d}Z"


def _fields(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The line as written: secrets redacted at any depth, None left out, level and time added, a
    traceback as text. One step, not a chain of processors: the bridge logs a line per postback."""
    line: dict[str, Any] = {}
    for name, value in event_dict.items():
        if value is None:
            continue  # call sites pass every field a line can have; those that do not apply are left out
        if name not in _PLAIN_NAMES:
            if _secret(name):
                line[name] = REDACTED if _hidden(name, value) else value
                continue
            if len(_PLAIN_NAMES) < 1024:
                _PLAIN_NAMES.add(name)
        line[name] = _scrub(value) if isinstance(value, _NESTED) else value
    structlog.processors.add_log_level(logger, method_name, line)
    line["timestamp"] = _timestamp()
    if "exc_info" in line:
        structlog.processors.format_exc_info(logger, method_name, line)
    return line


class _Lines:
    """structlog's output: the lines logged during one turn of the event loop go out in one write.

    Under load the bridge logs a line per postback, and a write per line was a system call per
    request. Lines logged outside an event loop, and warnings and errors, are written at once (after
    whatever waits, so the order holds); the rest waits at most until the loop's next turn.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._waiting: list[str] = []
        self._lock = threading.Lock()

    def info(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.now(message)
            return
        with self._lock:
            self._waiting.append(message)
            if len(self._waiting) > 1:
                return  # a flush is scheduled already
        loop.call_soon(self.flush)

    def now(self, message: str) -> None:
        with self._lock:
            self._waiting.append(message)
            self._write()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        if self._waiting:
            text = "\n".join(self._waiting) + "\n"
            self._waiting.clear()
            self._stream.write(text)
            self._stream.flush()

    debug = msg = log = info
    warning = warn = error = err = critical = exception = fatal = failure = now


_LINES: _Lines | None = None


class _Setup:
    """What configure() set up, for Logger.info's short way; valid while structlog still uses it."""

    __slots__ = ("factory", "info", "lines", "processors", "renderer", "wrapper")

    def __init__(self, lines: _Lines, processors: list[Any], wrapper: Any, factory: Any, level: int) -> None:
        self.lines = lines
        self.processors = processors
        self.renderer = processors[-1]
        self.wrapper = wrapper
        self.factory = factory
        self.info = level <= logging.INFO

    def current(self) -> bool:
        config = structlog.get_config()
        processors = config["processors"]
        # Each part is checked on its own: structlog.configure() may replace any one of them and keep
        # the others, and capture_logs() changes the contents of the same processors list.
        return (
            processors is self.processors
            and len(processors) == 2
            and processors[0] is _fields
            and processors[1] is self.renderer
            and config["wrapper_class"] is self.wrapper
            and config["logger_factory"] is self.factory
        )


_SETUP: _Setup | None = None


class Logger:
    """A structlog logger whose info lines, the one per postback among them, take a short way.

    The line is the same (same steps, same renderer, same output); what is skipped is structlog's
    per-call machinery: a bound logger built for every call (loggers are not cached, so configure()
    can be called again), its context copied, the processor chain walked. That was about 4 of a
    postback's 7 µs of logging. Anything else, and everything while structlog is configured by
    someone else (a test's capture_logs), goes through structlog itself.
    """

    __slots__ = ("_structlog",)

    def __init__(self, name: str) -> None:
        self._structlog = structlog.get_logger(name)

    def info(self, event: str, **fields: Any) -> None:
        setup = _SETUP
        if setup is None or not setup.current():
            self._structlog.info(event, **fields)
            return
        if setup.info:
            fields["event"] = event  # last, as structlog puts it
            setup.lines.info(setup.renderer(None, "info", _fields(None, "info", fields)))

    def __getattr__(self, name: str) -> Any:
        if name == "_structlog":  # not set yet (copy.copy builds the object without __init__)
            raise AttributeError(name)
        return getattr(self._structlog, name)


# journald drops a service's lines beyond RateLimitBurst (10 000) in RateLimitIntervalSec (30 s), about
# 330 a second, and then drops its warnings and errors with the rest. Lines written once per request
# or per event are therefore capped, each kind on its own; what is over is counted and summed up in one
# line a second. /metrics counts every request, and the database keeps every conversion.
LINES_PER_SECOND = 100


class LineBudget:
    """At most `limit` lines of each per-request kind a second; one summary line for the ones skipped."""

    def __init__(self, limit: int = LINES_PER_SECOND, clock: Any = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._timer: asyncio.TimerHandle | None = None

    def allow(self, kind: str, label: str, *, error: bool = False) -> bool:
        """Whether a line of `kind` may be written now; if not, it is counted under `label`. The summary
        of error lines is an error too, of any other kind a warning."""
        state = self._kinds.get(kind)
        if state is None:
            state = self._kinds[kind] = _Kind(error=error)
        now = self.clock()
        if now >= state.window_end:
            self._summarise(kind, state)
            state.window_end = now + 1.0
            state.written = 0
        if state.written < self.limit:
            state.written += 1
            return True
        state.skipped[label] = state.skipped.get(label, 0) + 1
        if self._timer is None:
            # The burst may end here: the summary must not wait for a next line that never comes.
            with contextlib.suppress(RuntimeError):  # no event loop: the next allow() or flush() writes it
                self._timer = asyncio.get_running_loop().call_later(1.0, self.flush)
        return False

    def flush(self) -> None:
        """Write the summary of every kind that skipped lines (at the end of a burst, and at exit)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for kind, state in self._kinds.items():
            self._summarise(kind, state)

    def _summarise(self, kind: str, state: _Kind) -> None:
        if not state.skipped:
            return
        skipped, state.skipped = state.skipped, {}
        (_budget_log.error if state.error else _budget_log.warning)(
            "log lines skipped",
            kind=kind,
            lines=sum(skipped.values()),
            by=skipped,
            why=f"more than {self.limit} a second; /metrics counts every one",
        )


@dataclass(slots=True)
class _Kind:
    window_end: float = 0.0  # the end of the current second, by LineBudget.clock
    written: int = 0  # lines written in it
    skipped: dict[str, int] = field(default_factory=dict)  # since the last summary, by label
    error: bool = False  # the lines are errors


def flush() -> None:
    """Write out log lines that wait for the event loop's next turn (at exit)."""
    if _LINES is not None:
        _LINES.flush()


atexit.register(flush)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's records rendered like ours; a class of its own so configure() can replace it."""

    def emit(self, record: logging.LogRecord) -> None:
        flush()  # structlog's lines logged before this record come before it
        super().emit(record)


def configure(stream: TextIO | None = None, json: bool | None = None, level: int = logging.INFO) -> None:
    """Set up logging for the process; `json` defaults to "not a terminal" (journald, files, pipes).

    May be called again (tests do): the new stream and format replace the old ones.
    """
    global _LINES
    stream = stream or sys.stderr
    flush()
    lines = _LINES = _Lines(stream)
    if json is None:
        json = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    global _SETUP
    processors = [_fields, renderer]
    wrapper = structlog.make_filtering_bound_logger(level)

    def factory(*args: Any) -> _Lines:
        return lines

    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _SETUP = _Setup(lines, processors, wrapper, factory, level)

    handler = _Handler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, _fields],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, LIBRARY_LEVEL))
    # aiohttp's access log is one line per request: a flood under load, and it carries query strings
    # with postback keys. The bridge logs one line per outcome instead.
    logging.getLogger("aiohttp.access").disabled = True


def get_logger(name: str) -> Logger:
    return Logger(name)


_budget_log = get_logger("bridge.logs")
