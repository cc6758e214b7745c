"""Threads: loading a thread's story, and how fast live output reaches a follower.

1. **Story load.** A thread of N finished tasks (1,000 by default) on a
   fresh SQLite file; `TaskStore.thread_story` (what every new task on the
   thread starts from) timed over many reads: median, p95 and max wall
   time, the first read on its own, and the CPU time of the reading
   thread (so a worst case that is the OS scheduling other processes on a
   shared machine shows as wall >> CPU), with the GC runs counted. Baseline in the same run: loading
   one task's whole record (`store.load`), which is what the old design read
   (the thread's most recently updated task). Target: <= 20 ms at 1,000 tasks.
2. **Live chunk latency.** A real redis-server; a publisher (`LiveOutput`,
   what a worker's trace writer calls per chunk) emits chunks every 5 ms
   while a follower thread reads the task's stream (`follow_stream`, XREAD
   BLOCK); the latency is the follower's receipt time minus the emit time.
   Baseline: bare redis-py XADD / XREAD on the same server. Also the cost
   of one publish on the worker's hot path, in microseconds. Target: chunks
   reach a follower within 250 ms.

    python bench/thread_turns.py            # about 30 s
    python bench/thread_turns.py --quick    # about 5 s (CI)
"""

from __future__ import annotations

import gc
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from command_line import bench_main  # noqa: E402

from longhaul.models import TaskSpec, TaskStatus, TaskStore  # noqa: E402
from longhaul.worker.live import LiveOutput, follow_stream, task_key  # noqa: E402
from longhaul.worker.testing import RedisServer  # noqa: E402


