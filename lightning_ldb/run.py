"""One fit of LDB: everything that lives from the callback's ``setup`` to its ``teardown``.

:class:`LDBRun` owns the resolved seed, the layers and candidates, the freezer, the optimizer hook
attachment, the strategy adapter, the timer, and an undo list of every change made to the trainer,
the strategy or the data source. The callback creates one per fit and closes it when the fit ends,
successfully or not, so nothing of one fit leaks into the next or into the user's objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from lightning_ldb import _compat, compatibility, strategies
from lightning_ldb.branches import Branch, BranchesSpec, discover_branches, select_branch_candidates
from lightning_ldb.datamodule import (
    GradientAccumulationScaler,
    LDBDataModuleMixin,
    TrainLoaderReloader,
    attach_batch_schedule,
    schedule_for,
)
from lightning_ldb.ddp import requested_communication
from lightning_ldb.detaching import BranchInputDetacher
from lightning_ldb.freezing import ParameterFreezer, refuse_optimizers_that_move_dropped_parameters
from lightning_ldb.layers import Layer, RunOrderRecorder, discover_layers, order_layers, select_candidates, unique_numel
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
    backward: str = "weights"
    branches: BranchesSpec = None
    batch_scaling: str = "loader"

    def batch_schedule(self, trainer: Trainer) -> BatchSchedule:
        return schedule_for(trainer, self.every, self.batch_scale, self.batch_scaling)


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
        self.detacher = BranchInputDetacher()
        self.lr = StepLRScaler(before_step=self._before_optimizer_step)
        self.timer = EpochTimer()
        self.layers: list[Layer] = []  # registration order
        self.branches: list[Branch] = []  # residual branches (``backward="block"``)
        #: Module names in the order they took part in a training step, see ``RunOrderRecorder`` (``None``: not yet).
        self.run_order: Optional[list[str]] = None
        self.candidates: list[Any] = []  # layers, or branches in block mode
        self.mode = FULL
        self.dropped: tuple[Any, ...] = ()
        self._ordered: list[Layer] = []
        self._recorder: Optional[RunOrderRecorder] = None
        self._module: Optional[LightningModule] = None
        self._epoch: Optional[int] = None
        self._draw_key: Optional[DrawKey] = None
        self._dropped_fractions: list[float] = []
        self._dropped_parameters: list[Any] = []
        self._reloader: Optional[Union[TrainLoaderReloader, GradientAccumulationScaler]] = None
        self._warned_nothing_to_drop = False

        self.adapter: strategies.StrategyAdapter = strategies.NoOpAdapter()
        try:
            self._set_up(trainer, pl_module)
        except BaseException:
            self.close()  # all or nothing: the callback never gets this run to close, so undo what setup did
            raise

    def _set_up(self, trainer: Trainer, pl_module: LightningModule) -> None:
        settings = self.settings
        communication = requested_communication(settings.communication)
        self.adapter = strategies.adapter_for(trainer.strategy, settings.resample, communication)
        self.adapter.setup(trainer, pl_module, self.undo)
        self.seed = self._resolve_seed(trainer)
        if any(True for _ in pl_module.parameters()):
            # Layers made in ``configure_model`` do not exist yet; ``on_fit_start`` looks again.
            self._find_layers(pl_module)
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

    def restore_run_order(self, run_order: Optional[Sequence[str]]) -> None:
        """Take the run order observed before the checkpoint was made (``None``: observe it anew)."""
        self.run_order = list(run_order) if run_order is not None else None
        self._ordered = order_layers(self.layers, self.run_order or (), self.settings.granularity)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, pl_module: LightningModule) -> None:
        self._module = pl_module
        self._find_layers(pl_module)
        compatibility.report_branches(pl_module, self.settings, self.branches)
        refuse_optimizers_that_move_dropped_parameters(pl_module.trainer.optimizers)  # exist now: fail before a step
        compatibility.warn_if_compiled(pl_module, self.candidates)
        compatibility.warn_if_all_droppable(pl_module, self.candidates, self.settings.drop_rate)
        compatibility.warn_if_an_optimizer_can_lose_all_its_layers(
            pl_module.trainer.optimizers, self.candidates, self.settings.drop_rate
        )

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
        self._enter_epoch(trainer, trainer.current_epoch)
        self.timer.start()

    def on_train_batch_start(self, trainer: Trainer) -> None:
        if self._reloader is not None:  # the epoch's train loader is built by now
            self._reloader.on_loader_built(trainer)
        # Optimizers made during fit (a callback calling ``setup_optimizers``) are hooked on their first step.
        self.lr.attach_new(trainer.optimizers)
        if self.run_order is None and self._recorder is None and self._module is not None:
            self._recorder = RunOrderRecorder(self._module)
        if self.mode != DROP:
            return
        # The draw is applied here, before the forward, rather than in ``on_train_epoch_start``: every callback's
        # ``on_train_epoch_start`` has run by now, whatever the order, so a layer another callback froze there is
        # not a candidate, and one it unfroze is. ``global_step`` counts optimizer steps, so the micro-batches of
        # one accumulated step share a draw.
        step = trainer.global_step if self.settings.resample == "step" else None
        self._apply_draw(trainer, (trainer.current_epoch, step))

    def on_train_batch_end(self, trainer: Trainer) -> None:
        if self._recorder is None:
            return
        observed, self._recorder = self._recorder.stop(), None
        # Rank 0's order, so that every rank keeps and drops the same layers.
        self.run_order = list(trainer.strategy.broadcast(observed, src=0))
        if self._module is not None:
            self._find_layers(self._module)  # lazy modules are materialised after their first forward

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
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None
        self.detacher.restore()
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

    def _find_layers(self, pl_module: LightningModule) -> None:
        s = self.settings
        self.layers = discover_layers(pl_module, s.granularity)
        self._ordered = order_layers(self.layers, self.run_order or (), s.granularity)
        if any(is_lazy(p) for p in pl_module.parameters()):
            # Lazy modules materialise on the first forward; the layers are listed again after the first batch.
            self.candidates = self._trainable_candidates()
            return
        if s.backward == "block":
            self._find_branches(pl_module)
        # Structural check: can any layer ever be a candidate? Which ones are depends on what is trainable
        # at each draw (see ``_apply_draw``).
        elif not select_candidates(self.layers, s.keep_first, s.keep_last, s.include, s.exclude):
            raise ValueError(
                f"LayerDropBackCallback found no candidate layer to drop in {type(pl_module).__name__}: it has"
                f" {len(self.layers)} layer(s) (granularity={s.granularity!r}), keep_first={s.keep_first} and"
                f" keep_last={s.keep_last} keep {min(len(self.layers), s.keep_first + s.keep_last)} of them, and"
                f" include={s.include!r} / exclude={s.exclude!r} filter the rest. Lower `keep_first`/"
                f"`keep_last`, widen the patterns, or use granularity='parameter'."
            )
        self.candidates = self._trainable_candidates()

    def _find_branches(self, pl_module: LightningModule) -> None:
        s = self.settings
        self.branches = discover_branches(pl_module, s.branches)
        if not self.branches:
            raise ValueError(
                f"LayerDropBackCallback(backward='block') found no residual branch in {type(pl_module).__name__}: it"
                " recognises torchvision ResNet and Swin blocks, timm ViT blocks and Hugging Face GPT-2, BERT and"
                " Llama-style layers. Name your model's branches with `branches=` (e.g. {'blocks.*.norm1': ['attn']},"
                " see docs/block-mode.md), or use backward='weights'."
                + compatibility.unrecognised_note(pl_module, s.branches)
            )
        if not select_branch_candidates(self.branches, self._ordered, s.keep_first, s.keep_last, s.include, s.exclude):
            raise ValueError(
                f"LayerDropBackCallback(backward='block') found {len(self.branches)} residual branch(es) in"
                f" {type(pl_module).__name__}, but every one holds a layer kept by keep_first={s.keep_first}/"
                f"keep_last={s.keep_last} or is filtered out by include={s.include!r} / exclude={s.exclude!r}."
                " Lower `keep_first`/`keep_last` or widen the patterns."
            )

    def _trainable_candidates(self) -> list[Any]:
        """The candidates among what is trainable now: keep_first/keep_last count trainable layers in run order.

        In block mode the candidates are the trainable residual branches that hold no kept layer.
        """
        s = self.settings
        trainable = [layer for layer in self._ordered if layer.trainable]
        if s.backward == "block":
            branches = [branch for branch in self.branches if any(p.requires_grad for p in branch.parameters)]
            return select_branch_candidates(branches, trainable, s.keep_first, s.keep_last, s.include, s.exclude)
        return select_candidates(trainable, s.keep_first, s.keep_last, s.include, s.exclude)

    def _always_trained(self, candidates: Sequence[Any]) -> set[int]:
        """Ids of parameters a draw over ``candidates`` must never drop: those shared with an always-trained layer."""
        if self.settings.backward == "block":
            in_branches = {id(p) for branch in candidates for p in branch.parameters}
            # A layer not wholly inside the candidate branches (kept, excluded, or not residual) is always trained.
            outside = [layer for layer in self._ordered if any(id(p) not in in_branches for p in layer.parameters)]
            return {id(p) for layer in outside for p in layer.parameters}
        candidate_ids = {id(layer) for layer in candidates}
        return {id(p) for layer in self._ordered if id(layer) not in candidate_ids for p in layer.parameters}

    def _attach_batch_schedule(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        s = self.settings
        if s.batch_scale == 1:
            return False
        schedule = s.batch_schedule(trainer)
        if s.batch_scaling == "accumulate":  # no mixin: the loader keeps its batches, Lightning accumulates them
            compatibility.check_accumulate_scaling(pl_module, s.batch_scale)
            self._reloader = GradientAccumulationScaler(trainer, schedule, self.undo)
            return False
        source = _compat.train_data_source(trainer)
        if attach_batch_schedule(source, schedule, self.undo):
            self._reloader = TrainLoaderReloader(trainer, schedule, self.undo)
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
        # The draw itself waits for the epoch's first batch (``on_train_batch_start``).
        self._release(trainer)
        self.lr.scale = self.settings.lr_scale if self.mode == DROP else 1.0

    def _apply_draw(self, trainer: Trainer, key: DrawKey) -> None:
        if key == self._draw_key:
            # Same draw: only re-freeze what someone else unfroze since (a no-op, and no collective, otherwise).
            if self.freezer.freeze(self._dropped_parameters):
                self.adapter.on_trainable_set_changed(trainer, key, self.dropped_names)
            return
        self.freezer.restore()  # what is trainable now is what the user and other callbacks left trainable
        self.detacher.restore()
        candidates = self._trainable_candidates()
        if not candidates and not self._warned_nothing_to_drop:
            self._warned_nothing_to_drop = True
            compatibility.warn_nothing_to_drop(key[0], self._ordered, self.settings, self.batch_scaling_active)
        flags = draw_dropped(len(candidates), self.settings.drop_rate, self.seed, *key)
        dropped = tuple(layer for layer, drop in zip(candidates, flags) if drop)
        # A parameter shared with a layer that is always trained (kept first/last, excluded) is never dropped.
        kept = self._always_trained(candidates)
        droppable = [p for layer in candidates for p in layer.parameters if id(p) not in kept]
        self._dropped_parameters = [p for layer in dropped for p in layer.parameters if id(p) not in kept]
        self.freezer.freeze(self._dropped_parameters)
        if self.settings.backward == "block":
            self.detacher.detach(dropped)
        self.candidates = candidates
        self.dropped = dropped
        self._draw_key = key
        total = unique_numel(droppable)
        self._dropped_fractions.append(unique_numel(self._dropped_parameters) / total if total else 0.0)
        self.adapter.on_trainable_set_changed(trainer, key, self.dropped_names)

    def _release(self, trainer: Trainer) -> None:
        if self._draw_key is None and not self.freezer.frozen:
            return
        self.detacher.restore()
        self.freezer.restore()
        self.dropped = ()
        self._dropped_parameters = []
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
