"""``ldb-bench --profile``: the ceiling of LDB's saving on the user's model and hardware, before any training.

A few training steps of the user's model (its own ``training_step`` and optimizer, in a Trainer with the
user's accelerator, precision and callbacks), after as many warm-up steps; medians:

- ``full_step``: ``forward_s``, ``backward_s``, ``optimizer_s`` of one full step at the base batch (and the
  same at the DROP batch under ``drop_batch_step``);
- ``drop_step_ceiling``: the fraction of a full step's work (forward and backward FLOPs, counted by
  ``torch.utils.flop_counter.FlopCounterMode``) that a DROP step skips in expectation at ``drop_rate``.
  Weights mode: the candidate layers' weight-gradient FLOPs (backward with every candidate trainable minus
  backward with every candidate frozen) times ``drop_rate``. Block mode: the candidate branches' whole
  backward times ``drop_rate`` (``null`` without residual branches);
- ``per_sample_s``: time per sample of a full training iteration (the step and Lightning's per-step work,
  from one step's start to the next one's) at the base and at the DROP batch size, what the batch schedule
  can buy on this hardware, the two sizes alternating in one fit so that both see the same machine. Data
  loading is left out (the batches are loaded beforehand), so where loading
  dominates a step (tiny models) the real DROP epochs gain more than this says;
- ``peak_memory_bytes``: peak CUDA memory of a step at each batch size (``null`` off a GPU). A DROP batch
  that does not fit is reported here (``"out of memory"``), not found hours into a run;
- ``drop_epoch_ratio_floor``: the two combined, the shortest a DROP epoch can be against a full one:
  ``per_sample(drop) / per_sample(base) * (1 - ceiling)``;
- ``drop_step_measured``: a real full step and DROP step at the base batch, alternating in one fit under the
  library's own draw (weights and, with residual branches, block mode), and their ratio
  (:mod:`~lightning_ldb.bench.drop_step`);
- ``culprits``: when the weights-mode DROP step saves much less than its FLOPs say, the layer kinds whose
  dropping costs time, the ``exclude=`` patterns that keep them out of the draw, and the DROP step with them;
- ``plausibility_floor``: the floor a comparison's plausibility bound uses: per mode the FLOP floor, or
  ``schedule * measured DROP-step ratio`` where that is higher (``source`` says which).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.flop_counter import FlopCounterMode

from lightning_ldb import LayerDropBackCallback
from lightning_ldb.bench import drop_step
from lightning_ldb.bench.setups import Setup, batch_length, environment, kept_callbacks, residual_branches, run_on_gpu
from lightning_ldb.dropping import BranchInputDetacher, ParameterFreezer


class ProfiledOptions(Protocol):
    """What the profile reads of an invocation's settings (:class:`~lightning_ldb.bench.runner.BenchOptions` has it)."""

    name: str
    seed: int
    ldb: dict[str, Any]


