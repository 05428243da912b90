"""The DROP-epoch LR scale reaches the update and nothing else; optimizers that would move dropped layers are refused.

Real Trainer runs on tiny models: what the user's LR code sees and writes inside a step, what the update
uses (parameter deltas under plain SGD), what optimizer state keeps after a DROP epoch.
"""

from __future__ import annotations

from typing import Any

import warnings

import pytest
import torch
from helpers import TinyMLP, make_dataset, make_trainer
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader

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


# ---------------------------------------------------------------------- optimizers that move dropped layers
class LBFGSMLP(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.steps_run += 1
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.1)


def test_lbfgs_is_refused_before_the_first_training_step_with_the_fix():
    model = LBFGSMLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ldb = LayerDropBackCallback(drop_rate=0.5, batch_scale=1, seed=0)

    with pytest.raises(ValueError) as refused:
        make_trainer(3, [ldb]).fit(model)

    message = str(refused.value)
    assert "LBFGS (optimizer 0)" in message and "dropped layers would move" in message
    assert "Use an optimizer that skips parameters without a gradient" in message
    assert model.steps_run == 0  # refused before any training step
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


schedulefree = pytest.importorskip("schedulefree")


class ScheduleFreeMLP(TinyMLP):
    """AdamWScheduleFree with a warm-up, so that its ``lr_max`` follows the lr step by step."""

    def configure_optimizers(self) -> Any:
        return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.01, warmup_steps=20)

    def on_train_epoch_start(self) -> None:
        self.optimizers().optimizer.train()  # schedule-free optimizers step in train mode only


def test_schedule_free_state_after_a_drop_epoch_is_the_unscaled_runs(tmp_path):
    def run(lr_scale: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        model = ScheduleFreeMLP()
        ldb = LayerDropBackCallback(drop_rate=0.5, every=EVERY, lr_scale=lr_scale, batch_scale=1, seed=0)
        trainer = make_trainer(EVERY + 1, [ldb])  # ends with the DROP epoch
        trainer.fit(model)
        trainer.save_checkpoint(tmp_path / f"scale{lr_scale}.ckpt")
        checkpoint = torch.load(tmp_path / f"scale{lr_scale}.ckpt", weights_only=False)
        return trainer.optimizers[0].param_groups, checkpoint["optimizer_states"][0]["param_groups"]

    live, saved = run(LR_SCALE)
    baseline_live, baseline_saved = run(1.0)
    for groups, baseline in ((live, baseline_live), (saved, baseline_saved)):
        for group, expected in zip(groups, baseline):
            assert group["k"] == expected["k"] > 0
            for key in ("lr", "lr_max", "scheduled_lr"):
                assert group[key] == pytest.approx(expected[key], rel=1e-12), key


ZERO_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from lightning_ldb.lr_scaling import StepLRScaler
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
kept, dropped = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
optimizer = ZeroRedundancyOptimizer([kept, dropped], optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
scaler = StepLRScaler()
scaler.attach([optimizer])
scaler.scale = 2.0
for step in range(2):
    dropped.requires_grad_(step == 0)  # trained on the first step, dropped on the second
    def closure():
        kept.grad = torch.ones(3)
        dropped.grad = torch.ones(3) if step == 0 else None
        return 0.0
    before_kept, before_dropped = kept.detach().clone(), dropped.detach().clone()
    optimizer.step(closure=closure)
    lrs = [optimizer.param_groups[0]["lr"], optimizer.optim.param_groups[0]["lr"]]
    print(json.dumps([(kept - before_kept).tolist(), (dropped - before_dropped).tolist(), lrs]), flush=True)
dist.destroy_process_group()
"""


def test_zero_redundancy_optimizer_gets_the_scaled_lr_after_the_closure_and_never_moves_a_dropped_parameter():
    # ZeRO copies its groups into its shard optimizer before evaluating the closure: the scale must reach that copy.
    import json
    import os
    import subprocess
    import sys

    from helpers import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", ZERO_SCRIPT, str(free_port())], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads(line) for line in result.stdout.splitlines() if line.startswith("[["))
    # Momentum 0.9, lr 0.1 x 2: step 0 moves both by 0.2; step 1 moves the kept one by 0.2 * 1.9, not the dropped one.
    assert first[0] == pytest.approx([-0.2] * 3) and first[1] == pytest.approx([-0.2] * 3)
    assert second[0] == pytest.approx([-0.38] * 3) and second[1] == [0.0] * 3
    assert first[2] == second[2] == [0.1, 0.1]  # both copies of the lr put back


# ---------------------------------------------------------------------- a GAN whose generator can be dropped whole
class TinyGAN(LightningModule):
    """A generator of two layers and a discriminator of three, trained with ``toggle_optimizer``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        noise = torch.randn(real.shape[0], 4)
        self.toggle_optimizer(opt_g)  # freezes the discriminator
        self.manual_backward(-self.discriminator(self.generator(noise)).mean())
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        fake = self.generator(noise).detach()
        self.manual_backward(self.discriminator(fake).mean() - self.discriminator(real).mean())
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.generator.parameters(), lr=0.01),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.01),
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(32), batch_size=8)


