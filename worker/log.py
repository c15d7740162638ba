"""structlog setup: JSON lines in production, a console renderer on a terminal.

Every line goes through the same renderer, ours and those of the libraries that log
through the standard library (aiormq and aio-pika on reconnects, asyncio's "exception was
never retrieved", asyncpg, Python warnings): in JSON mode each is one JSON object with
`logger`, `level` and `timestamp`, and a traceback is one `exception` field, never lines of
its own.

A library's line never carries a message: aiormq logs a returned publish it cannot match
with the whole message (`Unhandled message %r returning`), body and all, and a message is
personal data. Such a record's arguments are redacted, and an exception carrying a message
is reduced to its type (`_Redact`)."""

import dataclasses
import logging
import os
import sys
from types import TracebackType
from typing import Any, Literal, TextIO

import structlog

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
Level = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
Format = Literal["auto", "json", "console"]


def wants_color(stream: object) -> bool:
    """Colors on a terminal, unless NO_COLOR is set to anything (https://no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def configure(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Log to `stream` (standard error by default) at `level`, as `fmt` says."""
    stream = stream or sys.stderr
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}")
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=wants_color(stream))
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    stamped: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            *stamped,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=lambda name="": _NamedPrintLogger(stream, name),
        cache_logger_on_first_use=False,
    )
    # The libraries' own loggers: warnings and above (their info is every connection
    # attempt), rendered as ours are.
    handler = _Handler(stream)
    handler.addFilter(_Redact())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamped],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)  # configured again (the demo and tests do)
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.captureWarnings(True)  # warnings.warn(...) as one line of logger py.warnings
    # A crash (an exception nothing caught) is one line too, not a bare traceback.
    sys.excepthook = _log_crash if fmt == "json" else sys.__excepthook__


def _log_crash(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    get("leadrouter").critical("crashed", exc_info=(kind, error, tb))


class _Handler(logging.StreamHandler):
    """Ours, to replace on a second configure() and leave others' handlers alone."""


REDACTED = "<message withheld>"


class _Redact(logging.Filter):
    """Redacts what a library logs that is or holds a message (a body, aiormq's
    DeliveredMessage, aio-pika's messages) or could (any bytes): the record is kept, its
    text is not."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._redact(record)
        except Exception:  # whatever went wrong, the line says nothing it should not
            record.msg, record.args, record.exc_info, record.exc_text = REDACTED, (), None, None
        return True

    @staticmethod
    def _redact(record: logging.LogRecord) -> None:
        if isinstance(record.args, dict):
            if any(_carries_message(v) for v in record.args.values()):
                record.args = {k: _redacted(v) for k, v in record.args.items()}
        elif record.args and any(_carries_message(a) for a in record.args):
            record.args = tuple(_redacted(a) for a in record.args)
        if _carries_message(record.msg):
            record.msg, record.args = REDACTED, ()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            if any(_carries_message(a) for a in (*error.args, *vars(error).values())):
                record.exc_info = None
                record.exc_text = None
                record.msg = f"{record.getMessage()} ({type(error).__name__}: {REDACTED})"
                record.args = ()


def _carries_message(value: Any) -> bool:
    if isinstance(value, bytes | bytearray | memoryview):
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(
            isinstance(getattr(value, f.name, None), bytes) for f in dataclasses.fields(value)
        )
    return hasattr(value, "body") and isinstance(getattr(value, "body", None), bytes)


def _redacted(value: Any) -> Any:
    return REDACTED if _carries_message(value) else value


class _NamedPrintLogger(structlog.PrintLogger):
    """structlog's fast printer, with the name add_logger_name reads."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
