import os

import pytest
import torch

# Two CPU cores on CI: keep torch from oversubscribing when several workers run.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_and_restore_torch_state():
    """Seed every test, and give the next test torch's global state as this one found it."""
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def one_thread():
    """Tiny ops run several times faster with 1 thread than with 2 on a loaded 2-core machine.

    Use in a test file with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
