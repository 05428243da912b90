"""The peers ``ldb-bench`` runs beside LDB on request: Stochastic Depth and progressive layer freezing.

- ``stochastic-depth`` (Huang et al., 2016; the paper's Table 5 peer): residual branches of torchvision
  ResNet blocks skipped, forward and backward, with a linearly decaying probability.
- ``freezing``: progressive layer freezing as in Composer's ``LayerFreezing`` (the FreezeOut / Freeze
  Training family): the earliest layers are frozen progressively over training, the forward unchanged.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_ldb.bench.data import derived_seed


# ---------------------------------------------------------------------------------------------- stochastic depth
def _residual_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of a torchvision ``BasicBlock`` (2 convs) or ``Bottleneck`` (3 convs)."""
    convs = [name for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
    for index, name in enumerate(convs):
        x = getattr(block, f"bn{name[-1]}")(getattr(block, name)(x))
        if index < len(convs) - 1:
            x = block.relu(x)
    return x


def _stochastic_forward(block: nn.Module, rate: float, generator: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    if not block.training:
        return type(block).forward(block, x)
    if torch.rand((), generator=generator).item() < rate:
        return x  # branch skipped, forward and backward; x >= 0 (a ReLU output), so relu(x) == x
    return block.relu(_residual_branch(block, x) / (1.0 - rate) + x)


def identity_blocks(net: nn.Module) -> list[nn.Module]:
    """``net``'s torchvision ``BasicBlock``/``Bottleneck`` blocks with an identity shortcut, in module order."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:
        return []
    return [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck)) and m.downsample is None]


def add_stochastic_depth(net: nn.Module, final_rate: float, seed: int) -> int:
    """Give ``net``'s identity-shortcut residual blocks Stochastic Depth (Huang et al., 2016); return their count.

    In training, block ``l`` of ``L`` skips its residual branch, forward and backward, with probability
    ``final_rate * l / L`` (the paper's linear decay) for the whole batch; a kept branch is scaled by
    ``1 / (1 - rate)``, so evaluation runs the blocks unchanged. Blocks with a projection shortcut always
    run (their output shape differs from the input's). The draws come from one generator seeded from
    ``seed``, never the global RNG.

    ``torchvision.ops.StochasticDepth`` does not fit here: it multiplies the branch's output by a 0/1 mask,
    so a dropped branch still runs forward and backward (no time saved, which is what the benchmark
    measures), and it draws from the global RNG. Hence this forward, which does not run a skipped branch.

    Args:
        net: A torchvision ResNet, or any module holding torchvision ``BasicBlock``/``Bottleneck`` blocks
            (a LightningModule included).
        final_rate: The last block's drop probability, in ``[0, 1)``.
        seed: Seed of the draws.

    Raises:
        ValueError: If ``final_rate`` is outside ``[0, 1)`` or ``net`` has no identity-shortcut block.

    Example::

        >>> from torchvision.models import resnet18
        >>> add_stochastic_depth(resnet18(), final_rate=0.5, seed=0)  # 8 blocks, 3 of them projecting
        5
    """
    if not 0.0 <= final_rate < 1.0:
        raise ValueError(f"`final_rate` must be in [0, 1), got {final_rate!r}.")
    blocks = identity_blocks(net)
    if not blocks:
        name = type(net).__name__
        raise ValueError(f"Stochastic Depth needs residual blocks with identity shortcuts; {name} has none.")
    generator = torch.Generator().manual_seed(derived_seed(seed, 4))
    for index, block in enumerate(blocks, start=1):
        block.forward = functools.partial(_stochastic_forward, block, final_rate * index / len(blocks), generator)
    return len(blocks)


# ---------------------------------------------------------------------------------------------- layer freezing
def freeze_fraction(progress: float, freeze_start: float, freeze_level: float) -> float:
    """Composer's ``LayerFreezing`` schedule: the fraction of layers frozen after ``progress`` of training.

    Nothing is frozen until ``freeze_start``; from there the fraction rises linearly to ``freeze_level``
    at the end of training.

    Example::

        >>> [freeze_fraction(t, 0.5, 1.0) for t in (0.25, 0.5, 0.75, 1.0)]
        [0.0, 0.0, 0.5, 1.0]
    """
    if progress <= freeze_start:
        return 0.0
    return freeze_level * (progress - freeze_start) / (1.0 - freeze_start)


class ProgressiveFreezing(Callback):
    """Progressive layer freezing, as Composer's ``LayerFreezing`` (FreezeOut / Freeze Training family).

    The layers are the network's leaf modules in definition order (as Composer flattens its children).
    At the end of each training epoch ``e`` of ``max_epochs``, the first
    ``int(len(layers) * freeze_fraction((e + 1) / max_epochs, freeze_start, freeze_level))`` of them get
    ``requires_grad=False`` for the rest of the fit: no weight gradient, no optimizer update, and no
    backward at all below the first trainable layer. The forward pass is unchanged. Composer's defaults:
    ``freeze_start=0.5`` (half of training before freezing begins), ``freeze_level=1.0`` (all layers by
    the end). Everything it froze is trainable again when the fit ends.

    Args:
        freeze_start: Fraction of training before freezing begins, in ``[0, 1)``.
        freeze_level: Fraction of layers frozen at the end of training, in ``[0, 1]``.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0) -> None:
        if not 0.0 <= freeze_start < 1.0:
            raise ValueError(f"`freeze_start` must be in [0, 1), got {freeze_start!r}.")
        if not 0.0 <= freeze_level <= 1.0:
            raise ValueError(f"`freeze_level` must be in [0, 1], got {freeze_level!r}.")
        self.freeze_start, self.freeze_level = freeze_start, freeze_level
        self._layers: list[tuple[str, nn.Module]] = []
        self._frozen: list[nn.Parameter] = []
        self.frozen_layers: tuple[str, ...] = ()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._layers = [(name, m) for name, m in pl_module.named_modules() if not any(True for _ in m.children())]
        self._frozen, self.frozen_layers = [], ()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        max_epochs: Optional[int] = trainer.max_epochs
        if not max_epochs or max_epochs < 1:
            return
        fraction = freeze_fraction((trainer.current_epoch + 1) / max_epochs, self.freeze_start, self.freeze_level)
        count = int(len(self._layers) * fraction)
        for name, layer in self._layers[len(self.frozen_layers) : count]:
            for parameter in layer.parameters(recurse=False):
                if parameter.requires_grad:
                    parameter.requires_grad_(False)
                    self._frozen.append(parameter)
        self.frozen_layers = tuple(name for name, _ in self._layers[: max(count, len(self.frozen_layers))])

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self._frozen = []
