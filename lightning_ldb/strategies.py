"""Which Lightning strategies LDB can serve, and what each needs when the trainable set changes.

An *adapter* is told, in the callback's ``setup`` (before the strategy wraps the model), to check and
configure the strategy, and afterwards every time LDB changes which parameters are trainable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

if TYPE_CHECKING:
    from lightning_ldb.callback import LayerDropBackCallback


class NoOpAdapter:
    """A single process holds the only copy of the model: nothing to keep in step."""

    def setup(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass

    def on_trainable_set_changed(
        self, trainer: Trainer, draw_key: Optional[tuple[int, Optional[int]]], dropped: tuple[str, ...]
    ) -> None:
        pass


def adapter_for(trainer: Trainer, callback: LayerDropBackCallback) -> NoOpAdapter:
    """The adapter for ``trainer.strategy``; raises ``ValueError`` for a strategy LDB cannot serve."""
    strategy = trainer.strategy
    if type(strategy) is SingleDeviceStrategy:
        return NoOpAdapter()
    if isinstance(strategy, DDPStrategy):
        from lightning_ldb.ddp import DDPAdapter

        return DDPAdapter(callback)
    raise ValueError(
        f"LayerDropBackCallback does not support strategy {type(strategy).__name__}: it changes which parameters"
        " are trainable between epochs, which sharded strategies (FSDP, DeepSpeed, model parallel) do not allow."
        " Use a single device, strategy='ddp' or strategy='ddp_spawn'."
    )
