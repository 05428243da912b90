"""``ldb-bench``: LayerDropBack's speed-up and accuracy, measured side by side with a plain Lightning baseline.

- :mod:`~lightning_ldb.bench.report`: the arithmetic (speed-up, throughput, per-mode epoch statistics,
  FLOP accounting, targets) and the Markdown, as pure functions of recorded numbers.
- :mod:`~lightning_ldb.bench.flops`: FLOPs of a full and a DROP training step, with the callback's own draw.
- :mod:`~lightning_ldb.bench.runner`: the paired runs (baseline, LDB, callback-only; sweeps).
- :mod:`~lightning_ldb.bench.phases`: forward/backward/optimizer time of full and DROP steps.
- :mod:`~lightning_ldb.bench.plot`: the figures. :mod:`~lightning_ldb.bench.cli`: the command line.

Needs the ``examples`` extra (torchvision, torchmetrics, matplotlib).
"""

from lightning_ldb.bench.report import Spread, flop_accounting, speedup, throughput

__all__ = ["Spread", "flop_accounting", "speedup", "throughput"]
