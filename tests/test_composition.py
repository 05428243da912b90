"""LayerDropBackCallback composed with Lightning's own features, each in a real Trainer run on a tiny model."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from helpers import OneCycleMLP, TinyDataModule, TinyMLP, make_dataset, make_trainer, params_of_layers, snapshot
from lightning.pytorch import LightningModule, seed_everything
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_ldb import LayerDropBackCallback
from lightning_ldb import callback as timing  # the epoch timer lives in the callback module


def frozen_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def assert_dropped_still_and_the_rest_trained(watch: "Watch", epoch: int) -> None:
    changed = moved(watch.start[epoch], watch.end[epoch])
    dropped = watch.dropped.get(epoch, set())
    assert not changed & dropped, f"epoch {epoch}: dropped parameters moved: {changed & dropped}"
    # TinyMLP's ``net.0.bias`` may stay put: the BatchNorm right after it cancels its gradient.
    assert changed >= set(watch.start[epoch]) - dropped - {"net.0.bias"}, f"epoch {epoch}"


class Watch(Callback):
    """Placed last: sees, per epoch, what LDB dropped, what was frozen while training, and the weights around it."""

    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.dropped: dict[int, set[str]] = {}
        self.frozen_in_batch: dict[int, set[str]] = {}
        self.frozen_each_batch: dict[int, list[set[str]]] = {}
        self.frozen_after: dict[int, set[str]] = {}
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start[trainer.current_epoch] = snapshot(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        epoch = trainer.current_epoch
        self.dropped.setdefault(epoch, set()).update(params_of_layers(pl_module, self.ldb.dropped_layers))
        frozen = frozen_names(pl_module)
        self.frozen_in_batch.setdefault(epoch, set()).update(frozen)
        self.frozen_each_batch.setdefault(epoch, []).append(frozen)

    def on_train_epoch_end(self, trainer, pl_module):
        # Runs after LDB's own ``on_train_epoch_end``, which gives the dropped layers back.
        self.end[trainer.current_epoch] = snapshot(pl_module)
        self.frozen_after[trainer.current_epoch] = frozen_names(pl_module)


# ---------------------------------------------------------------------------------------------- BackboneFinetuning
class BackboneModel(LightningModule):
    """A backbone (four Linear layers and a BatchNorm) and a head: the layout ``BackboneFinetuning`` expects."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(8, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
            nn.Linear(8, 8),
        )
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        # As BackboneFinetuning asks: only what is trainable now; the backbone joins as a new group later.
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return TinyMLP(n=32, batch_size=8).train_dataloader()


BACKBONE_LINEAR = {f"backbone.{i}.{w}" for i in (0, 3, 5, 7) for w in ("weight", "bias")}


