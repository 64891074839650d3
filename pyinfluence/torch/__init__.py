"""The deep path: influence for torch models through ``torch.func``.

- :mod:`pyinfluence.torch.influence`: :class:`TorchInfluence`.
- :mod:`pyinfluence.torch.functional`: the model as a pure function of its selected parameters
  (per-example losses and gradients, Hessian-vector products).
- :mod:`pyinfluence.torch.data`: tensors, Datasets and DataLoaders → validated tensor pairs.
- :mod:`pyinfluence.torch.hessian`: the Hessian operator the solvers consume.
- :mod:`pyinfluence.torch.solvers`: ``Exact``, ``CG``, ``BlockCG``, ``LiSSA`` for (H + λI)⁻¹ V.
- :mod:`pyinfluence.torch.losses`: per-example losses (the paper's smooth hinge).

Needs torch: ``pip install 'pyinfluence[torch]'``.
"""

try:
    import torch as _torch  # noqa: F401  (absolute import: the real torch, not this package)
except ImportError as exc:  # pragma: no cover - exercised by the no-torch CI stage
    raise ImportError(
        "pyinfluence's torch path needs PyTorch, which is not installed: "
        "pip install 'pyinfluence[torch]' (or install torch first, e.g. pip install torch)"
    ) from exc

from pyinfluence.torch.influence import TorchInfluence
from pyinfluence.torch.losses import smooth_hinge_loss
from pyinfluence.torch.solvers import CG, BlockCG, Exact, LiSSA, Solver, SolveResult, resolve_solver

__all__ = [
    "CG",
    "BlockCG",
    "Exact",
    "LiSSA",
    "SolveResult",
    "Solver",
    "TorchInfluence",
    "resolve_solver",
    "smooth_hinge_loss",
]
