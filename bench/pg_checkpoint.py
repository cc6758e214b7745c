"""What one PostgreSQL step write costs against a raw psycopg floor for the same rows, and its round trips.

The writes of a tool step, as the step loop makes them (traces on, a
lease held): `record_checkpoint` of a whole step (an assistant message with
one tool call, its result, one item, the step's trace events in its row),
and the journaled path, `journal_answer` (the answer, its usage and trace
batch) then `record_checkpoint(..., journal=step)` (the result, the
checkpoint row); `journal_result` is measured on steps of two calls (the
first call's result, stored as it returns).

Next to each, in the same run and interleaved sample by sample, the same
rows written with psycopg 3 directly, the way a competent developer would:
one transaction that locks the task row (``SELECT ... FOR UPDATE``),
checks the lease token, inserts the rows and updates the task's counters,
its rows encoded before the clock starts (the floor pays for the database
and nothing else). Two floors: statement by statement (what psycopg does
unless asked), and pipelined (``conn.pipeline()``: the locked read with
BEGIN, then the writes with COMMIT). Printed: the median time of each
write, the ratio to each floor, and the round trips of each, counted from
libpq's trace of the wire (`longhaul.worker.testing.RoundTrips`).

The server is a throwaway cluster on loopback (``fsync=off``), so the
figures are CPU and round trips, not disk. Nothing asserts on timings.

    python bench/pg_checkpoint.py            # about 30 s
    python bench/pg_checkpoint.py --quick    # a few seconds
    python bench/pg_checkpoint.py --json     # the figures, for scripts
"""

from __future__ import annotations

import gc
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import psycopg
from checkpoint_cost import history, message_text, step_update
from command_line import bench_main

from longhaul.models import ChatMessage, OpenStep, TaskStore, ToolCall
from longhaul.models.codec import items_json, message_rows, positions_by_text, usage_params
from longhaul.models.tables import EXECUTION
from longhaul.models.traces import PendingTraces, TraceWriter
from longhaul.worker.testing import PostgresServer, RoundTrips

#: Messages each task holds before its timed steps (positions are counters: the length barely matters).
PRIOR_MESSAGES = 100


@dataclass(frozen=True)
class Plan:
    tasks: int  # tasks written round-robin
    steps: int  # timed steps per task and write


FULL = Plan(tasks=20, steps=40)
QUICK = Plan(tasks=5, steps=12)

#: The floors' locked read: the columns the writes need, and the lease token to check.
FLOOR_LOCK = 'SELECT "id", "execution_count", "lease_token" FROM "task" WHERE "task_id" = %s FOR UPDATE'


# -- one tool step, as the step loop writes it --------------------------------------------------


class StepWriter:
    """Builds a task's step writes with the trace events the step loop emits for them (the `worker.loop` order)."""

    def __init__(self, task_id: str, next_sequence: int) -> None:
        self.task_id = task_id
        self.tracer = TraceWriter(agent="bench", model="m", job_type="agent", next_sequence=next_sequence,
                                  started_at=time.time())

    def answer(self, step: int, calls: int) -> tuple[ChatMessage, PendingTraces]:
        tool_calls = [ToolCall(id=f"c{step}-{n}", name="shell", arguments={"command": f"echo {step} {n}"})
                      for n in range(calls)]
        text = message_text(step)
        self.tracer.emit("content", {"text": text})
        self.tracer.emit("usage_update", {"step": step, "turn": {"input_tokens": 50, "output_tokens": 12}})
        return ChatMessage.assistant(text, tool_calls=tool_calls), self.tracer.take()

    def result(self, step: int, call: ToolCall) -> ChatMessage:
        output = message_text(step + 1)
        self.tracer.emit("tool_call_completed", {"step": step, "tool": call.name, "call_id": call.id,
                                                 "duration_ms": 1.5, "output": output})
        return ChatMessage(role="tool", content=output, tool_call_id=call.id, name=call.name)

    def completion(self, step: int) -> PendingTraces:
        self.tracer.emit("checkpoint", {"step": step, "note": f"step {step} done: shell ok"})
        self.tracer.emit("turn_completed", {"step": step, "tool_calls": 1})
        self.tracer.end_turn()
        return self.tracer.take()


# -- the floor: psycopg 3 directly ---------------------------------------------------------------


