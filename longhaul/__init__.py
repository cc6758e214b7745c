"""longhaul: durable background jobs for long-horizon AI agent tasks.

Everything an application needs is here: define agents, tools and
providers in an app module (named with ``--app`` / ``LONGHAUL_APP`` so every
worker imports it), then enqueue or run tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from longhaul._lazy import lazy_exports

if TYPE_CHECKING:
    from longhaul.models import Budget, ChatMessage, OpenStep, TaskStatus, TaskStore, ToolCall, Usage
    from longhaul.models.errors import (
        CorruptRecord,
        InvalidCursor,
        InvalidDatabaseUrl,
        InvalidInput,
        LeaseLost,
        LonghaulError,
        NotWaiting,
        SchemaTooNew,
        StepNotForkable,
        StoreUnavailable,
        StoreUnusable,
        TaskNotFound,
        TaskNotResumable,
        TraceSequenceClash,
        UnstorableValue,
    )
    from longhaul.worker.agents import Agent
    from longhaul.worker.api import (
        approve,
        cancel,
        deny,
        enqueue,
        follow,
        fork,
        reply,
        rerun,
        resume,
        run_inline,
        thread_turns,
        wait_for,
    )
    from longhaul.worker.bulk import enqueue_many
    from longhaul.worker.errors import (
        AppImportError,
        BrokerRequired,
        BrokerUnavailable,
        BudgetExceeded,
        DuplicateAgent,
        InvalidBatchItem,
        InvalidFilter,
        PermanentProviderError,
        ProviderError,
        SettingsError,
        TaskBusy,
        TaskExists,
        ThreadBusy,
        ToolError,
        TransientProviderError,
        UnknownAgent,
        UnknownProvider,
        UnknownTool,
        WaitForReply,
    )
    from longhaul.worker.providers import AssistantTurn, StepContext, register_provider
    from longhaul.worker.tools import ToolContext, register_tool, tool

#: Each public name and the module that defines it; a name's module is imported when the name is first read.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["Budget", "ChatMessage", "OpenStep", "TaskStatus", "TaskStore", "ToolCall", "Usage"],
                    "longhaul.models"),
    **dict.fromkeys(["CorruptRecord", "InvalidCursor", "InvalidDatabaseUrl", "InvalidInput", "LeaseLost",
                     "LonghaulError", "NotWaiting", "SchemaTooNew", "StepNotForkable", "StoreUnavailable",
                     "StoreUnusable", "TaskNotFound", "TaskNotResumable", "TraceSequenceClash",
                     "UnstorableValue"], "longhaul.models.errors"),
    "Agent": "longhaul.worker.agents",
    **dict.fromkeys(["approve", "cancel", "deny", "enqueue", "follow", "fork", "reply", "rerun", "resume",
                     "run_inline", "thread_turns", "wait_for"], "longhaul.worker.api"),
    "enqueue_many": "longhaul.worker.bulk",
    **dict.fromkeys(["AppImportError", "BrokerRequired", "BrokerUnavailable", "BudgetExceeded", "DuplicateAgent",
                     "InvalidBatchItem", "InvalidFilter", "PermanentProviderError", "ProviderError", "SettingsError",
                     "TaskBusy", "TaskExists", "ThreadBusy", "ToolError", "TransientProviderError", "UnknownAgent",
                     "UnknownProvider", "UnknownTool", "WaitForReply"],
                    "longhaul.worker.errors"),
    **dict.fromkeys(["AssistantTurn", "StepContext", "register_provider"], "longhaul.worker.providers"),
    **dict.fromkeys(["ToolContext", "register_tool", "tool"], "longhaul.worker.tools"),
})

__all__ = [
    # Running tasks
    "enqueue", "enqueue_many", "run_inline", "resume", "cancel", "rerun", "wait_for",
    # Threads (channel bots)
    "thread_turns", "follow", "fork", "reply", "approve", "deny", "WaitForReply",
    # Defining agents, tools and providers (in app modules)
    "Agent", "Budget", "tool", "register_tool", "ToolContext", "register_provider", "AssistantTurn",
    "StepContext",
    # Data
    "ToolCall", "ChatMessage", "Usage", "TaskStatus", "TaskStore", "OpenStep",
    # Errors: every one derives from LonghaulError; InvalidInput ones mean "the caller asked for something wrong"
    "LonghaulError",
    "InvalidInput", "AppImportError", "BrokerRequired", "DuplicateAgent", "InvalidDatabaseUrl", "SettingsError",
    "TaskExists", "UnknownAgent", "UnknownProvider", "UnknownTool", "InvalidFilter", "InvalidBatchItem",
    "InvalidCursor",
    "BrokerUnavailable", "BudgetExceeded", "CorruptRecord", "LeaseLost", "SchemaTooNew", "StoreUnavailable", "TaskBusy",
    "StoreUnusable", "TaskNotFound", "TaskNotResumable", "NotWaiting", "ThreadBusy", "StepNotForkable", "ToolError",
    "TraceSequenceClash", "UnstorableValue",
    "ProviderError", "PermanentProviderError", "TransientProviderError",
]
