"""``ldb-bench`` (``python -m lightning_ldb.bench``): will LDB speed up *my* training? One command.

It reads the same LightningCLI config a user trains with through ``ldb fit`` (``model:``, ``data:``,
``trainer:``, ``seed_everything:``; several ``--config`` compose, later ones win) with ``ldb``'s own
parser, and runs LDB's attribution variants on it side by side::

    ldb-bench --config my.yaml                          # baseline, ldb, batch-only (and ldb-block) on your model
    ldb-bench --config my.yaml --profile                # the ceiling, before any training: a few steps, profile.json
    ldb-bench --config my.yaml --limit-train-batches 50 --epochs 6 --repeats 3
    ldb-bench --config configs/bench/mnist1d-cnn.yaml   # a preset (configs/bench/*.yaml; copy one to start)
    ldb-bench --quick                                   # = --config configs/bench/quick.yaml

A comparison first measures the profile's few steps (or reads ``--profile-json``): a whole-run speed-up
beyond what the run's DROP epochs can give at the profile's floor is reported as noise. Its files go to
``--out``; a folder that holds an earlier run's files is not overwritten (the default folder gets a
numbered sibling, an ``--out`` named on the command line is refused unless ``--overwrite``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from jsonargparse import ActionYesNo
from lightning.pytorch.utilities import rank_zero_only

from lightning_ldb.bench import report
from lightning_ldb.bench.runner import VARIANTS, BenchOptions, Setup, check_strategy, prepare, run_benchmark
from lightning_ldb.cli import LDBCLI, LDBArgumentParser, verbose_requested

#: ``--quick``: the short check's config (digits CNN on the real 8x8 digits, 4 epochs, 3 repetitions).
QUICK_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bench" / "quick.yaml"

#: ``--out``'s default.
DEFAULT_OUT = "outputs/ldb-bench"

#: The files a run writes; a folder holding one of them holds an earlier run.
OUTPUT_FILES = ("report.json", "report.md", "report.png", "profile.json")

DESCRIPTION = """\
Will LDB speed up your training? Runs LayerDropBack and its attribution variants side by side on
your own LightningCLI config (the one you train with through `ldb fit`: model:, data:, trainer:,
seed_everything:), each run from the same seed on the same batches, and reports the time per epoch,
the whole run, the validation metrics your model logs and a verdict. --profile instead measures the
ceiling in a few steps: how much of a full step a DROP step can skip on this model and hardware.
Writes report.json (every epoch, and each variant's verdict), report.md, report.png and the
profile.json its verdicts are bounded by (or, with --profile, profile.json alone) into --out, and
never over an earlier run's files (see --out, --overwrite)."""

EPILOG = """\
examples:
  {prog} --config my.yaml                       # your model, data and trainer: baseline, ldb, batch-only
  {prog} --config my.yaml --profile             # the ceiling before training: a few steps, profile.json
  {prog} --config my.yaml --limit-train-batches 50 --epochs 6 --repeats 3
  {prog} --config configs/quickstart.yaml       # the quickstart's digits CNN
  {prog} --quick                                # = --config configs/bench/quick.yaml ({quick})"""

#: ``(flag, type, default, help)`` of the benchmark's own options (``ldb``'s model/data/trainer options come too).
_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--epochs", Optional[int], None, "training epochs per run (default: 4)"),
    ("--repeats", Optional[int], None, ("repetitions, the run order rotated each time; each run is compared with"
     " the baseline of its own repetition (default: 3)")),
    ("--variants", Optional[str], None, "comma-separated, from: "
     + "; ".join(f"{name}: {what}" for name, (_, what) in VARIANTS.items())
     + " (default: baseline, ldb, batch-only, and ldb-block where block mode finds residual branches)"),
    ("--limit-train-batches", Optional[Union[int, float]], None,
     "training batches per epoch (an int) or fraction of them, for every run (default: the trainer's)"),
    ("--limit-val-batches", Optional[Union[int, float]], None,
     "validation batches per epoch, for every run (default: the trainer's)"),
    ("--skip-epochs", int, 1, "warm-up epochs left out of the DROP / full epoch ratio"),
    ("--drop-rate", Optional[float], None, "LDB: fraction of candidate layers dropped (default: the config's"
     " LayerDropBackCallback, else the paper's 0.3)"),
    ("--every", Optional[int], None, "LDB: a DROP epoch every N epochs (default: the config's, else 2)"),
    ("--lr-scale", Optional[float], None, "LDB: DROP-epoch learning-rate factor (default: the config's, else 2)"),
    ("--batch-scale", Optional[int], None, "LDB: DROP-epoch batch-size factor (default: the config's, else 2)"),
    ("--keep-first", Optional[int], None, "LDB: first layers never dropped (default: the config's, else 4)"),
    ("--keep-last", Optional[int], None, "LDB: last layers never dropped (default: the config's, else 1)"),
    ("--sd-rate", float, 0.5, "stochastic-depth: the last block's drop rate, decaying linearly to the first"),
    ("--freeze-start", float, 0.5, "freezing: fraction of training before freezing begins (Composer's default)"),
    ("--freeze-level", float, 1.0, "freezing: fraction of layers frozen by the end (Composer's default)"),
    ("--profile-steps", int, 10, ("the profile (--profile, or the one measured before a comparison): timed steps"
     " per batch size, after as many warm-up steps")),
    ("--profile-json", Optional[str], None, ("a profile.json from an earlier --profile run: its floor bounds the"
     " verdicts, instead of measuring the profile before the runs")),
    ("--out", str, DEFAULT_OUT, ("output folder; if it holds an earlier run's files, the default one becomes"
     " outputs/ldb-bench-2 (-3, ...) and a named one is refused unless --overwrite")),
)  # fmt: skip
_LDB_FLAGS = ("drop_rate", "every", "lr_scale", "batch_scale", "keep_first", "keep_last")


