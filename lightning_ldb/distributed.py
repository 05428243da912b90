"""Keeping several processes in step with LDB, with torch.distributed only: one draw on every rank, checked, and no
all-reduce for dropped parameters.

Every rank must drop the same units at the same time: a parameter dropped on some ranks only would still be
averaged (DDP) or pair the wrong collectives (FSDP2). The draws are a pure function of ``(seed, epoch[, step])``
and the seed is broadcast from rank 0, so they agree by construction; :class:`CrossRankDrawCheck` verifies it at
one 8-byte all-gather per check. :func:`allreduce_trainable_only` is the DDP communication hook that leaves the
dropped parameters' (zero) gradient slots out of the all-reduce.

:class:`ProcessGroupSync` is what :class:`~lightning_ldb.LayerDropBack` uses outside Lightning's Trainer: with
Fabric, or with a ``DistributedDataParallel`` the user built. It needs DDP's ``find_unused_parameters=True`` (a
dropped parameter gets no gradient); a wrapper Fabric made is rebuilt with it once, at the first DROP epoch, and
a wrapper the user built without it is refused there with the fix, rather than left to fail in the reducer.

This module imports torch, never Lightning.
"""

from __future__ import annotations

import hashlib
import warnings
from abc import ABC, abstractmethod
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_ldb import _compat
from lightning_ldb.schedule import DrawKey


def warn_on_rank_zero(message: str) -> None:
    """``warnings.warn(message)`` on rank 0 only (every rank, without ``torch.distributed``)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=3)


class Sync(Protocol):
    """What the engine asks of the processes it runs in (one process: nothing)."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""

    def before_draw(self) -> None:
        """A draw is about to freeze units; every unit is as trainable as the user left it."""

    def on_trainable_set_changed(self, draw_key: DrawKey | None, dropped: tuple[str, ...]) -> None:
        """LDB just froze ``dropped`` for ``draw_key``, or (``draw_key=None``) released every unit."""

    def close(self) -> None:
        """Let go of every wrapper and hook this object holds."""


class LocalSync:
    """A single process: nothing to broadcast, check or reconfigure."""

    def broadcast(self, obj: Any) -> Any:
        return obj

    def before_draw(self) -> None:
        pass

    def on_trainable_set_changed(self, draw_key: DrawKey | None, dropped: tuple[str, ...]) -> None:
        pass

    def close(self) -> None:
        pass


class CheckedSync(ABC):
    """Several processes: the one cross-rank draw check, told of every change in one place.

    A subclass says how to reach the processes (:meth:`broadcast`, :attr:`world_size`, :attr:`root_device`) and
    what else a change of the trainable set needs (:meth:`after_change`): :class:`ProcessGroupSync` for the engine
    on its own, and the Lightning strategies' syncs (:mod:`lightning_ldb.strategies`) under the Trainer.

    Args:
        resample: ``"epoch"`` (every draw is checked) or ``"step"`` (checked once per DROP epoch, see
            :class:`CrossRankDrawCheck`).
    """

    def __init__(self, resample: str) -> None:
        self.check = CrossRankDrawCheck(per_draw=resample == "epoch")

    @property
    @abstractmethod
    def world_size(self) -> int:
        """How many processes train the model."""

    @property
    @abstractmethod
    def root_device(self) -> torch.device:
        """Where the check's tensor lives: CPU for gloo, the rank's GPU for NCCL."""

    @abstractmethod
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""

    def before_draw(self) -> None:  # noqa: B027  # an optional hook
        """A draw is about to freeze units (nothing to do unless a subclass says so)."""

    def on_trainable_set_changed(self, draw_key: DrawKey | None, dropped: tuple[str, ...]) -> None:
        """Check that every rank drew the same, then let the subclass follow the change.

        Raises:
            RuntimeError: If the ranks disagree on the dropped units (raised on every rank).
        """
        if draw_key is None:
            self.check.on_release(self)
        else:
            self.check.on_draw(self, draw_key, dropped)
        self.after_change()

    def after_change(self) -> None:  # noqa: B027  # an optional hook
        """The trainable set just changed and every rank agrees (nothing to do unless a subclass says so)."""

    def close(self) -> None:  # noqa: B027  # an optional hook
        """Let go of every wrapper and hook this object holds (nothing unless a subclass says so)."""


