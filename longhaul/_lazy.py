"""Package faces whose names load on first use.

A face (``longhaul``, ``longhaul.worker``) names its exports and the module
each comes from; a name's module is imported when the name is first read.
Importing one part of longhaul (a provider, a tool, the store) therefore
imports that part and what it needs, not every module a face lists.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` serving `homes` (name -> absolute module name).

    A loaded name is stored in the package's namespace, so the lookup runs
    once per name.
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(home), name)
        setattr(import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(import_module(package)), *homes})

    return __getattr__, __dir__
