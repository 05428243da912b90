"""Which layers keep_first/keep_last keep: the first and last the data flows through on a training step, whatever
runs a module's parameters (``nn.MultiheadAttention``'s ``out_proj``, Swin's attention, a ``ParameterList``, a
parameter of the LightningModule itself), and whatever takes no part in the step (a validation-only module, an
auxiliary head not run)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import make_trainer
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldb import LayerDropBackCallback
from lightning_ldb.layers import RunOrderRecorder, discover_layers, order_layers, select_candidates


class Classifier(LightningModule):
    """Trains ``network`` (images or vectors to ``classes`` logits) with cross-entropy and SGD."""

    def __init__(self, network: nn.Module, inputs: tuple[int, ...], classes: int = 3) -> None:
        super().__init__()
        self.network = network
        self.inputs = inputs
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(16, *self.inputs, generator=generator)
        y = torch.randint(0, self.classes, (16,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=8)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Moved(Callback):
    """Placed after LDB: the parameters that did not move in each epoch, and the candidates of each epoch."""

    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.still: dict[int, set[str]] = {}
        self.candidates: dict[int, tuple[str, ...]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.candidates[trainer.current_epoch] = self.ldb.candidate_layers

    def on_train_epoch_end(self, trainer, pl_module):
        self.still[trainer.current_epoch] = {
            n for n, p in pl_module.named_parameters() if torch.equal(p.detach(), self.start[n])
        }


def fit(model: LightningModule, **ldb_kwargs: Any) -> tuple[LayerDropBackCallback, Moved]:
    settings = dict(drop_rate=0.9, every=1, keep_first=1, keep_last=1, seed=0, batch_scale=1)
    ldb = LayerDropBackCallback(**{**settings, **ldb_kwargs})
    moved = Moved(ldb)
    make_trainer(3, [ldb, moved]).fit(model)
    return ldb, moved


def assert_always_trained(moved: Moved, layer: str) -> None:
    for epoch in (1, 2):
        assert not any(name.startswith(f"{layer}.") for name in moved.still[epoch]), (epoch, moved.still[epoch])
        assert layer not in moved.candidates[epoch]


def tiny_vit() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=10
    )
    vit.heads.head = nn.Linear(8, 3)  # a new head, as FineTuneClassifier fits one
    return vit


def test_vit_keeps_its_new_head_and_draws_the_attention_output_projections():
    model = Classifier(tiny_vit(), (3, 8, 8))
    ldb, moved = fit(model)
    assert_always_trained(moved, "network.heads.head")
    assert "network.encoder.layers.encoder_layer_1.self_attention.out_proj" in moved.candidates[1]
    # The first layer the data meets is the patch embedding; the class token (the model's own) joins after it.
    assert "network.conv_proj" not in moved.candidates[1]
    order = ldb.state_dict()["run_order"]  # kept for resume: module names in the order they took part
    out_proj = order.index("network.encoder.layers.encoder_layer_1.self_attention.out_proj")
    assert order.index("network.encoder.layers.encoder_layer_1.self_attention") < out_proj
    assert out_proj < order.index("network.encoder.layers.encoder_layer_1.mlp.0") < order.index("network.heads.head")


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def test_transformer_encoder_keeps_its_head():
    ldb, moved = fit(Classifier(Transformer(), (5, 4)))
    assert_always_trained(moved, "network.head")
    assert "network.encoder.layers.1.self_attn.out_proj" in moved.candidates[1]


def test_swin_keeps_its_head_and_draws_the_attention_projections():
    torchvision = pytest.importorskip("torchvision")
    swin = torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=3,
        stochastic_depth_prob=0.0,
    )
    ldb, moved = fit(Classifier(swin, (3, 8, 8)))
    assert_always_trained(moved, "network.head")
    assert {"network.features.1.0.attn.qkv", "network.features.1.0.attn.proj"} <= set(moved.candidates[1])


class Quirky(LightningModule):
    """Parameters used without their module's forward, and modules that take no part in the training step."""

    def __init__(self) -> None:
        super().__init__()
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(8)) for _ in range(2)])  # no forward to hook
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
        self.head = nn.Linear(8, 2)
        self.aux_head = nn.Linear(8, 2)  # an auxiliary loss on odd batches only: not run on the first step
        self.val_probe = nn.Linear(8, 2)  # used in validation only
        self.temperature = nn.Parameter(torch.ones(()))  # set on the LightningModule, used in training_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = torch.tanh(self.body(x * self.scales[0]) * self.scales[1])
        loss = nn.functional.cross_entropy(self.head(h) / self.temperature, y)
        if batch_idx % 2 == 1:
            loss = loss + nn.functional.cross_entropy(self.aux_head(h), y)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val", nn.functional.cross_entropy(self.val_probe(torch.tanh(self.body(x))), y))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 8, generator=generator), torch.arange(32) % 2), batch_size=8)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_parameters_used_outside_a_module_forward_are_placed_where_used_and_absent_modules_never_kept():
    ldb, moved = fit(Quirky(), keep_first=1, keep_last=2)
    # The data meets the ParameterList first, the temperature (a LightningModule parameter) last.
    assert ldb.state_dict()["run_order"] == ["scales", "body", "body.0", "body.1", "body.2", "body.3", "head", ""]
    # keep_last=2 keeps the head and the temperature; the auxiliary head and the validation-only probe, which
    # took no part in the observed step, are candidates, never kept in the head's place.
    assert_always_trained(moved, "head")
    for epoch in (1, 2):
        assert moved.candidates[epoch] == ("body.0", "body.1", "body.2", "body.3", "aux_head", "val_probe")
        assert "temperature" not in moved.still[epoch] and "scales.0" not in moved.still[epoch]


