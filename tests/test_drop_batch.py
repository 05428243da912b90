"""The DROP batch: batch-counted loop settings follow it, mixin misuse fails before training, and
``batch_scaling="accumulate"`` takes it as gradient accumulation."""

from __future__ import annotations

import contextlib
import json
import random
import sys

import lightning
import pytest
import torch
from helpers import OneCycleMLP, TinyDataModule, TinyMLP, make_dataset, make_trainer
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader

import lightning_ldb.batching
from lightning_ldb import LayerDropBackCallback, LDBDataModuleMixin


class LoopLog(Callback):
    """Per epoch: the batch sizes, the batch index of each validation, and the trainer's accumulation per step."""

    def __init__(self, ldb: LayerDropBackCallback | None = None) -> None:
        self.ldb = ldb
        self.sizes: dict[int, list[int]] = {}
        self.validated_after: dict[int, list[int]] = {}
        self.accumulate: dict[int, set[int]] = {}
        self.steps: dict[int, int] = {}
        self.draws: list[tuple[int, int, tuple[str, ...]]] = []  # (epoch, global_step, dropped layers)
        self._start_step = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.setdefault(trainer.current_epoch, []).append(len(batch[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.accumulate.setdefault(trainer.current_epoch, set()).add(trainer.accumulate_grad_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.ldb is not None:
            self.draws.append((trainer.current_epoch, trainer.global_step, self.ldb.dropped_layers))

    def on_validation_start(self, trainer, pl_module):
        if trainer.training or trainer.state.fn == "fit":
            self.validated_after.setdefault(trainer.current_epoch, []).append(trainer.fit_loop.epoch_loop.batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps[trainer.current_epoch] = trainer.global_step - self._start_step


class FailAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise RuntimeError("boom")


# ---------------------------------------------------------------------------------------------- 3: loop settings
def test_integer_val_check_interval_follows_the_drop_batch():
    # 40 samples in batches of 8: 5 batches on full epochs, 3 of 16 on DROP epochs. Lightning refuses an interval of
    # 4 batches on the DROP epoch unless it becomes 2: validation after 32 samples on every epoch.
    log = LoopLog()
    trainer = make_trainer(5, [LayerDropBackCallback(seed=0), log], limit_val_batches=None, val_check_interval=4)
    trainer.fit(TinyMLP(), datamodule=TinyDataModule(batch_size=8, n=40))
    assert log.sizes[2] == [16, 16, 8]
    assert log.validated_after == {0: [3], 1: [3], 2: [1], 3: [3], 4: [1]}  # batch index 3 = 4 batches of 8
    assert trainer.val_check_interval == 4 and trainer.limit_train_batches == 1.0  # the user's, after the fit


def test_batch_counted_settings_are_put_back_after_a_failed_drop_epoch():
    trainer = make_trainer(
        4, [LayerDropBackCallback(seed=0), FailAt(epoch=2)], limit_val_batches=None, val_check_interval=4,
        limit_train_batches=5,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyMLP(), datamodule=TinyDataModule(batch_size=8, n=40))
    assert (trainer.val_check_interval, trainer.limit_train_batches) == (4, 5)


def test_val_check_interval_across_epochs_is_left_alone():
    # check_val_every_n_epoch=None: the interval counts batches across epochs, may exceed one, and is not scaled.
    log = LoopLog()
    trainer = make_trainer(
        3, [LayerDropBackCallback(seed=0), log], limit_val_batches=None, val_check_interval=6,
        check_val_every_n_epoch=None,
    )
    trainer.fit(TinyMLP(), datamodule=TinyDataModule(batch_size=8, n=40))
    assert log.validated_after == {1: [0], 2: [1]}  # batches 6 and 12 overall, unscaled on the DROP epoch
    assert trainer.val_check_interval == 6


# ---------------------------------------------------------------------------------------------- 4: mixin misuse
class BuiltInSetup(LDBDataModuleMixin, LightningDataModule):
    """The misuse: the loader is built once, so DROP epochs would load the unscaled batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 8

    def setup(self, stage: str) -> None:
        self.loader = DataLoader(make_dataset(40), batch_size=self.batch_size)

    def train_dataloader(self):
        return self.loader


def test_a_loader_built_in_setup_fails_before_the_first_batch():
    log = LoopLog()
    trainer = make_trainer(3, [LayerDropBackCallback(seed=0), log])
    with pytest.raises(ValueError, match=r"from 8 to 16 .* batch_size=8.*not once in setup\(\)"):
        trainer.fit(TinyMLP(), datamodule=BuiltInSetup())
    assert log.sizes == {} and trainer.global_step == 0
    assert trainer.reload_dataloaders_every_n_epochs == 0 and trainer.limit_train_batches == 1.0


def test_no_check_when_no_drop_epoch_runs():
    # every=2 with max_epochs=2: no DROP epoch, nothing to check, the fit trains normally.
    trainer = make_trainer(2, [LayerDropBackCallback(seed=0)])
    trainer.fit(TinyMLP(), datamodule=BuiltInSetup())
    assert trainer.current_epoch == 2


class SeveralLoaders(LDBDataModuleMixin, LightningDataModule):
    def __init__(self, kind: str, fixed: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.kind, self.fixed = 8, kind, fixed

    def train_dataloader(self):
        a = DataLoader(make_dataset(40), batch_size=self.batch_size)
        b = DataLoader(make_dataset(40, seed=1), batch_size=self.fixed or self.batch_size)
        if self.kind == "dict":
            return {"a": a, "b": b}
        if self.kind == "list":
            return [a, b]
        return CombinedLoader({"a": a, "b": b}, mode="max_size_cycle")


class TwoLoaderMLP(TinyMLP):
    def training_step(self, batch, batch_idx):
        parts = batch.values() if isinstance(batch, dict) else batch
        return sum(super(TwoLoaderMLP, self).training_step(part, batch_idx) for part in parts)


@pytest.mark.parametrize("kind, where", [("dict", r"\['b'\]"), ("list", r"\[1\]"), ("combined", r"\['b'\]")])
def test_every_loader_of_several_is_checked(kind, where):
    trainer = make_trainer(3, [LayerDropBackCallback(seed=0)])
    with pytest.raises(ValueError, match=rf"a loader at {where} with batch_size=8"):
        trainer.fit(TwoLoaderMLP(), datamodule=SeveralLoaders(kind, fixed=8))
    assert trainer.global_step == 0


def test_several_loaders_built_from_the_batch_size_train_scaled():
    sizes: dict[int, set[tuple[int, int]]] = {}

    class Sizes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.setdefault(trainer.current_epoch, set()).add(tuple(len(part[0]) for part in batch.values()))

    make_trainer(3, [LayerDropBackCallback(seed=0), Sizes()]).fit(TwoLoaderMLP(), datamodule=SeveralLoaders("dict"))
    assert sizes[0] == {(8, 8)} and sizes[2] == {(16, 16), (8, 8)}  # 40 = 16 + 16 + 8


class RandomDataModule(TinyDataModule):
    """Draws from every global generator while building the loader, and shuffles: what the check must not shift."""

    def train_dataloader(self):
        keep = torch.randperm(self.n)[: self.n - 8 + random.randrange(2)].tolist()
        __import__("numpy").random.rand()
        data = torch.utils.data.Subset(make_dataset(self.n), keep)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)


def _fit_random(monkeypatch, check: bool):
    if not check:
        monkeypatch.setattr(lightning_ldb.batching, "check_drop_epoch_loader", lambda source, epoch: None)
    lightning.seed_everything(3)
    batches: list[torch.Tensor] = []

    class Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append(batch[0].clone())

    model = TinyMLP(optimizer="plain_sgd")
    make_trainer(3, [LayerDropBackCallback(seed=0), Batches()]).fit(model, datamodule=RandomDataModule(batch_size=8))
    monkeypatch.undo()
    return batches, model


def test_the_check_changes_nothing_the_epochs_load_or_train(monkeypatch):
    with_check, checked_model = _fit_random(monkeypatch, check=True)
    without, model = _fit_random(monkeypatch, check=False)
    assert len(with_check) == len(without) and all(torch.equal(a, b) for a, b in zip(with_check, without))
    for a, b in zip(checked_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- 5: accumulate
def test_batch_scaling_is_validated():
    with pytest.raises(ValueError, match=r"`batch_scaling` must be one of \['loader', 'accumulate'\], got 'memory'"):
        LayerDropBackCallback(batch_scaling="memory")
    with pytest.raises(TypeError, match="batch_scaling"):
        LayerDropBackCallback(batch_scaling=2)


class NoBatchNormMLP(TinyMLP):
    """TinyMLP without its BatchNorm: the gradient of a batch is then the mean of its micro-batches' gradients."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[1] = nn.Identity()


@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_accumulate_trains_the_same_weights_as_the_larger_loader_batch(resample):
    def fit(scaling: str):
        torch.manual_seed(0)
        model = NoBatchNormMLP(optimizer="plain_sgd", lr=0.05, batch_size=8, n=64)
        ldb = LayerDropBackCallback(drop_rate=0.5, seed=1, resample=resample, batch_scaling=scaling)
        log = LoopLog(ldb)
        # The loader scaling needs the mixin; accumulation trains from the LightningModule's own loader.
        datamodule = TinyDataModule(batch_size=8, n=64) if scaling == "loader" else None
        trainer = make_trainer(3, [ldb, log])
        trainer.fit(model, datamodule=datamodule)
        return model, log, trainer

    loader, loader_log, _ = fit("loader")
    accumulated, log, trainer = fit("accumulate")
    assert loader_log.sizes[2] == [16] * 4 and log.sizes[2] == [8] * 8  # memory: full-epoch batches
    assert log.steps == loader_log.steps == {0: 8, 1: 8, 2: 4}  # steps per DROP epoch halve
    assert log.accumulate == {0: {1}, 1: {1}, 2: {2}} and trainer.accumulate_grad_batches == 1
    assert any(d for _, _, d in log.draws)  # layers were dropped
    for (name, a), b in zip(loader.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_step_draws_are_shared_by_the_micro_batches_of_a_step():
    ldb = LayerDropBackCallback(drop_rate=0.5, seed=1, resample="step", batch_scaling="accumulate")
    log = LoopLog(ldb)
    make_trainer(3, [ldb, log]).fit(TinyMLP(batch_size=4, n=64))
    drop = [(step, dropped) for epoch, step, dropped in log.draws if epoch == 2]
    assert len(drop) == 16  # 16 micro-batches, 8 steps
    pairs = [drop[i : i + 2] for i in range(0, 16, 2)]
    # global_step moves after the second micro-batch's step; both micro-batches ran under one draw.
    assert all(first[1] == second[1] and second[0] == first[0] + 1 for first, second in pairs)
    assert len({first[1] for first, _ in pairs}) > 1  # a new draw per step


def test_the_users_accumulation_is_multiplied_and_put_back():
    log = LoopLog()
    trainer = make_trainer(4, [LayerDropBackCallback(seed=0, batch_scaling="accumulate"), log], accumulate_grad_batches=3)
    trainer.fit(TinyMLP(batch_size=4, n=48))
    assert log.accumulate == {0: {3}, 1: {3}, 2: {6}, 3: {3}}
    assert log.steps == {0: 4, 1: 4, 2: 2, 3: 4}  # 12 batches
    assert trainer.accumulate_grad_batches == 3


def test_accumulation_is_put_back_after_a_failed_drop_epoch():
    trainer = make_trainer(
        4, [LayerDropBackCallback(seed=0, batch_scaling="accumulate"), FailAt(epoch=2)], accumulate_grad_batches=3
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyMLP(batch_size=4, n=48))
    assert trainer.accumulate_grad_batches == 3


@pytest.mark.parametrize(
    "trainer_kwargs, model_kwargs",
    [
        ({}, {}),
        ({"accumulate_grad_batches": 3}, {}),
        ({"limit_train_batches": 5}, {}),
        ({"limit_train_batches": 0.7, "accumulate_grad_batches": 2}, {"n": 45}),
        ({"max_steps": 17}, {}),
    ],
)
def test_estimate_is_exact_with_accumulation(trainer_kwargs, model_kwargs):
    model = OneCycleMLP(**{"batch_size": 4, "n": 42, **model_kwargs})
    trainer = make_trainer(6, [LayerDropBackCallback(seed=0, batch_scaling="accumulate")], **trainer_kwargs)
    trainer.fit(model)
    assert model.total_steps == trainer.global_step
    assert model.scheduler.last_epoch == model.total_steps


def test_accumulate_needs_no_mixin_and_leaves_a_mixin_unscaled():
    # A mixin DataModule under batch_scaling="accumulate" loads the base batch on every epoch, with no warning.
    log = LoopLog()
    ldb = LayerDropBackCallback(seed=0, batch_scaling="accumulate")
    with _no_ldb_warning():
        make_trainer(3, [ldb, log]).fit(TinyMLP(), datamodule=TinyDataModule(batch_size=8, n=40))
    assert log.sizes[2] == [8] * 5 and log.steps[2] == 3 and not ldb.batch_scaling_active


class _no_ldb_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.records if "LayerDropBack" in str(w.message)], [str(w.message) for w in self.records]


class ManualMLP(TinyMLP):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_accumulate_refuses_manual_optimization():
    trainer = make_trainer(3, [LayerDropBackCallback(seed=0, batch_scaling="accumulate")])
    with pytest.raises(ValueError, match=r"batch_scaling='accumulate'.*automatic optimization.*ManualMLP"):
        trainer.fit(ManualMLP())
    assert trainer.global_step == 0


def test_batch_scaling_is_in_the_checkpoint_config():
    ldb = LayerDropBackCallback(seed=0, batch_scaling="accumulate")
    assert ldb.state_dict()["config"]["batch_scaling"] == "accumulate"
    with pytest.warns(UserWarning, match=r"batch_scaling: 'accumulate' -> 'loader'"):
        LayerDropBackCallback(seed=0).load_state_dict(ldb.state_dict())


def test_cli_takes_batch_scaling(monkeypatch, capsys):
    pytest.importorskip("jsonargparse")
    from test_cli import print_config

    monkeypatch.setattr(sys, "argv", ["ldb"])  # LightningCLI warns about pytest's own arguments otherwise

    config = print_config(
        [
            "--model=ImageClassifier",
            "--data=DigitsDataModule",
            "--trainer.callbacks+=LayerDropBackCallback",
            "--trainer.callbacks.batch_scaling=accumulate",
        ],
        capsys,
    )
    (callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LayerDropBackCallback")]
    assert callback["init_args"]["batch_scaling"] == "accumulate"


def test_accumulation_composes_with_gradient_accumulation_scheduler():
    # The scheduler writes its value at each epoch start; LDB multiplies whatever value the epoch starts with.
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    log = LoopLog()
    scheduler = GradientAccumulationScheduler({0: 1, 3: 2})
    trainer = make_trainer(5, [LayerDropBackCallback(seed=0, batch_scaling="accumulate"), scheduler, log])
    trainer.fit(TinyMLP(batch_size=4, n=48))
    assert log.accumulate == {0: {1}, 1: {1}, 2: {2}, 3: {2}, 4: {4}}


class CountingDDP(DDPStrategy):
    """Counts the micro-batches whose backward skips DDP's all-reduce (``no_sync``), per epoch."""

    def __init__(self) -> None:
        super().__init__(start_method="spawn")
        self.unsynced: dict[int, int] = {}

    @contextlib.contextmanager
    def block_backward_sync(self):
        epoch = self.lightning_module.trainer.current_epoch
        self.unsynced[epoch] = self.unsynced.get(epoch, 0) + 1
        with super().block_backward_sync():
            yield


class RecordRank(Callback):
    def __init__(self, path) -> None:
        self.path = path
        self.epochs = LoopLog()

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        record = {
            "steps": self.epochs.steps,
            "unsynced": trainer.strategy.unsynced,
            "weights": [p.detach().tolist() for p in pl_module.parameters()],
        }
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.timeout(240)
def test_drop_epoch_all_reduces_once_per_step_under_ddp_spawn(tmp_path):
    ldb = LayerDropBackCallback(seed=0, drop_rate=0.5, batch_scaling="accumulate")
    trainer = make_trainer(3, [ldb, RecordRank(tmp_path)], strategy=CountingDDP(), devices=2)
    trainer.fit(TinyMLP(batch_size=4, n=64))  # 32 samples per rank: 8 micro-batches per epoch
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["steps"] == {"0": 8, "1": 8, "2": 4}
        # Full epochs all-reduce every batch; the DROP epoch skips it on the first micro-batch of each step.
        assert record["unsynced"] == {"2": 4}
    assert records[0]["weights"] == records[1]["weights"]  # every step's gradient was all-reduced
