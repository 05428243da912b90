"""Write the fixtures of ``tests/test_release_checkpoint.py`` with the released code (0.1.0, before the engine).

Run from a checkout of the release, with its package first on the path::

    git worktree add --detach /tmp/ldb-old <release commit>
    PYTHONPATH=/tmp/ldb-old python tests/data/release_0_1_0/make.py

For each setup it trains the uninterrupted reference run of ``tests/test_resume.py`` and keeps the checkpoint saved
in the middle of DROP epoch 2, the reference's final weights and the layers it dropped at every step.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/: helpers and test_resume

import lightning_ldb  # noqa: E402
from test_resume import run  # noqa: E402

#: CPU float reductions depend on the thread count: the fixtures are made, and compared, with this many threads.
THREADS = 1

#: (resample, data setup of test_resume.SETUPS)
SETUPS = [("epoch", "batch_scaling"), ("step", "own_loader")]


def main() -> None:
    print(f"lightning_ldb from {Path(lightning_ldb.__file__).parent}")
    torch.set_num_threads(THREADS)
    for resample, setup in SETUPS:
        with tempfile.TemporaryDirectory() as tmp:
            model, log, mid_step = run(Path(tmp), resample, setup)
            shutil.copy(Path(tmp) / f"mid-step={mid_step}.ckpt", HERE / f"{resample}-{setup}.ckpt")
        reference = {
            "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
            "draws": dict(log.by_step),
        }
        torch.save(reference, HERE / f"{resample}-{setup}-reference.pt")


if __name__ == "__main__":
    main()
