"""A resumed run reproduces the uninterrupted run bit for bit (CPU, deterministic data)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import TinyDataModule, TinyMLP, make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ldb import LayerDropBackCallback


class DrawLog(Callback):
    """Which layers were dropped at every training batch."""

    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.by_step: dict[int, tuple[int, tuple[str, ...]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.by_step[trainer.global_step] = (len(batch[0]), self.ldb.dropped_layers)


# (data, step of a checkpoint in the middle of the DROP epoch 2)
#  - the LightningModule's own loader, 64 samples in batches of 16: epoch 2 holds steps 8..11;
#  - the mixin with batch_scale=2, 40 samples in batches of 4: DROP epoch 2 holds steps 20..24;
#  - the own loader in batches of 8 with batch_scaling="accumulate": DROP epoch 2 holds steps 16..19, of two
#    batches each.
SETUPS = {"own_loader": (None, 9), "batch_scaling": (dict(batch_size=4, n=40), 22), "accumulate": (None, 17)}


def run(tmp_path, resample, setup, max_epochs=5, ckpt_path=None):
    data_kwargs, mid_drop_step = SETUPS[setup]
    accumulate = setup == "accumulate"
    ldb = LayerDropBackCallback(
        drop_rate=0.5,
        resample=resample,
        seed=7,
        batch_scale=2 if data_kwargs or accumulate else 1,
        batch_scaling="accumulate" if accumulate else "loader",
    )
    log = DrawLog(ldb)
    checkpoints = [
        ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}", save_top_k=-1, every_n_epochs=1),
        ModelCheckpoint(dirpath=tmp_path, filename="mid-{step}", save_top_k=-1, every_n_train_steps=mid_drop_step),
    ]
    model = TinyMLP(optimizer="sgd", lr=0.05, scheduler="cosine", batch_size=8 if accumulate else 16)
    trainer = make_trainer(
        max_epochs,
        [ldb, log, *(checkpoints if ckpt_path is None else [])],
        enable_checkpointing=ckpt_path is None,
        default_root_dir=tmp_path,
    )
    datamodule = TinyDataModule(**data_kwargs) if data_kwargs else None
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, log, mid_drop_step


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, resample, setup):
    # With batch_scale=2 and step-triggered checkpoints LDB warns that one on a DROP epoch's last batch resumes short.
    short = "a checkpoint saved on the last batch of a DROP epoch"
    with pytest.warns(UserWarning, match=short) if setup == "batch_scaling" else contextlib.nullcontext():
        reference, reference_log, mid_drop_step = run(tmp_path, resample, setup)
    dropped_in_drop_epochs = [d for _, d in reference_log.by_step.values() if d]
    assert dropped_in_drop_epochs  # the run did drop layers
    if resample == "step":
        assert len(set(dropped_in_drop_epochs)) > 1
    checkpoints = {
        "end of the epoch before a DROP epoch": "epoch=1-*.ckpt",
        "end of a DROP epoch": "epoch=2-*.ckpt",
        "middle of a DROP epoch": f"mid-step={mid_drop_step}.ckpt",
    }
    for where, pattern in checkpoints.items():
        (path,) = tmp_path.glob(pattern)
        resumed, resumed_log, _ = run(tmp_path / "resumed", resample, setup, ckpt_path=path)
        for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
            assert torch.equal(a, b), f"{where}: {name} differs"
        for step, draw in resumed_log.by_step.items():
            assert draw == reference_log.by_step[step], f"{where}: step {step} batch size or dropped layers differ"
        assert resumed_log.by_step  # it did train after the resume
