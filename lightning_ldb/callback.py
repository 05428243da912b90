"""``LayerDropBackCallback``: LDB's configuration and checkpoint state, and the Lightning hooks that drive one
:class:`~lightning_ldb.run.LDBRun` per fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_ldb import compatibility
from lightning_ldb._checks import check_choice, check_float, check_int, check_patterns
from lightning_ldb.ddp import COMMUNICATION_METHODS
from lightning_ldb.layers import GRANULARITIES
from lightning_ldb.run import LDBRun, RunSettings
from lightning_ldb.schedule import BATCH_SCALINGS, FULL, BatchSchedule, is_drop_epoch

RESAMPLE_MODES = ("epoch", "step")
#: What a dropped layer skips in the backward pass.
BACKWARD_MODES = ("weights", "block")

#: The arguments that decide what a run drops; a checkpoint made with other values warns on resume.
_CONFIG_KEYS = (
    "drop_rate",
    "every",
    "lr_scale",
    "batch_scale",
    "batch_scaling",
    "keep_first",
    "keep_last",
    "resample",
    "granularity",
    "include",
    "exclude",
    "communication",
    "backward",
    "branches",
)


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
            only; no mixin needed).
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
        seed: Optional[int] = None,
        granularity: str = "module",
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        communication: str = "auto",
        backward: str = "weights",
        branches: Any = None,
    ) -> None:
        super().__init__()
        self.drop_rate = check_float("drop_rate", drop_rate, 0.0, 1.0)
        self.every = check_int("every", every, minimum=1)
        self.lr_scale = check_float("lr_scale", lr_scale, 0.0, low_inclusive=False)
        self.batch_scale = check_int("batch_scale", batch_scale, minimum=1)
        self.batch_scaling = check_choice("batch_scaling", batch_scaling, BATCH_SCALINGS)
        self.keep_first = check_int("keep_first", keep_first, minimum=0)
        self.keep_last = check_int("keep_last", keep_last, minimum=0)
        self.resample = check_choice("resample", resample, RESAMPLE_MODES)
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        if seed is not None:
            check_int("seed", seed, minimum=0)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.seed_argument: Optional[int] = seed
        self.communication = check_choice("communication", communication, COMMUNICATION_METHODS)
        self.backward = check_choice("backward", backward, BACKWARD_MODES)
        if branches is not None and not (isinstance(branches, Mapping) or callable(branches)):
            raise TypeError(
                "`branches` must be None (the built-in rules), a mapping {entry pattern: [member names]} (e.g."
                f" {{'blocks.*.norm1': ['attn']}}) or a callable model -> branches, got {branches!r}."
            )
        if branches is not None and backward != "block":
            raise ValueError(f"`branches` is used by backward='block' only, got backward={backward!r}. Pass backward='block'.")
        self.branches = branches

        self._run: Optional[LDBRun] = None
        # What the last fit left for introspection and ``state_dict`` after it ended (no live objects).
        self._last_seed: Optional[int] = None
        self._last_mode = FULL
        self._last_candidates: tuple[str, ...] = ()
        self._last_run_order: Optional[list[str]] = None

    # ------------------------------------------------------------------ introspection
    @property
    def mode(self) -> str:
        """``"drop"`` or ``"full"``: the mode of the current (or last) training epoch."""
        return self._run.mode if self._run is not None else self._last_mode

    @property
    def dropped_layers(self) -> tuple[str, ...]:
        """Names of the layers LDB has dropped right now (parameter names with ``granularity="parameter"``)."""
        return self._run.dropped_names if self._run is not None else ()

    @property
    def candidate_layers(self) -> tuple[str, ...]:
        """Names of the layers that may be dropped, in network order (of the running or last fit)."""
        if self._run is not None:
            return tuple(layer.name for layer in self._run.candidates)
        return self._last_candidates

    @property
    def seed(self) -> Optional[int]:
        """The seed of LDB's private generator: of the running fit once resolved in ``setup``, else of the last one."""
        return self._run.seed if self._run is not None else self._last_seed

    @property
    def batch_scaling_active(self) -> bool:
        """Whether this fit's DROP epochs load ``batch_scale`` times larger batches (the train data source is a mixin).

        ``False`` with ``batch_scaling="accumulate"``, where the loader's batches never change."""
        return self._run is not None and self._run.batch_scaling_active

    @property
    def batch_schedule(self) -> BatchSchedule:
        """The batch size of each epoch, as a value (``every`` and ``batch_scale``)."""
        return BatchSchedule(self.every, self.batch_scale, scaling=self.batch_scaling)

    def is_drop_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` is a DROP epoch under this callback's ``every``."""
        return is_drop_epoch(epoch, self.every)

    def batch_size_for_epoch(self, epoch: int, base: int) -> int:
        """The loader's batch size of ``epoch``: ``base * batch_scale`` on DROP epochs, else ``base`` (always ``base`` with
        ``batch_scaling="accumulate"``, which accumulates ``batch_scale`` times more batches instead)."""
        return self.batch_schedule.batch_size(epoch, base)

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._close_run()  # a fit that died without teardown
        self._run = LDBRun(self._settings(), trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._require_run().on_fit_start(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._require_run().on_train_start(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close_run()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Whatever went wrong (KeyboardInterrupt included), leave every flag, lr and setting as the user set them.
        if self._run is not None:
            compatibility.note_dropped_layers(exception, self._run.dropped_names)
        self._close_run()

    # ------------------------------------------------------------------ per epoch and step
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._require_run().on_train_epoch_start(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._require_run().on_train_batch_start(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._require_run().on_train_batch_end(trainer)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._require_run().on_after_backward(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run is not None:  # also runs in ``validate``, outside any fit
            self._run.timer.pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run is not None:
            self._run.timer.resume()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, value in self._require_run().on_train_epoch_end(trainer).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        run_order = self._run.run_order if self._run is not None else self._last_run_order
        return {
            "seed": self.seed,
            "run_order": list(run_order) if run_order is not None else None,
            "config": {key: self._config_value(key) for key in _CONFIG_KEYS},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only the seed is restored: every draw is a function of (seed, epoch[, step]). Never freeze
        # here: this runs before the strategy wraps the model.
        saved = state_dict.get("config", {})
        current = {key: self._config_value(key) for key in _CONFIG_KEYS}
        changed = {k: (saved[k], current[k]) for k in _CONFIG_KEYS if k in saved and saved[k] != current[k]}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            rank_zero_warn(f"LayerDropBackCallback resumes with other settings than the checkpoint's ({details}).")
        seed, run_order = state_dict.get("seed"), state_dict.get("run_order")
        if self._run is None:
            self._last_seed, self._last_run_order = seed, run_order
            return
        if seed is not None:
            self._run.restore_seed(seed)
        self._run.restore_run_order(run_order)

    # ------------------------------------------------------------------ internals
    def _config_value(self, key: str) -> Any:
        value = getattr(self, key)
        if key == "branches" and callable(value):  # a function is recorded by name, not pickled
            return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
        return dict(value) if isinstance(value, Mapping) else value

    def _settings(self) -> RunSettings:
        return RunSettings(
            drop_rate=self.drop_rate,
            every=self.every,
            lr_scale=self.lr_scale,
            batch_scale=self.batch_scale,
            batch_scaling=self.batch_scaling,
            keep_first=self.keep_first,
            keep_last=self.keep_last,
            resample=self.resample,
            seed=self.seed_argument,
            granularity=self.granularity,
            include=self.include,
            exclude=self.exclude,
            communication=self.communication,
            backward=self.backward,
            branches=self.branches,
        )

    def _require_run(self) -> LDBRun:
        if self._run is None:
            raise RuntimeError(
                "LayerDropBackCallback: a training hook ran outside a fit set up by this callback. Pass the callback to"
                " `Trainer(callbacks=[...])` and call `trainer.fit`; don't call its hooks by hand."
            )
        return self._run

    def _close_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        self._last_seed = run.seed
        self._last_mode = run.mode
        self._last_candidates = tuple(layer.name for layer in run.candidates)
        self._last_run_order = run.run_order
        run.close()


def find_ldb_callback(trainer: Optional[Trainer]) -> Optional[LayerDropBackCallback]:
    """The trainer's :class:`LayerDropBackCallback`, or ``None``."""
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, LayerDropBackCallback)), None)
