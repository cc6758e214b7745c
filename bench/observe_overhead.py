"""What observing costs the step loop: steps per second with nothing, Prometheus metrics, and metrics + OTel spans.

Runs one scripted task of N zero-delay steps through the real step loop,
synchronously in this process (`execute_task` on an embedded runtime), per
mode: `off` (nothing observes: no wrapper is installed), `metrics` (the
Prometheus observer writing multiprocess files to a temporary folder, as a
worker under `longhaul worker --metrics-port` does) and `metrics+otel`
(also spans, batched to an exporter that drops them: the SDK's own cost,
not a network's). Modes alternate order per repetition; each run gets a
fresh SQLite file. Prints each mode's best and median steps/s and its cost
ratio against `off` measured in the same run. Nothing asserts on timings.

    python bench/observe_overhead.py            # about 25 s
    python bench/observe_overhead.py --quick    # about 8 s
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Before prometheus_client is imported: its value class is chosen then.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="longhaul-observe-bench-")

from command_line import bench_main  # noqa: E402

from longhaul.models import TaskStatus  # noqa: E402
from longhaul.worker import Runtime, api, load_settings, set_runtime  # noqa: E402
from longhaul.worker.execute import execute_task  # noqa: E402
from longhaul.worker.metrics import PrometheusObserver  # noqa: E402
from longhaul.worker.observe import NULL_OBSERVER, Observer, Observers  # noqa: E402

MODES = ("off", "metrics", "metrics+otel")


def _otel_observer() -> Observer:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from longhaul.worker.otel import OtelObserver

    class Dropping(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    return OtelObserver(provider)


def observers() -> dict[str, Callable[[], Observer]]:
    return {"off": lambda: NULL_OBSERVER, "metrics": PrometheusObserver,
            "metrics+otel": lambda: Observers([PrometheusObserver(), _otel_observer()])}


def one_run(workdir: Path, name: str, observer: Observer, steps: int) -> float:
    """Steps per second of one task of `steps` steps, from its first claim to its end."""
    settings = load_settings(database_url=f"sqlite:///{workdir / name}.db", redis_url=None)
    runtime = Runtime(settings, embedded=True, observer=observer)
    set_runtime(runtime)
    try:
        task_id = api.submit(runtime, "observe overhead", task_id=name, steps=steps)
        gc.collect()
        started = time.perf_counter()
        status = execute_task(runtime, task_id)
        elapsed_s = time.perf_counter() - started
        assert status is TaskStatus.COMPLETED, runtime.store.summary(task_id).last_error
        return steps / elapsed_s
    finally:
        set_runtime(None)
        runtime.store.close()


def measure(quick: bool) -> dict[str, Any]:
    steps, repetitions = (300, 4) if quick else (800, 7)
    made = observers()
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="longhaul-observe-bench-") as tmp:
        workdir = Path(tmp)
        built = {mode: make() for mode, make in made.items()}
        for mode in MODES:
            one_run(workdir, f"warm-{mode}", built[mode], 30)
        for rep in range(repetitions):
            for mode in (MODES if rep % 2 == 0 else tuple(reversed(MODES))):
                runs[mode].append(one_run(workdir, f"{mode}-{rep}", built[mode], steps))
    result: dict[str, Any] = {"steps_per_task": steps, "repetitions": repetitions}
    for mode in MODES:
        result[mode] = {"best_steps_per_s": round(max(runs[mode]), 1),
                        "median_steps_per_s": round(statistics.median(runs[mode]), 1),
                        "cost_ratio_vs_off": round(statistics.median(runs["off"]) / statistics.median(runs[mode]), 3),
                        "extra_us_per_step": round((1 / statistics.median(runs[mode])
                                                    - 1 / statistics.median(runs["off"])) * 1e6, 1)}
    return result


def report(result: dict[str, Any]) -> None:
    print(f"step loop, one scripted task of {result['steps_per_task']} zero-delay steps, "
          f"{result['repetitions']} runs per mode")
    print(f"  {'mode':<14}{'best steps/s':>14}{'median':>10}{'cost vs off':>13}{'extra us/step':>15}")
    for mode in MODES:
        row = result[mode]
        print(f"  {mode:<14}{row['best_steps_per_s']:>14.1f}{row['median_steps_per_s']:>10.1f}"
              f"{row['cost_ratio_vs_off']:>12.3f}x{row['extra_us_per_step']:>15.1f}")


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, measure, report, quick_help="fewer, shorter runs (under 15 s)", argv=argv)


if __name__ == "__main__":
    main()
