"""The ``ldb`` command: every YAML config parses, the quickstart trains, and users' own classes work."""

from __future__ import annotations

import csv
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("jsonargparse")
pytest.importorskip("torchvision")
yaml = pytest.importorskip("yaml")

import lightning_ldb  # noqa: E402
from lightning_ldb import LayerDropBackCallback  # noqa: E402
from lightning_ldb.cli import LDBCLI, SUBCOMMAND_HELP, main  # noqa: E402
from lightning_ldb.examples import EpochSummary, ImageClassifier  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# configs/bench/ holds ldb-bench presets (with ldb-bench's own keys: epochs, repeats, variants); test_bench parses them.
ALL_CONFIGS = sorted(path for path in CONFIGS.rglob("*.yaml") if path.relative_to(CONFIGS).parts[0] != "bench")
LDB_CLASS_PATH = "lightning_ldb.LayerDropBackCallback"


@pytest.fixture(autouse=True)
def command_line_of_ldb(monkeypatch):
    # LightningCLI warns when it gets `args` while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["ldb"])


def config_stack(path: Path) -> list[Path]:
    """The configs ``path`` is used with, in order, as the README and the files' headers show."""
    kind = path.relative_to(CONFIGS).parts[0]
    cifar_base = CONFIGS / "base" / "cifar.yaml"
    experiment = CONFIGS / "scratch" / "cifar10_resnet50.yaml"
    ldb = CONFIGS / "method" / "ldb.yaml"
    if path.name == "quickstart.yaml" or kind == "base":
        return [path]
    if kind == "scratch":
        return [cifar_base, path, ldb]
    if kind == "method":
        return [cifar_base, experiment, path]
    if kind == "finetune":
        return [CONFIGS / "base" / "finetune.yaml", path, ldb]
    if kind == "ablations":
        return [cifar_base, path]
    return [cifar_base, experiment, ldb, path]  # top-level overlays such as ddp.yaml


def print_config(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as exited:
        main(args=["fit", *args, "--print_config"])
    assert exited.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def test_configs_are_found():
    names = {path.relative_to(CONFIGS).as_posix() for path in ALL_CONFIGS}
    assert {"quickstart.yaml", "base/cifar.yaml", "method/ldb.yaml", "ddp.yaml"} <= names
    assert sum(name.startswith("scratch/") for name in names) == 12  # 6 models x CIFAR-10/100


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda path: path.relative_to(CONFIGS).as_posix())
def test_every_config_parses(path, capsys):
    args = [arg for config in config_stack(path) for arg in ("--config", str(config))]
    config = print_config(args, capsys)

    model, data = config["model"], config["data"]
    model_class, data_class = resolve(model["class_path"]), resolve(data["class_path"])
    if issubclass(model_class, ImageClassifier):
        # The model must fit the data: a valid network, as many classes and channels as the data has.
        init_args = model["init_args"]
        assert init_args["model"] in model_class.model_names
        assert init_args["num_classes"] == data_class.num_classes
        assert init_args.get("in_channels", 3) == data_class.in_channels
    callbacks = config["trainer"]["callbacks"] or []
    ldb = [callback for callback in callbacks if callback["class_path"] == LDB_CLASS_PATH]
    if ldb:
        assert callbacks[-1]["class_path"] == LDB_CLASS_PATH  # so that --trainer.callbacks.<arg>=... sets LDB's


def test_ldb_and_baseline_runs_differ_only_by_the_method(capsys):
    def stack(method: str) -> list[str]:
        files = ["base/cifar.yaml", "scratch/cifar100_resnet50.yaml", f"method/{method}.yaml"]
        return [arg for name in files for arg in ("-c", str(CONFIGS / name))]

    ldb, baseline = print_config(stack("ldb"), capsys), print_config(stack("baseline"), capsys)
    ldb_callbacks = ldb["trainer"].pop("callbacks")
    baseline_callbacks = baseline["trainer"].pop("callbacks")
    assert ldb_callbacks[:-1] == baseline_callbacks and ldb_callbacks[-1]["class_path"] == LDB_CLASS_PATH
    paper = {"drop_rate": 0.3, "every": 2, "lr_scale": 2.0, "batch_scale": 2, "keep_first": 4, "keep_last": 1}
    assert {key: ldb_callbacks[-1]["init_args"][key] for key in paper} == paper
    assert ldb["trainer"]["logger"]["init_args"].pop("version") == "ldb"
    assert baseline["trainer"]["logger"]["init_args"].pop("version") == "baseline"
    assert ldb == baseline
    assert ldb["model"]["init_args"]["lr"] == 0.1 and ldb["data"]["init_args"]["batch_size"] == 128


