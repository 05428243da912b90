"""One fit of LDB: everything that lives from the callback's ``setup`` to its ``teardown``.

:class:`LDBRun` owns the resolved seed, the layers and candidates, the freezer, the optimizer hook
attachment, the strategy adapter, the timer, and an undo list of every change made to the trainer,
the strategy or the data source. The callback creates one per fit and closes it when the fit ends,
successfully or not, so nothing of one fit leaks into the next or into the user's objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_ldb import _compat, compatibility, strategies
from lightning_ldb.datamodule import LDBDataModuleMixin, TrainLoaderReloader, attach_batch_schedule
from lightning_ldb.ddp import requested_communication
from lightning_ldb.freezing import ParameterFreezer
from lightning_ldb.layers import Layer, discover_layers, select_candidates
from lightning_ldb.lr_scaling import StepLRScaler
from lightning_ldb.sampling import draw_dropped, fresh_seed, global_seed
from lightning_ldb.schedule import DROP, FULL, BatchSchedule, epoch_mode
from lightning_ldb.timing import EpochTimer
from lightning_ldb.undo import UndoList

DrawKey = tuple[int, Optional[int]]


@dataclass(frozen=True)
class RunSettings:
    """The callback's configuration, as one fit sees it."""

    drop_rate: float
    every: int
    lr_scale: float
    batch_scale: int
    keep_first: int
    keep_last: int
    resample: str
    seed: Optional[int]
    granularity: str
    include: Optional[tuple[str, ...]]
    exclude: Optional[tuple[str, ...]]
    communication: str

    @property
    def batch_schedule(self) -> BatchSchedule:
        return BatchSchedule(self.every, self.batch_scale)


