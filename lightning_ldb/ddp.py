"""LDB under DistributedDataParallel: rank-consistent drops, and no all-reduce for dropped layers.

DDP builds its gradient reducer from the parameters that are trainable *when it wraps the model*,
and by default expects every one of them to receive a gradient on every step. LDB changes which
parameters are trainable while training runs, so it has to tell DDP. It picks one of three
*communication methods* (see ``docs/ddp.md`` for the measurements behind the choice):

``"rewrap"`` (``resample="epoch"``, the default)
    When a DROP epoch starts and when it ends, LDB builds a fresh DDP wrapper through the
    strategy's own :meth:`~lightning.pytorch.strategies.DDPStrategy.configure_ddp`. The new
    reducer holds exactly the parameters that are trainable now, so DROP epochs all-reduce only
    those, and ``find_unused_parameters`` can stay ``False`` (no graph traversal per step). Cost:
    two DDP constructions per DROP epoch, each a collective that broadcasts the module state
    from rank 0 (which also re-synchronises any weight that drifted).
``"hook"`` (``resample="step"``)
    The dropped set changes every optimizer step, far too often to rebuild DDP. LDB turns on
    ``find_unused_parameters`` before the wrap (dropped parameters are then marked ready and keep
    ``grad=None``) and registers a communication hook that packs the trainable parameters'
    gradients of each bucket into one tensor and all-reduces only that.
``"find_unused"`` (fallback)
    Only ``find_unused_parameters=True``: correct, but the dropped layers' zero-filled bucket slots
    are still all-reduced. Used when the user configured a DDP communication hook of their own
    (DDP accepts one hook per wrapper, and a stateful hook such as PowerSGD keeps per-bucket state
    that a re-wrap would invalidate).

The callback's ``communication`` argument (``"auto"``, ``"rewrap"``, ``"hook"`` or ``"find_unused"``)
overrides the choice; it is part of the callback's configuration, so configs and checkpoints record
it.

Every rank must drop the same layers at the same time: :class:`~lightning_ldb.distributed.CrossRankDrawCheck`
verifies it, and :func:`~lightning_ldb.distributed.allreduce_trainable_only` is the ``"hook"`` method's hook.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from lightning_ldb import _compat
from lightning_ldb.distributed import CrossRankDrawCheck, allreduce_trainable_only
from lightning_ldb.sampling import DrawKey
from lightning_ldb.undo import UndoList

#: The communication methods, ``"auto"`` first.
COMMUNICATION_METHODS = ("auto", "rewrap", "hook", "find_unused")



def choose_communication(strategy: DDPStrategy, resample: str, requested: str = "auto") -> str:
    """The communication method LDB uses under ``strategy``.

    Args:
        strategy: The run's DDP strategy (read only).
        resample: The callback's ``resample`` (``"epoch"`` or ``"step"``).
        requested: The callback's ``communication``: ``"auto"`` or one of the methods.

    Returns:
        ``"rewrap"``, ``"hook"`` or ``"find_unused"``.

    Raises:
        ValueError: If ``requested`` is not one of :data:`COMMUNICATION_METHODS`, if it is
            ``"hook"`` or ``"rewrap"`` while the strategy has a comm hook of its own, or if the strategy uses
            ``static_graph=True`` with a method that changes the trainable set under a live wrapper.
    """
    if requested not in COMMUNICATION_METHODS:
        raise ValueError(
            f"`communication` must be one of {list(COMMUNICATION_METHODS)}, got {requested!r}."
        )
    kwargs = _compat.ddp_kwargs(strategy)
    user_comm_hook = _compat.ddp_user_comm_hook(strategy)
    if requested in ("hook", "rewrap") and user_comm_hook:
        why = (
            "DDP accepts one communication hook per wrapper"
            if requested == "hook"
            else "a re-wrap builds new gradient buckets, and a stateful hook (PowerSGD) keeps its state per bucket"
        )
        raise ValueError(
            f"LayerDropBackCallback(communication={requested!r}) cannot be used together with a"
            f" ddp_comm_hook/ddp_comm_state on the DDPStrategy: {why}. Pass communication='auto' (LDB then keeps"
            " your hook and only sets find_unused_parameters=True) or remove the strategy's comm hook."
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
            f"LayerDropBackCallback cannot run under DDPStrategy(static_graph=True) here: {reason}, and a static"
            " graph rejects any change of the trainable parameters under a live wrapper. Use"
            " DDPStrategy(static_graph=False), or LayerDropBackCallback(resample='epoch') without a ddp_comm_hook"
            " (LDB then builds a fresh wrapper whenever the trainable set changes, which static_graph accepts)."
        )
    return method


class DDPAdapter:
    """Keeps DistributedDataParallel consistent with LDB's changing set of trainable parameters.

    Args:
        resample: The callback's ``resample`` (``"epoch"`` or ``"step"``); with ``communication="auto"`` it
            decides the method.
        communication: The callback's ``communication``.
        accumulate: The callback's ``batch_scale`` when DROP epochs accumulate it (``batch_scaling="accumulate"``),
            else ``None``.
    """

    def __init__(self, resample: str, communication: str = "auto", accumulate: int | None = None) -> None:
        self.resample = resample
        self.communication = communication
        self.accumulate = accumulate
        self.method = "rewrap"
        self.check = CrossRankDrawCheck(per_draw=resample == "epoch")
        # The trainable parameters the current wrapper reduces, and that wrapper; ``None``: unknown.
        self._wrapped_trainable: Optional[tuple[int, ...]] = None
        self._wrapper: Optional[DistributedDataParallel] = None
        self._hooked_wrapper: Optional[DistributedDataParallel] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, undo: UndoList) -> None:
        """Choose the communication method and configure DDP before it wraps the model.

        Raises:
            ValueError: If the strategy's DDP settings cannot serve LDB (see :func:`choose_communication`), or if
                DROP epochs accumulate under ``static_graph=True``.
        """
        strategy = trainer.strategy
        assert isinstance(strategy, DDPStrategy)
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

    def on_trainable_set_changed(self, trainer: Trainer, draw_key: Optional[DrawKey], dropped: tuple[str, ...]) -> None:
        """Check that every rank agrees on the draw, then bring DDP in line with the new trainable set.

        Args:
            trainer: The running trainer (after the strategy wrapped the model).
            draw_key: ``(epoch, step or None)`` of the draw, or ``None`` when LDB released every layer.
            dropped: Names of the layers dropped now (empty on release).

        Raises:
            RuntimeError: If the ranks disagree on the dropped layers (raised on every rank).
        """
        strategy = trainer.strategy
        if draw_key is None:
            self.check.on_release(strategy)
        else:
            self.check.on_draw(strategy, draw_key, dropped)
        model = strategy.model
        if not isinstance(model, DistributedDataParallel):
            return  # not wrapped (yet): the wrap will see the current flags
        if self.method == "rewrap":
            self._rewrap(strategy, model)
        elif self.method == "hook" and self._hooked_wrapper is not model:
            model.register_comm_hook(state=model.process_group, hook=allreduce_trainable_only)
            self._hooked_wrapper = model

    def close(self) -> None:
        """Let go of the wrappers this adapter built or hooked: the strategy owns them."""
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
