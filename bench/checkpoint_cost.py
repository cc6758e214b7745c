"""What one checkpoint costs as a task's history grows: longhaul against the seed's design.

Prints the mean (and median) cost of `TaskStore.record_checkpoint`, in
milliseconds, when the task already holds 10, 100, 1,000 and 5,000 messages, and the 5,000/10 ratio.
Each step appends 2 messages of ~400 bytes and 1 checkpoint item. As a
baseline from the same run, it times the seed's design at the same lengths:
the whole history serialised to JSON and upserted into one row per step (raw
sqlite3, WAL, ``synchronous=NORMAL``). Last, the time to rebuild a task of
5,000 messages for resume, and to `load` it whole.

Then a journaled step (what the step loop writes): the answer stored before
its tool runs (`journal_answer`), and the checkpoint completing the step with
its result (`record_checkpoint(..., journal=step)`), each write's median
against the 0.25 ms target, at 1,000 prior messages.

Each length is measured on several tasks prefilled to that length, a few
consecutive steps each, so "10 prior messages" means 10 to 10 + 2 x (steps - 1).
Nothing here asserts on timings; it prints figures for a reader to judge.

    python bench/checkpoint_cost.py            # about 20 s
    python bench/checkpoint_cost.py --quick    # about 5 s
    python bench/checkpoint_cost.py --json     # the figures, for scripts
"""

from __future__ import annotations

import functools
import gc
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orjson
from command_line import bench_main

from longhaul.models import ChatMessage, CheckpointItem, CheckpointUpdate, OpenStep, TaskStore, ToolCall
from longhaul.worker.middleware import freeze_boot_heap

HISTORY_LENGTHS = (10, 100, 1_000, 5_000)
MESSAGE_BYTES = 400
#: Run after each prefill, off the clock, so that SQLite's automatic WAL
#: checkpoint (every ~4 MB written) does not land on one sample by chance.
WAL_CHECKPOINT = "PRAGMA wal_checkpoint(TRUNCATE)"


@dataclass(frozen=True)
class Plan:
    tasks_per_length: int  # tasks prefilled to each length
    steps_per_task: int  # timed checkpoints on each of them
    loads: int  # timed loads of the 5,000-message task


FULL = Plan(tasks_per_length=40, steps_per_task=10, loads=40)
QUICK = Plan(tasks_per_length=10, steps_per_task=8, loads=5)


def message_text(n: int) -> str:
    return f"message {n}: ".ljust(MESSAGE_BYTES, "x")


def history(count: int, start: int = 0) -> list[ChatMessage]:
    return [ChatMessage(role="user" if n % 2 == 0 else "assistant", content=message_text(n))
            for n in range(start, start + count)]


def step_update(task_id: str, step_index: int, prior_messages: int) -> CheckpointUpdate:
    return CheckpointUpdate(
        task_id=task_id, thread_id=f"thread-{task_id}", channel="bench", provider="stub", model="m",
        step_index=step_index, new_messages=history(2, start=prior_messages),
        checkpoint_note=f"after step {step_index}",
        items=[CheckpointItem(tool_name="shell", arguments={"command": f"echo {step_index}"},
                              success=True, output="ok")],
    )


def timed_ms(call: Callable[[], object]) -> float:
    started = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - started) / 1e6


# -- longhaul ------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    mean_ms: float
    median_ms: float

    @classmethod
    def of(cls, samples_ms: list[float]) -> Cost:
        return cls(statistics.fmean(samples_ms), statistics.median(samples_ms))


def longhaul_costs(store: TaskStore, plan: Plan) -> dict[int, Cost]:
    """record_checkpoint cost at each history length."""
    costs: dict[int, Cost] = {}
    for length in HISTORY_LENGTHS:
        task_ids = [f"longhaul-{length}-{n}" for n in range(plan.tasks_per_length)]
        for task_id in task_ids:
            prefill = step_update(task_id, 0, 0).model_copy(update={"new_messages": history(length)})
            store.record_checkpoint(prefill)
        store.db.execute_sql(WAL_CHECKPOINT)
        # Build the updates first: validating input is the caller's cost, not the store's.
        steps = [(step, [step_update(task_id, step, length + 2 * (step - 1)) for task_id in task_ids])
                 for step in range(1, plan.steps_per_task + 1)]
        samples = [timed_ms(lambda u=update: store.record_checkpoint(u))
                   for _step, updates in steps for update in updates]
        costs[length] = Cost.of(samples)
    return costs


