"""Entry point for ``dramatiq longhaul.worker.actors`` (what the Procfile runs).

Importing this module builds the process's runtime from the environment
and makes its broker Dramatiq's global broker. If the store cannot be
opened (see `models.TaskStore`), the process logs why and exits with
code 2.
"""

from __future__ import annotations

import logging
import sys

import dramatiq

from longhaul.models import LonghaulError

from .runtime import get_runtime

#: Exit code of a worker process that cannot open its store (Dramatiq's "import failed").
EXIT_CANNOT_START = 2

try:
    runtime = get_runtime()
except LonghaulError as exc:
    # A schema newer than this code, an unreachable database, a bad setting:
    # one clear line and a non-zero exit, not a traceback per worker process.
    logging.getLogger(__name__).critical("cannot start a longhaul worker: %s", exc)
    sys.exit(EXIT_CANNOT_START)
broker = runtime.broker
run_task = runtime.actor
dramatiq.set_broker(broker)

__all__ = ["broker", "run_task", "runtime"]
