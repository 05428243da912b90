"""The paper's from-scratch models, adapted to small images, and the LightningModule that trains them.

The paper (section 4.2) trains MobileNetV2, ShuffleNetV2 1.0x, EfficientNet-B0, ResNet-50 and
DenseNet-121 (and DLA-34, which torchvision does not have) from scratch on CIFAR's 32x32 images.
torchvision builds them for 224x224 ImageNet images: a stride-2 stem (and, for most, a max-pool)
shrinks the input 4x before the first block and 32x in all, so a 32x32 image would end as a 1x1 map.
:func:`build_model` applies the usual CIFAR adaptations instead, so that every model ends with a
4x4 map on 32x32 inputs (8x overall downsampling):

===================  ==========================================================================
``resnet18/50``      3x3 stride-1 stem conv instead of 7x7 stride 2; no max-pool.
``mobilenet_v2``     stride-1 stem conv; the first 24-channel block strides 1 instead of 2.
``efficientnet_b0``  stride-1 stem conv; the first 24-channel MBConv strides 1 instead of 2.
``shufflenet_v2``    stride-1 stem conv; no max-pool. (The 1.0x width, as in the paper.)
``densenet121``      3x3 stride-1 stem conv instead of 7x7 stride 2; no max-pool.
``digits_cnn``       not from the paper: a 6-conv network for the 8x8 digits of the quickstart.
===================  ==========================================================================

The rest of each network is torchvision's, built from scratch (no pretrained weights), so
``LayerDropBackCallback`` sees the same layers as on ImageNet.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightning_ldb.examples._deps import require
from lightning_ldb.schedule import check_choice, check_float, check_int

tv_models = require("torchvision.models")
torchmetrics_classification = require("torchmetrics.classification")


def _conv_like(
    conv: nn.Conv2d,
    stride: int,
    in_channels: Optional[int] = None,
    kernel_size: Optional[int] = None,
) -> nn.Conv2d:
    """A fresh conv shaped like ``conv`` but with another stride (and optionally input channels/kernel).

    A changed kernel gets "same" padding, so that a stride-1 conv keeps the spatial size.
    """
    kernel = conv.kernel_size if kernel_size is None else (kernel_size, kernel_size)
    padding = conv.padding if kernel_size is None else (kernel_size // 2, kernel_size // 2)
    return nn.Conv2d(
        conv.in_channels if in_channels is None else in_channels,
        conv.out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )


def _resnet(factory: Callable[..., nn.Module], num_classes: int, in_channels: int) -> nn.Module:
    model = factory(num_classes=num_classes)
    model.conv1 = _conv_like(model.conv1, stride=1, in_channels=in_channels, kernel_size=3)
    model.maxpool = nn.Identity()
    return model


def _mobilenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    model = tv_models.mobilenet_v2(num_classes=num_classes)
    model.features[0][0] = _conv_like(model.features[0][0], stride=1, in_channels=in_channels)
    # features[2] opens the 24-channel stage; its depthwise conv ([1][0]) carries the stride.
    model.features[2].conv[1][0] = _conv_like(model.features[2].conv[1][0], stride=1)
    return model


def _efficientnet_b0(num_classes: int, in_channels: int) -> nn.Module:
    model = tv_models.efficientnet_b0(num_classes=num_classes)
    model.features[0][0] = _conv_like(model.features[0][0], stride=1, in_channels=in_channels)
    # features[2][0] opens the 24-channel stage; its depthwise conv (block[1][0]) carries the stride.
    model.features[2][0].block[1][0] = _conv_like(model.features[2][0].block[1][0], stride=1)
    return model


def _shufflenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    model = tv_models.shufflenet_v2_x1_0(num_classes=num_classes)
    model.conv1[0] = _conv_like(model.conv1[0], stride=1, in_channels=in_channels)
    model.maxpool = nn.Identity()
    return model


def _densenet121(num_classes: int, in_channels: int) -> nn.Module:
    model = tv_models.densenet121(num_classes=num_classes)
    model.features.conv0 = _conv_like(model.features.conv0, stride=1, in_channels=in_channels, kernel_size=3)
    model.features.pool0 = nn.Identity()
    return model


def _digits_cnn(num_classes: int, in_channels: int) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    # 13 layers (6 conv, 6 BatchNorm, 1 linear): with keep_first=4 and keep_last=1, 8 are candidates.
    return nn.Sequential(
        *block(in_channels, 32),
        *block(32, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        *block(64, 128),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


#: Model name -> builder ``(num_classes, in_channels) -> nn.Module``.
_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": lambda num_classes, in_channels: _resnet(tv_models.resnet18, num_classes, in_channels),
    "resnet50": lambda num_classes, in_channels: _resnet(tv_models.resnet50, num_classes, in_channels),
    "mobilenet_v2": _mobilenet_v2,
    "efficientnet_b0": _efficientnet_b0,
    "shufflenet_v2": _shufflenet_v2,
    "densenet121": _densenet121,
    "digits_cnn": _digits_cnn,
}

#: The names :func:`build_model` accepts.
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build one of the paper's from-scratch models, adapted to small (32x32) images, with fresh weights.

    Args:
        name: One of :data:`MODEL_NAMES` (see the module docstring for each model's adaptation).
        num_classes: Number of output classes.
        in_channels: Channels of the input images (3 for CIFAR, 1 for the digits).

    Raises:
        ValueError: If ``name`` is not a known model, or a count is below 1.
        TypeError: If an argument has the wrong type.

    Example::

        >>> model = build_model("resnet18", num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    check_choice("name", name, MODEL_NAMES)
    check_int("num_classes", num_classes, minimum=1)
    check_int("in_channels", in_channels, minimum=1)
    return _BUILDERS[name](num_classes, in_channels)


class ImageClassifier(LightningModule):
    """Image classification with the paper's from-scratch recipe (section 4.3.1).

    SGD with momentum 0.9, base learning rate 0.1, cosine annealing over ``trainer.max_epochs``
    (stepped once per epoch), cross-entropy loss. Logs ``train_loss``/``train_acc`` per epoch,
    ``val_loss``/``val_acc`` and ``test_loss``/``test_acc`` (torchmetrics multiclass accuracy).
    The batch size (128 in the paper) belongs to the DataModule.

    Args:
        model: The network: ``resnet18``, ``resnet50``, ``mobilenet_v2``, ``efficientnet_b0``,
            ``shufflenet_v2``, ``densenet121`` (torchvision's, adapted to 32x32 images) or
            ``digits_cnn`` (for 8x8 digits); see :func:`build_model`.
        num_classes: Number of classes of the dataset (10 for CIFAR-10, 100 for CIFAR-100).
        in_channels: Channels of the input images.
        lr: Base learning rate (the paper: 0.1 from scratch).
        momentum: SGD momentum (the paper: 0.9).
        weight_decay: L2 penalty. The paper does not state it; 5e-4 is the usual CIFAR value.
        nesterov: Use Nesterov momentum.

    Raises:
        ValueError: If ``model`` is unknown or a number is out of range.
        TypeError: If an argument has the wrong type.
    """

    #: The values ``model`` accepts.
    model_names: tuple[str, ...] = MODEL_NAMES

    def __init__(
        self,
        model: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
    ) -> None:
        super().__init__()
        check_choice("model", model, self.model_names)
        check_float("lr", lr, 0.0, low_inclusive=False)
        check_float("momentum", momentum, 0.0, 1.0)
        check_float("weight_decay", weight_decay, 0.0)
        self.save_hyperparameters()
        self.net = self.build_network()
        metric = torchmetrics_classification.MulticlassAccuracy
        self.train_acc = metric(num_classes=num_classes)
        self.val_acc = metric(num_classes=num_classes)
        self.test_acc = metric(num_classes=num_classes)

    def build_network(self) -> nn.Module:
        """The network to train, built from ``self.hparams``; subclasses override it to train another one."""
        hp = self.hparams
        return build_model(hp.model, hp.num_classes, hp.in_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _shared_step(self, batch: Any, stage: str, accuracy: Any) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        accuracy(logits, labels)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError(
                f"{type(self).__name__} anneals the learning rate over `trainer.max_epochs`, which is {epochs!r}."
                " Set `trainer.max_epochs` to the number of training epochs (e.g. --trainer.max_epochs=200)."
            )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
