"""The daemon's log: records of WARNING and above on stderr, one line each.

A record that carries an exception (`log.exception`, `exc_info=`) ends with the exception's
type and message instead of a traceback, as the CLI's errors do; `--debug` keeps tracebacks
(for bug reports)."""

from __future__ import annotations

import logging
import sys

__all__ = ["OneLine", "configure"]


class OneLine(logging.Formatter):
    """A record on one line, its exception as `: Type: message`."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        if exc is not None:
            text += f": {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
        return " ".join(text.splitlines())


def configure(*, debug: bool) -> None:
    """Sends WARNING and above to stderr, one line each (with tracebacks when `debug`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s") if debug else OneLine("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