def story_load(tasks: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        store = TaskStore(Path(folder) / "threads.db")
        Task = store.tables.Task
        for i in range(tasks):
            store.create_task(task_id=f"t{i}", thread_id="chat", channel="bench", provider="scripted", model="m",
                              spec=TaskSpec(prompt=f"message {i} " + "x" * 80))
        Task.update(status=TaskStatus.COMPLETED.value, final_response="an answer of some length " * 8).execute()
        first_started = time.perf_counter()  # the first read after the writes: cold statement cache
        assert len(store.thread_story("chat").turns) == 2 * tasks
        first_ms = (time.perf_counter() - first_started) * 1000
        story_ms, story_cpu_ms, record_ms = [], [], []
        with_full_gc, without_full_gc = [], []  # wall ms of the reads during which a full collection ran, or not
        collections = []
        gc.callbacks.append(on_gc := lambda phase, info: phase == "start" and collections.append(info["generation"]))
        try:
            for _ in range(repeats):
                full_before = collections.count(2)
                started, cpu_started = time.perf_counter(), time.thread_time()
                store.thread_story("chat", before_task_id=f"t{tasks - 1}")
                story_ms.append((time.perf_counter() - started) * 1000)
                story_cpu_ms.append((time.thread_time() - cpu_started) * 1000)
                (with_full_gc if collections.count(2) > full_before else without_full_gc).append(story_ms[-1])
                started = time.perf_counter()
                store.load(f"t{tasks - 1}")
                record_ms.append((time.perf_counter() - started) * 1000)
        finally:
            gc.callbacks.remove(on_gc)
        store.close_all()
    return {"tasks": tasks, "reads": repeats, "first_ms": first_ms, "story_median_ms": statistics.median(story_ms),
            "story_p95_ms": percentile(story_ms, 95), "story_max_ms": max(story_ms),
            "cpu_median_ms": statistics.median(story_cpu_ms), "cpu_p95_ms": percentile(story_cpu_ms, 95),
            "cpu_max_ms": max(story_cpu_ms), "gc_runs": len(collections),
            "gc_full_runs": collections.count(2), "max_without_full_gc_ms": max(without_full_gc, default=0.0),
            "median_with_full_gc_ms": statistics.median(with_full_gc) if with_full_gc else 0.0,
            "one_record_median_ms": statistics.median(record_ms)}


def percentile(values: list[float], pct: float) -> float:
    """The `pct` percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def _latencies(publish: Any, read: Any, chunks: int) -> list[float]:
    """Emit `chunks` chunks 5 ms apart; the follower's receipt time minus each chunk's emit time, in ms."""
    received: list[float] = []
    done = threading.Event()

    def follower() -> None:
        for text in read():
            received.append((time.time() - float(text)) * 1000)
            if len(received) == chunks:
                done.set()
                return

    reader = threading.Thread(target=follower, daemon=True)
    reader.start()
    time.sleep(0.2)  # the follower is blocked in XREAD
    for _ in range(chunks):
        publish(repr(time.time()))
        time.sleep(0.005)
    done.wait(30)
    return received


def live_latency(chunks: int, workdir: Path) -> dict[str, Any]:
    server = RedisServer(workdir).start()
    try:
        live = LiveOutput(server.url, retention_s=600, max_events=100_000)
        publisher = live.publisher("bench", "bench-thread")

        def read_live() -> Any:
            for _cursor, event in follow_stream(live, task_key("bench"), after="0-0", until_done_of=None,
                                                idle_timeout_s=30):
                if event["type"] == "chunk":
                    yield event["text"]

        ours = _latencies(lambda text: publisher("content", {"text": text}), read_live, chunks)
        raw = live.client

        def read_raw() -> Any:
            cursor = "0-0"
            while True:
                for _key, entries in raw.xread({"raw": cursor}, block=200) or ():
                    for entry_id, fields in entries:
                        cursor = entry_id
                        yield fields[b"t"].decode()

        floor = _latencies(lambda text: raw.xadd("raw", {"t": text}), read_raw, chunks)
        started = time.perf_counter()
        for _ in range(chunks):
            publisher("content", {"text": "a chunk of streamed text"})
        publish_us = (time.perf_counter() - started) / chunks * 1e6
        live.close()
    finally:
        server.stop()
    return {"chunks": chunks, "median_ms": statistics.median(ours), "max_ms": max(ours),
            "p99_ms": sorted(ours)[int(len(ours) * 0.99) - 1], "raw_median_ms": statistics.median(floor),
            "raw_max_ms": max(floor), "publish_us_per_chunk": publish_us, "received": len(ours)}


def measure(quick: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"story": story_load(1000, 100 if quick else 1000)}
    if shutil.which("redis-server") is None:
        result["live"] = "skipped: redis-server not installed"
    else:
        with tempfile.TemporaryDirectory() as folder:
            result["live"] = live_latency(100 if quick else 1000, Path(folder))
    return result


def report(result: dict[str, Any]) -> None:
    story = result["story"]
    print(f"thread story of {story['tasks']} finished tasks, {story['reads']} reads: median "
          f"{story['story_median_ms']:.2f} ms, p95 {story['story_p95_ms']:.2f} ms, max {story['story_max_ms']:.2f} ms "
          f"(target <= 20 ms); first read {story['first_ms']:.2f} ms; one task's whole record "
          f"{story['one_record_median_ms']:.2f} ms "
          f"(ratio {story['story_median_ms'] / story['one_record_median_ms']:.1f}x)")
    print(f"  CPU time of this thread per read: median {story['cpu_median_ms']:.2f} ms, p95 "
          f"{story['cpu_p95_ms']:.2f} ms, max {story['cpu_max_ms']:.2f} ms; "
          f"{story['gc_runs']} GC runs ({story['gc_full_runs']} full) "
          "during the reads (wall time far above CPU time is the OS running other processes, not the read)")
    print(f"  reads during which a full GC ran: median {story['median_with_full_gc_ms']:.2f} ms; worst read "
          f"without one {story['max_without_full_gc_ms']:.2f} ms")
    live = result["live"]
    if isinstance(live, str):
        print(f"live output: {live}")
        return
    print(f"live chunk latency over {live['chunks']} chunks: median {live['median_ms']:.2f} ms, p99 "
          f"{live['p99_ms']:.2f} ms, max {live['max_ms']:.2f} ms (target <= 250 ms); bare XADD/XREAD median "
          f"{live['raw_median_ms']:.2f} ms, max {live['raw_max_ms']:.2f} ms "
          f"(ratio {live['median_ms'] / live['raw_median_ms']:.2f}x); "
          f"publish {live['publish_us_per_chunk']:.0f} us/chunk")


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, measure, report, quick_help="fewer repetitions (about 5 s)", argv=argv)


if __name__ == "__main__":
    main()
