"""The ``ldb`` command (also ``python -m lightning_ldb``): Lightning's ``LightningCLI`` in subclass mode.

``--model`` and ``--data`` (``model:``/``data:`` in YAML) take any LightningModule and DataModule by
class path, and :class:`~lightning_ldb.LayerDropBackCallback` is configured under
``trainer.callbacks`` like any other callback::

    ldb fit --config configs/quickstart.yaml
    ldb fit --model=my_package.MyModel --data=my_package.MyData \\
        --trainer.callbacks+=LayerDropBackCallback --trainer.callbacks.drop_rate=0.3

The command is quiet by default and reports a bad value in two lines; ``--verbose`` (or the
environment variable ``LDB_VERBOSE=1``) brings back Lightning's messages, third-party warnings and
full tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import dis
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NoReturn

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_ldb import _compat

#: Environment variable that makes ``ldb`` verbose, like its ``--verbose`` flag.
VERBOSE_ENV = "LDB_VERBOSE"
VERBOSE_FLAG = "--verbose"
QUICKSTART = "configs/quickstart.yaml"

DESCRIPTION = """\
Train any LightningModule with LayerDropBack (LDB), from the command line or YAML configs.

This is Lightning's LightningCLI in subclass mode: --model and --data take any LightningModule and
LightningDataModule by class path (or by class name once imported), and LDB is a callback under
trainer.callbacks (class_path: lightning_ldb.LayerDropBackCallback, init_args: drop_rate, every, ...).
Run `{prog} fit --help` for the options of a training run.

Quiet by default: no Lightning info messages or tips, no model summary, no third-party deprecation
warnings, and a bad value is reported in two lines. --verbose anywhere on the command line (or the
environment variable LDB_VERBOSE=1) brings all of them back, with full tracebacks."""

EPILOG = """\
examples:
  # LDB on scikit-learn's digits: offline, on the CPU, prints a per-epoch summary
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

#: One whole sentence per subcommand for ``ldb --help`` (Lightning's come from the first line of the
#: Trainer methods' docstrings, which is cut mid-sentence for some of them).
SUBCOMMAND_HELP = {
    "fit": "Train a model (with LDB when LayerDropBackCallback is among the callbacks).",
    "validate": "Run one evaluation epoch over the validation set.",
    "test": "Run one evaluation epoch over the test set.",
    "predict": "Run the model on the predict set and return its predictions.",
}

#: The loggers whose INFO messages (device lines, "Tip" adverts, "Seed set to") quiet mode hides.
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
_UNION_ERROR = "Does not validate against any of the Union subtypes"
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":\s*')
_GIVEN_CLASS = re.compile(r"Problem with given class_path '([^']+)':\s*")
_SUBCOMMAND_IN_PROG = re.compile(r"\s+(fit|validate|test|predict)$")
#: jsonargparse's complaint about an argument a class does not take, after :func:`_short_parse_message`.
_NOT_ACCEPTED = re.compile(r"^--(?P<key>[\w.]+) \((?P<cls>[\w.]+)\): Option '(?P<name>[^']+)' is not accepted$")


def verbose_requested(verbose: bool | None = None) -> bool:
    """Whether ``ldb`` runs verbosely: ``verbose`` if given, else the ``LDB_VERBOSE`` environment variable.

    Args:
        verbose: An explicit choice; ``None`` reads ``LDB_VERBOSE`` (``1``, ``true``, ``yes`` or ``on``).

    Example:
        >>> verbose_requested(True), verbose_requested(False)
        (True, False)
    """
    if verbose is not None:
        return verbose
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _help_formatter() -> type:
    """jsonargparse's help formatter, keeping the line breaks of the descriptions and examples."""
    from jsonargparse import DefaultHelpFormatter  # an optional dependency: imported when the CLI runs

    return type("LDBHelpFormatter", (argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter), {})


def _shown_prog(parser: argparse.ArgumentParser) -> str:
    return parser.prog.replace(" [options]", "")