class Floor:
    """The same rows written with psycopg 3 directly, into longhaul's tables (its statements' SQL text)."""

    def __init__(self, url: str, *, pipelined: bool) -> None:
        # Pipelined: BEGIN and COMMIT sent as statements, so each rides with others (psycopg's
        # `transaction()` syncs on entering and on leaving, a round trip each).
        self.conn = psycopg.connect(url, autocommit=pipelined)
        self.pipelined = pipelined

    def write(self, task_id: str, token: str, statements: Callable[[int, int], list[tuple[str, Any, bool]]]) -> None:
        """One transaction: lock the row, check the lease, run `statements(task_pk, position)` (sql, params, many)."""
        conn = self.conn
        if not self.pipelined:
            with conn.transaction():
                self._run(conn, task_id, token, statements)
            return
        with conn.pipeline():
            conn.execute("BEGIN")
            try:
                self._run(conn, task_id, token, statements)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _run(conn: Any, task_id: str, token: str, statements: Callable[[int, int], list[tuple[str, Any, bool]]]
             ) -> None:
        with conn.cursor() as cursor:
            task_pk, position, stored_token = cursor.execute(FLOOR_LOCK, (task_id,)).fetchone()
            if stored_token != token:
                raise RuntimeError(f"{task_id}: lease lost")
            for sql, params, many in statements(task_pk, position):
                if many:
                    cursor.executemany(sql, params)
                else:
                    cursor.execute(sql, params)

    def close(self) -> None:
        self.conn.close()


def _rows(messages: list[ChatMessage], step: int, *, success: Optional[bool] = None) -> Callable[[int, int], list]:
    """`message_rows` for `messages`, encoded now; the floor fills in the task and position it reads."""
    encoded = [row[4:] for row in message_rows(0, EXECUTION, 0, messages, step, tool_succeeded=success)]
    return lambda task_pk, first: [(task_pk, EXECUTION, first + n, step, *rest) for n, rest in enumerate(encoded)]


def floor_checkpoint(store: TaskStore, update: Any, traces: PendingTraces, *, journaled: bool
                     ) -> Callable[[int, int], list[tuple[str, Any, bool]]]:
    """The statements of a checkpoint: its row (the trace in it), the messages not yet stored, the task update.

    `journaled`: the answer was stored by `journal_answer` (at `position - 2` by then): only the result is new.
    """
    sql, now = store.context.sql, time.time()
    new = update.new_messages[1:] if journaled else update.new_messages
    rows = _rows(new, update.step_index, success=True if journaled else None)
    positions = positions_by_text(update.new_messages, PRIOR_MESSAGES)
    items, trace = items_json(update.items, positions), traces.encode_with_header(positions)[0]
    added, turns, calls = (0, 0, 0) if journaled else (len(new), 1, 1)

    def statements(task_pk: int, position: int) -> list[tuple[str, Any, bool]]:
        first = position - 2 if journaled else position  # the journal reserved the result's position
        return [
            (sql.insert_checkpoint, (task_pk, update.step_index, update.checkpoint_note, items, now,
                                     traces.first_sequence, trace), False),
            (sql.insert_message, rows(task_pk, first + (1 if journaled else 0)), True),
            (sql.update_task_after_checkpoint, (update.thread_id, update.channel, update.provider, update.model,
                                                added, turns, calls, *usage_params(None), update.checkpoint_note,
                                                now, now + 60, traces.last_sequence + 1, task_pk), False),
        ]

    return statements


def floor_answer(store: TaskStore, answer: ChatMessage, step: int, traces: PendingTraces
                 ) -> Callable[[int, int], list[tuple[str, Any, bool]]]:
    """The statements of a journaled answer: its message, its trace batch, the task's counters and usage."""
    sql, now = store.context.sql, time.time()
    rows = _rows([answer], step)
    events, refers = traces.encode(positions_by_text([answer], PRIOR_MESSAGES))
    calls = len(answer.tool_calls or ())

    def statements(task_pk: int, position: int) -> list[tuple[str, Any, bool]]:
        return [
            (sql.insert_message, rows(task_pk, position), True),
            (sql.insert_trace_batch, (task_pk, traces.first_sequence, traces.last_sequence, traces.started_at,
                                      traces.agent, traces.model, traces.job_type, events, refers), False),
            (sql.update_task_after_answer, (1 + calls, calls, *usage_params(None), now, now + 60,
                                            traces.last_sequence + 1, task_pk), False),
        ]

    return statements


def floor_result(result: ChatMessage, step: int, store: TaskStore
                 ) -> Callable[[int, int], list[tuple[str, Any, bool]]]:
    """The statement of a journaled result: its message, in the position the answer reserved (answer + 1)."""
    rows = _rows([result], step, success=True)
    sql = store.context.sql
    return lambda task_pk, position: [(sql.insert_message, rows(task_pk, position - 2), True)]


