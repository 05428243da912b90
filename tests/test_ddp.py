"""LDB under DDP: 2 gloo processes on CPU, every rank's weights, draws and traffic compared.

Three 2-process runs, each writing one record per rank (see ``ddp_scripts/ddp_run.py``): the
module-scoped :func:`epoch_run` (``ddp_spawn``, the paper's ``resample="epoch"``, gradient
accumulation, a layer frozen by the user) is shared by several tests; ``strategy="ddp"``, which
re-launches its script once per rank, runs that script in a subprocess with ``resample="step"``;
and a ``ddp_spawn`` run whose ranks disagree on purpose. Every multi-process test has a timeout, so
a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException
from helpers import TinyMLP, free_port, make_trainer, printed_recipe_config, run_two_process_script
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lightning_ldb import LayerDropBackCallback
from lightning_ldb.distributed import draw_digest
from torch.nn.parallel import DistributedDataParallel
from lightning_ldb.schedule import Settings
from lightning_ldb.strategies import strategy_sync
from lightning_ldb.undo import UndoList

SCRIPTS = Path(__file__).parent / "ddp_scripts"
MULTINODE = Path(__file__).resolve().parent.parent / "examples" / "multinode"
sys.path.insert(0, str(SCRIPTS))  # spawned ranks inherit sys.path and unpickle ``ddp_run`` objects from it

import ddp_run  # noqa: E402

#: Bound of one 2-process run; the machine has 2 cores that other test runs may share.
RUN_TIMEOUT = 240


def load_ranks(out_dir: Path) -> list[dict[str, Any]]:
    records = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    return records


def spawn_run(out_dir: Path, **kwargs: Any) -> list[dict[str, Any]]:
    """Run :func:`ddp_run.fit` under ``ddp_spawn`` on a free port and return the two ranks' records."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASTER_ADDR", "127.0.0.1")
        env.setenv("MASTER_PORT", str(free_port()))
        ddp_run.fit(str(out_dir), **kwargs)
    return load_ranks(out_dir)


def param_names(records: dict[str, Any], layers: tuple[str, ...]) -> list[str]:
    return [name for name in records["final"] if name.rsplit(".", 1)[0] in layers]


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_run(tmp_path_factory.mktemp("ddp_epoch"), strategy="ddp_spawn", resample="epoch")


@pytest.fixture
def single_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For a 1-process DDP fit inside pytest: a free port, and no process group left behind for other tests."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- assertions
def assert_same_draws_and_weights(ranks: list[dict[str, Any]]) -> None:
    """Both ranks dropped the same layers in every epoch and batch, and hold bitwise equal weights."""
    rank0, rank1 = ranks
    assert rank0["epochs"].keys() == rank1["epochs"].keys()
    for epoch, record in rank0["epochs"].items():
        other = rank1["epochs"][epoch]
        assert record["mode"] == other["mode"]
        assert record["dropped"] == other["dropped"], f"epoch {epoch}"
        assert [b["dropped"] for b in record["batches"].values()] == [b["dropped"] for b in other["batches"].values()]
        # Compared before LDB releases the layers: the re-wrap then re-broadcasts rank 0's weights.
        for name, value in record["end"].items():
            assert torch.equal(value, other["end"][name]), f"epoch {epoch}: {name} differs between ranks"
    for name, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][name]), f"final {name} differs between ranks"


def assert_dropped_layers_unchanged(ranks: list[dict[str, Any]], expect_drop_epochs: list[int]) -> None:
    """On every rank, a layer dropped for a whole DROP epoch ends it bitwise as it was at the end of the epoch before."""
    for record in ranks:
        epochs = record["epochs"]
        drop_epochs = [e for e, r in epochs.items() if r["mode"] == "drop"]
        assert drop_epochs == expect_drop_epochs
        for epoch in drop_epochs:
            dropped = epochs[epoch]["dropped"]
            assert dropped, f"epoch {epoch} dropped nothing: the test would prove nothing"
            names = param_names(record, dropped)
            trained = [n for n in record["final"] if n not in names and epochs[epoch]["requires_grad"][n]]
            for name in names:
                assert torch.equal(epochs[epoch - 1]["end"][name], epochs[epoch]["end"][name]), (epoch, name)
            assert any(not torch.equal(epochs[epoch - 1]["end"][n], epochs[epoch]["end"][n]) for n in trained)


