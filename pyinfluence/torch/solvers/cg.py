"""``CG`` and ``BlockCG``: conjugate gradients over Hessian-vector products for many right-hand sides."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyinfluence._validation import (
    check_damping,
    check_int,
    check_positive_float,
)
from pyinfluence.errors import ConvergenceError
from pyinfluence.torch.solvers.base import (
    HessianOperatorLike,
    PreparedSolver,
    Solver,
    _check_operator,
    _check_stopping_fields,
    _col_norms,
    _fmt,
    _matvec,
    _normalise_device,
    _npd_error,
    _relative,
    _set,
    _true_residual,
)
from pyinfluence.torch.solvers.lanczos import _sharpen_negative_curvature
from pyinfluence.torch.solvers.preconditioners import (
    PreconditionerLike,
    _Preconditioner,
    _preconditioner_state,
    _prepare_preconditioner,
    _restore_preconditioner,
    check_preconditioner,
)

# CG: on CUDA, convergence is checked every this many iterations (one host synchronisation).
_CG_CUDA_CHECK_EVERY = 10


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

    **Preconditioning** (``preconditioner``). With a symmetric positive definite M ≈ (H + λI)⁻¹
    (K-FAC / EK-FAC, see :mod:`pyinfluence.torch.solvers.preconditioners`), each column runs the
    standard preconditioned CG (Hestenes & Stiefel 1952 §9; Golub & Van Loan Alg. 11.5.1), A = H + λI::

        x₀ = 0, r₀ = v, z₀ = M r₀, p₀ = z₀
        α_k = r_kᵀz_k / p_kᵀA p_k;  x_{k+1} = x_k + α_k p_k;  r_{k+1} = r_k − α_k A p_k
        z_{k+1} = M r_{k+1};  β_k = r_{k+1}ᵀz_{k+1} / r_kᵀz_k;  p_{k+1} = z_{k+1} + β_k p_k

    which is CG on M^{1/2} A M^{1/2}: its iteration count is governed by the spectrum of M A (near 1
    for a good M) instead of that of A. It solves the same system: the stopping test stays on the
    unpreconditioned residual ‖r‖ = ‖v − A x‖ ≤ tol·‖v‖ (r is the residual of A, updated
    recursively as without preconditioning, not the M-norm rᵀMr), the reported residual is the
    true one, and p_kᵀA p_k ≤ 0 still proves that A is not positive definite. ``matvec_columns``
    counts HVP columns as without a preconditioner; ``info["preconditioner_columns"]`` counts the
    columns M was applied to (one per active column and iteration, plus one at the start), and
    ``prepared.info`` the preconditioner's preparation (``preconditioner_data_passes``,
    ``preconditioner_prepare_time_s``, also included in ``prepare_time_s``).

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
    preconditioner : None, "ekfac", "kfac" or a KFAC/EKFAC object, default None (keyword only)
        None: plain CG, exactly as without the option. ``"ekfac"`` / ``"kfac"``:
        ``EKFAC(lanczos_steps=0)`` / ``KFAC(lanczos_steps=0)`` prepared in ``prepare`` from the
        same operator and damping (two / one passes over the training data; the operator must be a
        :class:`~pyinfluence.torch.hessian.HessianOperator` of a model of layers K-FAC supports —
        see :class:`~pyinfluence.torch.solvers.KFAC`); its own Lanczos search for negative
        curvature is skipped, CG detects it. A configured KFAC/EKFAC object is prepared as
        configured. EK-FAC is the better preconditioner (its eigenvalues are fitted to the
        per-example gradients) for the same cost per application.

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
    # keyword only, so that positional arguments of BlockCG (rank_tol after check_every) keep their order
    preconditioner: PreconditionerLike = field(default=None, kw_only=True)

    name: ClassVar[str] = "cg"
    _restore_needs: ClassVar[tuple[str, ...]] = ("matvec",)

    def __post_init__(self) -> None:
        tol = check_positive_float("tol", self.tol)
        if tol >= 1:
            raise ValueError(f"tol must be < 1 (a relative residual), got {tol}")
        _set(self, "tol", tol)
        if self.max_iter is not None:
            _set(self, "max_iter", check_int("max_iter", self.max_iter, 1))
        _check_stopping_fields(self)
        if self.check_every is not None:
            _set(self, "check_every", check_int("check_every", self.check_every, 1))
        _set(self, "preconditioner", check_preconditioner(self.preconditioner))

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedCG:
        _check_operator(op, ("matvec",))
        damping = check_damping(damping)
        start = time.perf_counter()
        max_iter, check_every = self._limits(op)
        info: dict[str, Any] = {"max_iter": max_iter, "tol": self.tol}
        pre = _prepare_preconditioner(self.preconditioner, op, damping, type(self).__name__)
        elapsed = 0.0
        if pre is not None:
            info.update(pre.info)
            elapsed = time.perf_counter() - start
        return _PreparedCG(self, op, damping, info, elapsed, max_iter, check_every, pre)

    def _limits(self, op: HessianOperatorLike) -> tuple[int, int]:
        """(max_iter, check_every) for this operator: the configured values or their defaults."""
        max_iter = self.max_iter if self.max_iter is not None else min(10 * int(op.n_params), 1000)
        dev = _normalise_device(op.device)
        return max_iter, self.check_every or (_CG_CUDA_CHECK_EVERY if dev.type == "cuda" else 1)

    def _restore(
        self,
        op: HessianOperatorLike,
        damping: float,
        tensors: Mapping[str, Tensor],
        state: Any,
        info: dict[str, Any],
    ) -> _PreparedCG:
        """Nothing to restore but the preconditioner (if any); the limits are recomputed for the device."""
        pre = _restore_preconditioner(
            self.preconditioner, op, damping, tensors, _pre_state(state), f"{type(self).__name__}.restore"
        )
        max_iter, check_every = self._limits(op)
        return _PreparedCG(self, op, damping, info, 0.0, max_iter, check_every, pre)


def _pre_state(state: Any) -> Any:
    if not isinstance(state, Mapping):
        raise ValueError("the saved state must be a dict with the field 'preconditioner'")
    return state.get("preconditioner")


class _PreparedCG(PreparedSolver):
    solver: CG

    def __init__(
        self,
        solver: CG,
        op: HessianOperatorLike,
        damping: float,
        info: dict[str, Any],
        prepare_time_s: float,
        max_iter: int,
        check_every: int,
        pre: _Preconditioner | None = None,
    ) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self._max_iter = max_iter
        self._check_every = check_every
        self._pre = pre  # the preconditioner M (None: plain CG)

    def _state(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        return {"preconditioner": _preconditioner_state(self._pre, tensors)}

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
        Xa = torch.zeros_like(R)
        rr = rr_all.index_select(0, act)
        pre = self._pre
        pre_cols = 0
        if pre is None:
            P = R.clone()
            rz = rr  # plain CG: z = r, so rᵀz = ‖r‖² (the same tensor: the plain recursion unchanged)
        else:
            P = pre.apply(R) if act.numel() else R.clone()  # p₀ = z₀ = M r₀
            pre_cols += int(act.numel())
            rz = (R * P).sum(0)
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
            alpha = torch.where(ok, rz / torch.where(ok, pAp, torch.ones_like(pAp)), 0.0)  # rᵀz / pᵀAp
            Xa.add_(P * alpha)
            R.sub_(AP * alpha)
            rr_new = (R * R).sum(0)
            if pre is None:
                Z, rz_new = R, rr_new
            else:
                Z = pre.apply(R)  # z = M r
                pre_cols += n_active
                rz_new = (R * Z).sum(0)
            beta = torch.where(ok, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
            P = torch.addcmul(Z, P, beta)  # p = z + β p
            rr = torch.where(ok, rr_new, rr)
            rz = rr if pre is None else torch.where(ok, rz_new, rz)
            it_a += ok
            done |= rr <= th
            n_it += 1
            if n_it % self._check_every == 0 or n_it == self._max_iter:
                if bool(bad.any()):
                    self._raise_npd(curv_min[bad], rq_max, n_it)
                if (
                    bool(broken.any())
                    or not bool(torch.isfinite(rr).all())
                    or (pre is not None and not bool(torch.isfinite(rz).all()))
                ):
                    raise ConvergenceError(
                        f"CG: the residuals became NaN or infinite at iteration {n_it}: the "
                        f"Hessian-vector products{' or the preconditioner' if pre is not None else ''} "
                        f"returned non-finite values (check the model "
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
                    rz = rr if pre is None else rz[keep]
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
        if pre is not None:
            info["preconditioner"] = pre.name
            info["preconditioner_columns"] = pre_cols
        if n_active:
            self._report_not_converged("CG", X, n_iter, res, converged, info, float(rq_max))
        return X, n_iter, res, None, info

    def _report_not_converged(
        self, who: str, X: Tensor, n_iter: int, res: Tensor, converged: Tensor, info: dict, rq_max: float
    ) -> None:
        """ConvergenceError (or, with ``raise_on_nonconvergence=False``, a warning) after ``max_iter`` iterations,
        with the advice that fits CG: ``rq_max`` (the largest Rayleigh quotient seen) bounds λ_max(H + λI) below."""
        self._not_converged(
            who,
            X,
            n_iter,
            res,
            None,
            converged,
            info,
            f"in max_iter={self._max_iter} iterations",
            f"Increase max_iter, loosen tol, or add damping, which improves the conditioning "
            f"of H + λI (damping={self.damping:g} now; the largest eigenvalue of H + λI is at least "
            f"{_fmt(rq_max)})",
        )

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

    **Preconditioning** (``preconditioner``, as for :class:`CG`). O'Leary's preconditioned block CG
    (1980, §5) applies M ≈ A⁻¹ to the block residual, Z = M R, and builds the next search block from
    Z instead of R. With L = M^{1/2} (symmetric; M = L L) it is exactly the block CG above on the
    symmetrically preconditioned system Â X̂ = L V, Â = L A L, X = L X̂, R̂ = L R; written in the
    original variables (P = L P̂, P̂ orthonormal)::

        Q = A P;  PᵀQ = P̂ᵀ Â P̂
        α = (PᵀQ)⁻¹ Pᵀ R;  X += P α;  R −= Q α                 (R = V − A X, unpreconditioned)
        β = −(PᵀQ)⁻¹ (L Q)ᵀ (L R_active)   [= −(PᵀQ)⁻¹ Qᵀ M R_active]
        P̂ = orth(L R_active + P̂ β);  P = L P̂                 (span P = span(M R_active + P β))

    so its iterations are governed by the spectrum of M A. Each iteration applies L to the active
    residuals, to Q and to the new P̂ (``info["preconditioner_columns"]`` counts the columns), besides
    the one batched HVP (``matvec_columns`` as without a preconditioner). The stopping test is on the
    unpreconditioned residual ‖R‖ (recursively updated) per column and the reported residual is the
    true one, as without preconditioning (converged columns are frozen: they take no further steps,
    whose Galerkin corrections could push their residual back above tol); a Ritz value of PᵀQ ≤ 0 (for P̂ orthonormal, those are Ritz
    values of Â, positive iff A is positive definite) raises NotPositiveDefiniteError with the
    curvature uᵀAu/uᵀu of its Ritz vector u = P y.

    Parameters are those of :class:`CG` (``tol`` per column on the recursively updated residual,
    ``max_iter``, ``raise_on_nonconvergence``, ``preconditioner``; ``check_every`` is ignored: every
    iteration synchronises to factorise PᵀQ), plus ``rank_tol`` (default 1e-10 in float64, 1e-5 in
    float32 when None; with a preconditioner it applies to the singular values of the block in the
    preconditioned variables, see the comment in ``_orth``). The reported residuals are true ones,
    from one extra batched HVP, as for CG. Raises NotPositiveDefiniteError when PᵀAP is not positive
    definite (a Ritz value ≤ 0). Memory: a few (p, r) blocks, like CG.
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
        return _PreparedBlockCG(
            self, op, base.damping, dict(base.info), base.prepare_time_s, base._max_iter, 1, base._pre
        )

    def _restore(
        self,
        op: HessianOperatorLike,
        damping: float,
        tensors: Mapping[str, Tensor],
        state: Any,
        info: dict[str, Any],
    ) -> _PreparedBlockCG:
        base = super()._restore(op, damping, tensors, state, info)
        return _PreparedBlockCG(self, op, damping, info, 0.0, base._max_iter, 1, base._pre)


class _PreparedBlockCG(_PreparedCG):
    solver: BlockCG

    def _orth(self, Z: Tensor) -> Tensor:
        """Orthonormal basis of span Z, rank-revealing (drops directions below rank_tol·σ_max).

        With a preconditioner, Z is a block in the preconditioned variables (Z = L⁻¹ P for the search
        block P of the original variables, L = M^{1/2}), so the basis is orthonormal in the M⁻¹ inner
        product, PᵀM⁻¹P = I: the Euclidean orthonormalisation of block CG on Â = L A L, the operator
        the preconditioned iteration really works with. That is the appropriate inner product for
        two reasons. (1) Which directions count as numerically dependent is then decided as in the
        unpreconditioned method on Â, with the same meaning of rank_tol; orthonormalising P in the
        Euclidean inner product instead (as Ji & Li's preconditioned variant does) would let the
        scaling of M — factors 1/(curvature + l2 + λ), spread over several orders of magnitude —
        decide: a direction of large curvature, shrunk by M, would be dropped as "dependent" although
        it matters. (2) PᵀAP = P̂ᵀÂP̂ has condition number ≤ cond(Â) = cond(M A), small for a good M,
        so its Cholesky factorisation is well conditioned; with Euclidean-orthonormal P it would be
        ≤ cond(A) only.
        """
        U, sv, _ = torch.linalg.svd(Z, full_matrices=False)
        if sv.numel() == 0 or not bool(sv[0] > 0):
            return U[:, :0]
        rt = self.solver.rank_tol
        if rt is None:
            rt = 1e-10 if Z.dtype == torch.float64 else 1e-5
        return U[:, sv > rt * sv[0]]

    def _sqrt(self, B: Tensor, what: str, n_it: int) -> Tensor:
        """L B = M^{1/2} B, refusing non-finite output (an overflow in the preconditioner)."""
        assert self._pre is not None
        out = self._pre.sqrt(B)
        if not bool(torch.isfinite(out).all()):
            raise ConvergenceError(
                f"block CG: the preconditioner ({self._pre.name}) returned non-finite values for {what} at "
                f"iteration {n_it} (an overflow: the right-hand sides or the curvature factors are too "
                f"large for {B.dtype}); scale the right-hand sides or use float64"
            )
        return out

    def _solve(self, V: Tensor):
        op, lam, tol = self.op, self.damping, self.solver.tol
        pre = self._pre
        r = V.shape[1]
        X = torch.zeros_like(V)
        bnorm = _col_norms(V)
        thresh = tol * bnorm
        R = V.clone()
        active = bnorm > 0  # zero columns: x = 0 exactly
        calls = columns = pre_cols = 0
        n_it = 0
        iters = torch.zeros(r, dtype=torch.long, device=V.device)
        rq_max = 0.0
        ritz_lo, ritz_hi = math.inf, 0.0  # extreme Ritz values of Â = L A L (preconditioned)
        rnorm = bnorm.clone()
        # Ph: the search block in the preconditioned variables (orthonormal); P = L Ph, or Ph itself
        if not bool(active.any()):
            Ph = R[:, :0]
        elif pre is None:
            Ph = self._orth(R[:, active])
        else:
            Ph = self._orth(self._sqrt(R[:, active], "the residuals", 0))  # orth(L R₀)
            pre_cols += int(active.sum())
        P = Ph
        if pre is not None and Ph.shape[1]:
            P = self._sqrt(Ph, "the search block", 0)
            pre_cols += int(Ph.shape[1])
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
            if pre is None:
                ritz = torch.linalg.eigvalsh(PtQ)  # Ritz values of H + λI on span P
                rq_max = max(rq_max, float(ritz[-1]))
                if not bool(ritz[0] > 0):
                    self._raise_npd(ritz[:1], torch.tensor(rq_max), n_it + 1)
            else:
                # Ritz values of Â = L A L on span P̂ (P̂ orthonormal); the curvature of A itself is
                # reported through Rayleigh quotients uᵀAu/uᵀu of vectors u of span P
                ritz, Y = torch.linalg.eigh(PtQ)
                ritz_lo, ritz_hi = min(ritz_lo, float(ritz[0])), max(ritz_hi, float(ritz[-1]))
                pp = (P * P).sum(0)
                rq_cols = PtQ.diagonal() / torch.where(pp > 0, pp, torch.ones_like(pp))
                rq_max = max(rq_max, float(rq_cols.max()))
                if not bool(ritz[0] > 0):
                    u = P @ Y[:, :1]  # (Py)ᵀA(Py) = ritz₀ ≤ 0 for the unit eigenvector y
                    uu = float((u * u).sum())
                    curv = float(ritz[0]) / uu if uu > 0 else float(ritz[0])
                    self._raise_npd(torch.tensor([curv]), torch.tensor(rq_max), n_it + 1)
            L, chol_info = torch.linalg.cholesky_ex(PtQ)
            if int(chol_info):
                raise ConvergenceError(
                    f"block CG: PᵀAP (order {PtQ.shape[0]}) could not be Cholesky-factorised at iteration "
                    f"{n_it + 1} although its eigenvalues are positive: the search block is numerically "
                    f"dependent; pass a larger rank_tol (rank_tol={self.solver.rank_tol} now) or add "
                    f"damping (damping={lam:g} now)"
                )
            alpha = torch.cholesky_solve(P.T @ R, L)  # (s, r): all columns take the step
            if pre is not None:
                # preconditioned: converged columns are frozen (as in CG). A Galerkin step on span P never
                # raises a column's A-norm error, but it can raise its residual norm, the stopping test,
                # back above tol (seen at tol = 1e-8 with K-FAC on a raw-pixel digits model)
                alpha = alpha * active
            X.addmm_(P, alpha)
            R.sub_(Q @ alpha)
            n_it += 1
            rnorm = _col_norms(R)
            iters += active.long()
            active = active & (rnorm > thresh)
            if not bool(active.any()):
                break
            Ra = R[:, active]
            if pre is None:
                Rh, Qh = Ra, Q
            else:  # L R_active and L Q, in one application
                k = int(Ra.shape[1])
                both = self._sqrt(torch.cat([Ra, Q], dim=1), "the residuals", n_it)
                pre_cols += int(both.shape[1])
                Rh, Qh = both[:, :k], both[:, k:]
            beta = -torch.cholesky_solve(Qh.T @ Rh, L)  # Â-conjugacy to the current block
            Ph = self._orth(Rh + Ph @ beta)
            if pre is None:
                P = Ph
            elif Ph.shape[1]:
                P = self._sqrt(Ph, "the search block", n_it)
                pre_cols += int(Ph.shape[1])
            else:
                P = Ph
        converged = rnorm <= thresh
        res, k = _true_residual(op, X, V, lam)
        calls += int(k > 0)
        columns += k
        info: dict[str, Any] = {
            "converged": converged,
            "iterations_per_column": iters,
            "recursive_residual": _relative(rnorm, bnorm),
            "lambda_max_estimate": rq_max,
            "matvec_calls": calls,
            "matvec_columns": columns,
        }
        if pre is not None:
            info["preconditioner"] = pre.name
            info["preconditioner_columns"] = pre_cols
            if math.isfinite(ritz_lo):
                # inner bounds of the extreme eigenvalues of M(H + λI) (1 for a perfect preconditioner)
                info["preconditioned_lambda_min_estimate"] = ritz_lo
                info["preconditioned_lambda_max_estimate"] = ritz_hi
        if not bool(converged.all()):
            self._report_not_converged("block CG", X, n_it, res, converged, info, float(rq_max))
        return X, n_it, res, None, info

    def _raise_npd(self, curv: Tensor, rq_max: Tensor, n_it: int) -> None:
        c, note = _sharpen_negative_curvature(self.op, self.damping, float(curv.min()), "block CG")
        where = (
            "the smallest Ritz value on span P"
            if self._pre is None
            else "the Ritz vector of PᵀAP's smallest eigenvalue"
        )
        raise _npd_error(
            "block CG",
            f"the search block P at iteration {n_it} has a direction p with curvature "
            f"pᵀ(H + λI)p / pᵀp = {_fmt(float(curv.min()))} ({where})"
            f"{note}; the smallest curvature",
            c,
            self.damping,
            float(rq_max),
        )
