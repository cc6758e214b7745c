"""The modules behind ``longhaul``'s commands, loaded when a command first uses them.

Importing the CLI (every ``longhaul`` invocation, ``--help`` included) then
costs click and the store's schemas, not the runtime, Dramatiq, redis-py,
httpx and pydantic-settings that only some commands need. Each name below is
a real module object whose body runs on its first attribute access
(`importlib.util.LazyLoader`); a module something imported already is
returned as it is.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """The module `name`, its body executed on first attribute access (at once if it is already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


admin = lazy_module("longhaul.worker.admin")
api = lazy_module("longhaul.worker.api")
apps = lazy_module("longhaul.worker.apps")
bulk = lazy_module("longhaul.worker.bulk")
health_checks = lazy_module("longhaul.worker.health")
settings = lazy_module("longhaul.worker.settings")
worker_errors = lazy_module("longhaul.worker.errors")

__all__ = ["admin", "api", "apps", "bulk", "health_checks", "lazy_module", "settings", "worker_errors"]
