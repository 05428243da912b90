"""The example models, DataModules and EpochSummary of ``lightning_ldb.examples`` (no download, no GPU)."""

from __future__ import annotations

import os
import pickle
import runpy
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from helpers import TinyDataModule, TinyMLP, make_trainer
from lightning.pytorch.callbacks import Callback

from lightning_ldb import LayerDropBackCallback
from lightning_ldb.layers import discover_layers, select_candidates

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")

from lightning_ldb.examples import (  # noqa: E402
    MODEL_NAMES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    EpochSummary,
    FineTuneClassifier,
    ImageClassifier,
    TorchThreads,
    build_finetune_model,
    build_model,
)
from lightning_ldb.examples.finetune import weights_cache_path  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def offline_weights(*args, **kwargs):
    raise URLError("no network")


# ---------------------------------------------------------------------- models
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_a_step_at_32x32(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    before = [p.detach().clone() for p in model.parameters()]

    logits = model(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    optimizer.step()

    assert logits.shape == (2, 10)
    assert all(p.grad is not None for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # The paper's keep_first=4 / keep_last=1 leave layers for LDB to drop.
    assert select_candidates(discover_layers(model), keep_first=4, keep_last=1)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2", "densenet121"])
def test_models_keep_a_4x4_map_at_32x32(name):
    # The CIFAR adaptations downsample 8x (not ImageNet's 32x): the last feature map is 4x4.
    model = build_model(name, num_classes=10).eval()
    sides = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda mod, inputs, output: sides.append(output.shape[-1]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert min(side for side in sides if side > 1) == 4  # 1x1 maps are squeeze-excitation's pooled inputs


def test_build_model_takes_grayscale_input():
    assert build_model("resnet18", num_classes=5, in_channels=1)(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="`name` must be one of .*'resnet50'.*got 'resnet51'"):
        build_model("resnet51", num_classes=10)
    with pytest.raises(ValueError, match="`model` must be one of .*'densenet121'.*got 'vgg16'"):
        ImageClassifier(model="vgg16")


def test_image_classifier_needs_a_finite_max_epochs_for_its_cosine_schedule():
    module = ImageClassifier(model="digits_cnn", in_channels=1)
    module.trainer = make_trainer(max_epochs=-1, max_steps=5)
    with pytest.raises(ValueError, match="trainer.max_epochs"):
        module.configure_optimizers()


def test_image_classifier_uses_the_papers_recipe():
    module = ImageClassifier(model="digits_cnn", in_channels=1)
    module.trainer = make_trainer(max_epochs=7)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["momentum"] == 0.9
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 7


# ---------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_finetune_models_build_without_pretrained_weights(name):
    model = build_finetune_model(name, num_classes=10, pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 10)


def test_missing_pretrained_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline_weights)
    weights = torchvision.models.Swin_T_Weights.IMAGENET1K_V1
    expected = os.path.join(str(tmp_path), "checkpoints", "swin_t-704ceda3.pth")
    assert weights_cache_path(weights) == expected

    with pytest.raises(RuntimeError, match="Could not load the pretrained weights") as raised:
        build_finetune_model("swin_t", num_classes=10)
    message = str(raised.value)
    assert expected in message and weights.url in message and "pretrained: false" in message


def test_pretrained_weights_are_loaded_and_the_head_replaced(monkeypatch):
    reference = torchvision.models.swin_t()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: reference.state_dict())

    model = build_finetune_model("swin_t", num_classes=7, weights="DEFAULT")

    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)
    assert model.head.out_features == 7


def test_finetune_classifier_defaults_and_validation():
    module = FineTuneClassifier(model="swin_t", num_classes=100, pretrained=False)
    assert module.hparams.lr == 0.01 and module.hparams.pretrained is False
    assert module.net.head.out_features == 100
    with pytest.raises(ValueError, match="`model` must be one of .*'vit_b_16'"):
        FineTuneClassifier(model="resnet18", pretrained=False)
    with pytest.raises(ValueError, match="`weights` must be one of"):
        build_finetune_model("swin_t", num_classes=10, weights="IMAGENET22K")


# ---------------------------------------------------------------------- digits
def test_digits_are_split_offline_and_stratified():
    data = DigitsDataModule(batch_size=16, val_fraction=0.2)
    data.setup("fit")
    images, labels = data.train_set.tensors
    val_images, val_labels = data.val_set.tensors
    assert images.shape[1:] == (1, 8, 8) and len(images) + len(val_images) == 1797
    assert len(val_images) == 360
    assert torch.bincount(val_labels).min() >= 35  # every digit is in the validation split
    assert abs(float(images.mean())) < 1e-4 and abs(float(images.std()) - 1) < 1e-3
    assert next(iter(data.train_dataloader()))[0].shape == (16, 1, 8, 8)


def test_digits_can_be_upsampled_for_the_cifar_models():
    data = DigitsDataModule(image_size=32)
    data.setup("fit")
    assert data.train_set.tensors[0].shape[1:] == (1, 32, 32)


def test_digits_reject_bad_arguments():
    with pytest.raises(ValueError, match="`val_fraction` must be in"):
        DigitsDataModule(val_fraction=1.0)
    with pytest.raises(TypeError, match="`batch_size` must be an int"):
        DigitsDataModule(batch_size=32.0)


# ---------------------------------------------------------------------- CIFAR, from fake files on disk
def write_fake_cifar(root: Path, dataset_class: type, images_per_file: int) -> None:
    """A tiny dataset in CIFAR's on-disk format: the pickled batches and meta file torchvision reads."""
    folder = root / dataset_class.base_folder
    folder.mkdir(parents=True)
    classes = 10 if dataset_class is torchvision.datasets.CIFAR10 else 100
    label_key = "labels" if classes == 10 else "fine_labels"
    rng = np.random.default_rng(0)
    for filename, _md5 in dataset_class.train_list + dataset_class.test_list:
        batch = {
            "data": rng.integers(0, 256, size=(images_per_file, 3 * 32 * 32), dtype=np.uint8),
            label_key: [int(label) for label in rng.integers(0, classes, size=images_per_file)],
        }
        (folder / filename).write_bytes(pickle.dumps(batch))
    meta = {dataset_class.meta["key"]: [f"class_{i}" for i in range(classes)]}
    (folder / dataset_class.meta["filename"]).write_bytes(pickle.dumps(meta))


@pytest.fixture
def files_without_checksums(monkeypatch):
    # torchvision checks each file's md5 against the real CIFAR's; fake files cannot match. The check
    # becomes "the file exists", so a missing or misnamed file still fails as it would for real.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize(
    "datamodule_class, dataset_class, classes",
    [
        (CIFAR10DataModule, torchvision.datasets.CIFAR10, 10),
        (CIFAR100DataModule, torchvision.datasets.CIFAR100, 100),
    ],
)
def test_cifar_datamodule_reads_cifar_files_from_disk(
    tmp_path, files_without_checksums, datamodule_class, dataset_class, classes
):
    write_fake_cifar(tmp_path, dataset_class, images_per_file=8)
    data = datamodule_class(data_dir=str(tmp_path), batch_size=4, num_workers=0, download=False)
    data.prepare_data()
    data.setup("fit")

    images, labels = next(iter(data.train_dataloader()))
    assert data.num_classes == classes
    assert len(data.train_set) == (5 if classes == 10 else 1) * 8 and len(data.val_set) == 8
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long and int(labels.max()) < classes
    assert next(iter(data.val_dataloader()))[0].shape == (4, 3, 32, 32)


