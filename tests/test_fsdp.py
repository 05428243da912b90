"""LDB under ``ModelParallelStrategy`` with FSDP2 ``fully_shard``: 2 gloo processes on CPU.

One launch of ``ddp_scripts/fsdp_run.py`` (module-scoped fixture :func:`fsdp_runs`) runs three
fits in the same two processes (``epoch``, ``resumed`` from its sharded checkpoint, and ``step``)
and every test below reads their per-rank records. The launch has a timeout, so a hang (ranks that
pair up the wrong collectives) fails instead of blocking the suite.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import TinyMLP, printed_recipe_config, run_two_process_script
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, XLAStrategy

from lightning_ldb.layers import discover_layers
from lightning_ldb.schedule import draw_dropped
from lightning_ldb.schedule import Settings
from lightning_ldb.strategies import FSDP2StrategySync, strategy_sync, tensor_parallel_size
from lightning_ldb.undo import UndoList

SCRIPTS = Path(__file__).parent / "ddp_scripts"
sys.path.insert(0, str(SCRIPTS))

import fsdp_run  # noqa: E402

#: Bound of the one 2-process launch (three short fits); the machine's 2 cores may be shared.
RUN_TIMEOUT = 240
Records = dict[str, list[dict[str, Any]]]
#: The fits that complete (``disagree`` fails on purpose).
TRAINED = ("epoch", "resumed", "step")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Records:
    out_dir = tmp_path_factory.mktemp("fsdp")
    run_two_process_script(
        SCRIPTS / "fsdp_run.py", "--out", str(out_dir), timeout=RUN_TIMEOUT, env={"OMP_NUM_THREADS": "1"}
    )
    records: Records = {}
    for fit in fsdp_run.FITS:
        ranks = [torch.load(out_dir / f"{fit}_rank{rank}.pt", weights_only=False) for rank in range(2)]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
        records[fit] = ranks
    return records


def param_names(record: dict[str, Any], layers: tuple[str, ...]) -> list[str]:
    return [name for name in record["final"] if name.rsplit(".", 1)[0] in layers]


def assert_same_draws_and_full_weights(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = ranks
    assert rank0["epochs"].keys() == rank1["epochs"].keys()
    for epoch, record in rank0["epochs"].items():
        other = rank1["epochs"][epoch]
        assert (record["mode"], record["dropped"]) == (other["mode"], other["dropped"]), epoch
        assert [b["dropped"] for b in record["batches"].values()] == [b["dropped"] for b in other["batches"].values()]
        for name, value in record["end"].items():
            assert torch.equal(value, other["end"][name]), f"epoch {epoch}: full {name} differs between ranks"
    for name, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][name]), f"final full {name} differs between ranks"


# ---------------------------------------------------------------------------------------------- resample="epoch"
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_every_rank_draws_the_same_layers_and_ends_with_the_same_full_weights(fsdp_runs):
    for fit in TRAINED:
        assert_same_draws_and_full_weights(fsdp_runs[fit])
    assert fsdp_runs["epoch"][0]["epochs"][2]["dropped"] == ("net.7", "net.13")  # net.5, frozen by the user, is not a candidate


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_dropped_full_parameters_stay_bitwise_unchanged_through_their_drop_epoch_and_kept_ones_train(fsdp_runs):
    for record in fsdp_runs["epoch"]:
        epochs = record["epochs"]
        assert [e for e, r in epochs.items() if r["mode"] == "drop"] == [2, 4]
        for epoch in (2, 4):
            dropped = param_names(record, epochs[epoch]["dropped"])
            assert dropped
            kept = [n for n in record["final"] if n not in dropped and epochs[epoch]["requires_grad"][n]]
            for batch in epochs[epoch]["batches"].values():
                for name in dropped:
                    assert torch.equal(epochs[epoch]["start"][name], batch["end"][name]), (epoch, name)
                # FSDP2 left the sharded gradient of every dropped parameter None, and gave every kept one a gradient.
                assert batch["frozen_grads"] and not any(batch["frozen_grads"])
                assert all(batch["trainable_grads"])
            moved = [n for n in kept if not torch.equal(epochs[epoch]["start"][n], epochs[epoch]["end"][n])]
            assert moved == kept, f"epoch {epoch}: kept parameters that did not train: {set(kept) - set(moved)}"
            # The next FULL epoch trains the released layers again (net.5 stays frozen: the user froze it).
            if epoch + 1 in epochs:
                released = [n for n in dropped if not n.startswith(fsdp_run.USER_FROZEN + ".")]
                after = epochs[epoch + 1]
                assert all(not torch.equal(after["start"][n], after["end"][n]) for n in released)


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_flags_are_restored_after_fit_and_the_users_frozen_layer_stays_frozen(fsdp_runs):
    frozen = param_names(fsdp_runs["epoch"][0], (fsdp_run.USER_FROZEN,))
    for fit in ("epoch", "resumed"):
        for record in fsdp_runs[fit]:
            assert record["final_requires_grad"] == {n: n not in frozen for n in record["final"]}
    for record in fsdp_runs["step"]:
        assert all(record["final_requires_grad"].values())


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_drop_epochs_load_scaled_per_device_batches_through_the_mixin(fsdp_runs):
    base = fsdp_run.BATCH_SIZE
    for record in fsdp_runs["epoch"]:
        for epoch, epoch_record in record["epochs"].items():
            expected = base * 2 if epoch_record["mode"] == "drop" else base
            assert [b["batch_size"] for b in epoch_record["batches"].values()] == [expected] * (16 // expected)


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_layers_are_discovered_after_configure_model_with_global_parameter_counts(fsdp_runs):
    unsharded = {layer.name: layer.numel for layer in discover_layers(TinyMLP())}
    for fit in TRAINED:
        for record in fsdp_runs[fit]:
            assert record["layers"]["all_dtensor"], "configure_model did not shard: the test would prove nothing"
            assert record["layers"]["numel"] == unsharded


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_drop_steps_reduce_scatter_only_the_gradients_of_trainable_parameters(fsdp_runs):
    # FSDP2 reduce-scatters, per group, the parameters that received a gradient (dim 0 padded to the world size).
    for fit in ("epoch", "step"):
        for record in fsdp_runs[fit]:
            full = record["epochs"][0]["batches"][0]["reduce_scatter_numel"]
            for epoch_record in record["epochs"].values():
                for batch in epoch_record["batches"].values():
                    assert batch["reduce_scatter_numel"] == batch["trainable_padded_numel"]
                    assert (batch["reduce_scatter_numel"] < full) == bool(batch["dropped"])


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_resuming_from_the_sharded_checkpoint_continues_with_the_same_draws_and_weights(fsdp_runs):
    for original, resumed in zip(fsdp_runs["epoch"], fsdp_runs["resumed"]):
        assert resumed["seed"] == original["seed"] == 1  # from the checkpoint: the resumed callback had seed=None
        assert list(resumed["epochs"]) == [2, 3, 4]
        for epoch, record in resumed["epochs"].items():
            assert record["dropped"] == original["epochs"][epoch]["dropped"], epoch
            for name, value in record["end"].items():
                assert torch.equal(value, original["epochs"][epoch]["end"][name]), (epoch, name)
    # Without the checkpoint's seed the callback would have taken seed_everything's 0, which draws otherwise.
    candidates = len(fsdp_runs["epoch"][0]["layers"]["candidates"])
    assert any(draw_dropped(candidates, 0.5, 0, e) != draw_dropped(candidates, 0.5, 1, e) for e in (2, 4))


# ---------------------------------------------------------------------------------------------- resample="step"
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_resample_step_draws_per_optimizer_step_and_adamw_leaves_each_steps_dropped_layers_unchanged(fsdp_runs):
    for record in fsdp_runs["step"]:
        batches = record["epochs"][2]["batches"]
        assert len({b["dropped"] for b in batches.values()}) > 1, "expected a new draw per optimizer step"
        before = record["epochs"][1]["end"]
        for batch in batches.values():
            assert batch["dropped"]
            for name in param_names(record, batch["dropped"]):
                assert torch.equal(before[name], batch["end"][name]), name
            before = batch["end"]


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_ranks_that_disagree_on_the_draw_fail_together_before_training_on_it_and_restore_the_flags(fsdp_runs):
    # A rank that skips a group's reduce-scatter another rank runs would pair up the wrong collectives (a hang or
    # mixed gradients); the draw check raises on every rank first, at the start of DROP epoch 2.
    frozen = param_names(fsdp_runs["epoch"][0], (fsdp_run.USER_FROZEN,))
    for record in fsdp_runs["disagree"]:
        assert record["error"] is not None and "ranks disagree on the layers dropped in epoch 2" in record["error"]
        assert "rank 1 dropped" in record["error"]
        assert (record["epoch"], record["global_step"]) == (2, 8)  # two FULL epochs of 4 steps, nothing of epoch 2
        assert record["requires_grad"] == {n: n not in frozen for n in record["requires_grad"]}


# ---------------------------------------------------------------------------------------------- which strategies
class FakeMesh:
    """DeviceMesh's interface as ModelParallelStrategy builds it: named dimensions with sizes."""

    def __init__(self, **sizes: int) -> None:
        self.mesh_dim_names = tuple(sizes)
        self._sizes = sizes

    def __getitem__(self, name: str) -> Any:
        return SimpleNamespace(size=lambda: self._sizes[name])


