"""LayerDropBackCallback in real Trainer runs on tiny models."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch
from helpers import TinyMLP, make_trainer, params_of_layers, snapshot
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback

from lightning_ldb import LayerDropBackCallback


class EpochRecorder(Callback):
    """Placed after the LDB callback: sees each epoch's mode and draw, and the weights around it."""

    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.modes: dict[int, str] = {}
        self.dropped: dict[int, tuple[str, ...]] = {}
        self.frozen: dict[int, set[str]] = {}
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}
        self.metrics: dict[int, dict[str, float]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.modes[epoch] = self.ldb.mode
        self.start[epoch] = snapshot(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # LDB applies the epoch's draw before the epoch's first forward.
        if batch_idx == 0:
            epoch = trainer.current_epoch
            self.dropped[epoch] = self.ldb.dropped_layers
            self.frozen[epoch] = {n for n, p in pl_module.named_parameters() if not p.requires_grad}

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.end[epoch] = snapshot(pl_module)
        self.metrics[epoch] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("ldb/")}


def fit(max_epochs=5, model=None, recorder=True, **ldb_kwargs):
    ldb_kwargs.setdefault("batch_scale", 1)
    ldb_kwargs.setdefault("seed", 0)
    ldb = LayerDropBackCallback(**ldb_kwargs)
    rec = EpochRecorder(ldb)
    model = model or TinyMLP()
    trainer = make_trainer(max_epochs, [ldb, rec] if recorder else [ldb])
    trainer.fit(model)
    return model, ldb, rec, trainer


def test_drop_schedule_and_metrics_per_epoch():
    _, ldb, rec, _ = fit(max_epochs=7, every=3, drop_rate=0.5)
    assert rec.modes == {e: ("drop" if e in (3, 6) else "full") for e in range(7)}
    for epoch in range(7):
        drop = epoch in (3, 6)
        assert bool(rec.dropped[epoch]) == drop
        assert rec.metrics[epoch]["ldb/drop_epoch"] == float(drop)
        assert rec.metrics[epoch]["ldb/lr_scale"] == (2.0 if drop else 1.0)
        assert (rec.metrics[epoch]["ldb/dropped_fraction"] > 0) == drop
        assert rec.metrics[epoch]["ldb/epoch_time"] > 0
    assert ldb.dropped_layers == ()  # released after the last DROP epoch


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_dropped_parameters_are_bitwise_unchanged_and_kept_ones_move(optimizer):
    # SGD with momentum and weight decay, and AdamW: both would move a parameter with a zero-tensor grad.
    model, _, rec, _ = fit(max_epochs=5, model=TinyMLP(optimizer=optimizer, lr=0.05), drop_rate=0.5)
    for epoch in (2, 4):
        dropped = set(params_of_layers(model, rec.dropped[epoch]))
        assert dropped and rec.frozen[epoch] == dropped
        for name, before in rec.start[epoch].items():
            unchanged = torch.equal(before, rec.end[epoch][name])
            assert unchanged == (name in dropped), f"epoch {epoch}: {name} unchanged={unchanged}"


def test_keep_first_and_keep_last_are_never_dropped():
    model, ldb, rec, _ = fit(max_epochs=9, drop_rate=0.95, every=1, keep_first=4, keep_last=1)
    layers = ["net.0", "net.1", "net.3", "net.5", "net.7", "net.9", "net.11", "net.13", "net.15"]
    assert ldb.candidate_layers == tuple(layers[4:-1])
    ever_dropped = {name for e in rec.dropped for name in rec.dropped[e]}
    assert ever_dropped <= set(layers[4:-1]) and len(ever_dropped) >= 3


def test_include_and_exclude_patterns_choose_candidates():
    _, ldb, _, _ = fit(max_epochs=1, keep_first=0, keep_last=0, include=["net.1*", "net.[35]"], exclude=["net.13"])
    assert ldb.candidate_layers == ("net.1", "net.3", "net.5", "net.11", "net.15")


def test_layer_frozen_by_the_user_stays_frozen_and_still():
    model = TinyMLP()
    model.net[9].requires_grad_(False)
    frozen_weights = snapshot(model.net[9])
    _, _, rec, _ = fit(max_epochs=5, model=model, drop_rate=0.9, every=1)
    assert all({"net.9.weight", "net.9.bias"} <= rec.frozen[e] for e in range(5))
    assert not any(p.requires_grad for p in model.net[9].parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("net.9."))
    assert all(torch.equal(frozen_weights[n], p) for n, p in model.net[9].named_parameters())


def test_flags_restored_after_fit():
    model, _, rec, _ = fit(max_epochs=3, drop_rate=0.9)
    assert rec.frozen[2]  # something was dropped on the last epoch...
    assert all(p.requires_grad for p in model.parameters())  # ...and given back


class FailingMLP(TinyMLP):
    def __init__(self, exception: type[BaseException], **kwargs):
        super().__init__(**kwargs)
        self.exception = exception
        self.lr_at_failure = None

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 2 and batch_idx == 1:
            self.frozen_at_failure = [n for n, p in self.named_parameters() if not p.requires_grad]
            raise self.exception("boom")
        return super().training_step(batch, batch_idx)


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after catching one
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_flags_restored_after_an_exception_mid_drop_epoch(exception, restore_sigint):
    model = FailingMLP(exception)
    model.net[0].requires_grad_(False)  # the user's own choice survives too
    ldb = LayerDropBackCallback(drop_rate=0.9, seed=0, batch_scale=1)
    trainer = make_trainer(5, [ldb])
    # Lightning turns Ctrl-C into a graceful shutdown that exits the process.
    with pytest.raises(SystemExit if exception is KeyboardInterrupt else RuntimeError):
        trainer.fit(model)
    assert model.frozen_at_failure  # the failure hit while layers were dropped
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"net.0.weight", "net.0.bias"}
    assert ldb.dropped_layers == ()


