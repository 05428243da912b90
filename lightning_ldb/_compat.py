"""Every private Lightning and torch attribute LDB reads or writes, in one place.

Lightning and torch offer no public API for these. Each accessor names the versions it was checked on
and fails loudly when the attribute is missing: a rename in a new release must never switch an LDB
feature off in silence. Required ones raise :class:`CompatibilityError` naming what LDB could not do;
optional ones (an optimisation, a warning) warn once and carry on.

Checked on lightning 2.5.0 to 2.6.6 and torch 2.13 to 2.14.

It imports torch only (the accessors take the objects as they are), so that the engine, which must run without
Lightning, can use the ones it needs.
"""

from __future__ import annotations

import sys
import warnings
from importlib import metadata
from typing import Any

import torch
import torch.distributed as dist

_warned: set[str] = set()


def _versions() -> str:
    try:
        lightning = metadata.version("lightning")
    except metadata.PackageNotFoundError:
        lightning = "not installed"
    return f"lightning {lightning}, torch {torch.__version__}"


class CompatibilityError(RuntimeError):
    """An attribute LDB needs is missing from this Lightning or torch release."""


def _missing(owner: Any, name: str, consequence: str, required: bool) -> None:
    message = (
        f"lightning-ldb: {type(owner).__name__}.{name} is missing in {_versions()}, so {consequence}. lightning-ldb was"
        " checked on lightning 2.5.0-2.6.6 and torch 2.13-2.14: install one of those, or report this."
    )
    if required:
        raise CompatibilityError(message)
    if message not in _warned:
        _warned.add(message)
        if not dist.is_initialized() or dist.get_rank() == 0:  # once, not once per rank
            warnings.warn(message, UserWarning, stacklevel=3)


def _get(owner: Any, name: str, consequence: str, required: bool = True, default: Any = None) -> Any:
    if hasattr(owner, name):
        return getattr(owner, name)
    _missing(owner, name, consequence, required)
    return default


# ---------------------------------------------------------------------------------------------- DDPStrategy
def ddp_kwargs(strategy: Any) -> dict[str, Any]:
    """The kwargs ``DDPStrategy`` passes to ``DistributedDataParallel`` (a live dict: writes reach the next wrap)."""
    return _get(strategy, "_ddp_kwargs", "LDB cannot configure DistributedDataParallel for dropped layers")


def ddp_user_comm_hook(strategy: Any) -> bool:
    """Whether the user gave ``DDPStrategy`` a communication hook (or its state)."""
    consequence = "LDB cannot tell whether you configured a DDP communication hook"
    hook = _get(strategy, "_ddp_comm_hook", consequence)
    state = _get(strategy, "_ddp_comm_state", consequence)
    return hook is not None or state is not None


def reset_static_graph_delay(strategy: Any) -> None:
    """Make Lightning redo DDP's first-iteration static-graph flush for a new wrapper (manual optimization)."""
    # Lightning runs that flush once per strategy; a new wrapper has a new first iteration.
    if hasattr(strategy, "_pl_static_graph_delay_done"):
        strategy._pl_static_graph_delay_done = False


def remove_ddp_autograd_hooks(wrapper: Any) -> None:
    """Free an abandoned ``DistributedDataParallel`` wrapper's autograd hooks now, not at garbage collection."""
    remove = _get(
        wrapper,
        "_remove_autograd_hooks",
        "an old DDP wrapper's (inert) hooks live until garbage collection",
        required=False,
    )
    if callable(remove):
        remove()


def ddp_wrapper_has_comm_hook(wrapper: Any) -> bool:
    """Whether a communication hook is registered on a ``DistributedDataParallel`` (DDP accepts one per wrapper)."""
    hooks = _get(wrapper, "_comm_hooks", "LDB cannot tell whether your DDP wrapper has a communication hook")
    return bool(hooks)


def is_fabric_module(obj: Any) -> bool:
    """Whether ``obj`` is the wrapper ``Fabric.setup`` returns (``_FabricModule``, private; Lightning is not imported)."""
    return any(cls.__name__ == "_FabricModule" and cls.__module__.startswith("lightning") for cls in type(obj).__mro__)


def replace_fabric_forward_module(fabric_module: Any, old: Any, new: Any) -> None:
    """Make Fabric's module wrapper call ``new`` (a rebuilt DDP wrapper) where it called ``old``."""
    # ``_FabricModule`` calls ``self._forward_module``; ``__setattr__`` of the name re-registers the submodule.
    if fabric_module is old:
        raise ValueError(
            "LayerDropBack(fabric=...) needs the model as `fabric.setup` returned it, to rebuild its"
            " DistributedDataParallel wrapper; it got the DistributedDataParallel itself."
        )
    current = _get(fabric_module, "_forward_module", "LDB cannot rebuild the DDP wrapper Fabric made")
    if current is not old:
        raise CompatibilityError(
            f"lightning-ldb: {type(fabric_module).__name__}._forward_module is not the DDP wrapper in"
            f" {_versions()}, so LDB cannot rebuild the wrapper Fabric made. Pass"
            " Fabric(strategy=DDPStrategy(find_unused_parameters=True)) instead, or report this."
        )
    fabric_module._forward_module = new


