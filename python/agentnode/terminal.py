"""Text that others chose (a task's command and argv, a tenant's name, an MCP server's tool
names and descriptions), made safe to print on an operator's terminal."""

from __future__ import annotations

__all__ = ["visible"]

#: Each C0 and C1 control character and DEL, to its Python escape (`\n`, `\x1b`, `\x9b`).
_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}


def visible(text: str) -> str:
    """`text` with its control characters shown as escapes: printed, it can neither move the
    cursor, set the terminal's title or colours, nor start a line that looks like the
    printer's own."""
    return text.translate(_ESCAPES)
