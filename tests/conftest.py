"""Fixtures and markers shared by the test modules.

Markers (also listed in pyproject.toml, and enforced by ``--strict-markers``):

- ``slow``: takes more than a few seconds (end-to-end runs: the demo, the benchmark, retraining experiments,
  the C++ build); ``pytest -m "not slow"`` for a quick pass.
- ``cpp``: builds the C++ core with CMake and runs its C++ tests (tests/test_cpp.py); ``PYINFLUENCE_SKIP_CPP=1``
  skips them.
- ``cuda``: the CUDA paths; the GPU comparisons among them skip without a GPU.

Helpers that are plain functions shared by several modules (not fixtures) are in helpers.py; tests/ is on
sys.path through ``pythonpath`` in pyproject.toml, so ``import reference`` and ``from helpers import ...`` work
without any sys.path edit.
"""

from __future__ import annotations

import pytest

MARKERS = {
    "slow": "takes more than a few seconds (end-to-end runs of the demo, the benchmark, retraining)",
    "cpp": "builds the C++ core with CMake and runs its C++ tests (tests/test_cpp.py; PYINFLUENCE_SKIP_CPP=1 skips)",
    "cuda": "the CUDA paths (GPU comparisons skip without a GPU; some run on the host with stand-in kernels)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one torch thread is faster than two busy ones (the machine is shared). Use with
    ``pytestmark = [..., pytest.mark.usefixtures("one_torch_thread")]``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
