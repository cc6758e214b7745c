"""Named fault points: ``LONGHAUL_FAULT_AT=<point>`` makes the process SIGKILL itself exactly there.

For crash tests, which must kill a worker at one exact place in a step and
then count exactly what ran twice (instead of killing from outside at
roughly the right time and asserting bounds). The variable is read once,
when this module is imported; unset, `fault_point` is a function that does
nothing, so the step loop pays one empty call per point. Only the first
time the point is reached kills: a process dies once. `Settings` refuses a
name not in `FAULT_POINTS` (`LONGHAUL_FAULT_AT: ...`).

The points, in a step's order:

- ``after_answer_journaled``: the model's answer is committed, no tool has run;
- ``between_tools``: a result of a one-at-a-time answer is committed, the next call has not started;
- ``in_parallel_batch``: the first result of a parallel batch is committed, the others still run;
- ``before_checkpoint``: every tool has returned; the last result and the checkpoint are not committed.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

#: Every point `LONGHAUL_FAULT_AT` may name.
FAULT_POINTS = ("after_answer_journaled", "between_tools", "in_parallel_batch", "before_checkpoint")

#: The point this process dies at, read once at import (None: none).
FAULT_AT = os.environ.get("LONGHAUL_FAULT_AT", "").strip() or None


def _kill_at(point: str) -> None:
    if point == FAULT_AT:
        sys.stderr.write(f"longhaul: LONGHAUL_FAULT_AT={point}: killing this process (pid {os.getpid()})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _nothing(point: str) -> None:
    return None


#: Call at each named point; SIGKILLs this process there when `LONGHAUL_FAULT_AT` names it.
fault_point: Callable[[str], None] = _kill_at if FAULT_AT is not None else _nothing
