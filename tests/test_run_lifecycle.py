"""One run object per fit: nothing of one fit leaks into the next, into the trainer or into the data source;
private Lightning/torch attributes are loud when missing; the package's imports point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning
import pytest
from helpers import TinyDataModule, TinyMLP, make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_ldb
from lightning_ldb import LayerDropBackCallback, _compat


class DrawLog(Callback):
    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.dropped: dict[int, tuple[str, ...]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.dropped.setdefault(trainer.current_epoch, self.ldb.dropped_layers)


def fit_and_log(ldb: LayerDropBackCallback, max_epochs: int = 5) -> dict[int, tuple[str, ...]]:
    log = DrawLog(ldb)
    make_trainer(max_epochs, [ldb, log]).fit(TinyMLP())
    return log.dropped


def test_a_second_fit_resolves_its_seed_afresh_like_a_new_callback():
    lightning.seed_everything(1)
    reused = LayerDropBackCallback(drop_rate=0.5, batch_scale=1)
    first = fit_and_log(reused)
    assert reused.seed == 1
    lightning.seed_everything(2)
    second = fit_and_log(reused)
    lightning.seed_everything(2)
    fresh = fit_and_log(LayerDropBackCallback(drop_rate=0.5, batch_scale=1))
    assert reused.seed == 2
    assert second == fresh
    assert first != second  # seed 1 and seed 2 draw differently here, so the test can tell them apart


def user_settings(trainer, datamodule) -> dict:
    return {
        "reload_dataloaders_every_n_epochs": trainer.reload_dataloaders_every_n_epochs,
        "datamodule": dict(vars(datamodule)),
    }


class Boom(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 1:
            raise RuntimeError("boom")


@pytest.mark.parametrize("fails", [False, True], ids=["success", "exception"])
def test_trainer_and_data_source_are_as_the_user_left_them_after_fit(fails):
    ldb = LayerDropBackCallback(seed=0, batch_scale=2)
    trainer = make_trainer(4, [ldb, *([Boom()] if fails else [])], reload_dataloaders_every_n_epochs=3)
    datamodule = TinyDataModule(batch_size=4, n=32)
    before = user_settings(trainer, datamodule)
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(TinyMLP(), datamodule=datamodule)
    else:
        trainer.fit(TinyMLP(), datamodule=datamodule)
    after = user_settings(trainer, datamodule)
    assert after["reload_dataloaders_every_n_epochs"] == 3
    assert not hasattr(datamodule, "_ldb_batch_schedule")  # the fit's batch schedule went with it
    # Public attributes as before (private ones are Lightning's lazy caches and the mixin's own bookkeeping).
    # ``trainer`` is attached by Lightning itself.
    public = {k: v for k, v in after["datamodule"].items() if not k.startswith("_") and k != "trainer"}
    assert public == {k: v for k, v in before["datamodule"].items() if not k.startswith("_") and k != "trainer"}
    assert datamodule.batch_size == 4
    assert ldb._fit is None  # the fit's state is gone


def test_candidates_and_seed_stay_readable_after_fit():
    ldb = LayerDropBackCallback(seed=3, batch_scale=1)
    fit_and_log(ldb, max_epochs=3)
    assert ldb.seed == 3 and ldb.candidate_layers and ldb.dropped_layers == ()
    assert ldb.state_dict()["seed"] == 3


def checkpoint_after(tmp_path, ldb: LayerDropBackCallback, epochs: int = 2):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(epochs, [ldb, checkpoint], enable_checkpointing=True, default_root_dir=tmp_path).fit(TinyMLP())
    return tmp_path / "last.ckpt"


def test_resume_warns_when_an_explicit_seed_differs_from_the_checkpoints(tmp_path):
    path = checkpoint_after(tmp_path, LayerDropBackCallback(seed=5, batch_scale=1))
    explicit = LayerDropBackCallback(seed=6, batch_scale=1)
    with pytest.warns(UserWarning, match=r"resumes with seed=6, but the checkpoint was made with seed 5"):
        make_trainer(3, [explicit]).fit(TinyMLP(), ckpt_path=path)
    assert explicit.seed == 6  # the explicit argument wins, and the user was told
    follows = LayerDropBackCallback(seed=None, batch_scale=1)
    make_trainer(3, [follows]).fit(TinyMLP(), ckpt_path=path)
    assert follows.seed == 5  # no explicit seed: the checkpoint's draws continue


@pytest.mark.parametrize(
    ("changed", "fragment"),
    [
        ({"exclude": ["net.5"]}, r"exclude: None -> \('net.5',\)"),
        ({"include": ["net.*"]}, r"include: None -> \('net.\*',\)"),
        ({"communication": "hook"}, r"communication: 'auto' -> 'hook'"),
    ],
)
def test_resume_warns_about_every_changed_setting(tmp_path, changed, fragment):
    path = checkpoint_after(tmp_path, LayerDropBackCallback(seed=5, batch_scale=1))
    with pytest.warns(UserWarning, match=fragment):
        make_trainer(3, [LayerDropBackCallback(seed=5, batch_scale=1, **changed)]).fit(TinyMLP(), ckpt_path=path)


def test_a_missing_private_attribute_is_loud_never_silent():
    class Renamed:  # what a Lightning release that renamed the attribute would hand LDB
        pass

    with pytest.raises(_compat.CompatibilityError, match=r"Renamed\._ddp_kwargs is missing.*cannot configure"):
        _compat.ddp_kwargs(Renamed())
    with pytest.raises(_compat.CompatibilityError, match=r"_data_source is missing"):
        _compat.train_data_source(type("Trainer", (), {"fit_loop": Renamed()})())
    with (
        pytest.warns(UserWarning, match=r"_train_time_interval is missing"),
        pytest.warns(UserWarning, match=r"_every_n_train_steps is missing"),
    ):
        assert _compat.checkpoint_triggers_on_steps(Renamed()) is False


#: Members of Lightning's private loop classes (``_FitLoop``, ``_TrainingEpochLoop``, ``_BatchProgress``): not
#: underscored, yet private.
LOOP_INTERNALS = {"fit_loop", "epoch_loop", "batch_progress", "restarted_on_train_batch_end", "setup_data"}


def own_private_names(tree: ast.AST) -> set[str]:
    """The private names a module defines itself: its methods and functions, and what it assigns to ``self._x``."""
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                    names.add(leaf.attr)
                elif isinstance(leaf, ast.Name):
                    names.add(leaf.id)
    return {name for name in names if name.startswith("_")}


def is_engine(node: ast.expr) -> bool:
    # ``engine._draw`` / ``fit.engine._draw``: the engine's driver protocol, private to the package, used by the callback.
    return (isinstance(node, ast.Name) and node.id == "engine") or (isinstance(node, ast.Attribute) and node.attr == "engine")


def test_private_attributes_are_read_in_the_compatibility_module_only():
    # Any ``obj._name`` on an object that is not our own outside ``_compat`` is a private access; so is a ``self._name``
    # the module does not define (a private member of a Lightning base class), and a member of Lightning's loops.
    package = Path(lightning_ldb.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text())
        own = own_private_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in LOOP_INTERNALS:
                offenders.append(f"{path.relative_to(package)}:{node.lineno}: .{node.attr} (a loop internal)")
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not node.attr.startswith("_ldb")
                and node.attr != "_fields"  # namedtuple's documented API
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls") and node.attr in own)
                and not (isinstance(node.value, ast.Name) and node.value.id == "_compat")
                and not is_engine(node.value)
            ):
                offenders.append(f"{path.relative_to(package)}:{node.lineno}: .{node.attr}")
            # ``getattr(obj, "_name", ...)`` and friends hide the same access in a string.
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")
                and not str(node.args[1].value).startswith(("__", "_ldb", "_fields"))
                and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))
            ):
                offenders.append(f"{path.relative_to(package)}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    assert offenders == []


def package_imports() -> dict[str, set[str]]:
    """Every ``lightning_ldb`` module and the package modules it imports (module level and inside functions)."""
    package = Path(lightning_ldb.__file__).parent
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from lightning_ldb import ddp`` imports the submodule ``lightning_ldb.ddp`` (the package is
                # being imported anyway); ``from lightning_ldb import LayerDropBackCallback`` the package itself.
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
                targets |= submodules
                if len(submodules) < len(node.names):
                    targets.add(node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_between_package_modules_closes_a_cycle():
    graph = package_imports()
    assert graph["lightning_ldb.callback"] >= {"lightning_ldb.engine"}  # the walker does see imports
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


#: Modules that run without Lightning: the pure core, the units, the mechanisms, the process-group sync, and
#: ``_compat`` (which the engine uses for Fabric's wrapper, so it takes the objects as they are).
BELOW_THE_ENGINE = [
    "schedule", "layers", "branches", "undo", "dropping", "lr_scaling",
    "distributed", "_compat",
]  # fmt: skip
#: The Lightning integrations and the callback.
LIGHTNING_SIDE = {
    "lightning_ldb.callback", "lightning_ldb.strategies",
    "lightning_ldb.batching", "lightning_ldb.cli",
}  # fmt: skip


def imported_by(module: str) -> set[str]:
    package = Path(lightning_ldb.__file__).parent
    tree = ast.parse((package / f"{module}.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    # ``from lightning_ldb import x`` imports the submodule ``lightning_ldb.x``.
    imported |= {
        f"{n.module}.{a.name}"
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "lightning_ldb"
        for a in n.names
    }
    return imported


def reaches(imported: set[str], above: set[str]) -> set[str]:
    return {i for i in imported if any(i == a or i.startswith(f"{a}.") for a in above)}


def test_core_units_and_mechanisms_import_neither_lightning_nor_the_engine_nor_anything_above():
    above = {"lightning", "lightning_ldb.engine"} | LIGHTNING_SIDE
    for module in BELOW_THE_ENGINE:
        assert not reaches(imported_by(module), above), module


def test_the_engine_imports_no_lightning_and_nothing_of_the_lightning_side():
    assert not reaches(imported_by("engine"), {"lightning"} | LIGHTNING_SIDE)
    # Nor anything the modules below it import (checked above), so ``import lightning_ldb.engine`` needs no Lightning.


def test_the_examples_use_the_librarys_public_modules_only_and_never_the_bench():
    # The bench builds on the examples (its workloads); the examples must not reach back, nor into private modules
    # (their argument checks and epoch timer are the library's own, from its public modules, not copies).
    package = Path(lightning_ldb.__file__).parent
    offenders = []
    for path in sorted((package / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [(node.module, a.name) for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [(a.name, None) for a in node.names] if isinstance(node, ast.Import) else []
            for module, name in names:
                if not module.startswith("lightning_ldb") or module.startswith("lightning_ldb.examples"):
                    continue
                if module == "lightning_ldb" and (name is None or name in lightning_ldb.__all__):
                    continue
                if module != "lightning_ldb" and not module.startswith("lightning_ldb.bench"):
                    if not any(part.startswith("_") for part in module.split(".")):
                        continue
                offenders.append(f"{path.name}: {module} {name}")
    assert offenders == []
