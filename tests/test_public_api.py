"""Tests for the shape of ctxkit's public namespace."""

from __future__ import annotations
import __future__

import inspect
import types

import pytest

import ctxkit


def public_names() -> set[str]:
    """Return the public names of the ``ctxkit`` namespace.

    Submodules, dunders (except ``__version__``) and the ``annotations`` feature that
    ``from __future__ import annotations`` leaves behind are not part of the API.
    """
    names = {"__version__"}
    for name in dir(ctxkit):
        value = getattr(ctxkit, name)
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if value is __future__.annotations:
            continue
        names.add(name)
    return names


FUNCTIONS_AND_CLASSES = [
    name
    for name in ctxkit.__all__
    if inspect.isfunction(getattr(ctxkit, name)) or inspect.isclass(getattr(ctxkit, name))
]


class TestPublicApi:
    def test_all_is_sorted(self) -> None:
        """ctxkit.__all__ is sorted and has no duplicates."""
        assert ctxkit.__all__ == sorted(set(ctxkit.__all__))

    def test_all_lists_exactly_the_public_names(self) -> None:
        """ctxkit.__all__ equals the public names of the namespace."""
        assert set(ctxkit.__all__) == public_names()

    def test_contract_names_are_exported(self) -> None:
        """The cloning and logging API of the contract is exported."""
        expected = {
            "TraceIdFilter",
            "clone",
            "clone_without_span",
            "current_trace_id",
            "register",
            "unregister",
        }
        assert expected <= set(ctxkit.__all__)

    @pytest.mark.parametrize("name", FUNCTIONS_AND_CLASSES)
    def test_every_function_and_class_has_a_docstring(self, name: str) -> None:
        """Each exported function or class has its own non-empty docstring."""
        assert (getattr(ctxkit, name).__doc__ or "").strip()

    def test_only_version_is_neither_function_nor_class(self) -> None:
        """Every export but __version__ is a function or a class, so all are checked above."""
        assert set(ctxkit.__all__) - set(FUNCTIONS_AND_CLASSES) == {"__version__"}

    def test_version_is_a_string(self) -> None:
        """ctxkit.__version__ is a non-empty string."""
        assert isinstance(ctxkit.__version__, str)
        assert ctxkit.__version__
