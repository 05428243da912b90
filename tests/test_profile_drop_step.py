"""``ldb-bench --profile``'s measured DROP step (issue 26): a full and a DROP step at one batch, alternating under
the library's own draw; the layer kinds whose dropping costs time, with the ``exclude=`` fix; the plausibility floor.

Timing is never asserted: the culprit logic runs under a deterministic clock whose step cost is a function of
what is frozen at the step's end (a frozen attention input projection costs time, as CPU bf16 autocast makes it
do), and one real run asserts the report's structure only.
"""

from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import VisionTransformer

from lightning_ldb.bench import drop_step
from lightning_ldb.bench.profile import count_flops, profile, render
from lightning_ldb.bench.runner import BenchOptions, Setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyViT(LightningModule):
    """torchvision's VisionTransformer, tiny, no weights: its attention is ``nn.MultiheadAttention(batch_first=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = VisionTransformer(image_size=8, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16,
                                     mlp_dim=32, num_classes=3)  # fmt: skip
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(16, 3, 8, 8, generator=generator), torch.arange(16) % 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)


def _options(**ldb: Any) -> BenchOptions:
    base = {**BenchOptions().ldb, "drop_rate": 0.5, "keep_first": 1, "keep_last": 1}
    return BenchOptions(name="tiny-vit", seed=3, ldb={**base, **ldb})


class FakeClock:
    """A deterministic clock: each read advances by the cost of a step with the built model's current state.

    A step costs 1, less half its frozen share of the parameters (a frozen weight skips its gradient), plus
    ``attention_penalty`` while any attention input projection is frozen (the CPU bf16 path)."""

    def __init__(self, attention_penalty: float) -> None:
        self.penalty, self.now, self.models = attention_penalty, 0.0, []

    def build(self, precision: str = "32-true") -> Any:
        def build() -> Setup:
            torch.manual_seed(0)
            model = TinyViT()
            self.models.append(model)
            return Setup(model, None, {"accelerator": "cpu", "precision": precision})

        return build

    def __call__(self) -> float:
        params = list(self.models[-1].parameters())
        frozen = sum(p.numel() for p in params if not p.requires_grad) / sum(p.numel() for p in params)
        attention = any(not m.in_proj_weight.requires_grad for m in self.models[-1].modules()
                        if isinstance(m, nn.MultiheadAttention))  # fmt: skip
        self.now += 1.0 - 0.5 * frozen + (self.penalty if attention else 0.0)
        return self.now


def test_a_drop_step_slower_than_its_flops_names_the_attention_projections_and_the_exclude_fix():
    clock = FakeClock(attention_penalty=0.5)
    result = profile(clock.build("bf16-mixed"), _options(), steps=1, clock=clock)
    measured, culprits, ceiling = result["drop_step_measured"], result["culprits"], result["drop_step_ceiling"]
    assert (measured["batch_size"], measured["steps"]) == (4, 1)
    # Full steps alternate with DROP steps and nothing is frozen in them: the draw is released after each DROP epoch.
    assert measured["weights"]["full_step_s"] == 1.0 and measured["weights"]["dropped_layers"] > 0
    assert measured["weights"]["ratio"] == measured["weights"]["drop_step_s"] > 1.0
    assert measured["block"]["full_step_s"] == 1.0 and measured["block"]["dropped_layers"] > 0  # ViT's branches
    assert culprits["analysed"] and culprits["names"] == ["MultiheadAttention"]
    assert culprits["kinds"]["MultiheadAttention"]["layers"] == 3 and culprits["kinds"]["MultiheadAttention"]["culprit"]
    assert not any(row["culprit"] for kind, row in culprits["kinds"].items() if kind != "MultiheadAttention")
    # One fit per kind of candidate (the root's class_token and the encoder's pos_embedding are layers too).
    assert set(culprits["kinds"]) == {"MultiheadAttention", "NonDynamicallyQuantizableLinear", "LayerNorm", "Linear",
                                      "VisionTransformer", "Encoder"}  # fmt: skip
    # The fix keeps the attention modules (the owners of in_proj_weight) out of the draw, and then the step saves.
    assert culprits["exclude"] == ["*.self_attention"]
    fixed = culprits["with_exclude"]
    assert fixed["ratio"] < 1.0 and 0.0 < fixed["drop_step_ceiling"] < ceiling["weights"]
    # The bound a comparison uses is the measured floor where it is worse than the FLOP one.
    floor, flop_floor, schedule = result["plausibility_floor"], result["drop_epoch_ratio_floor"], \
        result["schedule_per_sample_ratio"]  # fmt: skip
    assert floor["source"] == "measured"
    assert floor["weights"] == pytest.approx(schedule * measured["weights"]["ratio"])
    assert floor["weights"] > flop_floor["weights"]
    assert floor["block"] == max(flop_floor["block"], schedule * measured["block"]["ratio"])
    text = render(result)
    assert "Dropping these costs time: MultiheadAttention (3 layers" in text
    assert "Fix: exclude=['*.self_attention']; the DROP step then takes" in text


def test_a_drop_step_that_saves_what_its_flops_say_names_nothing():
    clock = FakeClock(attention_penalty=0.0)
    result = profile(clock.build(), _options(), steps=1, clock=clock)
    weights = result["drop_step_measured"]["weights"]
    assert weights["full_step_s"] == 1.0 and 0.0 < weights["ratio"] < 1.0
    assert result["culprits"] == {"analysed": False, "margin": drop_step.CULPRIT_MARGIN, "kinds": {}, "names": [],
                                  "exclude": [], "with_exclude": None}  # fmt: skip
    floor, flop_floor = result["plausibility_floor"], result["drop_epoch_ratio_floor"]
    assert floor["weights"] == flop_floor["weights"]
    assert "costs time" not in render(result)


def test_a_real_bf16_profile_records_both_steps_their_ratio_and_the_floor():
    """The real clock: only the report's structure, and what holds whatever the machine's load."""

    def build() -> Setup:
        torch.manual_seed(0)
        return Setup(TinyViT(), None, {"accelerator": "cpu", "precision": "bf16-mixed"})

    result = profile(build, _options(), steps=1)
    measured = result["drop_step_measured"]
    assert measured["clock"] == "process_time" and measured["batch_size"] == 4
    for mode in ("weights", "block"):
        row = measured[mode]
        assert row["full_step_s"] > 0 and row["drop_step_s"] > 0
        assert row["ratio"] == pytest.approx(row["drop_step_s"] / row["full_step_s"])
        floor, flop_floor = result["plausibility_floor"][mode], result["drop_epoch_ratio_floor"][mode]
        assert floor >= flop_floor and floor == pytest.approx(
            max(flop_floor, result["schedule_per_sample_ratio"] * row["ratio"]))  # fmt: skip
    assert result["plausibility_floor"]["source"] in ("flops", "measured")
    assert set(result["culprits"]) == {"analysed", "margin", "kinds", "names", "exclude", "with_exclude"}
    assert "Measured DROP step / full step at batch 4" in render(result)


# ---------------------------------------------------------------------------------------------- the pieces
def test_exclude_patterns_are_short_and_match_only_the_culprits():
    names = ["enc.0.attn", "enc.1.attn"]
    assert drop_step.exclude_patterns(names, [*names, "enc.0.mlp", "enc.1.mlp"]) == ["*.attn"]
    # A same-named layer that is no culprit forces a longer suffix; a top-level name stays itself.
    assert drop_step.exclude_patterns(["enc.0.attn"], ["enc.0.attn", "dec.attn"]) == ["*.0.attn"]
    assert drop_step.exclude_patterns(["attn"], ["attn", "x.attn"]) == ["attn"]
    assert drop_step.escape("a[1].b*") == "a[[]1].b[*]"


def test_layer_kinds_by_module_class_or_by_owner_and_parameter():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 2))
    assert drop_step.layer_kinds(model, ["0", "1", "2"]) == {"Linear": ["0", "2"], "LayerNorm": ["1"]}
    assert drop_step.layer_kinds(model, ["0.weight", "0.bias", "1.weight"]) == {
        "Linear.weight": ["0.weight"], "Linear.bias": ["0.bias"], "LayerNorm.weight": ["1.weight"]}  # fmt: skip


def test_a_culprit_saves_less_than_the_margin_although_its_flops_say_more():
    assert drop_step.is_culprit(1.20, 0.08)  # costs time
    assert drop_step.is_culprit(0.97, 0.30)  # saves almost nothing where the FLOPs say 30%
    assert not drop_step.is_culprit(0.90, 0.22)  # saves less than its FLOPs, but saves
    assert not drop_step.is_culprit(1.02, 0.0)  # nothing to save, nothing lost beyond the margin
    assert not drop_step.is_culprit(None, 0.5)


def test_the_plausibility_floor_takes_the_worse_of_the_flop_and_the_measured_floor():
    flops = {"weights": 0.80, "block": 0.70}
    assert drop_step.plausibility_floor(flops, 0.9, {"weights": 0.85, "block": 0.75}) == {
        "weights": 0.80, "block": 0.70, "source": "flops"}  # fmt: skip
    floor = drop_step.plausibility_floor(flops, 0.9, {"weights": 1.1, "block": 0.75})
    assert floor == {"weights": pytest.approx(0.99), "block": 0.70, "source": "measured"}
    assert drop_step.plausibility_floor(flops, None, {"weights": 1.1, "block": None})["source"] == "flops"


def test_the_block_ceiling_detaches_every_input_tensor_as_block_mode_does():
    """A branch entry called with its input inside a tuple keyword argument (as Hugging Face blocks call theirs):
    block mode detaches it, so the dropped branch's whole backward goes, input gradient included."""

    class Norm(nn.Module):
        def forward(self, inputs: tuple) -> torch.Tensor:
            return inputs[0] * 2

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc = Norm(), nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(self.norm(inputs=(x,)))

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.block = nn.Linear(4, 4, bias=False), Block()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.block(self.stem(batch)).sum()

    flops = count_flops(Net(), torch.ones(2, 4), ["block.fc"], ["block.norm"], {"block.norm": ["fc"]})
    per_layer = 2 * 2 * 4 * 4
    assert flops["weights_saving"] == per_layer
    assert flops["block_saving"] == 2 * per_layer  # fc's weight and input gradients


def _time_on_rank(rank: int, store: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:

        def fit(callbacks: list, epochs: int) -> None:  # each rank's own step times, as under DDP
            timer = callbacks[1]
            timer.seconds = {"full": [1.0, 1.0], "drop": [0.5 + rank, 0.5 + rank]}
            timer.dropped = [1, 1]

        timed = drop_step.time_full_and_drop(fit, {"drop_rate": 0.5}, steps=1, clock=lambda: 0.0)
        with open(f"{out}.{rank}", "w") as file:
            json.dump(timed, file)
    finally:
        dist.destroy_process_group()


def test_every_rank_of_a_process_group_gets_rank_zeros_step_times(tmp_path):
    # Under DDP each rank times its own steps; the culprit analysis branches on the ratio, and ranks that branched
    # differently would run different collective fits and wait on each other forever.
    import json

    import torch.multiprocessing as mp

    mp.spawn(_time_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "timed")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"timed.{rank}").read_text()) for rank in (0, 1)]
    assert ranks[0]["ratio"] == 0.5
    assert ranks[1] == ranks[0]
