"""Ready-made models, DataModules and a summary callback for trying LayerDropBack and reproducing the paper.

Needs the ``examples`` extra (``pip install 'lightning-ldb[examples]'``). Everything here is usable by
class path from the ``ldb`` CLI and its YAML configs, e.g. ``lightning_ldb.examples.ImageClassifier``.
"""

from lightning_ldb.examples.compare import Comparison, RunMetrics, compare_runs, read_run, speedup
from lightning_ldb.examples.data import CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule
from lightning_ldb.examples.finetune import FINETUNE_MODEL_NAMES, FineTuneClassifier, build_finetune_model
from lightning_ldb.examples.models import MODEL_NAMES, ImageClassifier, build_model
from lightning_ldb.examples.summary import EpochRecord, EpochSummary
from lightning_ldb.examples.threads import TorchThreads

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "Comparison",
    "DigitsDataModule",
    "EpochRecord",
    "EpochSummary",
    "FINETUNE_MODEL_NAMES",
    "FineTuneClassifier",
    "ImageClassifier",
    "MODEL_NAMES",
    "RunMetrics",
    "TorchThreads",
    "build_finetune_model",
    "build_model",
    "compare_runs",
    "read_run",
    "speedup",
]
