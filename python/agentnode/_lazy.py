"""Package exports that load on first use, so that importing one light submodule (say
`agentnode.egress.policy` for the CLI's option checks) does not import its heavy siblings
(dnspython's async stack, aiohttp) through the package's `__init__`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from typing import Any

__all__ = ["exports"]


def exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports each of `names` (name -> submodule,
    relative to `package`) from its submodule when first asked for."""

    def getattr_(name: str) -> Any:
        submodule = names.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib  # here: a command that asks for no export needs none (~0.4 ms)

        return getattr(importlib.import_module(f"{package}.{submodule}"), name)

    return getattr_
