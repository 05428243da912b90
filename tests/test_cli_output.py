"""What a newcomer sees from the ``ldb`` command: short errors, quiet runs, whole help sentences.

The console script itself runs in a subprocess for the checks that depend on the process (exit code,
what reaches stdout and stderr); the other checks call :func:`lightning_ldb.cli.main` in-process,
which is the same code path without the start-up time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")
pytest.importorskip("torchvision")

from lightning_ldb.cli import QUICKSTART, SUBCOMMAND_HELP, main  # noqa: E402
from lightning_ldb.examples.summary import EpochRecord, EpochSummary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART_CONFIG = ROOT / QUICKSTART
LDB_SCRIPT = Path(sys.executable).parent / "ldb"
#: The most lines a bad value may print (the issue's "a few lines at most").
MAX_ERROR_LINES = 5


@pytest.fixture(autouse=True)
def command_line_of_ldb(monkeypatch, tmp_path):
    # LightningCLI warns when it gets `args` while sys.argv holds pytest's own arguments; runs write
    # lightning_logs/ into the working directory.
    monkeypatch.setattr(sys, "argv", ["ldb"])
    monkeypatch.delenv("LDB_VERBOSE", raising=False)
    monkeypatch.chdir(tmp_path)


def ldb_command() -> list[str]:
    """The installed console script if it is next to this Python, else ``python -m lightning_ldb``."""
    return [str(LDB_SCRIPT)] if LDB_SCRIPT.exists() else [sys.executable, "-m", "lightning_ldb"]


def run_ldb(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    python_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # this checkout's lightning_ldb
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    env.pop("LDB_VERBOSE", None)
    return subprocess.run([*ldb_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def exit_code_and_stderr(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(args=args, prog="ldb")
    return exited.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------- bad values
def test_a_bad_callback_value_is_two_lines_on_the_console(tmp_path):
    result = run_ldb("fit", "--config", str(QUICKSTART_CONFIG), "--trainer.callbacks.drop_rate=1.5", cwd=tmp_path)

    assert result.returncode == 2  # argparse's status for a usage error
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= MAX_ERROR_LINES, result.stderr
    assert "Traceback" not in result.stderr and "Union" not in result.stderr
    assert lines[0] == "error: --trainer.callbacks (LayerDropBackCallback): `drop_rate` must be in [0.0, 1.0), got 1.5."
    assert "--trainer.callbacks.help lightning_ldb.LayerDropBackCallback" in lines[1]
    assert not (tmp_path / "lightning_logs").exists()  # nothing ran


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("every=0", "`every` must be an int >= 1, got 0."),
        ("lr_scale=0", "`lr_scale` must be in (0.0, inf), got 0.0."),
        ("resample=batch", "`resample` must be one of ['epoch', 'step'], got 'batch'."),
        ("keep_first=-1", "`keep_first`"),
    ],
)
def test_every_bad_callback_value_names_argument_value_and_range(argument, expected, capsys):
    code, err = exit_code_and_stderr(["fit", "-c", str(QUICKSTART_CONFIG), f"--trainer.callbacks.{argument}"], capsys)

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) <= MAX_ERROR_LINES and "Traceback" not in err
    assert lines[0].startswith("error: --trainer.callbacks (LayerDropBackCallback): ") and expected in lines[0]


def test_a_bad_value_in_a_config_file_is_reported_alike(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(QUICKSTART_CONFIG.read_text().replace("drop_rate: 0.3 ", "drop_rate: 1.5 "))

    code, err = exit_code_and_stderr(["fit", "-c", str(config)], capsys)

    assert code == 2 and len(err.strip().splitlines()) <= MAX_ERROR_LINES
    assert "--trainer.callbacks (LayerDropBackCallback): `drop_rate` must be in [0.0, 1.0), got 1.5." in err


def test_a_bad_model_value_names_the_model_argument(capsys):
    code, err = exit_code_and_stderr(["fit", "-c", str(QUICKSTART_CONFIG), "--model.init_args.model=resnet19"], capsys)

    assert code == 2 and len(err.strip().splitlines()) <= MAX_ERROR_LINES
    assert err.startswith("error: --model (ImageClassifier): `model` must be one of [")
    assert "got 'resnet19'" in err and "--model.help lightning_ldb.examples.ImageClassifier" in err


def test_a_bad_trainer_value_names_the_trainer(capsys):
    code, err = exit_code_and_stderr(["fit", "-c", str(QUICKSTART_CONFIG), "--trainer.accelerator=abacus"], capsys)

    assert code == 2 and len(err.strip().splitlines()) <= MAX_ERROR_LINES
    assert err.startswith("error: --trainer (Trainer): ") and "abacus" in err


def test_a_value_of_the_wrong_type_is_short_too(capsys):
    # A parse error (jsonargparse's own check), not the class's: the full key, the class, what was expected.
    code, err = exit_code_and_stderr(["fit", "-c", str(QUICKSTART_CONFIG), "--trainer.callbacks.every=abc"], capsys)

    assert code == 2 and len(err.strip().splitlines()) <= MAX_ERROR_LINES
    assert "usage:" not in err and "Union" not in err
    first = err.splitlines()[0]
    assert "--trainer.callbacks.every (lightning_ldb.LayerDropBackCallback)" in first
    assert "int" in first and "abc" in first


@pytest.mark.parametrize(
    "argument, key, closest, class_path",
    [
        ("--model.learning_rate=0.1", "model", "lr", "lightning_ldb.examples.ImageClassifier"),  # by its initials
        ("--trainer.callbacks.droprate=0.5", "trainer.callbacks", "drop_rate", "lightning_ldb.LayerDropBackCallback"),
        ("--data.batchsize=16", "data", "batch_size", "lightning_ldb.examples.DigitsDataModule"),
    ],
)
def test_an_unknown_class_argument_names_the_closest_one_and_the_class_help(argument, key, closest, class_path, capsys):
    code, err = exit_code_and_stderr(["fit", "-c", str(QUICKSTART_CONFIG), argument], capsys)

    assert code == 2
    first, tip = err.strip().splitlines()
    assert first.endswith(f"is not accepted; did you mean --{key}.{closest}?"), first
    assert tip.startswith(f"tip: ldb fit --{key}.help {class_path} lists its arguments")


def test_an_unknown_argument_far_from_any_names_only_the_class_help(capsys):
    code, err = exit_code_and_stderr(["fit", "-c", str(QUICKSTART_CONFIG), "--model.zzz=1"], capsys)

    assert code == 2
    first, tip = err.strip().splitlines()
    assert first == "error: --model (lightning_ldb.examples.ImageClassifier): Option 'zzz' is not accepted."
    assert tip.startswith("tip: ldb fit --model.help lightning_ldb.examples.ImageClassifier lists its arguments")


def test_an_unknown_trainer_option_names_the_closest_one(capsys):
    code, err = exit_code_and_stderr(["fit", "-c", str(QUICKSTART_CONFIG), "--trainer.maxepochs=3"], capsys)

    assert code == 2
    assert err.splitlines()[0] == (
        "error: unrecognized arguments: --trainer.maxepochs=3; did you mean --trainer.max_epochs?"
    )


def test_verbose_brings_the_original_error_back(monkeypatch):
    monkeypatch.setenv("LDB_VERBOSE", "1")
    with pytest.raises(ValueError, match=r"`drop_rate` must be in \[0.0, 1.0\), got 1.5"):
        main(args=["fit", "-c", str(QUICKSTART_CONFIG), "--trainer.callbacks.drop_rate=1.5"])


def test_the_verbose_flag_is_taken_out_of_the_arguments(monkeypatch):
    with pytest.raises(ValueError, match="`every` must be an int >= 1"):
        main(args=["fit", "--verbose", "-c", str(QUICKSTART_CONFIG), "--trainer.callbacks.every=0"])


# ---------------------------------------------------------------------- no arguments, --help
def test_fit_without_a_model_points_to_the_quickstart(capsys):
    code, err = exit_code_and_stderr(["fit"], capsys)

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) <= MAX_ERROR_LINES and "usage:" not in err
    assert "fit.model" in lines[0]
    assert f"ldb fit --config {QUICKSTART}" in err and "ldb --help" in err


def test_no_subcommand_points_to_the_quickstart(capsys):
    code, err = exit_code_and_stderr([], capsys)
    assert code == 2 and f"ldb fit --config {QUICKSTART}" in err and len(err.strip().splitlines()) <= MAX_ERROR_LINES


def test_help_shows_every_subcommand_in_whole_sentences(capsys):
    with pytest.raises(SystemExit) as exited:
        main(args=["--help"], prog="ldb")
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the help formatter's line wrapping
    for name, sentence in SUBCOMMAND_HELP.items():
        assert f"{name} {sentence}" in out
    assert "--verbose" in out and "LDB_VERBOSE=1" in out


# ---------------------------------------------------------------------- a quiet run
def test_the_quickstart_console_run_is_quiet_and_shows_progress(tmp_path):
    # The README's quickstart, only tiny: 3 epochs of 4 batches (the third a DROP epoch).
    result = run_ldb(
        "fit", "--config", str(QUICKSTART_CONFIG), "--trainer.max_epochs=3", "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", cwd=tmp_path, timeout=180,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for noise in ("Tip", "FLOPs", "Total params", "site-packages", "deprecated", "GPU available", "Seed set"):
        assert noise not in output, (noise, output)
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["epoch", "mode", "batch"]  # the per-epoch table comes first
    assert [line.split()[1] for line in lines[1:4]] == ["full", "full", "DROP"]
    assert "DROP epochs: 2 (1 of 3)" in result.stdout
    assert len(output.strip().splitlines()) <= 10  # header, 3 rows, blank, 4 summary lines
    assert next(tmp_path.glob("lightning_logs/quickstart/version_0/metrics.csv"))


def test_quiet_mode_leaves_logging_and_warnings_as_they_were(capsys):
    import logging
    import warnings

    levels = [logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric")]
    filters = list(warnings.filters)
    exit_code_and_stderr(["fit", "-c", str(QUICKSTART_CONFIG), "--trainer.callbacks.every=0"], capsys)
    assert [logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric")] == levels
    assert warnings.filters == filters


# ---------------------------------------------------------------------- EpochSummary's mean label
def record(epoch: int, mode: str, seconds: float) -> EpochRecord:
    return EpochRecord(epoch, mode, 32 if mode == "full" else 64, 10, 0.0, 8, seconds, 0.5, 0.9)


def mean_line(records: list[EpochRecord]) -> str:
    summary = EpochSummary()
    summary.records = records
    return next(line for line in summary.format_report(include_table=False).splitlines() if "Mean epoch" in line)


def test_the_mean_label_says_the_first_epoch_was_excluded_only_when_it_was():
    excluded = mean_line([record(0, "full", 9.0), record(1, "DROP", 1.0), record(2, "full", 2.0)])
    assert "full 2.00 s (first epoch excluded)" in excluded and "50% less time" in excluded

    # every=1: epoch 0 is the only full epoch, so the mean is over it, start-up costs and all.
    only = mean_line([record(0, "full", 4.0), record(1, "DROP", 1.0), record(2, "DROP", 1.0)])
    assert "excluded" not in only and "full 4.00 s (epoch 0 only" in only


def test_a_slower_drop_epoch_is_reported_as_more_time():
    line = mean_line([record(0, "full", 9.0), record(1, "full", 1.0), record(2, "DROP", 1.5)])
    assert "DROP epochs took 50% more time." in line and "-" not in line.split("took")[1]


def test_quiet_keeps_the_progress_bar_and_drops_only_the_model_summary(tmp_path):
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    from lightning_ldb.cli import LDBCLI

    args = ["--model=lightning_ldb.examples.ImageClassifier", "--model.model=digits_cnn", "--model.in_channels=1",
            "--data=DigitsDataModule", "--trainer.logger=false", "--seed_everything=0"]  # fmt: skip
    quiet, verbose = LDBCLI(args=args, run=False), LDBCLI(args=args, run=False, verbose=True)

    def kinds(cli):
        callbacks = cli.trainer.callbacks
        return {kind for kind in (ProgressBar, ModelSummary) if any(isinstance(cb, kind) for cb in callbacks)}

    assert kinds(quiet) == {ProgressBar}  # long runs still show their progress
    assert kinds(verbose) == {ProgressBar, ModelSummary}
    assert quiet.trainer.progress_bar_callback is not None


# ---------------------------------------------------------------------- bugs in the user's classes
USER_MODELS = '''
import torch
from lightning.pytorch import LightningModule
from torch import nn


class CheckedModel(LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"`width` must be >= 1, got {width}.")  # the class's own argument check
        self.layer = nn.Linear(width, 1)


class BuggyModel(LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.layer = nn.Linear(width)  # the bug: out_features is missing


class BuggyInTorchModel(LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, dtype="float32"))  # the bug: a string dtype
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def user_model_args(model: str, *more: str) -> list[str]:
    return ["fit", f"--model=user_models.{model}", "--data=lightning_ldb.examples.DigitsDataModule", *more]


@pytest.mark.parametrize(
    "model, error, message",
    [
        ("BuggyModel", TypeError, "missing 1 required positional argument: 'out_features'"),
        ("BuggyInTorchModel", TypeError, "dtype"),
    ],
)
def test_a_bug_in_a_user_class_raises_with_its_traceback(user_models, model, error, message, capsys):
    with pytest.raises(error, match=message) as raised:
        main(args=user_model_args(model), prog="ldb")
    assert "user_models.py" in "".join(__import__("traceback").format_tb(raised.value.__traceback__))
    assert "error:" not in capsys.readouterr().err  # not dressed up as an argument error


def test_a_user_class_checking_its_own_argument_is_two_lines(user_models, capsys):
    code, err = exit_code_and_stderr(user_model_args("CheckedModel", "--model.width=0"), capsys)

    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[0] == "error: --model (CheckedModel): `width` must be >= 1, got 0."


def test_a_bug_in_a_user_class_shows_its_traceback_on_the_console(user_models):
    python_path = os.pathsep.join([str(user_models), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path}
    result = subprocess.run(
        [sys.executable, "-c", "from lightning_ldb.cli import main; main()", *user_model_args("BuggyModel")],
        cwd=user_models,
        env={**env, "PYTHONPATH": os.pathsep.join([str(ROOT), python_path]), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode not in (0, 2)  # an exception, not a usage error
    assert "Traceback" in result.stderr and 'user_models.py", line' in result.stderr
    assert "TypeError: Linear.__init__() missing 1 required positional argument: 'out_features'" in result.stderr
