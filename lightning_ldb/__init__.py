"""lightning-ldb: LayerDropBack (LDB) for PyTorch: the engine, its Lightning callback, and the DataModule mixin.

The public API is what this module exports; everything else is internal and may change.
"""

from lightning_ldb._compat import CompatibilityError
from lightning_ldb.batching import LDBDataModuleMixin, estimated_stepping_batches
from lightning_ldb.branches import Branch, branch_from_names, discover_branches
from lightning_ldb.callback import LayerDropBackCallback
from lightning_ldb.engine import LayerDropBack
from lightning_ldb.schedule import Settings

__version__ = "0.1.0"

__all__ = [
    "Branch",
    "CompatibilityError",
    "LDBDataModuleMixin",
    "LayerDropBack",
    "LayerDropBackCallback",
    "Settings",
    "branch_from_names",
    "discover_branches",
    "estimated_stepping_batches",
]
