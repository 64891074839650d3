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

The Hessian is accessed only through a *Hessian operator* (see :class:`HessianOperatorLike`):
``matvec`` (full training set), ``sample_matvec`` (one minibatch, for LiSSA) and ``dense``
(for Exact). Everything is torch: CPU or CUDA, float32 or float64; the iterative solvers keep
their state on the operator's device and synchronise with the host only every few iterations.

Threads: solver configurations are immutable and may be shared. A prepared solver is not meant to
be called from several threads at once (LiSSA with ``seed=None`` draws from one shared generator,
and every solve records its start time on the object); :class:`~pyinfluence.TorchInfluence`
serialises its solves with a lock.

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

import abc
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from pyinfluence import _core
from pyinfluence._validation import (
    check_bool,
    check_damping,
    check_int,
    check_nonnegative_float,
    check_positive_float,
)
from pyinfluence.errors import ConvergenceError, ConvergenceWarning, NotPositiveDefiniteError

__all__ = [
    "CG",
    "BlockCG",
    "Exact",
    "HessianOperatorLike",
    "LiSSA",
    "PreparedSolver",
    "SolveResult",
    "Solver",
    "resolve_solver",
]

_FLOAT_DTYPES = (torch.float32, torch.float64)
# Exact: below this many parameters a failed factorisation computes all eigenvalues of H
# (float64 eigvalsh, ~9p³ flops: 0.3 s at p = 2000) to suggest a damping value.
_EIGVALSH_MAX_P = 2000
# LiSSA: power iterations per probed minibatch when choosing the scale automatically.
_PROBE_ITERS = 10
# LiSSA: default largest final relative residual ‖(H + λI)x − v‖/‖v‖ (see LiSSA.tol).
_LISSA_TOL = 0.2
# LiSSA: iterates are checked for divergence every this many steps (one host synchronisation).
_LISSA_CHECK_EVERY = 10
# CG: on CUDA, convergence is checked every this many iterations (one host synchronisation).
_CG_CUDA_CHECK_EVERY = 10


# ==============================================================================================
# The Hessian operator the solvers consume
# ==============================================================================================
@runtime_checkable
class HessianOperatorLike(Protocol):
    """What a solver needs from a Hessian: ``H = ∇²R(θ̂)`` for the selected parameters.

    ``R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖²``; H includes the L2 term and never the damping
    (solvers add λI themselves). Implemented for torch models by
    ``pyinfluence.torch.hessian.HessianOperator``; any object with these members works.

    - ``n_params`` p, ``dtype`` (float32/float64), ``device``, ``n_train`` n.
    - ``matvec(V)``: V (p, r) → H V (p, r) over the full training set.
    - ``sample_matvec(V, batch_size, generator)``: an unbiased estimate of H V from one uniform
      minibatch of ``batch_size`` training points drawn with ``generator`` (the same minibatch
      for all r columns). Used by LiSSA only.
    - ``dense()``: H as a (p, p) tensor. Used by Exact only.
    """

    n_params: int
    dtype: torch.dtype
    device: torch.device
    n_train: int

    def matvec(self, V: Tensor) -> Tensor: ...

    def sample_matvec(self, V: Tensor, batch_size: int, generator: torch.Generator) -> Tensor: ...

    def dense(self) -> Tensor: ...


# ==============================================================================================
# Results
# ==============================================================================================
@dataclass(repr=False)
class SolveResult:
    """The solution of (H + λI) X = V for a block of right-hand sides, with diagnostics.

    - ``solution``: X, shape (p, r) (or (p,) for a 1-D V), same dtype and device as V.
    - ``solver``: ``"exact"``, ``"cg"`` or ``"lissa"``.
    - ``iterations``: CG: iterations of the slowest column (one batched HVP each); LiSSA: the
      recursion depth; Exact: None.
    - ``residual``: (r,) relative residual ‖(H + λI)x − v‖ / ‖v‖ of each returned column (0 for a
      zero column), computed once at the end from the true operator (not a recursively updated
      estimate). Exact: against the dense matrix it factorised; CG and LiSSA: one extra batched
      full-training-set HVP. Same dtype as the solution; None if the solver was told not to
      compute it.
    - ``spread``: LiSSA with ``repeats ≥ 2``: (r,) relative standard deviation across repeats,
      sqrt(Σ_k ‖x_k − x̄‖² / (repeats − 1)) / ‖x̄‖ per column — the Monte-Carlo noise of one
      repeat (the returned mean has about 1/sqrt(repeats) of it). Otherwise None.
    - ``time_s``: wall-clock seconds of this solve (device work included; preparation excluded).
    - ``info``: everything else, e.g. ``damping``, ``converged`` (CG, block CG, LiSSA: per column,
      residual within ``tol``), ``scale``, ``lambda_max_estimate`` and ``lambda_min_estimate``
      (LiSSA: the extreme Ritz values of its Lanczos process, bounds from inside of the extreme
      eigenvalues of H + λI), ``matvec_calls`` / ``matvec_columns`` (operator calls and the
      total number of column HVPs they computed: the cost of the solve).
    """

    solution: Tensor
    solver: str
    iterations: int | None
    residual: Tensor | None
    spread: Tensor | None
    time_s: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_residual(self) -> float | None:
        """The largest relative residual over the columns (0.0 for no columns), or None."""
        if self.residual is None:
            return None
        return float(self.residual.max()) if self.residual.numel() else 0.0

    def __repr__(self) -> str:
        sol = self.solution
        parts = [
            f"solver={self.solver!r}",
            f"solution={tuple(sol.shape)} {str(sol.dtype).replace('torch.', '')} {sol.device}",
        ]
        if self.iterations is not None:
            parts.append(f"iterations={self.iterations}")
        if self.residual is not None:
            parts.append(f"max_residual={self.max_residual:.3g}")
        if self.spread is not None and self.spread.numel():
            parts.append(f"max_spread={float(self.spread.max()):.3g}")
        if "scale" in self.info:
            parts.append(f"scale={self.info['scale']:.4g}")
        parts.append(f"time_s={self.time_s:.4g}")
        return f"SolveResult({', '.join(parts)})"

    def summary(self) -> str:
        """A multi-line, human-readable account of the solve and all its diagnostics."""
        lines = [repr(self)]

        def stats(name: str, t: Tensor | None) -> None:
            if t is None or t.numel() == 0:
                return
            tf = t.detach().double().cpu()
            lines.append(
                f"  {name}: max {float(tf.max()):.3g}, median {float(tf.median()):.3g}, "
                f"min {float(tf.min()):.3g} over {tf.numel()} column(s)"
            )

        stats("residual ‖(H+λI)x−v‖/‖v‖", self.residual)
        stats("spread (relative std across repeats)", self.spread)
        for key, value in self.info.items():
            if isinstance(value, Tensor):
                if value.numel() <= 8:
                    value = value.tolist()
                else:
                    value = f"tensor of shape {tuple(value.shape)}"
            elif isinstance(value, float):
                value = f"{value:.6g}"
            lines.append(f"  {key}: {value}")
        return "\n".join(lines)


# ==============================================================================================
# Solver base classes
# ==============================================================================================
class Solver(abc.ABC):
    """Configuration of a linear solver for (H + λI) X = V. Immutable; validated on creation.

    ``prepare(op, damping)`` does the one-off work for one Hessian and returns a
    :class:`PreparedSolver`, whose ``solve(V)`` can be called many times.
    """

    name: ClassVar[str] = "solver"

    @abc.abstractmethod
    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> PreparedSolver:
        """One-off work for the Hessian behind ``op`` and damping λ; returns the prepared solver."""

    def solve(self, op: HessianOperatorLike, V: Tensor, damping: float = 0.0) -> SolveResult:
        """``prepare(op, damping).solve(V)`` in one call (prepares anew on every call)."""
        return self.prepare(op, damping).solve(V)


