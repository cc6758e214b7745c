"""Entry point for ``dramatiq worker.actors`` (what the Procfile runs).

Importing this module builds the process's runtime from the environment
and makes its broker Dramatiq's global broker.
"""

from __future__ import annotations

import dramatiq

from .runtime import get_runtime

runtime = get_runtime()
broker = runtime.broker
run_task = runtime.actor
dramatiq.set_broker(broker)

__all__ = ["broker", "run_task", "runtime"]