def test_tensor_parallelism_is_refused_in_setup_naming_the_supported_configuration():
    trainer = SimpleNamespace(strategy=SimpleNamespace(device_mesh=FakeMesh(data_parallel=2, tensor_parallel=4)))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4.*data_parallel_size=.*tensor_parallel_size=1"):
        FSDP2StrategySync(trainer, "epoch").setup(TinyMLP(), UndoList())
    FSDP2StrategySync(
        SimpleNamespace(strategy=SimpleNamespace(device_mesh=FakeMesh(data_parallel=8, tensor_parallel=1))), "epoch"
    ).setup(TinyMLP(), UndoList())
    assert tensor_parallel_size(FakeMesh(data_parallel=8)) == 1


@pytest.mark.parametrize(
    "strategy",
    [FSDPStrategy, DeepSpeedStrategy, XLAStrategy],
    ids=["FSDPStrategy", "DeepSpeedStrategy", "XLAStrategy"],
)
def test_other_sharded_strategies_are_refused_naming_model_parallel_with_fully_shard(strategy):
    # Built without __init__: DeepSpeed and XLA need their packages to construct; the choice only reads the type.
    instance = strategy.__new__(strategy)
    with pytest.raises(ValueError, match=rf"does not support strategy {strategy.__name__}.*ModelParallelStrategy\("):
        strategy_sync(SimpleNamespace(strategy=instance), TinyMLP(), Settings(), UndoList())
    with pytest.raises(ValueError, match=r"fully_shard"):
        strategy_sync(SimpleNamespace(strategy=instance), TinyMLP(), Settings(), UndoList())