class BenchCLI(LDBCLI):
    """``ldb``'s parser and instantiation (:class:`~lightning_ldb.cli.LDBCLI`, ``run=False``) plus the bench options.

    Constructing it parses the arguments, seeds (``seed_everything``) and instantiates the model, the data
    and the trainer's callbacks, as ``ldb fit`` would; it builds no Trainer (:meth:`setup` returns the
    user's Trainer arguments for the benchmark to build its own).

    Args:
        args: Command-line arguments, or a config.
        verbose: As for ``ldb``.
    """

    def __init__(self, args: Any = None, verbose: Optional[bool] = None) -> None:
        formatter = _formatter()
        super().__init__(
            args=args,
            prog="ldb-bench",
            verbose=verbose,
            run=False,
            save_config_callback=None,
            parser_kwargs={
                "prog": "ldb-bench",
                "description": DESCRIPTION,
                "epilog": EPILOG.format(prog="ldb-bench", quick=quick_summary()),
                "formatter_class": formatter,
            },
        )

    def add_default_arguments_to_parser(self, parser: LDBArgumentParser) -> None:
        # Before the Trainer's, model's and data's options (added next): --help lists ldb-bench's own first.
        super().add_default_arguments_to_parser(parser)
        group = parser.add_argument_group("ldb-bench (its own options; the Trainer's, model's and data's follow)")
        group.add_argument("--quick", action=ActionYesNo, default=False,
                           help=f"= --config configs/bench/quick.yaml: {quick_summary()}")  # fmt: skip
        text = "measure the ceiling in a few steps (profile.json) instead of the training runs"
        group.add_argument("--profile", action=ActionYesNo, default=False, help=text)
        for flag, kind, default, text in _OPTIONS:
            group.add_argument(flag, type=kind, default=default, help=text)
        text = "write into an --out folder that holds an earlier run's files, replacing them"
        group.add_argument("--overwrite", action=ActionYesNo, default=False, help=text)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # The benchmark builds one Trainer per run from these arguments (see ``setup``): none here.
        self.trainer_kwargs = {**self.config_init["trainer"], **kwargs}
        return None

    def setup(self) -> Setup:
        """The model, data and Trainer arguments this construction instantiated."""
        return Setup(self.model, self.datamodule, dict(self.trainer_kwargs))


