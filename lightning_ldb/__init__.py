"""lightning-ldb: LayerDropBack (LDB) for PyTorch Lightning."""

from lightning_ldb.branches import Branch, discover_branches
from lightning_ldb.callback import LayerDropBackCallback
from lightning_ldb.datamodule import LDBDataModuleMixin
from lightning_ldb.layers import Layer, discover_layers, select_candidates
from lightning_ldb.sampling import draw_dropped
from lightning_ldb.schedule import is_drop_epoch
from lightning_ldb.steps import estimated_stepping_batches

__version__ = "0.1.0"

__all__ = [
    "Branch",
    "LDBDataModuleMixin",
    "Layer",
    "LayerDropBackCallback",
    "discover_branches",
    "discover_layers",
    "draw_dropped",
    "estimated_stepping_batches",
    "is_drop_epoch",
    "select_candidates",
]
