"""The :class:`~lightning_ldb.distributed.Sync` of each Lightning strategy LDB serves, configured in the callback's
``setup`` (before the strategy wraps the model), told of every change of the trainable set, and let go of at the end.

**DDP** (:class:`DDPStrategySync`). DDP builds its gradient reducer from the parameters that are trainable *when it
wraps the model*, and by default expects every one of them to receive a gradient on every step. LDB changes which
parameters are trainable while training runs, so it has to tell DDP, by one of three *communication methods*
(``docs/ddp.md`` has the measurements behind the choice; ``communication=`` overrides it):

``"rewrap"`` (``resample="epoch"``, the default)
    When a DROP epoch starts and when it ends, LDB builds a fresh DDP wrapper through the strategy's own
    ``configure_ddp()``: the new reducer holds exactly the trainable parameters, and ``find_unused_parameters`` can
    stay ``False``. Each construction broadcasts the module state from rank 0.
``"hook"`` (``resample="step"``)
    LDB turns on ``find_unused_parameters`` before the wrap and registers a communication hook that all-reduces
    only the trainable parameters' gradients (:func:`~lightning_ldb.distributed.allreduce_trainable_only`).
``"find_unused"`` (fallback)
    Only ``find_unused_parameters=True``: used when the user configured a DDP communication hook of their own.

**FSDP2** (:class:`FSDP2StrategySync`, ``ModelParallelStrategy`` with ``fully_shard``): FSDP2 copies
``requires_grad`` at every all-gather and reduce-scatters only parameters that received a gradient, so it needs no
reconfiguration (``docs/fsdp.md``); tensor parallelism is refused.

Both check that every rank drew the same (:class:`~lightning_ldb.distributed.CheckedSync`); one device needs
nothing (:class:`~lightning_ldb.distributed.LocalSync`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from lightning_ldb import _compat
from lightning_ldb.distributed import CheckedSync, LocalSync, Sync, register_trainable_only_hook, wraps_in_ddp
from lightning_ldb.schedule import Settings
from lightning_ldb.undo import UndoList

#: The name Lightning's ``ModelParallelStrategy`` gives the tensor-parallel dimension of its device mesh.
TENSOR_PARALLEL_DIM = "tensor_parallel"


def strategy_sync(trainer: Trainer, pl_module: LightningModule, settings: Settings, undo: UndoList) -> Sync:
    """The :class:`~lightning_ldb.distributed.Sync` of ``trainer``'s strategy, configured for ``settings``.

    Runs in the callback's ``setup``, before the strategy wraps the model; ``undo`` records every change.

    Raises:
        ValueError: If LDB cannot serve the strategy (FSDPStrategy, DeepSpeed, XLA, ...), or its settings.
    """
    strategy = trainer.strategy
    sync: _StrategySync
    if type(strategy) is SingleDeviceStrategy:
        return LocalSync()
    if wraps_in_ddp(strategy):
        accumulate = (
            settings.batch_scale if settings.batch_scaling == "accumulate" and settings.batch_scale > 1 else None
        )
        sync = DDPStrategySync(trainer, settings.resample, settings.communication, accumulate)
    elif isinstance(strategy, ModelParallelStrategy):
        sync = FSDP2StrategySync(trainer, settings.resample)
    else:
        raise ValueError(
            f"LayerDropBackCallback does not support strategy {type(strategy).__name__}. Use one device, strategy='ddp',"
            " or ModelParallelStrategy(tensor_parallel_size=1) with fully_shard (docs/ddp.md#strategies-ldb-refuses)."
        )
    undo.callback(sync.close)
    sync.setup(pl_module, undo)
    return sync


class _StrategySync(CheckedSync):
    """A Lightning strategy's processes: its broadcast, world size and device (read at each call)."""

    def __init__(self, trainer: Trainer, resample: str) -> None:
        super().__init__(resample)
        self.trainer = trainer

    @property
    def world_size(self) -> int:
        return int(cast(Any, self.trainer.strategy).world_size)  # every parallel strategy has one

    @property
    def root_device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def broadcast(self, obj: Any) -> Any:
        return self.trainer.strategy.broadcast(obj, src=0)

    def setup(self, pl_module: LightningModule, undo: UndoList) -> None:
        """Check and configure the strategy, before it wraps the model (nothing unless a subclass says so)."""


