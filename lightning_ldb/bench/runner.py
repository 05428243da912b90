"""The paired runs: a baseline and LDB (and the variants of a sweep), same model, data, seed and hyperparameters.

Every run of one invocation builds its model after ``seed_everything(seed)`` (identical initial
weights), trains on :class:`~lightning_ldb.bench.data.SyntheticImageDataModule` (identical batches in
an identical order) with :class:`~lightning_ldb.examples.ImageClassifier` (identical optimizer and
cosine schedule), and is timed by the same :class:`~lightning_ldb.examples.EpochSummary` callback,
which uses the timer behind LDB's ``ldb/epoch_time`` (validation excluded, CUDA synchronised). The
only difference between a baseline and an LDB run is the :class:`~lightning_ldb.LayerDropBackCallback`
and the batch and learning-rate scaling it brings.

Repetitions alternate the order of the runs (``A B``, then ``B A``), so that slow drift of the
machine's speed favours neither side.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from lightning_ldb.timing import EpochTimer
from lightning_ldb.bench import report
from lightning_ldb.bench.data import SyntheticImageDataModule
from lightning_ldb.bench.flops import ldb_step_flops
from lightning_ldb.callback import LayerDropBackCallback
from lightning_ldb.examples import EpochSummary, ImageClassifier
from lightning_ldb.schedule import DROP, FULL, epoch_mode

#: The paper's LDB settings (section 4.3.3): p = 0.3, a DROP epoch every second epoch, LR and batch x2,
#: the first four layers and the last one always trained.
PAPER_LDB = {
    "drop_rate": 0.3,
    "every": 2,
    "lr_scale": 2.0,
    "batch_scale": 2,
    "keep_first": 4,
    "keep_last": 1,
    "resample": "epoch",
    "granularity": "module",
}

#: The LDB arguments a sweep may vary, with their type.
SWEEPABLE = {"drop_rate": float, "every": int, "lr_scale": float, "batch_scale": int}


@dataclass
class BenchConfig:
    """What to benchmark. The defaults are the issue's measurement: ResNet-18 on CIFAR-shaped data."""

    model: str = "resnet18"
    epochs: int = 5
    train_samples: int = 1024
    val_samples: int = 256
    batch_size: int = 64
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    signal: float = 0.5
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    ldb: dict[str, Any] = field(default_factory=lambda: dict(PAPER_LDB))
    #: Which runs make up one repetition: ``baseline``, ``ldb``, ``callback-only``.
    variants: tuple[str, ...] = (report.BASELINE, report.LDB)
    repeats: int = 1
    #: Warm-up epochs left out of the per-mode epoch statistics.
    skip_epochs: int = 1
    accelerator: str = "auto"
    #: ``torch.set_num_threads`` for the whole benchmark (``None``: torch's default, one per core).
    threads: Optional[int] = None
    progress_bar: bool = True
    time_hooks: bool = True
    count_flops: bool = True
    #: ``(key, values)``: one LDB run per value of ``ldb[key]`` against one baseline, instead of ``variants``.
    sweep: Optional[tuple[str, tuple[Any, ...]]] = None
    #: A free-text line printed under the setup (e.g. "shared machine, other jobs running").
    note: str = ""


@dataclass(frozen=True)
class Variant:
    """One kind of run: a name and the LDB callback's arguments (``None``: plain Lightning)."""

    name: str
    ldb: Optional[dict[str, Any]]


def plan_variants(config: BenchConfig) -> list[Variant]:
    """The runs of one repetition, in the order of its first repetition.

    ``callback-only`` installs the callback with ``every=epochs``, so that no DROP epoch falls in the
    run: every epoch is full, and any difference from the baseline is the callback's overhead.

    Raises:
        ValueError: If a variant or a sweep key is unknown.
    """
    if config.sweep is not None:
        key, values = config.sweep
        if key not in SWEEPABLE:
            raise ValueError(f"Cannot sweep {key!r}: choose one of {sorted(SWEEPABLE)}.")
        return [Variant(report.BASELINE, None)] + [
            Variant(sweep_variant_name(key, v), {**config.ldb, key: v}) for v in values
        ]
    known = {
        report.BASELINE: None,
        report.LDB: dict(config.ldb),
        report.CALLBACK_ONLY: {**config.ldb, "every": max(config.epochs, 1)},
    }
    unknown = [v for v in config.variants if v not in known]
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}: choose from {sorted(known)}.")
    return [Variant(name, known[name]) for name in config.variants]


