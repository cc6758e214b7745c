"""Shared fixtures: a fresh store per test (SQLite, or PostgreSQL where a module asks), real Redis, real workers.

A test runs on SQLite unless its module (or the test) is marked
``@pytest.mark.backends("sqlite", "postgres")``: it then runs once per
backend, each PostgreSQL run in a fresh, empty schema of one database on
the session's server. ``@pytest.mark.sqlite_only(reason)`` skips the
PostgreSQL run of a test that checks something only SQLite has.
"""

from __future__ import annotations

import pytest

#: The fixture families, one module each (tests/fixtures/).
pytest_plugins = [
    "tests.fixtures.stores",
    "tests.fixtures.records",
    "tests.fixtures.cli",  # before servers, which imports it
    "tests.fixtures.servers",
    "tests.fixtures.runtimes",
    "tests.fixtures.chaos",
]

BACKENDS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run tests marked ``backends(...)`` once per named backend (the PostgreSQL run of ``sqlite_only`` skipped)."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None or "backend" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(BACKENDS)
    assert marker.args and not unknown, f"backends(...) takes some of {BACKENDS}, got {marker.args}"
    sqlite_only = metafunc.definition.get_closest_marker("sqlite_only")
    params = [
        pytest.param(name, marks=pytest.mark.skip(reason=f"SQLite only: {sqlite_only.args[0]}"))
        if sqlite_only is not None and name != "sqlite" else name
        for name in marker.args
    ]
    metafunc.parametrize("backend", params, indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every PostgreSQL run ``postgres``, so ``-m "not postgres"`` leaves them all out."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgres":
            item.add_marker(pytest.mark.postgres)
