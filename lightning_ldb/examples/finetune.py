"""Fine-tuning pretrained torchvision transformers, as in the paper's Table 1.

The paper fine-tunes ViT-B/16, ViT-L/16 (on CIFAR-10/100 and ImageNet) and Swin-B (on ImageNet),
pretrained on ImageNet-21k. torchvision ships ImageNet-1k weights for the same architectures
(``IMAGENET1K_V1``, 224x224 inputs); those are the default here, so accuracies can differ from the
paper's while the speed-up measurement is like for like.

Weights are read from the ``torch.hub`` cache (``torch.hub.get_dir()``/checkpoints) and downloaded
there if missing. Without internet, :func:`load_pretrained_weights` explains where to put the file;
``pretrained=False`` trains the same architecture from scratch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lightning_ldb.examples._deps import require
from lightning_ldb.examples.models import ImageClassifier
from lightning_ldb.schedule import check_choice, check_int

tv_models = require("torchvision.models")

#: The architectures :func:`build_finetune_model` accepts (all take 224x224 inputs).
FINETUNE_MODEL_NAMES: tuple[str, ...] = ("vit_b_16", "vit_l_16", "swin_t", "swin_b")


def weights_cache_path(weights: Any) -> str:
    """Where ``torch.hub`` keeps (or would keep) the file of torchvision ``weights``."""
    filename = os.path.basename(weights.url.split("?")[0])
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def load_pretrained_weights(weights: Any) -> dict[str, torch.Tensor]:
    """The state dict of torchvision ``weights``: from the ``torch.hub`` cache, else downloaded into it.

    Args:
        weights: A torchvision weights enum member, e.g. ``ViT_B_16_Weights.IMAGENET1K_V1``.

    Raises:
        RuntimeError: If the file is neither cached nor downloadable; the message says where to put it.
    """
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # URLError, HTTPError, socket errors, a hash mismatch: all "could not fetch"
        path = weights_cache_path(weights)
        raise RuntimeError(
            f"Could not load the pretrained weights {weights} ({type(error).__name__}: {error}). They are read"
            f" from {path} and downloaded there from {weights.url} when missing. Without internet on this"
            f" machine, download that URL elsewhere and copy the file to {path} (or set TORCH_HOME to a"
            " folder holding checkpoints/<file>); or pass `pretrained: false` to train from scratch."
        ) from error


def _replace_head(model: nn.Module, num_classes: int) -> None:
    if hasattr(model, "heads"):  # VisionTransformer: heads.head
        model.heads.head = nn.Linear(model.heads.head.in_features, num_classes)
    else:  # SwinTransformer: head
        model.head = nn.Linear(model.head.in_features, num_classes)


def build_finetune_model(
    name: str, num_classes: int, pretrained: bool = True, weights: str = "IMAGENET1K_V1"
) -> nn.Module:
    """A torchvision ViT or Swin with a fresh ``num_classes`` head, on pretrained weights if asked.

    Args:
        name: One of :data:`FINETUNE_MODEL_NAMES`.
        num_classes: Classes of the new head.
        pretrained: Load the pretrained ``weights`` (see :func:`load_pretrained_weights`); ``False``
            starts from random weights.
        weights: Name of the torchvision weights, e.g. ``"IMAGENET1K_V1"`` (224x224 inputs).

    Raises:
        ValueError: If ``name`` or ``weights`` is unknown.
        RuntimeError: If pretrained weights are asked for and cannot be loaded.
    """
    check_choice("name", name, FINETUNE_MODEL_NAMES)
    check_int("num_classes", num_classes, minimum=1)
    state_dict = None
    if pretrained:  # before building the model: a missing file fails fast
        weights_enum = tv_models.get_model_weights(name)
        choices = list(weights_enum.__members__)  # with aliases such as "DEFAULT"
        check_choice("weights", weights, choices)
        state_dict = load_pretrained_weights(weights_enum[weights])
    model = tv_models.get_model(name, weights=None)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    _replace_head(model, num_classes)
    return model


class FineTuneClassifier(ImageClassifier):
    """:class:`ImageClassifier` fine-tuning a pretrained transformer (the paper's Table 1).

    The paper fine-tunes with SGD (momentum 0.9), learning rate 0.01 and batch size 512; the schedule
    (cosine over ``trainer.max_epochs``) and ``weight_decay=0`` follow the ViT paper's fine-tuning
    recipe. Inputs must be 224x224 (``CIFAR10DataModule(image_size=224, normalization="imagenet")``).

    Args:
        model: The torchvision transformer: ``vit_b_16``, ``vit_l_16``, ``swin_t`` or ``swin_b``.
        num_classes: Classes of the new head.
        pretrained: Start from pretrained ``weights``; ``False`` trains from scratch.
        weights: Name of the torchvision weights.
        lr: Base learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        nesterov: Use Nesterov momentum.

    Raises:
        ValueError: If ``model`` or ``weights`` is unknown, or a number is out of range.
        RuntimeError: If pretrained weights are asked for and cannot be loaded.
    """

    model_names = FINETUNE_MODEL_NAMES

    def __init__(
        self,
        model: str = "vit_b_16",
        num_classes: int = 10,
        pretrained: bool = True,
        weights: str = "IMAGENET1K_V1",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(
            model=model, num_classes=num_classes, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return build_finetune_model(hp.model, hp.num_classes, pretrained=hp.pretrained, weights=hp.weights)
