"""A short Lanczos process on H + λI: extreme eigenvalue estimates for LiSSA's scale and for the damping that
CG, BlockCG and LiSSA suggest when H + λI is not positive definite."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pyinfluence.errors import ConvergenceError, NotPositiveDefiniteError
from pyinfluence.torch.solvers.base import (
    HessianOperatorLike,
    _fmt,
    _generator,
    _matvec,
    _normalise_device,
    _npd_error,
)


@dataclass(frozen=True)
class _Spectrum:
    """What the Lanczos process learnt about A = H + λI (see :func:`_lanczos`)."""

    lam_max: float  # largest Ritz value: a lower bound of λ_max(A)
    lam_min: float  # smallest Ritz value: an upper bound of λ_min(A)
    top: Tensor  # (p, 1) unit Ritz vector of lam_max, on the operator's device
    bottom: Tensor  # (p, 1) unit Ritz vector of lam_min, on the operator's device
    steps: int  # full-Hessian HVPs used


def _lanczos(
    op: HessianOperatorLike,
    damping: float,
    steps: int,
    gen: torch.Generator,
    who: str = "LiSSA",
    raise_npd: bool = True,
) -> _Spectrum:
    """Extreme Ritz values of A = H + λI from ``steps`` Lanczos steps (one full HVP of one
    column each) from a random unit vector drawn with ``gen``.

    Lanczos (1950): with Q_k = [q₁ … q_k] an orthonormal basis of the Krylov space
    K_k = span{q₁, A q₁, …, A^{k−1} q₁}, T_k = Q_kᵀ A Q_k is tridiagonal (α on the diagonal, β
    beside it: A q_j = β_{j−1} q_{j−1} + α_j q_j + β_j q_{j+1}), and its eigenvalues (Ritz values)
    θ_min … θ_max are the extreme values of the Rayleigh quotient uᵀAu/uᵀu over K_k, so
    λ_min(A) ≤ θ_min and θ_max ≤ λ_max(A); they approach the extreme eigenvalues much faster than
    the power iteration, whose iterate after as many HVPs lies in the same Krylov space. Every new
    vector is reorthogonalised against all previous ones, twice ("twice is enough", Giraud et al.
    2005), so that rounding does not produce spurious Ritz values. Stops early when the Krylov
    space becomes invariant (β ≈ 0: then the Ritz values are eigenvalues of A) or reaches
    dimension p.

    Raises NotPositiveDefiniteError (the message CG uses, with a suggested damping from θ_min)
    when θ_min ≤ 0: its Ritz vector u has uᵀAu ≤ 0, so A is not positive definite (unless
    ``raise_npd`` is False: the caller words the error); and ConvergenceError when an HVP is NaN or
    infinite. ``who`` names the solver in messages.
    """
    p, dtype = op.n_params, op.dtype
    dev = _normalise_device(op.device)
    k_max = min(steps, p)
    Q = torch.empty(p, k_max, dtype=dtype, device=dev)
    q = torch.randn(p, dtype=dtype, device=dev, generator=gen)
    q /= torch.linalg.vector_norm(q)
    alpha: list[float] = []
    beta: list[float] = []
    eps = torch.finfo(dtype).eps
    for j in range(k_max):
        Q[:, j] = q
        w = _matvec(op, q[:, None], damping)[:, 0]
        a = float(q @ w)  # α_j = q_jᵀ A q_j (one host synchronisation per step)
        if not math.isfinite(a) or not bool(torch.isfinite(w).all()):
            raise ConvergenceError(
                f"{who}: the Hessian-vector product returned NaN or infinity while estimating "
                f"the spectrum of H + λI; check the model and loss at these weights"
            )
        alpha.append(a)
        basis = Q[:, : j + 1]
        for _ in range(2):  # w ← (I − Q Qᵀ) w: removes α_j q_j, β_{j−1} q_{j−1} and rounding
            w -= basis @ (basis.T @ w)
        b = float(torch.linalg.vector_norm(w))
        size = max(abs(x) for x in alpha + beta + [b])  # ≈ ‖T‖, the scale of A seen so far
        if j + 1 == k_max or b <= 100.0 * eps * size:
            break
        beta.append(b)
        q = w / b
    k = len(alpha)
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(beta[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, Y = torch.linalg.eigh(T)
    lam_min, lam_max = float(theta[0]), float(theta[-1])
    if raise_npd and lam_max == 0.0 and lam_min == 0.0:
        raise NotPositiveDefiniteError(
            f"{who}: H + λI maps a random vector to zero (the Hessian is zero and "
            f"damping={damping:g}); pass damping > 0"
        )
    if raise_npd and lam_min <= 0.0:
        raise _npd_error(
            who,
            f"a Lanczos process of {k} steps on H + λI found a direction u with curvature "
            f"uᵀ(H + λI)u / uᵀu (its smallest Ritz value)",
            lam_min,
            damping,
            lam_max,
        )
    top = Q[:, :k] @ Y[:, -1:].to(dtype=dtype, device=dev)
    top /= torch.linalg.vector_norm(top)
    bottom = Q[:, :k] @ Y[:, :1].to(dtype=dtype, device=dev)
    bottom /= torch.linalg.vector_norm(bottom)
    return _Spectrum(lam_max=lam_max, lam_min=lam_min, top=top, bottom=bottom, steps=k)


# CG / block CG: Lanczos steps that sharpen the smallest-eigenvalue estimate once negative curvature is seen.
_NPD_LANCZOS_STEPS = 40


def _sharpen_negative_curvature(
    op: HessianOperatorLike, damping: float, observed: float, who: str
) -> tuple[float, str]:
    """The smaller of ``observed`` (a curvature ≤ 0 that CG met along one search direction) and the
    smallest Ritz value of a short Lanczos process on H + λI, with a note of where it came from.

    A CG direction with negative curvature proves H + λI indefinite but may see only a sliver of
    the negative eigenvalue (on a trained ReLU MLP: −4e-5 against λ_min = −7.9e-4), so a damping
    suggested from it alone is too small. The Lanczos estimate (an upper bound of λ_min, like the
    observed curvature) costs ``_NPD_LANCZOS_STEPS`` one-column HVPs, only on this failure path.
    """
    gen = _generator(_normalise_device(op.device), 0)
    try:
        spec = _lanczos(op, damping, _NPD_LANCZOS_STEPS, gen, who=who, raise_npd=False)
    except ConvergenceError:
        return observed, ""
    if spec.lam_min < observed:
        return spec.lam_min, f"; a Lanczos process of {spec.steps} steps then found {_fmt(spec.lam_min)}"
    return observed, ""
