"""``ldb-bench``: will LDB speed up *your* training? LayerDropBack side by side with the variants that say why.

- :mod:`~lightning_ldb.bench.cli`: the command, on the user's own LightningCLI config (``ldb-bench --config my.yaml``).
- :mod:`~lightning_ldb.bench.runner`: the variants and the runs (repetitions rotated), each epoch timed on the wall
  clock (CUDA-synchronised) and this process's CPU time; :func:`compare` is the Python entry point for a model and
  a data factory.
- :mod:`~lightning_ldb.bench.stats`: paired ratios, their median and interval, the profile's bound, the verdict.
- :mod:`~lightning_ldb.bench.profile`: the ceiling before training (``--profile``): step times, FLOPs, memory.
- :mod:`~lightning_ldb.bench.report`: tables, verdict and the plot, drawn from the JSON.
- :mod:`~lightning_ldb.bench.peers`: Stochastic Depth and progressive layer freezing.
- :mod:`~lightning_ldb.bench.workloads` and :mod:`~lightning_ldb.bench.data`: the presets' networks and
  offline data (``configs/bench/*.yaml`` name them).

The benchmark uses the library as a user does: through ``lightning_ldb.__all__``, ``lightning_ldb.examples``
and the ``ldb`` command's parser. Needs the ``examples`` extra (torchvision, torchmetrics, matplotlib,
jsonargparse; ``mnist1d`` for those presets).
"""

from importlib import import_module
from typing import Any

from lightning_ldb.bench.report import speedup, summarize

#: Names imported on first use (the runs, the presets' data and model, the peers).
_LAZY = {
    "BenchClassifier": "lightning_ldb.bench.workloads",
    "BenchDataModule": "lightning_ldb.bench.data",
    "ProgressiveFreezing": "lightning_ldb.bench.peers",
    "add_stochastic_depth": "lightning_ldb.bench.peers",
    "compare": "lightning_ldb.bench.runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_ldb.bench' has no attribute {name!r}")

__all__ = [
    "BenchClassifier",
    "BenchDataModule",
    "ProgressiveFreezing",
    "add_stochastic_depth",
    "compare",
    "speedup",
    "summarize",
]