@pytest.mark.parametrize("ldb_first", [True, False], ids=["ldb-before-finetuning", "finetuning-before-ldb"])
def test_backbone_finetuning_is_never_fought(ldb_first):
    # Every epoch after 0 is a DROP epoch; BackboneFinetuning unfreezes the backbone at the start of DROP epoch 2.
    ldb = LayerDropBackCallback(drop_rate=0.6, every=1, keep_first=1, keep_last=1, seed=3, batch_scale=1)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=2, backbone_initial_ratio_lr=0.1)
    watch = Watch(ldb)
    model = BackboneModel()
    callbacks = [ldb, finetuning] if ldb_first else [finetuning, ldb]
    trainer = make_trainer(4, callbacks + [watch])
    with pytest.warns(UserWarning, match="already exist within another group"):  # BatchNorm, as without LDB
        trainer.fit(model)

    # While BackboneFinetuning holds the backbone frozen, it is not LDB's to draw; once unfrozen, it is.
    # (Epoch 1: only the head's two layers are trainable, and keep_first/keep_last keep both.)
    assert watch.dropped[1] == set()
    for epoch in (2, 3):
        assert watch.dropped[epoch] & BACKBONE_LINEAR, epoch
    # Before the unfreeze: the backbone stays frozen and still, and LDB never hands it back.
    for epoch in (0, 1):
        assert BACKBONE_LINEAR <= watch.frozen_in_batch[epoch] and BACKBONE_LINEAR <= watch.frozen_after[epoch]
        assert not moved(watch.start[epoch], watch.end[epoch]) & BACKBONE_LINEAR
    # From the unfreeze on: exactly LDB's drops are frozen, inside the backbone too, and everything else trains.
    for epoch in (2, 3):
        assert watch.frozen_in_batch[epoch] == watch.dropped[epoch]
        assert moved(watch.start[epoch], watch.end[epoch]) == set(watch.start[epoch]) - watch.dropped[epoch]
        assert watch.frozen_after[epoch] == set()
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 2  # the group BackboneFinetuning added, and only that one
    # LDB scales the lr only inside step(): the groups hold BackboneFinetuning's schedule (0.1 * 0.1, then x2).
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, pytest.approx(0.02)]
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ several optimizers, manual optimization, precision
class TwoOptimizers(TinyMLP):
    """Manual optimization; the second optimizer owns only ``net.7`` and ``net.9``, the layers LDB may drop."""

    SECOND = ("net.7.", "net.9.")

    def __init__(self) -> None:
        super().__init__(n=32, batch_size=8)
        self.automatic_optimization = False
        self.steps: list[tuple[int, float, float]] = []  # (epoch, effective lr of the first optimizer, its group lr)

    def configure_optimizers(self):
        first = [p for n, p in self.named_parameters() if not n.startswith(self.SECOND)]
        second = [p for n, p in self.named_parameters() if n.startswith(self.SECOND)]
        # Momentum and weight decay on the second: a zero placeholder gradient reaching its step would move weights.
        return torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.05, momentum=0.9, weight_decay=0.1)

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        weight = self.net[-1].weight
        before = weight.detach().clone()
        first.step()
        second.step()
        # Plain SGD: the lr the step used is -delta / grad (the grad is unscaled in place under a GradScaler).
        mask = weight.grad.abs() > 1e-6
        effective = float((-(weight.detach() - before)[mask] / weight.grad[mask]).median())
        self.steps.append((self.current_epoch, effective, first.param_groups[0]["lr"]))


def fp16_with_scaler() -> MixedPrecision:
    # On CPU, precision="16-mixed" turns into bf16-mixed (no scaler); the plugin keeps fp16 and its GradScaler.
    # A small initial scale keeps fp16 from overflowing, so that no step is skipped.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed-scaler"])
def test_manual_optimization_with_an_optimizer_whose_layers_are_all_dropped(precision):
    # drop_rate near 1 with include patterns: on DROP epochs the second optimizer has no parameter left to train,
    # which a GradScaler would refuse ("No inf checks were recorded for this optimizer").
    if precision == "16-mixed-scaler" and not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler (CPU) needs torch >= 2.3")
    ldb = LayerDropBackCallback(drop_rate=0.99, include=["net.7", "net.9"], lr_scale=3.0, seed=0, batch_scale=1)
    watch = Watch(ldb)
    scaler = precision == "16-mixed-scaler"
    kwargs: dict[str, Any] = {"plugins": [fp16_with_scaler()]} if scaler else {"precision": precision}
    model = TwoOptimizers()
    trainer = make_trainer(3, [ldb, watch], **kwargs)
    with pytest.warns(UserWarning, match="one draw can drop every layer an optimizer trains"):
        trainer.fit(model)

    second = {n for n, _ in model.named_parameters() if n.startswith(TwoOptimizers.SECOND)}
    assert watch.dropped[2] == second and watch.frozen_in_batch[2] == second
    for epoch in range(3):
        assert_dropped_still_and_the_rest_trained(watch, epoch)
    assert [e for e, _, _ in model.steps] == [0] * 4 + [1] * 4 + [2] * 4
    for epoch, effective, group_lr in model.steps:
        assert group_lr == 0.1  # the code around step() sees the unscaled lr...
        assert effective == pytest.approx(0.1 * (3.0 if epoch == 2 else 1.0), rel=1e-2)  # ...step() used it x3
    assert all(p.requires_grad and p.grad is None for n, p in model.named_parameters() if n in second)