def sweep_variant_name(key: str, value: Any) -> str:
    """``"ldb drop_rate=0.3"``: the name of a sweep's run."""
    return f"ldb {key}={value}"


# ---------------------------------------------------------------------------------------------- callbacks
class EpochRecorder(EpochSummary):
    """:class:`~lightning_ldb.examples.EpochSummary` without its end-of-fit printout: the benchmark reports."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass


class CpuEpochClock(Callback):
    """Process CPU seconds of each training epoch, over the span :class:`EpochRecorder` times (validation excluded).

    Other jobs on a shared machine stretch wall-clock time far more than the CPU time a computation
    needs, so this is the steadier measure where the two disagree. It misses a GPU's work.
    """

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._timer = EpochTimer(clock=time.process_time)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer.start(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last = batch_idx + 1 >= trainer.num_training_batches
        self._timer.lap(pl_module, last=last)
        if last:
            self.seconds[trainer.current_epoch] = self._timer.elapsed

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer.pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer.resume()


class HookTimer:
    """Times every hook of a :class:`~lightning_ldb.LayerDropBackCallback` during a real run.

    The callback's overridden Lightning hooks, and the optimizer step pre/post hooks through which it
    scales the learning rate, are wrapped in place (instance attributes shadow the methods; Lightning
    and ``register_step_pre_hook`` look them up when they call them), so the time measured is exactly
    the callback's own work, freezing and drawing included. Wrap before ``fit``.
    """

    #: Lightning hooks worth timing; only those the callback overrides are wrapped.
    LIGHTNING_HOOKS = (
        "setup",
        "on_fit_start",
        "on_train_start",
        "on_train_epoch_start",
        "on_train_batch_start",
        "on_train_batch_end",
        "on_validation_start",
        "on_validation_end",
        "on_train_epoch_end",
        "on_fit_end",
    )
    #: The callback's learning-rate scaler and its methods registered as optimizer step hooks.
    OPTIMIZER_HOOKS = ("_pre_step", "_post_step")

    def __init__(self, callback: LayerDropBackCallback) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        for name in self.LIGHTNING_HOOKS:
            if getattr(type(callback), name, None) is not getattr(Callback, name, None):
                setattr(callback, name, self._timed(name, getattr(callback, name)))
        scaler = getattr(callback, "_lr", None)
        for name in self.OPTIMIZER_HOOKS:
            if scaler is not None and hasattr(scaler, name):
                setattr(
                    scaler,
                    name,
                    self._timed(f"optimizer.step {name.strip('_').replace('_', '-')} hook", getattr(scaler, name)),
                )

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        self.seconds[name], self.calls[name] = 0.0, 0
        clock = time.perf_counter

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += clock() - start
                self.calls[name] += 1

        return timed


# ---------------------------------------------------------------------------------------------- runs
def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting puts the runs on a CUDA GPU here."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def make_datamodule(config: BenchConfig) -> SyntheticImageDataModule:
    return SyntheticImageDataModule(
        train_samples=config.train_samples,
        val_samples=config.val_samples,
        batch_size=config.batch_size,
        num_classes=config.num_classes,
        channels=config.channels,
        image_size=config.image_size,
        signal=config.signal,
        seed=config.seed,
    )


def make_module(config: BenchConfig) -> ImageClassifier:
    """The LightningModule of every run, built after ``seed_everything`` so all runs start from the same weights."""
    seed_everything(config.seed, verbose=False)
    return ImageClassifier(
        model=config.model,
        num_classes=config.num_classes,
        in_channels=config.channels,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )


def classification_loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The training loss of :class:`~lightning_ldb.examples.ImageClassifier`, without its logging."""
    images, labels = batch
    return torch.nn.functional.cross_entropy(module(images), labels)