def test_a_tied_head_is_placed_where_its_module_runs_not_where_its_weight_is_first_used():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.body(self.embed(tokens)))

    model = Tied()
    recorder = RunOrderRecorder(model)
    model(torch.zeros(2, dtype=torch.long)).sum().backward()
    order = recorder.stop()
    assert order == ["", "embed", "body", "head"]
    ordered = order_layers(discover_layers(model), order)
    assert [layer.name for layer in select_candidates(ordered, 1, 1)] == ["body"]


def test_uses_after_the_backward_do_not_count():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    extra = nn.ParameterList([nn.Parameter(torch.ones(2))])
    recorder = RunOrderRecorder(nn.ModuleDict({"model": model, "extra": extra}))
    model(torch.ones(1, 2)).sum().backward()
    with torch.no_grad():
        extra[0].mul_(2.0)  # an optimizer's update
    assert recorder.stop() == ["model", "model.0", "model.1"]
    torch.ones(1).add(extra[0])  # the recorder's mode is gone


def test_a_resumed_run_takes_the_observed_order_from_the_checkpoint_and_reproduces_the_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None):
        torch.manual_seed(0)
        model = Quirky()
        ldb = LayerDropBackCallback(drop_rate=0.5, every=1, keep_first=1, keep_last=2, seed=3, batch_scale=1)
        moved = Moved(ldb)
        callbacks = [ldb, moved]
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
        make_trainer(4, callbacks, enable_checkpointing=ckpt_path is None).fit(model, ckpt_path=ckpt_path)
        return model, ldb, moved

    reference, ldb, moved = run()
    resumed, resumed_ldb, resumed_moved = run(tmp_path / "epoch=1.ckpt")
    assert resumed_ldb.state_dict()["run_order"] == ldb.state_dict()["run_order"]
    assert resumed_moved.candidates[3] == moved.candidates[3] == ("body.0", "body.1", "body.2", "body.3", "aux_head", "val_probe")
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ a parametrized module is one layer
def weight_normed_mlp() -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(*[weight_norm(nn.Linear(4, 4)) for _ in range(5)], nn.Linear(4, 3))


def test_a_weight_normed_linear_is_one_layer_at_either_granularity():
    model = weight_normed_mlp()
    layers = {layer.name: layer for layer in discover_layers(model)}
    assert list(layers) == ["0", "1", "2", "3", "4", "5"]
    first = model[0]
    assert {id(p) for p in layers["0"].parameters} == {id(p) for p in first.parameters()}  # bias, original0/1
    assert [layer.name for layer in discover_layers(model, "parameter")][:2] == ["0.bias", "0.weight"]
    assert len(discover_layers(model, "parameter")[1].parameters) == 2  # the weight's magnitude and direction


def test_a_dropped_weight_normed_linear_is_dropped_whole():
    ldb, moved = fit(Classifier(weight_normed_mlp(), (4,)), drop_rate=0.5)
    assert moved.candidates[1] == ("network.1", "network.2", "network.3", "network.4")
    for epoch in (1, 2):
        for index in range(1, 5):
            names = [f"network.{index}.{n}" for n, _ in weight_normed_mlp()[index].named_parameters()]
            assert len(names) == 3
            still = [name in moved.still[epoch] for name in names]
            assert all(still) or not any(still), (epoch, names, moved.still[epoch])