#: Prior messages of the tasks a journaled step is measured on.
JOURNAL_LENGTH = 1_000


def journal_costs(store: TaskStore, plan: Plan) -> dict[str, Cost]:
    """The two writes of a journaled step of one tool call: the answer, then the completing checkpoint."""
    task_ids = [f"journal-{n}" for n in range(plan.tasks_per_length)]
    for task_id in task_ids:
        store.record_checkpoint(step_update(task_id, 0, 0).model_copy(update={"new_messages": history(JOURNAL_LENGTH)}))
    store.db.execute_sql(WAL_CHECKPOINT)
    answers: list[float] = []
    completions: list[float] = []
    for step in range(1, plan.steps_per_task + 1):
        for task_id in task_ids:
            call = ToolCall(id=f"c{step}", name="shell", arguments={"command": f"echo {step}"})
            answer = ChatMessage.assistant(message_text(step), tool_calls=[call])
            result = ChatMessage(role="tool", content=message_text(step + 1), tool_call_id=call.id, name="shell")
            update = step_update(task_id, step, 0).model_copy(update={"new_messages": [answer, result]})
            started = time.perf_counter_ns()
            opened: OpenStep = store.journal_answer(task_id, step, answer)
            answers.append((time.perf_counter_ns() - started) / 1e6)
            completions.append(timed_ms(functools.partial(store.record_checkpoint, update, journal=opened)))
    return {"answer": Cost.of(answers), "completion": Cost.of(completions)}


def load_costs(store: TaskStore, plan: Plan) -> tuple[int, Cost, Cost]:
    """(messages, resume rebuild cost, full load cost) of the first 5,000-message task.

    The rebuild is what a worker reads to resume (`get` without decoding
    every checkpoint, as `worker.loop` does), each on a connection opened
    off the clock just before, as a freshly started worker's is: its page
    cache is empty; and, as in a worker, with the boot heap frozen and the
    garbage collector on. The full load also decodes every checkpoint.
    """
    task_id = f"longhaul-{HISTORY_LENGTHS[-1]}-0"
    messages = len(store.get(task_id, checkpoints=False).execution_history)

    def rebuild_ms() -> float:
        store.close()
        store.summary(task_id)  # connect (pragmas run) off the clock
        return timed_ms(lambda: store.get(task_id, checkpoints=False))

    freeze_boot_heap()  # as a worker process does after boot
    try:
        rebuild = Cost.of([rebuild_ms() for _ in range(plan.loads)])
        full = Cost.of([timed_ms(lambda: store.load(task_id)) for _ in range(plan.loads)])
    finally:
        gc.unfreeze()
    return messages, rebuild, full


# -- the seed's design, in raw sqlite3 ------------------------------------------

SEED_SCHEMA = """
CREATE TABLE IF NOT EXISTS task_records (
    task_id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, channel TEXT NOT NULL, provider TEXT NOT NULL,
    model TEXT NOT NULL, status TEXT NOT NULL, execution_history_json TEXT NOT NULL,
    resumable_history_json TEXT NOT NULL, latest_checkpoint_note TEXT,
    checkpoint_count INTEGER NOT NULL DEFAULT 0, final_response TEXT, last_error TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, completed_at TEXT
);
CREATE INDEX IF NOT EXISTS idx_task_records_thread ON task_records(thread_id, updated_at DESC);
CREATE TABLE IF NOT EXISTS task_checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, step_index INTEGER NOT NULL,
    checkpoint_note TEXT, items_json TEXT NOT NULL, created_at TEXT NOT NULL,
    FOREIGN KEY(task_id) REFERENCES task_records(task_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_task_checkpoints_task_step ON task_checkpoints(task_id, step_index);
"""

