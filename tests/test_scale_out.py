"""Many worker hosts on one PostgreSQL: cross-host takeover, and claims racing from many processes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from longhaul.models import Claimant, LeaseBook, TaskSpec, TaskStatus, TaskStore
from longhaul.worker.testing import run_released_together, wait_until
from tests.test_worker_redis import assert_exactly_once, enqueue_many

pytestmark = pytest.mark.backends("postgres")

#: Lease of the simulated hosts' workers: short, so a dead host's tasks are taken over within seconds.
LEASE_S = 2.0


@pytest.fixture
def start_host(start_worker):
    """Start one simulated worker host: its processes record `host` on their leases (LONGHAUL_WORKER_HOST)."""

    def start(host: str, *, processes: int = 2, threads: int = 4):
        return start_worker(processes=processes, threads=threads, LONGHAUL_WORKER_HOST=host,
                            LONGHAUL_LEASE_S=str(LEASE_S),
                            # A task whose message died in the killed host's prefetch is re-sent after this.
                            LONGHAUL_REDELIVERY_GRACE_S="3")

    return start


@pytest.mark.redis
@pytest.mark.crash
def test_a_dead_host_s_tasks_are_taken_over_by_another_host_once_their_leases_expire(
    client_runtime, start_host, longhaul, tmp_path: Path
):
    store, ledger, steps = client_runtime.store, tmp_path / "ledger.txt", 20
    host_a = start_host("host-a")
    start_host("host-b")
    task_ids = enqueue_many(20, steps=steps, step_delay_s=0.1, ledger=ledger)

    def mid_run_on_host_a() -> list[str]:
        summaries = [store.summary(t) for t in task_ids]
        return [s.task_id for s in summaries
                if s.lease and s.lease.host == "host-a" and 2 <= s.checkpoint_count < steps]

    wait_until(lambda: len(mid_run_on_host_a()) >= 2, timeout_s=60, what="host A to be mid-run on two tasks")

    host_a.kill()  # every process of host A, at once
    killed_at = time.time()
    at_kill = {t: store.summary(t) for t in task_ids}
    orphaned = {t: s for t, s in at_kill.items() if s.lease and s.lease.host == "host-a"}
    in_flight = {t: s.checkpoint_count + 1 for t, s in orphaned.items()}
    assert len(orphaned) >= 2, f"host A held too few tasks at the kill: {sorted(orphaned)}"
    shown = longhaul("show", next(iter(orphaned)))
    assert shown.returncode == 0, shown.stderr
    assert "host-a pid" in shown.stdout  # the lease names the dead host

    def taken_over() -> list[str]:
        return [t for t, s in orphaned.items() if store.summary(t).checkpoint_count > s.checkpoint_count]

    wait_until(taken_over, timeout_s=30, what="host B to resume a first task of host A")
    first_takeover_s = time.time() - killed_at
    wait_until(lambda: len(taken_over()) == len(orphaned), timeout_s=30,
               what="host B to resume every task of host A")
    all_taken_over_s = time.time() - killed_at
    wait_until(lambda: all(store.summary(t).status.is_terminal for t in task_ids), timeout_s=120,
               what="every task to finish")

    repeated = assert_exactly_once(store, task_ids, steps, ledger, in_flight)
    for task_id, summary in orphaned.items():
        record = store.get(task_id)
        first_new_step = record.checkpoints[summary.checkpoint_count]
        # Host B could not check host A's processes: it waited for the lease to expire.
        assert first_new_step.created_at >= summary.lease.expires_at, (task_id, first_new_step, summary.lease)
        resumed = [e for e in store.traces(task_id) if e.event_type == "resumed"
                   and e.data["from_step"] == summary.checkpoint_count + 1]
        assert resumed and resumed[-1].data["worker"].startswith("host-b:"), (task_id, resumed)
        # The takeover counted as a recovery (the steps stored since reset the task's count to 0).
        assert resumed[-1].data["recovery_count"] >= 1, resumed[-1]
    lease_left_s = max(s.lease.expires_at.timestamp() for s in orphaned.values()) - killed_at
    print(f"\ncross-host takeover (lease {LEASE_S:.0f} s): host B resumed a first task of host A "
          f"{first_takeover_s:.2f} s and all {len(orphaned)} of them {all_taken_over_s:.2f} s after host A was "
          f"killed (their leases had at most {lease_left_s:.2f} s left); {repeated} in-flight steps ran twice")


#: One contender process: `threads` threads race to claim every task, in the same order, until all are done.
#: A winner records the claim's step with its token (fenced), holds the lease a moment, then releases it
#: (or finishes the task after its last round). Prints its claims and any error as JSON.
CONTENDER = """
import json, os, random, sys, threading, time, uuid
from pathlib import Path
from longhaul.models import CheckpointUpdate, Claimant, LeaseBook, LeaseLost, TaskStatus, TaskStore
from longhaul.worker.testing import wait_for_go

