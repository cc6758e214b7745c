"""longhaul at scale: a 100,000-task SQLite store and a 25,000-step task, this checkout against a baseline.

Prints, for this checkout ("new") and for a baseline commit ("old", by
default where this branch left ``main``), each figure issue 16's "Also at
scale" list names, with the ratio new / old and the issue's target:

- ``export --all``: seconds for N tasks (old: at a smaller N, since it is
  quadratic; both sides at that N too, so the ratio is like for like);
- ``show`` of the 25,000-step task in a fresh process: the command's seconds
  (after importing the CLI, measured on its own below), the whole process's,
  and its peak RSS (VmHWM) (text form; the new side also with ``--json
  --no-histories``);
- ``tasks``: ms for the first page, the middle page by ``--offset N/2`` and
  (new) the middle page by cursor, sorted by update time;
- ``prune`` of 90% of the tasks: the file's size before and after;
- importing ``longhaul.worker.cli``: ms (``python -X importtime``);
- enqueueing: tasks/s of `enqueue` one at a time (old and new) and of
  `enqueue_many` (new), on SQLite with a real redis-server (skipped without one).

Each side runs in its own subprocess that imports `longhaul` from a folder of
symlinks into its checkout (`store_refactor.import_root`), and builds its
own store (its own schema) with raw bulk INSERTs, which take seconds where
the API would take minutes. Nothing here asserts on timings.

    python bench/scale.py            # 100,000 tasks, 25,000 steps; several minutes
    python bench/scale.py --quick    # 3,000 tasks, 5,000 steps; under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from store_refactor import _git, add_comparison_options, baseline_commit, import_root, report

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

#: The issue's figures on the old code (100,000 tasks, 25,000 steps), and its targets.
ISSUE_BEFORE = {"export_s": "79 s at 10k, ~1.5 h at 100k", "show_s": "2.35 s", "show_mb": "202 MB",
                "tasks_first_ms": "48 ms", "tasks_middle_ms": "419 ms", "prune_after_mb": "489.7 MB (no change)",
                "import_ms": "510 ms", "enqueue_per_s": "15-35 /s"}
TARGETS = {"export_s": "<= 120 s at 100k", "show_s": "<= 0.3 s", "show_mb": "<= 60 MB", "tasks_first_ms": "<= 10 ms",
           "tasks_middle_ms": "<= 10 ms", "prune_after_mb": "shrinks", "import_ms": "<= 250 ms",
           "enqueue_per_s": ">= 2,000 /s"}

#: Removes the editable install's finder, so `longhaul` comes from `root` only (as in store_refactor.RUNNER).
PRELUDE = r"""
import sys
root = {root!r}
def installed_editable(hook):
    return "editable" in (getattr(hook, "__module__", None) or "").lower()
sys.meta_path[:] = [finder for finder in sys.meta_path if not installed_editable(finder)]
sys.path_hooks[:] = [hook for hook in sys.path_hooks if not installed_editable(hook)]
sys.path_importer_cache.clear()
sys.path[:0] = [root, {bench!r}]
"""


# -- building stores with raw SQL (no longhaul code: the same rows for either side) --------------------


def _task_row(columns: list[tuple[str, bool]], values: dict[str, Any]) -> tuple[Any, ...]:
    """A `task` row for the columns of this side's schema: `values`, 0 for any other NOT NULL column."""
    return tuple(values.get(name, 0 if notnull else None) for name, notnull in columns)