# The seed's record_checkpoint statements, verbatim but for parameter style.
SEED_UPSERT_TASK = """
INSERT INTO task_records (task_id, thread_id, channel, provider, model, status, execution_history_json,
    resumable_history_json, latest_checkpoint_note, checkpoint_count, created_at, updated_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7,
    COALESCE((SELECT resumable_history_json FROM task_records WHERE task_id = ?1), '[]'), ?8, 1, ?9, ?9)
ON CONFLICT(task_id) DO UPDATE SET
    thread_id = excluded.thread_id, channel = excluded.channel, provider = excluded.provider,
    model = excluded.model, status = excluded.status,
    execution_history_json = excluded.execution_history_json,
    latest_checkpoint_note = excluded.latest_checkpoint_note,
    checkpoint_count = task_records.checkpoint_count + 1, updated_at = excluded.updated_at
"""
SEED_INSERT_CHECKPOINT = """
INSERT INTO task_checkpoints (task_id, step_index, checkpoint_note, items_json, created_at)
VALUES (?1, ?2, ?3, ?4, ?5)
"""


class SeedStore:
    """The seed's SqliteTaskStore.record_checkpoint: the caller passes the whole history."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.conn.executescript(SEED_SCHEMA)

    def record_checkpoint(self, task_id: str, step_index: int, execution_history: list[dict[str, str]],
                          note: str, items: list[dict[str, object]]) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        history_json = orjson.dumps(execution_history).decode()
        items_json = orjson.dumps(items).decode()
        self.conn.execute("BEGIN")
        try:
            self.conn.execute(SEED_UPSERT_TASK, (task_id, f"thread-{task_id}", "bench", "stub", "m", "running",
                                                 history_json, note, now))
            self.conn.execute(SEED_INSERT_CHECKPOINT, (task_id, step_index, note, items_json, now))
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def _seed_step(seed: SeedStore, task_id: str, step: int, messages: list[dict[str, str]],
               new: list[dict[str, str]], items: list[dict[str, Any]], note: str) -> None:
    # The caller's history grows by the step's messages; the seed design rewrites it all.
    messages.extend(new)
    seed.record_checkpoint(task_id, step, messages, note, items)


def seed_costs(seed: SeedStore, plan: Plan) -> dict[int, Cost]:
    """The seed's checkpoint cost at each history length."""
    costs: dict[int, Cost] = {}
    for length in HISTORY_LENGTHS:
        histories = {f"seed-{length}-{n}": [m.model_dump(exclude_none=True) for m in history(length)]
                     for n in range(plan.tasks_per_length)}
        for task_id, messages in histories.items():
            seed.record_checkpoint(task_id, 0, messages, "prefill", [])
        seed.conn.execute(WAL_CHECKPOINT)
        samples: list[float] = []
        for step in range(1, plan.steps_per_task + 1):
            for task_id, messages in histories.items():
                update = step_update(task_id, step, len(messages))
                new = [m.model_dump(exclude_none=True) for m in update.new_messages]
                items = [item.model_dump() for item in update.items]
                record = functools.partial(_seed_step, seed, task_id, step, messages, new, items,
                                           update.checkpoint_note or "")
                samples.append(timed_ms(record))
        costs[length] = Cost.of(samples)
    return costs


# -- report --------------------------------------------------------------------