# -- measuring -----------------------------------------------------------------------------------

#: The writes measured, in print order.
WRITES = ("checkpoint", "journal_answer", "journal_result", "completion")
FLOORS = ("sequential", "pipelined")


class Samples:
    """Per write and per side (longhaul, each floor): wall and client CPU times in ms, round trips of one sample."""

    def __init__(self) -> None:
        self.ms: dict[tuple[str, str], list[float]] = {}
        self.cpu_ms: dict[tuple[str, str], list[float]] = {}
        self.trips: dict[tuple[str, str], int] = {}

    def time(self, write: str, side: str, conn: Any, call: Callable[[], object], *, count: bool) -> None:
        if count:  # off the clock: tracing costs
            with RoundTrips(conn) as trips:
                call()
            self.trips[(write, side)] = trips.count
            return
        started, cpu_started = time.perf_counter_ns(), time.thread_time_ns()
        call()
        self.cpu_ms.setdefault((write, side), []).append((time.thread_time_ns() - cpu_started) / 1e6)
        self.ms.setdefault((write, side), []).append((time.perf_counter_ns() - started) / 1e6)


class Bench:
    """A store and both floors on one server, the tasks each writes to, and their samples."""

    def __init__(self, url: str, plan: Plan) -> None:
        self.store = TaskStore(url)
        self.plan = plan
        self.floors = {name: Floor(url, pipelined=name == "pipelined") for name in FLOORS}
        self.samples = Samples()
        self.tokens: dict[str, str] = {}
        self.writers: dict[str, StepWriter] = {}

    def make_task(self, task_id: str) -> None:
        """A task with `PRIOR_MESSAGES` messages and a lease (off the clock)."""
        store = self.store
        store.record_checkpoint(step_update(task_id, 0, 0).model_copy(update={"new_messages": history(PRIOR_MESSAGES)}))
        token = self.tokens[task_id] = uuid.uuid4().hex
        store.db.execute_sql('UPDATE "task" SET "lease_token" = %s, "lease_expires_at" = %s WHERE "task_id" = %s',
                             (token, time.time() + 3600, task_id))
        self.writers[task_id] = StepWriter(task_id, store.next_trace_sequence(task_id))

    def step(self, side: str, task_id: str, step: int, *, count: bool) -> None:
        """One step of each write kind on `side` (``longhaul`` or a floor's name)."""
        writer, token, samples = self.writers[task_id], self.tokens[task_id], self.samples
        floor = self.floors.get(side)
        conn = self.store.db.connection() if floor is None else floor.conn
        # A whole step in one checkpoint.
        answer, answer_traces = writer.answer(step, 1)
        result = writer.result(step, answer.tool_calls[0])
        update = step_update(task_id, 3 * step, 0).model_copy(update={"new_messages": [answer, result]})
        traces = writer.completion(3 * step)
        if floor is None:
            samples.time("checkpoint", side, conn, lambda: self.store.record_checkpoint(
                update, lease_token=token, lease_s=60, traces=_joined(answer_traces, traces)), count=count)
        else:
            statements = floor_checkpoint(self.store, update, _joined(answer_traces, traces), journaled=False)
            samples.time("checkpoint", side, conn, lambda: floor.write(task_id, token, statements), count=count)
        # A journaled step of one call: the answer, then the checkpoint with its result.
        answer, answer_traces = writer.answer(step, 1)
        result = writer.result(step, answer.tool_calls[0])
        update = step_update(task_id, 3 * step + 1, 0).model_copy(update={"new_messages": [answer, result]})
        opened: list[OpenStep] = []
        if floor is None:
            samples.time("journal_answer", side, conn, lambda: opened.append(self.store.journal_answer(
                task_id, 3 * step + 1, answer, lease_token=token, lease_s=60, traces=answer_traces)), count=count)
            traces = writer.completion(3 * step + 1)
            samples.time("completion", side, conn, lambda: self.store.record_checkpoint(
                update, lease_token=token, lease_s=60, traces=traces, journal=opened[0]), count=count)
        else:
            statements = floor_answer(self.store, answer, 3 * step + 1, answer_traces)
            samples.time("journal_answer", side, conn, lambda: floor.write(task_id, token, statements), count=count)
            statements = floor_checkpoint(self.store, update, writer.completion(3 * step + 1), journaled=True)
            samples.time("completion", side, conn, lambda: floor.write(task_id, token, statements), count=count)
        # A journaled step of two calls: the first result is stored as it returns.
        answer, answer_traces = writer.answer(step, 2)
        first = writer.result(step, answer.tool_calls[0])
        if floor is None:
            opened[:] = [self.store.journal_answer(task_id, 3 * step + 2, answer, lease_token=token,
                                                   traces=answer_traces)]
            samples.time("journal_result", side, conn, lambda: self.store.journal_result(
                opened[0], 0, first, lease_token=token, success=True), count=count)
            second = writer.result(step, answer.tool_calls[1])
            self.store.record_checkpoint(
                step_update(task_id, 3 * step + 2, 0).model_copy(update={"new_messages": [answer, first, second]}),
                lease_token=token, traces=writer.completion(3 * step + 2), journal=opened[0].with_result(0, first))
        else:
            floor.write(task_id, token, floor_answer(self.store, answer, 3 * step + 2, answer_traces))
            statements = floor_result(first, 3 * step + 2, self.store)
            samples.time("journal_result", side, conn, lambda: floor.write(task_id, token, statements), count=count)
            writer.result(step, answer.tool_calls[1])
            writer.completion(3 * step + 2)  # the floor's tasks need no checkpoint to go on

    def run(self) -> dict[str, Any]:
        sides = ("longhaul", *FLOORS)
        task_ids = {side: [f"{side}-{n}" for n in range(self.plan.tasks)] for side in sides}
        for ids in task_ids.values():
            for task_id in ids:
                self.make_task(task_id)
        self.store.db.connect(reuse_if_open=True)  # hold one connection: the one the round trips are read on
        for side in sides:  # warm-up (statement caches, plans), and the round trips, off the clock
            self.step(side, task_ids[side][0], 1, count=False)
            self.step(side, task_ids[side][0], 2, count=True)
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection landing in one sample is noise, not write cost
        try:
            for step in range(3, 3 + self.plan.steps):
                for index in range(self.plan.tasks):
                    for side in sides:  # interleaved: the machine's noise lands on every side alike
                        self.step(side, task_ids[side][index], step, count=False)
        finally:
            if gc_was_enabled:
                gc.enable()
        samples = self.samples
        return {
            "samples": self.plan.tasks * self.plan.steps,
            "median_ms": {f"{write}/{side}": statistics.median(values) for (write, side), values in samples.ms.items()},
            "median_cpu_ms": {f"{write}/{side}": statistics.median(values)
                              for (write, side), values in samples.cpu_ms.items()},
            "round_trips": {f"{write}/{side}": count for (write, side), count in samples.trips.items()},
        }

    def close(self) -> None:
        for floor in self.floors.values():
            floor.close()
        self.store.close_all()