def fill_tasks(path: Path, *, tasks: int, spec_json: str, now_s: float) -> None:
    """`tasks` finished tasks, each with 3 execution messages (prompt, a tool call, the answer) and one checkpoint."""
    db = sqlite3.connect(path)
    columns = [(row[1], bool(row[3])) for row in db.execute('PRAGMA table_info("task")') if row[1] != "id"]
    names = ", ".join(f'"{name}"' for name, _ in columns)
    marks = ", ".join("?" for _ in columns)
    call = json.dumps([{"id": "call_0", "name": "ledger", "arguments": {"step": 1}}])
    items = json.dumps([{"tool_name": "ledger", "arguments": {"step": 1}, "success": True, "output": "ok"}])
    with db:
        for start in range(0, tasks, 5_000):
            batch = range(start, min(tasks, start + 5_000))
            db.executemany(f'INSERT INTO "task" ({names}) VALUES ({marks})', [
                _task_row(columns, dict(
                    task_id=f"task-{i:07d}", thread_id=f"thread-{i % 1000:04d}", channel="bench",
                    provider="scripted", model="scripted", status="completed", spec=spec_json, checkpoint_count=1,
                    execution_count=4, final_response="done", created_at=now_s - tasks + i,
                    # Every 7 tasks share an update time: keyset paging must break the ties by id.
                    updated_at=now_s - tasks + i - i % 7, completed_at=now_s - tasks + i, started_at=now_s - tasks + i,
                    cancel_requested=0, turn_count=2, tool_call_count=1, trace_next_sequence=0))
                for i in batch])
            first_pk = db.execute('SELECT id FROM "task" WHERE task_id = ?', (f"task-{start:07d}",)).fetchone()[0]
            messages, checkpoints = [], []
            for offset, i in enumerate(batch):
                pk = first_pk + offset
                messages += [(pk, 0, 0, None, "user", f"prompt {i}", None, None, None),
                             (pk, 0, 1, 1, "assistant", "", None, None, call),
                             (pk, 0, 2, 1, "tool", "ok", "call_0", "ledger", None),
                             (pk, 0, 3, None, "assistant", "done", None, None, None)]
                checkpoints.append((pk, 1, "step 1", items, now_s - tasks + i))
            db.executemany('INSERT INTO "message" (task_id, history, position, step_index, role, content, '
                           'tool_call_id, name, tool_calls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', messages)
            db.executemany('INSERT INTO "checkpoint" (task_id, step_index, checkpoint_note, items, created_at) '
                           'VALUES (?, ?, ?, ?, ?)', checkpoints)
    db.close()


def fill_long_task(path: Path, *, steps: int, spec_json: str, now_s: float) -> str:
    """One running task of `steps` steps (an assistant tool call and its result per step); its id."""
    db = sqlite3.connect(path)
    columns = [(row[1], bool(row[3])) for row in db.execute('PRAGMA table_info("task")') if row[1] != "id"]
    names = ", ".join(f'"{name}"' for name, _ in columns)
    marks = ", ".join("?" for _ in columns)
    task_id = "long-task"
    output = "step result " * 20
    with db:
        db.execute(f'INSERT INTO "task" ({names}) VALUES ({marks})', _task_row(columns, dict(
            task_id=task_id, thread_id=task_id, channel="bench", provider="scripted", model="scripted",
            status="completed", spec=spec_json, checkpoint_count=steps, execution_count=1 + 2 * steps,
            final_response="done", created_at=now_s, updated_at=now_s, completed_at=now_s, started_at=now_s,
            cancel_requested=0, turn_count=steps, tool_call_count=steps, trace_next_sequence=0)))
        pk = db.execute('SELECT id FROM "task" WHERE task_id = ?', (task_id,)).fetchone()[0]
        messages = [(pk, 0, 0, None, "user", "a long task", None, None, None)]
        checkpoints = []
        for step in range(1, steps + 1):
            call = json.dumps([{"id": f"call_{step}", "name": "ledger", "arguments": {"step": step}}])
            messages += [(pk, 0, 2 * step - 1, step, "assistant", f"thinking about step {step}", None, None, call),
                         (pk, 0, 2 * step, step, "tool", output, f"call_{step}", "ledger", None)]
            items = json.dumps([{"tool_name": "ledger", "arguments": {"step": step}, "success": True,
                                 "output": output}])
            checkpoints.append((pk, step, f"step {step}", items, now_s + step))
        db.executemany('INSERT INTO "message" (task_id, history, position, step_index, role, content, '
                       'tool_call_id, name, tool_calls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)', messages)
        db.executemany('INSERT INTO "checkpoint" (task_id, step_index, checkpoint_note, items, created_at) '
                       'VALUES (?, ?, ?, ?, ?)', checkpoints)
    db.close()
    return task_id


# -- measuring one side (runs in a subprocess importing that side's longhaul) ---------------------------