# ------------------------------------------------------------------ accumulation and clipping
class EffectiveLR(Callback):
    """Plain SGD: the lr each optimizer step really used, from the last layer's weight change and gradient."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, float]] = []  # (epoch, effective lr, scheduled lr)
        self._before: Any = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Read here, outside the step: automatic optimization runs the whole closure (training_step included)
        # inside optimizer.step(), where the lr is scaled.
        self._scheduled = trainer.optimizers[0].param_groups[0]["lr"]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        weight = pl_module.net[-1].weight
        if weight.grad is None:  # no backward (StochasticWeightAveraging's BatchNorm epoch)
            return
        self._before = (weight.detach().clone(), weight.grad.detach().clone(), self._scheduled)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is None:  # a micro-batch that only accumulated
            return
        weight, grad, scheduled = self._before
        self._before = None
        mask = grad.abs() > 1e-6
        effective = float((-(pl_module.net[-1].weight.detach() - weight)[mask] / grad[mask]).median())
        self.steps.append((trainer.current_epoch, effective, scheduled))


def test_gradient_accumulation_steps_once_per_window_with_the_lr_scaled_once():
    ldb = LayerDropBackCallback(drop_rate=0.5, lr_scale=3.0, seed=0, batch_scale=1)
    watch, probe = Watch(ldb), EffectiveLR()
    model = TinyMLP(optimizer="plain_sgd", batch_size=8)  # 8 batches, 4 optimizer steps per epoch
    make_trainer(3, [ldb, watch, probe], accumulate_grad_batches=2).fit(model)

    assert [epoch for epoch, _, _ in probe.steps] == [0] * 4 + [1] * 4 + [2] * 4
    for epoch, effective, scheduled in probe.steps:
        assert scheduled == 0.1 and effective == pytest.approx(0.1 * (3.0 if epoch == 2 else 1.0), rel=1e-3)
    assert watch.dropped[2] and watch.frozen_in_batch[2] == watch.dropped[2]
    for epoch in range(3):
        assert_dropped_still_and_the_rest_trained(watch, epoch)


class UpdateSizes(Callback):
    """Per optimizer step: the largest absolute change of any weight, and the norm of the whole change."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        deltas = [p.detach() - self._before[n] for n, p in pl_module.named_parameters()]
        largest = max(float(d.abs().max()) for d in deltas)
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas)))
        self.steps.append((trainer.current_epoch, largest, norm))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_applies_to_the_kept_gradients_before_the_lr_scale(algorithm):
    # A clip far below every gradient: each plain SGD step then moves the weights by exactly lr * clip (in the
    # largest entry for "value", in norm for "norm"), times lr_scale on the DROP epoch.
    ldb = LayerDropBackCallback(drop_rate=0.5, lr_scale=2.0, seed=0, batch_scale=1)
    watch, sizes = Watch(ldb), UpdateSizes()
    model = TinyMLP(optimizer="plain_sgd")
    trainer = make_trainer(3, [ldb, watch, sizes], gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm)
    trainer.fit(model)

    assert len(sizes.steps) == 12
    for epoch, largest, norm in sizes.steps:
        expected = 0.1 * 1e-3 * (2.0 if epoch == 2 else 1.0)
        assert (largest if algorithm == "value" else norm) == pytest.approx(expected, rel=1e-3)
    assert watch.dropped[2]
    for epoch in range(3):
        assert_dropped_still_and_the_rest_trained(watch, epoch)


