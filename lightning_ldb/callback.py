"""``LayerDropBackCallback``: LDB under Lightning's Trainer, driving one :class:`~lightning_ldb.LayerDropBack` per fit.

The engine does everything LDB does to the model and its optimizers. The callback holds the configuration (one
:class:`~lightning_ldb.Settings`) and the checkpoint state, and per fit (``setup`` to ``teardown``, or the exception)
one :class:`_Fit`: the engine, the strategy's ``Sync`` (:mod:`lightning_ldb.strategies`), the train-loader reload or
the accumulation (:mod:`lightning_ldb.batching`), the epoch timer and an undo list of every change made to the
trainer, the strategy or the data source. Nothing of one fit leaks into the next or into the user's objects.

Which hook does what: ``setup`` creates the fit (the strategy's sync configures it before it wraps the model);
``on_fit_start`` lists the units again (``configure_model`` has run); ``on_train_start`` hooks the optimizers;
``on_train_epoch_start`` enters the epoch; ``on_train_batch_start`` draws (after every callback's epoch start, so a
layer another callback froze there is not a candidate); ``on_train_epoch_end`` logs ``ldb/*`` and releases.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ldb import batching
from lightning_ldb.batching import GradientAccumulationScaler, TrainLoaderReloader
from lightning_ldb.branches import Branch, describe_branches, unrecognised_note
from lightning_ldb.distributed import Sync
from lightning_ldb.dropping import refuse_optimizers_that_move_dropped_parameters
from lightning_ldb.engine import LayerDropBack
from lightning_ldb.schedule import DROP, FULL, Settings
from lightning_ldb.strategies import strategy_sync
from lightning_ldb.undo import UndoList

#: The arguments that decide what a run drops (every setting but the seed); a checkpoint made with other values warns
#: on resume.
_CONFIG_KEYS = tuple(f.name for f in fields(Settings) if f.name != "seed")


class EpochTimer:
    """The callback's ``ldb/epoch_time``: wall-clock seconds of a training epoch, validation inside the epoch excluded.

    Two clock reads per epoch and two per validation run, nothing per step and no device synchronisation, so it costs
    the training loop nothing; on a GPU it is therefore approximate (queued kernels may be billed to the next epoch).

    Example::

        >>> timer = EpochTimer()
        >>> timer.start(); timer.pause(); timer.resume(); timer.stop() >= 0.0
        True
    """

    def __init__(self) -> None:
        self._elapsed = 0.0
        self._start: float | None = None
        self._paused_at: float | None = None
        self._paused = 0.0

    def start(self) -> None:
        self._elapsed, self._paused, self._paused_at = 0.0, 0.0, None
        self._start = time.perf_counter()

    def pause(self) -> None:
        if self._start is not None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused += time.perf_counter() - self._paused_at
            self._paused_at = None

    def stop(self) -> float:
        """The epoch's seconds so far, validation excluded (``0.0`` if it never started)."""
        if self._start is not None:
            self.resume()
            self._elapsed = time.perf_counter() - self._start - self._paused
        return self._elapsed


@dataclass
class _Fit:
    """What one fit holds, from ``setup`` to ``teardown``."""

    engine: LayerDropBack
    sync: Sync  # the strategy's
    undo: UndoList  # closes the engine and the sync too
    #: What changes the batch between epochs: the train-loader reload (``batch_scaling="loader"`` with the mixin),
    #: or the accumulation (``"accumulate"``).
    reloader: TrainLoaderReloader | GradientAccumulationScaler | None = None
    timer: EpochTimer = field(default_factory=EpochTimer)

    @property
    def batch_scaling_active(self) -> bool:
        """Whether DROP epochs load larger batches (the mixin's loader reload)."""
        return isinstance(self.reloader, TrainLoaderReloader)

    def close(self) -> None:
        """Undo the list: the engine restores every flag and learning rate, the sync lets go of its wrappers, every
        setting goes back. Local only (no collective)."""
        self.undo.close()


