"""pyinfluence: influence functions (Koh & Liang, ICML 2017) — which training points made the model say this.

Signs and scaling follow the paper exactly (H is the Hessian of the *mean* training loss plus (l2/2)||θ||²):

- ``up_params(z)        = -H⁻¹ ∇θ L(z)``                       shape (k, p)
- ``up_loss(z, z_test)   = -∇θ L(z_test)ᵀ H⁻¹ ∇θ L(z)``          shape (k, m); negative = helpful
- ``pert_loss(z, z_test) = -∇θ L(z_test)ᵀ H⁻¹ ∇x ∇θ L(z)``       shape (k, m, d)
- ``loo_change ≈ -(1/n) up_loss``: predicted change of the test loss when z is removed.
"""

import numpy as _np  # noqa: F401  (numpy's own BLAS initialises first, under the user's environment)

from pyinfluence import _blas

with _blas.polite_thread_pools():
    _blas.preload_scipy_openblas()
    from pyinfluence import _core
from pyinfluence.errors import (
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    NotAtOptimumWarning,
    NotFittedError,
    NotPositiveDefiniteError,
)
from pyinfluence.linear import (
    LinearInfluence,
    LogisticRegression,
    RidgeRegression,
    SmoothHingeSVM,
    TopK,
    from_sklearn,
)

__version__ = _core.__version__

# The torch path is imported on first use, so that `import pyinfluence` for the linear path does not pay for
# importing torch: name -> module that defines it.
_LAZY = {
    "BlockCG": "pyinfluence.torch.solvers",
    "CG": "pyinfluence.torch.solvers",
    "Exact": "pyinfluence.torch.solvers",
    "LiSSA": "pyinfluence.torch.solvers",
    "SolveResult": "pyinfluence.torch.solvers",
    "TorchInfluence": "pyinfluence.torch.influence",
    "smooth_hinge_loss": "pyinfluence.torch.losses",
    "Solver": "pyinfluence.torch.solvers",
    "resolve_solver": "pyinfluence.torch.solvers",
}


def __getattr__(name: str):  # PEP 562: lazy attributes of the package
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyinfluence' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def set_num_threads(n: int) -> None:
    """Threads used by pyinfluence's C++ core: its OpenMP regions and its own OpenBLAS pool.

    numpy's and torch's thread pools are not touched. On a machine whose cores are busy with other work, one
    thread is often faster than several (spinning workers wait on each other); see bench/RESULTS.md.
    """
    import os

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    most = max(1024, 4 * (os.cpu_count() or 1))  # OpenMP would try to start every one of them
    if n > most:
        raise ValueError(f"n must be at most {most} (this machine has {os.cpu_count()} cores), got {n}")
    _core.set_max_threads(n)


def get_num_threads() -> int:
    """Threads of pyinfluence's own BLAS pool (or of its OpenMP regions when the BLAS is not its own)."""
    blas = _core.blas_threads()
    return blas if blas > 0 else _core.max_threads()


__all__ = [
    "BlockCG",
    "CG",
    "ConvergenceError",
    "ConvergenceWarning",
    "Exact",
    "LiSSA",
    "LinearInfluence",
    "LogisticRegression",
    "NonFiniteError",
    "NotAtOptimumWarning",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "RidgeRegression",
    "SmoothHingeSVM",
    "SolveResult",
    "Solver",
    "TopK",
    "TorchInfluence",
    "from_sklearn",
    "get_num_threads",
    "resolve_solver",
    "set_num_threads",
    "smooth_hinge_loss",
]
