"""longhaul: durable background jobs for long-horizon AI agent tasks."""

from __future__ import annotations

from longhaul.models import LonghaulError, TaskStatus, TaskStore
from longhaul.worker import cancel, enqueue, rerun, resume, run_inline, wait_for

__all__ = ["enqueue", "run_inline", "resume", "cancel", "rerun", "wait_for", "TaskStatus", "TaskStore", "LonghaulError"]
