"""Synthetic CIFAR-shaped data for speed runs: no download, same bytes on every run, yet learnable."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldb._checks import check_float, check_int
from lightning_ldb.datamodule import LDBDataModuleMixin
from lightning_ldb.sampling import draw_key


def make_images(
    samples: int, num_classes: int, channels: int, image_size: int, signal: float, seed: int, split: int
) -> TensorDataset:
    """``samples`` images with balanced labels: the class's smooth template times ``signal``, plus unit noise.

    Templates are 4x4 Gaussian patterns upsampled to ``image_size`` (so convolutions can pick them up),
    the same for every split of one ``seed``; ``split`` only changes the noise and the labels' order.

    Example::

        >>> data = make_images(20, num_classes=10, channels=3, image_size=8, signal=0.5, seed=0, split=0)
        >>> data.tensors[0].shape, torch.bincount(data.tensors[1]).tolist()
        (torch.Size([20, 3, 8, 8]), [2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    """
    templates_rng = torch.Generator().manual_seed(draw_key(seed, -1))
    coarse = torch.randn(num_classes, channels, 4, 4, generator=templates_rng)
    templates = torch.nn.functional.interpolate(
        coarse, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    rng = torch.Generator().manual_seed(draw_key(seed, split))
    labels = (torch.arange(samples) % num_classes)[torch.randperm(samples, generator=rng)]
    noise = torch.randn(samples, channels, image_size, image_size, generator=rng)
    return TensorDataset(signal * templates[labels] + noise, labels)


class SyntheticImageDataModule(LDBDataModuleMixin, LightningDataModule):
    """CIFAR-shaped synthetic classification data (3x32x32, 10 classes by default), held in memory.

    Each class is a fixed smooth pattern under Gaussian noise, so accuracy rises with training and
    means something, while loading costs next to nothing. The training order of epoch ``e`` depends
    only on ``(seed, e)``, not on the global RNG: a baseline and an LDB run see the same batches
    (LDB's DROP epochs in batches ``batch_scale`` times larger, through
    :class:`~lightning_ldb.LDBDataModuleMixin`).

    Args:
        train_samples: Training images per epoch.
        val_samples: Validation images.
        batch_size: Training (base) and validation batch size.
        num_classes: Number of classes.
        channels: Image channels.
        image_size: Image side in pixels.
        signal: Amplitude of the class pattern relative to the unit noise (larger: easier).
        seed: Seed of the images and of the training order.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a count is below 1 or ``signal`` is negative.
    """

    def __init__(
        self,
        train_samples: int = 1024,
        val_samples: int = 256,
        batch_size: int = 64,
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        signal: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_samples = check_int("train_samples", train_samples, minimum=1)
        self.val_samples = check_int("val_samples", val_samples, minimum=1)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.channels = check_int("channels", channels, minimum=1)
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.signal = check_float("signal", signal, 0.0)
        self.seed = check_int("seed", seed, minimum=0)
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def _images(self, samples: int, split: int) -> TensorDataset:
        return make_images(samples, self.num_classes, self.channels, self.image_size, self.signal, self.seed, split)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set = self._images(self.train_samples, split=0)
            self.val_set = self._images(self.val_samples, split=1)

    def example_batch(self, batch_size: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of the right shapes (zeros) on ``device``, e.g. ``"meta"`` to count FLOPs."""
        images = torch.zeros(batch_size, self.channels, self.image_size, self.image_size, device=device)
        return images, torch.zeros(batch_size, dtype=torch.long, device=device)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        order = torch.Generator().manual_seed(draw_key(self.seed, epoch, step=-1))
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=order)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
