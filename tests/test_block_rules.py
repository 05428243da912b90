"""Block mode never builds half a branch: a built-in rule matches a library's own class with every module it names,
and setup says which blocks it recognised."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from helpers import make_trainer
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldb import LayerDropBackCallback
from lightning_ldb.branches import discover_branches, unrecognised_blocks

transformers = pytest.importorskip("transformers")


def tiny_mixtral() -> nn.Module:
    config = transformers.MixtralConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=50, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.MixtralForCausalLM(config)


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def members_of(model: nn.Module) -> dict[str, tuple[str, ...]]:
    return {branch.name: branch.members for branch in discover_branches(model)}


def test_a_mixtral_layer_has_two_whole_branches_the_moe_with_its_norm():
    found = members_of(tiny_mixtral())
    assert found["model.layers.0.post_attention_layernorm"] == (
        "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp",
    )
    assert found["model.layers.1.input_layernorm"] == ("model.layers.1.input_layernorm", "model.layers.1.self_attn")
    assert len(found) == 4


def test_a_layer_without_a_module_its_rule_names_is_not_recognised_rather_than_cut_in_half():
    model = tiny_mixtral()
    layer = model.model.layers[0]
    layer.block_sparse_moe = layer.mlp  # the layout of transformers 4.x: the MoE is not ``mlp``
    del layer.mlp
    found = members_of(model)
    assert not any(name.startswith("model.layers.0.") for name in found)  # no branch of the norm alone
    assert set(found) == {"model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"}
    assert unrecognised_blocks(model) == ["'model.layers.0' (MixtralDecoderLayer without 'mlp')"]


class LlamaDecoderLayer(nn.Module):
    """A remote-code copy: named like the transformers class, defined elsewhere (and free to differ from it)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = nn.LayerNorm(width), nn.Linear(width, width)
        self.post_attention_layernorm, self.mlp = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class RemoteCode(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.layers = nn.Sequential(*(LlamaDecoderLayer() for _ in range(3)))
        self.head = nn.Linear(8, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.layers(self.stem(x))), y)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 4, generator=generator), torch.arange(16) % 2), batch_size=8)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_copy_of_a_known_class_outside_its_library_is_named_with_branches_only():
    ldb = LayerDropBackCallback(backward="block", keep_first=1, keep_last=1, seed=0, batch_scale=1, every=1)
    with pytest.raises(ValueError, match=r"no residual branch.*'layers\.0' \(LlamaDecoderLayer, defined in .*not"
                       r" transformers\.models\.llama\.modeling_llama\)"):
        make_trainer(2, [ldb]).fit(RemoteCode())
    spec = {"layers.*.input_layernorm": ["self_attn"], "layers.*.post_attention_layernorm": ["mlp"]}
    ldb = LayerDropBackCallback(backward="block", keep_first=1, keep_last=1, seed=0, batch_scale=1, every=1, branches=spec)
    make_trainer(2, [ldb]).fit(RemoteCode())
    assert len(ldb.candidate_layers) == 6


class LMModule(LightningModule):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.network(input_ids=batch[0], labels=batch[0]).loss

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=8)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Still(Callback):
    """Placed after LDB: the branches dropped in DROP epoch 1, and the parameters that did not move in it."""

    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            self.dropped = self.ldb.dropped_layers

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.still = {n for n, p in pl_module.named_parameters() if torch.equal(p.detach(), self.start[n])}


@pytest.mark.parametrize("build, block", [(tiny_mixtral, "MixtralDecoderLayer"), (tiny_llama, "LlamaDecoderLayer")])
def test_setup_says_which_blocks_block_mode_recognised_and_a_dropped_branch_is_dropped_whole(build, block, caplog):
    ldb = LayerDropBackCallback(backward="block", drop_rate=0.5, keep_first=1, keep_last=1, seed=1, batch_scale=1, every=1)
    still = Still(ldb)
    model = LMModule(build())
    with caplog.at_level(logging.INFO):
        make_trainer(2, [ldb, still]).fit(model)
    assert f"block mode: 4 branches in 2 {block}" in caplog.text
    assert still.dropped  # this seed drops some branches, not all
    members = {b.name: b.members for b in discover_branches(model)}
    for entry in members:
        names = [n for n, _ in model.named_parameters() if any(n.startswith(f"{m}.") for m in members[entry])]
        moved = [n not in still.still for n in names]
        # A dropped branch (norm and attention, or norm and the whole MoE) does not move at all; a kept one moves.
        assert not any(moved) if entry in still.dropped else all(moved), (entry, names, still.dropped)


def test_blocks_left_unrecognised_beside_recognised_ones_are_warned_about():
    from types import SimpleNamespace

    from lightning_ldb.callback import report_branches

    model = tiny_mixtral()
    layer = model.model.layers[0]
    layer.block_sparse_moe = layer.mlp
    del layer.mlp
    settings = SimpleNamespace(backward="block", branches=None)
    with pytest.warns(UserWarning, match=r"'model.layers.0' \(MixtralDecoderLayer without 'mlp'\).*`branches=`"):
        report_branches(model, settings, discover_branches(model))
