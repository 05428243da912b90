"""What real users bring: models whose head is registered first, tied weights, layers frozen by the user or by
another callback, LoRA adapters, optimizers made during fit or without an lr, loaders the mixin cannot scale,
integer batch limits, lazy modules."""

from __future__ import annotations


import pytest
import torch
from helpers import OneCycleMLP, TinyDataModule, TinyMLP, make_dataset, make_trainer, params_of_layers
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_ldb import LayerDropBackCallback, LDBDataModuleMixin


class DrawLog(Callback):
    """Placed after LDB: what it dropped and offered at each batch, and which parameters were frozen."""

    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.dropped: dict[int, set[str]] = {}
        self.candidates: dict[int, tuple[str, ...]] = {}
        self.frozen: dict[int, set[str]] = {}
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start[trainer.current_epoch] = snapshot(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        epoch = trainer.current_epoch
        self.dropped.setdefault(epoch, set()).update(self.ldb.dropped_layers)
        self.candidates[epoch] = self.ldb.candidate_layers
        self.frozen.setdefault(epoch, set()).update(n for n, p in pl_module.named_parameters() if not p.requires_grad)

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = snapshot(pl_module)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if not nn.parameter.is_lazy(p)}


def unchanged(log: DrawLog, epoch: int) -> set[str]:
    return {n for n, v in log.start[epoch].items() if torch.equal(v, log.end[epoch][n])}


# ------------------------------------------------------------------ rule 1: a layer is what runs, in run order
class HeadFirst(TinyMLP):
    """Registers its head before its body: the head is the last layer to run, not the first."""

    def __init__(self) -> None:
        super().__init__()
        del self.net
        self.head = nn.Linear(8, 1)
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_keep_first_and_keep_last_follow_the_order_layers_run_in():
    ldb = LayerDropBackCallback(drop_rate=0.9, keep_first=1, keep_last=1, seed=0, batch_scale=1, every=1)
    log = DrawLog(ldb)
    make_trainer(4, [ldb, log]).fit(HeadFirst())
    for epoch in (1, 2, 3):
        assert log.candidates[epoch] == tuple(f"body.{i}" for i in range(1, 6))
        assert "head" not in log.dropped[epoch] and "body.0" not in log.dropped[epoch]
    assert ldb.state_dict()["run_order"][:3] == ["", "body", "body.0"]  # kept for resume


