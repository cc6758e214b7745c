"""A simulated chat adapter: 50 threads, bursts of messages, one story per thread, in order.

Each thread gets bursts of 2-4 messages sent at once (users double-texting);
every message becomes a task on its thread (`longhaul.enqueue(...,
thread_id=...)`). longhaul runs a thread's tasks one at a time, in arrival
order, each starting from the answers before it. At the end the script
prints, per thread, whether its story (`longhaul.thread_turns`) holds every
message once, in the order sent, each followed by its answer.

    LONGHAUL_REDIS_URL=redis://localhost:6379/0 longhaul worker --processes 2 &   # your workers
    LONGHAUL_REDIS_URL=redis://localhost:6379/0 python examples/channel_bot.py

Without LONGHAUL_REDIS_URL it starts a throwaway redis-server and a
`longhaul worker --processes 2` on a temporary SQLite file, and stops them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 50


def simulate() -> int:
    import longhaul as lh

    rng = random.Random(15)
    sent: dict[str, list[str]] = {f"slack:C042:{n:04d}": [] for n in range(THREADS)}
    tasks: list[str] = []
    for burst in range(2):
        for thread_id, messages in sent.items():
            for _ in range(rng.randint(2, 4)):  # a burst: sent together, before any answer
                text = f"{thread_id} message {len(messages)} (burst {burst})"
                messages.append(text)
                tasks.append(lh.enqueue(text, thread_id=thread_id, channel="slack", steps=0))
    deadline = time.monotonic() + 300
    store = lh.TaskStore(os.environ["LONGHAUL_DATABASE_URL"])
    while not all(store.summary(task).status.is_terminal for task in tasks):
        if time.monotonic() > deadline:
            print("gave up waiting for the workers", file=sys.stderr)
            return 1
        time.sleep(0.2)
    broken = 0
    for thread_id, messages in sent.items():
        turns = lh.thread_turns(thread_id)
        users = [t.content for t in turns if t.role == "user"]
        answered = all(t.role == "assistant" and t.content.startswith("Done:") for t in turns[1::2])
        ok = users == messages and answered and len(turns) == 2 * len(messages)
        broken += not ok
        print(f"{thread_id}: {len(messages)} messages, story {'complete and in order' if ok else 'BROKEN'}")
    print(f"{THREADS - broken} of {THREADS} threads complete and in order")
    return 1 if broken else 0


def main() -> int:
    if os.environ.get("LONGHAUL_REDIS_URL"):

        return simulate()
    from longhaul.worker.testing import RedisServer

    with tempfile.TemporaryDirectory() as folder:
        redis = RedisServer(Path(folder)).start()
        env = {**os.environ, "LONGHAUL_REDIS_URL": redis.url,
               "LONGHAUL_DATABASE_URL": f"sqlite:///{folder}/bot.db", "dramatiq_queue_prefetch": "4"}
        os.environ.update(env)
        pool = subprocess.Popen([str(Path(sys.executable).with_name("longhaul")), "worker", "--processes", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:

            return simulate()
        finally:
            pool.terminate()
            pool.wait(60)
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
