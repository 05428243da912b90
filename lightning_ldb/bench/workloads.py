"""What the benchmark trains: model presets with their own data, and the Stochastic Depth peer.

Each preset fixes its input shape and data (``--model digits_cnn`` means 1x8x8 real digits), so the
command line never has to repeat them.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from lightning_ldb.examples import ImageClassifier, build_model
from lightning_ldb.sampling import draw_key


def _vit(patch_size: int, layers: int, heads: int, hidden: int, mlp: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
        from torchvision.models import VisionTransformer

        return VisionTransformer(shape[-1], patch_size, layers, heads, hidden, mlp, num_classes=num_classes)

    return build


def _paper_model(name: str) -> Callable[..., nn.Module]:
    return lambda num_classes, shape: build_model(name, num_classes, shape[0])


def _resnet18_imagenet_stem(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    from torchvision.models import resnet18

    # torchvision's own stem (7x7 stride 2 and a max-pool): on 32x32 inputs the blocks see 8x8 maps.
    return resnet18(num_classes=num_classes)


def _mnist1d_cnn(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv1d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]

    # 9 layers (4 conv, 4 BatchNorm, 1 linear): with keep_first=4 and keep_last=1, 4 are candidates.
    return nn.Sequential(
        *block(shape[0], 32, 1), *block(32, 32, 2), *block(32, 64, 2), *block(64, 64, 2), nn.Flatten(),
        nn.Linear(64 * 5, num_classes),
    )  # fmt: skip


def _resnet18_mnist1d(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    # MNIST-1D's 40 samples as a 40x1 image, so that torchvision's residual blocks (block mode, Stochastic Depth) apply.
    return nn.Sequential(nn.Unflatten(-1, (shape[-1], 1)), build_model("resnet18", num_classes, shape[0]))


@dataclass(frozen=True)
class Workload:
    """A model preset: its network, data and training defaults.

    Args:
        build: ``(num_classes, shape) -> nn.Module``.
        data: ``synthetic``, ``digits`` or ``mnist1d`` (see :func:`~lightning_ldb.bench.data.load_splits`).
        shape: One sample's shape, channels first.
        train_samples: Default training samples per epoch.
        batch_size: Default base batch size.
        lr: Default base SGD learning rate.
        residual: Whether it has torchvision ResNet blocks (Stochastic Depth applies).
        branches: Whether block mode recognises its residual branches (``ldb-block`` applies).
        about: One line for ``--help``.
    """

    build: Callable[[int, tuple[int, ...]], nn.Module]
    data: str
    shape: tuple[int, ...]
    train_samples: int = 1024
    batch_size: int = 64
    lr: float = 0.1
    residual: bool = False
    branches: bool = False
    about: str = ""


WORKLOADS: dict[str, Workload] = {
    "resnet18": Workload(
        _paper_model("resnet18"), "synthetic", (3, 32, 32), residual=True, branches=True,
        about="CIFAR stem, synthetic 3x32x32",
    ),
    "resnet18-imagenet-stem": Workload(
        _resnet18_imagenet_stem, "synthetic", (3, 32, 32), residual=True, branches=True,
        about="torchvision's stem on 3x32x32",
    ),
    "vit-small": Workload(
        _vit(4, 6, 3, 192, 384), "synthetic", (3, 32, 32), lr=0.01, branches=True, about="6 layers, width 192"
    ),
    "resnet18-digits": Workload(
        _paper_model("resnet18"), "digits", (1, 8, 8), 1437, 32, 0.05, True, True, "ResNet-18 on the real 8x8 digits"
    ),
    "digits_cnn": Workload(_paper_model("digits_cnn"), "digits", (1, 8, 8), 1437, 32, 0.05, about="real 8x8 digits"),
    "mnist1d-cnn": Workload(_mnist1d_cnn, "mnist1d", (1, 40), 4000, 64, 0.05, about="1-D CNN, generated MNIST-1D"),
    "resnet18-mnist1d": Workload(
        _resnet18_mnist1d, "mnist1d", (1, 40), 4000, 64, 0.05, True, True, "ResNet-18 on MNIST-1D as 40x1 images"
    ),
    # The GPU suite's two: ResNet-50 from scratch on CIFAR shapes, ViT-B/16 at its fine-tuning shape.
    "resnet50": Workload(
        _paper_model("resnet50"), "synthetic", (3, 32, 32), 8192, 128, 0.1, True, True, "CIFAR stem"
    ),
    "vit-b16": Workload(
        _vit(16, 12, 12, 768, 3072), "synthetic", (3, 224, 224), 2048, 64, 0.01, branches=True, about="224x224"
    ),
}


def workload_for(model: str, image_size: Optional[int] = None) -> Workload:
    """The preset ``model``, on square synthetic images of side ``image_size`` if given.

    A ViT built for another image size gets a position table of the matching length.

    Raises:
        ValueError: If ``model`` is unknown, or ``image_size`` is given for a preset with real data.
    """
    if model not in WORKLOADS:
        raise ValueError(f"`model` must be one of {list(WORKLOADS)}, got {model!r}.")
    workload = WORKLOADS[model]
    if image_size is None:
        return workload
    if workload.data != "synthetic":
        raise ValueError(f"`image_size` applies to synthetic-image models only, not to {workload.data} data.")
    return dataclasses.replace(workload, shape=(workload.shape[0], image_size, image_size))


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


def add_stochastic_depth(net: nn.Module, final_rate: float, seed: int) -> int:
    """Give ``net``'s identity-shortcut residual blocks Stochastic Depth (Huang et al., 2016); return their count.

    In training, block ``l`` of ``L`` skips its residual branch, forward and backward, with probability
    ``final_rate * l / L`` (the paper's linear decay) for the whole batch, as
    ``torchvision.ops.StochasticDepth(mode="batch")`` would; a kept branch is scaled by
    ``1 / (1 - rate)``, so evaluation runs the blocks unchanged. Blocks with a projection shortcut
    always run (their output shape differs from the input's). The draws come from one generator
    seeded with ``seed``, never the global RNG.

    Args:
        net: A torchvision ResNet (or any network of torchvision ``BasicBlock``/``Bottleneck`` blocks).
        final_rate: The last block's drop probability, in ``[0, 1)``.
        seed: Seed of the draws.

    Raises:
        ValueError: If ``final_rate`` is outside ``[0, 1)`` or ``net`` has no identity-shortcut block.

    Example::

        >>> from torchvision.models import resnet18
        >>> add_stochastic_depth(resnet18(), final_rate=0.5, seed=0)  # 8 blocks, 3 of them projecting
        5
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if not 0.0 <= final_rate < 1.0:
        raise ValueError(f"`final_rate` must be in [0, 1), got {final_rate!r}.")
    blocks = [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck)) and m.downsample is None]
    if not blocks:
        name = type(net).__name__
        raise ValueError(f"Stochastic Depth needs residual blocks with identity shortcuts; {name} has none.")
    generator = torch.Generator().manual_seed(draw_key(seed, -2))
    for index, block in enumerate(blocks, start=1):
        block.forward = functools.partial(_stochastic_forward, block, final_rate * index / len(blocks), generator)
    return len(blocks)


class BenchClassifier(ImageClassifier):
    """:class:`~lightning_ldb.examples.ImageClassifier`'s recipe (SGD, cosine LR) on a :data:`WORKLOADS` network.

    Args:
        model: The preset's name.
        num_classes: Number of classes.
        lr: Base learning rate.
        image_size: Side of the synthetic images, if not the preset's.
        stochastic_depth: Final-block drop rate of :func:`add_stochastic_depth`; 0 leaves the network as is.
        seed: Seed of Stochastic Depth's draws.
    """

    model_names = tuple(WORKLOADS)

    def __init__(
        self,
        model: str,
        num_classes: int,
        lr: float,
        image_size: Optional[int] = None,
        stochastic_depth: float = 0.0,
        seed: int = 0,
    ) -> None:
        workload = workload_for(model, image_size)
        super().__init__(model=model, num_classes=num_classes, in_channels=workload.shape[0], lr=lr)
        if stochastic_depth:
            add_stochastic_depth(self.net, stochastic_depth, seed)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        workload = workload_for(hp.model, hp.image_size)
        return workload.build(hp.num_classes, workload.shape)
