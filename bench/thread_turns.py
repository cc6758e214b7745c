"""Threads: loading a thread's story, and how fast live output reaches a follower.

1. **Story load.** A thread of N finished tasks (1,000 by default) on a
   fresh SQLite file; `TaskStore.thread_story` (what every new task on the
   thread starts from) timed many times. Baseline in the same run: loading
   one task's whole record (`store.load`), which is what the old design read
   (the thread's most recently updated task). Target: <= 20 ms at 1,000 tasks.
2. **Live chunk latency.** A real redis-server; a publisher (`LiveOutput`,
   what a worker's trace writer calls per chunk) emits chunks every 5 ms
   while a follower thread reads the task's stream (`follow_stream`, XREAD
   BLOCK); the latency is the follower's receipt time minus the emit time.
   Baseline: bare redis-py XADD / XREAD on the same server. Also the cost
   of one publish on the worker's hot path, in microseconds. Target: chunks
   reach a follower within 250 ms.

    python bench/thread_turns.py            # about 15 s
    python bench/thread_turns.py --quick    # about 5 s (CI)
"""

from __future__ import annotations

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
        assert len(store.thread_story("chat").turns) == 2 * tasks
        story_ms, record_ms = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            store.thread_story("chat", before_task_id=f"t{tasks - 1}")
            story_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            store.load(f"t{tasks - 1}")
            record_ms.append((time.perf_counter() - started) * 1000)
        store.close_all()
    return {"tasks": tasks, "story_median_ms": statistics.median(story_ms), "story_max_ms": max(story_ms),
            "one_record_median_ms": statistics.median(record_ms)}


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
    result: dict[str, Any] = {"story": story_load(1000, 20 if quick else 200)}
    if shutil.which("redis-server") is None:
        result["live"] = "skipped: redis-server not installed"
    else:
        with tempfile.TemporaryDirectory() as folder:
            result["live"] = live_latency(100 if quick else 1000, Path(folder))
    return result


def report(result: dict[str, Any]) -> None:
    story = result["story"]
    print(f"thread story of {story['tasks']} finished tasks: median {story['story_median_ms']:.2f} ms, "
          f"max {story['story_max_ms']:.2f} ms (target <= 20 ms); one task's whole record "
          f"{story['one_record_median_ms']:.2f} ms "
          f"(ratio {story['story_median_ms'] / story['one_record_median_ms']:.1f}x)")
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
