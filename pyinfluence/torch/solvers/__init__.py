"""Solvers for (H + λI) X = V: the inverse-Hessian-vector products of influence functions.

Influence functions (Koh & Liang 2017, §2–3) need ``s = (H + λI)⁻¹ v`` for many right-hand sides
``v`` (test-loss gradients for ``up_loss``, training gradients for ``up_params``). ``H = ∇²R(θ̂)``
is the Hessian of the training objective ``R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖²`` (the L2 term
included) and ``λ ≥ 0`` is the damping (Koh & Liang §4: a damping term makes the local quadratic
model of a non-convex loss convex). The solvers here never form ``H⁻¹``: they factorise or iterate.

Three interchangeable solvers share one contract::

    solver = CG(tol=1e-8)                       # or Exact(), LiSSA(...), or resolve_solver("cg")
    prepared = solver.prepare(op, damping=0.01) # one-off work (Exact: factorise; LiSSA: choose scale)
    result = prepared.solve(V)                  # V (p, r): r right-hand sides at once
    result.solution                             # (p, r) = (H + λI)⁻¹ V, same dtype/device as V
    result.residual                             # (r,) ‖(H + λI) x − v‖ / ‖v‖ per column

- :class:`Exact`: materialise H (``op.dense()``), symmetrise, Cholesky-factorise ``H + λI`` once
  (in float64 by default), then solve any number of right-hand sides by two triangular solves.
  Cost: p² memory, p³/3 flops once, 2p²·r per solve. For p up to ~20 000.
- :class:`CG`: block conjugate gradients (Hestenes & Stiefel 1952; on Hessians via
  Hessian-vector products as in Martens 2010, "Deep learning via Hessian-free optimization"):
  every iteration is one batched HVP for all still-unconverged columns. Cost: ≤ ``max_iter``
  HVPs of up to r columns, plus one to report the true residual. Needs H + λI positive definite
  and detects when it is not.
- :class:`LiSSA`: the stochastic Neumann-series estimator of Agarwal, Bullins & Hazan 2016
  ("Second-order stochastic optimization for machine learning in linear time"), as used by
  Koh & Liang §3: minibatch HVPs only, for training sets too large for a full HVP per iteration.
  Cost: ``repeats · depth`` minibatch HVPs of r columns, plus one full HVP for the residual, plus
  (in ``prepare``) ``power_iters`` full HVPs of one column for a Lanczos estimate of the spectrum
  (the scale, and a search for negative curvature).
- ``CG``, ``BlockCG`` and ``LiSSA`` accept ``preconditioner="ekfac"`` / ``"kfac"`` / a KFAC object (see
  :mod:`pyinfluence.torch.solvers.preconditioners`): the same solution, in fewer HVPs where the curvature is
  Kronecker-structured and ill-conditioned (measured: 0.58× the HVP columns of BlockCG on a raw-pixel digits
  MLP at damping 1e-3; no saving on the standardised digits MLP, whose H + λI has condition number 21).
- :class:`KFAC` / :class:`EKFAC`: Kronecker-factored approximations of H for models of
  ``nn.Linear`` layers (Martens & Grosse 2015; George et al. 2018): per layer, the inverse of
  (Fisher block ≈ G ⊗ A, or its eigenvalue-corrected version) + (l2 + λ)I in the factors'
  eigenbasis. Cost: one (EK-FAC: two) passes over the training data in ``prepare``, small matrix
  products per solve, plus one full HVP for the reported residual — which is that of an
  approximation, not small; ``tol=None`` (default) never fails on it.
- :class:`Arnoldi`: the low-rank method of Schioppa et al. 2022 ("Scaling Up Influence Functions"): the
  top-r eigenpairs of H (largest |σ|) by a block Krylov process on HVPs (block Lanczos, full
  reorthogonalisation in float64), then X = U diag(1/(σ + λ)) Uᵀ V plus, by default, (I − UUᵀ)V / (l2 + λ).
  Cost: about 4·rank HVP columns in batched calls in ``prepare``, small products per solve, plus one full
  HVP for the reported residual (that of an approximation; ``tol=None`` never fails on it).

The Hessian is accessed only through a *Hessian operator* (see :class:`HessianOperatorLike`):
``matvec`` (full training set), ``sample_matvec`` (one minibatch, for LiSSA) and ``dense``
(for Exact). Everything is torch: CPU or CUDA, float32 or float64; the iterative solvers keep
their state on the operator's device and synchronise with the host only every few iterations.

Threads: solver configurations are immutable and may be shared. A prepared solver is not meant to
be called from several threads at once (LiSSA with ``seed=None`` draws from one shared generator,
and every solve records its start time on the object); :class:`~pyinfluence.TorchInfluence`
serialises its solves with a lock.

Saving: a prepared solver's ``state()`` returns its arrays and JSON-able metadata, and the solver's
``restore(op, damping, tensors, meta)`` rebuilds it without the one-off work (no HVP, no pass over the data);
``Solver.config()`` and :func:`solver_from_config` write and rebuild a configuration.
:meth:`~pyinfluence.TorchInfluence.save` and :meth:`~pyinfluence.TorchInfluence.load` use them for a folder of
``.npy`` arrays and a JSON manifest.

Errors: :class:`~pyinfluence.errors.NotPositiveDefiniteError` (a ``ValueError``) when H + λI is
not positive definite, with a suggested damping (every solver: Exact from the spectrum of the
dense H, CG/BlockCG from the curvature of their search directions sharpened by a short Lanczos
process, LiSSA from a Lanczos process and the curvature of its iterates); :class:`~pyinfluence.errors.ConvergenceError` (a
``RuntimeError``) when CG, BlockCG or LiSSA does not reach its ``tol`` (the final relative
residual, measured with a full-Hessian HVP) or LiSSA diverges — or, with
``raise_on_nonconvergence=False``, a :class:`~pyinfluence.errors.ConvergenceWarning` and the
unconverged result. No solver returns NaN or infinity.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, cast

from pyinfluence.torch.solvers.arnoldi import Arnoldi
from pyinfluence.torch.solvers.base import HessianOperatorLike, PreparedSolver, Solver, SolveResult
from pyinfluence.torch.solvers.cg import CG, BlockCG
from pyinfluence.torch.solvers.exact import Exact
from pyinfluence.torch.solvers.kfac import EKFAC, KFAC
from pyinfluence.torch.solvers.lissa import LiSSA

__all__ = [
    "Arnoldi",
    "CG",
    "EKFAC",
    "KFAC",
    "BlockCG",
    "Exact",
    "HessianOperatorLike",
    "LiSSA",
    "PreparedSolver",
    "SolveResult",
    "Solver",
    "resolve_solver",
    "solver_from_config",
]


# ==============================================================================================
# Selection by name
# ==============================================================================================
_SOLVERS: dict[str, type[Solver]] = {
    "exact": Exact,
    "cg": CG,
    "block_cg": BlockCG,
    "lissa": LiSSA,
    "kfac": KFAC,
    "ekfac": EKFAC,
    "arnoldi": Arnoldi,
}


def resolve_solver(solver: str | Solver | type[Solver], name: str = "solver") -> Solver:
    """A solver object from a name (``"exact"``, ``"cg"``, ``"block_cg"``, ``"lissa"``, ``"kfac"``,
    ``"ekfac"``, ``"arnoldi"``; case-insensitive; default
    settings), a solver class (``CG`` → ``CG()``) or a solver object (returned as is).

    Raises ValueError for an unknown name and TypeError for anything else, naming ``name``.
    """
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, type) and issubclass(solver, Solver) and not inspect.isabstract(solver):
        return solver()
    if isinstance(solver, str):
        key = solver.strip().lower()
        if key in _SOLVERS:
            return _SOLVERS[key]()
        raise ValueError(
            f"{name} must be one of 'exact', 'cg', 'block_cg', 'lissa', 'kfac', 'ekfac', 'arnoldi' or a solver object such as "
            f"pyinfluence.CG(tol=1e-6), got {solver!r}"
        )
    raise TypeError(
        f"{name} must be a solver name ('exact', 'cg', 'block_cg', 'lissa', 'kfac', 'ekfac', 'arnoldi') or a solver object such as "
        f"pyinfluence.CG(), got {type(solver).__name__} {solver!r}"
    )


def solver_from_config(name: str, config: Mapping[str, Any]) -> Solver:
    """The solver ``name`` (``"exact"``, ``"cg"``, …) with the configuration ``config`` written by
    :meth:`Solver.config` (after a JSON round trip: dtypes by name, a nested preconditioner as
    ``{"solver": name, "config": {...}}``). Fields absent from ``config`` take their defaults.

    Raises ValueError naming the unknown solver or field, or the field the solver's own validation refused.
    """
    if not isinstance(name, str) or name not in _SOLVERS:
        raise ValueError(f"unknown solver {name!r} (known: {', '.join(repr(k) for k in _SOLVERS)})")
    if not isinstance(config, Mapping):
        raise ValueError(f"the configuration of solver {name!r} must be a dict, got {type(config).__name__}")
    cls = _SOLVERS[name]
    fields = {f.name for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"the configuration of solver {name!r} has unknown field(s) {unknown} (written by a newer "
            f"pyinfluence?)"
        )
    kwargs: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping) and set(v) == {"solver", "config"}:
            v = solver_from_config(v["solver"], v["config"])
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid configuration of solver {name!r}: {exc}") from None