# ---------------------------------------------------------------------------------------------- multi-node recipe
MULTINODE = Path(__file__).resolve().parent.parent / "examples" / "multinode"


def test_fsdp2_recipe_shards_each_vit_encoder_block():
    torchvision = pytest.importorskip("torchvision")
    sys.path.insert(0, str(MULTINODE))
    from fsdp2_model import VIT_BLOCKS, modules_to_shard

    # torchvision's ViT-L/16 layout at toy sizes: the same module names, built in milliseconds.
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=10
    )
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    assert modules_to_shard(vit, VIT_BLOCKS) == blocks
    with pytest.raises(TypeError, match=r"shard='encoder.layers.\*' must be a list"):
        modules_to_shard(vit, "encoder.layers.*")


def test_fsdp2_recipe_config_parses_with_model_parallel_data_parallel_only(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(MULTINODE))  # what the recipes' PYTHONPATH does
    config_path = "examples/multinode/fsdp2_vit_l16.yaml"
    config = printed_recipe_config(monkeypatch, capsys, config_path, ("fsdp2_slurm.sh", "README.md"))
    trainer = config["trainer"]
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert strategy["init_args"]["tensor_parallel_size"] == 1
    assert strategy["init_args"]["data_parallel_size"] == trainer["devices"] * trainer["num_nodes"] == 16
    assert config["model"]["class_path"] == "fsdp2_model.ShardedFineTuneClassifier"
    ldb = [c for c in trainer["callbacks"] if c["class_path"] == "lightning_ldb.LayerDropBackCallback"]
    assert len(ldb) == 1
