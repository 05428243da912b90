"""The ``ldb`` command (also ``python -m lightning_ldb``): Lightning's ``LightningCLI`` in subclass mode.

``--model`` and ``--data`` (``model:``/``data:`` in YAML) take any LightningModule and DataModule by
class path, and :class:`~lightning_ldb.LayerDropBackCallback` is configured under
``trainer.callbacks`` like any other callback::

    ldb fit --config configs/quickstart.yaml
    ldb fit --model=my_package.MyModel --data=my_package.MyData \\
        --trainer.callbacks+=LayerDropBackCallback --trainer.callbacks.drop_rate=0.3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any, Optional

from lightning.pytorch.cli import ArgsType, LightningCLI

DESCRIPTION = """\
Train any LightningModule with LayerDropBack (LDB), from the command line or YAML configs.

This is Lightning's LightningCLI in subclass mode: --model and --data take any LightningModule and
LightningDataModule by class path (or by class name once imported), and LDB is a callback under
trainer.callbacks (class_path: lightning_ldb.LayerDropBackCallback, init_args: drop_rate, every, ...).
Run `{prog} fit --help` for the options of a training run."""

EPILOG = """\
examples:
  # LDB on scikit-learn's digits: offline, under a minute on a CPU, prints a per-epoch summary
  {prog} fit --config configs/quickstart.yaml
  # the complete configuration a command resolves to
  {prog} fit --config configs/quickstart.yaml --print_config
  # a paper experiment (Table 2): shared base, model x dataset, then the method (ldb or baseline)
  {prog} fit -c configs/base/cifar.yaml -c configs/scratch/cifar10_resnet50.yaml -c configs/method/ldb.yaml
  # your own model and data, with LDB
  {prog} fit --model=my_package.MyModel --data=my_package.MyDataModule \\
      --trainer.callbacks+=LayerDropBackCallback --trainer.callbacks.drop_rate=0.3
  # the arguments of a class
  {prog} fit --model.help lightning_ldb.examples.ImageClassifier
  {prog} fit --trainer.callbacks.help LayerDropBackCallback"""

FIT_DESCRIPTION = """\
Fit a model with the Trainer. The model (--model), the data (--data) and the callbacks
(--trainer.callbacks, where LayerDropBackCallback goes) are given by class path, on the command line
or in YAML files (--config, repeatable: later files and flags override earlier ones).
Class arguments are listed with --model.help CLASS, --data.help CLASS, --trainer.callbacks.help CLASS."""


def _help_formatter() -> type:
    """jsonargparse's help formatter, keeping the line breaks of the descriptions and examples."""
    from jsonargparse import DefaultHelpFormatter  # an optional dependency: imported when the CLI runs

    return type("LDBHelpFormatter", (argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter), {})


class LDBCLI(LightningCLI):
    """``LightningCLI`` with any LightningModule and DataModule by class path, and the ``ldb`` help texts.

    Args:
        args: Command-line arguments (a list of strings, or a dict/Namespace config); ``None`` reads
            ``sys.argv``.
        prog: Program name shown in help messages; ``None`` takes it from ``sys.argv[0]``.
        **kwargs: Passed to :class:`~lightning.pytorch.cli.LightningCLI` (e.g. ``run=False``).
    """

    def __init__(self, args: ArgsType = None, prog: Optional[str] = None, **kwargs: Any) -> None:
        _import_examples()
        formatter = _help_formatter()
        shown = prog or os.path.basename(sys.argv[0])  # argparse's default program name
        parser_kwargs: dict[str, Any] = {
            "description": DESCRIPTION.format(prog=shown),
            "epilog": EPILOG.format(prog=shown),
            "formatter_class": formatter,
            "fit": {"description": FIT_DESCRIPTION, "formatter_class": formatter},
        }
        if prog is not None:
            parser_kwargs["prog"] = prog
        kwargs.setdefault("parser_kwargs", parser_kwargs)
        # Runs without a logger write config.yaml to default_root_dir: let a rerun replace it.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class=None, datamodule_class=None, args=args, **kwargs)


def _import_examples() -> None:
    # jsonargparse resolves a short class name (`--model=ImageClassifier`) among the imported
    # subclasses: importing this package made `LayerDropBackCallback` one, this makes the examples
    # others. Without the `examples` extra the CLI still takes the user's classes by class path.
    try:
        importlib.import_module("lightning_ldb.examples")
    except ImportError:
        pass


def main(args: ArgsType = None, prog: Optional[str] = None) -> None:
    """Run the ``ldb`` command.

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
        prog: Program name shown in help messages.

    Raises:
        SystemExit: With a hint to install ``jsonargparse[signatures]`` if it is missing, and from
            argument parsing (``--help``, invalid arguments).
    """
    if importlib.util.find_spec("jsonargparse") is None:
        raise SystemExit(
            "The ldb command needs jsonargparse[signatures]: pip install 'lightning-ldb[examples]'"
            " (or pip install 'jsonargparse[signatures]')."
        )
    LDBCLI(args=args, prog=prog)


if __name__ == "__main__":  # pragma: no cover
    main()
