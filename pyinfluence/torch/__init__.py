"""The deep path: influence for torch models through ``torch.func``.

- :mod:`pyinfluence.torch.influence`: :class:`TorchInfluence`.
- :mod:`pyinfluence.torch.functional`: the model as a pure function of its selected parameters
  (per-example losses and gradients, Hessian-vector products).
- :mod:`pyinfluence.torch.data`: tensors, Datasets and DataLoaders → validated tensor pairs.
- :mod:`pyinfluence.torch.hessian`: the Hessian operator the solvers consume.
- :mod:`pyinfluence.torch.solvers`: ``Exact``, ``CG``, ``BlockCG``, ``LiSSA``, ``KFAC``, ``EKFAC`` for (H + λI)⁻¹ V.
- :mod:`pyinfluence.torch.losses`: per-example losses (the paper's smooth hinge).
- :mod:`pyinfluence.torch.training`: small digits models and the full-batch L-BFGS / BFGS trainer that
  fits them to a tight optimum (the demo's and the benchmarks'), with leave-one-out retraining.

Needs torch: ``pip install 'pyinfluence[torch]'``.
"""

from pyinfluence._optional import require_torch as _require_torch

# Before any submodule: without torch, `import pyinfluence.torch` (and pyinfluence.TorchInfluence, BlockCG, ...)
# is an ImportError that names the extra to install, not a bare "No module named 'torch'".
_require_torch("pyinfluence's torch path (pyinfluence.torch: TorchInfluence, Exact, CG, BlockCG, LiSSA)")

from pyinfluence.torch.influence import TorchInfluence  # noqa: E402
from pyinfluence.torch.losses import smooth_hinge_loss  # noqa: E402
from pyinfluence.torch.solvers import (  # noqa: E402
    CG,
    EKFAC,
    KFAC,
    BlockCG,
    Exact,
    LiSSA,
    Solver,
    SolveResult,
    resolve_solver,
)

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "BlockCG",
    "Exact",
    "LiSSA",
    "SolveResult",
    "Solver",
    "TorchInfluence",
    "resolve_solver",
    "smooth_hinge_loss",
]
