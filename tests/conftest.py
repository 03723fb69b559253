import os

import pytest
import torch

# Two CPU cores on CI: keep torch from oversubscribing when several workers run.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
