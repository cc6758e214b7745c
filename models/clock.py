"""`ServerClock`: one clock for every host sharing a store, the database server's.

Lease expiry is compared across hosts: a worker whose clock runs a minute
fast would see every other worker's lease as expired and take its task
over. So every time the store writes or compares comes from this host's
clock corrected by its measured offset from the database server's clock
(PostgreSQL's ``clock_timestamp()``); on SQLite, one file on one host, the
offset is zero. The offset is measured when the store opens and again on
every lease renewal, so a host clock that drifts or is stepped is caught
within one heartbeat. Measuring costs one round trip; its error is at most
half of it (sub-millisecond on a LAN), far below any lease length.
"""

from __future__ import annotations

import time
from typing import Callable

#: Seconds since the epoch, now; injected so tests can fix time.
Clock = Callable[[], float]


class ServerClock:
    """This host's ``time.time()`` plus its offset from the server's clock, in seconds since the epoch."""

    def __init__(self) -> None:
        #: server clock minus this host's clock, seconds (positive: this host is slow).
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s

    def sync(self, server_epoch_s: Callable[[], float]) -> float:
        """Measure the offset against `server_epoch_s` (one query to the server); returns it."""
        sent = time.time()
        server = server_epoch_s()
        received = time.time()
        self.offset_s = server - (sent + received) / 2
        return self.offset_s