class LDBArgumentParser(LightningArgumentParser):
    """Lightning's parser, reporting a parse error in a few lines instead of the whole usage.

    The short form names the argument, the value and what was expected, and points to ``--help``
    (and, when no model was given, to the quickstart config). Verbose runs, and parsers that raise
    instead of exiting (``exit_on_error=False``, as jsonargparse uses internally), behave as in
    jsonargparse.
    """

    #: Set by :class:`LDBCLI`: report errors in full, as jsonargparse does.
    verbose = False

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.verbose or not self.exit_on_error:
            super().error(message, ex)
        short = _short_parse_message(message, ex)
        prog = _shown_prog(self)
        not_accepted = _NOT_ACCEPTED.match(short)
        if not_accepted is not None:  # a class argument that does not exist: the closest one, and the class's help
            key, class_path, name = not_accepted.group("key", "cls", "name")
            closest = _closest(name, _init_parameters(_import_class_path(class_path)))
            lines = [f"error: {short}" + (f"; did you mean --{key}.{closest}?" if closest else ".")]
            lines.append(f"tip: {prog} --{key}.help {class_path} lists its arguments; --verbose shows the full error.")
            sys.stderr.write("\n".join(lines) + "\n")
            self.exit(2)
        if message.startswith("unrecognized arguments: "):
            short += "".join(self._did_you_mean(message.split(": ", 1)[1].split()))
        lines = [f"error: {short}"]
        if ("arguments are required" in message and "model" in message) or '"subcommand"' in message:
            command = _SUBCOMMAND_IN_PROG.sub("", prog)
            lines.append(f"tip: to try LDB, run: {command} fit --config {QUICKSTART} (from a clone of the repository)")
        lines.append(f"tip: {prog} --help lists the options; --verbose shows the full error.")
        sys.stderr.write("\n".join(lines) + "\n")
        self.exit(2)

    def _did_you_mean(self, arguments: list[str]) -> Iterator[str]:
        """``"; did you mean --trainer.max_epochs?"`` for each unrecognized ``--option`` close to a real one."""
        options = [option for option in _compat.option_strings(self) if option.startswith("--")]
        several = len(arguments) > 1
        for argument in arguments:
            option = argument.split("=", 1)[0]
            if option.startswith("--"):
                prefix = option.rpartition(".")[0]  # ``--trainer`` of ``--trainer.maxepochs``: a trainer option
                siblings = [o for o in options if o.rpartition(".")[0] == prefix]
                closest = _closest(option, siblings)
                if closest is not None:
                    yield f"; {option}: did you mean {closest}?" if several else f"; did you mean {closest}?"


def _closest(name: str, valid: list[str]) -> str | None:
    """The valid name closest to ``name`` (``difflib``), or one ``name`` abbreviates by its initials, or ``None``."""
    bare = name.lstrip("-").rpartition(".")[2]
    initials = [v for v in valid if len(bare) > 1 and "".join(w[:1] for w in v.rpartition(".")[2].split("_")) == bare]
    reverse = [v for v in valid if "".join(w[:1] for w in bare.split("_")) == v.lstrip("-").rpartition(".")[2]]
    found = difflib.get_close_matches(name, valid, n=1, cutoff=0.6) or initials or reverse
    return found[0] if found else None


