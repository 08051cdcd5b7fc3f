"""A command's options, parsed without argparse when the command line is plain.

Each command module declares its options once, in `add_parser(sub)`, for argparse. `parse`
hands that function a recorder in argparse's place (the part of argparse's API the commands
use: `add_parser`, `add_argument_group`, `add_argument`, `set_defaults`) and parses the command
line from the record when every word is one argparse reads only one way: an exact long option
(its value the next word, or after `=`), and from the first word that is no option on, the
words of a `REMAINDER` positional (`-- CMD ARGS`). For anything else (`--help`, an
abbreviation, a short option, a value that starts with `-`, a choice not offered, an option
kind or keyword not recorded here) it returns None and argparse parses the line, errors
included: this path never decides what is an error. `tests/test_cli_quick.py` checks that both
give the same namespace.

Why: argparse, with the `re`, `gettext` and `locale` it imports and the parser it builds, was
~4 ms of the ~50 of `agentnode exec -- /bin/true` (docs/design/cli-speed.md).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

__all__ = ["parse"]

#: argparse.REMAINDER, which the declarations name by value (importing argparse is the cost
#: this module saves).
REMAINDER = "..."
#: What `add_parser` may be told without changing how its command line parses.
_PARSER_WORDS = frozenset({"help", "description", "epilog", "usage", "formatter_class"})
#: What `add_argument` may be told; any other keyword (type, nargs, const, required...) leaves
#: the command to argparse.
_OPTION_WORDS = frozenset({"action", "default", "choices", "dest", "metavar", "help"})
#: argparse's default of an option's value, by action.
_DEFAULTS = {"store": None, "store_true": False, "append": None}


class _Unsupported(Exception):
    """A command module asked the recorder for something only argparse has."""


class _Parser:
    """One command's declarations, as the recorder's `add_parser` returned them."""

    __slots__ = ("defaults", "option_defaults", "options", "plain", "remainder")

    def __init__(self) -> None:
        #: Long option string -> (dest, action, choices).
        self.options: dict[str, tuple[str, str, object]] = {}
        #: `set_defaults`'s values, and each option's dest's value when it is not given (as
        #: argparse has them: an option's own default wins, set_defaults changes it).
        self.defaults: dict[str, object] = {}
        self.option_defaults: dict[str, object] = {}
        #: The dest of the REMAINDER positional, if declared.
        self.remainder: str | None = None
        #: Whether every declaration is one `parse` reads as argparse does.
        self.plain = True

    def __getattr__(self, name: str) -> NoReturn:
        raise _Unsupported(name)

    def add_argument_group(self, *_: object, **__: object) -> _Parser:
        return self  # a group only changes the help's layout

    def add_argument(self, *names: str, **kwargs: object) -> None:
        if not names[0].startswith("-"):  # a positional: only one, the REMAINDER
            words = set(kwargs) <= {"nargs", "metavar", "help"}
            if not words or kwargs.get("nargs") != REMAINDER or self.remainder is not None:
                self.plain = False
            self.remainder = names[0]
            return
        action = kwargs.get("action") or "store"
        if not set(kwargs) <= _OPTION_WORDS or action not in _DEFAULTS:
            self.plain = False
            return
        longs = [n for n in names if n.startswith("--")]
        # argparse's dest: the first long option, without its dashes, '-' as '_'.
        dest = kwargs.get("dest") or (longs or names)[0].lstrip("-").replace("-", "_")
        default = (
            kwargs["default"]
            if "default" in kwargs
            else self.defaults.get(str(dest), _DEFAULTS[str(action)])
        )
        self.option_defaults.setdefault(str(dest), default)
        for name in longs:  # short forms are not recorded: typed, they go to argparse
            self.options[name] = (str(dest), str(action), kwargs.get("choices"))

    def set_defaults(self, **kwargs: object) -> None:
        self.defaults.update(kwargs)
        for dest in self.option_defaults.keys() & kwargs.keys():
            self.option_defaults[dest] = kwargs[dest]

    def parse(self, words: Sequence[str]) -> SimpleNamespace | None:
        """The namespace argparse would make of `words` (the command line after the command's
        name), or None when argparse should look at them itself."""
        if not self.plain:
            return None
        values = {**self.defaults, **self.option_defaults}
        i = 0
        while i < len(words):
            word = words[i]
            if word == "--" or not word.startswith("-"):
                if self.remainder is None:
                    return None
                break
            name, eq, value = word.partition("=")
            option = self.options.get(name)
            if option is None:
                return None
            dest, action, choices = option
            if action == "store_true":
                if eq:
                    return None
                values[dest] = True
            else:
                if not eq:
                    i += 1
                    if i == len(words) or words[i].startswith("-"):
                        return None
                    value = words[i]
                elif value == "--":  # argparse drops it, leaving an empty list as the value
                    return None
                if choices is not None and value not in choices:  # type: ignore[operator]
                    return None
                if action == "append":
                    before = values[dest]
                    values[dest] = [*(before if isinstance(before, list) else ()), value]
                else:
                    values[dest] = value
            i += 1
        rest = words[i:]
        # argparse reads every word before a "--" as a possible option, the REMAINDER's too,
        # and refuses an ambiguous abbreviation there: only exact options pass here.
        for word in rest[: rest.index("--") if "--" in rest else len(rest)]:
            if word[:1] == "-" and word.partition("=")[0] not in self.options:
                return None
        if self.remainder is not None:
            # argparse keeps a leading "--" in a REMAINDER's words; the command drops it.
            values[self.remainder] = list(rest)
        return SimpleNamespace(**values)


class _Commands:
    """The recorder in place of argparse's subparsers action."""

    __slots__ = ("parsers",)

    def __init__(self) -> None:
        self.parsers: dict[str, _Parser] = {}

    def __getattr__(self, name: str) -> NoReturn:
        raise _Unsupported(name)

    def add_parser(self, name: str, **kwargs: object) -> _Parser:
        parser = self.parsers[name] = _Parser()
        parser.plain = set(kwargs) <= _PARSER_WORDS
        return parser


def parse(module: str, words: Sequence[str]) -> SimpleNamespace | None:
    """The namespace argparse would make of `words` (a command line from the command's name
    on) with the options `module`'s `add_parser` declares; None when argparse must parse it."""
    commands = _Commands()
    try:
        # importlib.import_module's work, without importing importlib (and warnings) for it.
        __import__(module)
        sys.modules[module].add_parser(commands)
    except _Unsupported:
        return None
    parser = commands.parsers.get(words[0]) if words else None
    return None if parser is None else parser.parse(words[1:])