class LayerDropBackCallback(Callback):
    r"""Train with LayerDropBack (LDB): full-backward epochs alternate with DROP epochs.

    On a DROP epoch (epoch ``e > 0`` with ``e % every == 0``) each candidate layer is dropped with
    probability ``drop_rate``: its trainable parameters get ``requires_grad=False`` before the forward,
    so autograd skips their weight gradient and no optimizer moves them. The forward pass, and with it
    BatchNorm's running statistics, is unchanged. Every optimizer steps with ``lr * lr_scale`` during
    DROP epochs (applied inside ``optimizer.step()``, so schedulers, ``LearningRateMonitor`` and
    checkpoints see the unscaled schedule), and the batch is ``batch_scale`` times larger: a DataModule
    using :class:`~lightning_ldb.LDBDataModuleMixin` serves larger batches, or (``batch_scaling="accumulate"``)
    each optimizer step accumulates ``batch_scale`` times more micro-batches.

    The callback is the Trainer's adapter over :class:`~lightning_ldb.LayerDropBack`, which does the dropping: it
    creates one engine per fit and drives it from the Trainer's hooks, and it wires what only the Trainer has (the
    strategy, the train loader, the step count, the logged metrics).

    Args:
        drop_rate: Probability ``p`` that a candidate layer is dropped on a DROP epoch, in ``[0, 1)``.
            ``0`` drops nothing (LR and batch scaling still apply).
        every: DROP-epoch period ``s``: epochs ``s, 2s, 3s, ...`` are DROP epochs.
        lr_scale: Learning-rate factor ``kappa`` on DROP epochs, ``> 0``.
        batch_scale: Batch-size factor on DROP epochs, an int ``>= 1``.
        batch_scaling: How DROP epochs get the larger batch. ``"loader"``: the train loader serves batches
            ``batch_scale`` times larger (needs :class:`~lightning_ldb.LDBDataModuleMixin`); an integer
            ``limit_train_batches`` or ``val_check_interval`` is divided by ``batch_scale`` on DROP epochs.
            ``"accumulate"``: batches keep their size and ``accumulate_grad_batches`` (yours, multiplied) is
            ``batch_scale`` times larger on DROP epochs, so memory stays that of a full epoch while the effective
            batch, optimizer steps and DDP all-reduces are those of the larger batch (automatic optimization
            only, not with DDP's ``static_graph=True``; no mixin needed).
        keep_first: The first ``keep_first`` layers are never dropped. ``keep_first`` and ``keep_last`` count
            the layers trainable at each draw, in the order the data flows through them on the first training
            step (a module is placed where its parameters are first used); layers that took no part in that
            step (a validation-only module, an auxiliary head not run) are never counted. A DROP epoch with
            no candidate left (a frozen backbone) warns once per fit; its LR and batch are still scaled.
        keep_last: The last ``keep_last`` layers are never dropped (the head, with ``keep_last=1``).
        resample: ``"epoch"`` (the paper): one draw per DROP epoch. ``"step"`` (the authors' code): a
            new draw before every optimizer step; the micro-batches of one accumulated step share it.
        seed: Seed of LDB's private generator. ``None`` takes, at the start of each fit, the seed last
            given to ``lightning.seed_everything`` (or, without one, a fresh seed from the OS), broadcast
            from rank 0. The resolved seed is kept in checkpoints and taken back on resume.
        granularity: ``"module"``: a layer is a module that directly owns parameters. ``"parameter"``:
            each parameter tensor is a layer (the authors' code).
        include: Only layers whose name matches one of these ``fnmatch`` patterns are candidates
            (e.g. ``["layer3.*", "layer4.*"]``). ``None``: all layers.
        exclude: Layers whose name matches one of these patterns are never dropped.
        communication: How LDB keeps DDP's gradient all-reduce in line with the dropped layers: ``"auto"``
            (``"rewrap"`` with ``resample="epoch"``, ``"hook"`` with ``resample="step"``, ``"find_unused"``
            when the strategy has its own comm hook), or one of those three (see ``docs/ddp.md``). Ignored
            without DDP.
        backward: What a dropped unit skips in the backward pass. ``"weights"`` (the paper): a dropped layer
            gets no weight gradient; everything else is exact. ``"block"``: the unit is a residual branch
            ``F`` of ``y = x + F(x)``, computed on its detached input with frozen weights, so the backward skips
            the whole branch (weights and input gradients); the forward is unchanged, the gradients of layers
            below a dropped branch are those of the network without that branch (see ``docs/block-mode.md``).
        branches: With ``backward="block"``: ``None`` uses the built-in rules (torchvision ResNet and Swin, timm
            ViT, Hugging Face GPT-2, BERT and Llama-style layers); a mapping ``{entry pattern: [member names]}``
            names the branches of any model (member names relative to the entry's parent block); a callable
            ``model -> [Branch, ...]`` builds them.

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
        batch_scaling: str = "loader",
        keep_first: int = 4,
        keep_last: int = 1,
        resample: str = "epoch",
        seed: int | None = None,
        granularity: str = "module",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        communication: str = "auto",
        backward: str = "weights",
        branches: Any = None,
    ) -> None:
        #: Every argument, checked (so that a bad one fails where it is written). Each is also an attribute of the
        #: callback (``callback.drop_rate``); setting one replaces the settings, checked again.
        self.settings = Settings.from_locals(locals())
        super().__init__()
        self._fit: _Fit | None = None
        # What the last fit left for introspection and ``state_dict`` after it ended (no live objects).
        self._last_seed: int | None = None
        self._last_mode = FULL
        self._last_candidates: tuple[str, ...] = ()
        self._last_run_order: list[str] | None = None

    # ------------------------------------------------------------------ introspection
    @property
    def seed_argument(self) -> int | None:
        """The ``seed`` argument (``None``: resolved at each fit); :attr:`seed` is the one in use."""
        return self.settings.seed

    @property
    def mode(self) -> str:
        """``"drop"`` or ``"full"``: the mode of the current (or last) training epoch."""
        return self._fit.engine.mode if self._fit is not None else self._last_mode

    @property
    def dropped_layers(self) -> tuple[str, ...]:
        """Names of the layers LDB has dropped right now (parameter names with ``granularity="parameter"``)."""
        return self._fit.engine.dropped_layers if self._fit is not None else ()

    @property
    def candidate_layers(self) -> tuple[str, ...]:
        """Names of the layers that may be dropped, in network order (of the running or last fit)."""
        return self._fit.engine.candidate_layers if self._fit is not None else self._last_candidates

    @property
    def seed(self) -> int | None:
        """The seed of LDB's private generator: of the running fit once resolved in ``setup``, else of the last one."""
        return self._fit.engine.seed if self._fit is not None else self._last_seed

    @property
    def batch_scaling_active(self) -> bool:
        """Whether this fit's DROP epochs load ``batch_scale`` times larger batches (the train data source is a mixin).

        ``False`` with ``batch_scaling="accumulate"``, where the loader's batches never change."""
        return self._fit is not None and self._fit.batch_scaling_active

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._close_fit()  # a fit that died without teardown
        # All or nothing: whatever step fails, what the earlier ones changed is undone.
        with UndoList() as undo:
            sync = strategy_sync(trainer, pl_module, self.settings, undo)  # before the strategy wraps the model
            engine = LayerDropBack(pl_module, (), **self.settings.engine_arguments(), sync=sync)
            undo.callback(engine.close)
            reloader = batching.attach(
                trainer, pl_module, self.settings.every, self.settings.batch_scale, self.settings.batch_scaling, undo
            )
            engine._batch_scaled = isinstance(reloader, TrainLoaderReloader)
            fit = _Fit(engine, sync, undo.pop_all(), reloader=reloader)  # set up: the fit owns the undo list now
        self._fit = fit
        if fit.batch_scaling_active:
            batching.warn_if_step_checkpoints(trainer, self.settings.batch_scale)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        engine = self._require_fit().engine
        engine._discover()  # modules made in ``configure_model`` exist now
        refuse_optimizers_that_move_dropped_parameters(trainer.optimizers)  # they exist now: fail before a step
        report_branches(pl_module, self.settings, engine._units.branches)
        engine._warn_about_composition(trainer.optimizers, "LayerDropBackCallback")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Optimizers exist now, and a mid-epoch resume skips ``on_train_epoch_start``, so the epoch is entered here too.
        fit = self._require_fit()
        fit.engine.hook_optimizers(trainer.optimizers, replace=True)
        if fit.reloader is not None:
            fit.reloader.on_train_start(trainer)
        if fit.batch_scaling_active:
            batching.warn_if_resumed_short_epoch(trainer, self.settings.every)
        fit.engine._start_epoch(trainer.current_epoch)
        fit.timer.start()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close_fit()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Whatever went wrong (KeyboardInterrupt included), leave every flag, lr and setting as the user set them.
        if self._fit is not None:
            self._fit.engine._note_dropped_layers(exception, "LayerDropBackCallback")
        self._close_fit()

    # ------------------------------------------------------------------ per epoch and step
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = self._require_fit()
        fit.engine._start_epoch(trainer.current_epoch)
        fit.timer.start()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        fit = self._require_fit()
        if fit.reloader is not None:  # the epoch's train loader is built by now
            fit.reloader.on_loader_built(trainer)
        # Optimizers made during fit (a callback calling ``setup_optimizers``) are hooked on their first step.
        fit.engine.hook_optimizers(trainer.optimizers)
        if fit.engine.run_order is None:
            fit.engine._start_run_order()
        if fit.engine.mode == DROP:
            # Drawn here, not in ``on_train_epoch_start``: every callback's epoch start has run by now, whatever the
            # order, so a layer another callback froze there is not a candidate. ``global_step`` counts optimizer
            # steps, so the micro-batches of one accumulated step share a draw.
            step = trainer.global_step if self.settings.resample == "step" else None
            fit.engine._draw(trainer.current_epoch, step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._require_fit().engine._finish_run_order()  # rank 0's order, so that every rank drops the same

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            self._require_fit().engine._give_placeholder_grads(trainer.optimizers)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit is not None:  # also runs in ``validate``, outside any fit
            self._fit.timer.pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit is not None:
            self._fit.timer.resume()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = self._require_fit()
        metrics = {
            "ldb/drop_epoch": float(fit.engine.mode == DROP),
            "ldb/dropped_fraction": fit.engine.dropped_fraction,
            "ldb/lr_scale": fit.engine._lr.scale,
            "ldb/epoch_time": fit.timer.stop(),
        }
        fit.engine._end_epoch()
        if fit.reloader is not None:
            fit.reloader.on_train_epoch_end(trainer)
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        run_order = self._fit.engine.run_order if self._fit is not None else self._last_run_order
        return {
            "seed": self.seed,
            "run_order": list(run_order) if run_order is not None else None,
            "config": {key: self._config_value(key) for key in _CONFIG_KEYS},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only the seed and the run order are restored: every draw is a function of (seed, epoch[, step]). Never
        # freeze here: this runs before the strategy wraps the model.
        saved = state_dict.get("config", {})
        current = {key: self._config_value(key) for key in _CONFIG_KEYS}
        changed = {k: (saved[k], current[k]) for k in _CONFIG_KEYS if k in saved and saved[k] != current[k]}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            rank_zero_warn(f"LayerDropBackCallback resumes with other settings than the checkpoint's ({details}).")
        seed, run_order = state_dict.get("seed"), state_dict.get("run_order")
        if self._fit is None:
            self._last_seed, self._last_run_order = seed, run_order
            return
        self._fit.engine.load_state_dict({"seed": seed, "run_order": run_order})

    # ------------------------------------------------------------------ internals
    def _config_value(self, key: str) -> Any:
        value = getattr(self.settings, key)
        if key == "branches" and callable(value):  # a function is recorded by name, not pickled
            return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
        return dict(value) if isinstance(value, Mapping) else value

    def _require_fit(self) -> _Fit:
        if self._fit is None:
            raise RuntimeError(
                "LayerDropBackCallback: a training hook ran outside a fit set up by this callback. Pass the callback to"
                " `Trainer(callbacks=[...])` and call `trainer.fit`; don't call its hooks by hand."
            )
        return self._fit

    def _close_fit(self) -> None:
        fit, self._fit = self._fit, None
        if fit is None:
            return
        self._last_seed = fit.engine.seed
        self._last_mode = fit.engine.mode
        self._last_candidates = fit.engine.candidate_layers
        self._last_run_order = fit.engine.run_order
        fit.close()


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


class _Setting:
    """A callback attribute that reads one field of the callback's :class:`Settings`; setting it replaces the
    settings (checked again), so that a subclass or a config changing it before ``setup`` is checked like an argument."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, callback: Any, owner: Any = None) -> Any:
        return self if callback is None else getattr(callback.settings, self.name)

    def __set__(self, callback: Any, value: Any) -> None:
        callback.settings = replace(callback.settings, **{self.name: value})


for _field in fields(Settings):
    if _field.name != "seed":  # ``seed`` is the seed in use, ``seed_argument`` the argument
        setattr(LayerDropBackCallback, _field.name, _Setting(_field.name))
