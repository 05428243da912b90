"""The runs: every variant on the user's model, data and trainer, from the same seed, timed by two clocks.

A *setup* is what one run trains: a freshly built LightningModule, its DataModule (or ``None`` when the
module has its own loaders) and the user's ``Trainer`` arguments. :func:`run_benchmark` builds one per
run through a ``build`` function (the ``ldb-bench`` command builds it from the user's LightningCLI
config; :func:`compare` from two factories), so every variant starts from the same seed (identical
initial weights). The global RNG is re-seeded from ``(seed, epoch)`` at the start of every training
epoch, so every variant draws the same shuffles (the same batches in the same order) and dropout masks
in each epoch. Variants differ only in what :data:`VARIANTS` lists.

The design: every repetition runs every variant once, the order rotated from one repetition to the next
(``A B C``, ``B C A``, ``C A B``, ...), so each variant takes each place in turn; the report compares each
run with the baseline of its own repetition (paired ratios, :mod:`~lightning_ldb.bench.stats`), so a slow
drift of the machine's speed stretches both terms of a ratio alike. Each epoch is timed on the wall clock
(CUDA-synchronised on a GPU) and on this process's CPU time, torch's thread count held at its value when
the benchmark started; on a CPU the verdict uses the CPU time (other processes on a shared CPU stretch the
wall clock, not the CPU time the run used), except where data-loader worker processes do part of the work
(their CPU time is not this process's) or several processes train (rank 0 waits for the others).

The library is used through its public names only (``lightning_ldb.__all__``).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Union

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import StrategyRegistry

from lightning_ldb import LayerDropBackCallback, LDBDataModuleMixin, Settings
from lightning_ldb.bench import profile as profiling
from lightning_ldb.bench import report
from lightning_ldb.bench.data import derived_seed
from lightning_ldb.bench.peers import ProgressiveFreezing, add_stochastic_depth, identity_blocks
from lightning_ldb.bench.setups import Setup, batch_length, environment, kept_callbacks, residual_branches, run_on_gpu

#: The paper's LDB settings (section 4.3.3), the library's defaults: p = 0.3, a DROP epoch every second epoch, LR and
#: batch x2, the first four layers and the last one always trained.
PAPER_LDB: dict[str, Any] = {
    f.name: f.default for f in fields(Settings) if f.name in ("drop_rate", "every", "lr_scale", "batch_scale", "keep_first",
    "keep_last", "resample", "granularity", "batch_scaling")
}  # fmt: skip

#: The public attributes of a :class:`~lightning_ldb.LayerDropBackCallback` that the variants take over: its settings.
LDB_ATTRIBUTES = tuple(f.name for f in fields(Settings) if f.name != "seed")

#: Variant -> what it changes in the LDB arguments (``None``: no callback), and what it measures.
VARIANTS: dict[str, tuple[Optional[dict[str, Any]], str]] = {
    "baseline": (None, "plain Lightning"),
    "ldb": ({}, "LDB with the config's settings (else the paper's)"),
    "batch-only": ({"drop_rate": 0.0}, "the same LR and batch scaling on the same DROP epochs, nothing dropped"),
    "drop-only": ({"batch_scale": 1}, "layers dropped and LR scaled, batch unchanged"),
    "ldb-block": ({"backward": "block"}, "LDB with block-mode backward (models with residual branches)"),
    "ldb-accumulate": (
        {"batch_scaling": "accumulate"},
        "LDB with the DROP batch taken as gradient accumulation (a full epoch's memory, no mixin needed)",
    ),
    "stochastic-depth": (None, "Stochastic Depth on torchvision ResNet blocks (the paper's Table 5 peer), no LDB"),
    "freezing": (None, "progressive layer freezing (Composer's LayerFreezing schedule), no LDB"),
}

#: What runs unless ``variants`` says otherwise (``ldb-block`` only where block mode finds residual branches).
DEFAULT_VARIANTS = ("baseline", "ldb", "batch-only", "ldb-block")

#: Trainer arguments the benchmark sets itself (the rest, accelerator/devices/precision/strategy included, are kept).
_BENCH_TRAINER = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "val_check_interval": 1.0,  # validation once, at each epoch's end, so every epoch has its metrics
    "check_val_every_n_epoch": 1,
    "min_epochs": None,
    "max_steps": -1,
    "min_steps": None,
    "max_time": None,
    "fast_dev_run": False,
}


@dataclass
class BenchOptions:
    """One invocation's settings, resolved."""

    name: str = "model"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    epochs: int = 4
    repeats: int = 3
    skip_epochs: int = 1
    seed: int = 0
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    ldb: dict[str, Any] = field(default_factory=lambda: dict(PAPER_LDB))
    sd_rate: float = 0.5
    freeze_start: float = 0.5
    freeze_level: float = 1.0

    def callback_args(self, variant: str) -> Optional[dict[str, Any]]:
        """The LDB callback's arguments in ``variant`` (``None``: no LDB callback)."""
        change = VARIANTS[variant][0]
        return None if change is None else {**self.ldb, **change, "seed": self.seed}


