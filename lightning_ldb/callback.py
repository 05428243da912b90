"""``LayerDropBackCallback``: wires LDB's pure core (schedule, candidates, draws) into Lightning's hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_ldb import compatibility, strategies
from lightning_ldb._checks import check_choice, check_float, check_int, check_patterns
from lightning_ldb.freezing import ParameterFreezer
from lightning_ldb.layers import GRANULARITIES, Layer, discover_layers, select_candidates
from lightning_ldb.lr_scaling import StepLRScaler
from lightning_ldb.sampling import draw_dropped, fresh_seed, global_seed
from lightning_ldb.schedule import DROP, FULL, epoch_mode, is_drop_epoch
from lightning_ldb.timing import EpochTimer

RESAMPLE_MODES = ("epoch", "step")

#: The arguments that decide what a run drops; a checkpoint made with other values warns on resume.
_CONFIG_KEYS = ("drop_rate", "every", "lr_scale", "batch_scale", "keep_first", "keep_last", "resample", "granularity")


class LayerDropBackCallback(Callback):
    r"""Train with LayerDropBack (LDB): full-backward epochs alternate with DROP epochs.

    On a DROP epoch (epoch ``e > 0`` with ``e % every == 0``) each candidate layer is dropped with
    probability ``drop_rate``: its trainable parameters get ``requires_grad=False`` before the forward,
    so autograd skips their weight gradient and no optimizer moves them. The forward pass, and with it
    BatchNorm's running statistics, is unchanged. Every optimizer steps with ``lr * lr_scale`` during
    DROP epochs (applied inside ``optimizer.step()``, so schedulers, ``LearningRateMonitor`` and
    checkpoints see the unscaled schedule), and a DataModule using
    :class:`~lightning_ldb.LDBDataModuleMixin` serves batches ``batch_scale`` times larger.

    Args:
        drop_rate: Probability ``p`` that a candidate layer is dropped on a DROP epoch, in ``[0, 1)``.
            ``0`` drops nothing (LR and batch scaling still apply).
        every: DROP-epoch period ``s``: epochs ``s, 2s, 3s, ...`` are DROP epochs.
        lr_scale: Learning-rate factor ``kappa`` on DROP epochs, ``> 0``.
        batch_scale: Batch-size factor on DROP epochs, an int ``>= 1``; honoured by
            :class:`~lightning_ldb.LDBDataModuleMixin`.
        keep_first: The first ``keep_first`` layers of the network are never dropped.
        keep_last: The last ``keep_last`` layers of the network are never dropped.
        resample: ``"epoch"`` (the paper): one draw per DROP epoch. ``"step"`` (the authors' code): a
            new draw before every optimizer step; the micro-batches of one accumulated step share it.
        seed: Seed of LDB's private generator. ``None`` takes the seed given to
            ``lightning.seed_everything`` (or, without one, a fresh seed from the OS, broadcast from
            rank 0). The resolved seed is kept in checkpoints.
        granularity: ``"module"``: a layer is a module that directly owns parameters. ``"parameter"``:
            each parameter tensor is a layer (the authors' code).
        include: Only layers whose name matches one of these ``fnmatch`` patterns are candidates
            (e.g. ``["layer3.*", "layer4.*"]``). ``None``: all layers.
        exclude: Layers whose name matches one of these patterns are never dropped.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range, or (in ``setup``) if no candidate layer is left.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_ldb import LayerDropBackCallback
        >>> ldb = LayerDropBackCallback(drop_rate=0.3, every=2, lr_scale=2.0)
        >>> trainer = Trainer(max_epochs=4, callbacks=[ldb], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        drop_rate: float = 0.3,
        every: int = 2,
        lr_scale: float = 2.0,
        batch_scale: int = 2,
        keep_first: int = 4,
        keep_last: int = 1,
        resample: str = "epoch",
        seed: Optional[int] = None,
        granularity: str = "module",
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        self.drop_rate = check_float("drop_rate", drop_rate, 0.0, 1.0)
        self.every = check_int("every", every, minimum=1)
        self.lr_scale = check_float("lr_scale", lr_scale, 0.0, low_inclusive=False)
        self.batch_scale = check_int("batch_scale", batch_scale, minimum=1)
        self.keep_first = check_int("keep_first", keep_first, minimum=0)
        self.keep_last = check_int("keep_last", keep_last, minimum=0)
        self.resample = check_choice("resample", resample, RESAMPLE_MODES)
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        if seed is not None:
            check_int("seed", seed, minimum=0)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self._seed: Optional[int] = seed

        self._candidates: list[Layer] = []
        self._candidate_numel = 0
        self._mode = FULL
        self._epoch: Optional[int] = None
        self._draw_key: Optional[tuple[int, Optional[int]]] = None
        self._dropped: tuple[Layer, ...] = ()
        self._dropped_fractions: list[float] = []
        self._freezer = ParameterFreezer()
        self._lr = StepLRScaler(before_step=self._before_optimizer_step)
        self._strategy = strategies.NoOpAdapter()
        self._timer = EpochTimer()
        self._batch_scaling_active = False

    # ------------------------------------------------------------------ introspection
    @property
    def mode(self) -> str:
        """``"drop"`` or ``"full"``: the mode of the current (or last) training epoch."""
        return self._mode

    @property
    def dropped_layers(self) -> tuple[str, ...]:
        """Names of the layers LDB has dropped right now (parameter names with ``granularity="parameter"``)."""
        return tuple(layer.name for layer in self._dropped)

    @property
    def candidate_layers(self) -> tuple[str, ...]:
        """Names of the layers that may be dropped, in network order."""
        return tuple(layer.name for layer in self._candidates)

    @property
    def seed(self) -> Optional[int]:
        """The seed of LDB's private generator, once resolved in ``setup``."""
        return self._seed

    @property
    def batch_scaling_active(self) -> bool:
        """Whether DROP epochs load ``batch_scale`` times larger batches (a mixin serves the train loader)."""
        return self._batch_scaling_active

    def is_drop_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` is a DROP epoch under this callback's ``every``."""
        return is_drop_epoch(epoch, self.every)

    def batch_size_for_epoch(self, epoch: int, base: int) -> int:
        """The training batch size of ``epoch``: ``base * batch_scale`` on DROP epochs, else ``base``."""
        return base * self.batch_scale if self.batch_scale > 1 and self.is_drop_epoch(epoch) else base

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._strategy = strategies.adapter_for(trainer, self)
        self._strategy.setup(trainer, pl_module)
        self._resolve_seed(trainer)
        if any(True for _ in pl_module.parameters()):
            # Layers made in ``configure_model`` do not exist yet; ``on_fit_start`` looks again.
            self._find_candidates(pl_module)
        self._check_batch_scaling(trainer, pl_module)
        if self._batch_scaling_active:
            compatibility.warn_if_step_checkpoints(trainer, self.batch_scale)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._find_candidates(pl_module)
        compatibility.warn_if_compiled(pl_module, self._candidates)
        compatibility.warn_if_all_droppable(pl_module, self._candidates, self.drop_rate)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Optimizers exist now, and a mid-epoch resume skips ``on_train_epoch_start``, so the epoch's
        # state is (re)applied here too.
        self._lr.attach(trainer.optimizers)
        if self._batch_scaling_active:
            compatibility.warn_if_resumed_short_epoch(trainer, self.every)
        self._enter_epoch(trainer, trainer.current_epoch)
        self._timer.start(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore_user_state()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Whatever went wrong (KeyboardInterrupt included), leave every flag and lr as the user set them.
        self._restore_user_state()

    # ------------------------------------------------------------------ per epoch and step
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._enter_epoch(trainer, trainer.current_epoch)
        self._timer.start(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._mode != DROP:
            return
        if self.resample == "step":
            # ``global_step`` counts optimizer steps, so the micro-batches of one accumulated step share a draw.
            self._apply_draw(trainer, (trainer.current_epoch, trainer.global_step))
        else:
            # Another callback's ``on_train_epoch_start`` may have run after ours and made dropped layers
            # trainable again (``BackboneFinetuning`` unfreezing the backbone): drop them again before the forward.
            self._apply_draw(trainer, (trainer.current_epoch, None))

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A GradScaler refuses to step an optimizer that holds no gradient at all ("No inf checks were recorded
        # for this optimizer"), which is what an optimizer whose parameters are all dropped holds. Give one of
        # its dropped parameters a zero gradient for the scaler to check: our step pre-hook
        # (``_before_optimizer_step``) takes it away before the optimizer runs, so nothing moves.
        if self._freezer.frozen and getattr(trainer.precision_plugin, "scaler", None) is not None:
            self._freezer.give_placeholder_grads(trainer.optimizers)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._timer.lap(pl_module, last=batch_idx + 1 >= trainer.num_training_batches)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer.pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer.resume()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fraction = sum(self._dropped_fractions) / len(self._dropped_fractions) if self._dropped_fractions else 0.0
        metrics = {
            "ldb/drop_epoch": float(self._mode == DROP),
            "ldb/dropped_fraction": fraction,
            "ldb/lr_scale": self._lr.scale,
            "ldb/epoch_time": self._timer.elapsed,
        }
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
        self._release(trainer)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._seed, "config": {key: getattr(self, key) for key in _CONFIG_KEYS}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only the seed is restored: every draw is a function of (seed, epoch[, step]). Never freeze
        # here: this runs before the strategy wraps the model.
        self._seed = state_dict["seed"]
        saved = state_dict.get("config", {})
        changed = {k: (saved[k], getattr(self, k)) for k in _CONFIG_KEYS if k in saved and saved[k] != getattr(self, k)}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            rank_zero_warn(f"LayerDropBackCallback resumes with other settings than the checkpoint's ({details}).")

    # ------------------------------------------------------------------ internals
    def _resolve_seed(self, trainer: Trainer) -> None:
        if self._seed is None:
            seed = global_seed()
            if seed is None:
                seed = fresh_seed()
                rank_zero_info(
                    f"LayerDropBackCallback: no `seed` and no `seed_everything`; drawing layers with seed {seed}."
                    " Pass `seed=` for reproducible draws."
                )
            self._seed = seed
        # One seed for all ranks, whatever each process was seeded with.
        self._seed = int(trainer.strategy.broadcast(self._seed, src=0))

    def _find_candidates(self, pl_module: LightningModule) -> None:
        layers = discover_layers(pl_module, self.granularity)
        candidates = select_candidates(layers, self.keep_first, self.keep_last, self.include, self.exclude)
        if not candidates:
            raise ValueError(
                f"LayerDropBackCallback found no candidate layer to drop in {type(pl_module).__name__}: it has"
                f" {len(layers)} layer(s) (granularity={self.granularity!r}), keep_first={self.keep_first} and"
                f" keep_last={self.keep_last} keep {min(len(layers), self.keep_first + self.keep_last)} of them, and"
                f" include={self.include!r} / exclude={self.exclude!r} filter the rest. Lower `keep_first`/"
                f"`keep_last`, widen the patterns, or use granularity='parameter'."
            )
        self._candidates = candidates
        self._candidate_numel = sum(layer.numel for layer in candidates)

    def _check_batch_scaling(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_ldb.datamodule import LDBDataModuleMixin, enable_batch_scaling

        self._batch_scaling_active = False
        if self.batch_scale == 1:
            return
        if isinstance(trainer.datamodule, LDBDataModuleMixin) or isinstance(pl_module, LDBDataModuleMixin):
            enable_batch_scaling(trainer)
            self._batch_scaling_active = True
            return
        rank_zero_warn(
            f"LayerDropBackCallback(batch_scale={self.batch_scale}): the DROP-epoch batch size stays unscaled,"
            " because neither the DataModule nor the LightningModule uses `LDBDataModuleMixin`. Put"
            " `LDBDataModuleMixin` first among its bases (see the README), or pass batch_scale=1."
        )

    def _enter_epoch(self, trainer: Trainer, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._dropped_fractions = []
        self._mode = epoch_mode(epoch, self.every)
        if self._mode == FULL:
            self._release(trainer)
            self._lr.scale = 1.0
            return
        self._lr.scale = self.lr_scale
        self._apply_draw(trainer, (epoch, trainer.global_step if self.resample == "step" else None))

    def _apply_draw(self, trainer: Trainer, key: tuple[int, Optional[int]]) -> None:
        if key == self._draw_key:
            # Same draw: only re-freeze what someone else unfroze since (a no-op, and no collective, otherwise).
            if self._freezer.freeze(param for layer in self._dropped for param in layer.parameters):
                self._strategy.on_trainable_set_changed(trainer, key, self.dropped_layers)
            return
        flags = draw_dropped(len(self._candidates), self.drop_rate, self._seed, *key)
        dropped = tuple(layer for layer, drop in zip(self._candidates, flags) if drop)
        self._freezer.restore()
        self._freezer.freeze(param for layer in dropped for param in layer.parameters)
        self._dropped = dropped
        self._draw_key = key
        dropped_numel = sum(layer.numel for layer in dropped)
        self._dropped_fractions.append(dropped_numel / self._candidate_numel if self._candidate_numel else 0.0)
        self._strategy.on_trainable_set_changed(trainer, key, self.dropped_layers)

    def _release(self, trainer: Trainer) -> None:
        if self._draw_key is None and not self._freezer.frozen:
            return
        self._freezer.restore()
        self._dropped = ()
        self._draw_key = None
        self._strategy.on_trainable_set_changed(trainer, None, ())

    def _restore_user_state(self) -> None:
        # Local only, no collective: on failure the other ranks may be gone.
        self._freezer.restore()
        self._dropped = ()
        self._draw_key = None
        self._lr.detach()

    def _before_optimizer_step(self, optimizer: Optimizer) -> None:
        # A ``zero_grad(set_to_none=False)`` would leave dropped parameters a zero tensor gradient,
        # which momentum and weight decay still act on. Only this optimizer's: another one's scaler
        # placeholder (``on_after_backward``) must last until that optimizer's own step.
        self._freezer.clear_grads(optimizer)