class LDBRun:
    """The state and effects of LDB in one fit; created in ``setup(stage="fit")``, closed at its end.

    Args:
        settings: The callback's configuration.
        trainer: The trainer being set up.
        pl_module: The LightningModule being fit.

    Raises:
        ValueError: If LDB cannot serve the strategy, or no candidate layer is left.
    """

    def __init__(self, settings: RunSettings, trainer: Trainer, pl_module: LightningModule) -> None:
        self.settings = settings
        self.undo = UndoList()
        self.freezer = ParameterFreezer()
        self.lr = StepLRScaler(before_step=self._before_optimizer_step)
        self.timer = EpochTimer()
        self.candidates: list[Layer] = []
        self.mode = FULL
        self.dropped: tuple[Layer, ...] = ()
        self._candidate_numel = 0
        self._epoch: Optional[int] = None
        self._draw_key: Optional[DrawKey] = None
        self._dropped_fractions: list[float] = []
        self._reloader: Optional[TrainLoaderReloader] = None

        communication = requested_communication(settings.communication)
        self.adapter = strategies.adapter_for(trainer.strategy, settings.resample, communication)
        self.adapter.setup(trainer, pl_module, self.undo)
        self.seed = self._resolve_seed(trainer)
        if any(True for _ in pl_module.parameters()):
            # Layers made in ``configure_model`` do not exist yet; ``on_fit_start`` looks again.
            self._find_candidates(pl_module)
        self.batch_scaling_active = self._attach_batch_schedule(trainer, pl_module)
        if self.batch_scaling_active:
            compatibility.warn_if_step_checkpoints(trainer, settings.batch_scale)

    # ------------------------------------------------------------------ checkpoint
    def restore_seed(self, seed: int) -> None:
        """Continue a checkpointed run's draws: take its seed, unless an explicit ``seed=`` differs (warned)."""
        explicit = self.settings.seed
        if explicit is not None and explicit != seed:
            rank_zero_warn(
                f"LayerDropBackCallback resumes with seed={explicit}, but the checkpoint was made with seed {seed}:"
                f" the draws from here on differ from the interrupted run's. Pass seed={seed} (or seed=None) to"
                " continue with the same draws."
            )
            return
        self.seed = seed

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, pl_module: LightningModule) -> None:
        self._find_candidates(pl_module)
        compatibility.warn_if_compiled(pl_module, self.candidates)
        compatibility.warn_if_all_droppable(pl_module, self.candidates, self.settings.drop_rate)

    def on_train_start(self, trainer: Trainer) -> None:
        # Optimizers exist now, and a mid-epoch resume skips ``on_train_epoch_start``, so the epoch's
        # state is (re)applied here too.
        self.lr.attach(trainer.optimizers)
        if self._reloader is not None:
            self._reloader.on_train_start(trainer)
        if self.batch_scaling_active:
            compatibility.warn_if_resumed_short_epoch(trainer, self.settings.every)
        self._enter_epoch(trainer, trainer.current_epoch)
        self.timer.start()

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if self._reloader is not None:
            self._reloader.on_loader_built(trainer)
        self._enter_epoch(trainer, trainer.current_epoch)
        self.timer.start()

    def on_train_batch_start(self, trainer: Trainer) -> None:
        if self._reloader is not None:  # a mid-epoch resume skips ``on_train_epoch_start``
            self._reloader.on_loader_built(trainer)
        if self.mode != DROP:
            return
        if self.settings.resample == "step":
            # ``global_step`` counts optimizer steps, so the micro-batches of one accumulated step share a draw.
            self._apply_draw(trainer, (trainer.current_epoch, trainer.global_step))
        else:
            # Another callback's ``on_train_epoch_start`` may have run after ours and made dropped layers
            # trainable again (``BackboneFinetuning`` unfreezing the backbone): drop them again before the forward.
            self._apply_draw(trainer, (trainer.current_epoch, None))

    def on_after_backward(self, trainer: Trainer) -> None:
        # A GradScaler refuses to step an optimizer that holds no gradient at all ("No inf checks were recorded
        # for this optimizer"), which is what an optimizer whose parameters are all dropped holds. Give one of
        # its dropped parameters a zero gradient for the scaler to check: the step pre-hook
        # (``_before_optimizer_step``) takes it away before the optimizer runs, so nothing moves.
        if self.freezer.frozen and getattr(trainer.precision_plugin, "scaler", None) is not None:
            self.freezer.give_placeholder_grads(trainer.optimizers)

    def on_train_epoch_end(self, trainer: Trainer) -> dict[str, float]:
        """Release the epoch's drop and return its ``ldb/*`` metrics."""
        fractions = self._dropped_fractions
        metrics = {
            "ldb/drop_epoch": float(self.mode == DROP),
            "ldb/dropped_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
            "ldb/lr_scale": self.lr.scale,
            "ldb/epoch_time": self.timer.stop(),
        }
        self._release(trainer)
        if self._reloader is not None:
            self._reloader.on_train_epoch_end(trainer)
        return metrics

    def close(self) -> None:
        """Undo everything this run did to the user's objects. Local only (no collective): on failure the
        other ranks may be gone."""
        self.freezer.restore()
        self.dropped = ()
        self._draw_key = None
        self.lr.detach()
        self.adapter.close()
        self.undo.undo()

    # ------------------------------------------------------------------ internals
    def _resolve_seed(self, trainer: Trainer) -> int:
        seed = self.settings.seed
        if seed is None:
            seed = global_seed()
            if seed is None:
                seed = fresh_seed()
                rank_zero_info(
                    f"LayerDropBackCallback: no `seed` and no `seed_everything`; drawing layers with seed {seed}."
                    " Pass `seed=` for reproducible draws."
                )
        # One seed for all ranks, whatever each process was seeded with.
        return int(trainer.strategy.broadcast(seed, src=0))

    def _find_candidates(self, pl_module: LightningModule) -> None:
        s = self.settings
        layers = discover_layers(pl_module, s.granularity)
        candidates = select_candidates(layers, s.keep_first, s.keep_last, s.include, s.exclude)
        if not candidates:
            raise ValueError(
                f"LayerDropBackCallback found no candidate layer to drop in {type(pl_module).__name__}: it has"
                f" {len(layers)} layer(s) (granularity={s.granularity!r}), keep_first={s.keep_first} and"
                f" keep_last={s.keep_last} keep {min(len(layers), s.keep_first + s.keep_last)} of them, and"
                f" include={s.include!r} / exclude={s.exclude!r} filter the rest. Lower `keep_first`/"
                f"`keep_last`, widen the patterns, or use granularity='parameter'."
            )
        self.candidates = candidates
        self._candidate_numel = sum(layer.numel for layer in candidates)

    def _attach_batch_schedule(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        s = self.settings
        if s.batch_scale == 1:
            return False
        source = _compat.train_data_source(trainer)
        if attach_batch_schedule(source, s.batch_schedule, self.undo):
            self._reloader = TrainLoaderReloader(trainer, s.batch_schedule, self.undo)
            return True
        mixins = [obj for obj in (trainer.datamodule, pl_module) if isinstance(obj, LDBDataModuleMixin)]
        if mixins:
            why = (
                f" {type(mixins[0]).__name__} uses `LDBDataModuleMixin`, but the train loader comes from"
                f" {_describe_source(source)}. Put the mixin on the object that supplies the train loader,"
            )
        else:
            why = (
                " neither the DataModule nor the LightningModule uses `LDBDataModuleMixin`. Put"
                " `LDBDataModuleMixin` first among its bases (see the README),"
            )
        rank_zero_warn(
            f"LayerDropBackCallback(batch_scale={s.batch_scale}): the DROP-epoch batch size stays unscaled, because"
            f"{why} or pass batch_scale=1."
        )
        return False

    def _enter_epoch(self, trainer: Trainer, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._dropped_fractions = []
        self.mode = epoch_mode(epoch, self.settings.every)
        if self.mode == FULL:
            self._release(trainer)
            self.lr.scale = 1.0
            return
        self.lr.scale = self.settings.lr_scale
        self._apply_draw(trainer, (epoch, trainer.global_step if self.settings.resample == "step" else None))

    def _apply_draw(self, trainer: Trainer, key: DrawKey) -> None:
        if key == self._draw_key:
            # Same draw: only re-freeze what someone else unfroze since (a no-op, and no collective, otherwise).
            if self.freezer.freeze(param for layer in self.dropped for param in layer.parameters):
                self.adapter.on_trainable_set_changed(trainer, key, self.dropped_names)
            return
        flags = draw_dropped(len(self.candidates), self.settings.drop_rate, self.seed, *key)
        dropped = tuple(layer for layer, drop in zip(self.candidates, flags) if drop)
        self.freezer.restore()
        self.freezer.freeze(param for layer in dropped for param in layer.parameters)
        self.dropped = dropped
        self._draw_key = key
        dropped_numel = sum(layer.numel for layer in dropped)
        self._dropped_fractions.append(dropped_numel / self._candidate_numel if self._candidate_numel else 0.0)
        self.adapter.on_trainable_set_changed(trainer, key, self.dropped_names)

    def _release(self, trainer: Trainer) -> None:
        if self._draw_key is None and not self.freezer.frozen:
            return
        self.freezer.restore()
        self.dropped = ()
        self._draw_key = None
        self.adapter.on_trainable_set_changed(trainer, None, ())

    @property
    def dropped_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.dropped)

    def _before_optimizer_step(self, optimizer: Optimizer) -> None:
        # A ``zero_grad(set_to_none=False)`` would leave dropped parameters a zero tensor gradient,
        # which momentum and weight decay still act on. Only this optimizer's: another one's scaler
        # placeholder (``on_after_backward``) must last until that optimizer's own step.
        self.freezer.clear_grads(optimizer)


def _describe_source(source: Any) -> str:
    if isinstance(source, (LightningModule,)) or hasattr(source, "train_dataloader"):
        return f"{type(source).__name__}.train_dataloader()"
    if isinstance(source, Sequence) or source is None:
        return "the loaders passed to `fit`"
    return f"the {type(source).__name__} passed to `fit`"
