"""``LayerDropBackCallback(backward="block")`` on real Trainer runs of a tiny residual network.

The network is a stem (conv + BatchNorm) and four torchvision ``BasicBlock(8, 8)`` on random 3x8x8 images.
With ``keep_first=2`` (the stem) and ``keep_last=1`` (the head) its four residual branches, named by
their entry ``blocks.K.conv1``, are the candidates; epoch 2 is the DROP epoch. One module-scoped SGD run
(:func:`sgd_run`) records the first DROP step (weights just before its forward, batch, loss, gradients,
FLOPs) and the weights around every epoch; several tests read it. The references the step is compared
with are fresh instances of the network loaded with those weights, with no LDB involved: a plain forward,
and a copy whose dropped entries detach their input through a forward pre-hook written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from helpers import ResumableLoader, TinyMLP, make_trainer, snapshot
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock

from lightning_ldb import LayerDropBackCallback

#: LDB settings of every run here. With seed 3, DROP epoch 2 drops some but not all of the four branches.
LDB_KWARGS: dict[str, Any] = dict(
    drop_rate=0.5, every=2, keep_first=2, keep_last=1, batch_scale=1, seed=3, backward="block"
)
DROP_EPOCH = 2
BRANCHES = tuple(f"blocks.{k}.conv1" for k in range(4))


def image_data(n: int = 32, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator))


class TinyResNet(LightningModule):
    """Stem, four ``BasicBlock(8, 8)`` (no downsample: each block's branch holds all its parameters), linear head.

    ``flops_at=(epoch, batch_idx)`` counts the FLOPs of that training step's forward and backward
    (``training_step`` enters the counter, :meth:`backward` leaves it) into ``self.step_flops``.
    """

    def __init__(
        self, optimizer: str = "sgd", lr: float = 0.05, n: int = 32, batch_size: int = 8,
        flops_at: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*(BasicBlock(8, 8) for _ in range(4)))
        self.head = nn.Linear(8, 4)
        self.step_flops: Optional[int] = None
        self._counter: Optional[FlopCounterMode] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.hparams.flops_at is not None and (self.current_epoch, batch_idx) == tuple(self.hparams.flops_at):
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        return self.loss(batch)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        super().backward(loss, *args, **kwargs)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.step_flops, self._counter = self._counter.get_total_flops(), None

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=0.01)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(image_data(self.hparams.n), batch_size=self.hparams.batch_size)


class Residual(nn.Module):
    """``x + fc(norm(x))``: a residual block no built-in rule knows."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class ResidualMLP(TinyMLP):
    """TinyMLP's data and optimizer, with four :class:`Residual` blocks between an input and an output layer."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)  # TinyMLP's lr=0.1 diverges with four unnormalised residual sums
        self.net = nn.Sequential(nn.Linear(8, 8), *(Residual() for _ in range(4)), nn.Linear(8, 1))


class StepRecorder(Callback):
    """Listed after LDB: the draw of every batch, the weights at each epoch's start and end, and the first DROP step.

    For that step (``DROP_EPOCH``, batch 0, after LDB applied the draw): the state dict and batch just
    before the forward, the modules holding a forward pre-hook, the training loss and every gradient
    right after the backward.
    """

    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.dropped: dict[int, tuple[str, ...]] = {}  # global step -> dropped branches
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}
        self.probe: dict[str, Any] = {}
        self._probing = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        self.dropped[trainer.global_step] = self.ldb.dropped_layers
        if batch_idx == 0:
            self.start[epoch] = snapshot(pl_module)
        self._probing = epoch == DROP_EPOCH and batch_idx == 0
        if self._probing:
            self.probe.update(
                state={k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                batch=[t.clone() for t in batch],
                dropped=self.ldb.dropped_layers,
                candidates=self.ldb.candidate_layers,
                hooked=sorted(name for name, m in pl_module.named_modules() if m._forward_pre_hooks),
            )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._probing:
            self.probe["loss"] = loss.detach().clone()

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probing:
            self.probe["grads"] = {
                n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()
            }
            self._probing = False

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.end[trainer.current_epoch] = snapshot(pl_module)


def fit_block(
    optimizer: str = "sgd", max_epochs: int = 3, flops_at: Optional[tuple[int, int]] = None, **trainer_kwargs: Any
) -> tuple[TinyResNet, LayerDropBackCallback, StepRecorder, Trainer]:
    torch.manual_seed(0)
    model = TinyResNet(optimizer=optimizer, flops_at=flops_at)
    ldb = LayerDropBackCallback(**LDB_KWARGS)
    recorder = StepRecorder(ldb)
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    trainer = make_trainer(max_epochs, [ldb, recorder, *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, ldb, recorder, trainer


def branch_params(names: tuple[str, ...]) -> set[str]:
    """Parameter names of the branches entered at ``names``: the whole ``BasicBlock`` (it has no downsample)."""
    return {f"{entry.rsplit('.', 1)[0]}.{p}" for entry in names for p, _ in BasicBlock(8, 8).named_parameters()}


def restored_copy(state: dict[str, torch.Tensor]) -> TinyResNet:
    """A fresh network, in train mode (BatchNorm on batch statistics), holding ``state``; no hooks."""
    model = TinyResNet()
    model.load_state_dict(state)
    return model.train()


def detach_inputs_of(model: nn.Module, entries: tuple[str, ...]) -> None:
    """The reference's own cut: each named entry runs on detached inputs."""
    for name in entries:
        model.get_submodule(name).register_forward_pre_hook(lambda module, args: tuple(a.detach() for a in args))


@pytest.fixture(scope="module")
def sgd_run() -> tuple[TinyResNet, LayerDropBackCallback, StepRecorder, Trainer]:
    return fit_block("sgd", flops_at=(DROP_EPOCH, 0))


# ---------------------------------------------------------------------------------------------- one DROP step
def test_the_drop_step_draws_branches_and_hooks_exactly_their_entries(sgd_run):
    _, _, recorder, _ = sgd_run
    probe = recorder.probe
    assert probe["candidates"] == BRANCHES
    assert probe["dropped"] and set(probe["dropped"]) < set(BRANCHES), "the test needs some dropped, some kept"
    assert probe["hooked"] == sorted(probe["dropped"])


def test_the_drop_step_loss_equals_a_plain_forward_with_the_same_weights(sgd_run):
    _, _, recorder, _ = sgd_run
    probe = recorder.probe
    plain_loss = restored_copy(probe["state"]).loss(probe["batch"])
    assert torch.equal(probe["loss"], plain_loss.detach())


def test_kept_gradients_equal_those_of_a_copy_with_the_dropped_inputs_detached_by_hand(sgd_run):
    model, _, recorder, _ = sgd_run
    probe = recorder.probe
    dropped = branch_params(probe["dropped"])
    reference, full = restored_copy(probe["state"]), restored_copy(probe["state"])
    detach_inputs_of(reference, probe["dropped"])  # its dropped branches stay trainable: only the cut matters
    reference.loss(probe["batch"]).backward()
    full.loss(probe["batch"]).backward()
    expected, exact = dict(reference.named_parameters()), dict(full.named_parameters())
    assert set(probe["grads"]) == set(expected)
    approximated = []
    for name, grad in probe["grads"].items():
        if name in dropped:
            assert grad is None, f"dropped branch parameter {name} got a gradient"
            continue
        assert grad is not None, name
        # Same operations in the same order as the reference, so bitwise equal.
        assert torch.equal(grad, expected[name].grad), f"{name}: gradient differs from the detached reference"
        if not torch.equal(grad, exact[name].grad):
            approximated.append(name)
    # The cut is real: a layer below a dropped branch lost that branch's share of its gradient.
    assert "stem.0.weight" in approximated


def _flops_of_step(model: TinyResNet, batch: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        model.loss(batch).backward()
    return counter.get_total_flops()


def test_the_block_drop_step_costs_fewer_flops_than_a_weights_mode_step_with_the_same_draw(sgd_run):
    model, _, recorder, _ = sgd_run
    probe = recorder.probe
    # Weights mode on the same draw: the same branches frozen, their inputs not detached.
    weights_mode, full = restored_copy(probe["state"]), restored_copy(probe["state"])
    for name, param in weights_mode.named_parameters():
        param.requires_grad_(name not in branch_params(probe["dropped"]))
    weights_flops, full_flops = _flops_of_step(weights_mode, probe["batch"]), _flops_of_step(full, probe["batch"])
    assert model.step_flops is not None
    assert 0 < model.step_flops < weights_flops < full_flops


# ---------------------------------------------------------------------------------------------- the DROP epoch
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_dropped_branches_stay_bitwise_unchanged_through_the_drop_epoch_and_the_rest_moves(optimizer, sgd_run):
    model, ldb, recorder, trainer = sgd_run if optimizer == "sgd" else fit_block(optimizer)
    dropped = recorder.probe["dropped"]
    assert dropped and all(d == dropped for step, d in recorder.dropped.items() if step >= 4 * DROP_EPOCH)
    start, end = recorder.start[DROP_EPOCH], recorder.end[DROP_EPOCH]
    frozen = branch_params(dropped)
    for name in start:
        assert torch.isfinite(end[name]).all(), f"{optimizer}: {name} diverged"
        if name in frozen:
            assert torch.equal(start[name], end[name]), f"{optimizer}: dropped {name} moved"
        else:
            assert not torch.equal(start[name], end[name]), f"{optimizer}: {name} did not train"
    # The other epochs train every branch.
    assert all(not torch.equal(recorder.start[1][n], recorder.end[1][n]) for n in frozen)
    fraction = float(trainer.callback_metrics["ldb/dropped_fraction"])
    assert 0 < fraction < 1
    assert fraction == pytest.approx(len(dropped) / len(BRANCHES))  # the four branches are of equal size


def test_after_fit_no_hook_is_left_and_every_parameter_trains(sgd_run):
    model, ldb, _, _ = sgd_run
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert ldb.dropped_layers == () and ldb.candidate_layers == BRANCHES


# ---------------------------------------------------------------------------------------------- arguments
def test_block_mode_on_a_model_without_residual_branches_fails_in_setup_naming_branches():
    trainer = make_trainer(1, [LayerDropBackCallback(backward="block", keep_first=1)])
    with pytest.raises(ValueError, match=r"found no residual branch in TinyMLP.*`branches=`"):
        trainer.fit(TinyMLP())


def test_a_branches_mapping_drops_the_named_branches_of_a_custom_model():
    torch.manual_seed(0)
    model = ResidualMLP()
    ldb = LayerDropBackCallback(branches={"net.*.norm": ["fc"]}, **LDB_KWARGS)
    recorder = StepRecorder(ldb)
    make_trainer(3, [ldb, recorder]).fit(model)
    # keep_first=2 keeps net.0 and net.1.norm, so the branch entered there is never dropped.
    assert ldb.candidate_layers == ("net.2.norm", "net.3.norm", "net.4.norm")
    start, end = recorder.start[DROP_EPOCH], recorder.end[DROP_EPOCH]
    dropped = {d for step, d in recorder.dropped.items() if d}
    assert len(dropped) == 1, "one draw for the DROP epoch"
    (entries,) = dropped
    frozen = {f"{e.rsplit('.', 1)[0]}.{m}.{p}" for e in entries for m in ("norm", "fc") for p in ("weight", "bias")}
    assert frozen and all(name in start for name in frozen)
    for name in start:
        assert torch.isfinite(end[name]).all(), name
        assert torch.equal(start[name], end[name]) == (name in frozen), name
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_branches_without_block_mode_is_refused_naming_backward():
    with pytest.raises(ValueError, match=r"`branches` is used by backward='block' only.*Pass backward='block'"):
        LayerDropBackCallback(branches={"net.*.norm": ["fc"]})


def test_an_unknown_backward_is_refused_naming_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"`backward` must be one of \['weights', 'block'\], got 'branch'"):
        LayerDropBackCallback(backward="branch")


# ---------------------------------------------------------------------------------------------- resume
#: Epoch 2 (the DROP epoch) holds steps 8..11; a checkpoint at step 9 is in its middle.
MID_DROP_STEP = 9


def test_resume_in_block_mode_reproduces_the_uninterrupted_run(tmp_path: Path):
    checkpoints = [
        ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}", save_top_k=-1, every_n_epochs=1),
        ModelCheckpoint(dirpath=tmp_path, filename="mid-{step}", save_top_k=-1, every_n_train_steps=MID_DROP_STEP),
    ]
    reference, _, reference_log, _ = fit_block(
        max_epochs=4, callbacks=checkpoints, enable_checkpointing=True, default_root_dir=tmp_path
    )
    assert any(reference_log.dropped.values())
    for where, pattern in {"end of epoch 1": "epoch=1-*.ckpt", "middle of DROP epoch 2": "mid-step=9.ckpt"}.items():
        (path,) = tmp_path.glob(pattern)
        resumed, _, resumed_log, _ = fit_block(max_epochs=4, default_root_dir=tmp_path / "resumed", ckpt_path=path)
        assert resumed_log.dropped, f"{where}: nothing trained after the resume"
        for step, draw in resumed_log.dropped.items():
            assert draw == reference_log.dropped[step], f"{where}: step {step} dropped other branches"
        for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
            assert torch.equal(a, b), f"{where}: {name} differs"
        assert all(not m._forward_pre_hooks for m in resumed.modules())


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.timeout(240)
def test_ddp_spawn_ranks_drop_the_same_branches_and_end_with_the_same_weights(tmp_path: Path):
    from test_ddp import assert_same_draws_and_weights, spawn_run

    torch.manual_seed(0)
    ranks = spawn_run(tmp_path, max_epochs=3, model=TinyResNet(batch_size=4), backward="block")
    assert_same_draws_and_weights(ranks)
    for record in ranks:
        epochs = record["epochs"]
        assert record["candidates"] == BRANCHES
        dropped = epochs[DROP_EPOCH]["dropped"]
        assert dropped and set(dropped) < set(BRANCHES)
        frozen = branch_params(dropped)
        for name, value in epochs[DROP_EPOCH]["end"].items():
            before = epochs[DROP_EPOCH - 1]["end"][name]
            assert torch.equal(before, value) == (name in frozen), name
        assert all(record["final_requires_grad"].values())
