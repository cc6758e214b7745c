"""Shared `httpx.Client`s: a few per process and endpoint, for every task the process runs.

Building an `httpx.Client` builds an SSL context: 26-45 ms of CPU and about
0.8 MB each, which a worker holding hundreds of tasks in flight paid once
per task run (issue 16). A client is safe to share between threads (its
connection pool is locked), so each process keeps its clients per (base
URL, timeout), all on one SSL context, and every provider instance borrows
one: keep-alive connections are reused across tasks.

Why a few and not one: httpcore's pool looks through every connection it
holds on each request (``_assign_requests_to_connections``, with a socket
readability check per idle connection), so one client serving a thousand
requests in flight costs O(n) per request: measured, 20-27 ms of CPU per
model turn with 200-1,000 in flight, against about 1 ms with 64. So a
thread is given one of up to `MAX_SHARDS` clients (round-robin, for its
life), each holding the connections of its own threads only: with 500
tasks in flight per process, about 8 each (16 clients, about 31 each,
still spent about 6% of a process's CPU looking through its pool). The
connection count is unbounded (a task waits on its own request, never on
a free slot).

Each request in flight waits in ``sock.recv(READ_NUM_BYTES)``, and
httpcore asks for 64 KiB at a time: a 64 KiB buffer per task waiting on
its model, about 60 MB of a worker's RSS at a thousand in flight. Model
answers are a few KiB, so this process's sync HTTP/1.1 connections read
`READ_CHUNK_BYTES` at a time instead (httpcore's class attribute, set once
on import; a longer answer simply takes more reads).

A forked child gets clients of its own (a pool's sockets belong to the
process that opened them). The clients live as long as the process.
"""

from __future__ import annotations

import itertools
import os
import ssl
import threading
from typing import Optional

import httpcore._sync.http11
import httpx

#: How much one read of a model's answer asks the socket for (httpcore's default: 64 KiB).
READ_CHUNK_BYTES = 8 * 1024
httpcore._sync.http11.HTTP11Connection.READ_NUM_BYTES = READ_CHUNK_BYTES

#: Clients per process and endpoint; the threads of a process are spread over them round-robin.
MAX_SHARDS = 64
#: Idle keep-alive connections one client keeps.
MAX_KEEPALIVE_CONNECTIONS = 256

_clients: dict[tuple[int, str, float, int], httpx.Client] = {}
_lock = threading.Lock()
_ssl: dict[int, ssl.SSLContext] = {}  # pid -> the process's one SSL context
_next_shard = itertools.count()
_thread = threading.local()


def shared_client(base_url: str, *, timeout_s: float) -> httpx.Client:
    """This thread's client for requests to `base_url`, `timeout_s` seconds per connect/read/write/pool wait."""
    shard: Optional[int] = getattr(_thread, "shard", None)
    if shard is None:
        shard = _thread.shard = next(_next_shard) % MAX_SHARDS
    key = (os.getpid(), base_url, float(timeout_s), shard)
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = _new_client(timeout_s)
    return client


def _new_client(timeout_s: float) -> httpx.Client:
    context = _ssl.get(os.getpid())
    if context is None:
        context = _ssl[os.getpid()] = httpx.create_ssl_context()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS)
    return httpx.Client(timeout=httpx.Timeout(timeout_s), limits=limits, verify=context,
                        headers={"User-Agent": "longhaul"})
