"""A fit that fails mid-DROP-epoch leaves every ``requires_grad`` flag and every learning rate as the user set them.

``test_callback.py`` covers the flags after a failing ``training_step``; these cover failures at the points where
LDB holds more state: inside ``optimizer.step()`` (the lr is scaled there), in a later callback's
``on_train_batch_start`` (just after LDB froze its draw), and in a validation that interrupts a DROP epoch.
"""

from __future__ import annotations

import signal
import warnings

import pytest
import torch
from helpers import TinyMLP, make_dataset, make_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_ldb import LayerDropBackCallback

LR, LR_SCALE = 0.1, 4.0
FAIL_EPOCH = 2  # the first DROP epoch with every=2; 4 batches per epoch


class FailingSGD(torch.optim.SGD):
    """Plain SGD that raises inside ``step()`` on its ``fail_at``-th call, after the closure (LDB has scaled the lr)."""

    def __init__(self, params, exception: type[BaseException], fail_at: int) -> None:
        super().__init__(params, lr=LR)
        self.exception, self.fail_at, self.calls = exception, fail_at, 0
        self.lrs_at_failure: list[float] = []

    def step(self, closure=None):
        self.calls += 1
        loss = None
        if closure is not None:  # as SGD does: the closure first, then the update with the (scaled) lr
            with torch.enable_grad():
                loss = closure()
        if self.calls == self.fail_at:
            self.lrs_at_failure = [group["lr"] for group in self.param_groups]
            raise self.exception("boom inside optimizer.step()")
        super().step()
        return loss


class Model(TinyMLP):
    def __init__(self, exception: type[BaseException], where: str) -> None:
        super().__init__(optimizer="plain_sgd", lr=LR)
        self.exception, self.where = exception, where
        self.frozen_at_failure: set[str] = set()

    def configure_optimizers(self):
        # Two param groups (the head apart), so that every group's lr is checked.
        head = list(self.net[-1].parameters())
        body = [p for p in self.parameters() if all(p is not h for h in head)]
        fail_at = 2 * 4 + 2 if self.where == "optimizer_step" else -1  # the 2nd step of epoch 2
        return FailingSGD([{"params": body}, {"params": head, "lr": LR / 2}], self.exception, fail_at)

    def validation_step(self, batch, batch_idx):
        if self.where == "validation" and self.current_epoch == FAIL_EPOCH:
            self.frozen_at_failure = {n for n, p in self.named_parameters() if not p.requires_grad}
            raise self.exception("boom in validation mid-DROP-epoch")
        return super().validation_step(batch, batch_idx)


class FailAtEpochStart(Callback):
    """Placed after LDB: raises in the first ``on_train_batch_start`` of the DROP epoch, right after LDB froze its draw."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # LDB (listed first) has applied the epoch's draw by now.
        if self.model.where == "batch_start_callback" and trainer.current_epoch == FAIL_EPOCH:
            self.model.frozen_at_failure = {n for n, p in pl_module.named_parameters() if not p.requires_grad}
            raise self.model.exception("boom in a later callback's on_train_batch_start")


class FrozenAtStep(Callback):
    def __init__(self, model: Model) -> None:
        self.model = model

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.current_epoch == FAIL_EPOCH:
            self.model.frozen_at_failure = {n for n, p in pl_module.named_parameters() if not p.requires_grad}


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after catching one
    yield
    signal.signal(signal.SIGINT, handler)


def plain_sgd_step_lrs(model: TinyMLP, optimizer: torch.optim.Optimizer) -> list[float]:
    """One hand-made plain-SGD step: the lr each group used, from a weight's change and gradient."""
    x, y = make_dataset(16, seed=5).tensors
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    probes = [model.net[-3].weight, model.net[-1].weight]  # one parameter of each group
    before = [(p.detach().clone(), p.grad.clone()) for p in probes]
    optimizer.step()
    lrs = []
    for p, (weight, grad) in zip(probes, before):
        mask = grad.abs() > 1e-6
        lrs.append(float((-(p.detach() - weight)[mask] / grad[mask]).median()))
    return lrs


@pytest.mark.parametrize("where", ["optimizer_step", "batch_start_callback", "validation"])
@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_drop_epoch_leaves_flags_and_learning_rates_as_set(where, exception, restore_sigint):
    model = Model(exception, where)
    model.net[0].requires_grad_(False)  # the user's own choice must survive too
    optimizer = model.configure_optimizers()
    model.configure_optimizers = lambda: optimizer  # keep a handle on the very optimizer that fails
    ldb = LayerDropBackCallback(drop_rate=0.9, lr_scale=LR_SCALE, seed=0, batch_scale=1)
    callbacks = [ldb, FailAtEpochStart(model), FrozenAtStep(model)]
    val_batches = 1 if where == "validation" else 0
    trainer = make_trainer(5, callbacks, val_check_interval=0.5, limit_val_batches=val_batches)
    # Lightning turns Ctrl-C into a graceful shutdown that exits the process.
    with pytest.raises(SystemExit if exception is KeyboardInterrupt else RuntimeError):
        trainer.fit(model)

    assert trainer.current_epoch == FAIL_EPOCH
    assert model.frozen_at_failure - {"net.0.weight", "net.0.bias"}  # it failed while layers were dropped
    if where == "optimizer_step":
        assert optimizer.lrs_at_failure == [LR * LR_SCALE, LR / 2 * LR_SCALE]  # it failed with the lr scaled
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"net.0.weight", "net.0.bias"}
    assert ldb.dropped_layers == ()
    assert [group["lr"] for group in optimizer.param_groups] == [LR, LR / 2]
    # And LDB's step hooks are gone: a step taken now uses the lrs as set.
    assert plain_sgd_step_lrs(model, optimizer) == pytest.approx([LR, LR / 2], rel=1e-3)


def test_a_setup_that_can_drop_every_trainable_layer_warns_before_it_fails():
    # keep_first=0, keep_last=0: every layer is a candidate; at drop_rate 0.999 the first draw drops them all.
    model = TinyMLP()
    ldb = LayerDropBackCallback(drop_rate=0.999, keep_first=0, keep_last=0, seed=0, batch_scale=1)
    with pytest.warns(UserWarning, match=r"every trainable layer of TinyMLP.*drops all 9"):
        with pytest.raises(RuntimeError, match="does not require grad"):
            make_trainer(3, [ldb]).fit(model)
    assert all(p.requires_grad for p in model.parameters())


def test_keeping_one_layer_trained_does_not_warn():
    ldb = LayerDropBackCallback(drop_rate=0.999, keep_first=0, keep_last=1, seed=0, batch_scale=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(3, [ldb]).fit(TinyMLP())
    assert not [w for w in record if "every trainable layer" in str(w.message)]