class TiedLM(LightningModule):
    """An embedding tied to the output head, as in GPT-2 and BERT."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.blocks(self.embed(tokens))))

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        return nn.functional.cross_entropy(self(tokens), tokens)

    def train_dataloader(self):
        tokens = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(0))
        return DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def test_a_tied_weight_kept_with_the_head_is_never_dropped_with_the_embedding():
    ldb = LayerDropBackCallback(drop_rate=0.95, keep_first=0, keep_last=1, seed=0, batch_scale=1, every=1)
    log = DrawLog(ldb)
    with pytest.warns(UserWarning, match="every trainable layer of TiedLM is a candidate"):  # keep_first=0 on purpose
        make_trainer(4, [ldb, log]).fit(TiedLM())
    assert any("embed" in log.dropped[e] for e in (1, 2, 3))  # the embedding layer was drawn ...
    for epoch in (1, 2, 3):
        assert "embed.weight" not in log.frozen[epoch]  # ... but its weight is the kept head's too
        assert "embed.weight" not in unchanged(log, epoch)
        assert log.frozen[epoch]  # other layers were dropped


# ------------------------------------------------------------------ rule 2: only what is trainable, as it is
def test_frozen_layers_are_not_candidates_and_keep_counts_trainable_layers():
    model = TinyMLP()
    for index in (0, 1, 3):  # Linear, BatchNorm, Linear: the first three layers
        model.net[index].requires_grad_(False)
    ldb = LayerDropBackCallback(drop_rate=0.5, keep_first=2, keep_last=1, seed=0, batch_scale=1)
    log = DrawLog(ldb)
    make_trainer(3, [ldb, log]).fit(model)
    # Trainable layers in run order: net.5, net.7, ..., net.15; the first two and the last are kept.
    assert log.candidates[2] == ("net.9", "net.11", "net.13")
    assert all(not p.requires_grad for i in (0, 1, 3) for p in model.net[i].parameters())


class FreezeOnDropEpoch(BaseFinetuning):
    """Freezes a candidate at the start of DROP epoch 2 and never unfreezes it."""

    def freeze_before_training(self, pl_module):
        pass

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 2:
            self.freeze(pl_module.net[9])


@pytest.mark.parametrize("ldb_first", [True, False], ids=["ldb-first", "finetuning-first"])
def test_a_layer_another_callback_freezes_on_a_drop_epoch_stays_frozen_and_is_not_drawn(ldb_first):
    ldb = LayerDropBackCallback(drop_rate=0.9, seed=0, batch_scale=1)
    log = DrawLog(ldb)
    finetuning = FreezeOnDropEpoch()
    model = TinyMLP()
    make_trainer(4, [ldb, finetuning, log] if ldb_first else [finetuning, ldb, log]).fit(model)
    assert "net.9" not in log.candidates[2] and "net.9" not in log.dropped[2]
    assert all(not p.requires_grad for p in model.net[9].parameters())  # LDB never unfroze it


class LoRALinear(nn.Module):
    """A frozen base layer with a trainable low-rank adapter, as PEFT's LoRA builds it."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.base = nn.Linear(features, features).requires_grad_(False)
        self.lora_A = nn.Linear(features, 2, bias=False)
        self.lora_B = nn.Linear(2, features, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


class LoRAModel(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(*[LoRALinear(8) for _ in range(4)], nn.Linear(8, 1).requires_grad_(False))


def test_lora_adapters_are_the_draw_and_the_first_and_last_trainable_are_kept(recwarn):
    ldb = LayerDropBackCallback(drop_rate=0.5, keep_first=1, keep_last=1, seed=0, batch_scale=1)
    log = DrawLog(ldb)
    model = LoRAModel()
    make_trainer(3, [ldb, log]).fit(model)
    adapters = [f"net.{i}.lora_{ab}" for i in range(4) for ab in "AB"]
    assert log.candidates[2] == tuple(adapters[1:-1])
    assert not [w for w in recwarn if "every trainable layer" in str(w.message)]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".base." in n or n.startswith("net.4"))


def test_peft_lora_on_a_hugging_face_model_draws_over_the_adapters():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    backbone = peft.get_peft_model(
        transformers.GPT2LMHeadModel(config), peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )

    class Module(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = backbone

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def train_dataloader(self):
            ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
            return DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    ldb = LayerDropBackCallback(drop_rate=0.5, keep_first=1, keep_last=1, seed=0, batch_scale=1)
    log = DrawLog(ldb)
    make_trainer(3, [ldb, log]).fit(Module())
    assert log.candidates[2] and all("lora_" in name for name in log.candidates[2])
    assert all("lora_" in name for name in log.dropped[2])


# ------------------------------------------------------------------ rule 3: the DROP-epoch settings hold
class RecordingSGD(torch.optim.SGD):
    """Records the lr each step really used (LDB scales it once the closure has returned)."""

    used: list[tuple[int, float]] = []

    def step(self, closure=None):
        loss = None
        if closure is not None:  # as SGD does: the closure first, then the update
            with torch.enable_grad():
                loss = closure()
        RecordingSGD.used.append((self.epoch, self.param_groups[0]["lr"]))
        super().step()
        return loss


class RecreatedOptimizer(TinyMLP):
    def configure_optimizers(self):
        optimizer = RecordingSGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        optimizer.epoch = 0
        return optimizer


class RecreateOptimizersAtEpoch(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            trainer.strategy.setup_optimizers(trainer)
            trainer.optimizers[0].epoch = 2


def test_an_optimizer_recreated_during_fit_keeps_the_lr_scaling_once_and_the_drops():
    RecordingSGD.used = []
    ldb = LayerDropBackCallback(drop_rate=0.5, lr_scale=2.0, seed=0, batch_scale=1)
    log = DrawLog(ldb)
    make_trainer(3, [RecreateOptimizersAtEpoch(), ldb, log]).fit(RecreatedOptimizer())
    lrs = {epoch: {lr for e, lr in RecordingSGD.used if e == epoch} for epoch in (0, 2)}
    assert lrs == {0: {0.1}, 2: {0.2}}  # scaled on the new optimizer, and only once
    dropped = set(params_of_layers(TinyMLP(), tuple(log.dropped[2])))
    assert dropped and dropped <= unchanged(log, 2)


def test_an_optimizer_without_an_lr_warns_once_and_still_drops():
    transformers = pytest.importorskip("transformers")

    class AdafactorMLP(TinyMLP):
        def configure_optimizers(self):
            return transformers.optimization.Adafactor(self.parameters(), lr=None, relative_step=True, warmup_init=True)

    ldb = LayerDropBackCallback(drop_rate=0.5, seed=0, batch_scale=1, every=1)
    log = DrawLog(ldb)
    with pytest.warns(UserWarning, match=r"cannot scale the learning rate of Adafactor") as warned:
        make_trainer(3, [ldb, log]).fit(AdafactorMLP())
    assert len([w for w in warned if "Adafactor" in str(w.message)]) == 1
    for epoch in (1, 2):
        dropped = set(params_of_layers(TinyMLP(), tuple(log.dropped[epoch])))
        assert dropped and dropped <= unchanged(log, epoch)


class ZeroGradToZeros(TinyMLP):
    """``zero_grad(set_to_none=False)`` leaves every parameter a zero tensor, dropped ones included."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)


def test_zero_tensor_gradients_never_move_dropped_layers_under_momentum_and_weight_decay():
    ldb = LayerDropBackCallback(drop_rate=0.5, seed=0, batch_scale=1)
    log = DrawLog(ldb)
    make_trainer(3, [ldb, log]).fit(ZeroGradToZeros(optimizer="sgd", momentum=0.9, weight_decay=0.1))
    dropped = set(params_of_layers(TinyMLP(), tuple(log.dropped[2])))
    assert dropped and dropped <= unchanged(log, 2)


# ------------------------------------------------------------------ the mixin never fails silently
class ReadsAnotherAttribute(TinyDataModule):
    def __init__(self):
        super().__init__(batch_size=32)  # an unrelated int called batch_size
        self.train_batch_size = 8

    def train_dataloader(self):
        return DataLoader(make_dataset(self.n), batch_size=self.train_batch_size)


class BuiltInSetup(TinyDataModule):
    def setup(self, stage):
        self.loader = DataLoader(make_dataset(self.n), batch_size=self.batch_size)

    def train_dataloader(self):
        return self.loader


@pytest.mark.parametrize("datamodule", [ReadsAnotherAttribute, BuiltInSetup])
def test_a_loader_that_ignores_the_scaled_batch_size_is_an_error_with_the_fix(datamodule):
    ldb = LayerDropBackCallback(seed=0, batch_scale=2)
    with pytest.raises(ValueError, match=r"returned a loader with batch_size=8.*Build the train loader"):
        make_trainer(3, [ldb]).fit(TinyMLP(), datamodule=datamodule())


class PropertyBatchSize(LDBDataModuleMixin, LightningDataModule):
    def __init__(self):
        super().__init__()
        self._size = 8

    @property
    def batch_size(self):
        return self._size

    @batch_size.setter
    def batch_size(self, value):
        self._size = value

    def train_dataloader(self):
        return DataLoader(make_dataset(32), batch_size=self.batch_size)


class Sizes(Callback):
    def __init__(self):
        self.sizes: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.setdefault(trainer.current_epoch, set()).add(len(batch[0]))


def test_a_batch_size_property_with_a_setter_is_a_batch_size():
    sizes = Sizes()
    make_trainer(3, [LayerDropBackCallback(seed=0, batch_scale=2), sizes]).fit(TinyMLP(), datamodule=PropertyBatchSize())
    assert sizes.sizes == {0: {8}, 1: {8}, 2: {16}}


class MixinModule(LDBDataModuleMixin, TinyMLP):
    pass


class PlainDataModule(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(make_dataset(32), batch_size=8)


def test_batch_scaling_is_active_only_where_the_train_loader_really_comes_from():
    ldb = LayerDropBackCallback(seed=0, batch_scale=2)
    active = []

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            active.append(ldb.batch_scaling_active)

    with pytest.warns(UserWarning, match=r"MixinModule uses `LDBDataModuleMixin`, but the train loader comes from"):
        make_trainer(1, [ldb, Probe()]).fit(MixinModule(), datamodule=PlainDataModule())
    assert active == [False]


def test_an_integer_batch_limit_gives_drop_epochs_no_more_samples_and_the_estimate_agrees():
    sizes = Sizes()
    counts: dict[int, int] = {}

    class Count(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counts[trainer.current_epoch] = counts.get(trainer.current_epoch, 0) + len(batch[0])

    model = OneCycleMLP()
    trainer = make_trainer(4, [LayerDropBackCallback(seed=0, batch_scale=2), sizes, Count()], limit_train_batches=5)
    trainer.fit(model, datamodule=TinyDataModule(batch_size=4, n=64))
    assert counts == {0: 20, 1: 20, 2: 16, 3: 20}  # 5 batches of 4; a DROP epoch 2 batches of 8
    assert model.total_steps == trainer.global_step == 17
    assert trainer.limit_train_batches == 5  # the user's setting, back after fit


class LazyModel(TinyMLP):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), *[nn.LazyLinear(8) for _ in range(5)], nn.Linear(8, 1))


def test_lazy_modules_do_not_crash_setup_and_become_candidates_once_materialised():
    ldb = LayerDropBackCallback(drop_rate=0.5, keep_first=1, keep_last=1, seed=0, batch_scale=1)
    log = DrawLog(ldb)
    make_trainer(3, [ldb, log]).fit(LazyModel())
    assert log.candidates[2] == tuple(f"net.{i}" for i in range(1, 6))
    assert log.dropped[2]
