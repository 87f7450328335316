"""Unit tests run their tiny models on one intra-op thread: they gain nothing from more, and on a 2-core
machine two threads per test process oversubscribe the cores."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