# ------------------------------------------------------------------ StochasticWeightAveraging
def test_stochastic_weight_averaging_averages_what_ldb_trained():
    def run(with_ldb):
        ldb = LayerDropBackCallback(drop_rate=0.5, seed=0, batch_scale=1)
        swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=3, annealing_epochs=1)
        watch, probe = Watch(ldb), EffectiveLR()
        model = TinyMLP(optimizer="plain_sgd")
        make_trainer(4, ([ldb] if with_ldb else []) + [swa, watch, probe]).fit(model)
        return model, swa, watch, probe

    model, swa, watch, probe = run(with_ldb=True)
    # SWA (swa_epoch_start counts from 1) averages the weights of epochs 2 and 3 as they start, and loads the
    # average into the model when the extra epoch it adds for BatchNorm statistics (4, a DROP epoch) starts.
    assert sorted(watch.start) == [0, 1, 2, 3, 4]
    dropped = watch.dropped[2]
    assert dropped
    for name, averaged in watch.start[4].items():
        if name in dropped:  # still through DROP epoch 2: its average is exactly the value it kept
            assert torch.equal(averaged, watch.start[2][name]), name
        torch.testing.assert_close(averaged, (watch.start[2][name] + watch.start[3][name]) / 2)
    # SWA's own lr schedule is untouched; LDB scales it inside the DROP epoch's steps only.
    assert [s for _, _, s in probe.steps] == [s for _, _, s in run(with_ldb=False)[3].steps]
    for epoch, effective, scheduled in probe.steps:  # epoch 4 is a DROP epoch too, and SWA steps once in it
        assert effective == pytest.approx(scheduled * (2.0 if epoch in (2, 4) else 1.0), rel=1e-3)
    assert {epoch for epoch, _, _ in probe.steps} == {0, 1, 2, 3, 4}
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in swa._average_model.parameters())


# ------------------------------------------------------------------ torch.compile
class GradsOfDropped(Callback):
    """Names of dropped parameters that hold a gradient right after a backward (there should be none)."""

    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.found: set[str] = set()
        self.backwards_while_dropping = 0

    def on_after_backward(self, trainer, pl_module):
        dropped = params_of_layers(pl_module, self.ldb.dropped_layers)
        self.backwards_while_dropping += bool(dropped)
        params = dict(pl_module.named_parameters())
        self.found.update(name for name in dropped if params[name].grad is not None)


def compile_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "torch.compile" in str(w.message)]


needs_dynamo = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unsupported here")


@needs_dynamo
def test_torch_compile_trains_exactly_like_eager_and_warns_once_about_recompiles():
    torch._dynamo.reset()
    model = TinyMLP()
    eager = copy.deepcopy(model)
    ldb = LayerDropBackCallback(drop_rate=0.5, seed=0, batch_scale=1)
    watch, grads = Watch(ldb), GradsOfDropped(ldb)
    # aot_eager runs AOTAutograd, the part that fixes which inputs get a gradient, without a C++ toolchain.
    with pytest.warns(UserWarning) as record:
        make_trainer(3, [ldb, watch, grads], limit_train_batches=2).fit(torch.compile(model, backend="aot_eager"))
    [message] = compile_warnings(record)
    assert "LightningModule TinyMLP" in message and "recompile_limit" in message
    # The compiled graph is rebuilt for the DROP epoch's trainable set: dropped layers get no gradient...
    assert watch.dropped[2] and grads.backwards_while_dropping == 2 and grads.found == set()
    assert_dropped_still_and_the_rest_trained(watch, 2)
    # ...and the whole run matches the same run uncompiled.
    make_trainer(3, [LayerDropBackCallback(drop_rate=0.5, seed=0, batch_scale=1)], limit_train_batches=2).fit(eager)
    for (name, param), (_, reference) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(param, reference, msg=name)
    assert all(p.requires_grad for p in model.parameters())


@needs_dynamo
@pytest.mark.parametrize("compiled, warns", [("net", True), ("net.15", False)])
def test_compiled_submodule_warns_only_if_it_holds_candidates(compiled, warns):
    model = TinyMLP()
    if compiled == "net":
        model.net = torch.compile(model.net)
    else:  # the last layer, which keep_last=1 never drops
        model.net[15] = torch.compile(model.net[15])
    with pytest.warns(UserWarning) as record:  # max_epochs=0: set up, never compiled or trained
        make_trainer(0, [LayerDropBackCallback(seed=0)]).fit(model)
    assert len(compile_warnings(record)) == int(warns)
    if warns:
        assert "submodule 'net'" in compile_warnings(record)[0]


