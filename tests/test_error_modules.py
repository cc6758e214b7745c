"""Errors live in one module per layer, all under `LonghaulError`, all exported from the `longhaul` face."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import longhaul
import longhaul.models
import longhaul.models.errors
import longhaul.worker
import longhaul.worker.errors

ERROR_MODULES = {"longhaul.models": longhaul.models.errors, "longhaul.worker": longhaul.worker.errors}


def public_errors_defined_in(package: str) -> dict[str, type[BaseException]]:
    """Every public exception class defined in `package`'s modules: name -> class (module recorded on the class)."""
    found: dict[str, type[BaseException]] = {}
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.endswith((".actors", ".cli")):  # entry points: importing them builds a process
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException) and not name.startswith("_")
                    and value.__module__ == info.name):
                found[f"{info.name}.{name}"] = value
    return found


def test_every_error_class_of_a_layer_is_defined_in_that_layer_s_errors_module() -> None:
    for package, errors in ERROR_MODULES.items():
        elsewhere = [name for name, cls in public_errors_defined_in(package).items()
                     if cls.__module__ != errors.__name__]
        assert elsewhere == [], f"{package}: errors outside {errors.__name__}: {elsewhere}"


def test_every_error_is_a_longhaul_error_and_exported_from_the_face() -> None:
    for errors in ERROR_MODULES.values():
        classes = [v for v in vars(errors).values() if inspect.isclass(v) and issubclass(v, BaseException)
                   and v.__module__ == errors.__name__]
        assert len(classes) >= 10
        for cls in classes:
            assert issubclass(cls, longhaul.LonghaulError), cls
            assert cls.__name__ in longhaul.__all__, cls
            assert getattr(longhaul, cls.__name__) is cls


def test_errors_stay_importable_from_where_users_import_them() -> None:
    from longhaul.worker import BrokerRequired, SettingsError, TaskBusy, TaskExists
    from longhaul.worker.agents import DuplicateAgent, UnknownAgent
    from longhaul.worker.providers import PermanentProviderError, TransientProviderError, UnknownProvider
    from longhaul.worker.tools import ToolError, UnknownTool

    for cls in (BrokerRequired, SettingsError, TaskBusy, TaskExists, DuplicateAgent, UnknownAgent,
                PermanentProviderError, TransientProviderError, UnknownProvider, ToolError, UnknownTool):
        assert cls is getattr(longhaul.worker.errors, cls.__name__)
