"""``TorchThreads``: how many CPU threads PyTorch uses for one run, set from a config."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from lightning_ldb.schedule import check_int


class TorchThreads(Callback):
    """Run ``fit``/``validate``/``test`` with ``torch.set_num_threads(num_threads)``, then restore the old value.

    Small networks on a CPU gain little from intra-op threads, and when other processes share the
    cores, extra threads oversubscribe them: on a busy 2-core machine the quickstart ran 5x faster
    with one thread than with two. The setting applies to the process running the Trainer (each
    rank under DDP).

    Args:
        num_threads: Intra-op threads, ``>= 1``.

    Raises:
        TypeError: If ``num_threads`` is not an int.
        ValueError: If ``num_threads`` is below 1.
    """

    def __init__(self, num_threads: int = 1) -> None:
        super().__init__()
        self.num_threads = check_int("num_threads", num_threads, minimum=1)
        self._previous: Optional[int] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            torch.set_num_threads(self._previous)
            self._previous = None