def _joined(first: PendingTraces, then: PendingTraces) -> PendingTraces:
    """One batch of both: a whole step written at once carries its answer's events too."""
    return PendingTraces(agent=first.agent, model=first.model, job_type=first.job_type, started_at=first.started_at,
                         first_sequence=first.first_sequence, events=first.events + then.events)


def run(plan: Plan) -> dict[str, Any]:
    server = PostgresServer().start()
    try:
        bench = Bench(server.create_database("bench"), plan)
        try:
            return bench.run()
        finally:
            bench.close()
    finally:
        server.stop()


def print_table(result: dict[str, Any]) -> None:
    trips = result["round_trips"]
    print(f"PostgreSQL step writes against raw psycopg 3 floors for the same rows, medians of {result['samples']} "
          "each")
    for figure, label in (("median_ms", "wall-clock ms (round trips)"), ("median_cpu_ms", "client CPU ms")):
        medians = result[figure]
        print()
        print(f"{label:<28} {'longhaul':>12} {'floor, seq.':>12} {'floor, pipel.':>13} {'/ seq.':>7} {'/ pipel.':>8}")
        for write in WRITES:
            ours = medians[f"{write}/longhaul"]
            cells = [f"{medians[f'{write}/{side}']:.3f}" + (f" ({trips[f'{write}/{side}']})" if figure == "median_ms"
                                                            else "") for side in ("longhaul", *FLOORS)]
            print(f"{write:<28} {cells[0]:>12} {cells[1]:>12} {cells[2]:>13} "
                  f"{ours / medians[f'{write}/sequential']:>6.2f}x {ours / medians[f'{write}/pipelined']:>7.2f}x")
    print()
    print("checkpoint: a whole tool step; journal_answer + completion: the same step journaled "
          "(the step loop's path); journal_result: the first result of a two-call step")


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, lambda quick: run(QUICK if quick else FULL), print_table,
               quick_help="fewer samples; finishes in a few seconds", argv=argv)


if __name__ == "__main__":
    main()
