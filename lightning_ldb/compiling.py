"""``torch.compile`` and LDB: which compiled parts hold droppable units, and what that costs.

A compiled graph is specialised on which of its inputs require a gradient, so every new set of dropped units compiles
the graph anew (once per DROP epoch with ``resample="epoch"``, at every step with ``resample="step"``); beyond
``torch._dynamo.config.recompile_limit`` such sets run uncompiled. Training stays correct either way (tested). The
engine and the callback both warn with :func:`recompile_warning`.

This module imports torch, never Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_ldb import _compat
from lightning_ldb.units import Unit


def compiled_holders(module: nn.Module, candidates: Sequence[Unit]) -> list[str]:
    """Names of the ``torch.compile``'d submodules of ``module`` that hold a droppable unit, in module order."""
    compiled = _compat.compiled_module_type()
    if compiled is None:
        return []
    prefixes = [name for name, sub in module.named_modules() if name and isinstance(sub, compiled)]
    return [
        name for name in prefixes if any(unit.name == name or unit.name.startswith(f"{name}.") for unit in candidates)
    ]


def describe_compiled(holders: Sequence[str]) -> str:
    """``"submodule 'a'"`` or ``"submodule 'a' (and 2 more)"``."""
    return f"submodule {holders[0]!r}" + (f" (and {len(holders) - 1} more)" if len(holders) > 1 else "")


def recompile_warning(who: str, what: str) -> str:
    """The warning for ``what`` (a compiled model or submodule holding droppable units), said by ``who``."""
    return (
        f"{who}: {what} is compiled with torch.compile, and contains layers LDB drops. A compiled graph is"
        " specialised on which parameters require a gradient, so each new set of dropped layers compiles anew (once"
        " per DROP epoch with resample='epoch', for every step with resample='step'); beyond"
        " torch._dynamo.config.recompile_limit such sets run uncompiled. Training stays correct. To keep the speed,"
        " compile only layers LDB never drops (see `include`/`exclude`), or raise the recompile limit."
    )