def test_bookkeeping_outside_the_model_without_autograd_does_not_place_parameters():
    model = Transformer()
    recorder = RunOrderRecorder(model)
    with torch.no_grad():  # an EMA callback's update at the batch start
        averaged = [p.detach().clone().mul_(0.9).add_(p) for p in model.parameters()]
    model(torch.randn(2, 5, 4)).sum().backward()
    order = recorder.stop()
    assert averaged and order.index("embed") < order.index("encoder.layers.0.self_attn.out_proj") < order.index("head")


# ------------------------------------------------------------------ side uses of the parameters place nothing
# The run order is where the data meets each layer. An L2 penalty, a logged weight norm or an evaluation pass under
# ``no_grad`` during the first training step touch every parameter, and must not move a layer into the place of the
# real input layer or head (issue 23, item 5).
class Calibrated(LightningModule):
    """``inp -> body -> head`` trained with an L2 penalty (before or after the forward); ``calib`` is used in
    evaluation only, and is registered after the head."""

    def __init__(self, penalty: str = "after") -> None:
        super().__init__()
        self.penalty = penalty
        self.inp = nn.Linear(4, 8)
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 3)
        self.calib = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(torch.tanh(self.inp(x)))))

    def l2(self) -> torch.Tensor:
        return sum(p.pow(2).sum() for p in self.parameters())  # type: ignore[return-value]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        penalty = self.l2() if self.penalty == "before" else None
        loss = nn.functional.cross_entropy(self(x), y)
        return loss + 1e-4 * (self.l2() if penalty is None else penalty)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.calib(self(batch[0]))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=8)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_seeds(make_model: Any, seeds: tuple[int, ...] = (0, 1, 2), epochs: int = 5) -> list[tuple[list, Moved]]:
    """For each seed, a fit of ``epochs`` epochs (epoch 0 full, then DROP epochs at drop_rate 0.9)."""
    runs = []
    for seed in seeds:
        ldb = LayerDropBackCallback(drop_rate=0.9, every=1, keep_first=1, keep_last=1, seed=seed, batch_scale=1)
        moved = Moved(ldb)
        make_trainer(epochs, [ldb, moved]).fit(make_model())
        runs.append((ldb.state_dict()["run_order"], moved))
    return runs


def assert_never_dropped(runs: list[tuple[list, Moved]], layer: str, epochs: int = 5) -> None:
    for _, moved in runs:  # 3 seeds x 4 DROP epochs
        for epoch in range(1, epochs):
            assert layer not in moved.candidates[epoch], (epoch, moved.candidates[epoch])
            assert not any(name.startswith(f"{layer}.") for name in moved.still[epoch]), (epoch, moved.still[epoch])


@pytest.mark.parametrize("penalty", ["after", "before"])
def test_an_l2_penalty_does_not_place_an_evaluation_only_layer(penalty):
    runs = fit_seeds(lambda: Calibrated(penalty))
    for order, moved in runs:
        assert "calib" not in order  # not on the data path: never counted as last (or first)
        assert order.index("inp") < order.index("body.0") < order.index("body.2") < order.index("head")
        assert moved.candidates[1] == ("body.0", "body.1", "body.2", "calib")
    assert_never_dropped(runs, "head")
    assert_never_dropped(runs, "inp")


class LogsWeightNorm(Classifier):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.log("weight_norm", torch.stack([p.norm() for p in self.parameters()]).sum())


def test_a_weight_norm_logged_at_the_batch_start_does_not_place_the_attention_projections_first():
    runs = fit_seeds(lambda: LogsWeightNorm(Transformer(), (5, 4)))
    for order, moved in runs:
        layers = [name for name in order if name.startswith("network.") and name != "network.encoder"]
        assert layers[0] == "network.embed" and layers[-1] == "network.head", order
        out_proj = order.index("network.encoder.layers.0.self_attn.out_proj")
        assert order.index("network.encoder.layers.0.self_attn") < out_proj < order.index("network.encoder.layers.0.linear1")
        assert "network.encoder.layers.0.self_attn.out_proj" in moved.candidates[1]
    assert_never_dropped(runs, "network.embed")
    assert_never_dropped(runs, "network.head")


