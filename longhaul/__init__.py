"""longhaul: durable background jobs for long-horizon AI agent tasks.

Everything an application needs is here: define agents, tools and
providers in an app module (named with ``--app`` / ``LONGHAUL_APP`` so every
worker imports it), then enqueue or run tasks.
"""

from __future__ import annotations

from longhaul.models import (
    Budget,
    ChatMessage,
    CorruptRecord,
    InvalidDatabaseUrl,
    InvalidInput,
    LeaseLost,
    LonghaulError,
    SchemaTooNew,
    StoreUnavailable,
    TaskNotFound,
    TaskNotResumable,
    TaskStatus,
    TaskStore,
    ToolCall,
    TraceSequenceClash,
    UnstorableValue,
    Usage,
)
from longhaul.worker import (
    BrokerRequired,
    SettingsError,
    TaskBusy,
    TaskExists,
    cancel,
    enqueue,
    rerun,
    resume,
    run_inline,
    wait_for,
)
from longhaul.worker.agents import Agent, DuplicateAgent, UnknownAgent
from longhaul.worker.apps import AppImportError
from longhaul.worker.budgets import BudgetExceeded
from longhaul.worker.providers import (
    AssistantTurn,
    PermanentProviderError,
    ProviderError,
    StepContext,
    TransientProviderError,
    UnknownProvider,
    register_provider,
)
from longhaul.worker.tools import ToolContext, ToolError, UnknownTool, register_tool, tool

__all__ = [
    # Running tasks
    "enqueue", "run_inline", "resume", "cancel", "rerun", "wait_for",
    # Defining agents, tools and providers (in app modules)
    "Agent", "Budget", "tool", "register_tool", "ToolContext", "register_provider", "AssistantTurn",
    "StepContext",
    # Data
    "ToolCall", "ChatMessage", "Usage", "TaskStatus", "TaskStore",
    # Errors: every one derives from LonghaulError; InvalidInput ones mean "the caller asked for something wrong"
    "LonghaulError",
    "InvalidInput", "AppImportError", "BrokerRequired", "DuplicateAgent", "InvalidDatabaseUrl", "SettingsError",
    "TaskExists", "UnknownAgent", "UnknownProvider", "UnknownTool",
    "BudgetExceeded", "CorruptRecord", "LeaseLost", "SchemaTooNew", "StoreUnavailable", "TaskBusy", "TaskNotFound",
    "TaskNotResumable", "ToolError", "TraceSequenceClash", "UnstorableValue",
    "ProviderError", "PermanentProviderError", "TransientProviderError",
]
