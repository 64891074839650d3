"""Gradient stores: per-example training gradients computed once, projected, sharded on disk, and scored by
streaming GEMMs with a streaming top-k (the approach of TRAK, LoGra, GraSS and Bergson).

- :mod:`~pyinfluence.torch.stores.projections`: random projections P (k × p) with E[PᵀP] = I —
  :class:`Identity`, :class:`GaussianProjection`, :class:`RademacherProjection`, :class:`SparseJLProjection`,
  and LoGra's per-layer Kronecker-factored :class:`LoGraProjection` for ``nn.Linear`` layers.
- :mod:`~pyinfluence.torch.stores.store`: :class:`GradientStore` — ``build`` (resumable) and ``open``; rows
  φ_i = P ∇θL(z_i, θ̂) in ``.npy`` shards plus a JSON manifest; nothing pickled.
- :mod:`~pyinfluence.torch.stores.scoring`: :func:`scores` / :func:`top_k` for queries in the projected space
  (e.g. P s_test), and :class:`ProjectedInfluence`, I(z_i, z_test) = −φ_testᵀ H_P⁻¹ φ_i with
  H_P = (1/n) ΦᵀΦ + (l2 + λ) I_k. Negative = helpful, as ``up_loss``.

Example::

    from pyinfluence.torch.stores import GradientStore, SparseJLProjection

    store = GradientStore.build(inf, "grads/", loader, projection=SparseJLProjection(dim=4096))
    pinf = store.projected_influence()                       # l2, damping from inf
    phi_test = store.project_test(inf, X_test, y_test)       # (m, k), same projection
    best = pinf.top_k(phi_test, k=10)                        # TopK of (m, 10) tensors
"""

from pyinfluence.torch.stores.projections import (
    GaussianProjection,
    Identity,
    LoGraProjection,
    ParamLayout,
    Projection,
    RademacherProjection,
    SparseJLProjection,
    derive_seed,
    projection_from_config,
)
from pyinfluence.torch.stores.scoring import ProjectedInfluence, scores, top_k
from pyinfluence.torch.stores.store import FORMAT, FORMAT_VERSION, GradientStore

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GaussianProjection",
    "GradientStore",
    "Identity",
    "LoGraProjection",
    "ParamLayout",
    "ProjectedInfluence",
    "Projection",
    "RademacherProjection",
    "SparseJLProjection",
    "derive_seed",
    "projection_from_config",
    "scores",
    "top_k",
]
