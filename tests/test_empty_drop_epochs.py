"""A DROP epoch with nothing to drop says so, once per fit: why, and what still applies."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from helpers import TinyDataModule, TinyMLP, make_trainer
from lightning.pytorch.callbacks import BackboneFinetuning, Callback

from lightning_ldb import LayerDropBackCallback


def nothing_to_drop(record: Any) -> list[str]:
    return [str(w.message) for w in record if "has no layer to drop" in str(w.message)]


def fit(model: Any, callbacks: list, datamodule: Any = None, epochs: int = 5) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(epochs, callbacks).fit(model, datamodule=datamodule)
    return nothing_to_drop(record)


def test_a_linear_probe_warns_once_that_drop_epochs_only_scale_the_lr_and_batch():
    model = TinyMLP()
    model.net[:-1].requires_grad_(False)  # a linear probe: only the head trains
    ldb = LayerDropBackCallback(every=1, seed=0, batch_scale=2, lr_scale=2.0)
    messages = fit(model, [ldb], TinyDataModule(batch_size=8))  # DROP epochs 1..4
    assert len(messages) == 1
    [message] = messages
    assert "DROP epoch 1" in message
    assert "all 1 trainable layer(s) are kept by keep_first=4/keep_last=1" in message
    assert "lr_scale=2.0" in message and "batch_scale=2" in message


class Finetuned(TinyMLP):
    """A backbone of seven layers and a head, for ``BackboneFinetuning``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = self.net[:-1], self.net[-1]
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_drop_epochs_before_backbone_finetuning_unfreezes_warn_once_and_later_ones_drop():
    ldb = LayerDropBackCallback(every=1, seed=0, batch_scale=1, drop_rate=0.5)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=3, backbone_initial_ratio_lr=1.0)
    model = Finetuned()
    dropped = []

    class Log(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            dropped.append((trainer.current_epoch, ldb.dropped_layers))

    messages = fit(model, [ldb, finetuning, Log()])
    [message] = messages  # epochs 1 and 2: nothing to drop, said once
    assert "DROP epoch 1" in message and "keep_first=4/keep_last=1" in message
    assert "batch_scale" not in message  # the batch is not scaled here: not claimed
    assert not any(d for epoch, d in dropped if epoch < 3)
    assert any(d for epoch, d in dropped if epoch >= 3)  # unfrozen: drawn as usual


def test_patterns_that_filter_everything_left_are_named():
    ldb = LayerDropBackCallback(every=1, seed=0, batch_scale=1, keep_first=2, keep_last=1, include=["net.1*"])
    model = TinyMLP()
    model.net[11].requires_grad_(False)
    model.net[13].requires_grad_(False)
    # keep_first=2 keeps net.0 and net.1, keep_last=1 keeps net.15; net.11 and net.13, the others "net.1*" matches,
    # are frozen: a structural candidate exists (setup passes), but no draw has one.
    [message] = fit(model, [ldb], epochs=3)
    assert "filtered out by include=('net.1*',)" in message


def test_a_drop_epoch_with_candidates_does_not_warn():
    assert fit(TinyMLP(), [LayerDropBackCallback(every=1, seed=0, batch_scale=1)], epochs=3) == []
