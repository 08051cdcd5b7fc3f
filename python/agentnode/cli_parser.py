"""argparse as the `agentnode` command uses it: one-line usage errors (exit 2), help sized to
the terminal without shutil, and a `--version` that loads the version only when asked.

Loaded only when argparse has to parse: a plain command line (`agentnode exec -- CMD`) is
parsed from the same declarations by `agentnode.cli_quick`, without argparse (and its re,
gettext and locale imports, ~4 ms of a command's start).
"""

from __future__ import annotations

import argparse
import os
import sys

from agentnode.errors import UsageError

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = ["ArgumentParser", "Version"]


def _columns() -> int:
    """The terminal's width as `shutil.get_terminal_size` finds it ($COLUMNS, then stdout's
    terminal, else 80), without importing shutil, which brings bz2, lzma and zlib along:
    argparse asks for the width whenever it builds a formatter, which every option added does,
    and the import cost every command ~2 ms."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized by `_columns`."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        # argparse keeps two columns free (its `width -= 2`) when it finds the width itself.
        super().__init__(prog, indent_increment, max_help_position, width=_columns() - 2)


class Version(argparse.Action):
    """--version, which loads the version (from the Rust extension) only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        from agentnode import __version__

        print(f"agentnode {__version__}")
        parser.exit()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with agentnode's one-line usage errors (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")
