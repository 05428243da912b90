"""The plain loop around ``optimizer.step()``: a step that raised, optimizers replaced each epoch, ``GradScaler``.

Each test checks what the parameters did (the size of each update, which moved, bitwise against a run made here),
not only the learning-rate number.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_ldb import LayerDropBack

LR = 0.1
KWARGS: dict[str, Any] = {"drop_rate": 0.5, "every": 2, "keep_first": 1, "keep_last": 1, "seed": 0}


def new_model() -> nn.Sequential:
    # No BatchNorm: a forward whose step then fails changes nothing, so a run that skips a batch can be compared
    # bitwise with one that never saw it.
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)], nn.Linear(8, 1))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(i)
    x = torch.randn(16, 8, generator=generator)
    return x, x.sum(1, keepdim=True)


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def moved_at(
    model: nn.Module, step: Callable[[], Any], closure_grads: dict[str, torch.Tensor | None] | None = None
) -> dict[str, float]:
    """Run ``step`` (a plain-SGD ``optimizer.step()``); per parameter that moved, the lr its update used.

    A parameter with a gradient must move by exactly ``-lr * grad`` for one lr; one without must stay bitwise.
    ``closure_grads``: filled by the step's closure with the gradients it left (else they are read before the step).
    """
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = grads(model)
    step()
    if closure_grads is not None:
        before = closure_grads
    used: dict[str, float] = {}
    for name, param in model.named_parameters():
        weight, grad = weights[name], before[name]
        if grad is None:
            assert torch.equal(param, weight), name
            continue
        mask = grad.abs() > 1e-2
        lr = ((weight - param.detach())[mask] / grad[mask]).mean().item()
        assert torch.allclose(param, weight - lr * grad, rtol=0, atol=1e-6), name
        used[name] = round(lr, 4)
    return used


# ------------------------------------------------------------------ a step that raised
class OutOfMemory(RuntimeError):
    pass


class RaisingSGD(torch.optim.SGD):
    """Plain SGD whose ``step`` raises once when armed, after LDB's step pre hook scaled the lr."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=LR)
        self.armed = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.armed:
            self.armed = False
            raise OutOfMemory("CUDA out of memory (a lazy state allocation)")
        return super().step(closure)


class WrappingSGD(RaisingSGD):
    """Its ``step`` calls the raising one: torch runs the step hooks twice, nested, and the inner call raises."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return super().step(closure)


class RetryingSGD(RaisingSGD):
    """Catches its inner call's failure and steps again: the failed call's hooks ran inside a call that goes on."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        try:
            return super().step(closure)
        except OutOfMemory:
            return super().step(closure)


class SkippingSGD(RaisingSGD):
    """Catches its inner call's failure and skips the update: the failed call's hooks ran inside a call that ends."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        try:
            return super().step(closure)
        except OutOfMemory:
            return None


RaisingSGD([nn.Parameter(torch.ones(1))])  # an instance hooks RaisingSGD's own step, so the subclasses' nest


class Loop:
    """The README's plain loop, one batch per call; ``fail=True`` makes this step raise (in ``where``)."""

    def __init__(self, where: str, resample: str = "epoch") -> None:
        self.model = new_model()
        self.where = where
        kinds = {"nested step": WrappingSGD, "retried in step": RetryingSGD, "skipped in step": SkippingSGD}
        kind = kinds.get(where, RaisingSGD)
        self.optimizer = kind(self.model.parameters())
        self.ldb = LayerDropBack(self.model, self.optimizer, **KWARGS, resample=resample)
        self.dropped: list[tuple[str, ...]] = []  # per successful step, the layers its forward had dropped
        # The lr that code in the forward sees (a warm-up reading it, a logger): never a scale a failed step left.
        self.lr_in_forward: set[float] = set()
        self.model[0].register_forward_pre_hook(lambda *_: self.lr_in_forward.add(self.optimizer.param_groups[0]["lr"]))

    def step(self, i: int, fail: bool = False) -> dict[str, float]:
        x, y = batch(i)
        if self.where == "closure":

            seen: dict[str, torch.Tensor | None] = {}

            def closure() -> torch.Tensor:
                loss = nn.functional.mse_loss(self.model(x), y)
                loss.backward()
                if fail:  # e.g. out of memory in the backward
                    raise OutOfMemory("CUDA out of memory (in the closure's backward)")
                seen.update(grads(self.model))
                return loss

            used = moved_at(self.model, lambda: self.optimizer.step(closure), seen)
        else:
            nn.functional.mse_loss(self.model(x), y).backward()
            self.optimizer.armed = fail
            used = moved_at(self.model, self.optimizer.step)
        self.dropped.append(self.ldb.dropped_layers)
        self.optimizer.zero_grad()
        return used

    def epoch(self, epoch: int, batches: range) -> list[dict[str, float]]:
        with self.ldb.epoch(epoch):
            return [self.step(i) for i in batches]


