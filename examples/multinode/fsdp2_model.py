"""The example classifiers, sharded with FSDP2 (``fully_shard``) for Lightning's ``ModelParallelStrategy``.

Used by ``fsdp2_vit_l16.yaml``: ``ldb fit`` finds the classes as ``fsdp2_model.ShardedFineTuneClassifier``
(or ``fsdp2_model.ShardedImageClassifier``) when this folder is on ``PYTHONPATH``, which
``fsdp2_slurm.sh`` and the torchrun lines of ``README.md`` set.

``configure_model`` puts every module of the network whose name matches one of ``shard`` (shell
patterns over ``self.net.named_modules()``, e.g. ViT's encoder blocks ``encoder.layers.*``) in a
``fully_shard`` group of its own, then shards the network's root, which holds what is left. LDB then
needs nothing else from you: it discovers the layers after ``configure_model`` (their parameter
counts are the global, unsharded sizes), and FSDP2 skips dropped parameters in the gradient
reduce-scatter on its own (``docs/fsdp.md``). One group per block keeps memory low; it does not
change which gradients are communicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any, Optional

from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_ldb.examples import FineTuneClassifier, ImageClassifier

#: ``shard`` for torchvision's ViT (``vit_b_16``, ``vit_l_16``): one group per encoder block.
VIT_BLOCKS = ("encoder.layers.*",)


def modules_to_shard(net: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The names of the modules of ``net`` that :func:`shard_network` gives a group of their own.

    Args:
        net: The network.
        patterns: ``fnmatch`` patterns over the names in ``net.named_modules()``; a matching module
            without parameters is skipped, and so is one nested in a module matched already.

    Raises:
        TypeError: If ``patterns`` is a single string rather than a list of them.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
        >>> modules_to_shard(net, ["*"])
        ['0', '2']
        >>> modules_to_shard(net, ["2.*"])
        ['2.0', '2.1']
    """
    if isinstance(patterns, str):
        raise TypeError(f"shard={patterns!r} must be a list of patterns, e.g. [{patterns!r}].")
    chosen: list[str] = []
    for name, module in net.named_modules():
        if not name or not any(fnmatchcase(name, pattern) for pattern in patterns):
            continue
        if any(name.startswith(outer + ".") for outer in chosen) or not any(True for _ in module.parameters()):
            continue
        chosen.append(name)
    return chosen


def shard_network(net: nn.Module, patterns: Sequence[str], mesh: Any) -> list[str]:
    """``fully_shard`` the modules of ``net`` named by ``patterns`` (innermost first), then ``net`` itself.

    Args:
        net: The network (not the LightningModule, which Lightning keeps unwrapped).
        patterns: See :func:`modules_to_shard`.
        mesh: The data-parallel device mesh, ``self.device_mesh["data_parallel"]`` in ``configure_model``.

    Returns:
        The names of the modules that got a group of their own.

    Raises:
        TypeError: If ``patterns`` is a single string rather than a list of them.
    """
    chosen = modules_to_shard(net, patterns)
    for name in reversed(chosen):  # FSDP2 groups are built bottom-up
        fully_shard(net.get_submodule(name), mesh=mesh)
    fully_shard(net, mesh=mesh)
    return chosen


class _FullyShard:
    """``configure_model`` for the example classifiers: FSDP2 groups as :func:`shard_network` makes them."""

    net: nn.Module
    shard: Sequence[str]
    device_mesh: Any

    def configure_model(self) -> None:
        if getattr(self, "_sharded", False):
            return  # Lightning may call it again (e.g. for testing after fit); the network is sharded once
        shard_network(self.net, self.shard, self.device_mesh["data_parallel"])
        self._sharded = True


class ShardedImageClassifier(_FullyShard, ImageClassifier):
    """:class:`~lightning_ldb.examples.ImageClassifier` sharded with FSDP2 (e.g. ``digits_cnn`` for a CPU smoke test).

    Args:
        shard: Patterns of the modules that get an FSDP2 group of their own (see :func:`shard_network`);
            ``["*"]`` gives every module with parameters its own group.
        **kwargs: :class:`~lightning_ldb.examples.ImageClassifier`'s arguments.
    """

    def __init__(self, shard: Optional[list[str]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shard = list(shard) if shard is not None else ["*"]


class ShardedFineTuneClassifier(_FullyShard, FineTuneClassifier):
    """:class:`~lightning_ldb.examples.FineTuneClassifier` sharded with FSDP2, one group per ViT encoder block.

    Args:
        shard: Patterns of the modules that get an FSDP2 group of their own (see :func:`shard_network`).
            The default, ``["encoder.layers.*"]``, is one group per encoder block of torchvision's ViTs.
        **kwargs: :class:`~lightning_ldb.examples.FineTuneClassifier`'s arguments.
    """

    def __init__(self, shard: Optional[list[str]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shard = list(shard) if shard is not None else list(VIT_BLOCKS)
