"""`WorkerContext`: what a process's parts use of the runtime that wires them.

The broker's actor, the middleware, one delivery (`execute`), the step loop
and recovery are handed the process's runtime; they see it through this
protocol, so none of them imports `runtime`, the module that builds them.
That keeps the wiring at the top of the import ladder.
"""

from __future__ import annotations

import threading
from typing import Mapping, Optional, Protocol

from dramatiq import Actor, Broker

from longhaul.models import Claim, Claimant, LeaseBook, TaskStore

from .live import LiveOutput
from .observe import Observer
from .providers import ProviderFactory
from .settings import Settings


class WorkerContext(Protocol):
    """Settings, store, leases, broker and stop flag of one process (see `runtime.Runtime`)."""

    settings: Settings
    store: TaskStore
    leases: LeaseBook
    #: True for the in-process broker of `longhaul run` (no boot scan of other tasks).
    embedded: bool
    #: Set when the worker is shutting down: running loops stop after their current step.
    stopping: threading.Event
    broker: Broker
    actor: Actor
    #: Live output on Redis (`longhaul follow`); None for the embedded broker.
    live: Optional[LiveOutput]
    #: The providers tasks may name; None: the process's registry, read at each use.
    providers: Optional[Mapping[str, ProviderFactory]]

    @property
    def observer(self) -> Observer:
        """Hears this process's runs, recoveries and takeovers (metrics, spans; see `observe`)."""
        ...

    @property
    def claimant(self) -> Claimant:
        """This process as a lease holder."""
        ...

    def track(self, claim: Claim) -> None:
        """Note a lease this process now holds (renewed by the maintenance thread)."""
        ...

    def untrack(self, claim: Claim) -> None:
        """Forget a lease this process let go of."""
        ...

    def running_here(self, task_id: str) -> bool:
        """Whether a worker thread of this process runs the task right now."""
        ...

    def held_tokens(self) -> list[str]:
        """The tokens of the leases this process holds."""
        ...

    def send(self, task_id: str) -> None:
        """Put a message for the task on the broker."""
        ...

    def send_many(self, task_ids: list[str]) -> None:
        """Put a message for each of these tasks on the broker: one round trip, one store write."""
        ...

    def remaining_time_limit_ms(self, task_id: str) -> int:
        """The task's time budget left, in milliseconds."""
        ...

    def start_maintenance(self, *, recover: bool) -> None:
        """Start the thread that renews leases (and, with `recover`, re-sends interrupted tasks)."""
        ...

    def stop_maintenance(self) -> None:
        """Stop that thread."""
        ...
