"""``ldb-bench``: LayerDropBack side by side with the variants that say why it is faster or slower.

- :mod:`~lightning_ldb.bench.workloads`: the model presets (each with its data) and the Stochastic Depth peer.
- :mod:`~lightning_ldb.bench.data`: offline data (synthetic images, scikit-learn digits, MNIST-1D).
- :mod:`~lightning_ldb.bench.runner`: the variants and the runs, timed by a CUDA-synchronised epoch clock.
- :mod:`~lightning_ldb.bench.report`: tables and the plot, drawn from the JSON.
- :mod:`~lightning_ldb.bench.cli`: the command.

Needs the ``examples`` extra (torchvision, torchmetrics, matplotlib; ``mnist1d`` for that preset).
"""

from lightning_ldb.bench.report import speedup, summarize

__all__ = ["speedup", "summarize"]
