"""Which candidate layers a DROP epoch (or step) drops: paper, equation 2.

Every draw comes from a private generator keyed on ``(seed, epoch[, step])``. It never touches
torch's, Python's or NumPy's global RNG, so dropout and augmentation see the same random stream
with and without LDB; and the same key gives the same draw on every rank and after a resume.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch

#: Environment variable in which ``lightning.seed_everything`` records the global seed.
GLOBAL_SEED_ENV = "PL_GLOBAL_SEED"

#: What a draw is a function of, besides the seed: ``(epoch, step)``, ``step`` ``None`` with ``resample="epoch"``.
DrawKey = tuple[int, Optional[int]]


def draw_key(seed: int, epoch: int, step: Optional[int] = None) -> int:
    """A 63-bit generator seed that depends on every part of ``(seed, epoch, step)``.

    Hashing (rather than, say, ``seed + epoch``) keeps the draws of nearby seeds and epochs unrelated.
    """
    digest = hashlib.blake2b(f"lightning-ldb:{seed}:{epoch}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_dropped(num_candidates: int, drop_rate: float, seed: int, epoch: int, step: Optional[int] = None) -> tuple[bool, ...]:
    """Drop each of ``num_candidates`` layers independently with probability ``drop_rate``.

    Returns one flag per candidate, ``True`` for dropped. ``drop_rate=0`` drops nothing.

    Example::

        >>> draw_dropped(5, 0.5, seed=0, epoch=2) == draw_dropped(5, 0.5, seed=0, epoch=2)
        True
        >>> draw_dropped(3, 0.0, seed=0, epoch=2)
        (False, False, False)
    """
    if num_candidates == 0 or drop_rate <= 0.0:
        return (False,) * num_candidates
    generator = torch.Generator(device="cpu").manual_seed(draw_key(seed, epoch, step))
    uniform = torch.rand(num_candidates, generator=generator, dtype=torch.float64)
    return tuple((uniform < drop_rate).tolist())


def global_seed() -> Optional[int]:
    """The seed last passed to ``lightning.seed_everything`` in this process, if any."""
    value = os.environ.get(GLOBAL_SEED_ENV)
    return int(value) if value is not None else None


def fresh_seed() -> int:
    """A seed from the operating system's entropy (not from any global RNG)."""
    return int.from_bytes(os.urandom(4), "little")
