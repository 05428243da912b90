"""How LDB composes with other Lightning and PyTorch features under the Trainer: warnings for the cases that need
the user's attention.

Each check reads, never writes, the trainer's state, and warns once on rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_ldb import _compat
from lightning_ldb.branches import Branch, describe_branches, unrecognised_note
from lightning_ldb.dropping import Unit, compiled_holders, describe_compiled, recompile_warning


def warn_if_all_droppable(pl_module: LightningModule, candidates: Sequence[Unit], drop_rate: float) -> None:
    """Warn when a draw can drop every trainable layer, which leaves the loss without a gradient."""
    # Checked here, after every callback's ``setup`` (``BackboneFinetuning`` freezes there). A draw that
    # drops every trainable layer leaves the loss without a gradient: the step fails, at random, mid-run.
    if drop_rate == 0.0:
        return
    candidate_ids = {id(p) for layer in candidates for p in layer.parameters}
    trainable = [p for p in pl_module.parameters() if p.requires_grad]
    if not trainable or not all(id(p) in candidate_ids for p in trainable):
        return
    n = sum(1 for layer in candidates if any(p.requires_grad for p in layer.parameters))
    rank_zero_warn(
        f"LayerDropBackCallback: every trainable layer of {type(pl_module).__name__} is a candidate, so a draw"
        f" drops all {n} of them with probability drop_rate**{n} = {drop_rate**n:.2g} (per DROP epoch, or"
        " per step with resample='step'). The loss then has no gradient and training fails. Keep a layer"
        " trained: keep_first >= 1 or keep_last >= 1, or `exclude` one."
    )


def warn_if_an_optimizer_can_lose_all_its_layers(
    optimizers: Sequence[Optimizer], candidates: Sequence[Unit], drop_rate: float
) -> None:
    """Warn when, with several optimizers, one draw can drop every layer one optimizer trains.

    Args:
        optimizers: The trainer's optimizers.
        candidates: The layers a draw is over, in network order.
        drop_rate: The callback's ``drop_rate``.
    """
    # That optimizer then trains nothing for the draw, and a loss whose only trainable inputs are its layers
    # (a GAN's generator step under ``toggle_optimizer``, which freezes the other optimizers' parameters) has no
    # gradient: backward fails with torch's "element 0 of tensors does not require grad". With one optimizer,
    # ``warn_if_all_droppable`` covers it.
    if drop_rate == 0.0 or len(optimizers) < 2:
        return
    found = []
    for index, optimizer in enumerate(optimizers):
        trainable = {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
        holding = [layer for layer in candidates if any(id(p) in trainable for p in layer.parameters)]
        covered = {id(p) for layer in holding for p in layer.parameters}
        if trainable and trainable <= covered:
            found.append((index, optimizer, holding))
    if not found:
        return
    what = "; ".join(
        f"optimizer {index} ({type(optimizer).__name__}): all {len(holding)} of its layers with probability"
        f" drop_rate**{len(holding)} = {drop_rate ** len(holding):.2g}"
        for index, optimizer, holding in found
    )
    last = found[0][2][-1].name
    rank_zero_warn(
        f"LayerDropBackCallback: one draw can drop every layer an optimizer trains ({what}; per DROP epoch, or per"
        " step with resample='step'). That optimizer then trains nothing until the draw ends, and a loss whose only"
        " trainable inputs are those layers (a GAN's generator step under toggle_optimizer) has no gradient:"
        " backward fails with 'element 0 of tensors does not require grad'. Keep one of its layers trained, e.g."
        f" exclude=[{last!r}], or with keep_first/keep_last."
    )


def note_dropped_layers(exception: BaseException, dropped: Sequence[str]) -> None:
    """Add a note to torch's "does not require grad" error raised while LDB had dropped layers, saying why."""
    if not dropped or not isinstance(exception, RuntimeError) or "does not require grad" not in str(exception):
        return
    shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    note = (
        f"LayerDropBackCallback had dropped (frozen) {shown} for this step. A loss whose only trainable inputs are"
        " dropped layers has no gradient (e.g. a GAN's generator step under toggle_optimizer when every generator"
        " layer is dropped). Keep one of those layers trained: `exclude` it, or raise keep_first/keep_last."
    )
    if hasattr(exception, "add_note"):  # Python 3.11+
        exception.add_note(note)
    else:  # Python 3.10 (still supported): say it once beside the traceback
        rank_zero_warn(note)


def warn_if_compiled(pl_module: LightningModule, candidates: Sequence[Unit]) -> None:
    """Warn when a compiled module holds droppable layers: each new dropped set recompiles."""
    if _compat.is_compiled_lightning_module(pl_module):  # trainer.fit(torch.compile(model))
        what = f"the LightningModule {type(pl_module).__name__}"
    else:
        holders = compiled_holders(pl_module, candidates)
        if not holders:
            return
        what = describe_compiled(holders)
    rank_zero_warn(recompile_warning("LayerDropBackCallback", what))


def report_branches(pl_module: LightningModule, settings: Any, branches: Sequence[Branch]) -> None:
    """Block mode: say which blocks were recognised (info), and warn about blocks that look known but are not."""
    if settings.backward != "block":
        return
    rank_zero_info(f"LayerDropBackCallback: block mode: {describe_branches(pl_module, branches, settings.branches)}.")
    note = unrecognised_note(pl_module, settings.branches)
    if note:
        rank_zero_warn(
            f"LayerDropBackCallback(backward='block'):{note} None of their layers is dropped: only branches are."
        )
