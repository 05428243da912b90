"""The benchmark's data, all offline: synthetic images, scikit-learn's digits, MNIST-1D from its generator."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldb import LDBDataModuleMixin

#: ``kind`` values of :func:`load_splits`.
DATA_KINDS = ("synthetic", "digits", "mnist1d")


def derived_seed(seed: int, *keys: int) -> int:
    """A seed for the stream ``keys`` of ``seed``, drawn from a ``torch.Generator`` (never the global RNG).

    Distinct ``keys`` give unrelated seeds, so the benchmark's streams (templates, splits, epochs) never overlap.

    Example::

        >>> derived_seed(0, 1) == derived_seed(0, 1) != derived_seed(0, 2)
        True
    """
    generator = torch.Generator().manual_seed(seed)
    for key in keys:
        drawn = int(torch.randint(2**62, (), generator=generator))
        generator.manual_seed(drawn + key)
    return int(torch.randint(2**62, (), generator=generator))


def synthetic_images(
    samples: int, num_classes: int, channels: int, image_size: int, seed: int, split: int, signal: float = 0.5
) -> TensorDataset:
    """``samples`` images with balanced labels: the class's smooth template times ``signal``, plus unit noise.

    Templates (4x4 Gaussian patterns upsampled to ``image_size``) depend on ``seed`` only; ``split``
    changes the noise and the labels' order, so train and validation share the classes.

    Example::

        >>> data = synthetic_images(20, num_classes=10, channels=3, image_size=8, seed=0, split=0)
        >>> data.tensors[0].shape, torch.bincount(data.tensors[1]).tolist()
        (torch.Size([20, 3, 8, 8]), [2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    """
    templates_rng = torch.Generator().manual_seed(derived_seed(seed, 1))
    coarse = torch.randn(num_classes, channels, 4, 4, generator=templates_rng)
    templates = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear")
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    rng = torch.Generator().manual_seed(derived_seed(seed, 2, split))
    labels = (torch.arange(samples) % num_classes)[torch.randperm(samples, generator=rng)]
    noise = torch.randn(samples, channels, image_size, image_size, generator=rng)
    return TensorDataset(signal * templates[labels] + noise, labels)


def _standardised(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(), train.std()
    return (train - mean) / std, (val - mean) / std


def load_splits(
    kind: str, train_samples: int, val_samples: int, shape: tuple[int, ...], num_classes: int, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Train and validation sets of ``kind`` (one of :data:`DATA_KINDS`), inputs of ``shape`` per sample.

    ``digits`` (1,797 real 8x8 images) and ``mnist1d`` (real-shaped 1-D signals of length 40, drawn by
    the ``mnist1d`` package's generator, never its downloader) are cut to at most the requested sizes.

    Raises:
        ValueError: If ``kind`` is unknown.
    """
    if kind == "synthetic":
        channels, size = shape[0], shape[-1]
        return (
            synthetic_images(train_samples, num_classes, channels, size, seed, split=0),
            synthetic_images(val_samples, num_classes, channels, size, seed, split=1),
        )
    if kind == "digits":
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        x = torch.as_tensor(images, dtype=torch.float32)[order].view(-1, 1, 8, 8)
        y = torch.as_tensor(labels)[order]
        n_val = min(val_samples, len(y) // 5)
        x_train, x_val = _standardised(x[n_val:][:train_samples], x[:n_val])
        return TensorDataset(x_train, y[n_val:][:train_samples]), TensorDataset(x_val, y[:n_val])
    if kind == "mnist1d":
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as error:
            raise ImportError(f"MNIST-1D data needs the `mnist1d` package: pip install mnist1d ({error})") from error

        args = get_dataset_args()
        args.num_samples, args.train_split, args.seed = train_samples + val_samples, 0.8, seed
        # The generator splits 80/20; both parts are then cut to the requested sizes.
        data = make_dataset(args)
        x_train = torch.as_tensor(data["x"], dtype=torch.float32)[:train_samples].unsqueeze(1)
        x_val = torch.as_tensor(data["x_test"], dtype=torch.float32)[:val_samples].unsqueeze(1)
        x_train, x_val = _standardised(x_train, x_val)
        y_train = torch.as_tensor(data["y"])[:train_samples]
        return TensorDataset(x_train, y_train), TensorDataset(x_val, torch.as_tensor(data["y_test"])[:val_samples])
    raise ValueError(f"`kind` must be one of {list(DATA_KINDS)}, got {kind!r}.")


class BenchDataModule(LDBDataModuleMixin, LightningDataModule):
    """The presets' data, as a DataModule a config names (``class_path: lightning_ldb.bench.BenchDataModule``).

    Training order of epoch ``e`` depends only on ``(seed, e)``; DROP epochs load batches ``batch_scale`` times
    larger through :class:`~lightning_ldb.LDBDataModuleMixin`.

    Args:
        kind: ``synthetic``, ``digits`` or ``mnist1d`` (see :func:`load_splits`).
        train_samples: Training samples (at most what ``kind`` has).
        val_samples: Validation samples.
        batch_size: Base training batch size, and the validation batch size.
        shape: One sample's shape, channels first (``[3, 32, 32]`` for synthetic CIFAR-shaped images).
        num_classes: Number of classes.
        seed: Seed of the data and of the training order.

    Raises:
        ValueError: If ``kind`` is unknown or a size is below 1.
    """

    def __init__(
        self,
        kind: str = "synthetic",
        train_samples: int = 1024,
        val_samples: int = 256,
        batch_size: int = 64,
        shape: tuple[int, ...] = (3, 32, 32),
        num_classes: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in DATA_KINDS:
            raise ValueError(f"`kind` must be one of {list(DATA_KINDS)}, got {kind!r}.")
        for name, value in (("train_samples", train_samples), ("val_samples", val_samples), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        self.kind, self.train_samples, self.val_samples = kind, train_samples, val_samples
        self.batch_size, self.shape, self.num_classes, self.seed = batch_size, tuple(shape), num_classes, seed
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = load_splits(
                self.kind, self.train_samples, self.val_samples, self.shape, self.num_classes, self.seed
            )

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        order = torch.Generator().manual_seed(derived_seed(self.seed, 3, epoch))
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=order)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
