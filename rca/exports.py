"""Lazy re-exports for a package (PEP 562): a name loads its module on first use.

A package that re-exports names from modules that import torch or transformers stays cheap to
import: its ``__init__`` lists where each name lives and takes ``__getattr__`` and ``__dir__``
from ``lazy_exports``. Static checkers still see every name through an ``if TYPE_CHECKING:``
import block beside it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, modules: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``; ``modules`` maps a module's name, relative to
    the package, to the names it provides."""
    module_of = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in module_of:
            return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *module_of})

    return __getattr__, __dir__
