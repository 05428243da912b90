"""``ldb-bench``: on a user's own LightningModule and DataModule (written here, not from the examples), through
``--config`` and ``--profile``; its fairness; the peers; its arithmetic and verdict; and that it uses the library
through public names only.

No test asserts anything about timing: figures measured on a shared machine are the report's business.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

import lightning_ldb
import lightning_ldb.examples
from lightning_ldb import LDBDataModuleMixin
from lightning_ldb.bench import cli, compare, report
from lightning_ldb.bench.peers import ProgressiveFreezing, add_stochastic_depth, freeze_fraction
from lightning_ldb.bench.runner import VARIANTS, BenchOptions

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- a user's code
class UserNet(LightningModule):
    """What a user brings: a small classifier that logs ``val_accuracy`` (not the examples' ``val_acc``).

    ``residual=True`` puts two torchvision ``BasicBlock`` in it, so block mode and Stochastic Depth apply.
    Dropout draws from the global RNG, so a variant with fewer steps would leave the RNG elsewhere.
    """

    def __init__(self, width: int = 8, residual: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        blocks = [BasicBlock(width, width), BasicBlock(width, width)] if residual else []
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(), *blocks, nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Dropout(0.1),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def _images(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6, generator=generator) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


class PlainData(LightningDataModule):
    """A user's DataModule without the mixin; it shuffles with the global RNG, as most do."""

    def __init__(self, batch_size: int = 8, samples: int = 64) -> None:
        super().__init__()
        self.batch_size, self.samples = batch_size, samples

    def setup(self, stage: str = "fit") -> None:
        self.train_set, self.val_set = _images(self.samples, 0), _images(24, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=12)


class UserData(LDBDataModuleMixin, PlainData):
    """The same DataModule with the mixin: DROP epochs get ``batch_size * batch_scale``."""


def _config(tmp_path: Path, data: str = "UserData", residual: bool = False) -> Path:
    path = tmp_path / "my.yaml"
    path.write_text(f"""
seed_everything: 3
trainer:
  accelerator: cpu
  max_epochs: 50
  logger: true
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    - class_path: lightning_ldb.LayerDropBackCallback
      init_args: {{drop_rate: 0.5, every: 2, lr_scale: 2.0, batch_scale: 2, keep_first: 1, keep_last: 1}}
model:
  class_path: test_bench.UserNet
  init_args: {{residual: {str(residual).lower()}}}
data:
  class_path: test_bench.{data}
""")
    return path


def _args(config: Path, out: Path, *more: str) -> list[str]:
    return ["--config", str(config), "--epochs", "3", "--repeats", "1", "--limit-train-batches", "4",
            "--profile-steps", "2", "--out", str(out), *more]  # fmt: skip


# ---------------------------------------------------------------------------------------------- --config
def test_config_runs_the_variants_on_the_users_model_and_data(tmp_path, capsys):
    # A profile.json given: its plausibility_floor (preferred to drop_epoch_ratio_floor) bounds the verdicts.
    given = tmp_path / "given.json"
    given.write_text(json.dumps({
        "schema": "ldb-profile/1", "drop_epoch_ratio_floor": {"weights": 0.9, "block": None},
        "plausibility_floor": {"weights": 0.5, "block": None, "source": "measured"},
    }))  # fmt: skip
    assert cli.main(_args(_config(tmp_path), tmp_path / "out", "--repeats", "2", "--profile-json", str(given))) == 0
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result["schema"].startswith("ldb-bench/")
    # Machine-readable verdicts: one per variant against the baseline, on the CPU clock (CPU, in-process data).
    assert result["clock"]["verdict"] == "cpu" and set(result["verdicts"]) == {"ldb", "batch-only"}
    ldb_verdict = result["verdicts"]["ldb"]
    assert ldb_verdict["verdict"] in report.stats.VERDICTS and ldb_verdict["clock"] == "cpu"
    assert ldb_verdict["repetitions"] == 2 and len(ldb_verdict["interval"]) == 2
    assert ldb_verdict["bound"]["floor"] == 0.5 and "plausibility_floor (measured)" in ldb_verdict["bound"]["source"]
    assert ldb_verdict["wall"]["verdict"] in report.stats.VERDICTS  # the wall clock's, for reference
    # Rotated order: repetition 2 starts with the second variant; every epoch carries both clocks.
    assert [(r["variant"], r["repeat"]) for r in result["runs"]][3] == ("ldb", 1)
    assert all(e["cpu_seconds"] > 0 and e["seconds"] > 0 for r in result["runs"] for e in r["epochs"])
    result["runs"] = [run for run in result["runs"] if run["repeat"] == 0]  # the rest as with one repetition
    runs = {run["variant"]: run["epochs"] for run in result["runs"]}
    assert list(runs) == ["baseline", "ldb", "batch-only"]  # no residual branch: no ldb-block
    # The config's LayerDropBackCallback gave the settings (drop_rate 0.5, keep_first 1), not the paper's.
    assert result["config"]["ldb"]["drop_rate"] == 0.5 and result["config"]["ldb"]["keep_first"] == 1
    assert [e["mode"] for e in runs["ldb"]] == ["full", "full", "drop"]
    assert [e["mode"] for e in runs["baseline"]] == ["full"] * 3
    assert [e["batch_size"] for e in runs["ldb"]] == [8, 8, 16]  # the mixin served the DROP batch
    assert [e["steps"] for e in runs["ldb"]] == [4, 4, 2] and [e["steps"] for e in runs["baseline"]] == [4, 4, 4]
    for epochs in runs.values():
        for record in epochs:
            assert {"epoch", "mode", "seconds", "steps", "batch_size", "val_accuracy", "val_loss"} <= set(record)
    # Each run re-parsed the config with its seed: identical weights and batches, so equal full epochs 0 and 1.
    for epoch in (0, 1):
        assert len({(e[epoch]["val_accuracy"], e[epoch]["val_loss"]) for e in runs.values()}) == 1
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "final val_accuracy" in markdown and "| batch-only |" in markdown and "Verdict: ldb" in markdown
    assert "Clock: this process's CPU time" in markdown and "Bound: the profile's DROP-epoch floor" in markdown
    assert "ModelCheckpoint" in markdown  # the user's checkpointing is left out, and the report says so
    assert not list(tmp_path.glob("**/*.ckpt")) and not (tmp_path / "lightning_logs").exists()
    assert (tmp_path / "out" / "report.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "profile.json").read_text())["plausibility_floor"]["weights"] == 0.5
    out = capsys.readouterr().out
    assert "does not use" not in out
    assert f"Wrote report.json, report.md, report.png and profile.json in {tmp_path / 'out'}/" in out


def test_config_without_the_mixin_runs_at_the_base_batch_and_says_so(tmp_path, capsys):
    # Several --config compose as in `ldb fit`: the second file swaps the DataModule of the first.
    overlay = tmp_path / "plain.yaml"
    overlay.write_text("data:\n  class_path: test_bench.PlainData\n")
    argv = _args(_config(tmp_path), tmp_path / "out", "--variants", "baseline,ldb")
    assert cli.main([*argv[:2], "--config", str(overlay), *argv[2:]]) == 0
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    ldb = next(run["epochs"] for run in result["runs"] if run["variant"] == "ldb")
    assert [e["batch_size"] for e in ldb] == [8, 8, 8] and [e["mode"] for e in ldb] == ["full", "full", "drop"]
    line = "PlainData does not use lightning_ldb.LDBDataModuleMixin, so DROP epochs run at the base batch"
    assert line in capsys.readouterr().out
    assert line in (tmp_path / "out" / "report.md").read_text()


def test_accumulate_variant_takes_the_drop_batch_as_accumulation_without_the_mixin(tmp_path, capsys):
    # batch_scaling="accumulate" needs no mixin: the DROP epoch keeps the loader's batch and steps half as often.
    overlay = tmp_path / "plain.yaml"
    overlay.write_text("data:\n  class_path: test_bench.PlainData\n")
    argv = _args(_config(tmp_path), tmp_path / "out", "--variants", "baseline,ldb-accumulate")
    assert cli.main([*argv[:2], "--config", str(overlay), *argv[2:]]) == 0
    runs = {r["variant"]: r["epochs"] for r in json.loads((tmp_path / "out" / "report.json").read_text())["runs"]}
    accumulate, baseline = runs["ldb-accumulate"], runs["baseline"]
    assert [e["batch_size"] for e in accumulate] == [8, 8, 8] and accumulate[2]["mode"] == "drop"
    assert accumulate[2]["steps"] * 2 == baseline[2]["steps"] and accumulate[1]["steps"] == baseline[1]["steps"]
    assert "does not use" not in capsys.readouterr().out  # no mixin needed, so no note


def test_block_variant_and_peers_on_a_residual_user_model(tmp_path):
    out = tmp_path / "out"
    argv = _args(_config(tmp_path, residual=True), out, "--variants", "ldb-block,stochastic-depth,freezing")
    assert cli.main(argv) == 0
    runs = {r["variant"]: r["epochs"] for r in json.loads((out / "report.json").read_text())["runs"]}
    assert [e["mode"] for e in runs["ldb-block"]] == ["full", "full", "drop"]
    assert [e["steps"] for e in runs["stochastic-depth"]] == [4, 4, 4]


def test_bad_arguments_end_in_a_short_error_naming_the_setting(tmp_path, capsys):
    config = _config(tmp_path)
    cases = [
        (["--epochs", "2"], "`epochs`: 2 epochs hold no DROP epoch with every=2"),
        (["--variants", "ldb,nope"], "expected distinct names among baseline"),
        (["--variants", "ldb-block"], "ldb-block does not apply: block mode finds no residual branch in UserNet"),
        (["--drop-rate", "1.5"], "LDB settings of variant baseline"),
        # Workers started by multiprocessing keep their epoch times: refused before any run, named, with the fix.
        (["--trainer.devices=2", "--trainer.strategy=ddp_spawn"], "'ddp_spawn' trains in worker processes started"),
        (["--trainer.devices=2", "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy",
          "--trainer.strategy.start_method=fork"], "DDPStrategy trains in worker processes started by 'fork'"),
    ]
    for more, expected in cases:
        argv = ["--config", str(config), "--out", str(tmp_path / "out"), *more]
        code = cli.main(argv if "--drop-rate" not in more else [*argv, "--variants", "baseline,ldb"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, (more, err)
        assert expected in err or "drop_rate" in err, (more, err)
        assert not (tmp_path / "out").exists()



@pytest.mark.timeout(420)
def test_under_ddp_every_rank_runs_the_benchmark_and_the_profile_and_rank_zero_alone_reports(tmp_path):
    # Lightning re-launches `ldb-bench` as rank 1; both ranks build and fit every run in step. Only rank 0 may
    # print the report and write the files (two writers raced on report.json), and the report says what ran.
    from helpers import two_process_env

    def ldb_bench_on_two_ranks(*argv: str) -> subprocess.CompletedProcess:
        tests = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])  # the config's classes
        done = subprocess.run(
            [sys.executable, "-m", "lightning_ldb.bench", *argv, "--trainer.devices=2", "--trainer.strategy=ddp"],
            env=two_process_env(OMP_NUM_THREADS="1", PYTHONPATH=tests), cwd=tmp_path, capture_output=True, text=True,
            timeout=200,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    done = ldb_bench_on_two_ranks(*_args(_config(tmp_path), tmp_path / "out", "--variants", "baseline,ldb"))
    assert done.stdout.count("# ldb-bench: my") == 1 and done.stdout.count("Wrote ") == 1, done.stdout
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [run["world_size"] for run in result["runs"]] == [2, 2]
    runs = {run["variant"]: run["epochs"] for run in result["runs"]}
    # 64 samples over 2 ranks: 4 steps of 8 per device, and the DROP epoch's 2 steps of 16.
    assert [(e["steps"], e["batch_size"]) for e in runs["ldb"]] == [(4, 8), (4, 8), (2, 16)]
    assert "2 processes (strategy ddp): rank 0's times, per-device batches" in (tmp_path / "out" / "report.md").read_text()
    # --profile alike: rank 0 alone prints and writes, and says its steps include the communication.
    done = ldb_bench_on_two_ranks("--config", str(_config(tmp_path)), "--profile", "--profile-steps", "2", "--out",
                                  str(tmp_path / "prof"))  # fmt: skip
    assert done.stdout.count("2 processes: rank 0's steps, communication included") == 1, done.stdout
    assert json.loads((tmp_path / "prof" / "profile.json").read_text())["config"]["world_size"] == 2


def test_a_strategy_object_that_spawns_workers_fails_after_the_warm_up_naming_the_fix(tmp_path):
    # A Strategy object is not checked before the runs (its start method is private): the short warm-up fit runs
    # in spawned workers, whose epochs never reach this process; a report of nothing must not follow.
    from lightning.pytorch.strategies import DDPStrategy

    trainer_kwargs = {"accelerator": "cpu", "devices": 2, "strategy": DDPStrategy(start_method="spawn")}
    with pytest.raises(RuntimeError, match="trained in worker processes .* strategy='ddp'"):
        compare(UserNet, UserData, trainer_kwargs, variants=["baseline", "ldb"], epochs=3, log=lambda line: None)


# ---------------------------------------------------------------------------------------------- --profile
@pytest.mark.parametrize(("data", "residual"), [("UserData", True), ("PlainData", False)])
def test_profile_measures_the_ceiling_on_the_users_model(tmp_path, capsys, data, residual):
    out = tmp_path / "out"
    assert cli.main(["--config", str(_config(tmp_path, data, residual)), "--profile", "--profile-steps", "2",
                     "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "profile.json").read_text())
    assert result["schema"] == "ldb-profile/1"
    assert (result["base_batch_size"], result["drop_batch_size"]) == (8, 16)
    assert all(result["full_step"][k] > 0 for k in ("forward_s", "backward_s", "optimizer_s"))
    assert all(result["per_sample_s"][k] > 0 for k in ("base_batch", "drop_batch"))
    assert result["peak_memory_bytes"] == {"base_batch": None, "drop_batch": None}  # no GPU
    ceiling = result["drop_step_ceiling"]
    # p = 0.5 of the candidates' weight-gradient FLOPs: more than nothing, less than half of a full step.
    assert 0.0 < ceiling["weights"] < 0.5
    if residual:  # a dropped branch skips its whole backward, more than its weight gradients
        assert result["candidates"]["block"] == 2 and ceiling["weights"] < ceiling["block"] < 0.5
    else:
        assert ceiling["block"] is None and result["candidates"]["block"] is None
    text = capsys.readouterr().out
    assert "DROP step ceiling at drop_rate 0.5: weights" in text and "per sample (ms)" in text


def test_profile_ceiling_counts_the_candidates_weight_gradients_by_hand():
    """A chain of Linear layers: a weight gradient costs what the forward does, 2*in*out per sample."""
    from lightning_ldb.bench.profile import count_flops

    class Chain(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(4)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch).sum()

    flops = count_flops(Chain(), torch.ones(2, 4), ["net.2"], None)
    per_layer = 2 * 2 * 4 * 4  # 2 * batch * in * out
    assert flops["forward"] == 4 * per_layer
    assert flops["backward"] == (4 + 3) * per_layer  # 4 weight gradients, 3 input gradients (not the first's)
    assert flops["weights_saving"] == per_layer and flops["block_saving"] is None


def test_profile_ceiling_counts_a_dropped_branchs_whole_backward_by_hand():
    """y = x + conv2(relu(bn1(conv1(x)))) in a torchvision BasicBlock: a dropped branch skips both convs'
    weight and input gradients; the stem below still gets its gradient through the shortcut."""
    from lightning_ldb.bench.profile import count_flops

    class Block(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 1, bias=False)
            self.block = BasicBlock(4, 4)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.block(self.stem(batch)).sum()

    flops = count_flops(Block(), torch.ones(2, 1, 3, 3), ["block.conv1"], ["block.conv1"])
    conv = 2 * 2 * 9 * 4 * 4 * 9  # 2 * batch * positions * in * out * 3x3
    assert flops["weights_saving"] == conv  # conv1's weight gradient only
    assert flops["block_saving"] == 4 * conv  # both convs' weight and input gradients


# ---------------------------------------------------------------------------------------------- fairness
class _FirstBatches(Callback):
    """Records the labels of each epoch's first training batch, per run."""

    def __init__(self) -> None:
        self.runs: list[dict[int, list[int]]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.runs.append({})

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.runs[-1][trainer.current_epoch] = batch[1].tolist()


def test_every_variant_starts_alike_and_sees_the_same_batches():
    recorder = _FirstBatches()
    result = compare(
        lambda: UserNet(), lambda: UserData(), {"accelerator": "cpu", "callbacks": [recorder]},
        variants=["baseline", "ldb", "batch-only", "freezing"], epochs=4, repeats=1, seed=5,
        ldb={"keep_first": 1, "keep_last": 1}, limit_train_batches=4, log=lambda line: None, profile=False,
    )  # fmt: skip
    runs = {run["variant"]: run["epochs"] for run in result["runs"]}
    # Same initial weights, batches and order: the full epochs 0 and 1 end with equal validation metrics.
    for epoch in (0, 1):
        assert len({(e[epoch]["val_accuracy"], e[epoch]["val_loss"]) for e in runs.values()}) == 1, epoch
    # batch-only's DROP epoch took half the steps (half the dropout draws); epoch 3 still starts on the same batch.
    _warm_up, baseline, ldb, batch_only, freezing = recorder.runs
    assert baseline[3] == batch_only[3] == ldb[3] == freezing[3]
    assert runs["baseline"][2]["val_loss"] != runs["batch-only"][2]["val_loss"]  # the DROP epoch did differ


def test_repetitions_rotate_the_run_order_so_each_variant_takes_each_place():
    result = compare(lambda: UserNet(), lambda: UserData(), {"accelerator": "cpu"},
                     variants=["baseline", "ldb", "batch-only"], epochs=3, repeats=3, limit_train_batches=2,
                     log=lambda line: None, profile=False)  # fmt: skip
    order = [(run["variant"], run["repeat"]) for run in result["runs"]]
    assert order == [("baseline", 0), ("ldb", 0), ("batch-only", 0), ("ldb", 1), ("batch-only", 1), ("baseline", 1),
                     ("batch-only", 2), ("baseline", 2), ("ldb", 2)]  # fmt: skip
    assert result["profile"] is None and result["verdicts"]["ldb"]["bound"] is None  # profile=False: no bound
    assert result["verdicts"]["ldb"]["repetitions"] == 3 and result["clock"]["verdict"] == "cpu"


def test_every_run_starts_with_the_thread_count_the_benchmark_started_with():
    # The CPU clock counts every thread's time: a callback that leaves torch with more threads after its fit
    # must not give the next runs more threads (and more CPU time) than the first.
    class MoreThreadsAfterEachFit(Callback):
        def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
            torch.set_num_threads(torch.get_num_threads() + 1)

    before = torch.get_num_threads()
    try:
        trainer_kwargs = {"accelerator": "cpu", "callbacks": [MoreThreadsAfterEachFit()]}
        result = compare(lambda: UserNet(), lambda: UserData(), trainer_kwargs, variants=["baseline", "ldb"], epochs=3,
                         repeats=1, limit_train_batches=2, log=lambda line: None, profile=False)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert {e["threads"] for run in result["runs"] for e in run["epochs"]} == {before}
    assert result["clock"]["threads"] == before


# ---------------------------------------------------------------------------------------------- peers
def test_freezing_freezes_the_earliest_layers_progressively_and_restores_them():
    model = UserNet()
    leaves = [m for m in model.net if list(m.parameters())]  # net.0, 1, 3, 5, 8, 12: 4 convs, a BatchNorm, the Linear
    starts: dict[int, list[torch.Tensor]] = {}
    frozen: dict[int, tuple[str, ...]] = {}

    class Snapshot(Callback):
        def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            starts[trainer.current_epoch] = [m.weight.detach().clone() for m in leaves]
            frozen[trainer.current_epoch] = freezing.frozen_layers

    freezing = ProgressiveFreezing()  # Composer's defaults: freeze_start 0.5, freeze_level 1.0
    trainer = Trainer(max_epochs=4, callbacks=[Snapshot(), freezing], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=UserData())
    moved = [[not torch.equal(a, b) for a, b in zip(starts[e], starts[e + 1])] for e in (0, 1, 2)]
    assert all(moved[0]) and all(moved[1])  # nothing frozen in the first half of training
    # After epoch 2 (3/4 of training) the first half of the 13 leaf modules is frozen: net.0 to net.5.
    assert frozen[3] == tuple(f"net.{i}" for i in range(6)) and frozen[2] == ()
    end = [m.weight.detach() for m in leaves]
    assert [not torch.equal(a, b) for a, b in zip(starts[3], end)] == [False, False, False, False, True, True]
    assert all(p.requires_grad for p in model.parameters())  # trainable again after the fit
    assert freeze_fraction(0.75, 0.5, 1.0) == 0.5


def test_stochastic_depth_skips_identity_blocks_forward_and_backward_and_uses_its_own_generator():
    net = resnet18(num_classes=3)
    assert add_stochastic_depth(net, final_rate=0.0, seed=0) == 5
    net = resnet18(num_classes=3)
    add_stochastic_depth(net, final_rate=0.999, seed=0)
    last = net.layer4[1]  # identity shortcut, the last block: rate 0.999
    x = torch.rand(2, 512, 2, 2)
    state = torch.get_rng_state()
    net.train()
    assert torch.equal(last(x), x)  # branch skipped
    assert torch.equal(torch.get_rng_state(), state)  # draws do not touch the global RNG
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert last.conv1.weight.grad is None  # skipped in backward too
    assert net.layer4[0].conv1.weight.grad is not None  # the projecting block always runs
    net.eval()
    assert not torch.equal(last(x), x)  # evaluation runs every block


def test_stochastic_depth_rejects_networks_without_identity_blocks():
    with pytest.raises(ValueError, match="identity shortcuts"):
        add_stochastic_depth(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.5, seed=0)
    with pytest.raises(ValueError, match="final_rate"):
        add_stochastic_depth(resnet18(), 1.0, seed=0)


# ---------------------------------------------------------------------------------------------- presets
def test_presets_are_configs_users_can_copy(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ldb-bench"])  # LightningCLI warns when pytest's own arguments are there too
    for path in sorted((ROOT / "configs" / "bench").glob("*.yaml")):
        bench = cli.BenchCLI(["--config", str(path), "--trainer.accelerator=cpu"])
        assert bench.config["epochs"] and bench.config["repeats"], path
        assert isinstance(bench.model, LightningModule), path
    quick = cli.BenchCLI(cli._expand_quick(["--quick"])).config
    assert (quick["epochs"], quick["repeats"]) == (4, 3)
    assert quick["variants"] == "baseline,ldb,batch-only,drop-only"


def test_variants_change_only_what_they_measure():
    options = BenchOptions()
    ldb = options.callback_args("ldb")
    for name in ("baseline", "stochastic-depth", "freezing"):
        assert options.callback_args(name) is None
    assert options.callback_args("batch-only") == {**ldb, "drop_rate": 0.0}
    assert options.callback_args("drop-only") == {**ldb, "batch_scale": 1}
    assert options.callback_args("ldb-block") == {**ldb, "backward": "block"}
    assert options.callback_args("ldb-accumulate") == {**ldb, "batch_scaling": "accumulate"}
    assert ldb["lr_scale"] == 2.0 and ldb["batch_scale"] == 2 and ldb["drop_rate"] == 0.3
    assert "freezing" in VARIANTS


# ---------------------------------------------------------------------------------------------- a user of the library
#: The library modules whose public names the profile uses to drop as a DROP step does.
DROP_MECHANISM = ("lightning_ldb.dropping",)


def test_the_benchmark_imports_only_public_names_of_the_library():
    """The benchmark reaches the library as a user does: ``lightning_ldb.__all__``, the examples' public names,
    the ``ldb`` command's public classes, and itself; and the profile the public classes of the dropping mechanism
    (freezing, block mode's detaching), so that its ceilings drop what a DROP step drops."""
    public = {
        "lightning_ldb": set(lightning_ldb.__all__),
        "lightning_ldb.examples": set(lightning_ldb.examples.__all__),
    }
    offending = []
    for path in sorted((ROOT / "lightning_ldb" / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in modules:
                if not module.startswith("lightning_ldb") or module.startswith("lightning_ldb.bench"):
                    continue
                if module in public and (name is None or name in public[module]):
                    continue
                if module == "lightning_ldb.cli" and name is not None and not name.startswith("_"):
                    continue  # the ldb command's parser, reused by ldb-bench
                if module in DROP_MECHANISM and name is not None and not name.startswith("_"):
                    continue  # the profile drops as a DROP step does, with the library's own mechanism
                offending.append(f"{path.name}: from {module} import {name}")
    assert not offending, offending


# ---------------------------------------------------------------------------------------------- arithmetic and verdict
def _run(variant, repeat, seconds, modes=None, acc=0.5):
    modes = modes or ["full"] * len(seconds)
    epochs = [
        {"epoch": e, "seconds": s, "mode": m, "steps": 2 if m == "drop" else 4, "batch_size": 8, "val_acc": acc}
        for e, (s, m) in enumerate(zip(seconds, modes))
    ]
    return {"variant": variant, "repeat": repeat, "epochs": epochs}


def test_speedup_and_spread_by_hand():
    assert report.speedup(75.0, 100.0) == 0.25
    assert report.speedup(120.0, 100.0) == -0.2
    with pytest.raises(ValueError, match="baseline_seconds"):
        report.speedup(1.0, 0.0)
    assert report.spread([2.0, 4.0, 9.0]) == {"mean": 5.0, "min": 2.0, "max": 9.0, "n": 3}
    assert report.spread([]) is None


def test_drop_to_full_ratio_leaves_out_warm_up_and_needs_both_modes():
    epochs = _run("ldb", 0, [10.0, 4.0, 2.0, 4.0, 3.0], ["full", "full", "drop", "full", "drop"])["epochs"]
    assert report.drop_to_full_ratio(epochs, skip_epochs=1) == pytest.approx(2.5 / 4.0)
    assert report.drop_to_full_ratio(epochs, skip_epochs=0) == pytest.approx(2.5 / 6.0)
    assert report.drop_to_full_ratio(epochs[:2], skip_epochs=0) is None


def test_each_run_is_compared_with_the_baseline_of_its_own_repetition():
    modes = ["full", "full", "drop"]
    result = {
        "config": {"skip_epochs": 1},
        "runs": [
            _run("baseline", 0, [1.0, 1.0, 2.0]),  # 4 s
            _run("ldb", 0, [1.0, 1.0, 1.0], modes, acc=0.7),  # 3 s: +25%
            _run("ldb", 1, [2.0, 2.0, 2.0], modes, acc=0.9),  # 6 s against 8 s: +25%, not -50%
            _run("baseline", 1, [2.0, 2.0, 4.0]),
        ],
    }
    rows = {row["variant"]: row for row in report.summarize(result)}
    assert list(rows) == ["baseline", "ldb"]
    assert rows["ldb"]["speedup"] == {"mean": 0.25, "min": 0.25, "max": 0.25, "n": 2}
    assert rows["ldb"]["verdict"]["ratios"] == [0.75, 0.75] and rows["ldb"]["verdict"]["speedup"] == 0.25
    assert rows["ldb"]["verdict"]["verdict"] == "too noisy to tell"  # 2 repetitions: a 50% interval only
    assert rows["ldb"]["seconds"]["min"] == 3.0 and rows["ldb"]["seconds"]["max"] == 6.0
    assert rows["ldb"]["drop_to_full"]["mean"] == 1.0
    assert rows["ldb"]["steps"]["mean"] == 10.0
    assert rows["ldb"]["final_metric"]["mean"] == pytest.approx(0.8)
    assert rows["baseline"]["drop_to_full"] is None and rows["baseline"]["verdict"] is None
    table = report.markdown_table(report.summarize(result), report.monitored_metric(result))
    row = "| ldb | 4.50 (3.00 to 6.00) | 1.00 | 10 | 0.800 (0.700 to 0.900) | +25.0% (+25.0 to +25.0) | too noisy to tell |"
    assert row in table
    assert "| baseline | 6.00 (4.00 to 8.00) | – |" in table and "final val_acc" in table


# ---------------------------------------------------------------------------------------------- statistics
def _result(times: dict, modes=None, profile=None, clock="cpu") -> dict:
    """A benchmark result from whole-run times per variant and repetition, spread evenly over 4 epochs
    (DROP epoch 2 for the LDB variants); both clocks get the same times."""
    runs = []
    for variant, per_repeat in times.items():
        for repeat, seconds in enumerate(per_repeat):
            run = _run(variant, repeat, [seconds / 4] * 4, modes or (
                ["full", "full", "drop", "full"] if variant != "baseline" else None))  # fmt: skip
            for epoch in run["epochs"]:
                epoch["cpu_seconds"] = epoch["seconds"]
            runs.append(run)
    return {"config": {"skip_epochs": 1, "epochs": 4, "repeats": 3, "name": "synthetic"}, "environment": {},
            "clock": {"verdict": clock, "threads": 1}, "profile": profile, "runs": runs}  # fmt: skip


def test_median_interval_is_the_range_below_six_repetitions_and_narrows_after():
    assert report.stats.median_interval([3.0, 1.0]) == (1.0, 3.0, 0.5)
    assert report.stats.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    low, high, coverage = report.stats.median_interval([float(v) for v in range(10)])
    assert (low, high) == (1.0, 8.0) and coverage == pytest.approx(1 - 2 * 11 / 1024)  # k = 2 of 10: 97.9%
    assert report.stats.max_speedup(1, 4, floor=0.78) == pytest.approx(0.25 * 0.32)  # margin 0.10: 0.68x at best
    with pytest.raises(ValueError, match="ratios"):
        report.stats.judge([])


def test_a_slow_baseline_repetition_makes_the_verdict_too_noisy_not_faster_in_every_repetition():
    # The case: the baseline's repetitions at 2.72 s and 4.65 s; ldb at 3.0 and 3.1 s in both.
    judged = report.verdicts(_result({"baseline": [2.72, 4.65], "ldb": [3.0, 3.1]}))["ldb"]
    assert judged["verdict"] == "too noisy to tell" and not judged["beyond_bound"]
    assert judged["spread"]["baseline"] == pytest.approx((4.65 - 2.72) / 3.685)
    lines = report.verdict_lines(_result({"baseline": [2.72, 4.65], "ldb": [3.0, 3.1]}))
    assert lines[0].startswith("Verdict: ldb: too noisy to tell") and "more repetitions (--repeats 5)" in lines[0]
    assert not any("faster" in line for line in lines[:1])


def test_a_drift_that_stretches_every_repetition_alike_leaves_the_paired_verdict_standing():
    # The machine slows down 40% per repetition; ldb takes 0.9x the baseline's time in each of them.
    result = _result({"baseline": [4.0, 5.6, 7.84], "ldb": [3.6, 5.04, 7.056]})
    judged = report.verdicts(result)["ldb"]
    assert judged["verdict"] == "faster" and judged["speedup"] == pytest.approx(0.1)
    # Each variant's own repetitions moved by far more than the 10% judged, and the report says so.
    assert judged["spread"]["ldb"] > 0.5 and judged["spread"]["baseline"] > 0.5
    assert any("the machine's speed changed between repetitions" in line for line in report.verdict_lines(result))


def test_a_speed_up_beyond_the_profiles_floor_is_flagged_as_noise():
    # One DROP epoch in 4 at the floor 0.78x (margin 0.10) allows 8%; a measured 20% is noise, not LDB.
    profile = {"drop_epoch_ratio_floor": {"weights": 0.78, "block": None}, "drop_step_ceiling": {"weights": 0.09}}
    times = {"baseline": [4.0, 4.0, 4.0], "ldb": [3.2, 3.2, 3.2], "batch-only": [3.8, 3.8, 3.8]}
    result = _result(times, profile=profile)
    judged = report.verdicts(result)
    assert judged["ldb"]["verdict"] == "too noisy to tell" and judged["ldb"]["beyond_bound"]
    assert judged["ldb"]["bound"]["max_speedup"] == pytest.approx(0.08)
    assert judged["batch-only"]["verdict"] == "faster" and not judged["batch-only"]["beyond_bound"]  # 5%, within
    assert judged["batch-only"]["bound"]["floor"] == 0.78  # the looser of 0.78 and 1 - 0.09
    text = report.render_markdown({**result, "notes": [], "environment": _ENV, "config": _CONFIG})
    assert "beyond the 8.0% the profile allows" in text and "ldb can gain at most 8.0% (floor 0.78x)" in text
    # The other helper's plausibility_floor, where the profile has it, is preferred to drop_epoch_ratio_floor.
    both = {**profile, "plausibility_floor": {"weights": 0.6, "block": 0.5, "source": "measured"}}
    assert report.profile_floor(both) == {"weights": 0.6, "block": 0.5, "ceiling": 0.09,
                                          "source": "plausibility_floor (measured)"}  # fmt: skip


def test_two_repetitions_are_too_noisy_for_a_verdict_however_they_agree():
    judged = report.verdicts(_result({"baseline": [4.0, 4.0], "ldb": [3.0, 3.0]}))["ldb"]
    assert judged["verdict"] == "too noisy to tell" and judged["confidence"] == 0.5
    assert "a verdict needs 3 or more" in judged["reason"]


def test_one_repetition_is_too_noisy_to_tell_and_the_advice_names_the_single_repetition():
    result = _result({"baseline": [4.0], "ldb": [2.0]})
    judged = report.verdicts(result)["ldb"]
    assert judged["verdict"] == "too noisy to tell" and judged["repetitions"] == 1
    line = report.verdict_lines(result)[0]
    assert "one repetition, no interval" in line and "a single repetition measures no noise" in line
    assert "small" not in line


def test_no_measurable_difference_needs_an_interval_within_five_percent_of_one():
    same = report.verdicts(_result({"baseline": [4.0, 4.0, 4.0], "ldb": [3.96, 4.04, 4.0]}))["ldb"]
    assert same["verdict"] == "no measurable difference"
    wide = report.verdicts(_result({"baseline": [4.0, 4.0, 4.0], "ldb": [3.4, 4.6, 4.0]}))["ldb"]
    assert wide["verdict"] == "too noisy to tell"
    # All on one side, but 45 points apart for a 27% difference: the repetitions disagree more than the difference.
    apart = report.verdicts(_result({"baseline": [4.0, 4.0, 4.0], "ldb": [2.0, 3.8, 2.9]}))["ldb"]
    assert apart["verdict"] == "too noisy to tell" and apart["ratio_interval"] == [0.5, 0.95]
    slower = report.verdicts(_result({"baseline": [4.0, 4.0, 4.0], "ldb": [4.8, 4.9, 4.85]}))["ldb"]
    assert slower["verdict"] == "slower" and slower["speedup"] == pytest.approx(-0.2125)


def test_the_verdict_reads_the_cpu_clock_on_a_cpu_and_the_wall_clock_where_cpu_time_misses_work():
    from lightning_ldb.bench.runner import choose_clock

    epoch = {"loader_workers": 0, "device": "cpu"}
    assert choose_clock([{"epochs": [epoch], "world_size": 1}])[0] == "cpu"
    assert choose_clock([{"epochs": [{**epoch, "loader_workers": 2}]}])[0] == "wall"  # workers' CPU is not ours
    assert choose_clock([{"epochs": [{**epoch, "device": "cuda"}]}])[0] == "wall"
    assert choose_clock([{"epochs": [epoch], "world_size": 2}])[0] == "wall"
    # The verdict follows the clock: the wall clock stretched by another process, the CPU time not.
    result = _result({"baseline": [4.0, 4.0, 4.0], "ldb": [3.6, 3.6, 3.6]})
    for run in result["runs"]:
        if run["variant"] == "baseline" and run["repeat"] == 1:
            for epoch in run["epochs"]:
                epoch["seconds"] *= 2.0
    judged = report.verdicts(result)["ldb"]
    assert judged["verdict"] == "faster" and judged["wall"]["verdict"] == "too noisy to tell"
    result["clock"]["verdict"] = "wall"
    assert report.verdicts(result)["ldb"]["verdict"] == "too noisy to tell"


def test_the_words_about_dropping_follow_the_direction_of_the_gap():
    def rows(ldb, schedule):
        return [{"variant": "ldb", "drop_to_full": report.spread(ldb)},
                {"variant": "batch-only", "drop_to_full": report.spread(schedule)}]  # fmt: skip

    assert "dropping saved 0.30 of a full epoch" in report.attribution_lines(rows([0.6, 0.62], [0.9, 0.92]))[0]
    # The case: ldb's DROP epochs the longer ones; dropping cost time there, it saved nothing.
    cost = report.attribution_lines(rows([0.80, 0.82], [0.60, 0.62]))[0]
    assert "0.81x" in cost and "dropping cost 0.20 of a full epoch" in cost and "saves" not in cost
    assert "within the noise" in report.attribution_lines(rows([0.6, 0.9], [0.7, 0.8]))[0]
    assert report.attribution_lines(rows([0.6], [0.9])[:1]) == []
    whole = report.attribution_lines(rows([0.6, 0.62], [0.9, 0.92]), _result(
        {"baseline": [4.0, 4.0, 4.0], "ldb": [3.0, 3.0, 3.0], "batch-only": [3.6, 3.62, 3.58]}))[1]  # fmt: skip
    assert "the dropping made the whole run 16.7% faster than the schedule alone" in whole
    # Dropping alone saves at most the ceiling (9%, and the margin) of its one DROP epoch in 4: 16.7% is noise.
    bounded = _result({"baseline": [4.0, 4.0, 4.0], "ldb": [3.0, 3.0, 3.0], "batch-only": [3.6, 3.62, 3.58]},
                      profile={"drop_epoch_ratio_floor": {"weights": 0.7}, "drop_step_ceiling": {"weights": 0.09}})
    whole = report.attribution_lines(rows([0.6, 0.62], [0.9, 0.92]), bounded)[1]
    assert "within the noise (+16.7%, a speed-up of 16.7% is beyond the 4.7% the profile allows" in whole


_ENV = {"device": "CPU", "cpu": "x", "cpu_count": 2, "torch": "t", "lightning": "l", "date": "d",
        "load_average_1min": 2.5}  # fmt: skip
_CONFIG = {"name": "synthetic", "epochs": 4, "repeats": 3, "seed": 0, "skip_epochs": 1, "ldb": {
    "drop_rate": 0.3, "every": 2, "lr_scale": 2.0, "batch_scale": 2, "keep_first": 4, "keep_last": 1}}  # fmt: skip


def test_the_figure_titles_the_verdicts_and_the_clock(tmp_path):
    result = {**_result({"baseline": [4.0, 4.1, 4.0], "ldb": [3.6, 3.7, 3.6]}), "config": _CONFIG, "environment": _ENV}
    assert report.title(result) == (
        "ldb-bench synthetic vs baseline, this process's CPU time: ldb 10.0% faster (+9.8% to +10.0%)"
    )
    report.plot(result, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 0


def test_output_folder_never_replaces_an_earlier_run_silently(tmp_path):
    out = tmp_path / "ldb-bench"
    assert cli.output_folder(out, named=False, overwrite=False) == out  # empty: used as it is
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert cli.output_folder(out, named=False, overwrite=False) == tmp_path / "ldb-bench-2"  # the default moves on
    (tmp_path / "ldb-bench-2").mkdir()
    (tmp_path / "ldb-bench-2" / "profile.json").write_text("{}")
    assert cli.output_folder(out, named=False, overwrite=False) == tmp_path / "ldb-bench-3"
    with pytest.raises(ValueError, match="already holds report.json .* --overwrite"):
        cli.output_folder(out, named=True, overwrite=False)  # one the user named: refused
    assert cli.output_folder(out, named=True, overwrite=True) == out


def test_a_named_out_holding_a_report_is_refused_before_any_run(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    assert cli.main(_args(_config(tmp_path), tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "already holds report.json from an earlier run. Pass another --out, or --overwrite" in err
    assert (tmp_path / "out" / "report.json").read_text() == "{}"


def test_help_lists_ldb_benchs_own_options_first_and_what_quick_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ldb-bench"])  # LightningCLI warns when pytest's own arguments are there too
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    own, trainer = text.index("ldb-bench (its own options"), text.index("\n  --trainer.accelerator ")
    assert own < text.index("\n  --repeats REPEATS") < trainer and own < text.index("\n  --quick") < trainer
    quick = cli.BenchCLI(cli._expand_quick(["--quick"])).config
    listed = " ".join(text[text.index("\n  --quick"):text.index("\n  --profile,")].split())
    assert ", ".join(quick["variants"].split(",")) in listed and f"{quick['repeats']} repetitions" in listed