def run_variant(config: BenchConfig, variant: Variant, group: str, order: int = 0) -> report.RunResult:
    """Train one run of ``variant`` and return its per-epoch record.

    Args:
        config: The benchmark's settings.
        variant: The run to make.
        group: The repetition it belongs to (runs are only compared within a group).
        order: Its position within the group.
    """
    datamodule = make_datamodule(config)
    module = make_module(config)
    recorder = EpochRecorder()
    cpu_clock = CpuEpochClock()
    # The clocks go first: they then also time the work LDB does at epoch start.
    callbacks: list[Callback] = [recorder, cpu_clock]
    hooks: Optional[HookTimer] = None
    if variant.ldb is not None:
        ldb = LayerDropBackCallback(seed=config.seed, **variant.ldb)
        hooks = HookTimer(ldb) if config.time_hooks else None
        callbacks.append(ldb)
    trainer = Trainer(
        accelerator=config.accelerator,
        devices=1,
        max_epochs=config.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress_bar,
        num_sanity_val_steps=0,
        # LDB's batch scaling needs the train loader rebuilt every epoch; the baseline does the same work.
        reload_dataloaders_every_n_epochs=1,
    )
    load_before = _loadavg()
    trainer.fit(module, datamodule=datamodule)
    load_after = _loadavg()
    epochs = [
        report.EpochResult(
            epoch=r.epoch,
            mode=DROP if r.mode.lower() == DROP else FULL,
            seconds=r.seconds,
            samples=min(r.steps * r.batch_size, config.train_samples) if r.batch_size else config.train_samples,
            optimizer_steps=r.steps,
            batch_size=r.batch_size,
            val_acc=r.monitored,
            cpu_seconds=cpu_clock.seconds.get(r.epoch),
        )
        for r in recorder.records
    ]
    result = report.RunResult(
        variant=variant.name,
        group=group,
        epochs=epochs,
        ldb=variant.ldb,
        hook_seconds=dict(hooks.seconds) if hooks else None,
        hook_calls=dict(hooks.calls) if hooks else None,
        order=order,
        load_before=load_before,
        load_after=load_after,
    )
    del trainer, module, datamodule
    gc.collect()
    return result


def count_flops(config: BenchConfig, variants: Sequence[Variant]) -> dict[str, Any]:
    """FLOPs of a full and a DROP step for every LDB variant, with the report's accounting added."""
    datamodule = make_datamodule(config)
    module = make_module(config)
    counted: dict[str, Any] = {}
    for variant in variants:
        if variant.ldb is None:
            continue
        callback = LayerDropBackCallback(seed=config.seed, **variant.ldb)
        flops = ldb_step_flops(
            module,
            classification_loss,
            datamodule.example_batch,
            callback,
            config.seed,
            config.batch_size,
            config.epochs,
            config.train_samples,
        ).to_dict()
        if flops["drop_step"] is not None:
            flops.update(
                report.flop_accounting(flops["full_step"], flops["full_batch"], flops["drop_step"], flops["drop_batch"])
            )
            modes = [epoch_mode(e, callback.every) for e in range(config.epochs)]
            flops["predicted_speedup"] = report.flop_predicted_speedup(modes, flops["per_sample_ratio"])
        counted[variant.name] = flops
    return counted


def environment(config: BenchConfig) -> dict[str, Any]:
    """The machine and the versions the benchmark ran on."""
    import lightning

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    cuda = uses_cuda(config.accelerator)
    return {
        "device": f"CUDA {torch.cuda.get_device_name(0)}" if cuda else "CPU",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "note": config.note,
    }


def config_to_dict(config: BenchConfig) -> dict[str, Any]:
    data = asdict(config)
    data["variants"] = list(config.variants)
    if config.sweep is not None:
        data["sweep"] = {"key": config.sweep[0], "values": list(config.sweep[1])}
    return data


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every repetition of every variant and return the report (the dict written as JSON).

    Args:
        config: What to run.
        log: Receives one line before each run.

    Raises:
        ValueError: If a variant or sweep key is unknown, or ``repeats`` is below 1.
    """
    if config.repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {config.repeats!r}.")
    variants = plan_variants(config)
    with torch_threads(config.threads):
        flops = count_flops(config, variants) if config.count_flops else {}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        runs = []
        total = config.repeats * len(variants)
        for repeat in range(config.repeats):
            ordered = variants if repeat % 2 == 0 else variants[::-1]
            for position, variant in enumerate(ordered):
                log(f"[{len(runs) + 1}/{total}] {variant.name} (repetition {repeat + 1}/{config.repeats})")
                runs.append(run_variant(config, variant, f"{stamp}-r{repeat}", position))
        env = environment(config)
    return build_report(config_to_dict(config), env, runs, flops, variants_of_sweep(config, variants))


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run with ``torch.set_num_threads(threads)`` (unchanged if ``None``), and put the old count back."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def variants_of_sweep(config: BenchConfig, variants: Sequence[Variant]) -> Optional[dict[str, Any]]:
    """``{"key": ..., "variants": {variant name: swept value}}`` for a sweep, else ``None``."""
    if config.sweep is None:
        return None
    key = config.sweep[0]
    return {"key": key, "variants": {v.name: v.ldb[key] for v in variants if v.ldb is not None}}


def build_report(
    config: dict[str, Any],
    env: dict[str, Any],
    runs: Sequence[report.RunResult],
    flops: dict[str, Any],
    sweep: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The JSON-ready report of ``runs``: raw records, FLOPs and the computed summary."""
    result = {
        "schema": report.SCHEMA,
        "kind": "sweep" if sweep else "paired",
        "config": config,
        "environment": env,
        "runs": [run.to_dict() for run in runs],
        "flops": flops,
        "summary": report.summarize(runs, config.get("skip_epochs", 1)),
    }
    if sweep:
        result["sweep"] = sweep
    return report.to_jsonable(result)


