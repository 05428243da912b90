"""What the docs say about the code is what the code does."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from lightning_ldb.callback import EpochTimer

ROOT = Path(__file__).resolve().parent.parent


def test_epoch_time_is_documented_as_the_unsynchronised_clock_it_is():
    assert "synchronize" not in inspect.getsource(EpochTimer)  # no device synchronisation: approximate on a GPU
    [row] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `ldb/epoch_time`")]
    assert "not CUDA-synchronised" in row
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for sentence in re.split(r"(?<=[.;])\s", path.read_text()):
            if "ldb/epoch_time" in sentence and re.search(r"(?<!not )CUDA[- ]synchronised", sentence):
                raise AssertionError(f"{path.name}: {sentence!r}")


def test_the_benchmark_readme_does_not_announce_block_mode_as_future():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    [row] = [line for line in text.splitlines() if line.startswith("| `ldb-block`")]
    assert "once the callback has it" not in row and "block mode" in row
