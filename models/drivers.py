"""The PostgreSQL driver, imported only when a PostgreSQL store is opened.

peewee imports psycopg at its own import when it can, which costs a
SQLite-only process (every ``longhaul`` command on the default store) about
70-150 ms of start-up for a driver it never uses. `import_peewee` imports
peewee with psycopg hidden, and `load_psycopg` hands peewee the driver the
first time a PostgreSQL store opens: the same module globals and adapter
constants peewee would have set itself (peewee 4's ``Psycopg3Adapter``).
A process that imported psycopg (or peewee) before longhaul keeps peewee's
own wiring; `load_psycopg` then changes nothing.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Optional


def import_peewee() -> ModuleType:
    """peewee, imported without psycopg unless psycopg is already loaded."""
    if "peewee" in sys.modules:
        return sys.modules["peewee"]
    hide = "psycopg" not in sys.modules
    if hide:
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # `import psycopg` raises ImportError
    try:
        return importlib.import_module("peewee")
    finally:
        if hide and sys.modules.get("psycopg", ...) is None:
            del sys.modules["psycopg"]


def load_psycopg() -> ModuleType:
    """psycopg, imported and wired into peewee (idempotent); ImportError if it is not installed."""
    import psycopg
    from psycopg.pq import TransactionStatus
    from psycopg.types.json import Json, Jsonb

    peewee = import_peewee()
    if getattr(peewee, "psycopg", None) is None:
        peewee.psycopg = psycopg  # type: ignore[attr-defined]
        peewee.TransactionStatus = TransactionStatus  # type: ignore[attr-defined]
        peewee.Json_pg3, peewee.Jsonb_pg3 = Json, Jsonb  # type: ignore[attr-defined]
        adapter = peewee.Psycopg3Adapter  # type: ignore[attr-defined]
        adapter.txn_idle = TransactionStatus.IDLE
        adapter.txn_inerror = TransactionStatus.INERROR
        adapter.txn_unknown = TransactionStatus.UNKNOWN
    return psycopg


def loaded_psycopg() -> Optional[ModuleType]:
    """psycopg if this process imported it, else None (then no psycopg error can have been raised)."""
    module = sys.modules.get("psycopg")
    return module if isinstance(module, ModuleType) else None


# On import, before any other module of the store imports peewee (`models/__init__.py` imports this first).
import_peewee()

__all__ = ["import_peewee", "load_psycopg", "loaded_psycopg"]