def sync_for(model: nn.Module, resample: str, fabric: Any = None) -> Sync:
    """The :class:`Sync` for ``model``: :class:`ProcessGroupSync` when several processes train it, else :class:`LocalSync`.

    Args:
        model: The model as the training loop calls it (a ``DistributedDataParallel`` or Fabric's wrapper, or not).
        resample: ``"epoch"`` or ``"step"`` (how often the cross-rank check runs).
        fabric: The ``lightning.fabric.Fabric`` that set ``model`` up, if any.
    """
    check_servable(model, fabric)
    world_size = fabric.world_size if fabric is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    if world_size <= 1:
        return LocalSync()
    return ProcessGroupSync(model, resample, fabric)


#: Strategies built on ``DDPStrategy`` that do not wrap the model in ``DistributedDataParallel`` (Fabric's and the
#: Trainer's share the names).
_NOT_DDP_WRAPPERS = {"DeepSpeedStrategy", "XLAStrategy"}


def wraps_in_ddp(strategy: Any) -> bool:
    """Whether ``strategy`` (Fabric's or the Trainer's) is a ``DDPStrategy`` that wraps the model in DDP."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return "DDPStrategy" in names and not names & _NOT_DDP_WRAPPERS


def check_servable(model: nn.Module, fabric: Any = None) -> None:
    """Refuse what the engine cannot serve: a Fabric strategy other than one device or DDP, or an FSDP1 model.

    Raises:
        ValueError: Naming the strategy or wrapper, and what to use instead.
    """
    # LDB drops a layer by flipping its parameters' ``requires_grad`` between steps. FSDP1 flattens the
    # parameters, DeepSpeed partitions them and XLA traces them, so per-layer flags would not hold (or silently
    # train something else); FSDP2 is served by the Trainer's ModelParallelStrategy adapter, not here.
    if fabric is not None:
        strategy = type(fabric.strategy)
        servable = any(cls.__name__ == "SingleDeviceStrategy" for cls in strategy.__mro__) or wraps_in_ddp(
            fabric.strategy
        )
        if not servable:
            raise ValueError(
                f"LayerDropBack(fabric=...) does not support Fabric's {strategy.__name__}. Use one device or"
                " Fabric(strategy='ddp'); to shard a model, use the Trainer with ModelParallelStrategy (docs/fsdp.md)."
            )
    from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: PLC0415 - loaded only when needed

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "LayerDropBack does not support FullyShardedDataParallel (FSDP1). Use DistributedDataParallel, or the"
            " Trainer with ModelParallelStrategy and fully_shard (docs/fsdp.md)."
        )


def find_ddp_wrapper(model: nn.Module) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` that ``model`` is or (as Fabric's wrapper) holds, if any."""
    return next((m for m in model.modules() if isinstance(m, DistributedDataParallel)), None)