class LRProbe(Callback):
    """Measures the effective learning rate of the last layer from weight deltas under plain SGD."""

    def __init__(self):
        self.effective: list[tuple[int, float]] = []
        self.scheduled: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layer = pl_module.net[-1]
        self._weight, self._grad = layer.weight.detach().clone(), layer.weight.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        delta = pl_module.net[-1].weight.detach() - self._weight
        mask = self._grad.abs() > 1e-6
        lr = float((-delta[mask] / self._grad[mask]).median())
        self.effective.append((trainer.current_epoch, lr))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.scheduled.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("scheduler", ["cosine", "lambda_step"])
def test_effective_lr_is_scaled_while_the_schedule_is_untouched(scheduler):
    def run(with_ldb):
        probe = LRProbe()
        callbacks = [LayerDropBackCallback(lr_scale=3.0, seed=0, batch_scale=1)] if with_ldb else []
        model = TinyMLP(optimizer="plain_sgd", lr=0.1, scheduler=scheduler)
        make_trainer(5, callbacks + [probe]).fit(model)
        return probe

    ldb, plain = run(True), run(False)
    assert ldb.scheduled == plain.scheduled  # the scheduler never sees the scale
    for (epoch, effective), scheduled in zip(ldb.effective, ldb.scheduled):
        expected = scheduled * (3.0 if epoch in (2, 4) else 1.0)
        assert effective == pytest.approx(expected, rel=1e-3), f"epoch {epoch}"


def test_global_rng_streams_are_untouched():
    def run(with_ldb):
        seed_everything(123)
        model = TinyMLP()
        callbacks = [LayerDropBackCallback(drop_rate=0.5, batch_scale=1)] if with_ldb else []
        make_trainer(5, callbacks).fit(model)
        return torch.rand(3), random.random(), np.random.rand()

    (t1, p1, n1), (t2, p2, n2) = run(True), run(False)
    assert torch.equal(t1, t2) and p1 == p2 and n1 == n2


