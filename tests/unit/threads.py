"""Shared autouse fixture: tiny models gain nothing from intra-op threads, and on a 2-core machine two
threads per test process oversubscribe the cores (measured: the CNN test 3x slower). Import it into a test
module to apply it there."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