GAN_LDB = dict(drop_rate=0.9, keep_first=0, keep_last=1, every=1, batch_scale=1, seed=0)


def test_a_generator_that_one_draw_can_drop_whole_is_warned_about_at_fit_start_with_the_probability():
    with pytest.warns(UserWarning, match="one draw can drop every layer an optimizer trains") as warned:
        make_trainer(1, [LayerDropBackCallback(**GAN_LDB)]).fit(TinyGAN())  # epoch 0 only: no draw yet
    message = next(str(w.message) for w in warned if "optimizer trains" in str(w.message))
    assert "optimizer 0 (SGD): all 2 of its layers with probability drop_rate**2 = 0.81" in message
    assert "toggle_optimizer" in message and "exclude=['generator.2']" in message


def test_a_generator_step_without_gradient_says_what_ldb_dropped_and_the_fix():
    with pytest.raises(RuntimeError, match="does not require grad") as failed, pytest.warns(UserWarning):
        make_trainer(3, [LayerDropBackCallback(**GAN_LDB)]).fit(TinyGAN())
    note = "\n".join(getattr(failed.value, "__notes__", []))
    assert "LayerDropBackCallback had dropped (frozen) generator.0, generator.2" in note
    assert "toggle_optimizer" in note and "`exclude` it" in note


def test_the_fix_trains_the_gan_through_drop_epochs_without_the_warning():
    model = TinyGAN()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(3, [LayerDropBackCallback(**GAN_LDB, exclude=["generator.2"])]).fit(model)
    assert not [w for w in caught if "optimizer trains" in str(w.message)]
    assert model.trainer.current_epoch == 3


class PositionalClosureSGD(torch.optim.SGD):
    """Names its closure argument otherwise: LDB must hand the closure back positionally."""

    def step(self, loss_fn=None):  # type: ignore[override]
        with torch.enable_grad():
            loss = loss_fn()
        self.lr_used = self.param_groups[0]["lr"]
        super().step()
        return loss


def test_a_closure_given_positionally_is_scaled_after_it_returned_and_handed_back_positionally():
    from lightning_ldb.lr_scaling import StepLRScaler

    weight = nn.Parameter(torch.ones(2))
    optimizer = PositionalClosureSGD([weight], lr=0.1)
    scaler = StepLRScaler()
    scaler.attach([optimizer])
    scaler.scale = 3.0
    seen = []

    def closure():
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        weight.sum().backward()
        return 1.0

    assert optimizer.step(closure) == 1.0
    assert seen == [0.1] and optimizer.lr_used == pytest.approx(0.3) and optimizer.param_groups[0]["lr"] == 0.1
    assert weight.detach().tolist() == pytest.approx([0.7, 0.7])


class TwiceEvaluatingSGD(torch.optim.SGD):
    """Evaluates its closure twice per step (as a line search or SAM does), then updates."""

    def step(self, closure=None):  # type: ignore[override]
        with torch.enable_grad():
            closure()
            loss = closure()
        self.lr_used = self.param_groups[0]["lr"]
        super().step()
        return loss


def test_a_re_evaluated_closure_sees_the_unscaled_lr_every_time_and_the_update_the_scaled_one():
    from lightning_ldb.lr_scaling import StepLRScaler

    weight = nn.Parameter(torch.ones(2))
    optimizer = TwiceEvaluatingSGD([weight], lr=0.1)
    scaler = StepLRScaler()
    scaler.attach([optimizer])
    scaler.scale = 2.0
    seen = []

    def closure():
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        weight.sum().backward()
        return 1.0

    optimizer.step(closure=closure)
    assert seen == [0.1, 0.1] and optimizer.lr_used == pytest.approx(0.2) and optimizer.param_groups[0]["lr"] == 0.1