WHERE = ["step", "nested step", "closure"]


def kept_lrs(used: list[dict[str, float]]) -> set[float]:
    return {lr for step in used for lr in step.values()}


@pytest.mark.parametrize("where", WHERE)
def test_a_step_that_raised_and_ended_its_drop_epoch_leaves_the_lr_unscaled_for_the_rest_of_the_run(where):
    loop = Loop(where)
    loop.epoch(0, range(2))
    with pytest.raises(OutOfMemory), loop.ldb.epoch(2):
        loop.step(2)
        loop.step(3, fail=True)
    loop.optimizer.zero_grad()  # the failed batch's gradients
    assert loop.optimizer.param_groups[0]["lr"] == LR
    assert loop.ldb.steps == 3  # the failed step was not counted
    assert kept_lrs(loop.epoch(3, range(4, 6))) == {LR}  # the next full epoch updates at 1x
    drop = loop.epoch(4, range(6, 8))
    assert kept_lrs(drop) == {2 * LR} and loop.ldb.dropped_layers == ()  # a later DROP epoch at 2x
    assert all(loop.dropped[-2:]) and all(len(step) < 14 for step in drop)  # the dropped stayed (see moved_at)
    assert loop.optimizer.param_groups[0]["lr"] == LR

    reference = Loop(where)  # the same batches, the failed one left out
    reference.epoch(0, range(2))
    reference.epoch(2, range(2, 3))
    reference.epoch(3, range(4, 6))
    reference.epoch(4, range(6, 8))
    for name, param in loop.model.named_parameters():
        assert torch.equal(param, reference.model.get_parameter(name)), name


@pytest.mark.parametrize("where", WHERE)
def test_a_step_that_raised_inside_its_drop_epoch_is_skipped_as_if_it_had_not_happened(where):
    # The common "skip this batch" handler: later DROP steps still update at 2x, resample="step" keeps drawing.
    loop = Loop(where, resample="step")
    loop.epoch(0, range(2))
    used = []
    with loop.ldb.epoch(2):
        for i in range(2, 8):
            try:
                used.append(loop.step(i, fail=i == 4))
            except OutOfMemory:
                loop.optimizer.zero_grad()
                loop.dropped.append(("failed",))
        assert loop.ldb.steps == 2 + 5
    assert kept_lrs(used) == {2 * LR}
    assert loop.optimizer.param_groups[0]["lr"] == LR and loop.lr_in_forward == {LR}
    assert kept_lrs(loop.epoch(3, range(8, 10))) == {LR}

    reference = Loop(where, resample="step")
    reference.epoch(0, range(2))
    reference.epoch(2, [i for i in range(2, 8) if i != 4])
    reference.epoch(3, range(8, 10))
    drop_steps = [d for d in loop.dropped[2:8] if d != ("failed",)]
    assert drop_steps == reference.dropped[2:7]  # the step draws continue as if the failure had not happened
    assert len(set(drop_steps)) > 1  # and still one per step
    for name, param in loop.model.named_parameters():
        assert torch.equal(param, reference.model.get_parameter(name)), name


@pytest.mark.parametrize("where", ["retried in step", "skipped in step"])
def test_a_step_that_catches_its_failed_inner_call_is_scaled_once_and_counted_once(where):
    loop = Loop(where)
    loop.epoch(0, range(2))
    with loop.ldb.epoch(2):
        used = [loop.step(2), loop.step(3, fail=True), loop.step(4)]
        assert loop.ldb.steps == 5
    if where == "skipped in step":
        assert set(used.pop(1).values()) == {0.0}  # no update
    assert kept_lrs(used) == {2 * LR} and loop.optimizer.param_groups[0]["lr"] == LR
    assert kept_lrs(loop.epoch(3, range(5, 6))) == {LR}