def merge_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One report from the runs of several invocations of the same benchmark (e.g. runs made in turns).

    Config and environment come from the first report with runs; the runs, FLOP counts and swept
    values of all are pooled (runs keep their groups, so each is still compared only with the baseline
    of its own repetition), and sweeps over one key split across invocations merge into one sweep. A
    profile-only report (``--profile-only``) contributes its step profile.

    Raises:
        ValueError: If no report has runs, a report is not a benchmark report, the reports measured
            different models, data or epochs, or they mix sweeps and paired runs.
    """
    for index, other in enumerate(reports):
        if other.get("schema") != report.SCHEMA:
            raise ValueError(f"Report {index} is not a {report.SCHEMA} report (schema {other.get('schema')!r}).")
    with_runs = [other for other in reports if other.get("kind") != "profile"]
    if not with_runs:
        raise ValueError("Nothing to merge: no report with runs.")
    first = with_runs[0]
    for index, other in enumerate(reports):
        # A profile depends on the model and the batch; runs also on the data and the schedule.
        same = _PROFILE_KEYS if other.get("kind") == "profile" else _RUN_KEYS
        differing = [k for k in same if other["config"].get(k) != first["config"].get(k)]
        if differing:
            raise ValueError(f"Report {index} measured other settings than the first report with runs: {differing}.")
    kinds = {other.get("kind") for other in with_runs}
    if len(kinds) > 1:
        raise ValueError(f"Cannot merge sweep and paired reports together (kinds {sorted(map(str, kinds))}).")
    runs = [report.RunResult.from_dict(r) for other in with_runs for r in other["runs"]]
    sweep = None
    if first.get("sweep"):
        keys = {other["sweep"]["key"] for other in with_runs}
        if len(keys) > 1:
            raise ValueError(f"Cannot merge sweeps over different keys: {sorted(keys)}.")
        sweep = {"key": first["sweep"]["key"], "variants": {}}
        for other in with_runs:
            sweep["variants"].update(other["sweep"]["variants"])
    flops: dict[str, Any] = {}
    for other in with_runs:
        flops.update(other.get("flops") or {})
    merged = build_report(first["config"], first.get("environment", {}), runs, flops, sweep)
    profile = next((other for other in reports if other.get("profile")), None)
    if profile is not None:
        merged["profile"] = profile["profile"]
        merged["profile_environment"] = profile.get("environment", {})
    merged["merged_from"] = [
        {
            "kind": other.get("kind"),
            "date": other.get("environment", {}).get("date"),
            "torch_threads": other.get("environment", {}).get("torch_threads"),
            "runs": len(other.get("runs", [])),
        }
        for other in reports
    ]
    return merged


#: Settings that must agree for runs of several invocations to be pooled, and for a profile to join them.
_RUN_KEYS = (
    "model",
    "epochs",
    "train_samples",
    "val_samples",
    "batch_size",
    "image_size",
    "channels",
    "num_classes",
    "seed",
    "lr",
    "threads",
    "accelerator",
)
_PROFILE_KEYS = (
    "model",
    "batch_size",
    "image_size",
    "channels",
    "num_classes",
    "seed",
    "ldb",
    "threads",
    "accelerator",
)
