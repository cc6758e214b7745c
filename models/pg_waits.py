"""psycopg's socket waits in a greenlet process: one gevent watcher on the connection's socket.

psycopg drives every exchange with the server as a generator that says
what it waits for (the socket readable, writable, or either) and a wait
function that answers when. In a process gevent patched, psycopg picks
``wait_poll`` over the patched ``select.poll``, which emulates poll in
Python: a poll object, its registrations, a result object and a gevent
``Timeout`` (psycopg waits in 0.1 s slices) on every wait, two or more per
round trip. Measured on a pipelined step write (locked read, then update):
0.47-0.54 ms of client CPU per write with it, 0.28-0.33 ms with
`wait_on_hub`.

`wait_on_hub` (made by `hub_wait`, which imports gevent and psycopg once)
waits on a libev io watcher for the same socket through the hub, as
gevent's own sockets do, and keeps ``wait_poll``'s contract: after
each `interval` without an event the generator is told so (psycopg's
``notifies`` returns on it), and `timeout` raises psycopg's
``_WaitTimeout``. `use_hub_waits` installs it as psycopg's wait (psycopg
looks ``waiting.wait`` up on each call); the store does that when it
opens PostgreSQL in a greenlet process (`models.db`). Opening a
connection keeps psycopg's own wait (its socket changes while it connects).
"""

from __future__ import annotations

from time import monotonic
from typing import Any, Callable, Generator, Optional


def hub_wait() -> Callable[..., Any]:
    """`wait_on_hub`, psycopg's ``wait(gen, fileno, interval, timeout)`` on the calling thread's gevent hub."""
    from gevent import getcurrent
    from gevent.hub import get_hub
    from psycopg import errors
    from psycopg.waiting import Ready

    readiness = (Ready.NONE, Ready.R, Ready.W, Ready.RW)

    def wait_on_hub(gen: Generator[Any, Any, Any], fileno: int, interval: Optional[float] = 0.0,
                    timeout: Optional[float] = None) -> Any:
        """Run psycopg's generator `gen` on socket `fileno` to its end; its result."""
        if interval is None:
            raise ValueError("indefinite wait not supported anymore")  # as psycopg's own waits say
        hub = get_hub()
        loop, resume = hub.loop, getcurrent().switch
        deadline = None if timeout is None else monotonic() + timeout
        watchers: dict[int, Any] = {}  # by the events waited for
        try:
            waiting_for = next(gen)
            while True:
                slice_s: Optional[float] = interval if interval > 0 else None
                if deadline is not None:
                    left = max(0.0, deadline - monotonic())
                    slice_s = left if slice_s is None else min(slice_s, left)
                io = watchers.get(waiting_for)
                if io is None:
                    io = watchers[waiting_for] = loop.io(fileno, int(waiting_for))
                io.start(resume, pass_events=True)  # the hub switches back with libev's events
                timer = None
                if slice_s is not None:  # a new one each time: a restarted libev timer fires at once
                    timer = loop.timer(slice_s)
                    timer.start(resume, 0)  # no event within the slice
                try:
                    events = hub.switch()
                finally:
                    io.stop()
                    if timer is not None:
                        timer.close()
                if events and not events & 3:  # libev's error bit alone: the descriptor is no socket any more
                    raise errors.OperationalError("connection socket closed")
                waiting_for = gen.send(readiness[events & 3])
                if not events and deadline is not None and monotonic() >= deadline:
                    raise errors._WaitTimeout("wait timeout expired")
        except StopIteration as ended:
            return ended.value
        finally:
            for io in watchers.values():
                io.close()

    return wait_on_hub


def use_hub_waits() -> None:
    """Make `wait_on_hub` psycopg's wait in this process (idempotent); call only once gevent patched it."""
    import psycopg.waiting

    if getattr(psycopg.waiting.wait, "__name__", "") != "wait_on_hub":
        psycopg.waiting.wait = hub_wait()


__all__ = ["hub_wait", "use_hub_waits"]
