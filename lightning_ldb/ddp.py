"""LDB under DistributedDataParallel.

DDP builds its gradient reducer from the parameters that are trainable when it wraps the model.
Freezing afterwards with ``find_unused_parameters=False`` fails on the next forward ("Expected to
have finished reduction"), so LDB turns ``find_unused_parameters`` on before the wrap: frozen
parameters are then marked ready, keep ``grad=None`` and stay bitwise unchanged on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from lightning_ldb.callback import LayerDropBackCallback


class DDPAdapter:
    """Configures DDP for a changing trainable set."""

    def __init__(self, callback: LayerDropBackCallback) -> None:
        self.callback = callback

    def setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, DDPStrategy)
        # No public setter exists; the kwargs are read when the strategy wraps the model, after this hook.
        kwargs = strategy._ddp_kwargs
        if kwargs.get("static_graph"):
            raise ValueError(
                "LayerDropBackCallback cannot run under DDP with static_graph=True: DDP then rejects any change of"
                " the trainable parameters. Use DDPStrategy(static_graph=False)."
            )
        if not kwargs.get("find_unused_parameters"):
            kwargs["find_unused_parameters"] = True
            rank_zero_info(
                "LayerDropBackCallback: set DDP's find_unused_parameters=True, so that DDP accepts layers frozen"
                " during DROP epochs."
            )

    def on_trainable_set_changed(
        self, trainer: Trainer, draw_key: Optional[tuple[int, Optional[int]]], dropped: tuple[str, ...]
    ) -> None:
        pass