def _init_parameters(cls: Any) -> list[str]:
    """The keyword arguments ``cls(...)`` takes, its bases' too where its ``__init__`` passes ``**kwargs`` on."""
    names: list[str] = []
    for klass in getattr(cls, "__mro__", ())[:-1]:  # not ``object``
        if "__init__" not in vars(klass):
            continue
        try:
            parameters = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            break
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names += [p.name for p in parameters if p.kind in kinds and p.name != "self" and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return names


def _short_parse_message(message: str, ex: BaseException | None) -> str:
    """jsonargparse's message without the Union listing: the full key, then the first real problem."""
    if _UNION_ERROR not in message or ex is None:
        return message
    detail = next((str(e) for e in _chain(ex) if _UNION_ERROR not in str(e)), None)
    if detail is None:
        return message
    text = " ".join(line.strip() for line in (message.splitlines()[0] + "\n" + detail).splitlines())
    keys, classes = _PARSER_KEY.findall(text), _GIVEN_CLASS.findall(text)
    rest = _GIVEN_CLASS.sub("", _PARSER_KEY.sub("", text)).strip()
    where = f" ({classes[0]})" if classes else ""
    return f"--{'.'.join(keys)}{where}: {rest}" if keys else rest


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _in_jsonargparse(filename: str) -> bool:
    return f"{os.sep}jsonargparse{os.sep}" in filename


def _raised_by_init(error: BaseException) -> tuple[type, bool] | None:
    """The class whose ``__init__`` raised ``error``, and whether as a check of its arguments; or ``None``.

    A check of the arguments is a ``raise`` statement in the ``__init__`` of a class the command instantiates
    (below jsonargparse's or Lightning's call), or in code it calls from its own file, LDB or Lightning (their
    argument checks). Anything else, e.g. a ``TypeError`` from calling ``nn.Linear(width)`` without
    ``out_features``, or an error raised inside torch, is a bug in that code.
    """
    entries = list(_traceback_entries(error))
    if not entries or _in_jsonargparse(entries[-1].tb_frame.f_code.co_filename):
        return None  # jsonargparse's own complaint (a wrapper), not the class's
    for index, entry in enumerate(entries):
        frame = entry.tb_frame
        in_init = frame.f_code.co_name == "__init__" and "self" in frame.f_locals
        if in_init and not _in_jsonargparse(frame.f_code.co_filename):
            own_file = frame.f_code.co_filename
            checked = _is_raise_statement(entries[-1]) and all(
                _in_checking_code(e.tb_frame, own_file) for e in entries[index:]
            )
            return type(frame.f_locals["self"]), checked
    return None


def _in_checking_code(frame: Any, own_file: str) -> bool:
    """Whether ``frame`` runs in ``own_file``, LDB or Lightning; a dataclass's generated ``__init__`` (no file of its
    own, e.g. ``lightning_ldb.Settings``) counts as its class's file."""
    filename = frame.f_code.co_filename
    if filename == own_file or _in_checking_library(filename):
        return True
    owner = frame.f_locals.get("self") if filename.startswith("<") else None
    path = getattr(sys.modules.get(type(owner).__module__), "__file__", None) if owner is not None else None
    return path is not None and (path == own_file or _in_checking_library(path))


def _traceback_entries(error: BaseException) -> Iterator[TracebackType]:
    entry = error.__traceback__
    while entry is not None:
        yield entry
        entry = entry.tb_next


def _is_raise_statement(entry: TracebackType) -> bool:
    """Whether the traceback entry stopped at a ``raise`` statement (not at a call that failed)."""
    return any(
        instruction.offset == entry.tb_lasti and instruction.opname == "RAISE_VARARGS"
        for instruction in dis.get_instructions(entry.tb_frame.f_code)
    )


def _in_checking_library(filename: str) -> bool:
    """Whether ``filename`` is in LDB or Lightning, whose errors from an ``__init__`` are argument checks."""
    import lightning

    roots = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(lightning.__file__)))
    path = os.path.abspath(filename)
    return any(path.startswith(root + os.sep) for root in roots)


def _import_class_path(class_path: Any) -> Any:
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _find_class(config: Any, cls: type, path: str = "") -> tuple[str, str] | None:
    """The key of ``config`` whose ``class_path`` is ``cls``, and that class path, or ``None``."""
    from jsonargparse import Namespace

    if isinstance(config, Namespace):
        if _import_class_path(config.get("class_path")) is cls:
            return path, config["class_path"]
        items = [(f"{path}.{key}" if path else key, value) for key, value in vars(config).items()]
    elif isinstance(config, (list, tuple)):
        items = [(path, value) for value in config]
    else:
        return None
    for key, value in items:
        found = _find_class(value, cls, key)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide Lightning's INFO messages and third-party deprecation warnings; restore both afterwards."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("default", category=category, module=r"lightning_ldb(\.|$)")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=False):
                logger.setLevel(level)