class ProcessGroupSync(CheckedSync):
    """Keeps the ranks of a ``torch.distributed`` run (Fabric, or a user-built DDP) in step with LDB.

    Args:
        model: The model as the training loop calls it.
        resample: ``"epoch"`` (every draw is checked) or ``"step"`` (checked once per DROP epoch, see
            :class:`CrossRankDrawCheck`).
        fabric: The ``Fabric`` that set ``model`` up: a DDP wrapper it made may be rebuilt. ``None``: a wrapper the
            user built is used as it is.
    """

    def __init__(self, model: nn.Module, resample: str, fabric: Any = None) -> None:
        super().__init__(resample)
        self.model = model
        self.fabric = fabric
        self._hooked: DistributedDataParallel | None = None

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def root_device(self) -> torch.device:
        """Where the check's tensor lives: CPU for gloo, the rank's GPU for NCCL."""
        if self.fabric is not None:
            return self.fabric.device
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def before_draw(self) -> None:
        """Make the DDP wrapper able to skip dropped parameters, before anything is frozen.

        A rebuilt wrapper reduces the parameters that require a gradient when it is built: all of the user's.

        Raises:
            ValueError: If the user built the DDP wrapper with ``find_unused_parameters=False`` or
                ``static_graph=True`` (the same on every rank, so every rank raises, before any collective).
        """
        self._prepare_wrapper()

    def close(self) -> None:
        self._hooked = None

    def _prepare_wrapper(self) -> None:
        wrapper = find_ddp_wrapper(self.model)
        if wrapper is None or wrapper is self._hooked:
            return
        if wrapper.static_graph or not wrapper.find_unused_parameters:
            if self.fabric is None or wrapper.static_graph:
                setting = "static_graph=True" if wrapper.static_graph else "find_unused_parameters=False"
                raise ValueError(
                    f"LayerDropBack cannot drop layers under a DistributedDataParallel built with {setting}. Build"
                    " it as DistributedDataParallel(model, find_unused_parameters=True), or pass `fabric=`."
                )
            wrapper = self._rewrap(wrapper)
        if _compat.ddp_wrapper_has_comm_hook(wrapper):
            warnings.warn(
                "LayerDropBack keeps the communication hook registered on your DistributedDataParallel: the dropped"
                " layers' (zero) gradient slots are still all-reduced.",
                UserWarning,
                stacklevel=2,
            )
        else:
            register_trainable_only_hook(wrapper)
        self._hooked = wrapper

    def _rewrap(self, wrapper: DistributedDataParallel) -> DistributedDataParallel:
        # Fabric built the wrapper with its defaults (find_unused_parameters=False); one new wrapper, with the same
        # settings but find_unused_parameters=True, serves every later DROP epoch. Its construction broadcasts rank
        # 0's module state, on every rank at once (each rank reaches the first DROP epoch's draw together).
        # ``broadcast_buffers`` is passed only when off: torch 2.14 deprecates the argument, not the default.
        buffers: dict[str, Any] = {} if getattr(wrapper, "broadcast_buffers", True) else {"broadcast_buffers": False}
        new = DistributedDataParallel(
            wrapper.module,
            device_ids=wrapper.device_ids,
            output_device=wrapper.output_device,
            **buffers,
            process_group=wrapper.process_group,
            bucket_cap_mb=wrapper.bucket_bytes_cap / (1024 * 1024),
            find_unused_parameters=True,
            gradient_as_bucket_view=wrapper.gradient_as_bucket_view,
        )
        new.training = wrapper.training
        _compat.replace_fabric_forward_module(self.model, wrapper, new)
        _compat.remove_ddp_autograd_hooks(wrapper)
        return new


def register_trainable_only_hook(wrapper: DistributedDataParallel) -> None:
    """Register :func:`allreduce_trainable_only` on ``wrapper`` (DDP accepts one hook per wrapper)."""
    wrapper.register_comm_hook(state=wrapper.process_group, hook=allreduce_trainable_only)


