"""longhaul's worker: Dramatiq actors that run agent tasks step by step.

Data flows enqueue (`api`) -> actor (`broker`, `execute`) -> step loop
(`loop`) -> checkpoint (`models.TaskStore`) -> resume (`recovery`).
"""

from __future__ import annotations

from .api import (
    Progress,
    TaskBusy,
    TaskExists,
    cancel,
    enqueue,
    rerun,
    resume,
    resume_interrupted,
    run_inline,
    submit,
    wait_for,
)
from .runtime import BrokerRequired, Runtime, get_runtime, set_runtime
from .settings import Settings, SettingsError, load_settings

__all__ = [
    # Python API
    "enqueue", "run_inline", "resume", "resume_interrupted", "rerun", "cancel", "submit", "wait_for",
    "Progress",
    # Runtime and settings
    "Runtime", "get_runtime", "set_runtime", "Settings", "load_settings",
    # Errors
    "BrokerRequired", "SettingsError", "TaskBusy", "TaskExists",
]
