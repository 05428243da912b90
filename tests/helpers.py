"""Tiny models and data for real Trainer runs in the tests."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldb import LDBDataModuleMixin, estimated_stepping_batches


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# Every process that imports the tests' helpers (pytest, and each ``ddp_spawn`` worker, which imports its test module)
# destroys a process group it still holds when it exits. Left to the interpreter's last clean-up, gloo's destructor can
# abort a worker after its fit is done ("terminate called without an active exception"), failing a test that passed;
# Lightning uses the group until the worker ends, so the test cannot destroy it earlier.
atexit.register(_destroy_process_group)


def end_launched_script() -> NoReturn:
    """End a script that Lightning or Fabric launched on two ranks, once every record it writes is on disk.

    Its interpreter's clean-up is skipped: there gloo can still abort a rank that finished ("terminate called without an
    active exception", about one exit in 13 under torch 2.13, the process group destroyed first or not), and the test,
    which reads the exit status, would fail a run whose records are complete and correct. A script that raises never
    gets here, so its failure still fails the test.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_dataset(n: int = 64, features: int = 8, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    return TensorDataset(x, y)


class TinyMLP(LightningModule):
    """Eight Linear layers (plus a BatchNorm), so keep_first=4/keep_last=1 leave candidates."""

    def __init__(
        self,
        features: int = 8,
        width: int = 8,
        depth: int = 8,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-2,
        scheduler: Optional[str] = None,
        batch_size: int = 16,
        n: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(features, width), nn.BatchNorm1d(width), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "plain_sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler is None:
            return opt
        if hp.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3, eta_min=0.01)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.scheduler == "lambda_step":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        raise ValueError(hp.scheduler)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(make_dataset(self.hparams.n), batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(32, seed=1), batch_size=16)


class OneCycleMLP(TinyMLP):
    """Builds ``OneCycleLR`` from LDB's exact step estimate, so the cycle must end on the last step."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.total_steps = estimated_stepping_batches(self.trainer)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}


class TinyDataModule(LDBDataModuleMixin, LightningDataModule):
    """A DataModule with the mixin: its train loader is built from ``self.batch_size``."""

    def __init__(self, batch_size: int = 8, n: int = 64, drop_last: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.n = n
        self.drop_last = drop_last

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(make_dataset(self.n), batch_size=self.batch_size, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(32, seed=1), batch_size=self.batch_size)


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch from Lightning's checkpoint (deterministic order only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self):  # type: ignore[override]
        skip, self._skip, self._served = self._skip, 0, 0
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self._served = index + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["served"]


def make_trainer(max_epochs: int = 4, callbacks: Optional[list] = None, **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return Trainer(max_epochs=max_epochs, callbacks=callbacks or [], **defaults)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def params_of_layers(module: nn.Module, layer_names: tuple[str, ...]) -> list[str]:
    """Parameter names owned directly by the named modules."""
    names = []
    for layer in layer_names:
        sub = module.get_submodule(layer)
        names += [f"{layer}.{n}" if layer else n for n, _ in sub.named_parameters(recurse=False)]
    return names


def printed_recipe_config(monkeypatch: Any, capsys: Any, config_path: str, recipes: tuple[str, ...]) -> dict[str, Any]:
    """The config ``ldb fit --config config_path --print_config`` prints, after checking each multi-node recipe
    in ``examples/multinode`` names ``config_path``."""
    import pytest

    pytest.importorskip("jsonargparse")
    pytest.importorskip("torchvision")
    yaml = pytest.importorskip("yaml")
    from lightning_ldb.cli import main

    root = Path(__file__).resolve().parent.parent
    for recipe in recipes:
        assert config_path in (root / "examples" / "multinode" / recipe).read_text(), recipe
    monkeypatch.setattr(sys, "argv", ["ldb"])  # LightningCLI warns about pytest's own arguments otherwise
    with pytest.raises(SystemExit) as exited:
        main(args=["fit", "--config", str(root / config_path), "--print_config"])
    assert exited.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def free_port() -> int:
    """A TCP port nobody listens on right now (each run gets its own, against EADDRINUSE)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def two_process_env(**extra: str) -> dict[str, str]:
    """The environment of a command that Lightning re-launches as rank 1, on a free port, plus ``extra``."""
    # An in-process DDP fit earlier in the session leaves LOCAL_RANK/NODE_RANK in os.environ; a child that inherits
    # them takes itself for an already launched rank, never starts rank 1, and waits for it forever.
    inherited = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    return {**inherited, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", **extra}


def run_two_process_script(script: Path, *args: str, timeout: float, env: Optional[dict[str, str]] = None) -> None:
    """Run ``script`` (which Lightning re-launches as rank 1) on a free port; fail on error or timeout."""
    import os
    import signal
    import subprocess

    import pytest

    env = two_process_env(**(env or {}))
    command = [sys.executable, str(script), *args]
    # Rank 1 is a child of rank 0: a session of their own lets a timeout kill both.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command} did not finish in {timeout} s:\n{output.decode(errors='replace')[-4000:]}")
    assert process.returncode == 0, output.decode(errors="replace")[-4000:]