def _median_ms(fn: Callable[[], Any], *, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _file_mb(path: Path) -> float:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists()) / 1e6


def measure_side(side: str, folder: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Every figure for the longhaul on sys.path (the caller set it up), on stores built in `folder`."""
    import longhaul.models
    from longhaul.models import TaskSpec, TaskStore

    figures: dict[str, Any] = {"code": longhaul.models.__file__}
    spec_json = TaskSpec(prompt="bench").model_dump_json()
    now_s = time.time()

    # tasks and prune on the big store
    big = folder / "big.db"
    TaskStore(big).close_all()
    started = time.perf_counter()
    fill_tasks(big, tasks=plan["tasks"], spec_json=spec_json, now_s=now_s)
    figures["build_s"] = time.perf_counter() - started
    store = TaskStore(big)
    figures["tasks_first_ms"] = _median_ms(lambda: store.list_tasks(limit=50), repeat=20)
    figures["tasks_middle_ms"] = _median_ms(lambda: store.list_tasks(limit=50, offset=plan["tasks"] // 2), repeat=20)
    if hasattr(store, "page_tasks"):
        cursor = store.page_tasks(limit=plan["tasks"] // 2).cursors[-1]
        figures["tasks_middle_cursor_ms"] = _median_ms(lambda: store.list_tasks(limit=50, after=cursor), repeat=20)
    figures["prune_before_mb"] = _file_mb(big)
    started = time.perf_counter()
    store.prune(max_tasks=plan["tasks"] // 10)
    figures["prune_s"] = time.perf_counter() - started
    store.close_all()
    figures["prune_after_mb"] = _file_mb(big)

    # export --all: at the size both sides can do, and (new) at the full size
    figures["export_s"] = {}
    for count in plan["export_sizes"][side]:
        path = folder / f"export-{count}.db"
        TaskStore(path).close_all()
        fill_tasks(path, tasks=count, spec_json=spec_json, now_s=now_s)
        with TaskStore(path) as export_store:
            from longhaul.models.event_stream import export_events

            out = folder / f"out-{count}"
            started = time.perf_counter()
            files = export_events(export_store, out, task_ids=None)
            figures["export_s"][str(count)] = time.perf_counter() - started
            assert len(files) == count, (len(files), count)

    # show of the long task, in a fresh process each (its peak RSS is the figure)
    long = folder / "long.db"
    TaskStore(long).close_all()
    task_id = fill_long_task(long, steps=plan["steps"], spec_json=spec_json, now_s=now_s)
    forms = {"show": []} if side == "old" else {"show": [], "show_json_no_histories": ["--json", "--no-histories"]}
    for name, extra in forms.items():
        runs = [_show_in_fresh_process(long, task_id, extra) for _ in range(3)]
        figures[f"{name}_s"] = statistics.median(r["seconds"] for r in runs)
        figures[f"{name}_process_s"] = statistics.median(r["process_s"] for r in runs)
        figures[f"{name}_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    return figures


SHOW = r"""
import contextlib, io, json, os, sys, time
started = time.perf_counter()
os.environ["LONGHAUL_DATABASE_URL"] = sys.argv[1]
from longhaul.worker.cli import cli
imported = time.perf_counter()
sink = io.StringIO()
with contextlib.redirect_stdout(sink):
    try:
        cli.main(["show", sys.argv[2], *sys.argv[3:]], prog_name="longhaul", standalone_mode=False)
    except SystemExit:
        pass
done = time.perf_counter()
assert len(sink.getvalue()) > 100, sink.getvalue()
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork and exec).
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seconds": done - imported, "process_s": done - started, "peak_rss_mb": peak_kb / 1024}))
"""


def _show_in_fresh_process(db: Path, task_id: str, extra: list[str]) -> dict[str, float]:
    root = sys.path[0]
    code = PRELUDE.format(root=root, bench=str(BENCH)) + SHOW
    done = subprocess.run([sys.executable, "-c", code, str(db), task_id, *extra], capture_output=True, text=True,
                          check=False, env=_clean_env(), cwd=db.parent)
    if done.returncode != 0:
        raise SystemExit(f"show failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_ms(root: Path, repeat: int) -> float:
    """Median cumulative import time of `longhaul.worker.cli` (ms) in fresh interpreters, per -X importtime."""
    code = PRELUDE.format(root=str(root), bench=str(BENCH)) + "import longhaul.worker.cli\n"
    samples = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                              check=True, env=_clean_env())
        line = next(line for line in reversed(done.stderr.splitlines()) if line.endswith("| longhaul.worker.cli"))
        samples.append(int(re.split(r"\s*\|\s*", line)[1]) / 1000)
    return statistics.median(samples)


# -- enqueue throughput (needs redis-server) ---------------------------------------------------------------


ENQUEUE = r"""
import json, os, sys, tempfile, time
db, redis_url, count, bulk = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
os.environ.update(LONGHAUL_DATABASE_URL=db, LONGHAUL_REDIS_URL=redis_url)
import longhaul
from longhaul.worker.runtime import get_runtime
get_runtime()  # built before the clock starts: a caller enqueues from a running process
started = time.perf_counter()
if bulk:
    ids = longhaul.enqueue_many([{"prompt": f"task {i}", "task_id": f"bulk-{i}", "steps": 3} for i in range(count)])