class Probed(nn.Module):
    """``inp -> body -> head``, and ``probe``, run on the head's output in evaluation only."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 1)
        self.probe = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(torch.tanh(self.inp(x)))))


def test_an_evaluation_pass_under_no_grad_in_the_first_epoch_block_does_not_place_layers():
    from lightning_ldb import LayerDropBack

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)
    for seed in (0, 1, 2):
        torch.manual_seed(0)
        model = Probed()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ldb = LayerDropBack(model, optimizer, drop_rate=0.9, every=1, keep_first=1, keep_last=1, seed=seed)
        for epoch in range(5):
            with ldb.epoch(epoch):
                if epoch == 0:
                    with torch.no_grad():  # an evaluation pass before training, through the probe
                        model.eval()
                        model.probe(model(x))
                        model.train()
                start = {name: p.detach().clone() for name, p in model.named_parameters()}
                for xb, yb in zip(x.split(8), y.split(8)):
                    nn.functional.mse_loss(model(xb), yb).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                if epoch:
                    assert ldb.candidate_layers == ("body.0", "body.1", "body.2", "probe"), ldb.candidate_layers
                    for layer in ("inp", "head"):
                        assert not torch.equal(model.get_submodule(layer).weight, start[f"{layer}.weight"])
        assert ldb.run_order is not None and "probe" not in ldb.run_order
        assert ldb.run_order.index("inp") < ldb.run_order.index("head")


class SideUses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.last = nn.Linear(4, 2)
        self.probe = nn.Linear(2, 2)  # evaluation only
        self.teacher = nn.Linear(4, 2)  # run without autograd inside the training forward
        self.register_buffer("anchor", torch.zeros(2, 2))  # an L2-SP style reference for the probe
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x)
        return self.last(torch.tanh(self.first(x))) * self.logit_scale.exp() - target


def test_numbers_computed_from_the_weights_alone_place_nothing_and_a_no_grad_part_of_the_forward_counts():
    model = SideUses()
    recorder = RunOrderRecorder(model)
    with torch.no_grad():
        model.probe(model(torch.ones(1, 4)))  # an evaluation pass
    penalty = model.probe.weight.norm() + (model.probe.weight - model.anchor).pow(2).sum() + model.probe.bias.abs().max()
    loss = model(torch.ones(3, 4)).pow(2).mean() + penalty + sum(p.pow(2).sum() for p in model.parameters())
    loss.backward()
    # The teacher runs without autograd, but inside the training forward; the model's own scale meets the data
    # after the last layer (``logit_scale.exp()`` carries it there), so the model's own layer comes last.
    order = recorder.stop()
    assert order == ["teacher", "first", "last", ""]
    ordered = order_layers(discover_layers(model), order)
    assert [(layer.name, layer.observed) for layer in ordered][-1] == ("probe", False)


def test_a_torchvision_resnet_keeps_its_order_under_side_uses_and_an_unused_calibration_layer():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.calib = nn.Linear(1000, 1000)  # registered after fc, used in evaluation only
    x = torch.randn(2, 3, 16, 16)

    def observe(side_uses: bool) -> list[str]:
        recorder = RunOrderRecorder(model)
        if side_uses:
            with torch.no_grad():
                model.calib(model.eval()(x))
            model.train()
            norm = torch.stack([p.norm() for p in model.parameters()]).sum()
        loss = model(x).sum()
        if side_uses:
            loss = loss + 1e-4 * sum(p.pow(2).sum() for p in model.parameters()) + 0 * norm
        return recorder.stop()  # before the backward, which ends the recording anyway

    plain, order = observe(False), observe(True)
    assert order == plain
    observed = [layer.name for layer in order_layers(discover_layers(model), order) if layer.observed]
    assert observed[0] == "conv1" and observed[-1] == "fc" and "calib" not in observed


def test_a_weight_transformed_before_it_meets_the_data_places_its_module_and_checkpointed_parts_count():
    from torch.utils.checkpoint import checkpoint

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.readout = nn.Linear(4, 10, bias=False)  # its weight is applied by the model, its forward never runs

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = checkpoint(self.body, self.embed(tokens), use_reentrant=True)  # runs body under no_grad
            return h @ self.readout.weight.t()

    model = Model()
    recorder = RunOrderRecorder(model)
    model(torch.arange(3)).sum().backward()
    assert recorder.stop() == ["", "embed", "body", "body.0", "body.1", "readout"]