def assert_user_frozen_layer_untouched(ranks: list[dict[str, Any]]) -> None:
    frozen = param_names(ranks[0], (ddp_run.USER_FROZEN,))
    assert frozen
    for record in ranks:
        initial = record["epochs"][0]["start"]
        for epoch, epoch_record in record["epochs"].items():
            assert not any(epoch_record["requires_grad"][n] for n in frozen), epoch
        for name, flag in record["final_requires_grad"].items():
            assert flag == (name not in frozen), f"{name} ends with requires_grad={flag}"
        for name in frozen:
            assert torch.equal(initial[name], record["final"][name]), name


# ---------------------------------------------------------------------------------------------- ddp_spawn
@pytest.mark.timeout(RUN_TIMEOUT)
def test_ddp_spawn_every_rank_drops_the_same_layers_and_ends_with_the_same_weights(epoch_run):
    assert_same_draws_and_weights(epoch_run)
    assert_dropped_layers_unchanged(epoch_run, expect_drop_epochs=[2, 4])
    assert epoch_run[0]["epochs"][2]["dropped"] == ("net.7", "net.13")  # as documented in ddp_run


@pytest.mark.timeout(RUN_TIMEOUT)
def test_ddp_spawn_layer_frozen_by_the_user_stays_frozen_on_every_rank(epoch_run):
    # net.5 would be a candidate were it trainable; LDB neither draws it nor, on release, unfreezes it.
    assert_user_frozen_layer_untouched(epoch_run)


@pytest.mark.timeout(RUN_TIMEOUT)
def test_ddp_spawn_drop_epochs_all_reduce_only_trainable_gradients(epoch_run):
    for record in epoch_run:
        full_numel = record["epochs"][0]["batches"][ddp_run.PROFILED_BATCH]["trainable_numel"]
        for epoch, epoch_record in record["epochs"].items():
            batch = epoch_record["batches"][ddp_run.PROFILED_BATCH]
            assert batch["allreduce_numel"] == batch["trainable_numel"], epoch
            if epoch_record["mode"] == "drop":
                assert batch["allreduce_numel"] < full_numel
            else:
                assert batch["allreduce_numel"] == full_numel


@pytest.mark.timeout(RUN_TIMEOUT)
def test_ranks_that_disagree_on_the_draw_fail_loudly_naming_the_epoch(tmp_path):
    # Rank 1 excludes a layer that rank 0 may drop: the seeds agree, the draws cannot. Every rank builds the same
    # message from the gathered draws; the spawn launcher re-raises the first failed rank's error.
    with pytest.raises(ProcessRaisedException, match=r"ranks disagree on the layers dropped in epoch 2") as info:
        spawn_run(tmp_path, strategy="ddp_spawn", resample="epoch", max_epochs=3, disagree=True)
    assert "rank 1 dropped" in str(info.value)


# ---------------------------------------------------------------------------------------------- strategy="ddp"
def run_script(out_dir: Path, *args: str) -> None:
    run_two_process_script(SCRIPTS / "ddp_run.py", "--out", str(out_dir), *args, timeout=RUN_TIMEOUT)


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_strategy_ddp_with_resample_step_agrees_on_every_draw_and_all_reduces_only_trainable_gradients(tmp_path):
    # strategy="ddp" re-launches the script, so it runs in a subprocess; it also carries the resample="step" run
    # (find_unused_parameters forced on, LDB's communication hook), to keep the suite to three 2-process runs.
    run_script(tmp_path, "--strategy", "ddp", "--resample", "step", "--epochs", "3")
    ranks = load_ranks(tmp_path)
    assert_same_draws_and_weights(ranks)
    assert_user_frozen_layer_untouched(ranks)
    drop_batches = ranks[0]["epochs"][2]["batches"]
    assert len({b["dropped"] for b in drop_batches.values()}) > 1, "expected a new draw per optimizer step"
    for record in ranks:
        epochs = record["epochs"]
        for epoch_record in epochs.values():
            batch = epoch_record["batches"][ddp_run.PROFILED_BATCH]
            assert batch["allreduce_numel"] == batch["trainable_numel"]
        assert epochs[2]["batches"][1]["trainable_numel"] < epochs[1]["batches"][1]["trainable_numel"]
        # Optimizer steps end on batches 1 and 3 (accumulate_grad_batches=2); a step's layers stay put through it.
        before = epochs[1]["end"]
        for step_end in (1, 3):
            after = epochs[2]["batches"][step_end]["end"]
            dropped = epochs[2]["batches"][step_end]["dropped"]
            assert dropped == epochs[2]["batches"][step_end - 1]["dropped"], "micro-batches of a step share a draw"
            assert dropped
            for name in param_names(record, dropped):
                assert torch.equal(before[name], after[name]), (step_end, name)
            before = after