else:
    ids = [longhaul.enqueue(f"task {i}", task_id=f"one-{i}", steps=3) for i in range(count)]
seconds = time.perf_counter() - started
assert len(ids) == count
print(json.dumps({"per_s": count / seconds}))
"""


def enqueue_rates(roots: dict[str, Path], folder: Path, plan: dict[str, Any]) -> dict[str, Any]:
    try:
        from longhaul.worker.testing import RedisServer
    except ImportError:
        return {"skipped": "longhaul.worker.testing is not importable"}
    import shutil

    if shutil.which("redis-server") is None:
        return {"skipped": "no redis-server on PATH"}
    (folder / "redis").mkdir()
    redis = RedisServer(folder / "redis").start()
    try:
        rates: dict[str, Any] = {}
        for name, root, count, bulk in (("old_enqueue", roots["old"], plan["enqueue_one"], False),
                                        ("new_enqueue", roots["new"], plan["enqueue_one"], False),
                                        ("new_enqueue_many", roots["new"], plan["enqueue_many"], True)):
            db = folder / f"{name}.db"
            code = PRELUDE.format(root=str(root), bench=str(BENCH)) + ENQUEUE
            done = subprocess.run([sys.executable, "-c", code, str(db), redis.url, str(count), "1" if bulk else "0"],
                                  capture_output=True, text=True, check=False, env=_clean_env(), cwd=folder)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr}")
            rates[name] = json.loads(done.stdout.strip().splitlines()[-1])["per_s"]
        return rates
    finally:
        redis.stop()


# -- the two sides, side by side -------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH" and not key.startswith("LONGHAUL_")}


SIDE = r"""
import json, sys
from pathlib import Path
import scale
side, folder, plan = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps(scale.measure_side(side, folder, plan)))
"""


def run_side(side: str, root: Path, folder: Path, plan: dict[str, Any]) -> dict[str, Any]:
    folder.mkdir(parents=True)
    code = PRELUDE.format(root=str(root), bench=str(BENCH)) + SIDE
    done = subprocess.run([sys.executable, "-c", code, side, str(folder), json.dumps(plan)], capture_output=True,
                          text=True, check=False, env=_clean_env())
    if done.returncode != 0:
        raise SystemExit(f"measuring the {side} side failed:\n{done.stderr}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["code"].startswith(str(root)), figures["code"]
    return figures


def run(*, quick: bool, ref: str) -> dict[str, Any]:
    commit = baseline_commit(ref)
    tasks = 3_000 if quick else 100_000
    plan = {"tasks": tasks, "steps": 5_000 if quick else 25_000,
            "export_sizes": {"old": [1_000 if quick else 5_000], "new": [1_000 if quick else 5_000, tasks]},
            "enqueue_one": 200 if quick else 500, "enqueue_many": 2_000 if quick else 10_000}
    with tempfile.TemporaryDirectory(prefix="longhaul-scale-") as temp:
        baseline = Path(temp) / "baseline"
        _git("worktree", "add", "--detach", "--quiet", str(baseline), commit)
        try:
            roots = {"old": import_root(baseline, Path(temp) / "old"), "new": import_root(REPO, Path(temp) / "new")}
            figures: dict[str, Any] = {"baseline_commit": commit, "plan": plan}
            for side in ("old", "new"):
                figures[side] = run_side(side, roots[side], Path(temp) / f"{side}-data", plan)
                figures[side]["import_ms"] = import_ms(roots[side], 3 if quick else 7)
            figures["enqueue"] = enqueue_rates(roots, Path(temp), plan)
        finally:
            _git("worktree", "remove", "--force", str(baseline))
    return figures


def print_table(figures: dict[str, Any]) -> None:
    plan, old, new = figures["plan"], figures["old"], figures["new"]
    print(f"this checkout (new) against {figures['baseline_commit'][:12]} (old): {plan['tasks']:,}-task store, "
          f"{plan['steps']:,}-step task")
    print()
    print(f"{'figure':<44} {'old':>11} {'new':>11} {'new/old':>8}   {'issue before':<26} target")

    def row(label: str, old_value: Any, new_value: Any, key: str, unit: str = "", digits: int = 3) -> None:
        def shown(value: Any) -> str:
            return "-" if value is None else f"{value:,.{digits}f}{unit}"
        ratio = f"{new_value / old_value:.3f}x" if old_value and new_value is not None else "-"
        print(f"{label:<44} {shown(old_value):>11} {shown(new_value):>11} {ratio:>8}   "
              f"{ISSUE_BEFORE.get(key, ''):<26} {TARGETS.get(key, '')}")

    small = str(plan["export_sizes"]["old"][0])
    row(f"export --all, {int(small):,} tasks (s)", old["export_s"][small], new["export_s"][small], "export_s")
    row(f"export --all, {plan['tasks']:,} tasks (s)", None, new["export_s"][str(plan["tasks"])], "export_s")
    row(f"show at {plan['steps']:,} steps, the command (s)", old["show_s"], new["show_s"], "show_s")
    row("  the same, whole process with imports (s)", old["show_process_s"], new["show_process_s"], "")
    row(f"show at {plan['steps']:,} steps, peak RSS (MB)", old["show_mb"], new["show_mb"], "show_mb", digits=1)
    row("show --json --no-histories, the command (s)", None, new["show_json_no_histories_s"], "show_s")
    row("show --json --no-histories, peak RSS (MB)", None, new["show_json_no_histories_mb"], "show_mb", digits=1)
    row("tasks, first page of 50 (ms)", old["tasks_first_ms"], new["tasks_first_ms"], "tasks_first_ms")
    row("tasks --offset N/2 (ms)", old["tasks_middle_ms"], new["tasks_middle_ms"], "tasks_middle_ms")
    row("tasks --after CURSOR at N/2 (ms)", None, new.get("tasks_middle_cursor_ms"), "tasks_middle_ms")
    row("store before prune (MB)", old["prune_before_mb"], new["prune_before_mb"], "", digits=1)
    row("store after pruning 90% (MB)", old["prune_after_mb"], new["prune_after_mb"], "prune_after_mb", digits=1)
    row("prune of 90% (s)", old["prune_s"], new["prune_s"], "")
    row("import longhaul.worker.cli (ms)", old["import_ms"], new["import_ms"], "import_ms", digits=1)
    enqueue = figures["enqueue"]
    if "skipped" in enqueue:
        print(f"{'enqueue rates':<44} skipped: {enqueue['skipped']}")
    else:
        row("enqueue, one at a time (tasks/s)", enqueue["old_enqueue"], enqueue["new_enqueue"], "enqueue_per_s",
            digits=0)
        row(f"enqueue_many of {plan['enqueue_many']:,} (tasks/s; old: enqueue)", enqueue["old_enqueue"],
            enqueue["new_enqueue_many"], "enqueue_per_s", digits=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3,000 tasks and 5,000 steps; under a minute")
    add_comparison_options(parser)
    args = parser.parse_args(argv)
    report(run(quick=args.quick, ref=args.baseline_ref), as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