# ------------------------------------------------------------------------------------------------ DDP
def choose_communication(strategy: DDPStrategy, resample: str, requested: str = "auto") -> str:
    """The communication method LDB uses under ``strategy``.

    Args:
        strategy: The run's DDP strategy (read only).
        resample: The callback's ``resample`` (``"epoch"`` or ``"step"``).
        requested: The callback's ``communication``: ``"auto"`` or one of the methods.

    Returns:
        ``"rewrap"``, ``"hook"`` or ``"find_unused"``.

    Raises:
        ValueError: If ``requested`` is ``"hook"`` or ``"rewrap"`` while the strategy has a comm hook of its own, or if the strategy uses
            ``static_graph=True`` with a method that changes the trainable set under a live wrapper.
    """
    kwargs = _compat.ddp_kwargs(strategy)
    user_comm_hook = _compat.ddp_user_comm_hook(strategy)
    if requested in ("hook", "rewrap") and user_comm_hook:
        why = (
            "DDP accepts one communication hook per wrapper"
            if requested == "hook"
            else "a re-wrap builds new gradient buckets, and a stateful hook (PowerSGD) keeps its state per bucket"
        )
        raise ValueError(
            f"LayerDropBackCallback(communication={requested!r}) cannot be used together with a ddp_comm_hook: {why}."
            " Pass communication='auto' (keeps your hook) or remove the hook."
        )
    if requested != "auto":
        method = requested
    elif user_comm_hook:
        method = "find_unused"
    else:
        method = "rewrap" if resample == "epoch" else "hook"
    if method != "rewrap" and kwargs.get("static_graph"):
        if requested != "auto":
            reason = f"communication={requested!r} keeps one wrapper"
        elif user_comm_hook:
            reason = "you configured a DDP communication hook, which LDB does not re-register on a new wrapper"
        else:
            reason = f"resample={resample!r} changes the dropped layers every step"
        raise ValueError(
            f"LayerDropBackCallback cannot run under DDPStrategy(static_graph=True): {reason}. Use"
            " static_graph=False, or resample='epoch' without a ddp_comm_hook (docs/ddp.md)."
        )
    return method