# ---------------------------------------------------------------------------------------------- setup, one process
class WrapperLog(Callback):
    """Records DDP's wrapper at every epoch's first batch, after LDB (first in the list) applied the epoch's draw."""

    def __init__(self) -> None:
        self.wrappers: list[Any] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.wrappers.append(trainer.strategy.model)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("strategy", "find_unused"),
    [(DDPStrategy(static_graph=True), False), ("ddp_find_unused_parameters_true", True)],
    ids=["static_graph", "ddp_find_unused_parameters_true"],
)
def test_resample_epoch_rewraps_with_the_users_ddp_settings(single_process_group, strategy, find_unused):
    # One process: what is checked here is the wrapper's life cycle, not agreement between ranks.
    log = WrapperLog()
    ldb = LayerDropBackCallback(drop_rate=0.5, keep_first=2, batch_scale=1, seed=1)
    trainer = make_trainer(max_epochs=4, callbacks=[ldb, log], strategy=strategy)
    trainer.fit(TinyMLP())
    first, second, drop, after = log.wrappers
    # Epochs 0 and 1 share Lightning's wrapper; DROP epoch 2 gets its own, and so does epoch 3 after the release.
    assert first is second and len({id(first), id(drop), id(after)}) == 3
    assert all(w.find_unused_parameters is find_unused for w in log.wrappers)
    assert [w.static_graph for w in log.wrappers] == [not find_unused] * 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("strategy_kwargs", "resample", "communication", "match"),
    [
        ({"static_graph": True}, "step", "auto", r"static_graph=True.*resample='step'"),
        ({"static_graph": True, "ddp_comm_hook": lambda state, bucket: None}, "epoch", "auto", r"communication hook"),
        ({"static_graph": True}, "epoch", "find_unused", r"communication='find_unused' keeps one wrapper"),
        ({"ddp_comm_hook": lambda state, bucket: None}, "epoch", "hook", r"one communication hook per wrapper"),
        (
            {"ddp_comm_hook": lambda state, bucket: None},
            "epoch",
            "rewrap",
            r"communication='rewrap'\) cannot be used together with a ddp_comm_hook.*state per bucket.*"
            r"Pass communication='auto'",
        ),
    ],
    ids=[
        "static-graph-step",
        "static-graph-comm-hook",
        "static-graph-forced-method",
        "forced-hook-with-comm-hook",
        "forced-rewrap-with-comm-hook",
    ],
)
def test_ddp_settings_ldb_cannot_serve_fail_in_setup(single_process_group, strategy_kwargs, resample, communication, match):
    ldb = LayerDropBackCallback(resample=resample, keep_first=2, batch_scale=1, seed=0, communication=communication)
    trainer = make_trainer(max_epochs=1, callbacks=[ldb], strategy=DDPStrategy(**strategy_kwargs))
    model = TinyMLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.timeout(60)
def test_static_graph_with_accumulated_drop_epochs_fails_in_setup(single_process_group):
    # DDP's static graph cannot accumulate: without the refusal the full epochs train and the first accumulated DROP
    # step dies in torch's reducer (``expect_autograd_hooks_ INTERNAL ASSERT FAILED``).
    ldb = LayerDropBackCallback(batch_scale=2, batch_scaling="accumulate", keep_first=2, seed=0)
    trainer = make_trainer(max_epochs=3, callbacks=[ldb], strategy=DDPStrategy(static_graph=True))
    model = TinyMLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    match = (
        r"batch_scaling='accumulate', batch_scale=2\) cannot run under DDPStrategy\(static_graph=True\).*"
        r"Use batch_scaling='loader' or DDPStrategy\(static_graph=False\)"
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(model)
    assert trainer.global_step == 0 and trainer.accumulate_grad_batches == 1
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_unknown_communication_method_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"`communication` must be one of \['auto', 'rewrap', 'hook', 'find_unused'\]"):
        LayerDropBackCallback(communication="telepathy")


