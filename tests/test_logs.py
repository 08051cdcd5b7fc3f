"""The daemon's log lines: one per record, an exception as its type and message."""

from __future__ import annotations

import logging

from agentnode.logs import OneLine


def _record(msg: str, exc: BaseException | None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("agentnode.x", logging.ERROR, __file__, 1, msg, (), info)


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:
        return e


def test_an_exception_is_its_type_and_message_on_the_same_line() -> None:
    fmt = OneLine("%(message)s")
    assert fmt.format(_record("cannot export", _raised(ValueError("bad\nvalue")))) == (
        "cannot export: ValueError: bad value"
    )
    assert fmt.format(_record("sweep failed", _raised(KeyError()))) == "sweep failed: KeyError"
    assert fmt.format(_record("two\nlines", None)) == "two lines"


def test_the_record_keeps_its_exception_for_other_handlers() -> None:
    record = _record("x", _raised(OSError(28, "No space left on device")))
    assert OneLine("%(message)s").format(record) == "x: OSError: [Errno 28] No space left on device"
    assert record.exc_info is not None and "Traceback" in logging.Formatter().format(record)