def test_cifar_datamodule_resizes_for_finetuning(tmp_path, files_without_checksums):
    write_fake_cifar(tmp_path, torchvision.datasets.CIFAR10, images_per_file=2)
    data = CIFAR10DataModule(data_dir=str(tmp_path), download=False, image_size=224, normalization="imagenet")
    data.setup("fit")
    image, _ = data.train_set[0]
    assert image.shape == (3, 224, 224)


def test_cifar_datamodule_doubles_the_batch_on_drop_epochs(tmp_path, files_without_checksums):
    write_fake_cifar(tmp_path, torchvision.datasets.CIFAR10, images_per_file=8)
    data = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, num_workers=0, download=False)
    model = ImageClassifier(model="digits_cnn", in_channels=3)
    seen: dict[int, int] = {}

    def record_batch_size(batch, batch_idx):
        seen.setdefault(model.current_epoch, len(batch[0]))

    model.on_train_batch_start = record_batch_size
    ldb = LayerDropBackCallback(every=1, seed=0)
    make_trainer(max_epochs=2, callbacks=[ldb], limit_train_batches=2).fit(model, data)

    assert seen == {0: 4, 1: 8}


def test_cifar_datamodule_explains_missing_data(tmp_path):
    data = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(RuntimeError, match="not found in data_dir=.*download=True.*cifar-10-batches-py"):
        data.prepare_data()
    with pytest.raises(ValueError, match="`normalization` must be one of"):
        CIFAR10DataModule(normalization="imagenet21k")