def quick_summary() -> str:
    """What ``--quick`` runs, read from its config: the model, the variants, epochs and repetitions."""
    import yaml

    try:
        quick = yaml.safe_load(QUICK_CONFIG.read_text())
    except (OSError, yaml.YAMLError):
        return "the digits CNN (configs/bench/quick.yaml is missing here)"
    variants = ", ".join(v.strip() for v in str(quick.get("variants", "")).split(",") if v.strip())
    model = quick.get("model", {}).get("init_args", {}).get("model", "the model")
    epochs, repeats = quick.get("epochs"), quick.get("repeats")
    return f"{model} on the real 8x8 digits, {variants}; {epochs} epochs, {repeats} repetitions"


def output_folder(out: Path, named: bool, overwrite: bool) -> Path:
    """Where a run writes: ``out``, unless it holds an earlier run's files (:data:`OUTPUT_FILES`).

    Then the default folder (``named=False``) gives way to the first free ``out-2``, ``out-3``, ...; a folder
    named on the command line is refused, unless ``overwrite``.

    Raises:
        ValueError: Naming the folder, the file found, and the two ways on (another ``--out``, ``--overwrite``).
    """
    found = next((name for name in OUTPUT_FILES if (out / name).exists()), None)
    if found is None or overwrite:
        return out
    if named:
        raise ValueError(f"`--out`: {out} already holds {found} from an earlier run. Pass another --out, or"
                         " --overwrite to replace its files.")  # fmt: skip
    index = 2
    while any((out.with_name(f"{out.name}-{index}") / name).exists() for name in OUTPUT_FILES):
        index += 1
    return out.with_name(f"{out.name}-{index}")


def _formatter() -> type:
    """jsonargparse's help formatter, keeping the line breaks of the description and examples (as ``ldb``'s)."""
    import argparse

    from jsonargparse import DefaultHelpFormatter

    return type("BenchHelpFormatter", (argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter), {})


