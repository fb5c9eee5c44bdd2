"""The public surface: every public module's ``__all__`` is sorted and names what exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import selfupgrade

MODULES = [
    "selfupgrade",
    *sorted(
        m.name
        for m in pkgutil.walk_packages(selfupgrade.__path__, "selfupgrade.")
        if not any(part.startswith("_") for part in m.name.split("."))
        and m.name != "selfupgrade.testing.pytest_plugin"
    ),
]


def _isort_key(name: str) -> tuple[int, str]:
    """Constants first, then classes, then the rest (the order ruff's RUF022 keeps)."""
    if name.isupper() or (name.upper() == name and "_" in name):
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_real(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert list(exported) == sorted(exported, key=_isort_key), f"{name}.__all__ is not sorted"
    for item in exported:
        assert hasattr(module, item), f"{name}.__all__ names missing {item}"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_has_a_docstring(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no docstring"
    for item in getattr(module, "__all__", []):
        obj = getattr(module, item)
        ours = getattr(obj, "__module__", "").startswith("selfupgrade")
        if callable(obj) and ours:
            assert obj.__doc__, f"{name}.{item} has no docstring"


def test_top_level_exports_match_the_roles() -> None:
    for name in ("Transport", "Verifier", "Installer", "Restarter", "Updater", "SelfUpgradeError"):
        assert name in selfupgrade.__all__