class LDBCLI(LightningCLI):
    """``LightningCLI`` with any LightningModule and DataModule by class path, and the ``ldb`` help texts.

    Quiet unless ``verbose``: Lightning's INFO messages and tips, the model summary (its FLOP
    columns read 0 for models without an example input) and third-party deprecation warnings are
    hidden while the command runs. A ``ValueError`` or ``TypeError`` that the ``__init__`` of a
    class the command instantiates (a callback, the model, the data, the trainer) raises as a check
    of its arguments (a ``raise`` statement in it, or in the argument checks of LDB or Lightning) is
    reported in two lines naming the argument, the class and the class's own message, and the
    command exits with status 2, like a parse error. Any other error in that code (a bug, such as
    ``nn.Linear(width)`` missing an argument) keeps its traceback.

    Args:
        args: Command-line arguments (a list of strings, or a dict/Namespace config); ``None`` reads
            ``sys.argv``.
        prog: Program name shown in help messages; ``None`` takes it from ``sys.argv[0]``.
        verbose: Show everything, and raise errors with their tracebacks; ``None`` reads the
            ``LDB_VERBOSE`` environment variable.
        **kwargs: Passed to :class:`~lightning.pytorch.cli.LightningCLI` (e.g. ``run=False``).

    Raises:
        SystemExit: With status 2 on a bad argument (unless ``verbose``), 0 after ``--help``.
    """

    def __init__(
        self, args: ArgsType = None, prog: str | None = None, verbose: bool | None = None, **kwargs: Any
    ) -> None:
        _import_examples()
        self.verbose = verbose_requested(verbose)
        formatter = _help_formatter()
        shown = prog or os.path.basename(sys.argv[0])  # argparse's default program name
        parser_kwargs: dict[str, Any] = {
            "description": DESCRIPTION.format(prog=shown),
            "epilog": EPILOG.format(prog=shown),
            "formatter_class": formatter,
            "fit": {"description": FIT_DESCRIPTION, "formatter_class": formatter},
            **{name: {"description": text} for name, text in SUBCOMMAND_HELP.items() if name != "fit"},
        }
        if prog is not None:
            parser_kwargs["prog"] = prog
        kwargs.setdefault("parser_kwargs", parser_kwargs)
        kwargs.setdefault("parser_class", type("LDBArgumentParser", (LDBArgumentParser,), {"verbose": self.verbose}))
        # Runs without a logger write config.yaml to default_root_dir: let a rerun replace it.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        if not self.verbose:
            # Lightning's model summary lists "FLOPs 0" for a model without an example input.
            kwargs["trainer_defaults"] = {"enable_model_summary": False, **kwargs.get("trainer_defaults", {})}
        with contextlib.nullcontext() if self.verbose else _quiet():
            super().__init__(model_class=None, datamodule_class=None, args=args, **kwargs)

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # Whole sentences in `ldb --help` (argparse keeps a subcommand's help on its choice action).
        for choice in _compat.subcommand_choice_actions(self.parser):
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            if self.verbose:
                raise
            origin = next(((e, found) for e in _chain(error) if (found := _raised_by_init(e)) is not None), None)
            if origin is None:
                raise
            raised, (cls, checked) = origin
            if not checked:
                # A bug in the class's code: its own error and traceback, without jsonargparse's wrapper around it.
                raise raised.with_traceback(raised.__traceback__) from None
            self._exit_with(raised, cls)

    def _exit_with(self, error: BaseException, cls: type) -> NoReturn:
        """Report the ``__init__`` error of ``cls`` as a command-line error: two lines, exit status 2."""
        parser = _compat.subcommand_parser(self, self.subcommand)
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        found = _find_class(config, cls)
        first, *more = str(error).splitlines() or [type(error).__name__]
        message = first + "".join(f"\n  {line}" for line in more)
        prog = _shown_prog(parser)
        if found is not None:
            key, class_path = found
            head = f"error: --{key} ({cls.__name__}): {message}"
            tip = f"tip: {prog} --{key}.help {class_path} lists its arguments"
        elif isinstance(self.trainer_class, type) and issubclass(cls, self.trainer_class):
            head, tip = f"error: --trainer ({cls.__name__}): {message}", f"tip: {prog} --help lists the options"
        else:
            head, tip = f"error: {cls.__name__}: {message}", f"tip: {prog} --help lists the options"
        sys.stderr.write(f"{head}\n{tip}; --verbose shows the traceback.\n")
        sys.exit(2)


def _import_examples() -> None:
    # jsonargparse resolves a short class name (`--model=ImageClassifier`) among the imported
    # subclasses: importing this package made `LayerDropBackCallback` one, this makes the examples
    # others. Without the `examples` extra the CLI still takes the user's classes by class path.
    with contextlib.suppress(ImportError):
        importlib.import_module("lightning_ldb.examples")


def main(args: ArgsType = None, prog: str | None = None) -> None:
    """Run the ``ldb`` command.

    ``--verbose`` anywhere in the arguments is taken out of them and makes the run verbose (see
    :class:`LDBCLI`).

    Args:
        args: Command-line arguments; ``None`` reads ``sys.argv``.
        prog: Program name shown in help messages.

    Raises:
        SystemExit: With a hint to install ``jsonargparse[signatures]`` if it is missing, and from
            argument parsing (``--help``; status 2 for invalid arguments).
    """
    if importlib.util.find_spec("jsonargparse") is None:
        raise SystemExit(
            "The ldb command needs jsonargparse[signatures]: pip install 'lightning-ldb[examples]'"
            " (or pip install 'jsonargparse[signatures]')."
        )
    verbose: bool | None = None
    if args is None and VERBOSE_FLAG in sys.argv[1:]:
        sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != VERBOSE_FLAG]  # args=None keeps reading sys.argv
        verbose = True
    elif isinstance(args, (list, tuple)) and VERBOSE_FLAG in args:
        args, verbose = [arg for arg in args if arg != VERBOSE_FLAG], True
    LDBCLI(args=args, prog=prog, verbose=verbose)


if __name__ == "__main__":  # pragma: no cover
    main()