def ldb_settings(callbacks: Any) -> Optional[dict[str, Any]]:
    """The settings of the first :class:`~lightning_ldb.LayerDropBackCallback` in ``callbacks`` (its public attributes).

    Returns ``None`` when there is none.
    """
    if callbacks is None:
        return None
    for callback in callbacks if isinstance(callbacks, Sequence) else [callbacks]:
        if isinstance(callback, LayerDropBackCallback):
            return {key: getattr(callback, key) for key in LDB_ATTRIBUTES}
    return None


def train_source(setup: Setup) -> Any:
    """What serves the training batches: the DataModule, else the LightningModule."""
    return setup.datamodule if setup.datamodule is not None else setup.model


def has_mixin(setup: Setup) -> bool:
    """Whether the training data source can serve the DROP batch (uses :class:`~lightning_ldb.LDBDataModuleMixin`)."""
    return isinstance(train_source(setup), LDBDataModuleMixin)


def mixin_note(setup: Setup) -> str:
    """The one line said when the data source cannot serve the DROP batch."""
    source = train_source(setup)
    return (
        f"{type(source).__name__} does not use lightning_ldb.LDBDataModuleMixin, so DROP epochs run at the base"
        " batch (batch_scale=1); add the mixin to its bases to measure LDB's batch schedule."
    )


def applicable_variants(setup: Setup, ldb: Mapping[str, Any]) -> dict[str, Optional[str]]:
    """Each variant's reason not to apply to ``setup`` (``None``: it applies)."""
    found = residual_branches(setup.model, ldb.get("branches"))
    name = type(setup.model).__name__
    return {
        **{variant: None for variant in VARIANTS},
        "ldb-block": None if found else f"block mode finds no residual branch in {name}",
        "stochastic-depth": None if identity_blocks(setup.model) else f"{name} has no torchvision ResNet block",
    }


def resolve_variants(
    requested: Optional[Sequence[str]], setup: Setup, ldb: Mapping[str, Any]
) -> tuple[tuple[str, ...], list[str]]:
    """The variants to run and the notes on those left out.

    ``requested=None`` runs :data:`DEFAULT_VARIANTS` that apply; a requested variant that does not apply raises.

    Raises:
        ValueError: If a requested name is unknown, repeated, or does not apply to the model.
    """
    reasons = applicable_variants(setup, ldb)
    if requested is None:
        chosen = tuple(v for v in DEFAULT_VARIANTS if reasons[v] is None)
        notes = [f"{v} left out: {reasons[v]}." for v in DEFAULT_VARIANTS if reasons[v] is not None]
        return chosen, notes
    chosen = variant_names(requested)
    for variant in chosen:
        if reasons[variant] is not None:
            raise ValueError(f"`variants`: {variant} does not apply: {reasons[variant]}. Leave it out of `variants`.")
    return chosen, []


