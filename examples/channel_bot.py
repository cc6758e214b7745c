"""A simulated chat adapter: 50 threads, bursts of messages, one story per thread, in order.

Each thread gets bursts of 2-4 messages sent at once (users double-texting);
every message becomes a task on its thread (`longhaul.enqueue(...,
thread_id=...)`). longhaul runs a thread's tasks one at a time, in arrival
order, each starting from the answers before it. At the end the script
prints, per thread, whether its story (`longhaul.thread_turns`) holds every
message once, in the order sent, each followed by its answer.

Every tenth thread starts with "book a table": its model asks the user
(`ask_user`, offered because the bot's tasks name it) and the task waits,
holding no worker. The bot sees the wait (`longhaul.follow`'s ``waiting``
event would do; here it polls `tasks --status waiting`'s query) and answers
either with `longhaul.reply` or by sending the next message the ordinary
way, which is the reply. That task's answer must quote the reply, and the
reply itself is no turn of its own.

    cd examples   # the workers import this file as the app module `channel_bot`
    LONGHAUL_REDIS_URL=redis://localhost:6379/0 longhaul worker --processes 2 --app channel_bot &
    LONGHAUL_REDIS_URL=redis://localhost:6379/0 python channel_bot.py

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

import longhaul as lh  # noqa: E402

THREADS = 50
#: The first message of every tenth thread: its model asks "for how many?" and waits for the user.
BOOKING = "book a table"


class BotModel:
    """A stand-in model: asks how many for a booking (`ask_user`), else answers ``Done: <the message>``."""

    name = "channel-bot"

    def next_turn(self, ctx: lh.StepContext) -> lh.AssistantTurn:
        last = ctx.history[-1]
        if last.role == "tool":  # the user's reply to the question
            return lh.AssistantTurn(f"Done: booked for {last.content}")
        if last.content.endswith(BOOKING):
            return lh.AssistantTurn("", [lh.ToolCall(id="ask", name="ask_user", arguments={"question": "how many?"})])
        return lh.AssistantTurn(f"Done: {last.content}")


lh.register_provider("channel-bot", BotModel)


def simulate() -> int:
    rng = random.Random(15)
    sent: dict[str, list[str]] = {f"slack:C042:{n:04d}": [] for n in range(THREADS)}
    asking = {thread_id: f"{n % 7 + 2} people" for n, thread_id in enumerate(sent) if n % 10 == 0}
    tasks: list[str] = []

    def send(thread_id: str, text: str) -> str:
        return lh.enqueue(text, thread_id=thread_id, channel="slack", provider="channel-bot", tools=["ask_user"])

    for thread_id in asking:
        sent[thread_id].append(f"{thread_id} {BOOKING}")
        tasks.append(send(thread_id, sent[thread_id][-1]))
    store = lh.TaskStore(os.environ["LONGHAUL_DATABASE_URL"])
    deadline = time.monotonic() + 300
    for n, (thread_id, people) in enumerate(asking.items()):
        while (waiting := store.waiting_task(thread_id)) is None:  # the model asked: the task waits for us
            if time.monotonic() > deadline:
                print(f"{thread_id}: the booking never asked", file=sys.stderr)
                return 1
            time.sleep(0.05)
        replied = lh.reply(thread_id, people) if n % 2 else send(thread_id, people)  # both are the reply
        assert replied == waiting, (replied, waiting)
    for burst in range(2):
        for thread_id, messages in sent.items():
            for _ in range(rng.randint(2, 4)):  # a burst: sent together, before any answer
                messages.append(f"{thread_id} message {len(messages)} (burst {burst})")
                tasks.append(send(thread_id, messages[-1]))
    while not all(store.summary(task).status.is_terminal for task in tasks):
        if time.monotonic() > deadline:
            print("gave up waiting for the workers", file=sys.stderr)
            return 1
        time.sleep(0.2)
    broken = 0
    for thread_id, messages in sent.items():
        turns = lh.thread_turns(thread_id)
        users = [t.content for t in turns if t.role == "user"]
        answers = [t.content for t in turns[1::2] if t.role == "assistant"]
        expected = [f"Done: booked for {asking[thread_id]}" if m.endswith(BOOKING) else f"Done: {m}"
                    for m in messages]
        ok = users == messages and answers == expected and len(turns) == 2 * len(messages)
        broken += not ok
        asked = " (asked the user, got the reply)" if thread_id in asking else ""
        print(f"{thread_id}: {len(messages)} messages{asked}, story {'complete and in order' if ok else 'BROKEN'}")
    print(f"{THREADS - broken} of {THREADS} threads complete and in order")
    return 1 if broken else 0


def main() -> int:
    if os.environ.get("LONGHAUL_REDIS_URL"):
        return simulate()
    from longhaul.worker.testing import RedisServer

    with tempfile.TemporaryDirectory() as folder:
        redis = RedisServer(Path(folder)).start()
        env = {**os.environ, "LONGHAUL_REDIS_URL": redis.url,
               "LONGHAUL_DATABASE_URL": f"sqlite:///{folder}/bot.db", "dramatiq_queue_prefetch": "4",
               "LONGHAUL_APP": "channel_bot"}
        os.environ.update(env)
        pool = subprocess.Popen([str(Path(sys.executable).with_name("longhaul")), "worker", "--processes", "2"],
                                env=env, cwd=Path(__file__).parent, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            return simulate()
        finally:
            pool.terminate()
            pool.wait(60)
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
