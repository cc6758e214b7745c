"""Entry point for ``dramatiq longhaul.worker.actors`` (what the Procfile runs).

Importing this module builds the process's runtime from the environment,
imports the app modules named by `LONGHAUL_APP` (the user's agents, tools
and providers, see `apps`) and makes its broker Dramatiq's global broker,
all before the process takes a message. If the store cannot be opened
(see `models.TaskStore`) or an app module cannot be imported, the process
logs why in one line and exits with code 2.
"""

from __future__ import annotations

import logging
import sys

from longhaul.models import LonghaulError

from .runtime import wire_worker_process

#: Exit code of a worker process that cannot open its store or import an app (Dramatiq's "import failed").
EXIT_CANNOT_START = 2

try:
    runtime = wire_worker_process()
except LonghaulError as exc:
    # A schema newer than this code, an unreachable database, a bad setting:
    # one clear line and a non-zero exit, not a traceback per worker process.
    logging.getLogger(__name__).critical("cannot start a longhaul worker: %s", exc)
    sys.exit(EXIT_CANNOT_START)
broker = runtime.broker
run_task = runtime.actor

__all__ = ["broker", "run_task", "runtime"]
