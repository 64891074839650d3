"""The deep path: influence for torch models through ``torch.func``.

- :mod:`pyinfluence.torch.influence`: :class:`TorchInfluence`.
- :mod:`pyinfluence.torch.functional`: the model as a pure function of its selected parameters
  (per-example losses and gradients, Hessian-vector products).
- :mod:`pyinfluence.torch.data`: in-memory tensors (pairs, TensorDatasets) → validated tensor pairs.
- :mod:`pyinfluence.torch.batches`: streamed training data (DataLoaders, Datasets, iterables of batches) and
  dict (Hugging Face style) inputs.
- :mod:`pyinfluence.torch.hessian`: the Hessian operator the solvers consume.
- :mod:`pyinfluence.torch.solvers`: ``Exact``, ``CG``, ``BlockCG``, ``LiSSA``, ``KFAC``, ``EKFAC``, ``Arnoldi`` for
  (H + λI)⁻¹ V.
- :mod:`pyinfluence.torch.stores`: gradient stores — per-example gradients computed once, optionally projected
  (Gaussian, Rademacher, sparse JL, LoGra), in shards on disk, scored by streaming GEMM and top-k.
- :mod:`pyinfluence.torch.losses`: per-example losses (the paper's smooth hinge).
- :mod:`pyinfluence.torch.training`: small digits models and the full-batch L-BFGS / BFGS trainer that
  fits them to a tight optimum (the demo's and the benchmarks'), with leave-one-out retraining.

Needs torch: ``pip install 'pyinfluence[torch]'``.
"""

from pyinfluence._optional import require_torch as _require_torch

# Before any submodule: without torch, `import pyinfluence.torch` (and pyinfluence.TorchInfluence, BlockCG, ...)
# is an ImportError that names the extra to install, not a bare "No module named 'torch'".
_require_torch("pyinfluence's torch path (pyinfluence.torch: TorchInfluence, Exact, CG, BlockCG, LiSSA)")

from pyinfluence.torch.distributed import DistributedContext  # noqa: E402
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
from pyinfluence.torch.stores import (  # noqa: E402
    GaussianProjection,
    GradientStore,
    LoGraProjection,
    ProjectedInfluence,
    RademacherProjection,
    SparseJLProjection,
)

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "BlockCG",
    "DistributedContext",
    "Exact",
    "GaussianProjection",
    "GradientStore",
    "LiSSA",
    "LoGraProjection",
    "ProjectedInfluence",
    "RademacherProjection",
    "SparseJLProjection",
    "SolveResult",
    "Solver",
    "TorchInfluence",
    "resolve_solver",
    "smooth_hinge_loss",
]