db_url, go = sys.argv[1], Path(sys.argv[5])
process, threads, rounds = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = TaskStore(db_url, pool_size=threads + 1)
book = LeaseBook(store)
task_ids = [row.task_id for row in store.list_tasks(limit=1000, order_by="created")]
claims, errors = [], []
wait_for_go(go, process)

def contend(thread):
    me = Claimant(owner=f"p{process}t{thread}:{uuid.uuid4().hex[:8]}", host=f"host-{process}", pid=os.getpid())
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if store.count_tasks(TaskStatus.COMPLETED) == len(task_ids):
                return
            for task_id in task_ids:
                claim = book.claim(task_id, me, lease_s=30)
                if claim is None:
                    continue
                step = store.summary(task_id).checkpoint_count + 1  # the lease holder's view: no race
                claims.append([task_id, step, me.owner])
                update = CheckpointUpdate(task_id=task_id, thread_id=task_id, channel="test", provider="p", model="m",
                                          step_index=step, checkpoint_note=me.owner)
                if not store.record_checkpoint(update, lease_token=claim.token):
                    errors.append(f"{task_id} step {step} was already recorded when {me.owner} claimed it")
                time.sleep(random.random() / 1000)
                if step == rounds:
                    store.finish(task_id, TaskStatus.COMPLETED, final_response=me.owner, lease_token=claim.token)
                elif not book.release(task_id, claim.token):
                    errors.append(f"{task_id}: {me.owner} lost its live lease before releasing it")
        errors.append(f"thread {thread} gave up at its deadline")
    except LeaseLost as exc:
        errors.append(f"{me.owner}: {exc}")
    except Exception as exc:
        errors.append(f"{me.owner}: {type(exc).__name__}: {exc}")