# ------------------------------------------------------------------ optimizers recreated each epoch
def test_optimizers_recreated_each_epoch_are_freed_and_each_new_one_is_scaled_on_drop_epochs():
    # The README's recipe: `ldb.hook_optimizers([optimizer])` after making it. A replaced optimizer (Adam: two state
    # tensors per parameter) must be freed, not kept by LDB for the rest of the run.
    model = new_model()
    ldb = LayerDropBack(model, (), **KWARGS)
    replaced: list[weakref.ref[torch.optim.Optimizer]] = []
    lr = 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hooked: no "an optimizer LDB was not given" warning
        for epoch in range(6):
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            ldb.hook_optimizers([optimizer])
            with ldb.epoch(epoch):
                x, y = batch(epoch)
                nn.functional.mse_loss(model(x), y).backward()
                before = {n: (p.detach().clone(), p.grad) for n, p in model.named_parameters()}
                optimizer.step()
                optimizer.zero_grad()
                assert ldb.dropped_layers or epoch % 2 == 1 or epoch == 0
            # A fresh Adam's first step moves each element by lr * g / (|g| + eps): by the lr, where |g| >> eps.
            scale = 2.0 if epoch in (2, 4) else 1.0
            for name, param in model.named_parameters():
                weight, grad = before[name]
                if grad is None:  # dropped
                    assert torch.equal(param, weight), name
                    continue
                mask = grad.abs() > 1e-3
                step = (weight - param.detach())[mask].abs()
                assert torch.allclose(step, torch.full_like(step, lr * scale), rtol=1e-3), (epoch, name)
            replaced.append(weakref.ref(optimizer))
            del optimizer, before
            gc.collect()
            if epoch:
                assert [ref() is None for ref in replaced[:-1]] == [True] * epoch  # every replaced one is freed


# ------------------------------------------------------------------ GradScaler with several optimizers
@pytest.mark.parametrize("zero_grad", ["after the step", "between forward and backward"])
@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_grad_scaler_steps_an_optimizer_whose_layers_are_all_dropped_without_moving_them(zero_grad, resample):
    # One optimizer per layer group; a draw that drops every layer of one made `scaler.step(opt)` raise torch's
    # "No inf checks were recorded for this optimizer" at the first DROP step of the plain loop.
    model = new_model()
    middle = {"2.0", "3.0"}  # candidates (keep_first=1, keep_last=1): all dropped at drop_rate=0.99
    inner = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in middle]
    outer = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in middle]
    optimizers = [torch.optim.SGD(inner, lr=LR, momentum=0.9, weight_decay=0.1), torch.optim.Adam(outer, lr=0.01)]
    ldb = LayerDropBack(model, optimizers, **{**KWARGS, "drop_rate": 0.99}, resample=resample)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert scaler.is_enabled()
    names = [n for n, _ in model.named_parameters()]
    snapshots, dropped = [], []
    # The engine says at the first epoch that a draw can drop all of one optimizer's layers (here, on purpose).
    with pytest.warns(UserWarning, match="one draw can drop every layer an optimizer trains"):
        for epoch in range(3):
            with ldb.epoch(epoch):
                for i in range(3):
                    x, y = batch(10 * epoch + i)
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        out = model(x)
                    loss = nn.functional.mse_loss(out.float(), y)
                    if zero_grad == "between forward and backward":
                        for optimizer in optimizers:
                            optimizer.zero_grad()
                    scaler.scale(loss).backward()
                    for optimizer in optimizers:
                        scaler.step(optimizer)
                    scaler.update()
                    dropped.append(set(ldb.dropped_layers))
                    if zero_grad == "after the step":
                        for optimizer in optimizers:
                            optimizer.zero_grad()
            snapshots.append(dict(zip(names, (p.detach().clone() for p in model.parameters()))))
    assert all(middle <= d for d in dropped[6:]) and all(not d for d in dropped[:6])
    for name in names:
        moved = not torch.equal(snapshots[2][name], snapshots[1][name])
        is_kept = name.rsplit(".", 1)[0] not in set.union(*dropped[6:])
        assert moved == is_kept, name  # the dropped, the whole inner optimizer's among them, bitwise unchanged
        assert not torch.equal(snapshots[1][name], snapshots[0][name]), name  # every one trains on full epochs
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in inner)  # no placeholder left behind
    model[6](torch.randn(2, 8)).sum().backward()  # nor a hook: a backward after the epoch gives none
    assert all(p.grad is None for p in inner)
