"""Where a DROP step's time goes: forward, backward and optimizer time of single steps, full vs DROP.

When a DROP epoch saves less time than its FLOPs allow (or more), the step profile says which phase
differs. Four kinds of step are timed, interleaved so that machine noise spreads evenly over them:
a full step at the base batch, a full step at the DROP batch (the batch scaling alone), a DROP step
at the DROP batch (what a DROP epoch runs) and a DROP step at the base batch (the dropping alone).
The dropped layers are those the callback drops on the run's first DROP epoch.

The backward pass is also run once per kind under ``torch.profiler`` to list its heaviest operators.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_ldb.bench.flops import count_step_flops, dropped_layers, first_step_of_epoch
from lightning_ldb.bench.report import Spread
from lightning_ldb.callback import LayerDropBackCallback
from lightning_ldb.freezing import ParameterFreezer
from lightning_ldb.schedule import is_drop_epoch

PHASES = ("forward", "backward", "optimizer", "total")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _timed_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> dict[str, dict[str, float]]:
    """Wall-clock and process CPU seconds of the forward, backward and optimizer phases of one step."""
    images, labels = batch
    _sync(device)
    start = _clocks()
    loss = nn.functional.cross_entropy(module(images), labels)
    _sync(device)
    forward_end = _clocks()
    loss.backward()
    _sync(device)
    backward_end = _clocks()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    end = _clocks()
    spans = {
        "forward": (start, forward_end),
        "backward": (forward_end, backward_end),
        "optimizer": (backward_end, end),
        "total": (start, end),
    }
    return {
        "wall": {phase: b[0] - a[0] for phase, (a, b) in spans.items()},
        "cpu": {phase: b[1] - a[1] for phase, (a, b) in spans.items()},
    }


def _backward_ops(
    module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], frozen: Sequence[nn.Parameter]
) -> dict[str, float]:
    """Self CPU seconds of each operator in one backward pass with ``frozen`` frozen."""
    from torch.profiler import ProfilerActivity, profile

    freezer = ParameterFreezer()
    freezer.freeze(frozen)
    try:
        images, labels = batch
        # One unprofiled pass first: a first backward with a new set of frozen layers allocates.
        nn.functional.cross_entropy(module(images), labels).backward()
        for param in module.parameters():
            param.grad = None  # or the profiled pass would accumulate into them
        loss = nn.functional.cross_entropy(module(images), labels)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss.backward()
        return {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}
    finally:
        freezer.restore()
        for param in module.parameters():
            param.grad = None


def profile_steps(
    module: nn.Module,
    callback: LayerDropBackCallback,
    seed: int,
    batch_size: int,
    samples: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    steps: int = 3,
    warmup: int = 1,
    lr: float = 0.1,
    device: Any = "cpu",
    top_ops: int = 6,
) -> dict[str, Any]:
    """Time forward, backward and optimizer phases of full and DROP steps.

    Args:
        module: The model (the LightningModule the callback trains, so that the draw matches); it is
            copied, not changed.
        callback: Supplies the drop arguments (unattached).
        seed: The callback's seed.
        batch_size: The base batch size; DROP steps also run at ``batch_size * callback.batch_scale``.
        samples: Training samples per epoch (decides the draw's step with ``resample="step"``).
        image_shape: ``(channels, height, width)`` of the random inputs.
        num_classes: Number of classes of the random labels.
        steps: Timed steps per kind of step.
        warmup: Untimed steps per kind first.
        lr: SGD learning rate (momentum 0.9), as in the benchmark runs.
        device: Where to run.
        top_ops: How many of the heaviest backward operators to list.

    Raises:
        ValueError: If ``callback.every`` leaves no DROP epoch in a run long enough to have one, or
            ``steps`` is below 1.
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps!r}.")
    device = torch.device(device)
    drop_epoch = callback.every
    if not is_drop_epoch(drop_epoch, callback.every):  # pragma: no cover - every >= 1 always makes it one
        raise ValueError(f"epoch {drop_epoch} is not a DROP epoch under every={callback.every}.")
    model = copy.deepcopy(module).to(device)
    step = first_step_of_epoch(drop_epoch, samples, batch_size, callback) if callback.resample == "step" else None
    dropped = dropped_layers(model, callback, seed, drop_epoch, step)
    frozen = [param for layer in dropped for param in layer.parameters]
    drop_batch = batch_size * callback.batch_scale
    kinds = [
        ("full", batch_size, False),
        ("full", drop_batch, True),
        ("DROP", drop_batch, True),
        ("DROP", batch_size, False),
    ]
    kinds = [
        (name, batch, is_drop_batch)
        for name, batch, is_drop_batch in kinds
        if not (is_drop_batch and drop_batch == batch_size)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)

    def batch_of(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(size, *image_shape, generator=generator).to(device)
        return images, torch.randint(0, num_classes, (size,), generator=generator).to(device)

    batches = {size: batch_of(size) for size in {batch for _, batch, _ in kinds}}
    timings: dict[int, list[dict[str, dict[str, float]]]] = {i: [] for i in range(len(kinds))}
    freezer = ParameterFreezer()
    model.train()
    for iteration in range(warmup + steps):
        for index, (name, batch, _) in enumerate(kinds):
            if name == "DROP":
                freezer.freeze(frozen)
            try:
                phases = _timed_step(model, optimizer, batches[batch], device)
            finally:
                freezer.restore()
            if iteration >= warmup:
                timings[index].append(phases)

    meta = copy.deepcopy(module).to(torch.device("meta"))
    meta_frozen = [p for layer in dropped_layers(meta, callback, seed, drop_epoch, step) for p in layer.parameters]

    def meta_loss(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    rows = []
    for index, (name, batch, _) in enumerate(kinds):
        per_phase = {phase: Spread.of(t["wall"][phase] for t in timings[index]) for phase in PHASES}
        per_phase_cpu = {phase: Spread.of(t["cpu"][phase] for t in timings[index]) for phase in PHASES}
        meta_batch = (
            torch.zeros(batch, *image_shape, device="meta"),
            torch.zeros(batch, dtype=torch.long, device="meta"),
        )
        flops = count_step_flops(meta, meta_loss, meta_batch, meta_frozen if name == "DROP" else ())
        rows.append(
            {
                "name": f"{name} step",
                "batch": batch,
                "seconds": per_phase,
                "cpu_seconds": per_phase_cpu,
                "ms_per_sample": per_phase["total"].mean * 1e3 / batch,
                "cpu_ms_per_sample": per_phase_cpu["total"].mean * 1e3 / batch,
                "flops_per_sample": flops / batch,
            }
        )

    ops: list[dict[str, Any]] = []
    if device.type == "cpu" and top_ops > 0:
        full_ops = _backward_ops(model, batches[drop_batch], ())
        drop_ops = _backward_ops(model, batches[drop_batch], frozen)
        heaviest = sorted(full_ops, key=full_ops.get, reverse=True)[:top_ops]
        ops = [{"name": op, "full": full_ops[op], "drop": drop_ops.get(op, 0.0)} for op in heaviest]
    return {
        "steps": steps,
        "warmup": warmup,
        "drop_epoch": drop_epoch,
        "dropped": [layer.name for layer in dropped],
        "rows": rows,
        "backward_ops": ops,
        "notes": profile_notes(rows, clock="cpu" if device.type == "cpu" else "wall"),
    }


def profile_notes(rows: Sequence[dict[str, Any]], clock: str = "cpu") -> list[str]:
    """Plain-language findings from the profile rows: batch effect, dropping effect, and FLOPs vs time.

    Args:
        rows: The profile's rows.
        clock: ``"cpu"`` (process CPU time, steadier on a shared CPU machine) or ``"wall"``.
    """
    by_kind = {(row["name"], row["batch"]): row for row in rows}
    batches = sorted({row["batch"] for row in rows})
    per_sample = "cpu_ms_per_sample" if clock == "cpu" else "ms_per_sample"
    seconds = "cpu_seconds" if clock == "cpu" else "seconds"
    notes = [f"Ratios below use {'process CPU time' if clock == 'cpu' else 'wall-clock time'} per sample."]
    if len(batches) == 2:
        base, big = batches
        full_base, full_big = by_kind.get(("full step", base)), by_kind.get(("full step", big))
        drop_big = by_kind.get(("DROP step", big))
        if full_base and full_big:
            change = full_big[per_sample] / full_base[per_sample] - 1
            notes.append(
                f"Batch {big} instead of {base} alone changes the time per sample by {change * 100:+.1f}% (full steps)."
            )
        if full_big and drop_big:
            time_ratio = drop_big[per_sample] / full_big[per_sample]
            flop_ratio = drop_big["flops_per_sample"] / full_big["flops_per_sample"]
            backward_ratio = _mean(drop_big, seconds, "backward") / _mean(full_big, seconds, "backward")
            notes.append(
                f"At batch {big}, dropping cuts the time per sample to {time_ratio:.3f}x"
                f" (backward alone {backward_ratio:.3f}x) where the FLOPs fall to {flop_ratio:.3f}x."
            )
        if full_base and drop_big:
            notes.append(
                f"A DROP step at batch {big} takes {drop_big[per_sample] / full_base[per_sample]:.3f}x the time per"
                f" sample of a full step at batch {base}: the DROP-epoch time ratio these steps predict."
            )
    return notes


def _mean(row: dict[str, Any], key: str, phase: str) -> float:
    value = row[key][phase]
    return value.mean if isinstance(value, Spread) else value["mean"]