# ------------------------------------------------------------------ fast_dev_run, max_steps, validation
def test_fast_dev_run_runs_its_batches_and_the_estimate_counts_them():
    # fast_dev_run runs a few batches of epoch 0, a full epoch, so LDB never drops in it.
    ldb = LayerDropBackCallback(seed=0, every=1)
    model = OneCycleMLP()
    trainer = make_trainer(5, [ldb], fast_dev_run=3)
    trainer.fit(model, datamodule=TinyDataModule())
    assert trainer.global_step == model.total_steps == model.scheduler.last_epoch == 3
    assert ldb.mode == "full" and ldb.dropped_layers == () and all(p.requires_grad for p in model.parameters())


def plain_sgd_step_lr(model: TinyMLP, optimizer: torch.optim.Optimizer) -> float:
    """Take one plain-SGD step by hand and return the lr it used (through the last layer's weight change)."""
    x, y = make_dataset(16, seed=5).tensors
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    weight = model.net[-1].weight
    before, grad = weight.detach().clone(), weight.grad.clone()
    optimizer.step()
    mask = grad.abs() > 1e-6
    return float((-(weight.detach() - before)[mask] / grad[mask]).median())


def test_max_steps_stopping_mid_drop_epoch_gives_everything_back():
    ldb = LayerDropBackCallback(drop_rate=0.9, lr_scale=4.0, seed=0, batch_scale=1)
    watch = Watch(ldb)
    model = TinyMLP(optimizer="plain_sgd")
    trainer = make_trainer(10, [ldb, watch], max_steps=10)  # 4 steps per epoch: stops 2 steps into DROP epoch 2
    trainer.fit(model)
    assert trainer.global_step == 10 and len(watch.frozen_each_batch[2]) == 2 and watch.frozen_in_batch[2]
    assert all(p.requires_grad for p in model.parameters()) and ldb.dropped_layers == ()
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert plain_sgd_step_lr(model, optimizer) == pytest.approx(0.1, rel=1e-3)  # LDB's step hooks are gone


