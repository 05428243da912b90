"""DataModules for the examples: offline digits for the quickstart, CIFAR-10/100 for the paper.

All of them use :class:`~lightning_ldb.LDBDataModuleMixin`, so on DROP epochs their train loader
serves ``batch_size * batch_scale`` images per batch. Validation and test loaders keep
``batch_size``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_ldb import LDBDataModuleMixin
from lightning_ldb.examples._deps import require
from lightning_ldb.schedule import check_choice, check_float, check_int

tv_datasets = require("torchvision.datasets")
tv_transforms = require("torchvision.transforms")

#: Per-channel mean and std of ImageNet, which pretrained torchvision backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DigitsDataModule(LDBDataModuleMixin, LightningDataModule):
    """scikit-learn's handwritten digits: 1,797 grayscale 8x8 images of the digits 0-9.

    The data ships with scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded.
    A stratified split keeps ``val_fraction`` of the images for validation (also served as the test
    set). Pixels (0-16) are standardised with the training split's mean and std.

    Args:
        batch_size: Training batch size (multiplied by ``batch_scale`` on DROP epochs) and the
            validation batch size.
        val_fraction: Fraction of the images held out for validation, in ``(0, 1)``.
        image_size: Side of the images served; 8 is the native size, larger values upsample
            bilinearly (e.g. 32 to try the CIFAR models on digits).
        split_seed: Seed of the train/validation split.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: If a number is out of range.
        TypeError: If an argument has the wrong type.
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        image_size: int = 8,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, low_inclusive=False)
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.split_seed = check_int("split_seed", split_seed, minimum=0)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        sk_datasets = require("sklearn.datasets")
        sk_model_selection = require("sklearn.model_selection")
        digits = sk_datasets.load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = sk_model_selection.train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.val_fraction,
            stratify=labels.numpy(),
            random_state=self.split_seed,
        )
        train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
        mean, std = images[train_idx].mean(), images[train_idx].std()
        images = (images - mean) / std
        if self.image_size != images.shape[-1]:
            images = torch.nn.functional.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class CIFAR10DataModule(LDBDataModuleMixin, LightningDataModule):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10``, with the usual augmentation.

    Training images get a random crop (padding 1/8 of the side) and a horizontal flip; all images
    are normalised per channel. As in the paper, the official 10,000-image test split is the
    validation set (and the test set).

    Args:
        data_dir: Folder holding (or receiving) ``cifar-10-batches-py`` / ``cifar-100-python``.
        batch_size: Training batch size (the paper: 128 from scratch; multiplied by
            ``batch_scale`` on DROP epochs) and the evaluation batch size.
        num_workers: DataLoader worker processes.
        download: Download the dataset into ``data_dir`` if it is not there (needs internet).
        image_size: Side of the images served. 32 is native; fine-tuning a 224x224 backbone
            (ViT, Swin) resizes to 224.
        normalization: ``"dataset"``: the dataset's own channel statistics (training from
            scratch). ``"imagenet"``: ImageNet's, which pretrained backbones expect.
        augment: Random crop and flip on training images.

    Raises:
        ValueError: If a number is out of range or ``normalization`` is unknown.
        TypeError: If an argument has the wrong type.
    """

    num_classes = 10
    in_channels = 3
    dataset_name = "CIFAR10"
    folder_name = "cifar-10-batches-py"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = True,
        image_size: int = 32,
        normalization: str = "dataset",
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.download = download
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.normalization = check_choice("normalization", normalization, ("dataset", "imagenet"))
        self.augment = augment
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def _dataset(self, train: bool, transform: Any = None, download: bool = False) -> Dataset:
        dataset_class = getattr(tv_datasets, self.dataset_name)
        try:
            return dataset_class(self.data_dir, train=train, transform=transform, download=download)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.dataset_name} was not found in data_dir={self.data_dir!r} ({error}). Pass `download=True`"
                f" (data.init_args.download: true; needs internet), or place the extracted `{self.folder_name}`"
                f" folder from https://www.cs.toronto.edu/~kriz/cifar.html inside {self.data_dir!r}."
            ) from error

    def build_transform(self, train: bool) -> Any:
        """The transform of the training (``train=True``) or evaluation images."""
        steps: list[Any] = []
        if self.image_size != 32:
            steps.append(tv_transforms.Resize(self.image_size))
        if train and self.augment:
            steps += [
                tv_transforms.RandomCrop(self.image_size, padding=self.image_size // 8),
                tv_transforms.RandomHorizontalFlip(),
            ]
        mean, std = (self.mean, self.std) if self.normalization == "dataset" else (IMAGENET_MEAN, IMAGENET_STD)
        steps += [tv_transforms.ToTensor(), tv_transforms.Normalize(mean, std)]
        return tv_transforms.Compose(steps)

    def prepare_data(self) -> None:
        # Runs on one process per node, before ``setup``: the only place that may download.
        self._dataset(train=True, download=self.download)
        self._dataset(train=False, download=self.download)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set = self._dataset(train=True, transform=self.build_transform(train=True))
            self.val_set = self._dataset(train=False, transform=self.build_transform(train=False))

    def _loader(self, dataset: Optional[Dataset], shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (100 classes) through ``torchvision.datasets.CIFAR100``; otherwise as :class:`CIFAR10DataModule`."""

    num_classes = 100
    dataset_name = "CIFAR100"
    folder_name = "cifar-100-python"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
