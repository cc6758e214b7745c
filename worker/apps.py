"""App modules: the user's code (agents, tools, providers) imported into every longhaul process.

A worker can only run a tool or provider that its own process registered,
so the modules that register them are named once, with ``--app MODULE`` on
any CLI command or ``LONGHAUL_APP`` (comma-separated), and imported in the
CLI process and in every worker process before it takes a message (see
`longhaul.worker.actors`). The working directory goes first on `sys.path`,
as ``dramatiq`` does, so ``--app myapp`` finds ``./myapp.py``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Iterable

from longhaul.models import InvalidInput

from .errors import APP_ENV_VAR, AppImportError


def parse_app_modules(value: str | Iterable[str] | None) -> list[str]:
    """Module names from a comma-separated string (or several), blanks dropped, first mention kept."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in v.split(",")]
    names: list[str] = []
    for part in parts:
        name = part.strip()
        if name and name not in names:
            names.append(name)
    return names


def import_apps(modules: Iterable[str]) -> list[str]:
    """Import each module once (a repeat is a no-op); returns their names.

    Raises `AppImportError` naming the module and the error (its type and
    message, never a traceback) for the first one that fails.
    """
    names = list(modules)
    cwd = os.getcwd()
    if names and cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in names:
        try:
            importlib.import_module(name)
        except InvalidInput as exc:  # e.g. two agents with one name: already a clear message
            raise AppImportError(name, str(exc)) from None
        except Exception as exc:  # anything the user's module raises while importing
            raise AppImportError(name, f"{type(exc).__name__}: {exc}") from None
    return names


def add_to_environment(modules: Iterable[str]) -> None:
    """Add modules to `LONGHAUL_APP` of this process's environment, so processes it starts import them too.

    (The environment, not the settings: a child process reads its own.)
    """
    merged = parse_app_modules([os.environ.get(APP_ENV_VAR, ""), *modules])
    if merged:
        os.environ[APP_ENV_VAR] = ",".join(merged)
