"""Parts are handed what they need: reading a setting opens nothing, importing a part pulls in only its own.

Each check runs in a fresh interpreter from an empty folder, so nothing an
earlier test imported or built (a default runtime, a store) can hide a
lookup of the process's runtime or a database opened on the side.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BUILT_IN_TOOL_MODULES = ["longhaul.worker.tools.files", "longhaul.worker.tools.http", "longhaul.worker.tools.ledger"]


def run_python(code: str, cwd: Path, **env: str) -> str:
    """Run `code` in a fresh interpreter in `cwd` with LONGHAUL_* variables cleared; its stdout."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LONGHAUL_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_reading_a_tool_s_settings_from_an_empty_folder_creates_no_database(tmp_path: Path) -> None:
    code = ("from longhaul.worker.tools import ToolContext; import sys; "
            "s = ToolContext(task_id='t', step_index=1, call_index=0).get_settings(); "
            "print(s.lease_s, 'longhaul.worker.runtime' in sys.modules)")
    assert run_python(code, tmp_path, LONGHAUL_LEASE_S="17") == "17.0 False"
    assert list(tmp_path.iterdir()) == []  # no state/tasks.db, no state/ at all


def test_a_provider_built_without_settings_reads_the_environment_and_opens_nothing(tmp_path: Path) -> None:
    code = ("from longhaul.worker.providers.openai import OpenAIProvider; import sys; "
            "p = OpenAIProvider(); print(p.settings.openai_base_url, 'longhaul.worker.runtime' in sys.modules)")
    out = run_python(code, tmp_path, LONGHAUL_OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    assert out == "http://127.0.0.1:9/v1 False"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("provider", ["scripted", "openai", "anthropic"])
def test_importing_a_provider_imports_no_built_in_tool(tmp_path: Path, provider: str) -> None:
    code = (f"import sys, longhaul.worker.providers.{provider}; "
            f"print([m for m in {BUILT_IN_TOOL_MODULES!r} if m in sys.modules])")
    assert run_python(code, tmp_path) == "[]"
