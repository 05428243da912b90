"""``LayerDropBack`` on 2 gloo CPU processes, without the Trainer: under ``Fabric(strategy="ddp")`` as a user writes
it, and under a ``DistributedDataParallel`` the user built (``tests/ddp_scripts/engine_run.py``).

The guarantees are the callback's: every rank drops the same layers as a single process with the same seed, dropped
parameters stay bitwise unchanged, kept ones move, the ranks end with the same weights, dropped gradients are not
all-reduced, and a wrapper LDB cannot serve fails at the first DROP epoch on every rank, never hangs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TinyMLP, run_two_process_script

from lightning_ldb import LayerDropBack

SCRIPTS = Path(__file__).resolve().parent / "ddp_scripts"
RUN_TIMEOUT = 240

import sys  # noqa: E402

sys.path.insert(0, str(SCRIPTS))
import engine_run  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    results = {}
    for mode, resample in [("readme", "epoch"), ("fabric", "epoch"), ("ddp", "step"), ("ddp_strict", "epoch")]:
        out = tmp_path_factory.mktemp(mode)
        run_two_process_script(
            SCRIPTS / "engine_run.py", "--out", str(out), "--mode", mode, "--resample", resample, timeout=RUN_TIMEOUT
        )
        results[mode] = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    return results


def single_process_draw(epoch: int) -> tuple[str, ...]:
    ldb = LayerDropBack(TinyMLP(), (), **engine_run.LDB_KWARGS)
    # Only the draw is wanted here: no optimizer and no training step, which the engine rightly warns about.
    with pytest.warns(UserWarning, match="no optimizer is hooked"), pytest.warns(UserWarning, match="before LDB has seen"):
        with ldb.epoch(epoch):
            return ldb.dropped_layers


def param_names(layers: tuple[str, ...]) -> set[str]:
    return {f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")}


@pytest.mark.timeout(4 * RUN_TIMEOUT)
def test_the_readmes_fabric_example_runs_on_two_processes_with_one_draw_and_the_same_weights(runs):
    rank0, rank1 = runs["readme"]
    assert rank0["draws"] == rank1["draws"]
    assert [epoch for epoch, _, _ in rank0["draws"]] == [2]  # epochs 0-3, every=2: one DROP epoch, one draw
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
    assert all(rank0["requires_grad"].values())


@pytest.mark.timeout(4 * RUN_TIMEOUT)
@pytest.mark.parametrize("mode", ["fabric", "ddp"])
def test_every_rank_drops_the_same_layers_and_ends_with_the_same_weights(runs, mode):
    rank0, rank1 = runs[mode]
    assert rank0["error"] is None and rank1["error"] is None
    draws = [{step: (s["epoch"], s["dropped"]) for step, s in r["steps"].items()} for r in (rank0, rank1)]
    assert draws[0] == draws[1]
    drop_epoch = {s["dropped"] for s in rank0["steps"].values() if s["epoch"] == 2}
    if mode == "fabric":  # resample="epoch": the single process's draw
        assert drop_epoch == {single_process_draw(2)} and single_process_draw(2)
    else:  # resample="step": a draw per step
        assert len(drop_epoch) > 1
    for name, value in rank0["weights"][3].items():
        assert torch.equal(value, rank1["weights"][3][name]), name
    assert all(rank0["requires_grad"].values())  # released at the end


@pytest.mark.timeout(4 * RUN_TIMEOUT)
def test_dropped_parameters_stay_bitwise_unchanged_on_every_rank_and_kept_ones_move(runs):
    for record in runs["fabric"]:
        dropped = param_names(next(s["dropped"] for s in record["steps"].values() if s["epoch"] == 2))
        before, after = record["weights"][1], record["weights"][2]
        for name in before:
            assert torch.equal(before[name], after[name]) == (name in dropped), name


@pytest.mark.timeout(4 * RUN_TIMEOUT)
@pytest.mark.parametrize("mode", ["fabric", "ddp"])
def test_drop_steps_all_reduce_only_the_gradients_of_kept_parameters(runs, mode):
    record = runs[mode][0]
    total = sum(record["numel"].values())
    for step in record["steps"].values():
        if step["epoch"] == 2:
            assert step["dropped"]
            assert step["reduced"] == total - sum(record["numel"][n] for n in param_names(step["dropped"]))
        elif step["epoch"] == 3:  # full again: everything, through the same hook
            assert step["reduced"] == total


@pytest.mark.timeout(4 * RUN_TIMEOUT)
def test_a_ddp_wrapper_without_find_unused_parameters_fails_at_the_first_drop_epoch_on_every_rank(runs):
    for record in runs["ddp_strict"]:
        assert "find_unused_parameters=False" in record["error"]
        assert "DistributedDataParallel(model, find_unused_parameters=True)" in record["error"]
        assert {s["epoch"] for s in record["steps"].values()} == {0, 1}  # failed entering epoch 2, before a step
        assert all(record["requires_grad"].values())