pool = [threading.Thread(target=contend, args=(t,)) for t in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
print(json.dumps({"claims": claims, "errors": errors}))
"""


def test_claims_racing_from_four_processes_of_eight_threads_never_share_a_live_lease(store, db_url, tmp_path: Path):
    tasks, rounds, processes, threads = 30, 4, 4, 8
    for n in range(tasks):
        assert store.create_task(task_id=f"task-{n:02d}", thread_id=f"task-{n:02d}", channel="test", provider="p",
                                 model="m", spec=TaskSpec(prompt="contend"))
    go = tmp_path / "go"
    outputs = run_released_together([[CONTENDER, db_url, str(p), str(threads), str(rounds), str(go)]
                                     for p in range(processes)], workdir=tmp_path, timeout_s=120)
    results = [json.loads(out) for out in outputs]

    errors = [e for r in results for e in r["errors"]]
    assert errors == []
    claims = [tuple(c) for r in results for c in r["claims"]]
    # One winner per (task, round): a second winner of a live lease would have repeated a step.
    assert len(claims) == len(set((task, step) for task, step, _ in claims)) == tasks * rounds
    for n in range(tasks):
        record = store.get(f"task-{n:02d}")
        assert record.status is TaskStatus.COMPLETED
        assert [c.step_index for c in record.checkpoints] == list(range(1, rounds + 1))
        assert record.recovery_count == 0  # each round gave its lease back: no round was a recovery
    winning_processes = {owner.split("t")[0] for _, _, owner in claims}
    assert len(winning_processes) > 1, "no contention: one process won every claim"


class SlowMessages:
    """A trigger that makes every message insert sleep, so a checkpoint stays in flight mid-transaction."""

    def __init__(self, backend: str, seconds: float) -> None:
        self.backend = backend
        self.seconds = seconds
        self._entered = threading.Event()

    def install(self, task_store: TaskStore) -> None:
        if self.backend == "sqlite":
            def sleep_s(seconds: float) -> int:
                self._entered.set()
                time.sleep(seconds)
                return 0

            task_store.db.register_function(sleep_s, "longhaul_test_sleep", 1)
            task_store.db.execute_sql('CREATE TRIGGER slow_messages BEFORE INSERT ON "message" '
                                      f"BEGIN SELECT longhaul_test_sleep({self.seconds}); END")
            return
        task_store.db.execute_sql("CREATE FUNCTION slow_messages() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                                  f"PERFORM pg_sleep({self.seconds}); RETURN NEW; END $$")
        task_store.db.execute_sql('CREATE TRIGGER slow_messages BEFORE INSERT ON "message" '
                                  "FOR EACH ROW EXECUTE FUNCTION slow_messages()")
        self._probe = task_store

    def entered(self) -> bool:
        """Whether a message insert is sleeping (or, on SQLite, has slept) inside its transaction."""
        if self.backend == "sqlite":
            return self._entered.is_set()
        with TaskStore(self._probe.url) as observer:
            return bool(observer.db.execute_sql(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'").fetchone()[0])


@pytest.fixture
def slow_messages(backend: str) -> Callable[[TaskStore], SlowMessages]:
    def install(task_store: TaskStore) -> SlowMessages:
        slow = SlowMessages(backend, seconds=1.0)
        slow.install(task_store)
        return slow

    return install


@pytest.mark.backends("sqlite", "postgres")
def test_a_claim_racing_a_checkpoint_in_flight_waits_for_it_and_finds_the_renewed_lease(
    clocked_store, clock, make_update, slow_messages
):
    store, book = clocked_store, LeaseBook(clocked_store)
    worker_a = Claimant(owner="host-a:1:a", host="host-a", pid=1)
    worker_b = Claimant(owner="host-b:2:b", host="host-b", pid=2)
    assert store.create_task(task_id="task-1", thread_id="thread-1", channel="telegram", provider="openai",
                             model="gpt-test", spec=TaskSpec(prompt="do it"))
    held = book.claim("task-1", worker_a, lease_s=30)
    clock.advance(31)  # A stalled past its lease; it does not know yet and checkpoints, renewing it
    renewed_until = clock() + 30
    slow = slow_messages(store)
    written: list[bool] = []
    checkpoint = threading.Thread(target=lambda: written.append(
        store.record_checkpoint(make_update(1), lease_token=held.token, lease_expires_at=renewed_until)))
    checkpoint.start()
    wait_until(slow.entered, timeout_s=10, what="the checkpoint to be in flight")

    # B claims the expired lease while A's checkpoint, which checked A's token, has not committed yet.
    stolen = book.claim("task-1", worker_b, lease_s=30)
    checkpoint.join(timeout=10)

    # Serialised after the checkpoint, the claim sees A's renewed lease and takes nothing: A's step
    # was written under a lease A still held, never over B's.
    assert written == [True]
    assert stolen is None
    lease = store.load("task-1").lease
    assert (lease.owner, lease.expires_at.timestamp()) == (worker_a.owner, renewed_until)
    assert store.load("task-1").checkpoint_count == 1
