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
    from pyinfluence import _core  # noqa: F401  (loaded here, under the polite thread pools)
from pyinfluence._version import __version__ as __version__
from pyinfluence.errors import (
    ConvergenceError,
    ConvergenceWarning,
    DataError,
    NonFiniteError,
    NotAtOptimumWarning,
    NotFittedError,
    NotPositiveDefiniteError,
    PyInfluenceError,
)
from pyinfluence.interface import Influence, TopK
from pyinfluence.linear import (
    LinearInfluence,
    LogisticRegression,
    RegressionDiagnostics,
    RidgeRegression,
    SmoothHingeSVM,
    from_sklearn,
    regression_diagnostics,
)
from pyinfluence.runtime import (
    get_num_threads,
    get_parallel_min_flops,
    has_cuda,
    has_openmp,
    set_num_threads,
    set_parallel_min_flops,
)

# The torch path is imported on first use: `import pyinfluence` for the linear path neither needs torch (an
# optional dependency: the `torch` extra) nor pays for importing it. Without torch, these names raise an
# ImportError that names the extra. Name -> module that defines it.
_LAZY = {
    "Arnoldi": "pyinfluence.torch.solvers",
    "BlockCG": "pyinfluence.torch.solvers",
    "CG": "pyinfluence.torch.solvers",
    "EKFAC": "pyinfluence.torch.solvers",
    "Exact": "pyinfluence.torch.solvers",
    "KFAC": "pyinfluence.torch.solvers",
    "LiSSA": "pyinfluence.torch.solvers",
    "SolveResult": "pyinfluence.torch.solvers",
    "TorchInfluence": "pyinfluence.torch.influence",
    "GradientStore": "pyinfluence.torch.stores",
    "ProjectedInfluence": "pyinfluence.torch.stores",
    "GaussianProjection": "pyinfluence.torch.stores",
    "RademacherProjection": "pyinfluence.torch.stores",
    "SparseJLProjection": "pyinfluence.torch.stores",
    "LoGraProjection": "pyinfluence.torch.stores",
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


def _torch_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


# `from pyinfluence import *` imports every name of __all__: the torch path's only where torch is installed.
__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "Influence",
    "LinearInfluence",
    "LogisticRegression",
    "NonFiniteError",
    "NotAtOptimumWarning",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "PyInfluenceError",
    "DataError",
    "RegressionDiagnostics",
    "RidgeRegression",
    "SmoothHingeSVM",
    "TopK",
    "from_sklearn",
    "regression_diagnostics",
    "get_num_threads",
    "get_parallel_min_flops",
    "has_cuda",
    "has_openmp",
    "set_num_threads",
    "set_parallel_min_flops",
]
if _torch_installed():
    __all__ += sorted(_LAZY)
