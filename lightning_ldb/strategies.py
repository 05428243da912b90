"""Which Lightning strategies LDB can serve, and what each needs when the trainable set changes.

An *adapter* is told, in the callback's ``setup`` (before the strategy wraps the model), to check and
configure the strategy (recording each change in the fit's undo list), afterwards every time LDB
changes which parameters are trainable, and finally to let go of everything it holds.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    XLAStrategy,
)

from lightning_ldb.sampling import DrawKey
from lightning_ldb.undo import UndoList


class StrategyAdapter(Protocol):
    """What the callback asks of an adapter."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, undo: UndoList) -> None:
        """Check and configure the strategy; runs in the callback's ``setup``, before the model is wrapped."""

    def on_trainable_set_changed(
        self, trainer: Trainer, draw_key: Optional[DrawKey], dropped: tuple[str, ...]
    ) -> None:
        """LDB just froze ``dropped`` for draw ``draw_key``, or (``draw_key=None``) released every layer."""

    def close(self) -> None:
        """The fit is over: drop every reference to the strategy's objects (wrappers, hooks)."""


class NoOpAdapter:
    """A single process holds the only copy of the model: nothing to keep in step."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, undo: UndoList) -> None:
        pass

    def on_trainable_set_changed(
        self, trainer: Trainer, draw_key: Optional[DrawKey], dropped: tuple[str, ...]
    ) -> None:
        pass

    def close(self) -> None:
        pass


#: Strategies built on ``DDPStrategy`` that do not wrap the model in ``DistributedDataParallel``.
_NOT_DDP_WRAPPERS = (DeepSpeedStrategy, XLAStrategy)


def adapter_for(
    strategy: Strategy, resample: str, communication: str = "auto", accumulate: int | None = None
) -> StrategyAdapter:
    """The adapter for ``strategy``.

    Args:
        strategy: The trainer's strategy.
        resample: The callback's ``resample`` (``"epoch"`` or ``"step"``).
        communication: The callback's ``communication`` (DDP's method; see :mod:`lightning_ldb.ddp`).
        accumulate: The callback's ``batch_scale`` when DROP epochs accumulate it (``batch_scaling="accumulate"``),
            else ``None``.

    Raises:
        ValueError: If LDB cannot serve the strategy (FSDPStrategy, DeepSpeed, XLA, ...).
    """
    if type(strategy) is SingleDeviceStrategy:
        return NoOpAdapter()
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, _NOT_DDP_WRAPPERS):
        from lightning_ldb.ddp import DDPAdapter

        return DDPAdapter(resample, communication, accumulate)
    if isinstance(strategy, ModelParallelStrategy):
        from lightning_ldb.fsdp import FSDP2Adapter

        return FSDP2Adapter(resample=resample)  # refuses tensor parallelism in its ``setup``
    raise ValueError(
        f"LayerDropBackCallback does not support strategy {type(strategy).__name__}: LDB drops layers by setting"
        " `requires_grad=False` on their parameters between steps, and this strategy flattens (FSDPStrategy, FSDP1),"
        " partitions (DeepSpeed) or traces (XLA) the parameters so that per-layer flags cannot change under it."
        " Use a single device, strategy='ddp' (any number of devices and nodes), or, to shard a model too large for"
        " DDP, ModelParallelStrategy(data_parallel_size=<number of processes>, tensor_parallel_size=1) with"
        " `torch.distributed.fsdp.fully_shard` (FSDP2) applied in `configure_model`; or remove LayerDropBackCallback."
    )


class StrategySync:
    """The engine's :class:`~lightning_ldb.distributed.Sync` under the Trainer: the strategy broadcasts, the adapter
    is told when the trainable set changes.

    Args:
        trainer: The trainer of the fit.
        adapter: The strategy's adapter (configured in ``setup`` already).
    """

    def __init__(self, trainer: Trainer, adapter: StrategyAdapter) -> None:
        self.trainer = trainer
        self.adapter = adapter

    def broadcast(self, obj: Any) -> Any:
        return self.trainer.strategy.broadcast(obj, src=0)

    def before_draw(self) -> None:
        pass  # the adapter configured the strategy in ``setup``, before the wrap

    def on_trainable_set_changed(self, draw_key: Optional[DrawKey], dropped: tuple[str, ...]) -> None:
        self.adapter.on_trainable_set_changed(self.trainer, draw_key, dropped)

    def close(self) -> None:
        self.adapter.close()