# ---------------------------------------------------------------------- EpochSummary
def test_epoch_summary_records_drop_epochs(capsys):
    summary = EpochSummary(monitor="val_loss", mode="min")
    ldb = LayerDropBackCallback(every=2, keep_first=1, drop_rate=0.5, seed=0)
    trainer = make_trainer(max_epochs=3, callbacks=[ldb, summary], limit_val_batches=1.0)
    trainer.fit(TinyMLP(), datamodule=TinyDataModule(batch_size=8))

    modes = [record.mode for record in summary.records]
    assert modes == ["full", "full", "DROP"]
    assert [record.batch_size for record in summary.records] == [8, 8, 16]
    assert [record.steps for record in summary.records] == [8, 8, 4]
    assert summary.records[2].dropped > 0 and summary.records[0].dropped == 0
    assert all(record.seconds > 0 and record.monitored is not None for record in summary.records)
    assert float(trainer.callback_metrics["epoch_time"]) == pytest.approx(summary.records[-1].seconds)
    printed = capsys.readouterr().out
    assert "LayerDropBack epoch summary" in printed and "DROP epochs: 2 (1 of 3)" in printed
    assert "val_loss: best" in printed


def test_epoch_summary_works_for_a_baseline_run(capsys):
    summary = EpochSummary(monitor="val_loss", mode="min", live=True)
    make_trainer(max_epochs=2, callbacks=[summary], limit_val_batches=1.0).fit(
        TinyMLP(), datamodule=TinyDataModule()
    )
    assert [record.mode for record in summary.records] == ["full", "full"]
    assert summary.records[0].dropped is None
    assert "No LayerDropBackCallback" in capsys.readouterr().out


def test_torch_threads_applies_during_fit_and_restores_after():
    seen = []

    class RecordThreads(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(torch.get_num_threads())

    torch.set_num_threads(2)
    make_trainer(max_epochs=1, callbacks=[TorchThreads(num_threads=1), RecordThreads()]).fit(TinyMLP())
    assert seen == [1] and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="`num_threads` must be an int >= 1, got 0"):
        TorchThreads(num_threads=0)


def test_epoch_summary_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="`mode` must be 'max' or 'min', got 'maximum'"):
        EpochSummary(mode="maximum")


# ---------------------------------------------------------------------- scripts in examples/
def write_metrics(path: Path, epoch_times: list[float], accuracies: list[float]) -> Path:
    # As CSVLogger writes them: a validation row, then the training epoch-end row, per epoch.
    lines = ["epoch,epoch_time,train_loss,val_acc"]
    for epoch, (seconds, accuracy) in enumerate(zip(epoch_times, accuracies)):
        lines += [f"{epoch},,,{accuracy}", f"{epoch},{seconds},{1.0 / (epoch + 1)},"]
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_compare_runs_reports_the_papers_columns(tmp_path, capsys):
    write_metrics(tmp_path / "exp" / "baseline" / "metrics.csv", [10.0, 10.0, 10.0, 10.0], [0.5, 0.7, 0.8, 0.90])
    write_metrics(tmp_path / "exp" / "ldb" / "metrics.csv", [10.0, 10.0, 6.0, 10.0], [0.5, 0.7, 0.8, 0.91])
    script = runpy.run_path(str(EXAMPLES / "compare_runs.py"))

    assert script["main"]([str(tmp_path / "exp"), "--plot", str(tmp_path / "curves.png")]) == 0

    out = capsys.readouterr().out
    assert "Speed-up: 10.0%" in out and "val_acc difference: +1.00 points" in out
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_compare_runs_explains_a_missing_epoch_time(tmp_path):
    from lightning_ldb.examples import read_run

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,val_acc\n0,0.5\n")
    with pytest.raises(ValueError, match="no `epoch_time` column.*EpochSummary"):
        read_run(path)


def test_finetune_script_runs_offline_without_weights(tmp_path, files_without_checksums, monkeypatch):
    write_fake_cifar(tmp_path, torchvision.datasets.CIFAR10, images_per_file=2)
    monkeypatch.chdir(tmp_path)
    script = runpy.run_path(str(EXAMPLES / "finetune_vit.py"))
    args = ["--data-dir", str(tmp_path), "--no-download", "--model", "swin_t", "--batch-size", "2"]
    args += ["--num-workers", "0", "--accelerator", "cpu", "--devices", "1", "--fast-dev-run"]

    assert script["main"]([*args, "--no-pretrained"]) == 0


def test_finetune_script_says_how_to_get_the_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline_weights)
    script = runpy.run_path(str(EXAMPLES / "finetune_vit.py"))

    assert script["main"](["--no-download", "--data-dir", str(tmp_path)]) == 1
    assert "pretrained: false" in capsys.readouterr().err
