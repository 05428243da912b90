"""DROP-epoch batch size (LDBDataModuleMixin) and true step accounting (estimated_stepping_batches)."""

from __future__ import annotations

import json

import pytest
from helpers import OneCycleMLP, TinyDataModule, TinyMLP, make_dataset, make_trainer
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_ldb import LayerDropBackCallback, LDBDataModuleMixin
from lightning_ldb.batching import optimizer_steps_per_epoch


class BatchSizes(Callback):
    def __init__(self):
        self.train: dict[int, list[int]] = {}
        self.val: dict[int, list[int]] = {}
        self.steps: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.setdefault(trainer.current_epoch, []).append(len(batch[0]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.setdefault(trainer.current_epoch, []).append(len(batch[0]))

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps[trainer.current_epoch] = trainer.global_step


class CountingDataModule(TinyDataModule):
    """Counts how often Lightning builds each loader."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.built = {"train": [], "val": 0}

    def train_dataloader(self):
        self.built["train"].append(self.trainer.current_epoch)
        return super().train_dataloader()

    def val_dataloader(self):
        self.built["val"] += 1
        return super().val_dataloader()


def test_datamodule_mixin_scales_drop_epochs_only_and_leaves_validation_alone():
    sizes = BatchSizes()
    trainer = make_trainer(5, [LayerDropBackCallback(seed=0, batch_scale=2), sizes], limit_val_batches=None)
    datamodule = CountingDataModule(batch_size=8, n=40)
    trainer.fit(TinyMLP(), datamodule=datamodule)
    full, drop = [8] * 5, [16, 16, 8]
    assert sizes.train == {0: full, 1: full, 2: drop, 3: full, 4: drop}
    assert all(v == [8] * 4 for v in sizes.val.values()) and len(sizes.val) == 5
    assert sizes.steps == {0: 5, 1: 10, 2: 13, 3: 18, 4: 21}
    # The train loader is rebuilt only where the batch size changes, the validation loader never; the second
    # build at epoch 0 is the check of the DROP-epoch loader before training (built, never read).
    assert datamodule.built == {"train": [0, 0, 2, 3, 4], "val": 1}
    assert trainer.reload_dataloaders_every_n_epochs == 0  # the user's setting, back after fit
    assert not hasattr(datamodule, "_ldb_batch_schedule")  # the fit's schedule went with it


class MixinMLP(LDBDataModuleMixin, TinyMLP):
    """The mixin before a LightningModule whose own train_dataloader reads self.hparams.batch_size."""


def test_mixin_on_a_lightning_module_using_hparams_batch_size():
    sizes = BatchSizes()
    model = MixinMLP(batch_size=4, n=32)
    make_trainer(3, [LayerDropBackCallback(seed=0, batch_scale=4), sizes]).fit(model)
    assert sizes.train == {0: [4] * 8, 1: [4] * 8, 2: [16] * 2}
    assert model.hparams.batch_size == 4  # restored: checkpoints keep the user's value


class HelperDataModule(LDBDataModuleMixin, LightningDataModule):
    """No ``batch_size`` attribute: the loader asks the helper itself."""

    def train_dataloader(self):
        return DataLoader(make_dataset(24), batch_size=self.ldb_batch_size(6))


class NoBatchSizeDataModule(LDBDataModuleMixin, LightningDataModule):
    def train_dataloader(self):
        return DataLoader(make_dataset(24), batch_size=6)


def test_helper_serves_loaders_built_another_way():
    sizes = BatchSizes()
    make_trainer(3, [LayerDropBackCallback(seed=0, batch_scale=3), sizes]).fit(TinyMLP(), datamodule=HelperDataModule())
    assert sizes.train == {0: [6] * 4, 1: [6] * 4, 2: [18, 6]}


def test_no_discoverable_batch_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"self\.batch_size or self\.hparams\.batch_size.*ldb_batch_size"):
        make_trainer(3, [LayerDropBackCallback(seed=0)]).fit(TinyMLP(), datamodule=NoBatchSizeDataModule())


@pytest.mark.parametrize(
    "trainer_kwargs, data_kwargs",
    [
        ({}, {}),
        ({"accumulate_grad_batches": 2}, {}),
        ({"limit_train_batches": 4}, {}),
        ({"limit_train_batches": 0.5}, {}),
        ({}, {"drop_last": True}),
        ({"max_steps": 17}, {}),
        ({"accumulate_grad_batches": 3, "limit_train_batches": 0.7}, {"drop_last": True, "n": 45}),
    ],
)
def test_estimate_is_exact_and_one_cycle_completes(trainer_kwargs, data_kwargs):
    model = OneCycleMLP()
    data = TinyDataModule(**{"batch_size": 4, "n": 42, **data_kwargs})
    trainer = make_trainer(6, [LayerDropBackCallback(seed=0, every=2)], **trainer_kwargs)
    trainer.fit(model, datamodule=data)
    assert model.total_steps == trainer.global_step
    assert model.scheduler.last_epoch == model.total_steps  # OneCycleLR stepped exactly total_steps times
    if "max_steps" not in trainer_kwargs:
        assert model.total_steps < trainer.estimated_stepping_batches or trainer_kwargs.get("limit_train_batches") == 4


def test_estimate_falls_back_to_lightning_without_batch_scaling():
    model = OneCycleMLP()
    trainer = make_trainer(4, [LayerDropBackCallback(seed=0, batch_scale=1)])
    trainer.fit(model)
    assert model.total_steps == trainer.global_step == 16


def test_steps_per_epoch_arithmetic():
    assert optimizer_steps_per_epoch(42, 4, False, 1.0, 1) == 11
    assert optimizer_steps_per_epoch(42, 8, True, 1.0, 1) == 5
    assert optimizer_steps_per_epoch(42, 4, False, 4, 3) == 2
    assert optimizer_steps_per_epoch(42, 4, False, 0.5, 2) == 3  # int(11 * 0.5) = 5 batches -> 3 steps


class RecordPerRank(Callback):
    def __init__(self, path):
        self.path = path
        self.sizes: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.setdefault(trainer.current_epoch, []).append(len(batch[0]))

    def on_train_end(self, trainer, pl_module):
        record = {"sizes": self.sizes, "estimate": pl_module.total_steps, "steps": trainer.global_step}
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.timeout(180)
def test_per_device_batch_is_scaled_under_ddp_spawn(tmp_path):
    trainer = make_trainer(
        3, [LayerDropBackCallback(seed=0), RecordPerRank(tmp_path)], strategy="ddp_spawn", devices=2
    )
    trainer.fit(OneCycleMLP(), datamodule=TinyDataModule(batch_size=4, n=40))
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # 20 samples per device: 5 batches of 4 on full epochs, 3 of 8 (the last one short) on the DROP epoch.
        assert record["sizes"] == {"0": [4] * 5, "1": [4] * 5, "2": [8, 8, 4]}
        assert record["estimate"] == record["steps"] == 13
