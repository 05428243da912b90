"""The DROP-epoch LR scale reaches the update and nothing else; optimizers that would move dropped layers are refused.

Real Trainer runs on tiny models: what the user's LR code sees and writes inside a step, what the update
uses (parameter deltas under plain SGD), what optimizer state keeps after a DROP epoch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TinyMLP, make_trainer
from torch import nn

from lightning_ldb import LayerDropBackCallback

EVERY = 2
LR_SCALE = 2.0


class WarmupMLP(TinyMLP):
    """Plain SGD whose LR is written in ``on_before_optimizer_step`` (a warm-up), recording what it sees.

    Records, per optimizer step: the epoch, the lr seen in ``training_step`` and in ``on_before_optimizer_step``
    (before the write), the lr written, the lr after the step, and the last layer's weight, gradient and delta.
    """

    def __init__(self, manual: bool = False, **kwargs: Any) -> None:
        super().__init__(optimizer="plain_sgd", lr=0.05, **kwargs)
        self.automatic_optimization = not manual
        self.records: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        group = self.trainer.optimizers[0].param_groups[0]
        self.records.append({"epoch": self.current_epoch, "in_training_step": group["lr"]})
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()
        return None

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        group = optimizer.param_groups[0]
        record = self.records[-1]
        record["in_before_step"] = group["lr"]
        written = 0.01 * (self.trainer.global_step + 1)  # the warm-up's write
        group["lr"] = written
        record["written"] = written
        weight = self.net[-1].weight
        record["weight"], record["grad"] = weight.detach().clone(), weight.grad.detach().clone()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = self.records[-1]
        record["after_step"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        record["delta"] = self.net[-1].weight.detach() - record["weight"]


@pytest.mark.parametrize(
    "precision, manual", [("32-true", False), ("bf16-mixed", False), ("32-true", True)], ids=["32", "bf16", "manual"]
)
def test_user_lr_code_sees_and_keeps_the_unscaled_lr_while_the_update_uses_it_scaled(precision, manual):
    model = WarmupMLP(manual=manual)
    ldb = LayerDropBackCallback(drop_rate=0.5, every=EVERY, lr_scale=LR_SCALE, batch_scale=1, seed=0)
    make_trainer(3, [ldb], precision=precision).fit(model)

    assert {r["epoch"] for r in model.records} == {0, 1, 2}
    previous_written = 0.05
    for record in model.records:
        # What the user's code sees: the value it last wrote (the initial lr before the first write), never x2.
        assert record["in_training_step"] == previous_written
        assert record["in_before_step"] == previous_written
        assert record["after_step"] == record["written"]  # the write survives the step
        previous_written = record["written"]
        # What the update used: the lr written, times lr_scale on the DROP epoch.
        scale = LR_SCALE if record["epoch"] == EVERY else 1.0
        grad, delta = record["grad"], record["delta"]
        mask = grad.abs() > 1e-6
        assert mask.any()
        torch.testing.assert_close(delta[mask], -(record["written"] * scale) * grad[mask], rtol=1e-4, atol=1e-7)
