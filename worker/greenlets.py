"""Greenlet worker processes: a task waiting on its model holds a greenlet, not an OS thread.

A `longhaul worker` process runs its Dramatiq worker threads as gevent
greenlets (`LONGHAUL_WORKER_POOL=greenlets`, the default): the standard
library's sockets, locks, queues and sleeps are patched to cooperate, so a
thousand tasks waiting on model calls share one OS thread. Against a
thousand OS threads that costs no thread stacks, no GIL hand-offs between
threads (system time) and no lock convoys. Dramatiq supports it as it is
(its time limits and shutdown notices use gevent's timeouts), and so does
psycopg (it waits on patched ``select``); SQLite calls never wait on a
socket, and the store's in-process writer lock queues greenlets
cooperatively.

`patch_process` must run before anything else is imported (see
`greenlet_process`). It also mends one interaction: httpcore asks whether
an idle keep-alive connection was dropped with ``select.poll(...).poll(0)``;
gevent's patched poll turns that zero-timeout check into a trip through
the hub (a switch and a timer per idle connection per request). The check
never waits, so it uses the unpatched poll.

What stays the user's concern: code that blocks in C without going
through the patched standard library (a CPU-heavy computation, a C
database driver) stalls every task of the process while it runs. A tool
that does that says ``Tool(blocking=True)``, and `off_hub` runs it on a
native thread.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

#: Native threads for `blocking` tools per greenlet process (each call holds one while it runs).
BLOCKING_TOOL_THREADS = 32

_blocking_pool: Optional[Any] = None


def patch_process() -> None:
    """Make this process's worker threads greenlets (gevent's ``patch_all``) and mend httpcore's idle check."""
    from gevent import monkey

    monkey.patch_all()
    _use_native_poll_for_idle_checks(monkey.get_original("select", "poll"))


def active() -> bool:
    """Whether this process was patched for greenlets: the store's own test (it picks its SQLite waits by it).

    Imported here, not at the top: `patch_process` must run before the store's modules are imported.
    """
    from longhaul.models.db import greenlets_patched

    return greenlets_patched()


def off_hub(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on a native thread when the process runs greenlets (else right here); its result or error.

    The calling greenlet waits cooperatively: the process's other tasks go
    on meanwhile. At most `BLOCKING_TOOL_THREADS` such calls run at once.
    """
    if not active():
        return work(*args)
    global _blocking_pool
    if _blocking_pool is None:
        from gevent.threadpool import ThreadPool

        _blocking_pool = ThreadPool(BLOCKING_TOOL_THREADS)
    finished, outcome = _blocking_pool.apply(_outcome_of, (work, args))
    if not finished:
        raise outcome
    return outcome  # type: ignore[no-any-return]


def _outcome_of(work: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, exception)``: gevent's pool would print a raised error to stderr
    (past the log redaction) and hand a SystemExit to the process's main greenlet."""
    try:
        return True, work(*args)
    except BaseException as exc:  # re-raised in the caller, whatever it is
        return False, exc


def _use_native_poll_for_idle_checks(native_poll: Callable[[], Any]) -> None:
    import select

    import httpcore._backends.sync as sync_backend

    def is_socket_readable(sock: Any) -> bool:
        fd = None if sock is None else sock.fileno()
        if fd is None or fd < 0:  # gone: reads as readable (at EOF), as httpcore's own check says
            return True
        poller = native_poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    sync_backend.is_socket_readable = is_socket_readable  # type: ignore[assignment]
