"""What trace events cost the step loop: steps per second with traces on and off.

Runs one scripted task of N zero-delay steps (the ledger tool, no ledger
file) through the real step loop, synchronously in this process
(`execute_task` on an embedded runtime, so no broker hand-off or polling is
timed), once with ``LONGHAUL_TRACES`` on and once off, for several
repetitions, alternating the order so drift hits both alike. Each run gets
a fresh SQLite file. Prints, per mode, the best run's steps/s (the one least
disturbed by other processes) and the median, the on/off ratio of each and
the extra cost per step in microseconds. Nothing here asserts on timings;
it prints figures for a reader to judge.

    python bench/trace_overhead.py            # about 20 s
    python bench/trace_overhead.py --quick    # about 6 s
    python bench/trace_overhead.py --json     # the figures, for scripts
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from command_line import bench_main  # noqa: E402

from longhaul.models import TaskStatus  # noqa: E402
from longhaul.worker import Runtime, api, load_settings, set_runtime  # noqa: E402
from longhaul.worker.execute import execute_task  # noqa: E402


@dataclass(frozen=True)
class Plan:
    steps: int  # steps of the one task each run executes
    repetitions: int  # runs per mode


FULL = Plan(steps=1_000, repetitions=9)
QUICK = Plan(steps=500, repetitions=5)


@dataclass(frozen=True)
class Run:
    steps_per_s: float
    trace_events: int


def one_run(workdir: Path, name: str, *, traces: bool, steps: int) -> Run:
    """Time one task of `steps` steps from its first claim to its end."""
    settings = load_settings(database_url=f"sqlite:///{workdir / name}.db", redis_url=None, traces=traces)
    runtime = Runtime(settings, embedded=True)
    set_runtime(runtime)
    try:
        task_id = api.submit(runtime, "trace overhead", task_id=name, steps=steps)
        gc.collect()
        started = time.perf_counter()
        status = execute_task(runtime, task_id)
        elapsed_s = time.perf_counter() - started
        summary = runtime.store.summary(task_id)
        assert status is TaskStatus.COMPLETED and summary.checkpoint_count == steps, summary.last_error
        rows = len(runtime.store.traces(task_id))
        return Run(steps_per_s=steps / elapsed_s, trace_events=rows)
    finally:
        set_runtime(None)
        runtime.stop_embedded_worker()
        runtime.store.close()


def measure(plan: Plan) -> dict[str, Any]:
    runs: dict[str, list[Run]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="longhaul-trace-bench-") as tmp:
        workdir = Path(tmp)
        one_run(workdir, "warm-up", traces=True, steps=min(plan.steps, 50))  # imports, first connections
        for rep in range(plan.repetitions):
            order = ("on", "off") if rep % 2 == 0 else ("off", "on")
            for mode in order:
                runs[mode].append(one_run(workdir, f"{mode}-{rep}", traces=mode == "on", steps=plan.steps))
    result: dict[str, Any] = {"steps_per_task": plan.steps, "repetitions": plan.repetitions}
    for name, pick in (("best", max), ("median", statistics.median)):
        on = pick(run.steps_per_s for run in runs["on"])
        off = pick(run.steps_per_s for run in runs["off"])
        result[name] = {"traces_on_steps_per_s": round(on, 1), "traces_off_steps_per_s": round(off, 1),
                        "ratio_on_off": round(on / off, 3), "cost_ratio_on_off": round(off / on, 3),
                        "extra_us_per_step": round((1 / on - 1 / off) * 1e6, 1)}
    result["trace_events_per_task"] = {mode: runs[mode][0].trace_events for mode in runs}
    result["samples_steps_per_s"] = {mode: [round(run.steps_per_s, 1) for run in runs[mode]] for mode in runs}
    return result


def report(result: dict[str, Any]) -> None:
    rows = result["trace_events_per_task"]
    print(f"step loop, one scripted task of {result['steps_per_task']} zero-delay steps, "
          f"{result['repetitions']} runs per mode (trace events per task: on {rows['on']}, off {rows['off']})")
    print(f"  {'':<8}{'on steps/s':>12}{'off steps/s':>13}{'on/off':>9}{'cost on/off':>13}{'extra us/step':>15}")
    for name in ("best", "median"):
        row = result[name]
        print(f"  {name:<8}{row['traces_on_steps_per_s']:>12.1f}{row['traces_off_steps_per_s']:>13.1f}"
              f"{row['ratio_on_off']:>9.3f}{row['cost_ratio_on_off']:>12.3f}x{row['extra_us_per_step']:>15.1f}")
    samples = result["samples_steps_per_s"]
    print(f"  samples (steps/s): on {samples['on']}")
    print(f"                     off {samples['off']}")
    cost = result["median"]["cost_ratio_on_off"]
    print(f"  target: the cost of a step with traces on <= 1.2x of off; median here {cost:.2f}x")


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, lambda quick: measure(QUICK if quick else FULL), report,
               quick_help="fewer, shorter runs (under 15 s)", argv=argv)


if __name__ == "__main__":
    main()