class PreparedSolver(abc.ABC):
    """A solver bound to one Hessian operator and damping; ``solve(V)`` for any number of V.

    Attributes: ``solver`` (the configuration), ``op``, ``damping`` λ, ``n_params`` p,
    ``prepare_time_s`` and ``info`` (what preparation found, e.g. LiSSA's scale).
    """

    def __init__(
        self,
        solver: Solver,
        op: HessianOperatorLike,
        damping: float,
        info: dict[str, Any],
        prepare_time_s: float,
    ) -> None:
        self.solver = solver
        self.op = op
        self.damping = damping
        self.n_params = int(op.n_params)
        self.dtype: torch.dtype = op.dtype
        self.device = _normalise_device(op.device)
        self.info = info
        self.prepare_time_s = prepare_time_s
        self._started = 0.0

    def __repr__(self) -> str:
        return (
            f"Prepared{type(self.solver).__name__}(n_params={self.n_params}, "
            f"damping={self.damping:g}, dtype={str(self.dtype).replace('torch.', '')}, "
            f"device={self.device}, solver={self.solver!r})"
        )

    def solve(self, V: Tensor) -> SolveResult:
        """Solve (H + λI) X = V.

        ``V``: a (p, r) tensor of r right-hand sides (r may be 0), or a (p,) tensor for one; on the
        operator's device, any floating dtype (the computation runs in the operator's dtype and
        the solution is returned in V's dtype). Zero columns give zero solutions.
        """
        V2, one_d = _check_rhs(V, self.n_params, self.device)
        start = self._started = time.perf_counter()
        work = V2.to(self.dtype) if V2.dtype != self.dtype else V2
        r = work.shape[1]
        if r == 0:
            sol, iters, res, spread, info = _empty_solution(work, self.solver.name)
        else:
            sol, iters, res, spread, info = self._solve(work)
        info = {"damping": self.damping, **info}
        sol = sol.to(V.dtype) if sol.dtype != V.dtype else sol
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        return SolveResult(
            solution=sol.reshape(-1) if one_d else sol,
            solver=self.solver.name,
            iterations=iters,
            residual=None if res is None else res.to(sol.dtype),
            spread=None if spread is None else spread.to(sol.dtype),
            time_s=elapsed,
            info=info,
        )

    @abc.abstractmethod
    def _solve(self, V: Tensor) -> tuple[Tensor, int | None, Tensor | None, Tensor | None, dict[str, Any]]:
        """V (p, r ≥ 1) in the operator's dtype → (X, iterations, residual, spread, info)."""

    def _not_converged(
        self,
        what: str,
        X: Tensor,
        n_iter: int,
        res: Tensor,
        spread: Tensor | None,
        converged: Tensor,
        info: dict[str, Any],
        budget: str,
        advice: str,
    ) -> None:
        """The ending every iterative solver shares when some columns' final relative residual
        missed the configuration's ``tol``: raise ConvergenceError, carrying the unconverged
        SolveResult as ``.result``, or — with ``raise_on_nonconvergence=False`` — warn
        (ConvergenceWarning) and let ``_solve`` return it. To be called from ``_solve`` (the
        warning's stack level points at the caller of ``solve``).

        ``budget`` completes "did not converge ... {budget}" (e.g. "in max_iter=50 iterations");
        ``advice`` is what to change.
        """
        n_bad = int((~converged).sum())
        msg = (
            f"{what} did not converge for {n_bad} of {converged.numel()} right-hand side(s) "
            f"{budget}: relative residual reached {_fmt(float(res[~converged].max()))} "
            f"(tol={self.solver.tol:g}). {advice}"  # type: ignore[attr-defined]
        )
        if self.solver.raise_on_nonconvergence:  # type: ignore[attr-defined]
            err = ConvergenceError(msg)
            err.result = SolveResult(
                X,
                self.solver.name,
                n_iter,
                res,
                spread,
                time.perf_counter() - self._started,
                {"damping": self.damping, **info},
            )
            raise err
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)


def _empty_solution(V: Tensor, name: str):
    z = V.new_zeros((0,))
    return V.clone(), (None if name == "exact" else 0), z, (z if name == "lissa" else None), {}


# ==============================================================================================
# Input checks
# ==============================================================================================
def _normalise_device(device: Any) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_operator(op: Any, needs: tuple[str, ...]) -> None:
    missing = [m for m in ("n_params", "dtype", "device") + needs if not hasattr(op, m)]
    if missing:
        raise TypeError(
            f"op must be a Hessian operator with n_params, dtype, device and {', '.join(needs)} "
            f"(see pyinfluence.solvers.HessianOperatorLike); {type(op).__name__} lacks "
            f"{', '.join(missing)}"
        )
    p = op.n_params
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"op.n_params must be a positive int, got {p!r}")
    if op.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"op.dtype must be torch.float32 or torch.float64, got {op.dtype}")


def _check_rhs(V: Any, p: int, device: torch.device) -> tuple[Tensor, bool]:
    """V → (a (p, r) tensor, whether V was 1-D). Raises naming ``V``."""
    if not isinstance(V, Tensor):
        raise TypeError(f"V must be a torch.Tensor of shape (p, r) = ({p}, r), got {type(V).__name__}")
    if V.is_complex() or not V.is_floating_point():
        raise TypeError(f"V must be a real floating-point tensor, got dtype {V.dtype}")
    if V.ndim not in (1, 2) or V.shape[0] != p:
        raise ValueError(
            f"V must have shape (p, r) = ({p}, r) (or ({p},) for one right-hand side), got "
            f"{tuple(V.shape)}; columns are right-hand sides"
        )
    if _normalise_device(V.device) != device:
        raise ValueError(
            f"V is on device '{V.device}' but the Hessian operator is on '{device}'; pass V.to('{device}')"
        )
    V = V.detach()
    one_d = V.ndim == 1
    if one_d:
        V = V.unsqueeze(1)
    if V.numel() and not bool(torch.isfinite(V).all()):
        bad = (~torch.isfinite(V)).any(dim=0).nonzero().flatten().tolist()
        raise ValueError(
            f"V contains NaN or infinity (in column(s) {bad[:10]}{'…' if len(bad) > 10 else ''})"
        )
    return V, one_d


def _matvec(op: HessianOperatorLike, X: Tensor, damping: float) -> Tensor:
    """(H + λI) X with one operator call; checks the operator's output shape."""
    out = op.matvec(X)
    if not isinstance(out, Tensor) or out.shape != X.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RuntimeError(f"op.matvec returned {shape} for an input of shape {tuple(X.shape)}")
    out = out.detach()
    if damping:
        out = out.add(X, alpha=damping)
    return out


def _sample_matvec(
    op: HessianOperatorLike, X: Tensor, damping: float, batch_size: int | None, gen: torch.Generator
) -> Tensor:
    """(H_B + λI) X for one minibatch B drawn with ``gen`` (full H when batch_size is None)."""
    if batch_size is None:
        return _matvec(op, X, damping)
    out = op.sample_matvec(X, batch_size, gen)
    if not isinstance(out, Tensor) or out.shape != X.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RuntimeError(f"op.sample_matvec returned {shape} for an input of shape {tuple(X.shape)}")
    out = out.detach()
    if damping:
        out = out.add(X, alpha=damping)
    return out


def _col_norms(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X, dim=0)


