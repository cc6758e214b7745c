"""longhaul's worker: Dramatiq actors that run agent tasks step by step.

Data flows enqueue (`api`) -> actor (`broker`, `execute`) -> step loop
(`loop`) -> checkpoint (`models.TaskStore`) -> resume (`recovery`).

The names below are loaded when first used, so importing one part (a
provider, a tool) imports that part and what it needs, not the API and
the runtime that wires every part of a process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from longhaul._lazy import lazy_exports

if TYPE_CHECKING:
    from .api import (
        Progress,
        cancel,
        enqueue,
        rerun,
        resume,
        resume_interrupted,
        run_inline,
        submit,
        wait_for,
    )
    from .errors import BrokerRequired, SettingsError, TaskBusy, TaskExists
    from .runtime import Runtime, get_runtime, set_runtime
    from .settings import Settings, load_settings

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["Progress", "cancel", "enqueue", "rerun", "resume",
                     "resume_interrupted", "run_inline", "submit", "wait_for"], f"{__name__}.api"),
    **dict.fromkeys(["Runtime", "get_runtime", "set_runtime"], f"{__name__}.runtime"),
    **dict.fromkeys(["Settings", "load_settings"], f"{__name__}.settings"),
    **dict.fromkeys(["BrokerRequired", "SettingsError", "TaskBusy", "TaskExists"], f"{__name__}.errors"),
})

__all__ = [
    # Python API
    "enqueue", "run_inline", "resume", "resume_interrupted", "rerun", "cancel", "submit", "wait_for",
    "Progress",
    # Runtime and settings
    "Runtime", "get_runtime", "set_runtime", "Settings", "load_settings",
    # Errors
    "BrokerRequired", "SettingsError", "TaskBusy", "TaskExists",
]