def allreduce_trainable_only(
    process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average only the gradients of parameters that require a gradient now.

    With ``find_unused_parameters=True`` the slots of frozen (dropped) parameters in a bucket are
    zero and DDP leaves their ``grad`` as ``None``; all-reducing them only costs bandwidth. This hook
    packs the trainable slots into one tensor, all-reduces that, and unpacks the average. A bucket
    with no trainable parameter is not communicated at all; a fully trainable one is all-reduced
    in place, exactly like DDP's default hook. Every rank must have the same parameters frozen,
    which :class:`CrossRankDrawCheck` verifies.

    Args:
        process_group: The group to average over (``None``: the default group).
        bucket: The gradient bucket DDP hands over.

    Returns:
        A future holding the bucket's flat buffer with the averaged gradients.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    gradients = bucket.gradients()
    trainable = [grad for param, grad in zip(bucket.parameters(), gradients, strict=False) if param.requires_grad]
    if len(trainable) == len(gradients):
        buffer.div_(world_size)
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])
    if not trainable:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    packed = torch.cat([grad.reshape(-1) for grad in trainable]).div_(world_size)

    def unpack(fut: torch.futures.Future[Any]) -> torch.Tensor:
        averaged = fut.value()[0]
        offset = 0
        for grad in trainable:
            grad.copy_(averaged[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return buffer

    return dist.all_reduce(packed, group=group, async_op=True).get_future().then(unpack)


# DDP's ``register_comm_hook`` compares the hook's annotations with the real types; ``from __future__ import
# annotations`` turned them into strings, so they are restored here.
allreduce_trainable_only.__annotations__ = {
    "process_group": Optional[dist.ProcessGroup],  # noqa: UP045  # compared at runtime by DDP
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def draw_digest(draw_key: DrawKey, dropped: tuple[str, ...]) -> int:
    """A 63-bit digest of a draw: its key and the names it dropped.

    Example::

        >>> draw_digest((2, None), ("net.7",)) == draw_digest((2, None), ("net.7",))
        True
        >>> draw_digest((2, None), ("net.7",)) == draw_digest((2, None), ("net.9",))
        False
    """
    text = f"{draw_key!r}|{'|'.join(dropped)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class CrossRankDrawCheck:
    """Verifies that every rank dropped the same layers, at one all-gather of 8 bytes per check.

    Every method takes ``group``: anything with ``world_size`` and ``root_device`` (a Lightning strategy, or a
    :class:`ProcessGroupSync`).

    Args:
        per_draw: ``True``: check every draw as it is made (one draw per DROP epoch with
            ``resample="epoch"``). ``False`` (``resample="step"``): check the first draw of each
            DROP epoch at once and fold the later ones into a running digest that is checked when
            the epoch releases its layers, so that a per-step draw costs no collective, and no
            device synchronisation, of its own.
    """

    def __init__(self, per_draw: bool) -> None:
        self.per_draw = per_draw
        self._epoch: int | None = None
        self._running: int | None = None
        self._history: list[tuple[DrawKey, tuple[str, ...]]] = []

    def on_draw(self, group: Any, draw_key: DrawKey, dropped: tuple[str, ...]) -> None:
        """Record (and, when due, check) a draw.

        Raises:
            RuntimeError: If the ranks disagree.
        """
        epoch = draw_key[0]
        if self._running is not None and epoch != self._epoch:
            self.on_release(group)  # a draw of a new epoch without a release in between: settle the old one
        digest = draw_digest(draw_key, dropped)
        if self.per_draw or epoch != self._epoch:
            self._epoch = epoch
            self._verify(group, digest, [(draw_key, dropped)])
            return
        self._history.append((draw_key, dropped))
        previous = self._running if self._running is not None else 0
        self._running = draw_digest((epoch, previous), (str(digest),))

    def on_release(self, group: Any) -> None:
        """Check the draws folded since the last check, if any.

        Raises:
            RuntimeError: If the ranks disagree.
        """
        if self._running is None:
            return
        digest, history = self._running, self._history
        self._running, self._history = None, []
        self._verify(group, digest, history)

    def _verify(self, group: Any, digest: int, history: list[tuple[DrawKey, tuple[str, ...]]]) -> None:
        if group.world_size <= 1 or not dist.is_initialized():
            return
        # ``torch.distributed.all_gather`` rather than ``strategy.all_gather``, whose autograd-aware path warns
        # about a deprecated torch function on every call. The tensor lives on the device NCCL needs.
        local = torch.tensor([digest], dtype=torch.int64, device=group.root_device)
        gathered = [torch.empty_like(local) for _ in range(group.world_size)]
        dist.all_gather(gathered, local)
        digests = [int(tensor.item()) for tensor in gathered]
        if len(set(digests)) == 1:
            return
        # Every rank sees the mismatch, so all of them take this path together and the collective below pairs up.
        histories: list[Any] = [None] * len(digests)
        dist.all_gather_object(histories, history)
        raise RuntimeError(_disagreement_message(self._epoch, histories))


def _disagreement_message(epoch: int | None, histories: list[Any]) -> str:
    """Describe the first draw in which some rank differs from rank 0."""
    reference = histories[0]
    detail = ""
    for rank, history in enumerate(histories[1:], start=1):
        for index in range(max(len(reference), len(history))):
            ours = reference[index] if index < len(reference) else None
            theirs = history[index] if index < len(history) else None
            if ours != theirs:
                key = (ours or theirs)[0]  # type: ignore[index]  # one of them is an entry
                step = f" at step {key[1]}" if key[1] is not None else ""
                detail = f"{step}: rank 0 dropped {_describe(ours)}, rank {rank} dropped {_describe(theirs)}"
                break
        if detail:
            break
    return (
        f"LayerDropBack: the ranks disagree on the layers dropped in epoch {epoch}{detail}. Gradients of a layer"
        " dropped on some ranks only are still averaged, so it would train anyway and the ranks would diverge. Give"
        " every rank the same model and the same LDB arguments (drop_rate, keep_first, keep_last,"
        " include, exclude, granularity, resample); the seed is broadcast from rank 0."
    )


def _describe(entry: Any) -> str:
    if entry is None:
        return "nothing (no draw)"
    key, dropped = entry
    return f"{list(dropped)} (draw key {key})"