def test_quickstart_trains_end_to_end(tmp_path, monkeypatch, capsys):
    # The quickstart config as the README runs it, only shorter: 3 epochs, the third a DROP epoch.
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    cli = LDBCLI(args=["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs=3"])

    assert torch.get_num_threads() == threads  # TorchThreads(1) restored the setting after fit

    summary = next(callback for callback in cli.trainer.callbacks if isinstance(callback, EpochSummary))
    assert [record.mode for record in summary.records] == ["full", "full", "DROP"]
    assert [record.batch_size for record in summary.records] == [32, 32, 64]
    assert summary.records[-1].monitored > 0.9  # validation accuracy on held-out digits
    printed = capsys.readouterr().out
    assert "DROP epochs: 2 (1 of 3)" in printed and "Mean epoch time: DROP" in printed and "val_acc: best" in printed

    metrics_file = next(tmp_path.glob("lightning_logs/quickstart/version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics_file.open()))
    columns = set(rows[0])
    assert {"ldb/drop_epoch", "ldb/epoch_time", "epoch_time", "val_acc", "train_loss"} <= columns
    assert [float(row["ldb/drop_epoch"]) for row in rows if row["ldb/drop_epoch"]] == [0.0, 0.0, 1.0]


def test_fit_with_the_users_own_model_and_data(tmp_path, monkeypatch):
    # Classes from the user's own module (here tests/helpers.py), in YAML and on the command line.
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mine.yaml"
    config.write_text(
        """
trainer:
  accelerator: cpu
  max_epochs: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_ldb.LayerDropBackCallback
      init_args:
        drop_rate: 0.3
        seed: 0
model:
  class_path: helpers.TinyMLP
  init_args:
    width: 16
data:
  class_path: helpers.TinyDataModule
  init_args:
    batch_size: 8
"""
    )
    cli = LDBCLI(args=["fit", "-c", str(config), "--trainer.callbacks.drop_rate=0.5", "--data.n=32"])

    from helpers import TinyDataModule, TinyMLP

    assert isinstance(cli.model, TinyMLP) and cli.model.hparams.width == 16
    assert isinstance(cli.datamodule, TinyDataModule) and cli.datamodule.n == 32
    ldb = next(callback for callback in cli.trainer.callbacks if isinstance(callback, LayerDropBackCallback))
    assert ldb.drop_rate == 0.5
    assert cli.trainer.current_epoch == 3 and ldb.mode == "drop"  # epoch 2 was a DROP epoch
    assert float(cli.trainer.callback_metrics["ldb/drop_epoch"]) == 1.0


def test_classes_resolve_by_short_name(capsys):
    config = print_config(
        ["--model=ImageClassifier", "--data=DigitsDataModule", "--trainer.callbacks+=LayerDropBackCallback"], capsys
    )
    assert config["model"]["class_path"] == "lightning_ldb.examples.ImageClassifier"
    assert config["data"]["class_path"] == "lightning_ldb.examples.DigitsDataModule"
    assert config["trainer"]["callbacks"][0]["class_path"] == LDB_CLASS_PATH


def test_an_unknown_model_name_lists_the_choices(tmp_path, monkeypatch, capsys):
    # The command reports it as a usage error (exit status 2); verbose runs raise the ValueError itself.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDB_VERBOSE", raising=False)
    args = ["fit", "-c", str(CONFIGS / "quickstart.yaml"), "--model.init_args.model=resnet19"]
    with pytest.raises(SystemExit) as exited:
        main(args=args)
    assert exited.value.code == 2
    assert re.search("`model` must be one of .*'digits_cnn'.*got 'resnet19'", capsys.readouterr().err)
    with pytest.raises(ValueError, match="`model` must be one of .*'digits_cnn'.*got 'resnet19'"):
        main(args=["--verbose", *args])


def test_fit_help_explains_model_data_and_callbacks(capsys):
    with pytest.raises(SystemExit) as exited:
        main(args=["fit", "--help"], prog="ldb")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--model.help CLASS" in out and "--trainer.callbacks" in out and "LayerDropBackCallback" in out


def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
    # What `python -m lightning_ldb --help` executes (run_path: pytest's import hooks stay out of it).
    monkeypatch.setattr(sys, "argv", ["__main__.py", "--help"])
    main_file = Path(lightning_ldb.__file__).parent / "__main__.py"
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(main_file), run_name="__main__")
    assert exited.value.code == 0
    assert "usage: python -m lightning_ldb" in capsys.readouterr().out


def test_ldb_console_script_help():
    script = Path(sys.executable).parent / "ldb"
    if not script.exists():
        pytest.skip("the `ldb` console script is not installed next to this Python (pip install -e .)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: ldb" in result.stdout and "LayerDropBack" in result.stdout
    assert "ldb fit --config configs/quickstart.yaml" in result.stdout
    help_text = " ".join(result.stdout.split())  # undo the line wrapping
    for name, sentence in SUBCOMMAND_HELP.items():  # whole sentences, not a docstring's first line
        assert f"{name} {sentence}" in help_text
