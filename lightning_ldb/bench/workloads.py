"""The networks of the benchmark's presets (``configs/bench/*.yaml``), as a LightningModule a config names.

Each preset's YAML pairs :class:`BenchClassifier` (``model: <preset>``) with
:class:`~lightning_ldb.bench.BenchDataModule` of the matching data and shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from lightning_ldb.examples import ImageClassifier, build_model


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
    """A model preset: its network and the data it is meant for.

    Args:
        build: ``(num_classes, shape) -> nn.Module``.
        data: ``synthetic``, ``digits`` or ``mnist1d`` (see :func:`~lightning_ldb.bench.data.load_splits`).
        shape: One sample's shape, channels first.
        about: One line of description.
    """

    build: Callable[[int, tuple[int, ...]], nn.Module]
    data: str
    shape: tuple[int, ...]
    about: str = ""


WORKLOADS: dict[str, Workload] = {
    "resnet18": Workload(_paper_model("resnet18"), "synthetic", (3, 32, 32), "CIFAR stem, synthetic 3x32x32"),
    "resnet18-imagenet-stem": Workload(_resnet18_imagenet_stem, "synthetic", (3, 32, 32), "torchvision's stem"),
    "vit-small": Workload(_vit(4, 6, 3, 192, 384), "synthetic", (3, 32, 32), "6 layers, width 192"),
    "resnet18-digits": Workload(_paper_model("resnet18"), "digits", (1, 8, 8), "ResNet-18 on the real 8x8 digits"),
    "digits_cnn": Workload(_paper_model("digits_cnn"), "digits", (1, 8, 8), "real 8x8 digits"),
    "mnist1d-cnn": Workload(_mnist1d_cnn, "mnist1d", (1, 40), "1-D CNN, generated MNIST-1D"),
    "resnet18-mnist1d": Workload(_resnet18_mnist1d, "mnist1d", (1, 40), "ResNet-18 on MNIST-1D as 40x1 images"),
    # The GPU presets: ResNet-50 from scratch on CIFAR shapes, ViT-B/16 at its fine-tuning shape.
    "resnet50": Workload(_paper_model("resnet50"), "synthetic", (3, 32, 32), "CIFAR stem"),
    "vit-b16": Workload(_vit(16, 12, 12, 768, 3072), "synthetic", (3, 224, 224), "224x224"),
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


class BenchClassifier(ImageClassifier):
    """:class:`~lightning_ldb.examples.ImageClassifier`'s recipe (SGD, cosine LR) on a :data:`WORKLOADS` network.

    Args:
        model: The preset's name.
        num_classes: Number of classes.
        lr: Base learning rate.
        image_size: Side of the synthetic images, if not the preset's.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        nesterov: Use Nesterov momentum.
    """

    model_names = tuple(WORKLOADS)

    def __init__(
        self,
        model: str = "resnet18",
        num_classes: int = 10,
        lr: float = 0.1,
        image_size: Optional[int] = None,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
    ) -> None:
        workload = workload_for(model, image_size)
        # Every argument is in this signature: LightningCLI saves the hyperparameters a config gives.
        super().__init__(model, num_classes, workload.shape[0], lr, momentum, weight_decay, nesterov)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        workload = workload_for(hp.model, hp.image_size)
        return workload.build(hp.num_classes, workload.shape)
