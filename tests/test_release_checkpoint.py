"""A checkpoint written by release 0.1.0 (the callback before the engine) resumes bit for bit.

The fixtures in ``tests/data/release_0_1_0`` were written by that release's code (see ``make.py`` there): a checkpoint
from the middle of DROP epoch 2 of ``tests/test_resume.py``'s reference run, that run's final weights, and the layers
it dropped at every step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import test_resume
import torch
from test_resume import run

from lightning_ldb import LayerDropBackCallback

DATA = Path(__file__).resolve().parent / "data" / "release_0_1_0"


#: The thread count the fixtures were made with (``make.py``): CPU float reductions depend on it, so a bit-for-bit
#: comparison with them needs the same one, whatever the machine's default.
FIXTURE_THREADS = 1


@pytest.fixture
def fixture_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(FIXTURE_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("fixture_threads")
@pytest.mark.parametrize(("resample", "setup"), [("epoch", "batch_scaling"), ("step", "own_loader")])
def test_a_release_checkpoint_resumes_to_the_releases_uninterrupted_run(tmp_path, monkeypatch, resample, setup):
    # Resumed with seed=None, so that the draws continue from the checkpoint's seed (7), not from the argument.
    monkeypatch.setattr(test_resume, "LayerDropBackCallback", lambda **kw: LayerDropBackCallback(**{**kw, "seed": None}))
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    checkpoint = tmp_path / "release.ckpt"
    shutil.copy(DATA / f"{resample}-{setup}.ckpt", checkpoint)
    reference = torch.load(DATA / f"{resample}-{setup}-reference.pt", weights_only=False)
    assert "LayerDropBackCallback" in torch.load(checkpoint, weights_only=False)["callbacks"]

    model, log, _ = run(tmp_path / "resumed", resample, setup, ckpt_path=checkpoint)

    first = min(log.by_step)
    assert first > 0  # it resumed mid-run
    resumed_draws = {step: draw for step, draw in reference["draws"].items() if step >= first}
    assert log.by_step == resumed_draws and any(dropped for _, dropped in resumed_draws.values())
    for name, param in model.named_parameters():
        assert torch.equal(param, reference["weights"][name]), name