class StepRecorder(Callback):
    def __init__(self, ldb):
        self.ldb = ldb
        self.draws: list[tuple[int, int, tuple[str, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.draws.append((trainer.current_epoch, trainer.global_step, self.ldb.dropped_layers))


def test_resample_step_draws_per_optimizer_step_shared_by_micro_batches():
    def run():
        ldb = LayerDropBackCallback(drop_rate=0.5, resample="step", seed=0, batch_scale=1)
        rec = StepRecorder(ldb)
        make_trainer(3, [ldb, rec], accumulate_grad_batches=2).fit(TinyMLP(batch_size=8))
        return rec.draws

    draws = run()
    drop_epoch = [(step, dropped) for epoch, step, dropped in draws if epoch == 2]
    by_step: dict[int, set] = {}
    for step, dropped in drop_epoch:
        by_step.setdefault(step, set()).add(dropped)
    assert len(drop_epoch) == 8 and len(by_step) == 4  # 8 micro-batches, 4 optimizer steps
    assert all(len(d) == 1 for d in by_step.values())  # micro-batches of one step share the draw
    assert len({next(iter(d)) for d in by_step.values()}) > 1  # and steps draw anew
    assert all(dropped == () for epoch, _, dropped in draws if epoch != 2)
    assert draws == run()  # reproducible


def test_granularity_parameter_drops_single_tensors():
    model, ldb, rec, _ = fit(max_epochs=3, granularity="parameter", drop_rate=0.5, keep_first=4, keep_last=2)
    names = [n for n, _ in model.named_parameters()]
    assert ldb.candidate_layers == tuple(names[4:-2])
    dropped = rec.dropped[2]
    assert dropped and set(dropped) == rec.frozen[2]
    for name in names:
        assert torch.equal(rec.start[2][name], rec.end[2][name]) == (name in dropped)


def test_drop_rate_zero_drops_nothing_but_still_scales_the_lr():
    _, _, rec, _ = fit(max_epochs=3, drop_rate=0.0)
    assert rec.dropped[2] == () and rec.metrics[2]["ldb/lr_scale"] == 2.0


def test_no_candidate_layer_fails_in_setup():
    ldb = LayerDropBackCallback(keep_first=8, keep_last=1, batch_scale=1)
    with pytest.raises(ValueError, match="no candidate layer.*keep_first=8"):
        make_trainer(1, [ldb]).fit(TinyMLP())


def test_warns_once_that_the_batch_stays_unscaled_without_the_mixin():
    with pytest.warns(UserWarning, match="batch_scale=2.*LDBDataModuleMixin"):
        make_trainer(1, [LayerDropBackCallback(seed=0)]).fit(TinyMLP())


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"drop_rate": 1.0}, ValueError, "drop_rate"),
        ({"drop_rate": -0.1}, ValueError, "drop_rate"),
        ({"drop_rate": "0.3"}, TypeError, "drop_rate"),
        ({"every": 0}, ValueError, "every"),
        ({"every": 2.0}, TypeError, "every"),
        ({"lr_scale": 0}, ValueError, "lr_scale"),
        ({"lr_scale": None}, TypeError, "lr_scale"),
        ({"batch_scale": 0}, ValueError, "batch_scale"),
        ({"batch_scale": 1.5}, TypeError, "batch_scale"),
        ({"keep_first": -1}, ValueError, "keep_first"),
        ({"keep_last": True}, TypeError, "keep_last"),
        ({"resample": "batch"}, ValueError, "resample"),
        ({"granularity": "block"}, ValueError, "granularity"),
        ({"seed": -3}, ValueError, "seed"),
        ({"include": [""]}, TypeError, "include"),
        ({"exclude": 3}, TypeError, "exclude"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        LayerDropBackCallback(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)