# ---------------------------------------------------------------------------------------------- loops and data
def train_data_source(trainer: Any) -> Any:
    """What supplies the train loader: the LightningModule, the DataModule, or the loader(s) given to ``fit``."""
    source = _get(trainer.fit_loop, "_data_source", "LDB cannot tell which object supplies the train loader")
    return _get(source, "instance", "LDB cannot tell which object supplies the train loader")


def setup_train_data(trainer: Any) -> None:
    """Build the train loader now if it is not built yet: the call Lightning's own ``estimated_stepping_batches`` makes."""
    setup = _get(trainer.fit_loop, "setup_data", "LDB cannot build the train loader to count the optimizer steps")
    setup()


def batches_carried_from_last_batch(trainer: Any) -> int:
    """How many batches Lightning carries into ``current_epoch`` from a checkpoint saved on the previous epoch's last
    batch (``0``: the checkpoint was not saved there, or this is no resume). Reads the loop's progress, never writes."""
    consequence = "LDB cannot warn about a resume from the last batch of a DROP epoch, which runs short"
    loop = _get(trainer.fit_loop, "epoch_loop", consequence, required=False)
    progress = _get(loop, "batch_progress", consequence, required=False) if loop is not None else None
    if progress is None:
        return 0
    restarted = _get(loop, "restarted_on_train_batch_end", consequence, required=False, default=False)
    last = _get(progress, "is_last_batch", consequence, required=False, default=False)
    current = _get(progress, "current", consequence, required=False)
    carried = _get(current, "ready", consequence, required=False, default=0) if current is not None else 0
    return int(carried) if restarted and last and carried else 0


# ---------------------------------------------------------------------------------------------- callbacks
def checkpoint_triggers_on_steps(checkpoint: Any) -> bool:
    """Whether a ``ModelCheckpoint`` saves every n train steps or on a train-time interval."""
    consequence = "LDB cannot warn about step-triggered checkpoints that resume short"
    steps = _get(checkpoint, "_every_n_train_steps", consequence, required=False, default=0)
    interval = _get(checkpoint, "_train_time_interval", consequence, required=False, default=None)
    return bool(steps) or interval is not None


# ---------------------------------------------------------------------------------------------- argparse
def option_strings(parser: Any) -> list[str]:
    """Every option string ``parser`` accepts (argparse's private ``_option_string_actions``)."""
    actions = _get(
        parser, "_option_string_actions", "`ldb` cannot suggest the closest option", required=False, default={}
    )
    return list(actions)


def subcommand_parser(cli: Any, subcommand: str | None) -> Any:
    """The parser of ``subcommand`` (``None``: the main one) of a ``LightningCLI`` (its private ``_parser``)."""
    parser = _get(cli, "_parser", "`ldb` cannot name the parser in a short error message")
    return parser(subcommand)


def subcommand_choice_actions(parser: Any) -> list[Any]:
    """The actions that hold each subcommand's one-line help in ``parser`` (argparse has no public accessor)."""
    import argparse

    actions = _get(
        parser, "_actions", "`ldb --help` keeps argparse's shortened subcommand help", required=False, default=[]
    )
    subparsers = [a for a in actions if isinstance(a, getattr(argparse, "_SubParsersAction", ()))]
    return [choice for action in subparsers for choice in getattr(action, "_choices_actions", [])]


# ---------------------------------------------------------------------------------------------- torch.compile
def is_compiled_lightning_module(pl_module: Any) -> bool:
    """Whether ``pl_module`` was passed to ``fit`` through ``torch.compile``."""
    # Lightning unwraps the compiled module and keeps the compiler's settings here.
    return getattr(pl_module, "_compiler_ctx", None) is not None


def compiled_module_type() -> type | None:
    """The class of ``torch.compile``'d submodules (imported lazily: loading dynamo is slow)."""
    if "torch._dynamo" not in sys.modules:  # torch.compile loads it: without it, nothing was compiled
        return None
    try:
        from torch._dynamo import OptimizedModule
    except ImportError:
        _missing(torch, "_dynamo.OptimizedModule", "LDB cannot warn about compiled layers that recompile", False)
        return None
    return OptimizedModule


def uncompiled(module: Any) -> Any:
    """The module ``torch.compile(module)`` was given (private ``_orig_mod``), or ``module`` if it is not compiled."""
    compiled = compiled_module_type()
    if compiled is None or not isinstance(module, compiled):
        return module
    return _get(module, "_orig_mod", "LayerDropBack cannot see the modules inside a torch.compile'd model")
