"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one torch thread is faster than two busy ones (the machine is shared). Use with
    ``pytestmark = [..., pytest.mark.usefixtures("one_torch_thread")]``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