class FakeClock:
    """Stands in for ``time`` in the epoch timer: training steps cost 1 s each, validation steps 100 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class ClockedMLP(TinyMLP):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.clock.now += 100.0
        return super().validation_step(batch, batch_idx)


class ValidationBatches(Callback):
    def __init__(self) -> None:
        self.count: dict[int, int] = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.count[trainer.current_epoch] = self.count.get(trainer.current_epoch, 0) + 1


class EpochTimes(Callback):
    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds[trainer.current_epoch] = float(trainer.callback_metrics["ldb/epoch_time"])


def test_validation_inside_a_drop_epoch_keeps_the_draw_and_is_not_timed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    ldb = LayerDropBackCallback(drop_rate=0.5, seed=0, batch_scale=1)
    watch, val = Watch(ldb), ValidationBatches()
    epoch_times = EpochTimes()
    trainer = make_trainer(3, [ldb, watch, val, epoch_times], val_check_interval=0.5, limit_val_batches=2)
    trainer.fit(ClockedMLP(clock))

    # Validation ran twice per epoch, two batches each time, the DROP epoch's first one mid-way through it...
    assert val.count == {0: 4, 1: 4, 2: 4}
    # ...and every training batch of the DROP epoch, before and after it, trained with the same draw.
    assert watch.dropped[2] and all(frozen == watch.dropped[2] for frozen in watch.frozen_each_batch[2])
    assert len(watch.frozen_each_batch[2]) == 4
    assert_dropped_still_and_the_rest_trained(watch, 2)
    # Four 1-second training steps per epoch; the 200 seconds of mid-epoch validation are not counted.
    assert epoch_times.seconds == {0: 4.0, 1: 4.0, 2: 4.0}


# ------------------------------------------------------------------ validate/test, and a second fit
class EvalMLP(TinyMLP):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def test_dataloader(self):
        return self.val_dataloader()


class EvalFlags(Callback):
    """Frozen parameters and the first group's lr, for every validation/test batch outside of fit."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, set[str], float]] = []

    def _record(self, trainer, pl_module):
        if trainer.state.fn != "fit":
            self.seen.append((trainer.state.fn, frozen_names(pl_module), trainer.optimizers[0].param_groups[0]["lr"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, pl_module)


def test_validate_and_test_between_two_fits_with_the_same_callback():
    seed_everything(7)
    model = EvalMLP(optimizer="plain_sgd")
    second_model = copy.deepcopy(model)
    ldb = LayerDropBackCallback(drop_rate=0.5, every=1, batch_scale=1)  # seed from seed_everything
    first, second = Watch(ldb), Watch(ldb)
    evals, probe = EvalFlags(), EffectiveLR()

    trainer = make_trainer(3, [ldb, first, evals], limit_val_batches=2, limit_test_batches=2)
    trainer.fit(model)
    trainer.validate(model)
    trainer.test(model)
    assert [(fn, frozen, lr) for fn, frozen, lr in evals.seen] == [("validate", set(), 0.1)] * 2 + [
        ("test", set(), 0.1)
    ] * 2

    seed_everything(7)
    make_trainer(3, [ldb, second, probe]).fit(second_model)
    assert ldb.seed == 7
    assert second.dropped == first.dropped and second.dropped[1] and second.dropped[2]
    for (name, param), (_, again) in zip(model.named_parameters(), second_model.named_parameters()):
        assert torch.equal(param, again), name  # same draws, and the lr scaled once, not twice
    for epoch, effective, scheduled in probe.steps:
        assert effective == pytest.approx(scheduled * (2.0 if epoch else 1.0), rel=1e-3)


# ------------------------------------------------------------------ ModelCheckpoint(every_n_train_steps=...)
class BatchesPerEpoch(Callback):
    def __init__(self) -> None:
        self.count: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.count[trainer.current_epoch] = self.count.get(trainer.current_epoch, 0) + 1


def short_epoch_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "saved on the last batch of DROP epoch" in str(w.message)]


def test_step_checkpoint_on_the_last_batch_of_a_drop_epoch_resumes_short_and_warns(tmp_path):
    # 40 samples in batches of 8, and of 16 on DROP epochs: 5, 5, 3, 5, 3 batches; step 13 ends DROP epoch 2.
    def trainer_with(*callbacks, **kwargs):
        return make_trainer(5, [LayerDropBackCallback(seed=0, batch_scale=2), *callbacks], **kwargs)

    by_step = ModelCheckpoint(tmp_path / "steps", "{step}", every_n_train_steps=13, save_top_k=-1)
    by_epoch = ModelCheckpoint(tmp_path / "epochs", "{step}", save_top_k=-1)
    full = BatchesPerEpoch()
    with pytest.warns(UserWarning, match=r"every_n_train_steps.*last batch of a DROP epoch"):
        trainer = trainer_with(full, by_step, by_epoch, enable_checkpointing=True)
        trainer.fit(TinyMLP(), datamodule=TinyDataModule(n=40))
    assert full.count == {0: 5, 1: 5, 2: 3, 3: 5, 4: 3}

    # Both checkpoints hold the same state, the end of epoch 2, yet resume differently.
    resumed = {}
    for name, path in (("step", tmp_path / "steps/step=13.ckpt"), ("epoch", tmp_path / "epochs/step=13.ckpt")):
        batches = BatchesPerEpoch()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer_with(batches).fit(TinyMLP(), datamodule=TinyDataModule(n=40), ckpt_path=path)
        resumed[name] = (batches.count, short_epoch_warnings(record))
    assert resumed["epoch"] == ({3: 5, 4: 3}, [])
    # Lightning's miscount, pinned: epoch 3 resumes at batch 3 of 5. If this changes, Lightning fixed it and the
    # warning below can go.
    counts, [message] = resumed["step"]
    assert counts == {3: 2, 4: 3}
    assert "DROP epoch 2 (3 batches)" in message and "epoch 3 runs short by 3 batches" in message
