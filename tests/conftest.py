import sys
from pathlib import Path

import pytest
import torch

# ``helpers`` holds the tiny models and data the tests share.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the bench presets run: on a busy 2-core machine two intra-op threads oversubscribe the
    cores and tiny CPU steps got 15-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