class DDPStrategySync(_StrategySync):
    """Keeps DistributedDataParallel consistent with LDB's changing set of trainable parameters.

    Args:
        trainer: The trainer of the fit.
        resample: ``"epoch"`` or ``"step"``; with ``communication="auto"`` it decides the method.
        communication: The callback's ``communication``.
        accumulate: The callback's ``batch_scale`` when DROP epochs accumulate it (``batch_scaling="accumulate"``),
            else ``None``.
    """

    def __init__(
        self, trainer: Trainer, resample: str, communication: str = "auto", accumulate: int | None = None
    ) -> None:
        super().__init__(trainer, resample)
        self.resample = resample
        self.communication = communication
        self.accumulate = accumulate
        self.method = "rewrap"
        # The trainable parameters the current wrapper reduces, and that wrapper; ``None``: unknown.
        self._wrapped_trainable: tuple[int, ...] | None = None
        self._wrapper: DistributedDataParallel | None = None
        self._hooked_wrapper: DistributedDataParallel | None = None

    def setup(self, pl_module: LightningModule, undo: UndoList) -> None:
        """Choose the communication method and configure DDP before it wraps the model.

        Raises:
            ValueError: If the strategy's DDP settings cannot serve LDB (see :func:`choose_communication`), or if
                DROP epochs accumulate under ``static_graph=True``.
        """
        strategy = cast(DDPStrategy, self.trainer.strategy)
        requested = self.communication
        self.method = choose_communication(strategy, self.resample, requested)
        # Lightning reads these kwargs when it wraps the model, after this hook; the fit's undo list puts them back.
        kwargs = _compat.ddp_kwargs(strategy)
        if self.accumulate is not None and kwargs.get("static_graph"):
            # DDP's static graph cannot accumulate (no_sync): the first accumulated DROP step would raise torch's
            # ``expect_autograd_hooks_ INTERNAL ASSERT FAILED``, after the full epochs have run.
            raise ValueError(
                f"LayerDropBackCallback(batch_scaling='accumulate', batch_scale={self.accumulate}) cannot run under"
                " DDPStrategy(static_graph=True): a static graph cannot accumulate gradients, and DROP epochs do."
                " Use batch_scaling='loader' or DDPStrategy(static_graph=False)."
            )
        forced = ""
        if self.method in ("hook", "find_unused") and not kwargs.get("find_unused_parameters"):
            undo.set_item(kwargs, "find_unused_parameters", True)
            forced = " set DDP's find_unused_parameters=True (dropped layers get no gradient) and"
        if self.method == "rewrap":
            rank_zero_info(
                "LayerDropBackCallback: under DDP, LDB builds a fresh DistributedDataParallel wrapper when a DROP"
                " epoch starts and when it ends, so DROP epochs all-reduce only the gradients of trainable layers."
            )
        elif self.method == "hook":
            rank_zero_info(
                f"LayerDropBackCallback(resample={self.resample!r}):{forced} registers a DDP communication"
                " hook that all-reduces only the gradients of trainable layers."
            )
        else:
            why = (
                "communication='find_unused'"
                if requested == "find_unused"
                else "the strategy has its own ddp_comm_hook, which LDB neither replaces nor re-registers"
            )
            rank_zero_info(
                f"LayerDropBackCallback ({why}):{forced or ' uses DDP with find_unused_parameters=True and'} leaves"
                " DDP's communication as configured: dropped layers' (zero) gradient slots are still all-reduced."
            )

    def after_change(self) -> None:
        """Bring DDP in line with the new trainable set (every rank agrees on it)."""
        strategy = cast(DDPStrategy, self.trainer.strategy)
        model = strategy.model
        if not isinstance(model, DistributedDataParallel):
            return  # not wrapped (yet): the wrap will see the current flags
        if self.method == "rewrap":
            self._rewrap(strategy, model)
        elif self.method == "hook" and self._hooked_wrapper is not model:
            register_trainable_only_hook(model)
            self._hooked_wrapper = model

    def close(self) -> None:
        """Let go of the wrappers this sync built or hooked: the strategy owns them."""
        self._wrapper = None
        self._hooked_wrapper = None
        self._wrapped_trainable = None

    def _rewrap(self, strategy: DDPStrategy, wrapper: DistributedDataParallel) -> None:
        module = strategy.lightning_module
        assert module is not None
        trainable = tuple(id(p) for p in module.parameters() if p.requires_grad)
        if wrapper is self._wrapper and trainable == self._wrapped_trainable:
            return  # this wrapper already reduces exactly these parameters
        # ``configure_ddp`` (public) wraps ``strategy.model`` with the strategy's own DDP kwargs and registers its
        # CUDA comm hooks, exactly as at the start of fit. It asserts an unwrapped LightningModule first.
        strategy.model = module
        strategy.configure_ddp()
        new_wrapper = strategy.model
        assert isinstance(new_wrapper, DistributedDataParallel)
        # ``Module.train()`` would recurse into the LightningModule; only the wrapper's own flag is copied.
        new_wrapper.training = wrapper.training
        _compat.reset_static_graph_delay(strategy)
        # The old reducer's autograd hooks stay inert (its forward is never called again) and go with it.
        _compat.remove_ddp_autograd_hooks(wrapper)
        self._wrapper = new_wrapper
        self._wrapped_trainable = trainable


# ------------------------------------------------------------------------------------------------ FSDP2
def tensor_parallel_size(device_mesh: Any) -> int:
    """The size of ``device_mesh``'s tensor-parallel dimension (``1`` if it has none).

    Args:
        device_mesh: The strategy's ``torch.distributed.device_mesh.DeviceMesh``.

    Example::

        >>> class Mesh:  # a stand-in with DeviceMesh's interface
        ...     mesh_dim_names = ("data_parallel", "tensor_parallel")
        ...     def __getitem__(self, name): return type("Sub", (), {"size": lambda self: 4})()
        >>> tensor_parallel_size(Mesh())
        4
    """
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if TENSOR_PARALLEL_DIM not in names:
        return 1
    return int(device_mesh[TENSOR_PARALLEL_DIM].size())


class FSDP2StrategySync(_StrategySync):
    """LDB under ``ModelParallelStrategy`` with FSDP2 ``fully_shard`` only: FSDP2 needs nothing when the trainable set
    changes (see the module docstring); this sync refuses tensor parallelism and checks that every rank drew the same.
    """

    def setup(self, pl_module: LightningModule, undo: UndoList) -> None:
        """Refuse tensor parallelism; runs in the callback's ``setup``, after the device mesh exists.

        Raises:
            ValueError: If the strategy's device mesh has a tensor-parallel dimension larger than 1.
        """
        size = tensor_parallel_size(cast(Any, self.trainer.strategy).device_mesh)
        if size > 1:
            raise ValueError(
                f"LayerDropBackCallback does not support tensor parallelism (tensor_parallel_size={size}). Use"
                " ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) with fully_shard"
                " (docs/fsdp.md)."
            )