class FindUnusedLog(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.find_unused_parameters = trainer.strategy.model.find_unused_parameters


def reachable(root: Any, kind: type, depth: int = 6) -> list[str]:
    """Paths from ``root`` through attributes, containers and closures to objects of ``kind``."""
    found, seen = [], set()

    def walk(obj: Any, path: str, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, kind):
            found.append(path)
            return
        if isinstance(obj, dict):
            children = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set)):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            children = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
            closure = getattr(obj, "__closure__", None) or ()
            children += [(f"{path}.<closure>", cell.cell_contents) for cell in closure]
        else:
            return
        for child_path, child in children:
            walk(child, child_path, level + 1)

    walk(root, "callback", 0)
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resample", ["step", "epoch"])
def test_ddp_settings_are_the_users_again_after_fit_and_no_wrapper_stays_with_the_callback(
    single_process_group, resample
):
    ldb, log = LayerDropBackCallback(resample=resample, keep_first=2, batch_scale=1, seed=0), FindUnusedLog()
    trainer = make_trainer(max_epochs=3, callbacks=[ldb, log], strategy="ddp")
    before = dict(trainer.strategy._ddp_kwargs)
    trainer.fit(TinyMLP())
    assert log.find_unused_parameters is (resample == "step")  # turned on before the wrap for "step"
    assert trainer.strategy._ddp_kwargs == before
    assert reachable(ldb, DistributedDataParallel) == []


@pytest.mark.timeout(60)
def test_a_failed_setup_leaves_the_users_ddp_settings_for_the_next_fit(single_process_group):
    # resample="step" turns find_unused_parameters on in setup; "no candidate layer" is raised after that.
    strategy = DDPStrategy(find_unused_parameters=False)
    users = dict(strategy._ddp_kwargs)
    failing = LayerDropBackCallback(resample="step", keep_first=100, batch_scale=1, seed=0)
    trainer = make_trainer(max_epochs=1, callbacks=[failing], strategy=strategy)
    with pytest.raises(ValueError, match="no candidate layer"):
        trainer.fit(TinyMLP())
    assert strategy._ddp_kwargs == users

    log = FindUnusedLog()
    trainer.callbacks[trainer.callbacks.index(failing)] = log
    trainer.fit(TinyMLP())  # the next fit, without LDB
    assert log.find_unused_parameters is False


@pytest.mark.timeout(60)
def test_a_users_comm_hook_keeps_one_wrapper_with_find_unused_parameters(single_process_group):
    # Lightning registers DDP comm hooks on CUDA only, so on CPU this checks LDB's choice, not the hook's effect.
    log = WrapperLog()
    ldb = LayerDropBackCallback(drop_rate=0.5, keep_first=2, batch_scale=1, seed=1)
    strategy = DDPStrategy(ddp_comm_hook=lambda state, bucket: None)
    make_trainer(max_epochs=3, callbacks=[ldb, log], strategy=strategy).fit(TinyMLP())
    assert len({id(w) for w in log.wrappers}) == 1
    assert log.wrappers[0].find_unused_parameters is True


def test_sharded_strategies_are_refused_with_the_fix():
    # FSDP needs a GPU in Lightning, so no CPU run can reach setup: the strategy's sync is asked for on its own.
    with pytest.raises(ValueError, match=r"does not support strategy FSDPStrategy.*strategy='ddp'"):
        strategy_sync(SimpleNamespace(strategy=FSDPStrategy()), TinyMLP(), Settings(), UndoList())


def test_draw_digest_depends_on_key_and_names():
    assert draw_digest((2, None), ("a", "b")) != draw_digest((2, None), ("ab",))
    assert draw_digest((2, 5), ()) != draw_digest((2, 6), ())
    assert 0 <= draw_digest((4, None), ("x",)) < 2**63


# ---------------------------------------------------------------------------------------------- multi-node recipes
def test_multinode_recipes_use_a_config_the_ldb_command_parses(monkeypatch, capsys):
    config_path = "examples/multinode/configs/ddp_multinode.yaml"
    config = printed_recipe_config(monkeypatch, capsys, config_path, ("slurm.sbatch", "README.md"))
    trainer = config["trainer"]
    assert (trainer["strategy"], trainer["devices"], trainer["num_nodes"]) == ("ddp", 8, 2)
    ldb = [c for c in trainer["callbacks"] if c["class_path"] == "lightning_ldb.LayerDropBackCallback"]
    assert len(ldb) == 1 and ldb[0]["init_args"]["resample"] == "epoch"