def variant_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` checked against :data:`VARIANTS`.

    Raises:
        ValueError: If a name is unknown or repeated, or there is none.
    """
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"`variants`: expected distinct names among {', '.join(VARIANTS)}, got {','.join(names)!r}.")
    return tuple(names)


# ---------------------------------------------------------------------------------------------- the clock
def _sync(module: LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def is_validation_metric(name: str) -> bool:
    """Whether a logged metric's name marks it as a validation metric (``val_acc``, ``val/loss``, ``valid_f1``)."""
    lowered = name.lower()
    return lowered.startswith("val") or "/val" in lowered


def loader_workers(loaders: Any) -> int:
    """The most worker processes of any data loader in ``loaders`` (a loader, or a list or dict of them)."""
    if isinstance(loaders, Mapping):
        return max((loader_workers(v) for v in loaders.values()), default=0)
    if isinstance(loaders, (list, tuple)):
        return max((loader_workers(v) for v in loaders), default=0)
    workers = getattr(loaders, "num_workers", 0)
    return workers if isinstance(workers, int) else 0


class EpochClock(Callback):
    """The benchmark's clocks: wall and CPU seconds, steps, batch size, mode and validation metrics of each epoch.

    ``seconds`` is wall-clock time (``time.perf_counter``), ``cpu_seconds`` this process's CPU time
    (``time.process_time``: all its threads, no other process, data-loader workers included); each epoch
    also records torch's thread count, the train loader's worker processes and the device type. The clocks
    stop at the end of the epoch's last training batch, before validation, and wait for queued
    CUDA work at both ends, so asynchronous kernels are billed to the epoch that launched them. At the start
    of every training epoch it re-seeds the global RNGs from ``(seed, epoch)``, before the train loader is
    iterated: every variant shuffles and draws alike in every epoch, whatever the variants before it did.

    Args:
        seed: The benchmark's seed.
        log: Receives one line per epoch.
    """

    def __init__(self, seed: int, log: Callable[[str], None] = print) -> None:
        self.seed = seed
        self.epochs: list[dict[str, Any]] = []
        self._log = log
        self._start = 0.0
        self._cpu_start = 0.0
        self._first_step = 0
        self._batch_size = 0
        self._logged: Optional[int] = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch_seed = derived_seed(self.seed, 5, trainer.current_epoch) % 2**32
        torch.manual_seed(epoch_seed)
        random.seed(epoch_seed)
        try:
            import numpy

            numpy.random.seed(epoch_seed)
        except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
            pass
        _sync(pl_module)
        # Optimizer steps, not batches: with batch_scaling="accumulate" a DROP epoch steps once per several batches.
        self._first_step, self._batch_size = trainer.global_step, 0
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_size = max(self._batch_size, batch_length(batch) or 0)
        if batch_idx + 1 >= trainer.num_training_batches:
            _sync(pl_module)
            seconds, cpu_seconds = time.perf_counter() - self._start, time.process_time() - self._cpu_start
            ldb = next((cb for cb in trainer.callbacks if isinstance(cb, LayerDropBackCallback)), None)
            self.epochs.append(
                {
                    "epoch": trainer.current_epoch,
                    "mode": ldb.mode if ldb is not None else "full",
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "steps": trainer.global_step - self._first_step,
                    "batch_size": self._batch_size,
                    "threads": torch.get_num_threads(),
                    "loader_workers": loader_workers(trainer.train_dataloader),
                    "device": pl_module.device.type,
                }
            )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.epochs:
            return
        record = self.epochs[-1]
        for name, value in trainer.callback_metrics.items():
            if is_validation_metric(name) and isinstance(value, torch.Tensor) and value.numel() == 1:
                record[name] = float(value)
        self._log_epoch(record)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.epochs and self._logged != self.epochs[-1]["epoch"]:
            self._log_epoch(self.epochs[-1])  # no validation ran this epoch

    def _log_epoch(self, record: dict[str, Any]) -> None:
        self._logged = record["epoch"]
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if is_validation_metric(k))
        self._log(
            f"    epoch {record['epoch']} ({record['mode']}): {record['seconds']:.2f} s"
            f" ({record['cpu_seconds']:.2f} s CPU),"
            f" {record['steps']} steps of"
            f" {record['batch_size']}" + (f", {metrics}" if metrics else "")
        )


# ---------------------------------------------------------------------------------------------- the runs
def bench_trainer_kwargs(user: Mapping[str, Any], options: BenchOptions, callbacks: list[Callback]) -> dict[str, Any]:
    """The ``Trainer`` arguments of one run: the user's, with the benchmark's epochs, limits and no disk output."""
    kwargs = {key: value for key, value in user.items() if key != "callbacks"}
    kwargs.update(_BENCH_TRAINER, max_epochs=options.epochs, callbacks=callbacks)
    if options.limit_train_batches is not None:
        kwargs["limit_train_batches"] = options.limit_train_batches
    if options.limit_val_batches is not None:
        kwargs["limit_val_batches"] = options.limit_val_batches
    return kwargs


def run_variant(
    build: Callable[[], Setup], options: BenchOptions, variant: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train ``variant`` once on a freshly built setup; return its record (every epoch's figures).

    Raises:
        ValueError: If ``variant`` is unknown.
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {list(VARIANTS)}, got {variant!r}.")
    setup = build()
    clock = EpochClock(options.seed, log)
    kept, _ = kept_callbacks(setup.trainer_kwargs.get("callbacks"))
    # The clock goes first, so it also times the work LDB does at epoch start.
    callbacks: list[Callback] = [clock, *kept]
    ldb_args = options.callback_args(variant)
    if ldb_args is not None:
        if not has_mixin(setup) and ldb_args["batch_scaling"] == "loader":
            ldb_args["batch_scale"] = 1
        callbacks.append(LayerDropBackCallback(**ldb_args))
    if variant == "stochastic-depth":
        add_stochastic_depth(setup.model, options.sd_rate, options.seed)
    if variant == "freezing":
        callbacks.append(ProgressiveFreezing(options.freeze_start, options.freeze_level))
    trainer = Trainer(**bench_trainer_kwargs(setup.trainer_kwargs, options, callbacks))
    trainer.fit(setup.model, datamodule=setup.datamodule)
    world_size = trainer.world_size
    del trainer, setup
    gc.collect()
    if not clock.epochs:  # the fit ran, but its epochs were timed elsewhere
        raise RuntimeError(
            f"The {variant!r} run trained in worker processes (a spawn or fork strategy such as ddp_spawn), so its"
            " epoch times never came back to this process. Benchmark with strategy='ddp': every rank then runs the"
            " benchmark in step."
        )
    return {"variant": variant, "epochs": clock.epochs, "world_size": world_size}


def run_benchmark(
    build: Callable[[], Setup],
    options: BenchOptions,
    log: Callable[[str], None] = print,
    notes: Sequence[str] = (),
    about: Optional[Mapping[str, Any]] = None,
    profile: Union[bool, Mapping[str, Any]] = True,
    profile_steps: int = 10,
) -> dict[str, Any]:
    """Every repetition of every variant; the result is the JSON the report and plots are drawn from.

    Args:
        build: Returns a fresh :class:`Setup`, seeded alike every time.
        options: The variants, epochs, repetitions and settings.
        log: Receives the progress lines.
        notes: Lines the report repeats (e.g. the mixin note).
        about: What was trained (class names), recorded under ``"config"``.
        profile: The ceiling the verdicts are bounded by: ``True`` measures it first
            (:func:`~lightning_ldb.bench.profile.profile`, ``profile_steps`` steps), a mapping is a profile
            already measured (``profile.json``), ``False`` runs without a bound.
        profile_steps: Timed steps per batch size of that profile.
    """
    runs = []
    notes = list(notes)
    total = options.repeats * len(options.variants)
    threads = torch.get_num_threads()  # held for every run: the CPU clock counts every thread's time
    # An unrecorded warm-up (a few steps of the first variant): the first recorded run would otherwise also pay
    # for first-use costs (allocator, kernels, caches).
    log(f"[warm-up] {options.name}: {options.variants[0]}, a few steps, not recorded")
    warm = dataclasses.replace(options, epochs=1, limit_train_batches=3, limit_val_batches=1)
    run_variant(build, warm, options.variants[0], log=_silent)
    measured = measure_profile(build, options, profile, profile_steps, log, notes)
    for repeat in range(options.repeats):
        turn = repeat % len(options.variants)
        ordered = (*options.variants[turn:], *options.variants[:turn])  # each variant in each place in turn
        for variant in ordered:
            log(f"[{len(runs) + 1}/{total}] {options.name}: {variant} (repetition {repeat + 1}/{options.repeats})")
            torch.set_num_threads(threads)
            load = _load_average()
            runs.append({**run_variant(build, options, variant, log), "repeat": repeat, "load_average_1min": load})
    config = {**asdict(options), **(about or {})}
    config["ldb"] = {key: _jsonable(value) for key, value in config["ldb"].items()}
    clock, reason = choose_clock(runs)
    used = sorted({e["threads"] for run in runs for e in run["epochs"]})
    if len(used) > 1:
        notes.append(f"torch's thread count changed between runs ({', '.join(map(str, used))}): the CPU times of runs"
                     " with more threads count every thread's time.")  # fmt: skip
    result = {
        "schema": "ldb-bench/4",
        "config": config,
        "environment": environment(run_on_gpu(about or {})),
        "clock": {
            "verdict": clock,
            "reason": reason,
            "threads": used[0] if len(used) == 1 else used,
            "loader_workers": max(e["loader_workers"] for run in runs for e in run["epochs"]),
        },
        "load_averages": [run["load_average_1min"] for run in runs if run["load_average_1min"] is not None],
        "notes": notes,
        "profile": measured,
        "runs": runs,
    }
    result["verdicts"] = report.verdicts(result)
    return result


def measure_profile(
    build: Callable[[], Setup],
    options: BenchOptions,
    profile: Union[bool, Mapping[str, Any]],
    steps: int,
    log: Callable[[str], None],
    notes: list[str],
) -> Optional[dict[str, Any]]:
    """The profile that bounds the verdicts: ``profile`` itself if it is one, else measured (``True``), else ``None``.

    A profile that cannot be measured (no candidate layer, a loader without tensors) leaves the verdicts
    unbounded, and a note says why.
    """
    if isinstance(profile, Mapping):
        return dict(profile)
    if not profile or not any(v in report.BOUNDED for v in options.variants):
        return None

    log(f"[profile] {options.name}: a few steps, the ceiling the verdicts are bounded by")
    try:
        return profiling.profile(build, options, steps=steps)
    except (ValueError, RuntimeError) as error:
        notes.append(f"No plausibility bound: the profile could not be measured ({error}).")
        return None


def choose_clock(runs: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The clock the verdicts use, ``"cpu"`` or ``"wall"``, and why, from the runs' epoch records."""
    epochs = [e for run in runs for e in run["epochs"]]
    workers = max((e.get("loader_workers", 0) for e in epochs), default=0)
    if any(e.get("device") == "cuda" for e in epochs):
        return "wall", ("CUDA-synchronised wall-clock time (on a GPU the work is the device's, not this process's CPU"
                        " time)")  # fmt: skip
    if max((run.get("world_size", 1) for run in runs), default=1) > 1:
        return "wall", "rank 0's wall-clock time (its CPU time leaves out the waits for the other ranks)"
    if workers:
        return "wall", (f"wall-clock time (the train loader's {workers} worker processes load the data, and their CPU"
                        " time is not this process's; other processes on a shared CPU stretch this clock)")  # fmt: skip
    return "cpu", "this process's CPU time"


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _silent(line: str) -> None:  # a module-level function: a spawned worker can unpickle it
    pass


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return getattr(value, "__qualname__", repr(value))


# ---------------------------------------------------------------------------------------------- Python entry point
def check_strategy(strategy: Any) -> None:
    """Refuse a strategy that trains in multiprocessing workers (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``).

    The benchmark times each run in this process; such workers keep their epoch times. ``strategy`` is a registered
    name, a parsed ``class_path``/``init_args`` config, or anything else (not checked here: a strategy object is
    caught after the warm-up run, see :func:`run_variant`).

    Raises:
        ValueError: Naming the strategy and ``strategy="ddp"``, under which every rank runs the benchmark in step.
    """
    if isinstance(strategy, str):
        known = strategy in StrategyRegistry
        method = StrategyRegistry[strategy]["init_params"].get("start_method") if known else None
        name = repr(strategy)
    else:
        init_args = getattr(strategy, "init_args", None)
        method = init_args.get("start_method") if hasattr(init_args, "get") else None
        name = str(getattr(strategy, "class_path", type(strategy).__name__))
    if method in ("spawn", "fork", "forkserver"):
        raise ValueError(
            f"`strategy`: {name} trains in worker processes started by {method!r}, whose epoch times never reach the"
            " benchmark. Use strategy='ddp' (--trainer.strategy=ddp): every rank then runs the benchmark in step, and"
            " rank 0 reports."
        )


def prepare(
    build: Callable[[], Setup],
    options: BenchOptions,
    requested: Optional[Sequence[str]],
    ldb_overrides: Optional[Mapping[str, Any]] = None,
) -> tuple[BenchOptions, list[str]]:
    """Complete ``options`` from a first built setup: LDB settings, variants, checks; return them with the notes.

    LDB settings: the paper's, then the config's ``LayerDropBackCallback`` (if any), then ``ldb_overrides``.

    Raises:
        ValueError: On settings LDB rejects, a variant that does not apply, or no DROP epoch within ``epochs``.
    """
    setup = build()
    check_strategy(setup.trainer_kwargs.get("strategy"))
    if options.name == BenchOptions.name:
        options.name = type(setup.model).__name__
    ldb = {**PAPER_LDB, **(ldb_settings(setup.trainer_kwargs.get("callbacks")) or {}), **(ldb_overrides or {})}
    variants, notes = resolve_variants(requested, setup, ldb)
    options.ldb, options.variants = ldb, variants
    loader_scaled = [options.callback_args(v) for v in variants]
    if not has_mixin(setup) and any(args and args["batch_scaling"] == "loader" for args in loader_scaled):
        notes.insert(0, mixin_note(setup))
    _, left_out = kept_callbacks(setup.trainer_kwargs.get("callbacks"))
    left_out = [name for name in left_out if name != LayerDropBackCallback.__name__]  # each variant brings its own
    if left_out:
        notes.append(f"Callbacks left out of the benchmark runs: {', '.join(left_out)} (nothing is written to disk,"
                     " the benchmark prints its own lines).")  # fmt: skip
    if options.epochs < 1:
        raise ValueError(f"`epochs` must be >= 1, got {options.epochs!r}.")
    if not 0 <= options.skip_epochs < options.epochs:
        raise ValueError(f"`skip_epochs` must be in [0, epochs={options.epochs}), got {options.skip_epochs!r}.")
    if any(options.callback_args(v) for v in variants) and ldb["every"] >= options.epochs:
        raise ValueError(
            f"`epochs`: {options.epochs} epochs hold no DROP epoch with every={ldb['every']}; raise `epochs` above"
            f" {ldb['every']}."
        )
    for variant in variants:
        args = options.callback_args(variant)
        if args is not None:
            try:
                LayerDropBackCallback(**args)
            except (TypeError, ValueError) as error:
                raise ValueError(f"LDB settings of variant {variant}: {error}") from error
    del setup
    return options, notes


def compare(
    model_factory: Callable[[], LightningModule],
    data_factory: Optional[Callable[[], Optional[LightningDataModule]]] = None,
    trainer_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    variants: Optional[Sequence[str]] = None,
    epochs: int = 4,
    repeats: int = 3,
    seed: int = 0,
    ldb: Optional[Mapping[str, Any]] = None,
    limit_train_batches: Optional[float] = None,
    limit_val_batches: Optional[float] = None,
    skip_epochs: int = 1,
    log: Callable[[str], None] = print,
    profile: Union[bool, Mapping[str, Any]] = True,
) -> dict[str, Any]:
    """Run LDB's variants side by side on your own model and data, without a config file.

    Every run calls ``seed_everything(seed)``, then ``model_factory()`` and ``data_factory()``: give
    factories that build afresh, so every variant starts from identical weights.

    Args:
        model_factory: Builds the LightningModule.
        data_factory: Builds the DataModule; ``None`` if the module has its own loaders.
        trainer_kwargs: ``Trainer`` arguments (accelerator, devices, precision, strategy, callbacks...); a
            ``LayerDropBackCallback`` among the callbacks gives the LDB settings. Logging, checkpointing and
            the epoch count are the benchmark's.
        variants: Names from :data:`VARIANTS`; ``None``: :data:`DEFAULT_VARIANTS` that apply.
        epochs: Training epochs per run.
        repeats: Repetitions, the run order rotated each time; each run is compared with the baseline of its own.
        seed: Seed of weights, data order and draws.
        ldb: LDB settings overriding the callback's (or the paper's).
        limit_train_batches: ``Trainer(limit_train_batches=...)`` for every run.
        limit_val_batches: ``Trainer(limit_val_batches=...)`` for every run.
        skip_epochs: Warm-up epochs left out of the DROP / full epoch ratio.
        log: Receives the progress lines.
        profile: ``True``: measure the profile first, its floor bounding the verdicts; a ``profile.json``'s dict
            to use instead; ``False``: no bound.

    Returns:
        The result dict (``"schema": "ldb-bench/4"``, with ``"verdicts"``) that
        :func:`~lightning_ldb.bench.report.render_markdown`
        and :func:`~lightning_ldb.bench.report.plot` take.

    Raises:
        ValueError: On a bad setting (see :func:`prepare`).

    Example::

        result = lightning_ldb.bench.compare(MyModel, MyDataModule, {"accelerator": "gpu"}, epochs=6)
        print(lightning_ldb.bench.report.render_markdown(result))
    """
    user_kwargs = dict(trainer_kwargs or {})

    def build() -> Setup:
        seed_everything(seed, verbose=False)
        model = model_factory()
        datamodule = data_factory() if data_factory is not None else None
        return Setup(model, datamodule, user_kwargs)

    options = BenchOptions(
        epochs=epochs,
        repeats=repeats,
        seed=seed,
        limit_train_batches=limit_train_batches,
        limit_val_batches=limit_val_batches,
        skip_epochs=skip_epochs,
    )
    options, notes = prepare(build, options, variants, ldb)
    for note in notes:
        log(f"Note: {note}")
    about = {"model_class": options.name, "accelerator": str(user_kwargs.get("accelerator", "auto"))}
    return run_benchmark(build, options, log, notes, about, profile=profile)