class _Batches:
    """A fixed list of batches as a train loader (a plain list would read as several loaders)."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _concat(batches: Sequence[Any]) -> Any:
    """One batch made of ``batches``, concatenated along the first dimension of every tensor."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches)) if first.dim() else first
    if isinstance(first, Mapping):
        return type(first)({key: _concat([b[key] for b in batches]) for key in first})
    if isinstance(first, (list, tuple)):
        parts = [_concat([b[i] for b in batches]) for i in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    return first


def base_batches(setup: Setup, count: int) -> list[Any]:
    """``count`` training batches of the user's train loader at the base batch size (cycled if it is shorter)."""
    source = setup.datamodule if setup.datamodule is not None else setup.model
    if setup.datamodule is not None:
        setup.datamodule.prepare_data()
        setup.datamodule.setup("fit")
    batches: list[Any] = []
    while len(batches) < count:
        before = len(batches)
        for batch in source.train_dataloader():
            if batches and _size(batch) != _size(batches[0]):
                continue  # an epoch's last, partial batch: every timed step is at the base size
            batches.append(batch)
            if len(batches) == count:
                break
        if len(batches) == before:
            raise ValueError(f"{type(source).__name__}.train_dataloader() yielded no batch; --profile needs one.")
    return batches


def _trainer(setup: Setup, callbacks: list[Callback], batches: int, epochs: int = 1) -> Trainer:
    kept, _ = kept_callbacks(setup.trainer_kwargs.get("callbacks"))
    kwargs = {key: setup.trainer_kwargs[key] for key in ("accelerator", "devices", "precision", "strategy")
              if key in setup.trainer_kwargs}  # fmt: skip
    return Trainer(
        **kwargs,
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[*kept, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def drop_candidates(build: Callable[[], Setup], ldb: Mapping[str, Any]) -> dict[str, Any]:
    """What a DROP step may drop, found through the public API only; ONE place, to swap for a newer API.

    Weights mode: the callback's ``candidate_layers`` after a one-step fit (module names, or parameter names
    with ``granularity="parameter"``). Block mode: the engine's branches (:func:`~lightning_ldb.bench.setups.residual_branches`) for the branches'
    members, restricted to the block-mode callback's ``candidate_layers`` (``None`` when there is no branch).

    Returns:
        ``{"weights": [name, ...], "block": [branch entry name, ...] or None}``.
    """
    found: dict[str, Any] = {"weights": [], "block": None}
    for mode in ("weights", "block"):
        setup = build()
        if mode == "block":
            if not residual_branches(setup.model, ldb.get("branches")):
                break
        settings = {**ldb, "backward": mode, "batch_scale": 1, "every": 1}
        if mode == "weights":
            settings["branches"] = None
        callback = LayerDropBackCallback(**settings)
        _trainer(setup, [callback], 1).fit(setup.model, train_dataloaders=_Batches(base_batches(setup, 1)))
        names = list(callback.candidate_layers)
        found[mode] = names
    return found


class _StepTimer(Callback):
    """Size, forward, backward and optimizer seconds of every training step, CUDA-synchronised at each boundary.

    ``starts`` holds each step's start and the last step's end: their differences are whole iterations,
    Lightning's per-step work between steps included.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, float, float]] = []
        self.starts: list[float] = []
        self._marks: list[float] = []
        self._size = 0
        self.last_end = 0.0

    def _mark(self, module: LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self._marks.append(time.perf_counter())

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._marks, self._size = [], _size(batch)
        self._mark(pl_module)
        self.starts.append(self._marks[0])

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._mark(pl_module)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._mark(pl_module)
        if len(self._marks) == 4:
            start, forward, backward, end = self._marks
            self.steps.append((self._size, forward - start, backward - forward, end - backward))
            self.last_end = end


def time_steps(
    build: Callable[[], Setup], batches: Sequence[Any], warmup: int
) -> tuple[dict[int, dict[str, float]], int]:
    """Median forward/backward/optimizer/iteration seconds per batch size over ``batches[warmup:]``, in one fit;
    and the fit's world size (several processes: this rank's steps, communication included).

    Batches of both sizes alternate within the fit, so both see the same machine (a shared CPU's load moves).
    """
    setup = build()
    timer = _StepTimer()
    trainer = _trainer(setup, [timer], len(batches))
    trainer.fit(setup.model, train_dataloaders=_Batches(batches))
    iterations = [b - a for a, b in zip(timer.starts, [*timer.starts[1:], timer.last_end])]
    by_size: dict[int, dict[str, float]] = {}
    for size in dict.fromkeys(step[0] for step in timer.steps):
        timed = [(s, it) for s, it in zip(timer.steps, iterations) if s[0] == size]
        timed = timed[warmup:] or timed
        by_size[size] = {
            name: statistics.median(row[i] for row, _ in timed)
            for i, name in ((1, "forward_s"), (2, "backward_s"), (3, "optimizer_s"))
        }
        by_size[size]["iteration_s"] = statistics.median(it for _, it in timed)
    return by_size, trainer.world_size


def peak_memory(build: Callable[[], Setup], batch: Any) -> Any:
    """Peak CUDA memory (bytes) of two training steps on ``batch``, or ``"out of memory"``."""
    setup = build()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        _trainer(setup, [], 2).fit(setup.model, train_dataloaders=_Batches([batch, batch]))
    except torch.cuda.OutOfMemoryError:
        return "out of memory"
    finally:
        del setup
        torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated()


def _loss(model: LightningModule, batch: Any) -> torch.Tensor:
    out = model.training_step(batch, 0)
    return out["loss"] if isinstance(out, Mapping) else out


def count_flops(
    model: LightningModule,
    batch: Any,
    weights: Sequence[str],
    branches: Optional[Sequence[str]],
    branches_spec: Any = None,
) -> dict[str, Any]:
    """Forward and backward FLOPs of one training step on ``batch``, and what each mode's candidates account for.

    Both savings are differences of whole backward passes, counted by ``FlopCounterMode``: with every
    candidate in play, and with every candidate taken out as a DROP step takes it out. Weights mode: the
    candidate layers frozen (no weight gradient). Block mode: each candidate branch computed on its detached
    input with frozen weights (``backward="block"``'s own mechanism), so the backward never enters it.

    Args:
        model: The LightningModule (its ``training_step`` gives the loss).
        batch: One training batch, on the model's device.
        weights: Names of the weights-mode candidates (modules, or parameters with ``granularity="parameter"``).
        branches: Entry names of the block-mode candidate branches; ``None`` without branches.
        branches_spec: The callback's ``branches`` argument, to find the branches again on ``model``.

    Returns:
        ``forward``, ``backward``: FLOPs of a full step; ``weights_saving`` and ``block_saving``: backward FLOPs
        a DROP step with every candidate dropped skips (``block_saving`` is ``None`` without branches).
    """
    model.train()
    modules, parameters = dict(model.named_modules()), dict(model.named_parameters())

    def backward_flops(frozen: Sequence[torch.nn.Parameter] = (), detached: Sequence[Any] = ()) -> tuple:
        # The library's own mechanisms: the weights frozen as a DROP step freezes them, and (block mode) the
        # branches' entries fed detached inputs, every tensor of them (Hugging Face blocks pass keyword arguments).
        freezer, detacher = ParameterFreezer(), BranchInputDetacher()
        freezer.freeze(frozen)
        detacher.detach(detached)
        try:
            with FlopCounterMode(display=False) as forward:
                loss = _loss(model, batch)
            with FlopCounterMode(display=False) as backward:
                loss.backward()
        finally:
            detacher.restore()
            freezer.restore()
            model.zero_grad(set_to_none=True)
        return float(forward.get_total_flops()), float(backward.get_total_flops())

    forward_flops, full_backward = backward_flops()
    candidate_params = []
    for name in weights:
        if name in modules:
            candidate_params += list(modules[name].parameters(recurse=False))
        elif name in parameters:
            candidate_params.append(parameters[name])
    _, weights_backward = backward_flops([p for p in candidate_params if p.requires_grad])
    block_saving = None
    if branches is not None:
        chosen = [b for b in residual_branches(model, branches_spec) if b.name in set(branches)]
        frozen = [p for b in chosen for p in b.parameters if p.requires_grad]
        _, block_backward = backward_flops(frozen, chosen)
        block_saving = full_backward - block_backward
    return {
        "forward": forward_flops,
        "backward": full_backward,
        "weights_saving": full_backward - weights_backward,
        "block_saving": block_saving,
    }


def _fit_on(build: Callable[[], Setup], batch: Any) -> drop_step.Fit:
    """``fit(callbacks, epochs)``: a fresh setup trained ``epochs`` epochs of one step, ``batch`` every time."""

    def fit(callbacks: list[Callback], epochs: int) -> None:
        setup = build()
        _trainer(setup, callbacks, 1, epochs).fit(setup.model, train_dataloaders=_Batches([batch]))

    return fit


def measure_drop_steps(
    build: Callable[[], Setup],
    batch: Any,
    ldb: Mapping[str, Any],
    candidates: Mapping[str, Any],
    model: LightningModule,
    device_batch: Any,
    ceiling: Mapping[str, float | None],
    steps: int,
    clock: drop_step.Clock,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The real DROP steps (``drop_step_measured``) and, where they save much less than their FLOPs, the culprit
    layer kinds (``culprits``); see :mod:`~lightning_ldb.bench.drop_step`.

    Args:
        build: Returns a fresh setup. ``batch``: the batch every timed step trains on.
        ldb: The callback's settings. ``candidates``: :func:`drop_candidates`'s result.
        model, device_batch: A built model on the profiling device and ``batch`` there, for the kinds' FLOPs.
        ceiling: The FLOP ceilings. ``steps``: timed steps per mode. ``clock``: returns seconds.
    """
    fit = _fit_on(build, batch)
    weights_settings = {**ldb, "backward": "weights", "branches": None}
    measured: dict[str, Any] = {"weights": None, "block": None}
    if candidates["weights"]:
        measured["weights"] = drop_step.time_full_and_drop(fit, weights_settings, steps, clock)
    if candidates["block"]:
        measured["block"] = drop_step.time_full_and_drop(fit, {**ldb, "backward": "block"}, steps, clock)
    culprits: dict[str, Any] = {"analysed": False, "margin": drop_step.CULPRIT_MARGIN, "kinds": {}, "names": [],
                                "exclude": [], "with_exclude": None}  # fmt: skip
    weights = measured["weights"]
    if weights is None or not drop_step.short_of_flops(weights["ratio"], ceiling["weights"] or 0.0):
        return measured, culprits
    culprits["analysed"] = True
    flops = count_flops(model, device_batch, (), None)
    total = flops["forward"] + flops["backward"]
    names = list(candidates["weights"])
    for kind, members in drop_step.layer_kinds(model, names).items():
        share = count_flops(model, device_batch, members, None)["weights_saving"] / total if total else 0.0
        only = {**weights_settings, "drop_rate": drop_step.DROP_ALL, "include": [drop_step.escape(n) for n in members]}
        try:
            timed = drop_step.time_full_and_drop(fit, only, steps, clock)
        except ValueError as error:  # e.g. the kind's only layer is kept by keep_first in the setup's check
            culprits["kinds"][kind] = {"layers": len(members), "flop_share": share, "culprit": False,
                                       "error": str(error)[:200]}  # fmt: skip
            continue
        culprit = drop_step.is_culprit(timed["ratio"], share)
        culprits["kinds"][kind] = {"layers": len(members), "flop_share": share, "ratio": timed["ratio"],
                                   "full_step_s": timed["full_step_s"], "drop_step_s": timed["drop_step_s"],
                                   "culprit": culprit}  # fmt: skip
        if culprit:
            culprits["names"].append(kind)
    if not culprits["names"]:
        return measured, culprits
    kinds = drop_step.layer_kinds(model, names)
    bad = [n for kind in culprits["names"] for n in kinds[kind]]
    culprits["exclude"] = drop_step.exclude_patterns(bad, names)
    kept = [n for n in names if n not in set(bad)]
    if kept:
        fixed = {**weights_settings, "exclude": [*(ldb.get("exclude") or ()), *culprits["exclude"]]}
        timed = drop_step.time_full_and_drop(fit, fixed, steps, clock)
        saving = count_flops(model, device_batch, kept, None)["weights_saving"]
        timed["drop_step_ceiling"] = float(ldb["drop_rate"]) * saving / total if total else None
        culprits["with_exclude"] = timed
    return measured, culprits


def profile(
    build: Callable[[], Setup],
    options: ProfiledOptions,
    steps: int = 5,
    about: Optional[Mapping[str, Any]] = None,
    clock: drop_step.Clock | None = None,
) -> dict[str, Any]:
    """Measure the ceiling of LDB's saving on a freshly built setup; return the ``ldb-profile/1`` dict.

    Args:
        build: Returns a fresh :class:`~lightning_ldb.bench.setups.Setup`.
        options: Its ``ldb`` settings (``drop_rate``, ``batch_scale``, ...) and ``name``.
        steps: Timed steps per batch size, after as many warm-up steps; and timed full and DROP steps per
            measured DROP-step fit, after one warm-up step of each.
        about: What was profiled (class names), recorded under ``"config"``.
        clock: The measured DROP steps' clock (:func:`~lightning_ldb.bench.drop_step.default_clock` by default;
            a test passes a deterministic one).

    Raises:
        ValueError: If ``steps`` is below 1 or the train loader yields nothing.
    """
    if steps < 1:
        raise ValueError(f"`profile_steps` must be >= 1, got {steps!r}.")
    ldb = options.ldb
    scale = int(ldb["batch_scale"])
    candidates = drop_candidates(build, ldb)
    setup = build()
    base = base_batches(setup, 2 * steps * scale)
    drop = [_concat(base[i : i + scale]) for i in range(0, len(base), scale)][: 2 * steps]
    base = base[: 2 * steps]
    base_size, drop_size = _size(base[0]), _size(drop[0])
    on_gpu = run_on_gpu({"accelerator": setup.trainer_kwargs.get("accelerator", "auto")})
    memory: dict[str, Any] = {"base_batch": None, "drop_batch": None}
    if on_gpu:  # the DROP batch first: one that does not fit is reported, and only the base batch is timed
        memory = {"drop_batch": peak_memory(build, drop[0]), "base_batch": peak_memory(build, base[0])}
    fits = memory["drop_batch"] != "out of memory"
    interleaved = [batch for pair in zip(base, drop) for batch in pair] if scale > 1 and fits else base
    times, world_size = time_steps(build, interleaved, steps)
    full, at_drop = times[base_size], times.get(drop_size, {"error": "out of memory"} if not fits else {})
    model = build().model
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    model.to(device)
    batch = model.transfer_batch_to_device(base[0], device, 0)
    flops = count_flops(model, batch, candidates["weights"], candidates["block"], ldb.get("branches"))
    total = flops["forward"] + flops["backward"]
    p = float(ldb["drop_rate"])
    ceiling = {
        "weights": p * flops["weights_saving"] / total if total else None,
        "block": p * flops["block_saving"] / total if total and flops["block_saving"] is not None else None,
    }
    per_sample = {
        "base_batch": full["iteration_s"] / base_size if "iteration_s" in full else None,
        "drop_batch": at_drop["iteration_s"] / drop_size if "iteration_s" in at_drop else None,
    }
    schedule = per_sample["drop_batch"] / per_sample["base_batch"] if per_sample["drop_batch"] else None
    clock_name, default = drop_step.default_clock(on_gpu)
    if clock is not None:
        clock_name = getattr(clock, "__name__", "given")
    seeded = {**ldb, "seed": options.seed}  # the comparison's seed: the same draws in every profile
    measured, culprits = measure_drop_steps(
        build, base[0], seeded, candidates, model, batch, ceiling, steps, clock or default
    )
    flop_floor = {
        mode: schedule * (1.0 - value) if schedule is not None and value is not None else None
        for mode, value in ceiling.items()
    }
    ratios = {mode: (row or {}).get("ratio") for mode, row in measured.items()}
    return {
        "schema": "ldb-profile/1",
        "config": {"name": options.name, **(about or {}), "ldb": {k: ldb[k] for k in ("drop_rate", "batch_scale",
                   "keep_first", "keep_last", "granularity")}, "steps": steps, "world_size": world_size},  # fmt: skip
        "environment": environment(on_gpu),
        "base_batch_size": base_size,
        "drop_batch_size": drop_size,
        "candidates": {"weights": len(candidates["weights"]),
                       "block": None if candidates["block"] is None else len(candidates["block"])},  # fmt: skip
        "full_step": {k: full.get(k) for k in ("forward_s", "backward_s", "optimizer_s")},
        "drop_batch_step": {k: at_drop.get(k) for k in ("forward_s", "backward_s", "optimizer_s", "error")},
        "flops": flops,
        "drop_step_ceiling": ceiling,
        "per_sample_s": per_sample,
        "schedule_per_sample_ratio": schedule,
        "drop_epoch_ratio_floor": flop_floor,
        "drop_step_measured": {"batch_size": base_size, "clock": clock_name, "steps": steps, **measured},
        "culprits": culprits,
        "plausibility_floor": drop_step.plausibility_floor(flop_floor, schedule, ratios),
        "peak_memory_bytes": memory,
    }


def _size(batch: Any) -> int:

    size = batch_length(batch)
    if size is None:
        raise ValueError("--profile needs batches holding tensors (their first dimension is the batch size).")
    return size


def _fmt(value: Optional[float], spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "–" if value is None else f"{value * scale:{spec}}{unit}"


def render(result: Mapping[str, Any]) -> str:
    """The short printed table of a profile."""
    full, drop = result["full_step"], result["drop_batch_step"]
    per, memory, ceiling, floor = (result[k] for k in ("per_sample_s", "peak_memory_bytes", "drop_step_ceiling",
                                                      "drop_epoch_ratio_floor"))  # fmt: skip
    env, config = result["environment"], result["config"]
    base, scaled = f"base batch {result['base_batch_size']}", f"DROP batch {result['drop_batch_size']}"

    def memory_cell(value: Any) -> str:
        return value if isinstance(value, str) else _fmt(value, ".0f", 1 / 2**20, " MiB")

    rows = [
        ("forward (ms)", _fmt(full["forward_s"], ".2f", 1e3), _fmt(drop.get("forward_s"), ".2f", 1e3)),
        ("backward (ms)", _fmt(full["backward_s"], ".2f", 1e3), _fmt(drop.get("backward_s"), ".2f", 1e3)),
        ("optimizer (ms)", _fmt(full["optimizer_s"], ".2f", 1e3), _fmt(drop.get("optimizer_s"), ".2f", 1e3)),
        ("per sample (ms)", _fmt(per["base_batch"], ".3f", 1e3), _fmt(per["drop_batch"], ".3f", 1e3)),
        ("peak memory", memory_cell(memory["base_batch"]), memory_cell(memory["drop_batch"])),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"ldb-bench --profile: {config['name']} on {env['device']} ({env['cpu']}), full steps (data loading"
        f" excluded), median of {config['steps']} after {config['steps']} warm-up"
        + (f"; {config['world_size']} processes: rank 0's steps, communication included"
           if config.get("world_size", 1) > 1 else ""),  # fmt: skip
        f"{'':{width}}{base:>16}{scaled:>18}",
        *(f"{name:{width}}{a:>16}{b:>18}" for name, a, b in rows),
    ]
    candidates = result["candidates"]
    p = config["ldb"]["drop_rate"]
    block = (
        f"block {_fmt(ceiling['block'], '.1%')} ({candidates['block']} candidate branches)"
        if candidates["block"] is not None else "block – (no residual branch found)"
    )  # fmt: skip
    lines.append(
        f"DROP step ceiling at drop_rate {p}: weights {_fmt(ceiling['weights'], '.1%')} of a full step's FLOPs"
        f" ({candidates['weights']} candidate layers); {block}."
    )
    if result["schedule_per_sample_ratio"] is not None:
        lines.append(
            f"Schedule: a sample costs {result['schedule_per_sample_ratio']:.2f}x at the DROP batch. Shortest DROP"
            f" epoch / full epoch: weights {_fmt(floor['weights'], '.2f')}, block {_fmt(floor['block'], '.2f')}."
        )
    lines += _render_measured(result)
    return "\n".join(lines)


def _render_measured(result: Mapping[str, Any]) -> list[str]:
    """The lines on the measured DROP steps and the culprits (none for a profile written before they existed)."""
    measured, culprits = result.get("drop_step_measured"), result.get("culprits")
    if not measured:
        return []
    ceiling = result["drop_step_ceiling"]

    def cell(mode: str) -> str:
        row = measured.get(mode)
        if row is None or row.get("ratio") is None:
            return f"{mode} –"
        flops = f" (FLOPs say {1 - ceiling[mode]:.2f}x)" if ceiling.get(mode) is not None else ""
        return f"{mode} {row['ratio']:.2f}x{flops}"

    lines = [
        (
            f"Measured DROP step / full step at batch {measured['batch_size']} (alternating, median of"
            f" {measured['steps']}, {measured['clock']}): {cell('weights')}; {cell('block')}."
        )
    ]
    floor = result.get("plausibility_floor")
    if floor and floor.get("source") == "measured":
        lines.append(
            f"Plausibility floor (the measured one: the DROP step saves less than its FLOPs say): weights"
            f" {_fmt(floor['weights'], '.2f')}, block {_fmt(floor['block'], '.2f')}."
        )
    if culprits and culprits.get("names"):
        kinds = culprits["kinds"]
        said = ", ".join(
            f"{kind} ({kinds[kind]['layers']} layers: {kinds[kind]['ratio']:.2f}x a full step when dropped, FLOPs say"
            f" {1 - kinds[kind]['flop_share']:.2f}x)"
            for kind in culprits["names"]
        )
        fixed = culprits.get("with_exclude")
        then = (
            f"; the DROP step then takes {fixed['ratio']:.2f}x a full step (FLOPs say"
            f" {1 - fixed['drop_step_ceiling']:.2f}x)"
            if fixed and fixed.get("ratio") is not None and fixed.get("drop_step_ceiling") is not None
            else "; no candidate would be left"
        )
        lines.append(f"Dropping these costs time: {said}. Fix: exclude={culprits['exclude']!r}{then}.")
    elif culprits and culprits.get("analysed"):
        lines.append("No single kind of layer explains it: the per-kind DROP steps cost what their FLOPs say.")
    return lines
