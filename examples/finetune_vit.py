"""Fine-tune a pretrained ViT-B/16 on CIFAR-10 with LayerDropBack, in plain Python (the paper's Table 1).

    python examples/finetune_vit.py                          # ViT-B/16 on CIFAR-10 with LDB, all GPUs
    python examples/finetune_vit.py --baseline               # the same without LDB
    python examples/finetune_vit.py --dataset cifar100 --model vit_l_16
    python examples/finetune_vit.py --no-pretrained --fast-dev-run --accelerator cpu   # a smoke test

The same experiment through the CLI and YAML configs:

    ldb fit -c configs/base/finetune.yaml -c configs/finetune/vit_b16_cifar10.yaml -c configs/method/ldb.yaml

The paper fine-tunes with SGD (momentum 0.9), learning rate 0.01 and a global batch of 512; LDB drops
30% of the candidate layers on every second epoch and doubles the learning rate and the batch size
there. Pretrained weights are read from the torch.hub cache (downloaded into it when there is
internet); when they cannot be had, the script says where to put the file and stops.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lightning.pytorch import Trainer, seed_everything

from lightning_ldb import LayerDropBackCallback
from lightning_ldb.examples import (
    FINETUNE_MODEL_NAMES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    EpochSummary,
    FineTuneClassifier,
)

DATASETS = {"cifar10": CIFAR10DataModule, "cifar100": CIFAR100DataModule}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=FINETUNE_MODEL_NAMES, default="vit_b_16")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    parser.add_argument("--data-dir", default="data", help="where CIFAR is (or is downloaded to)")
    parser.add_argument("--no-download", action="store_true", help="never download CIFAR")
    parser.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    parser.add_argument("--baseline", action="store_true", help="train without LayerDropBack")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per device (8 GPUs x 64 = the paper's 512)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed")
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast-dev-run", action="store_true", help="one batch of training and validation")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    data = DATASETS[args.dataset](
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        download=not args.no_download,
        image_size=224,  # the backbones' input size: CIFAR's 32x32 images are resized
        normalization="imagenet",  # the statistics the pretrained weights were trained with
    )
    try:
        model = FineTuneClassifier(
            model=args.model, num_classes=data.num_classes, pretrained=not args.no_pretrained, lr=args.lr
        )
    except RuntimeError as error:  # pretrained weights neither cached nor downloadable
        print(f"error: {error}", file=sys.stderr)
        return 1

    callbacks = [EpochSummary()]
    if not args.baseline:
        # The paper's settings: p = 0.3, a DROP epoch every second epoch, lr and batch x2 there,
        # the first 4 and the last layer always trained.
        callbacks.append(LayerDropBackCallback(drop_rate=0.3, every=2, lr_scale=2.0, batch_scale=2))
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        max_epochs=args.epochs,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        fast_dev_run=args.fast_dev_run,
    )
    trainer.fit(model, datamodule=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