def _relative(num: Tensor, den: Tensor) -> Tensor:
    """num / den per column, with 0 where den == 0 (a zero right-hand side, solved exactly)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num)


def _true_residual(op: HessianOperatorLike, X: Tensor, V: Tensor, damping: float) -> tuple[Tensor, int]:
    """(‖(H + λI)x − v‖ / ‖v‖ per column, columns multiplied): one batched full HVP.

    Zero columns of V, whose solution is exactly zero, are not multiplied (residual 0).
    """
    res, _, k = _residual_and_curvature(op, X, V, damping)
    return res, k


def _residual_and_curvature(
    op: HessianOperatorLike, X: Tensor, V: Tensor, damping: float
) -> tuple[Tensor, Tensor, int]:
    """(relative residual ‖Ax − v‖/‖v‖, Rayleigh quotient xᵀAx/xᵀx, columns multiplied) per column
    of X, A = H + λI, from one batched full HVP.

    The Rayleigh quotient comes free with the residual: xᵀAx ≤ 0 for any x ≠ 0 proves that A is
    not positive definite. Zero columns of V (solution exactly zero) are not multiplied: residual
    0, curvature +inf (nothing observed); so is a zero x.
    """
    vn = _col_norms(V)
    nz = torch.nonzero(vn > 0).flatten()
    k = int(nz.numel())
    res = torch.zeros_like(vn)
    curv = torch.full_like(vn, math.inf)
    if k:
        Xs, Vs = (X, V) if k == V.shape[1] else (X.index_select(1, nz), V.index_select(1, nz))
        AX = _matvec(op, Xs, damping)
        xx = (Xs * Xs).sum(0)
        rq = torch.where(xx > 0, (Xs * AX).sum(0) / torch.where(xx > 0, xx, 1.0), math.inf)
        res.index_copy_(0, nz, _relative(_col_norms(AX - Vs), vn[nz]))
        curv.index_copy_(0, nz, rq)
    return res, curv, k


def _npd_error(
    what: str, evidence: str, curvature: float, damping: float, largest: float
) -> NotPositiveDefiniteError:
    """The NotPositiveDefiniteError of the iterative solvers (CG, block CG, LiSSA).

    ``curvature`` c = uᵀ(H + λI)u / uᵀu ≤ 0 was observed for some vector u (``evidence`` says
    which, e.g. "a search direction p at iteration 3 has curvature pᵀ(H + λI)p / pᵀp"). Since
    λ_min(H) + λ ≤ c, H has an eigenvalue ≤ c − λ and the damping must exceed λ − c; the suggestion
    doubles the observed deficit (c is only an upper bound of λ_min(H + λI)). ``largest``: the
    largest curvature seen, a lower estimate of λ_max(H + λI), sets a floor relative to the scale
    of H when c ≈ 0.
    """
    c, lam = float(curvature), float(damping)
    need = lam - c  # λ_min(H) ≤ c − λ, so damping must exceed λ − c
    suggest = _round_up(max(lam + 2.0 * (-c), lam + 1e-4 * abs(largest), need * 1.5, 1e-12))
    return NotPositiveDefiniteError(
        f"{what}: H + λI is not positive definite: {evidence} = {_fmt(c)} ≤ 0 (the largest seen "
        f"is {_fmt(largest)}). The Hessian has an eigenvalue ≤ {_fmt(c - lam)}, so damping must "
        f"exceed {_fmt(max(need, 0.0))}: pass e.g. damping={suggest:g} (damping={lam:g} now), "
        f"larger if this recurs. Non-convex models (Koh & Liang §4) need damping; see also "
        f"Exact, which reports the exact smallest eigenvalue for small models."
    )


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


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _round_up(x: float) -> float:
    """A value ≥ x with two significant digits (for suggested damping values)."""
    if not x > 0:
        return x
    e = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / e) * e


def _check_dtype_option(name: str, value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"float32": torch.float32, "float64": torch.float64}.get(value, value)
    if value not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be torch.float64, torch.float32 or None, got {value!r}")
    return value


def _check_seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    return check_int(name, value, 0, 2**63 - 1)


def _as_fraction(name: str, value: Any) -> float:
    v = check_nonnegative_float(name, value)
    if v > 1:
        raise ValueError(f"{name} must be between 0 and 1, got {v}")
    return v


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: normalise fields in __post_init__


# ==============================================================================================
# Exact: dense Cholesky
# ==============================================================================================
class _CoreFactor:
    """Cholesky factor of A + λI by the C++ core (CPU). ``solve`` maps torch ↔ numpy zero-copy. The core
    raises NotPositiveDefiniteError with its diagnosis (``pivot``, ``size``, ``min_pivot``,
    ``suggested_damping``) and a message without advice: callers add theirs."""

    backend = "core"

    def __init__(self, A: Tensor, damping: float) -> None:
        self._f = _core.CholeskyFactor(A.contiguous().numpy(), float(damping))

    def solve(self, B: Tensor) -> Tensor:
        out = self._f.solve(B.contiguous().numpy())
        return torch.from_numpy(np.ascontiguousarray(out))


class _TorchFactor:
    """Cholesky factor of A + λI by torch.linalg.cholesky_ex (any device)."""

    backend = "torch"

    def __init__(self, A: Tensor, damping: float) -> None:
        M = A.clone()
        if damping:
            M.diagonal().add_(damping)
        L, info = torch.linalg.cholesky_ex(M)
        del M
        bad = int(info)
        if bad:
            raise NotPositiveDefiniteError(
                f"the Cholesky factorisation of H + λI failed at pivot {bad - 1} (0-based): the "
                f"leading {bad}×{bad} block is not positive definite",
                pivot=bad - 1,
                size=int(A.shape[0]),
            )
        self._L = L

    def solve(self, B: Tensor) -> Tensor:
        return torch.cholesky_solve(B, self._L)


def _factorise(A: Tensor, damping: float) -> _CoreFactor | _TorchFactor:
    """Cholesky-factorise A + λI (A symmetric, lower triangle used); one place to swap backends.

    CPU tensors use the C++ core's ``CholeskyFactor`` when the installed extension has it, else
    ``torch.linalg.cholesky_ex``; CUDA tensors always factorise on the device. Raises
    NotPositiveDefiniteError (message naming the failing pivot, ``pivot`` and ``size`` set; callers add the
    advice).
    """
    if A.device.type == "cpu" and hasattr(_core, "CholeskyFactor"):
        return _CoreFactor(A, damping)
    return _TorchFactor(A, damping)


def _spectrum_advice(A: Tensor, damping: float) -> tuple[str, float]:
    """Advice on the damping that makes A + λI positive definite, from A's spectrum, and the damping it
    suggests.

    p ≤ 2000: exact extreme eigenvalues (float64 eigvalsh). Larger: λ_max by 30 power iterations
    on the dense matrix, and a relative suggestion.
    """
    p = A.shape[0]
    A64 = A.to(torch.float64)
    if p <= _EIGVALSH_MAX_P:
        ev = torch.linalg.eigvalsh(A64)
        lo, hi = float(ev[0]), float(ev[-1])
        if lo + damping <= 0:
            need = -lo
            suggest = _round_up(max(2.0 * need, need + 1e-4 * abs(hi), 1e-12))
            return (
                f"The smallest eigenvalue of H is {_fmt(lo)} (the largest {_fmt(hi)}): H + λI is "
                f"positive definite only for damping > {_fmt(need)}; pass e.g. damping={suggest:g} "
                f"(damping={damping:g} now).",
                suggest,
            )
        suggest = _round_up(max(1e-6 * abs(hi), damping * 10, 1e-12))
        f64 = " or factor_dtype=torch.float64" if A.dtype != torch.float64 else ""
        return (
            f"H + λI has eigenvalues in [{_fmt(lo + damping)}, {_fmt(hi + damping)}] (condition "
            f"number {_fmt((hi + damping) / max(lo + damping, 1e-300))}): numerically singular "
            f"in {str(A.dtype).replace('torch.', '')}; pass a larger damping (e.g. "
            f"damping={suggest:g}){f64}.",
            suggest,
        )
    u = torch.randn(p, 1, dtype=torch.float64, device=A.device, generator=_generator(A.device, 0))
    lam = 0.0
    for _ in range(30):
        w = A64 @ u
        lam = float(torch.linalg.vector_norm(w))
        if lam == 0:
            break
        u = w / lam
    suggest = _round_up(max(1e-3 * lam, 1e-12))
    return (
        f"The largest eigenvalue magnitude of H is about {_fmt(lam)}; pass damping=λ > 0, e.g. "
        f"damping={suggest:g} (1e-3·λ_max), and increase it tenfold until the factorisation "
        f"succeeds (damping={damping:g} now).",
        suggest,
    )


@dataclass(frozen=True)
class Exact(Solver):
    """Dense Cholesky solve: materialise H, factorise H + λI once, solve many right-hand sides.

    Parameters
    ----------
    max_params : int, default 20 000
        Refuse Hessians with more parameters: the dense (p, p) matrix takes 8p² bytes in float64
        (3.2 GB at p = 20 000; peak memory ≈ 3 such matrices) and the factorisation p³/3 flops.
        Above it, use :class:`CG` or :class:`LiSSA`, or select fewer parameters (``params=``).
    factor_dtype : torch.float64 (default), torch.float32 or None
        The dtype in which H + λI is symmetrised, factorised and solved; None = the operator's
        dtype. float64 by default even for float32 models (as kronfluence does): Hessians of
        neural networks are often so ill-conditioned that a float32 Cholesky fails or loses all
        digits (its error grows like p·κ·ε), while the float64 factorisation only carries the
        float32 rounding of H itself. Solutions are returned in V's dtype. On GPUs with slow
        float64 (consumer cards), ``factor_dtype=None`` is much faster.
    compute_residual : bool, default True
        Report ‖(H + λI)x − v‖/‖v‖ per column, computed with the dense matrix (2p²·r flops,
        as much as the solve itself). Keeps H in memory beside its factor; False frees it.

    ``prepare``: one ``op.dense()``, then the factorisation — with the C++ core's
    ``CholeskyFactor`` on the CPU (when the installed extension has it), with
    ``torch.linalg.cholesky_ex`` otherwise and on CUDA. Raises NotPositiveDefiniteError with a
    suggested damping (from H's eigenvalues when p ≤ 2000) when H + λI is not positive definite.
    ``solve``: two triangular solves per column block, no HVPs.
    """

    max_params: int = 20_000
    factor_dtype: torch.dtype | None = torch.float64
    compute_residual: bool = True

    name: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        _set(self, "max_params", check_int("max_params", self.max_params, 1))
        _set(self, "factor_dtype", _check_dtype_option("factor_dtype", self.factor_dtype))
        _set(self, "compute_residual", check_bool("compute_residual", self.compute_residual))

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedExact:
        _check_operator(op, ("dense",))
        damping = check_damping(damping)
        p = op.n_params
        if p > self.max_params:
            gb = 8.0 * p * p / 1e9
            raise ValueError(
                f"Exact: the Hessian has p = {p} parameters, more than max_params="
                f"{self.max_params} (its dense matrix alone would take {gb:.3g} GB in float64 and "
                f"its factorisation {p**3 / 3e12:.3g} TFLOP). Use solver='cg' (CG) or 'lissa' "
                f"(LiSSA), select fewer parameters with params=..., or raise "
                f"Exact(max_params=...) if the memory is there"
            )
        start = time.perf_counter()
        H = op.dense()
        if not isinstance(H, Tensor) or H.shape != (p, p):
            shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
            raise RuntimeError(f"op.dense() returned {shape}; expected ({p}, {p})")
        H = H.detach()
        if not bool(torch.isfinite(H).all()):
            raise ValueError(
                "the Hessian contains NaN or infinity (check the model's parameters and loss at "
                "these weights)"
            )
        fdtype = self.factor_dtype or op.dtype
        A = H.to(fdtype)
        del H
        A = (A + A.mT).mul_(0.5)  # exactly symmetric, whatever the operator's rounding
        try:
            factor = _factorise(A, damping)
        except NotPositiveDefiniteError as exc:
            advice, suggest = _spectrum_advice(A, damping)
            raise NotPositiveDefiniteError(
                f"Exact: H + λI is not positive definite: {exc}. {advice} "
                f"Hessians of non-convex models (or of models with more parameters than training "
                f"points, or l2 = 0) often have zero or negative eigenvalues; damping λ adds λI "
                f"(Koh & Liang §4).",
                pivot=exc.pivot,
                size=exc.size,
                min_pivot=exc.min_pivot,
                suggested_damping=suggest,
            ) from None
        info = {
            "backend": factor.backend,
            "factor_dtype": str(fdtype).replace("torch.", ""),
            "n_params": p,
        }
        return _PreparedExact(
            self,
            op,
            damping,
            info,
            time.perf_counter() - start,
            factor,
            A if self.compute_residual else None,
            fdtype,
        )


class _PreparedExact(PreparedSolver):
    def __init__(self, solver, op, damping, info, prepare_time_s, factor, A, fdtype) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self._factor = factor
        self._A = A
        self._fdtype = fdtype

    def _solve(self, V: Tensor):
        B = V.to(self._fdtype)
        X = self._factor.solve(B).to(device=V.device)
        X = X.to(V.dtype)
        res = None
        if self._A is not None:
            Xf = X.to(self._fdtype)
            R = torch.addmm(B, self._A, Xf, beta=-1.0)
            if self.damping:
                R.add_(Xf, alpha=self.damping)
            res = _relative(_col_norms(R), _col_norms(B))
        if not bool(torch.isfinite(X).all()):  # cannot happen for a successful factorisation
            raise NotPositiveDefiniteError(
                "Exact: the triangular solves produced NaN or infinity: H + λI is numerically "
                "singular; pass a larger damping"
            )
        return X, None, res, None, {"matvec_calls": 0, "matvec_columns": 0}


# ==============================================================================================
# CG: block conjugate gradients
# ==============================================================================================
@dataclass(frozen=True)
class CG(Solver):
    """Block conjugate gradients on (H + λI) X = V, one batched HVP per iteration.

    Each column runs its own CG recursion (its own step sizes α and β) from x₀ = 0, but all
    columns that have not converged yet share one ``op.matvec`` call per iteration; converged
    columns are frozen and dropped from the batch. Stops a column when its (recursively updated)
    residual satisfies ‖r‖ ≤ tol·‖v‖. At the end one more batched HVP recomputes the true
    residuals ‖(H + λI)x − v‖/‖v‖ reported in the result (in float32 they stall near
    1e-7·cond(H + λI) even when the recursive residual goes lower). CG on Hessian-vector
    products follows Martens 2010 ("Deep learning via Hessian-free optimization").

    Parameters
    ----------
    tol : float, default 1e-8
        Relative residual tolerance, 0 < tol < 1.
    max_iter : int or None, default None
        Iterations (batched HVPs) at most. None: min(10·p, 1000) — in exact arithmetic CG ends in
        ≤ p iterations; in floating point, ill-conditioned systems need a few times more.
    raise_on_nonconvergence : bool, default True
        If some column has not reached ``tol`` after ``max_iter`` iterations, raise
        ConvergenceError (its ``result`` attribute holds the unconverged SolveResult); with
        False, warn (:class:`~pyinfluence.errors.ConvergenceWarning`, a RuntimeWarning) and return
        it, ``info["converged"]`` marking the columns.
    check_every : int or None, default None
        Check convergence (a host synchronisation) every this many iterations. None: every
        iteration on the CPU, every 10 on CUDA (so the GPU is never stalled by the host; columns
        that converge in between are frozen on the device, so the result is the same).

    Raises NotPositiveDefiniteError if a search direction has non-positive curvature
    pᵀ(H + λI)p ≤ 0: H + λI is not positive definite (the message suggests a damping).

    Cost per solve: iterations × one batched HVP (over the columns still active), plus one
    batched HVP of the nonzero columns for the reported residuals; memory about six (p, r)
    blocks besides the HVP's own. In float32, tolerances below about 1e-6 cost iterations
    without lowering the true residual further (``info["recursive_residual"]`` shows the
    recursion's own estimate).
    """

    tol: float = 1e-8
    max_iter: int | None = None
    raise_on_nonconvergence: bool = True
    check_every: int | None = None

    name: ClassVar[str] = "cg"

    def __post_init__(self) -> None:
        tol = check_positive_float("tol", self.tol)
        if tol >= 1:
            raise ValueError(f"tol must be < 1 (a relative residual), got {tol}")
        _set(self, "tol", tol)
        if self.max_iter is not None:
            _set(self, "max_iter", check_int("max_iter", self.max_iter, 1))
        _set(
            self,
            "raise_on_nonconvergence",
            check_bool("raise_on_nonconvergence", self.raise_on_nonconvergence),
        )
        if self.check_every is not None:
            _set(self, "check_every", check_int("check_every", self.check_every, 1))

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedCG:
        _check_operator(op, ("matvec",))
        damping = check_damping(damping)
        p = op.n_params
        max_iter = self.max_iter if self.max_iter is not None else min(10 * p, 1000)
        dev = _normalise_device(op.device)
        check_every = self.check_every or (_CG_CUDA_CHECK_EVERY if dev.type == "cuda" else 1)
        info = {"max_iter": max_iter, "tol": self.tol}
        return _PreparedCG(self, op, damping, info, 0.0, max_iter, check_every)


class _PreparedCG(PreparedSolver):
    solver: CG

    def __init__(self, solver, op, damping, info, prepare_time_s, max_iter, check_every) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self._max_iter = max_iter
        self._check_every = check_every

    def _solve(self, V: Tensor):
        op, lam, tol = self.op, self.damping, self.solver.tol
        r = V.shape[1]
        dev = V.device
        X = torch.zeros_like(V)
        bnorm = _col_norms(V)
        iters = torch.zeros(r, dtype=torch.long, device=dev)
        rr_all = bnorm.square()
        thresh_all = (tol * bnorm).square()
        act = torch.nonzero(bnorm > 0).flatten()  # zero columns: x = 0 exactly, never iterated
        R = V.index_select(1, act)
        P = R.clone()
        Xa = torch.zeros_like(R)
        rr = rr_all.index_select(0, act)
        th = thresh_all.index_select(0, act)
        it_a = torch.zeros_like(act)
        done = torch.zeros_like(act, dtype=torch.bool)
        bad = torch.zeros_like(done)  # columns that met non-positive curvature
        broken = torch.zeros_like(done)  # columns whose HVP was NaN/inf
        curv_min = torch.zeros_like(rr)  # its Rayleigh quotient pᵀAp/pᵀp
        rq_max = torch.zeros((), dtype=V.dtype, device=dev)  # λ_max(H+λI) lower estimate
        calls = columns = 0
        n_it = 0
        n_active = int(act.numel())
        while n_active and n_it < self._max_iter:
            AP = _matvec(op, P, lam)
            calls += 1
            columns += n_active
            pAp = (P * AP).sum(0)
            pp = (P * P).sum(0)
            live = ~done
            finite = torch.isfinite(pAp)
            broken |= live & ~finite
            neg = live & (pAp <= 0)
            ok = live & finite & (pAp > 0)
            rq = pAp / torch.where(pp > 0, pp, torch.ones_like(pp))
            curv_min = torch.where(neg & ~bad, rq, curv_min)
            bad |= neg
            rq_max = torch.maximum(rq_max, torch.where(finite, rq, 0.0).max())
            alpha = torch.where(ok, rr / torch.where(ok, pAp, torch.ones_like(pAp)), 0.0)
            Xa.add_(P * alpha)
            R.sub_(AP * alpha)
            rr_new = (R * R).sum(0)
            beta = torch.where(ok, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), 0.0)
            P = torch.addcmul(R, P, beta)
            rr = torch.where(ok, rr_new, rr)
            it_a += ok
            done |= rr <= th
            n_it += 1
            if n_it % self._check_every == 0 or n_it == self._max_iter:
                if bool(bad.any()):
                    self._raise_npd(curv_min[bad], rq_max, n_it)
                if bool(broken.any()) or not bool(torch.isfinite(rr).all()):
                    raise ConvergenceError(
                        f"CG: the residuals became NaN or infinite at iteration {n_it}: the "
                        f"Hessian-vector products returned non-finite values (check the model "
                        f"and loss at these weights) or H + λI is extremely ill-conditioned "
                        f"(add damping; damping={lam:g} now)"
                    )
                if bool(done.any()):  # write back and drop the converged columns
                    idx = act[done]
                    X.index_copy_(1, idx, Xa[:, done])
                    rr_all.index_copy_(0, idx, rr[done])
                    iters.index_copy_(0, idx, it_a[done])
                    keep = ~done
                    act, Xa, R, P = act[keep], Xa[:, keep], R[:, keep], P[:, keep]
                    rr, th, it_a = rr[keep], th[keep], it_a[keep]
                    bad, curv_min, broken = bad[keep], curv_min[keep], broken[keep]
                    done = done[keep]
                    n_active = int(act.numel())
        if n_active:
            X.index_copy_(1, act, Xa)
            rr_all.index_copy_(0, act, rr)
            iters.index_copy_(0, act, it_a)
        converged = rr_all <= thresh_all
        res, k = _true_residual(op, X, V, lam)
        calls += int(k > 0)
        columns += k
        n_iter = int(iters.max()) if r else 0
        info = {
            "converged": converged,
            "iterations_per_column": iters,
            "recursive_residual": _relative(rr_all.sqrt(), bnorm),
            "lambda_max_estimate": float(rq_max),
            "matvec_calls": calls,
            "matvec_columns": columns,
        }
        if n_active:
            self._not_converged(
                "CG",
                X,
                n_iter,
                res,
                None,
                converged,
                info,
                f"in max_iter={self._max_iter} iterations",
                f"Increase max_iter, loosen tol, or add damping, which improves the conditioning "
                f"of H + λI (damping={lam:g} now; the largest eigenvalue of H + λI is at least "
                f"{_fmt(float(rq_max))})",
            )
        return X, n_iter, res, None, info

    def _raise_npd(self, curv: Tensor, rq_max: Tensor, n_it: int) -> None:
        c, note = _sharpen_negative_curvature(self.op, self.damping, float(curv.min()), "CG")
        raise _npd_error(
            "CG",
            f"a search direction p at iteration {n_it} has curvature pᵀ(H + λI)p / pᵀp = "
            f"{_fmt(float(curv.min()))}{note}; the smallest curvature",
            c,
            self.damping,
            float(rq_max),
        )


@dataclass(frozen=True)
class BlockCG(CG):
    """True block conjugate gradients: all right-hand sides share one Krylov space.

    :class:`CG` runs an independent recursion per column (batched into one HVP call). Block CG
    (O'Leary 1980) searches, at iteration k, the span of all columns' Krylov spaces: with r
    right-hand sides the search space grows by up to r dimensions per batched HVP, so on the
    clustered spectra of ML Hessians it needs far fewer iterations (each costs the same batched
    HVP of the unconverged columns' directions). Rank deficiency of the search block — the usual
    breakdown of block CG when columns become (nearly) linearly dependent — is handled as in Ji &
    Li 2017 ("A breakdown-free block conjugate gradient method"): the new block is orthonormalised
    by an SVD and directions with singular values below ``rank_tol`` × the largest are dropped.

    Iteration (P orthonormal, p×s; R the p×r residuals; A = H + λI)::

        Q = A P;  Pᵀ A P = Pᵀ Q (s×s, SPD iff A is on span P)
        α = (PᵀQ)⁻¹ Pᵀ R;  X += P α;  R −= Q α
        β = −(PᵀQ)⁻¹ Qᵀ R_active;  P = orth(R_active + P β)

    Parameters are those of :class:`CG` (``tol`` per column on the recursively updated residual,
    ``max_iter``, ``raise_on_nonconvergence``; ``check_every`` is ignored: every iteration
    synchronises to factorise PᵀQ), plus ``rank_tol`` (default 1e-10 in float64, 1e-5 in float32
    when None). The reported residuals are true ones, from one extra batched HVP, as for CG.
    Raises NotPositiveDefiniteError when PᵀAP is not positive definite (a Ritz value ≤ 0).
    Memory: a few (p, r) blocks, like CG.
    """

    rank_tol: float | None = None

    name: ClassVar[str] = "block_cg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_tol is not None:
            rt = check_positive_float("rank_tol", self.rank_tol)
            if rt >= 1:
                raise ValueError(f"rank_tol must be < 1 (relative to the largest singular value), got {rt}")
            _set(self, "rank_tol", rt)

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedBlockCG:
        base = super().prepare(op, damping)
        return _PreparedBlockCG(self, op, base.damping, dict(base.info), 0.0, base._max_iter, 1)


class _PreparedBlockCG(_PreparedCG):
    solver: BlockCG

    def _orth(self, Z: Tensor) -> Tensor:
        """Orthonormal basis of span Z, rank-revealing (drops directions below rank_tol·σ_max)."""
        U, sv, _ = torch.linalg.svd(Z, full_matrices=False)
        if sv.numel() == 0 or not bool(sv[0] > 0):
            return U[:, :0]
        rt = self.solver.rank_tol
        if rt is None:
            rt = 1e-10 if Z.dtype == torch.float64 else 1e-5
        return U[:, sv > rt * sv[0]]

    def _solve(self, V: Tensor):
        op, lam, tol = self.op, self.damping, self.solver.tol
        r = V.shape[1]
        X = torch.zeros_like(V)
        bnorm = _col_norms(V)
        thresh = tol * bnorm
        R = V.clone()
        active = bnorm > 0  # zero columns: x = 0 exactly
        calls = columns = 0
        n_it = 0
        iters = torch.zeros(r, dtype=torch.long, device=V.device)
        rq_max = 0.0
        rnorm = bnorm.clone()
        P = self._orth(R[:, active]) if bool(active.any()) else R[:, :0]
        while P.shape[1] and n_it < self._max_iter:
            Q = _matvec(op, P, lam)
            calls += 1
            columns += int(P.shape[1])
            PtQ = P.T @ Q
            PtQ = 0.5 * (PtQ + PtQ.T)
            if not bool(torch.isfinite(PtQ).all()):
                raise ConvergenceError(
                    f"block CG: the Hessian-vector products returned non-finite values at "
                    f"iteration {n_it + 1} (check the model and loss at these weights, or add "
                    f"damping; damping={lam:g} now)"
                )
            ritz = torch.linalg.eigvalsh(PtQ)  # Ritz values of H + λI on span P
            rq_max = max(rq_max, float(ritz[-1]))
            if not bool(ritz[0] > 0):
                self._raise_npd(ritz[:1], torch.tensor(rq_max), n_it + 1)
            L = torch.linalg.cholesky(PtQ)
            alpha = torch.cholesky_solve(P.T @ R, L)  # (s, r): all columns take the step
            X.addmm_(P, alpha)
            R.sub_(Q @ alpha)
            n_it += 1
            rnorm = _col_norms(R)
            iters += active.long()
            active = active & (rnorm > thresh)
            if not bool(active.any()):
                break
            Ra = R[:, active]
            beta = -torch.cholesky_solve(Q.T @ Ra, L)
            P = self._orth(Ra + P @ beta)
        converged = rnorm <= thresh
        res, k = _true_residual(op, X, V, lam)
        calls += int(k > 0)
        columns += k
        info = {
            "converged": converged,
            "iterations_per_column": iters,
            "recursive_residual": _relative(rnorm, bnorm),
            "lambda_max_estimate": rq_max,
            "matvec_calls": calls,
            "matvec_columns": columns,
        }
        if not bool(converged.all()):
            self._not_converged(
                "block CG",
                X,
                n_it,
                res,
                None,
                converged,
                info,
                f"in max_iter={self._max_iter} iterations",
                f"Increase max_iter, loosen tol, or add damping, which improves the conditioning "
                f"of H + λI (damping={lam:g} now; the largest eigenvalue of H + λI is at least "
                f"{_fmt(rq_max)})",
            )
        return X, n_it, res, None, info

    def _raise_npd(self, curv: Tensor, rq_max: Tensor, n_it: int) -> None:
        c, note = _sharpen_negative_curvature(self.op, self.damping, float(curv.min()), "block CG")
        raise _npd_error(
            "block CG",
            f"the search block P at iteration {n_it} has a direction p with curvature "
            f"pᵀ(H + λI)p / pᵀp = {_fmt(float(curv.min()))} (the smallest Ritz value on span P)"
            f"{note}; the smallest curvature",
            c,
            self.damping,
            float(rq_max),
        )


# ==============================================================================================
# LiSSA: stochastic Neumann series
# ==============================================================================================
@dataclass(frozen=True)
class LiSSA(Solver):
    """LiSSA: the stochastic Neumann-series estimate of (H + λI)⁻¹ V (Agarwal et al. 2016).

    As in Koh & Liang §3, for each repeat and each column v::

        h₀ = v,   h_j = v + (I − (H_Bj + λI) / scale) h_{j−1},   j = 1 … depth
        estimate = h_depth / scale                          (average_tail = 0: the paper's)
        estimate = mean(h_j, last ⌈average_tail·depth⌉ steps) / scale       (the default)

    with H_Bj the Hessian of a fresh uniform minibatch B_j of ``batch_size`` training points
    (one minibatch per step, shared by all r columns; one batched ``op.sample_matvec`` call).
    The result is the mean over ``repeats`` independent runs. Averaging the tail of the
    recursion (Polyak–Ruppert averaging) does not change the expectation once the recursion has
    converged, but divides the minibatch noise of one repeat by about sqrt(steps averaged /
    (scale/λ_min)) — on well-conditioned problems a tenfold smaller error for the same HVPs —
    at the price of slightly more truncation bias when depth is too small. In expectation
    h_depth / scale = Σ_{i=0}^{depth} (I − A/scale)^i v / scale → A⁻¹ v, A = H + λI, which
    converges if and only if 0 < eig(A) < 2·scale; the error along an eigenvalue μ of A decays like
    (1 − μ/scale)^depth, so depth must be large beside scale/λ_min(A): directions of small
    curvature converge last (and with λ_min(A) = 0 never). :meth:`suggest_depth` computes it.

    **Every solve is checked.** LiSSA is approximate, and an unconverged recursion returns a
    finite, plausible vector; so each solve measures what it returns with one batched
    full-Hessian HVP: the relative residual ‖(H + λI)x − v‖/‖v‖ of every column (``residual``, as
    for CG; the minibatch noise shows as ``spread``). A column above ``tol`` raises
    ConvergenceError, carrying the result as ``.result`` — a depth too small for scale/λ_min(A),
    a hand-picked scale far above λ_max (which slows the recursion by the same factor) or too
    much minibatch noise. ``raise_on_nonconvergence=False`` warns (ConvergenceWarning) and returns
    the result instead, ``info["converged"]`` marking the columns within ``tol``.

    **Negative curvature.** Along an eigenvalue μ < 0 of A the recursion grows like
    (1 + |μ|/scale)^j — slowly when |μ| ≪ scale, as for the small negative eigenvalues of a trained
    non-convex model — so it can return a wrong answer without ever diverging. LiSSA raises
    NotPositiveDefiniteError, with a suggested damping (the message CG uses), as soon as it
    observes a vector u with uᵀAu ≤ 0, which proves that A is not positive definite:

    - in ``prepare``, a Lanczos process on A (Lanczos 1950; Golub & Van Loan §10.1; fully
      reorthogonalised) of ``power_iters`` steps from a random vector. Its Ritz values are the
      extreme values of uᵀAu/uᵀu over the Krylov space span{u₀, A u₀, …}: the largest sets the
      scale (a better estimate of λ_max than the power iteration, whose iterate lies in the same
      space), the smallest, θ_min ≥ λ_min(A), reveals negative curvature when ≤ 0. This runs for a
      hand-picked scale too. (Measured on a trained digits 64-32-10 ReLU MLP, λ_min(H) = −1.0e-3,
      λ_max = 1.3: θ_min < 0 after 21–22 steps from every start tried, −9e-4 after 40; 300 steps of
      power iteration on μ̂I − H, the alternative, never gave a negative Rayleigh quotient.)
    - in the recursion, when the iterates diverge: the Rayleigh quotient of the diverging
      iterates h (one full HVP), which the growing negative-curvature direction dominates.
    - in the result: xᵀAx of every returned column (free with the residual's HVP).

    None of these proves that A *is* positive definite: negative curvature that the Lanczos
    process does not reach shows (at most) as a residual above ``tol``.

    Parameters
    ----------
    depth : int, default 1000
        Recursion steps per repeat (minibatch HVPs).
    scale : float or None, default None
        The scale of the recursion. None (recommended): chosen in ``prepare`` as
        ``safety · μ̂``, where μ̂ is the largest estimated eigenvalue of H + λI (Lanczos, above)
        and of H_B + λI for a few sampled minibatches B (power iteration, below). This keeps every
        step's factor I − (H_B + λI)/scale within [−1, 1] with margin for minibatches like those
        probed (any with eigenvalues up to 2·scale), so the recursion contracts. A hand-picked
        scale that is too small makes the iterates grow exponentially: detected, ConvergenceError;
        one far too large leaves the recursion unconverged: residual above ``tol``.
    repeats : int, default 4
        Independent runs averaged (each with its own minibatch sequence). ≥ 2 reports ``spread``.
    batch_size : int or None, default 64
        Training points per minibatch HVP. None, or ≥ the training-set size, uses the full
        Hessian (``op.matvec``): the recursion is then deterministic (Richardson iteration), so
        one repeat is run whatever ``repeats`` says.
    average_tail : float in [0, 1], default 0.5
        Fraction of the final steps whose iterates are averaged (above); 0 = the classic
        estimate h_depth/scale. Not used with the full Hessian (deterministic iterates).
    seed : int or None, default 0
        Seed of the ``torch.Generator`` (on the operator's device) that draws the minibatches.
        Every ``solve`` restarts from it, so results are reproducible and a column's estimate
        does not depend on which other columns are solved with it. None: fresh randomness.
    safety : float, default 1.1
        Automatic scale = safety · μ̂ (> 0.5; below 1 converges faster but is less robust).
    power_iters : int, default 40
        Lanczos steps in ``prepare`` (each one full-Hessian HVP of one column; fewer when p is
        smaller or the Krylov space becomes invariant). They estimate λ_max(H + λI) and search
        for negative curvature (above), with or without a hand-picked scale. (The name is
        historical: a power iteration used to estimate λ_max alone.)
    probe_batches : int, default 4
        Minibatches whose Hessian's largest eigenvalue is also estimated (10 power iterations
        each, from the Lanczos estimate of H's top eigenvector, re-drawing the same minibatch by
        restoring the generator state — this needs ``op.sample_matvec`` to draw its minibatch
        from the generator only, as the operator contract requires). Minibatch Hessians have
        larger eigenvalues than the full one — the smaller the batch, the larger — so a scale from
        H alone could make single steps expand. 0 disables probing. Automatic scale only.
    divergence_factor : float, default 100
        Every 10 steps, ‖h_j‖ is compared with divergence_factor · (j + 1) · ‖v‖: for a positive
        definite A and contracting steps ‖h_j‖ ≤ (j + 1)‖v‖ always, so exceeding the bound (or
        a non-finite value) means divergence: NotPositiveDefiniteError if the diverging iterates
        have curvature ≤ 0, ConvergenceError (scale too small) otherwise — never NaN/inf.
    tol : float in (0, 1), default 0.2
        Largest accepted final relative residual ‖(H + λI)x − v‖/‖v‖ of a column. LiSSA is a
        stochastic, truncated method, so the default is loose. It was set by measuring the
        benchmark's settings (``pyinfluence.bench``: batch 128, 50 test gradients, seed 0) against
        exact solves: on digits logistic regression (damping 0) and the digits tanh MLP (damping
        0.01), the runs whose max residual was ≤ 0.15 (MLP depth ≥ 300, logistic regression depth
        1000) had solutions within 19 % of the exact ones and influence-score rank correlations
        ≥ 0.96 for every test point; the runs at ≥ 0.25 (MLP depth ≤ 100, logistic regression
        depth ≤ 300) were 46–99 % off, with rank correlations down to 0.82 (depth 300) … 0.08
        (depth 3). 0.2 separates the two groups.
    raise_on_nonconvergence : bool, default True
        If some column's residual exceeds ``tol``, raise ConvergenceError (its ``result``
        attribute holds the SolveResult); with False, warn (ConvergenceWarning) and return it.

    Cost: ``prepare``: ≤ ``power_iters`` full HVPs of one column (and p × ``power_iters``
    memory for the Lanczos basis), plus 10·``probe_batches`` minibatch HVPs for an automatic
    scale. ``solve``: ``repeats · depth`` minibatch HVPs of r columns plus one full HVP of r
    columns for the residual and curvature check.
    """

    depth: int = 1000
    scale: float | None = None
    repeats: int = 4
    batch_size: int | None = 64
    seed: int | None = 0
    average_tail: float = 0.5
    safety: float = 1.1
    power_iters: int = 40
    probe_batches: int = 4
    divergence_factor: float = 100.0
    tol: float = _LISSA_TOL
    raise_on_nonconvergence: bool = True

    name: ClassVar[str] = "lissa"

    def __post_init__(self) -> None:
        _set(self, "depth", check_int("depth", self.depth, 1))
        if self.scale is not None:
            _set(self, "scale", check_positive_float("scale", self.scale))
        _set(self, "repeats", check_int("repeats", self.repeats, 1))
        if self.batch_size is not None:
            _set(self, "batch_size", check_int("batch_size", self.batch_size, 1))
        _set(self, "seed", _check_seed("seed", self.seed))
        tail = _as_fraction("average_tail", self.average_tail)
        _set(self, "average_tail", tail)
        safety = check_positive_float("safety", self.safety)
        if safety <= 0.5:
            raise ValueError(
                f"safety must be > 0.5 (scale = safety·λ_max; the recursion diverges when "
                f"scale < λ_max/2), got {safety}"
            )
        _set(self, "safety", safety)
        _set(self, "power_iters", check_int("power_iters", self.power_iters, 1))
        _set(self, "probe_batches", check_int("probe_batches", self.probe_batches, 0))
        factor = check_positive_float("divergence_factor", self.divergence_factor)
        if factor < 1:
            raise ValueError(f"divergence_factor must be >= 1, got {factor}")
        _set(self, "divergence_factor", factor)
        tol = check_positive_float("tol", self.tol)
        if tol >= 1:
            raise ValueError(
                f"tol must be < 1 (a relative residual; x = 0 already has residual 1), got {tol}"
            )
        _set(self, "tol", tol)
        _set(
            self,
            "raise_on_nonconvergence",
            check_bool("raise_on_nonconvergence", self.raise_on_nonconvergence),
        )

    @staticmethod
    def suggest_depth(scale: float, lambda_min: float, rtol: float = 1e-2) -> int:
        """Depth at which the expected LiSSA error along eigenvalue ``lambda_min`` of H + λI
        has decayed to ``rtol``: (1 − λ_min/scale)^depth ≤ rtol, i.e. about
        ln(1/rtol) · scale / λ_min steps (noise not counted)."""
        scale = check_positive_float("scale", scale)
        lambda_min = check_positive_float("lambda_min", lambda_min)
        rtol = check_positive_float("rtol", rtol)
        if rtol >= 1:
            return 1
        q = min(lambda_min / scale, 1.0)
        if q >= 1.0:
            return 1
        return max(1, math.ceil(math.log(rtol) / math.log1p(-q)))

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedLiSSA:
        _check_operator(op, ("matvec", "sample_matvec"))
        damping = check_damping(damping)
        start = time.perf_counter()
        dev = _normalise_device(op.device)
        n_train = getattr(op, "n_train", None)
        batch = self.batch_size
        if batch is not None and isinstance(n_train, int) and batch >= n_train:
            batch = None  # the full Hessian is as cheap as a minibatch that large
        info: dict[str, Any] = {
            "depth": self.depth,
            "batch_size": batch if batch is not None else n_train,
            "full_batch": batch is None,
            "repeats": 1 if batch is None else self.repeats,
            # deterministic full-batch iterates are not averaged (it would only add bias)
            "averaged_steps": (1 if batch is None else max(1, math.ceil(self.average_tail * self.depth))),
            "tol": self.tol,
        }
        gen = _generator(dev, None if self.seed is None else self.seed + 1)
        spec = _lanczos(op, damping, self.power_iters, gen)  # raises on negative curvature
        info.update(
            lambda_max_estimate=spec.lam_max,
            lambda_min_estimate=spec.lam_min,
            lanczos_steps=spec.steps,
        )
        if self.scale is not None:
            info.update(scale=self.scale, scale_source="user")
            scale = self.scale
        else:
            lam_batch = 0.0
            if batch is not None and self.probe_batches:
                lam_batch = self._probe_minibatches(op, damping, batch, spec.top, gen)
            scale = self.safety * max(spec.lam_max, lam_batch)
            info.update(scale=scale, scale_source="auto", minibatch_lambda_max_estimate=lam_batch)
        return _PreparedLiSSA(self, op, damping, info, time.perf_counter() - start, scale, batch)

    def _probe_minibatches(
        self,
        op: HessianOperatorLike,
        damping: float,
        batch: int,
        top: Tensor,
        gen: torch.Generator,
    ) -> float:
        """max over ``probe_batches`` minibatches B of λ̂_max(H_B + λI): ``_PROBE_ITERS`` power
        iterations each on the same minibatch, from H's top Ritz vector ``top`` (p, 1); the
        estimate is ‖(H_B + λI)u‖ for the final unit vector u."""
        lam_batch = 0.0
        for _ in range(self.probe_batches):
            state = gen.get_state()
            v = top
            nrm_t = torch.zeros((), dtype=top.dtype, device=top.device)
            for _ in range(_PROBE_ITERS):
                gen.set_state(state)  # the same minibatch on every iteration of this probe
                w = _sample_matvec(op, v, damping, batch, gen)
                nrm_t = torch.linalg.vector_norm(w)
                v = w / torch.where(nrm_t > 0, nrm_t, torch.ones_like(nrm_t))
            nrm = float(nrm_t)
            if not math.isfinite(nrm):
                raise ConvergenceError(
                    "LiSSA: a minibatch Hessian-vector product returned NaN or infinity "
                    "while estimating the scale; check the model and loss at these weights"
                )
            lam_batch = max(lam_batch, nrm)
        return lam_batch


@dataclass(frozen=True)
class _Spectrum:
    """What the Lanczos process learnt about A = H + λI (see :func:`_lanczos`)."""

    lam_max: float  # largest Ritz value: a lower bound of λ_max(A)
    lam_min: float  # smallest Ritz value: an upper bound of λ_min(A)
    top: Tensor  # (p, 1) unit Ritz vector of lam_max, on the operator's device
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
    return _Spectrum(lam_max=lam_max, lam_min=lam_min, top=top, steps=k)


class _PreparedLiSSA(PreparedSolver):
    solver: LiSSA

    def __init__(self, solver, op, damping, info, prepare_time_s, scale, batch) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self.scale = float(scale)
        self._batch = batch
        # seed None: one random stream for the lifetime of this object (not reproducible)
        self._gen = None if solver.seed is not None else _generator(self.device, None)

    def _solve(self, V: Tensor):
        cfg = self.solver
        op, lam, s = self.op, self.damping, self.scale
        depth, batch = cfg.depth, self._batch
        repeats = cfg.repeats if batch is not None else 1
        gen = self._gen if self._gen is not None else _generator(self.device, cfg.seed)
        r = V.shape[1]
        vnorm = _col_norms(V)
        mean = torch.zeros_like(V)
        m2 = torch.zeros_like(vnorm)  # Σ_k ‖x_k − x̄‖² per column (Welford)
        keep = 1.0 - lam / s
        calls = columns = 0
        # iterates h_j with j > depth − n_avg are averaged (n_avg = 1: the classic h_depth)
        n_avg = self.info["averaged_steps"]
        for k in range(repeats):
            h = V.clone()
            acc = torch.zeros_like(V) if n_avg > 1 else None
            for j in range(1, depth + 1):
                Ah = _sample_matvec(op, h, 0.0, batch, gen)  # damping applied in `keep`
                calls += 1
                columns += r
                h.mul_(keep).add_(V).sub_(Ah, alpha=1.0 / s)
                if acc is not None and j > depth - n_avg:
                    acc.add_(h)
                if j % _LISSA_CHECK_EVERY == 0 or j == depth:
                    self._watch(h, vnorm, j, k)
            x = h.div_(s) if acc is None else acc.div_(n_avg * s)
            delta = x - mean
            mean.add_(delta, alpha=1.0 / (k + 1))
            m2.add_((delta * (x - mean)).sum(0))
        # the check: true residual ‖(H + λI)x − v‖/‖v‖ and curvature xᵀ(H + λI)x/xᵀx per column,
        # from one batched full HVP
        res, curv, k = _residual_and_curvature(op, mean, V, lam)
        calls += int(k > 0)
        columns += k
        if bool((curv <= 0).any()):  # NaN curvature cannot occur: HVPs were finite so far
            raise _npd_error(
                "LiSSA",
                "a returned solution x has curvature xᵀ(H + λI)x / xᵀx",
                float(curv.min()),
                lam,
                self.info["lambda_max_estimate"],
            )
        spread = None
        if repeats >= 2:
            spread = _relative(torch.sqrt(m2.clamp_min(0) / (repeats - 1)), _col_norms(mean))
        converged = res <= cfg.tol
        info = {
            "scale": s,
            "scale_source": self.info["scale_source"],
            "repeats": repeats,
            "batch_size": self.info["batch_size"],
            "converged": converged,
            "tol": cfg.tol,
            "matvec_calls": calls,
            "matvec_columns": columns,
        }
        for key in ("lambda_max_estimate", "lambda_min_estimate", "minibatch_lambda_max_estimate"):
            if key in self.info:
                info[key] = self.info[key]
        if not bool(converged.all()):
            self._not_converged(
                "LiSSA",
                mean,
                depth,
                res,
                spread,
                converged,
                info,
                f"with depth={depth}, repeats={repeats}, batch_size={self.info['batch_size']}",
                self._advice(spread),
            )
        return mean, depth, res, spread, info

    def _advice(self, spread: Tensor | None) -> str:
        """What to change when the residual misses tol. The expected error along an eigenvalue μ
        of A = H + λI decays like (1 − μ/scale)^depth (truncation); on top comes minibatch noise."""
        cfg = self.solver
        s, lam, depth = self.scale, self.damping, cfg.depth
        lam_max, lam_min = self.info["lambda_max_estimate"], self.info["lambda_min_estimate"]
        advice = ""
        if self.info["scale_source"] == "user" and s > 2.0 * cfg.safety * lam_max:
            advice += (
                f"scale={_fmt(s)} is {_fmt(s / lam_max)}× the estimated largest eigenvalue "
                f"{_fmt(lam_max)} of H + λI, which slows the recursion by about that factor: pass "
                f"scale=None to have it chosen. "
            )
        need = LiSSA.suggest_depth(s, lam_min, 0.1)
        if depth < need:
            advice += (
                f"Increase depth: the error along an eigenvalue μ of H + λI decays like "
                f"(1 − μ/scale)^depth, and the smallest Ritz value found, {_fmt(lam_min)}, needs "
                f"depth ≥ {need} for a tenfold reduction (LiSSA.suggest_depth; more if the "
                f"smallest eigenvalue is lower). "
            )
        else:
            noise = ""
            if spread is not None:
                noise = f" (spread across repeats up to {_fmt(float(spread.max()))})"
            advice += (
                f"depth={depth} suffices for the smallest Ritz value found, {_fmt(lam_min)} (an "
                f"upper bound of the smallest eigenvalue), so the error is probably minibatch "
                f"noise{noise}: increase batch_size or repeats (or depth, if smaller eigenvalues "
                f"exist). "
            )
        return advice + (
            f"Damping raises every eigenvalue and speeds the recursion up (damping={lam:g} now); "
            f"or loosen tol (LiSSA is approximate)."
        )

    def _watch(self, h: Tensor, vnorm: Tensor, j: int, k: int) -> None:
        hn = _col_norms(h)
        bound = vnorm * (self.solver.divergence_factor * (j + 1))
        bad = ~torch.isfinite(hn) | (hn > bound)
        if not bool(bad.any()):
            return
        s, lam = self.scale, self.damping
        # The component of h along an eigenvalue μ of A = H + λI is multiplied by about
        # (1 − μ/scale) per step: a diverging h is dominated by the directions that expand, which
        # have μ < 0 when A is indefinite. hᵀAh/hᵀh ≤ 0 proves it (one full HVP, failure path only).
        fin = bad & torch.isfinite(hn)
        if bool(fin.any()):
            U = h[:, fin] / hn[fin]
            rq = (U * _matvec(self.op, U, lam)).sum(0)
            if bool(torch.isfinite(rq).all()) and bool((rq <= 0).any()):
                raise _npd_error(
                    "LiSSA",
                    f"the recursion diverged at step {j} of {self.solver.depth} (repeat {k + 1}), "
                    f"and a diverging iterate h has curvature hᵀ(H + λI)h / hᵀh",
                    float(rq.min()),
                    lam,
                    self.info["lambda_max_estimate"],
                )
        finite = bool(torch.isfinite(hn[bad]).all())
        ratio = _relative(hn, vnorm)[bad].max()
        what = (
            f"‖h‖/‖v‖ reached {_fmt(float(ratio))}, beyond the bound "
            f"{self.solver.divergence_factor:g}·(j+1) = {_fmt(self.solver.divergence_factor * (j + 1))}"
            if finite
            else "the iterates became NaN or infinite"
        )
        if self.info.get("scale_source") == "auto":
            cause = (
                f"The scale was chosen automatically ({_fmt(s)} = {self.solver.safety:g} × the "
                f"estimated largest eigenvalue {_fmt(s / self.solver.safety)}), so some minibatch "
                f"Hessians H_B + λI most likely have eigenvalues above 2·scale or below 0 (a "
                f"non-convex model): pass a larger batch_size, a larger scale or a larger damping "
                f"(damping={lam:g} now)"
            )
        else:
            cause = (
                f"The recursion contracts only if every minibatch Hessian satisfies 0 < eig(H_B + "
                f"λI) < 2·scale: scale={_fmt(s)} is probably too small (the largest eigenvalue "
                f"of H + λI is about {_fmt(self.info['lambda_max_estimate'])}) — pass scale=None "
                f"to have it estimated, or a larger scale — or some H_B + λI have negative "
                f"eigenvalues: pass a larger damping (damping={lam:g} now)"
            )
        raise ConvergenceError(
            f"LiSSA diverged at step {j} of {self.solver.depth} (repeat {k + 1}): {what}. {cause}."
        )


# ==============================================================================================
# Selection by name
# ==============================================================================================
_SOLVERS: dict[str, type[Solver]] = {"exact": Exact, "cg": CG, "block_cg": BlockCG, "lissa": LiSSA}


def resolve_solver(solver: str | Solver | type[Solver], name: str = "solver") -> Solver:
    """A solver object from a name (``"exact"``, ``"cg"``, ``"block_cg"``, ``"lissa"``; case-insensitive; default
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
            f"{name} must be one of 'exact', 'cg', 'block_cg', 'lissa' or a solver object such as "
            f"pyinfluence.CG(tol=1e-6), got {solver!r}"
        )
    raise TypeError(
        f"{name} must be a solver name ('exact', 'cg', 'block_cg', 'lissa') or a solver object such as "
        f"pyinfluence.CG(), got {type(solver).__name__} {solver!r}"
    )