@contextlib.contextmanager
def _quiet_lightning(verbose: bool) -> Iterator[None]:
    """Hide Lightning's banners and data-loader hints (the benchmark prints its own progress), then restore."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in ("does not have many workers", "smaller than the logging interval",
                            "reload_dataloaders_every_n_epochs", "You are trying to `self.log", "args parameter is",
                            "Checkpoint directory", "but have no `val_dataloader`"):  # fmt: skip
                warnings.filterwarnings("ignore", message=f".*{message}.*")
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category)
                warnings.filterwarnings("default", category=category, module=r"lightning_ldb(\.|$)")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def write_outputs(result: dict[str, Any], out: Path) -> str:
    """Write ``report.json``, ``report.md``, ``report.png`` (and the bounding ``profile.json``) into ``out``;
    return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "verdicts": report.verdicts(result)}
    (out / "report.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    markdown = report.render_markdown(result)
    (out / "report.md").write_text(markdown)
    report.plot(result, out / "report.png")
    if result.get("profile"):
        (out / "profile.json").write_text(json.dumps(result["profile"], indent=1, allow_nan=False) + "\n")
    return markdown


def _expand_quick(argv: list[str]) -> list[str]:
    if "--quick" not in argv:
        return argv
    if not QUICK_CONFIG.is_file():
        raise SystemExit(f"error: --quick reads {QUICK_CONFIG}, which is missing (a clone of the repository has it);"
                         " pass --config with a copy of configs/bench/quick.yaml instead.")  # fmt: skip
    at = argv.index("--quick")
    return [*argv[:at], "--config", str(QUICK_CONFIG), *argv[at + 1 :]]


def _say(line: str) -> None:
    # Under a multi-process strategy Lightning re-launches `ldb-bench` once per rank and every rank runs the whole
    # benchmark in step (each fit's collectives keep them together); rank 0 reports and writes the files.
    if rank_zero_only.rank == 0:
        print(line)


def _error(message: str) -> int:
    import sys

    sys.stderr.write(f"error: {message}\ntip: ldb-bench --help lists the options.\n")
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ldb-bench``; returns the exit code (argument errors exit with 2).

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = verbose_requested(True if "--verbose" in args else None)
    args = _expand_quick([arg for arg in args if arg != "--verbose"])
    started = time.perf_counter()
    with _quiet_lightning(verbose):
        first = BenchCLI(args, verbose=verbose)
        config = first.config
        try:  # before anything is built: a strategy given as class_path is checked as configured
            check_strategy(config["trainer"]["strategy"])
        except ValueError as error:
            return _error(str(error))
        # Every run re-parses the same arguments with the seed pinned: a fresh, identically seeded build.
        pinned = [*args, f"--seed_everything={config['seed_everything']}"]
        if config["seed_everything"] is False:
            pinned = [*args, "--seed_everything=0"]
        builds = iter([first.setup()])

        def build() -> Setup:
            reused = next(builds, None)  # the parsing construction's objects serve the first build (the checks)
            return reused if reused is not None else BenchCLI(pinned, verbose=verbose).setup()

        options = BenchOptions(
            name=_name(config, args),
            epochs=config["epochs"] or 4,
            repeats=config["repeats"] or BenchOptions.repeats,
            skip_epochs=config["skip_epochs"],
            seed=int(config["seed_everything"] or 0),
            limit_train_batches=config["limit_train_batches"],
            limit_val_batches=config["limit_val_batches"],
            sd_rate=config["sd_rate"],
            freeze_start=config["freeze_start"],
            freeze_level=config["freeze_level"],
        )
        overrides = {key: config[key] for key in _LDB_FLAGS if config[key] is not None}
        requested = [v.strip() for v in config["variants"].split(",") if v.strip()] if config["variants"] else None
        try:
            out = output_folder(Path(config["out"]), config["out"] != DEFAULT_OUT, config["overwrite"])
            given = read_profile(config["profile_json"]) if config["profile_json"] and not config["profile"] else None
        except ValueError as error:
            return _error(str(error))
        if out != Path(config["out"]):
            _say(f"Note: {config['out']} holds an earlier run's files; this run writes to {out} (--out names another"
                 " folder, --overwrite replaces them).")  # fmt: skip
        about = _about(first)
        if config["profile"]:
            from lightning_ldb.bench import profile

            try:
                options, _ = prepare(build, options, requested or ["baseline"], overrides)
                result = profile.profile(build, options, steps=config["profile_steps"], about=about)
            except ValueError as error:  # bad settings, or LDB finds no candidate layer in the model
                return _error(str(error))
            if rank_zero_only.rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                (out / "profile.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
            _say(profile.render(result) + f"\nWrote profile.json in {out}/")
        else:
            try:
                options, notes = prepare(build, options, requested, overrides)
            except ValueError as error:
                return _error(str(error))
            for note in notes:
                _say(f"Note: {note}")
            bound = given if given is not None else True
            result = run_benchmark(build, options, _say, notes, about, bound, config["profile_steps"])
            markdown = write_outputs(result, out) if rank_zero_only.rank == 0 else ""
            wrote = "report.json, report.md, report.png" + (" and profile.json" if result.get("profile") else "")
            _say("\n" + markdown + f"Wrote {wrote} in {out}/")
    _say(f"ldb-bench finished in {time.perf_counter() - started:.0f} s.")
    return 0


def read_profile(path: str) -> dict[str, Any]:
    """The profile in ``path`` (``--profile-json``), checked to be an ``ldb-bench --profile`` file.

    Raises:
        ValueError: Naming the path, if it cannot be read or is not a profile.
    """
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"`--profile-json`: cannot read {path} ({error}); pass a profile.json that"
                         " ldb-bench --profile wrote.") from error  # fmt: skip
    if not isinstance(found, dict) or not str(found.get("schema", "")).startswith("ldb-profile/"):
        raise ValueError(f"`--profile-json`: {path} is not a profile (no ldb-profile schema); pass a profile.json"
                         " that ldb-bench --profile wrote.")  # fmt: skip
    return found


def _name(config: Any, args: Sequence[str]) -> str:
    paths = config.get("config") or []
    if paths:
        return Path(str(paths[-1])).stem
    model = config.get("model")
    class_path = model.get("class_path") if hasattr(model, "get") else None
    return str(class_path or "model").rsplit(".", 1)[-1]


def _about(cli: BenchCLI) -> dict[str, Any]:
    trainer = cli.trainer_kwargs
    about = {
        "model_class": type(cli.model).__name__,
        "data_class": type(cli.datamodule).__name__ if cli.datamodule is not None else None,
        **{key: str(trainer[key]) for key in ("accelerator", "devices", "precision", "strategy")
           if trainer.get(key) is not None},  # fmt: skip
    }
    return about


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
