"""The optional dependencies of :mod:`lightning_ldb.examples`, with one clear message when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'lightning-ldb[examples]'"


def require(module: str) -> ModuleType:
    """Import ``module``, or raise an ``ImportError`` that says how to install the examples' dependencies.

    Args:
        module: The module to import, e.g. ``"torchvision"``.

    Raises:
        ImportError: If ``module`` is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"lightning_ldb.examples needs `{module}`, which is not installed ({error}). Install the examples'"
            f" dependencies with: {INSTALL_HINT}"
        ) from error
