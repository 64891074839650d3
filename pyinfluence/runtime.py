"""Runtime settings of pyinfluence's C++ core, and what the installed build contains.

- :func:`set_num_threads` / :func:`get_num_threads`: threads of the core's OpenMP regions and of its own OpenBLAS
  pool (numpy's and torch's pools are not touched).
- :func:`set_parallel_min_flops` / :func:`get_parallel_min_flops`: the work (in flops) below which a core call
  runs on one thread, its BLAS included (default 2e9, about 50 ms of one core's work).
- :func:`has_openmp` / :func:`has_cuda`: whether the core was built with OpenMP, and with the CUDA kernels of
  ``LinearInfluence(..., device="cuda")`` (a GPU may still be absent).

These are process-wide settings of the core (not thread-local).
"""

from __future__ import annotations

import math
import numbers
import os

from pyinfluence import _core

__all__ = [
    "get_num_threads",
    "get_parallel_min_flops",
    "has_cuda",
    "has_openmp",
    "set_num_threads",
    "set_parallel_min_flops",
]


def _max_threads() -> int:
    """The largest thread count accepted: OpenMP would try to start every one of them."""
    return max(1024, 4 * (os.cpu_count() or 1))


def set_num_threads(n: int) -> None:
    """Threads used by pyinfluence's C++ core: its OpenMP regions and its own OpenBLAS pool.

    ``n``: a positive int (at most ``max(1024, 4 · cores)``); anything else raises ValueError. numpy's and torch's
    thread pools are not touched. On a machine whose cores are busy with other work, one thread is often faster
    than several (spinning workers wait on each other); see bench/RESULTS.md.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    most = _max_threads()
    if n > most:
        raise ValueError(f"n must be at most {most} (this machine has {os.cpu_count()} cores), got {n}")
    _core.set_max_threads(n)


def get_num_threads() -> int:
    """Threads of pyinfluence's own BLAS pool (or of its OpenMP regions when the BLAS is not its own)."""
    blas = _core.blas_threads()
    return blas if blas > 0 else _core.max_threads()


def set_parallel_min_flops(flops: float) -> None:
    """Work (in flops) below which a call of the core runs on one thread, its BLAS included.

    ``flops``: a real number ≥ 0 (``0``: split whenever the threads and the rows allow; ``math.inf``: never
    split); anything else (a bool, NaN, a negative number, a non-number) raises ValueError. The default, 2e9, is
    about 50 ms of one core's work, measured no faster split on 2 cores; lower it on machines with many idle
    cores.
    """
    if isinstance(flops, bool) or not isinstance(flops, numbers.Real):
        raise ValueError(f"flops must be a real number >= 0, got {flops!r}")
    value = float(flops)
    if math.isnan(value) or value < 0:
        raise ValueError(f"flops must be a real number >= 0, got {flops!r}")
    _core.set_parallel_min_flops(value)


def get_parallel_min_flops() -> float:
    """The threshold of :func:`set_parallel_min_flops`, in flops."""
    return float(_core.parallel_min_flops())


def has_openmp() -> bool:
    """Whether the core was built with OpenMP (without it, every call runs on one thread)."""
    return bool(_core.has_openmp)


def has_cuda() -> bool:
    """Whether the core was built with its CUDA kernels (``PYINFLUENCE_CUDA=1 pip install .`` with nvcc).

    True does not mean a GPU is present: ``LinearInfluence(..., device="cuda")`` says why it cannot run.
    """
    return bool(_core.has_cuda)
