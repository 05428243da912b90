"""A checkpoint written by release 0.1.0 (the callback before the engine) resumes: its seed, epoch, draws and run order
continue exactly, and the resumed run ends with the weights of the uninterrupted run.

The fixtures in ``tests/data/release_0_1_0`` were written by that release's code (see ``make.py`` there): a checkpoint
from the middle of DROP epoch 2 of ``tests/test_resume.py``'s reference run, and the layers that run dropped at every
step. Their weights were computed on another CPU, and float reductions differ between CPU kernels, so no float is
compared with a stored one: the fixture's integers (steps, epochs, batch sizes, dropped layers) are compared with
this machine's runs, and weights only between runs made here. ``.ci/run`` also runs this file with
``ATEN_CPU_CAPABILITY=default`` (torch's portable kernels, a stand-in for another CPU).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import test_resume
import torch
from test_resume import run

from lightning_ldb import LayerDropBackCallback

DATA = Path(__file__).resolve().parent / "data" / "release_0_1_0"

#: (resample, data setup of test_resume.SETUPS) of the fixtures
SETUPS = [("epoch", "batch_scaling"), ("step", "own_loader")]


def with_floats_of(release: Any, here: Any, where: str = "checkpoint") -> Any:
    """``release`` with every tensor and float taken from ``here``, a checkpoint of the same run made on this machine:
    what release 0.1.0 wrote, less what depends on the CPU it ran on. Its structure, integers and strings stay."""
    if isinstance(release, torch.Tensor):
        assert isinstance(here, torch.Tensor) and (here.shape, here.dtype) == (release.shape, release.dtype), where
        return here
    if isinstance(release, float):
        assert release == pytest.approx(here, rel=1e-9), where  # e.g. the LR: the release stored the same one
        return here
    if isinstance(release, dict):
        return {k: with_floats_of(v, here[k], f"{where}[{k!r}]") if has_floats(v) else v for k, v in release.items()}
    if isinstance(release, (list, tuple)):
        assert len(release) == len(here), where
        return type(release)(with_floats_of(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(release, here)))
    return release


def has_floats(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, float)):
        return True
    if isinstance(value, dict):
        return any(has_floats(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(has_floats(v) for v in value)


@pytest.mark.parametrize(("resample", "setup"), SETUPS)
def test_a_release_checkpoint_resumes_as_the_uninterrupted_run(tmp_path, monkeypatch, resample, setup):
    release = torch.load(DATA / f"{resample}-{setup}.ckpt", weights_only=False)
    release_draws = torch.load(DATA / f"{resample}-{setup}-reference.pt", weights_only=False)["draws"]
    release_ldb = release["callbacks"]["LayerDropBackCallback"]
    assert release_ldb["seed"] == 7 and "batch_scaling" not in release_ldb["config"]  # 0.1.0's format

    # The uninterrupted run on this machine draws what the release's did, and checkpoints at the same step (with
    # batch_scale=2, LDB warns that a step-triggered checkpoint on the last batch of a DROP epoch resumes short).
    short = "a checkpoint saved on the last batch of a DROP epoch"
    with pytest.warns(UserWarning, match=short) if setup == "batch_scaling" else contextlib.nullcontext():
        uninterrupted, log, mid_step = run(tmp_path / "uninterrupted", resample, setup)
    assert log.by_step == release_draws and any(dropped for _, dropped in release_draws.values())
    here = torch.load(tmp_path / "uninterrupted" / f"mid-step={mid_step}.ckpt", weights_only=False)
    assert (release["epoch"], release["global_step"]) == (here["epoch"], here["global_step"]) == (2, mid_step)
    assert release["loops"] == here["loops"]  # progress counters only

    # Resumed with seed=None, so that the draws continue from the checkpoint's seed (7), not from the argument.
    monkeypatch.setattr(test_resume, "LayerDropBackCallback", lambda **kw: LayerDropBackCallback(**{**kw, "seed": None}))
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)

    # The release's own file resumes where it stopped, with the release's draws.
    resumed, resumed_log, _ = run(tmp_path / "release", resample, setup, ckpt_path=DATA / f"{resample}-{setup}.ckpt")
    assert min(resumed_log.by_step) == mid_step
    assert resumed_log.by_step == {step: draw for step, draw in release_draws.items() if step >= mid_step}
    assert resumed_log.ldb.seed == 7 and resumed_log.ldb.state_dict()["run_order"] == release_ldb["run_order"]

    # The release's file with this machine's weights and optimizer state resumes to the uninterrupted run's weights.
    checkpoint = tmp_path / "release-with-this-machines-floats.ckpt"
    torch.save(with_floats_of(release, here), checkpoint)
    resumed, resumed_log, _ = run(tmp_path / "resumed", resample, setup, ckpt_path=checkpoint)
    assert resumed_log.by_step == {step: draw for step, draw in release_draws.items() if step >= mid_step}
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