def run(plan: Plan) -> dict[str, object]:
    """Measure both designs in one temporary folder; returns the figures as plain data."""
    with tempfile.TemporaryDirectory(prefix="longhaul-bench-") as root:
        store = TaskStore(Path(root) / "longhaul.db")
        seed = SeedStore(Path(root) / "seed.db")
        # Warm up both (connections, statement caches, page cache) off the clock.
        for step in range(1, 21):
            store.record_checkpoint(step_update("warm-up", step, 2 * step))
            seed.record_checkpoint("warm-up", step, [], "", [])
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection landing in one sample is noise, not checkpoint cost
        try:
            longhaul = longhaul_costs(store, plan)
            journal = journal_costs(store, plan)
            seed_design = seed_costs(seed, plan)
        finally:
            if gc_was_enabled:
                gc.enable()
        try:  # with the collector on: building 5,000 messages triggers it in a real worker too
            loaded_messages, rebuild, full_load = load_costs(store, plan)
        finally:
            store.close()
            seed.close()
    shortest, longest = HISTORY_LENGTHS[0], HISTORY_LENGTHS[-1]

    def ratio(costs: dict[int, Cost]) -> dict[str, float]:
        return {"mean": costs[longest].mean_ms / costs[shortest].mean_ms,
                "median": costs[longest].median_ms / costs[shortest].median_ms}

    return {
        "samples_per_length": plan.tasks_per_length * plan.steps_per_task,
        "longhaul": {length: vars(cost) for length, cost in longhaul.items()},
        "seed": {length: vars(cost) for length, cost in seed_design.items()},
        "longhaul_ratio": ratio(longhaul),
        "seed_ratio": ratio(seed_design),
        "journaled_step": {part: vars(cost) for part, cost in journal.items()},
        "load_messages": loaded_messages,
        "rebuild_for_resume": vars(rebuild),
        "full_load": vars(full_load),
    }


def print_table(result: dict[str, Any]) -> None:
    longhaul, seed = result["longhaul"], result["seed"]
    print(f"record_checkpoint cost in ms over {result['samples_per_length']} steps per length "
          f"(each step: 2 messages of ~{MESSAGE_BYTES} B + 1 item)")
    print()
    print(f"{'prior messages':>14}  {'longhaul mean':>13}  {'median':>6}  {'seed rewrite mean':>17}  {'median':>6}")
    for length in HISTORY_LENGTHS:
        ours, theirs = longhaul[length], seed[length]
        print(f"{length:>14,}  {ours['mean_ms']:>13.3f}  {ours['median_ms']:>6.3f}"
              f"  {theirs['mean_ms']:>17.3f}  {theirs['median_ms']:>6.3f}")
    ratio_label = f"{HISTORY_LENGTHS[-1]:,}/{HISTORY_LENGTHS[0]:,} ratio"
    ours, theirs = result["longhaul_ratio"], result["seed_ratio"]
    print(f"{ratio_label:>14}  {ours['mean']:>12.2f}x  {ours['median']:>5.2f}x"
          f"  {theirs['mean']:>16.2f}x  {theirs['median']:>5.1f}x")
    print()
    journal, plain = result["journaled_step"], longhaul[JOURNAL_LENGTH]
    print(f"a journaled step at {JOURNAL_LENGTH:,} prior messages, each write's median (target <= 0.25 ms):")
    for part, label in (("answer", "journal_answer (before the tool runs)"),
                        ("completion", "record_checkpoint(journal=...)")):
        print(f"  {label:<38} {journal[part]['mean_ms']:.3f} ms mean, {journal[part]['median_ms']:.3f} median")
    both = journal["answer"]["median_ms"] + journal["completion"]["median_ms"]
    print(f"  both writes vs one unjournaled checkpoint: {both:.3f} / {plain['median_ms']:.3f} ms median = "
          f"{both / plain['median_ms']:.2f}x")
    print()
    rebuild, full = result["rebuild_for_resume"], result["full_load"]
    print(f"at {result['load_messages']:,} messages, rebuilding a task's state for resume (target <= 15 ms): "
          f"{rebuild['mean_ms']:.2f} ms mean, {rebuild['median_ms']:.2f} median")
    print(f"  store.load with every checkpoint decoded: {full['mean_ms']:.2f} ms mean, {full['median_ms']:.2f} median")


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, lambda quick: run(QUICK if quick else FULL), print_table,
               quick_help="fewer samples; finishes in a few seconds", argv=argv)


if __name__ == "__main__":
    main()
